"""The census source on a local SOMA store laid out like the CELLxGENE census (no network).

Thresholds are scaled down (min_cells 20, donors_above 3) but every filter is exercised
exactly at its boundary: 19 vs 20 cells, 3 vs 4 donors, 7 vs 8 ontology ancestors (the real
threshold, on real CL terms), plus the assay, primary-data and root filters and scTab's donor
unit (dataset_id + donor_id).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

tiledbsoma = pytest.importorskip("tiledbsoma")
pytest.importorskip("cellxgene_census")

from celltype_bench.data.census import load_census, select_cell_types  # noqa: E402
from celltype_bench.data.sources import SOURCES, validate_raw  # noqa: E402
from celltype_bench.errors import InputError  # noqa: E402

TENX = "10x 3' v3"
SMALL = {"min_cells": 20, "donors_above": 3, "ancestors_above": 7}

# (CL id, label, primary 10x cells, donor units) -> expected verdict with SMALL thresholds
TYPES = [
    ("CL:0000084", "T cell", 20, 4, True),  # exactly min_cells, donors 4 > 3, 9 ancestors
    ("CL:0000236", "B cell", 19, 4, False),  # one cell short
    ("CL:0000623", "natural killer cell", 25, 3, False),  # donors 3 is not > 3
    ("CL:0001054", "CD14-positive monocyte", 25, 4, True),
    ("CL:0000051", "common lymphoid progenitor", 25, 4, False),  # 7 ancestors is not > 7
    ("CL:0000019", "sperm", 25, 4, True),  # 8 ancestors > 7
    ("CL:0000010", "cultured cell", 25, 4, False),  # a cell in vitro: not a native cell
]
N_GENES = 30


def _fixture_obs() -> pd.DataFrame:
    rows = []
    for cl, label, n, n_donors, _ in TYPES:
        for i in range(n):
            unit = i % n_donors
            # donor units span two datasets that reuse donor ids: d0/d1 in ds_a and ds_b
            rows.append((label, cl, f"ds_{'ab'[unit // 2]}", f"d{unit % 2}", TENX, True))
    # noise that the filters must ignore:
    rows += [("B cell", "CL:0000236", "ds_a", "d0", TENX, False)] * 3  # not primary
    rows += [("natural killer cell", "CL:0000623", "ds_c", "d9", "Smart-seq2", True)] * 5
    rows += [("T cell", "CL:0000084", "ds_c", "d8", "Smart-seq2", True)] * 2
    obs = pd.DataFrame(
        rows,
        columns=[
            "cell_type",
            "cell_type_ontology_term_id",
            "dataset_id",
            "donor_id",
            "assay",
            "is_primary_data",
        ],
    )
    obs["tissue_general"] = "blood"
    for col in obs.columns.drop("is_primary_data"):
        obs[col] = obs[col].astype("category")
    obs.index = [f"c{i}" for i in range(len(obs))]
    return obs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A census-shaped SOMA collection: census_info + census_data/homo_sapiens (RNA, raw)."""
    from tiledbsoma.io import from_anndata

    root = str(tmp_path_factory.mktemp("census") / "soma")
    obs = _fixture_obs()
    rng = np.random.default_rng(0)
    X = sp.random(len(obs), N_GENES, density=0.3, random_state=rng, format="csr")
    X.data = np.ceil(X.data * 20).astype(np.float32)
    # each cell's row encodes its fixture index in gene 0, to check that rows line up
    X = sp.lil_matrix(X)
    X[:, 0] = np.arange(1, len(obs) + 1)[:, None]
    var = pd.DataFrame(
        {
            "feature_id": [f"ENSG{i:011d}" for i in range(N_GENES)],
            "feature_name": [f"GENE{i}" for i in range(N_GENES)],
        },
        index=[f"ENSG{i:011d}" for i in range(N_GENES)],
    )
    adata = ad.AnnData(X=sp.csr_matrix(X, dtype=np.float32), obs=obs, var=var)
    with tiledbsoma.Collection.create(root) as census:
        census.add_new_collection("census_info")
        data = census.add_new_collection("census_data")
        uri = from_anndata(
            f"{root}/census_data/homo_sapiens",
            adata,
            measurement_name="RNA",
            X_layer_name="raw",
        )
        with tiledbsoma.Experiment.open(uri) as exp:
            data.set("homo_sapiens", exp, use_relative_uri=True)
    return root, adata


def _kept(result: ad.AnnData) -> set[str]:
    return set(result.obs["cell_type_ontology_term_id"].astype(str).unique())


def test_recipe_boundaries(store):
    root, _ = store
    out = load_census(uri=root, **SMALL)
    assert _kept(out) == {cl for cl, *_, keep in TYPES if keep}
    # only primary 10x cells of kept types, none of the Smart-seq2 T cells
    expected = sum(n for cl, _, n, _, keep in TYPES if keep)
    assert out.n_obs == expected
    assert set(out.obs["assay"]) == {TENX}
    validate_raw(out)


def test_rows_line_up_with_obs(store):
    root, source = store
    out = load_census(uri=root, **SMALL, chunk_cells=7)  # several X chunks
    index = out.X[:, list(out.var_names).index("GENE0")].toarray().ravel().astype(int) - 1
    src = source.obs.iloc[index]
    assert (src["cell_type"].astype(str).to_numpy() == out.obs["cell_type"].astype(str)).all()
    donors = src["dataset_id"].astype(str) + "_" + src["donor_id"].astype(str)
    assert (donors.to_numpy() == out.obs["donor_id"].astype(str).to_numpy()).all()
    np.testing.assert_array_equal(
        out.X.toarray(), source.X[index].toarray()
    )  # same counts, genes in var order


def test_donor_unit_is_dataset_plus_donor(store):
    root, _ = store
    out = load_census(uri=root, **SMALL)
    t_cells = out.obs[out.obs["cell_type"] == "T cell"]
    assert sorted(t_cells["donor_id"].unique()) == ["ds_a_d0", "ds_a_d1", "ds_b_d0", "ds_b_d1"]
    assert set(out.obs["batch"]) == {"ds_a", "ds_b"}


def test_select_cell_types_table(store):
    _, source = store
    obs = source.obs[source.obs["is_primary_data"] & (source.obs["assay"] == TENX)].copy()
    obs["donor"] = obs["dataset_id"].astype(str) + "_" + obs["donor_id"].astype(str)
    table = select_cell_types(obs, **SMALL)
    row = table.loc["CL:0000051"]
    assert (row.n_ancestors, bool(row.enough_ancestors)) == (7, False)
    assert (table.loc["CL:0000019"].n_ancestors, bool(table.loc["CL:0000019"].keep)) == (8, True)
    assert (table.loc["CL:0000236"].n_cells, bool(table.loc["CL:0000236"].keep)) == (19, False)
    assert (table.loc["CL:0000623"].n_donors, bool(table.loc["CL:0000623"].keep)) == (3, False)
    assert not table.loc["CL:0000010"].in_root  # cell in vitro
    # at the paper's thresholds nothing in this tiny store qualifies
    assert not select_cell_types(obs).keep.any()


def test_root_filter_alone(store):
    root, _ = store
    out = load_census(uri=root, min_cells=1, donors_above=0, ancestors_above=0)
    assert "CL:0000010" not in _kept(out)  # only the root filter removes it
    assert "CL:0000051" in _kept(out)


def test_cell_type_list_replaces_ontology_criteria(store, tmp_path):
    root, _ = store
    listing = tmp_path / "types.txt"
    listing.write_text("# scTab-style list\ncommon lymphoid progenitor\nB cell\n")
    out = load_census(uri=root, cell_types=str(listing), **SMALL)
    assert _kept(out) == {"CL:0000051"}  # B cell still fails min_cells


def test_gene_list_and_cap(store):
    root, _ = store
    genes = [f"ENSG{i:011d}" for i in (0, 3, 5, 7)] + ["ENSG_NOT_THERE"]
    out = load_census(uri=root, genes=genes, max_cells_per_type=10, seed=3, **SMALL)
    assert list(out.var_names) == ["GENE0", "GENE3", "GENE5", "GENE7"]
    assert out.obs["cell_type"].value_counts().max() == 10
    assert out.n_obs == 30
    again = load_census(uri=root, genes=genes, max_cells_per_type=10, seed=3, **SMALL)
    assert list(again.obs_names) == list(out.obs_names)  # seeded


def test_registered_and_errors(store, tmp_path):
    root, _ = store
    assert SOURCES["census"] is load_census
    with pytest.raises(InputError, match="no cell type passes"):
        load_census(uri=root)  # paper thresholds on a tiny store
    with pytest.raises(InputError, match="cannot open the census"):
        load_census(uri=str(tmp_path / "nothing"))
    with pytest.raises(InputError, match="none of the requested genes"):
        load_census(uri=root, genes=["ENSG_X"], **SMALL)
