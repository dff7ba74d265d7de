"""Tests of the raw data sources: real PBMC68k counts and the census-like generator."""

from __future__ import annotations

import importlib.resources
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltype_bench import io
from celltype_bench.data import sources as src
from celltype_bench.errors import InputError


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    return src.load_pbmc68k()


@pytest.fixture(scope="module")
def census() -> ad.AnnData:
    return src.generate_census_like(n_cells=8000, n_donors=48, seed=0)


@pytest.fixture(scope="module")
def cl_terms() -> dict:
    """The pinned CL release as shipped by cellxgene-ontology-guide (id -> label, ancestors)."""
    zstandard = pytest.importorskip("zstandard")
    res = importlib.resources.files("cellxgene_ontology_guide").joinpath(
        "data", "CL-ontology-v2026-03-26.json.zst"
    )
    with res.open("rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as reader:
        return json.loads(reader.read())


def _is_integer(X) -> bool:
    data = X.data if sp.issparse(X) else np.asarray(X)
    return bool(np.all(data == np.rint(data)) and np.all(data >= 0))


# ---- pbmc68k --------------------------------------------------------------------------------
def test_pbmc68k_shape_and_integer_counts(pbmc):
    assert pbmc.shape == (700, 765)
    assert sp.isspmatrix_csr(pbmc.X) and pbmc.X.dtype == np.float32
    assert _is_integer(pbmc.X)
    assert pbmc.obs_names.is_unique and pbmc.var_names.is_unique
    assert set(src.STANDARD_OBS) <= set(pbmc.obs.columns)
    assert pbmc.X.sum() > 0


def test_pbmc68k_counts_reproduce_raw_log_values(pbmc):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        orig = ad.read_h5ad(src.pbmc68k_path())
    assert list(orig.raw.var_names) == list(pbmc.var_names)
    assert list(orig.obs_names) == list(pbmc.obs_names)
    counts = pbmc.X.toarray().astype(np.float64)
    n_counts = orig.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    rebuilt = np.log1p(counts / n_counts * 1e4)
    np.testing.assert_allclose(rebuilt, orig.raw.X.toarray(), atol=2e-3)
    assert (counts > 0).sum() == orig.raw.X.nnz


def test_pbmc68k_labels_all_mapped(pbmc, cl_terms):
    labels = set(pbmc.obs["cell_type"].astype(str))
    assert len(labels) == 10
    assert labels == set(src.PBMC68K_LABEL_MAP)
    pairs = pbmc.obs[["cell_type", "cell_type_ontology_term_id"]].astype(str).drop_duplicates()
    assert len(pairs) == 10
    for lab, cl in pairs.itertuples(index=False):
        assert src.PBMC68K_LABEL_MAP[lab] == cl
        assert cl in cl_terms and not cl_terms[cl]["deprecated"]
    assert set(pbmc.obs["donor_id"]) == {"pbmc68k_donorA"}
    assert set(pbmc.obs["tissue"]) == {"blood"}
    assert pbmc.uns["source"]["kind"] == "pbmc68k"


def test_pbmc68k_roundtrips_through_h5ad(pbmc, tmp_path):
    path = tmp_path / "pbmc.h5ad"
    io.write_h5ad(pbmc, path)
    back = io.read_h5ad(path)
    assert (back.X != pbmc.X).nnz == 0
    assert back.uns["source"]["kind"] == "pbmc68k"
    src.validate_raw(back, path=path)


# ---- census-like ----------------------------------------------------------------------------
def test_census_types_table_is_consistent(cl_terms):
    ranks = sorted(ct.rank for ct in src.CENSUS_TYPES)
    assert ranks == list(range(1, len(src.CENSUS_TYPES) + 1))
    labels = [ct.label for ct in src.CENSUS_TYPES]
    assert len(set(labels)) == len(labels) >= 22
    for ct in src.CENSUS_TYPES:
        assert cl_terms[ct.cl_id]["label"] == ct.label, ct
        assert not cl_terms[ct.cl_id]["deprecated"]
    # parents and children at mixed granularity, as the ontology says
    by_label = {ct.label: ct.cl_id for ct in src.CENSUS_TYPES}
    for child, parent in [
        ("CD4-positive, alpha-beta T cell", "T cell"),
        ("CD4-positive, alpha-beta memory T cell", "CD4-positive, alpha-beta T cell"),
        ("naive B cell", "B cell"),
        ("CD14-positive monocyte", "monocyte"),
        ("plasmacytoid dendritic cell", "dendritic cell"),
    ]:
        assert by_label[parent] in cl_terms[by_label[child]]["ancestors"]


def test_census_like_corpus_shape(census, pbmc):
    obs = census.obs
    assert census.n_obs == 8000
    assert list(census.var_names) == list(pbmc.var_names)
    assert sp.isspmatrix_csr(census.X) and census.X.dtype == np.float32
    assert _is_integer(census.X)
    assert set(src.STANDARD_OBS) | {"dataset_id"} <= set(obs.columns)
    sizes = obs["cell_type"].value_counts()
    assert len(sizes) >= 22
    assert sizes.max() / sizes.min() >= 100
    assert sizes.min() >= 15
    assert obs["donor_id"].nunique() >= 40
    assert obs["tissue"].nunique() >= 3
    assert obs["assay"].nunique() >= 2
    assert set(obs["assay"]) <= set(src.SCTAB_10X_ASSAYS)
    assert {"T cell", "CD4-positive, alpha-beta T cell", "B cell", "naive B cell"} <= set(
        sizes.index
    )
    # one CL id per label; donors nested in datasets; one assay per dataset
    assert (
        obs.groupby("cell_type", observed=True)["cell_type_ontology_term_id"].nunique() == 1
    ).all()
    donor_prefix = obs["donor_id"].astype(str).str.rsplit("_", n=1).str[0]
    assert (donor_prefix == obs["dataset_id"].astype(str)).all()
    assert (obs.groupby("dataset_id", observed=True)["assay"].nunique() == 1).all()
    summary = src.validate_raw(census)
    assert summary["n_labels"] == len(sizes)


def test_census_like_tissue_dependent_composition(census):
    share = pd.crosstab(census.obs["tissue"], census.obs["cell_type"], normalize="index")
    hpc = "hematopoietic precursor cell"
    assert share.loc["bone marrow", hpc] > 3 * share.loc["blood", hpc]
    assert share.loc["lung", "mast cell"] > 3 * share.loc["blood", "mast cell"]


def test_census_like_grounded_in_real_profiles(census, pbmc):
    """A type taken over unchanged from PBMC68k keeps its real mean profile."""

    def profile(a, mask):
        X = a.X[np.flatnonzero(mask)]
        tot = np.asarray(X.sum(axis=0)).ravel()
        return tot / tot.sum()

    real = profile(pbmc, pbmc.obs["cell_type"] == "CD14+ Monocyte")
    synth = profile(census, census.obs["cell_type"] == "CD14-positive monocyte")
    other = profile(pbmc, pbmc.obs["cell_type"] == "CD19+ B")
    corr = np.corrcoef(np.log1p(real * 1e4), np.log1p(synth * 1e4))[0, 1]
    corr_other = np.corrcoef(np.log1p(other * 1e4), np.log1p(synth * 1e4))[0, 1]
    assert corr > 0.9
    assert corr > corr_other


def test_census_like_deterministic_per_seed():
    a = src.generate_census_like(n_cells=800, n_donors=40, seed=3)
    b = src.generate_census_like(n_cells=800, n_donors=40, seed=3)
    c = src.generate_census_like(n_cells=800, n_donors=40, seed=4)
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert (a.X != c.X).nnz > 0


def _donor_spread(adata: ad.AnnData) -> float:
    """Mean over genes of the variance across donors of per-donor mean log1p(CP10k)."""
    X = adata.X.toarray()
    X = np.log1p(X / np.maximum(X.sum(axis=1, keepdims=True), 1) * 1e4)
    top = adata.obs["cell_type"].value_counts().index[0]
    keep = (adata.obs["cell_type"] == top).to_numpy()
    df = pd.DataFrame(X[keep])
    donors = adata.obs["donor_id"].astype(str).to_numpy()[keep]
    counts = pd.Series(donors).value_counts()
    big = counts.index[counts >= 15]
    means = df[np.isin(donors, big)].groupby(donors[np.isin(donors, big)]).mean()
    return float(means.var(axis=0).mean())


def test_census_like_donor_effects():
    kw = {"n_cells": 3000, "n_donors": 40, "seed": 1, "batch_effect": 0.0, "library_sd": 0.0}
    with_effect = src.generate_census_like(donor_effect=0.5, **kw)
    without = src.generate_census_like(donor_effect=0.0, **kw)
    assert _donor_spread(with_effect) > 2 * _donor_spread(without)


def test_class_sizes_power_law():
    sizes = src.class_sizes(20000, 26, 250.0, 15)
    assert sizes.sum() == 20000
    assert (np.diff(sizes) <= 0).all()
    assert sizes.min() >= 15 and sizes.max() / sizes.min() >= 100
    small = src.class_sizes(100, 26, 250.0, 15)
    assert small.sum() == 100 and small.min() >= 1
    with pytest.raises(InputError, match="n_cells"):
        src.class_sizes(10, 26, 250.0, 15)


# ---- registry and validation ----------------------------------------------------------------
def test_load_source_registry():
    assert {"pbmc68k", "census_like"} <= set(src.SOURCES)
    with pytest.raises(InputError, match="census_like") as err:
        src.load_source("nope")
    assert "pbmc68k" in str(err.value) and "source.kind" in str(err.value)
    with pytest.raises(InputError, match="n_cell"):
        src.load_source("census_like", n_cell=100)
    with pytest.raises(InputError):
        src.load_source("pbmc68k", n_cells=100)
    small = src.load_source("census_like", n_cells=300, n_donors=40, seed=0)
    assert small.n_obs == 300


def _tiny_raw() -> ad.AnnData:
    X = sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0], [4, 1, 0]], dtype=np.float32))
    obs = pd.DataFrame(
        {
            "cell_type": ["a", "b", "a"],
            "cell_type_ontology_term_id": ["CL:0000084"] * 3,
            "donor_id": ["d1", "d2", "d3"],
            "tissue": ["blood"] * 3,
            "assay": ["10x 3' v3"] * 3,
            "batch": ["b1"] * 3,
        },
        index=["c1", "c2", "c3"],
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["G1", "G2", "G3"]))


def test_validate_raw_accepts_and_reports_all_zero_cells():
    a = _tiny_raw()
    a.X = sp.csr_matrix(np.array([[1, 0, 2], [0, 0, 0], [4, 1, 0]], dtype=np.float32))
    report = src.validate_raw(a, path="raw.h5ad")
    assert report["n_all_zero_cells"] == 1 and report["n_cells"] == 3


@pytest.mark.parametrize(
    "breakage, field",
    [
        (lambda a: a.obs.drop(columns="donor_id", inplace=True), "obs"),
        (lambda a: a.obs.__setitem__("cell_type", ["a", None, "b"]), "cell_type"),
        (lambda a: a.obs.__setitem__("cell_type", ["a", " ", "b"]), "cell_type"),
        (lambda a: setattr(a, "obs_names", ["c1", "c1", "c3"]), "obs_names"),
        (lambda a: setattr(a, "var_names", ["G1", "G1", "G3"]), "var_names"),
        (lambda a: setattr(a, "X", a.X * 0.37), "X"),
        (lambda a: setattr(a, "X", -a.X), "X"),
    ],
)
def test_validate_raw_rejects(breakage, field):
    a = _tiny_raw()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        breakage(a)
    with pytest.raises(InputError) as err:
        src.validate_raw(a, path="data/raw/x.h5ad")
    msg = str(err.value)
    assert "data/raw/x.h5ad" in msg and f"'{field}'" in msg and "Fix:" in msg
