"""Tests of preprocessing: count checks, filters, log1p(CP10k), gene alignment."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltype_bench import io
from celltype_bench.data.preprocess import align_genes, check_counts, preprocess
from celltype_bench.data.sources import load_pbmc68k
from celltype_bench.errors import InputError


def make(X, labels=None, genes=None) -> ad.AnnData:
    X = np.asarray(X, dtype=np.float32)
    n, g = X.shape
    labels = labels or ["a", "b"] * (n // 2) + ["a"] * (n % 2)
    obs = pd.DataFrame(
        {"cell_type": labels, "donor_id": [f"d{i % 3}" for i in range(n)], "other": range(n)},
        index=[f"c{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=genes or [f"G{j}" for j in range(g)])
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    return load_pbmc68k()


def test_x_is_log1p_cp10k_of_counts(pbmc):
    out = preprocess(pbmc, source="raw.h5ad")
    assert sp.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    counts = out.layers["counts"]
    assert sp.isspmatrix_csr(counts) and counts.dtype == np.float32
    assert (counts != pbmc.X).nnz == 0  # no PBMC cell is empty: nothing dropped
    C = counts.toarray().astype(np.float64)
    expected = np.log1p(C / C.sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(out.X.toarray(), expected, rtol=1e-6, atol=1e-6)
    assert set(out.obs.columns) >= {"cell_type", "cell_type_ontology_term_id", "donor_id"}
    assert out.uns["preprocess"]["n_cells_out"] == 700
    assert out.uns["source"]["kind"] == "pbmc68k"


def test_rejects_log_normalised_input(pbmc):
    logged = preprocess(pbmc)
    logged.X = logged.X.copy()
    with pytest.raises(InputError, match="log-normalised") as err:
        preprocess(logged, source="data/raw/pbmc.h5ad")
    assert "data/raw/pbmc.h5ad" in str(err.value) and "raw integer" in str(err.value)


def test_rejects_normalised_and_negative_values():
    cp10k = make([[1000.5, 0, 8999.5], [5000, 5000, 0]])
    with pytest.raises(InputError, match="non-integer"):
        preprocess(cp10k)
    with pytest.raises(InputError, match="negative"):
        preprocess(make([[1, -2, 0], [3, 0, 1]]))
    with pytest.raises(InputError, match="NaN"):
        check_counts(np.array([[1.0, np.nan]]))
    check_counts(np.array([[1, 0], [2, 7]], dtype=np.int64))  # integers are fine


def test_drops_all_zero_and_low_gene_cells():
    X = [[1, 2, 3], [0, 0, 0], [0, 5, 0], [2, 2, 0], [0, 0, 0]]
    out = preprocess(make(X), min_genes=2)
    assert list(out.obs_names) == ["c0", "c3"]
    rec = out.uns["preprocess"]
    assert rec["n_all_zero_dropped"] == 2 and rec["n_low_genes_dropped"] == 1
    assert rec["n_cells_in"] == 5 and rec["n_cells_out"] == 2
    assert "other" not in out.obs  # only standard columns (+ n_counts, n_genes) are kept
    assert list(out.obs["n_counts"]) == [6, 4]


def test_min_cells_per_class_drops_small_classes():
    X = np.ones((5, 3))
    out = preprocess(make(X, labels=["a", "a", "a", "b", "c"]), min_cells_per_class=2)
    assert set(out.obs["cell_type"]) == {"a"}
    assert out.uns["preprocess"]["small_classes_dropped"] == ["b", "c"]
    assert list(out.obs["cell_type"].cat.categories) == ["a"]


def test_errors_on_empty_result_and_missing_labels():
    with pytest.raises(InputError, match="no cells left"):
        preprocess(make(np.zeros((4, 3))), source="x.h5ad")
    with pytest.raises(InputError, match="label"):
        preprocess(make(np.ones((2, 2))), label_key="author_label")
    bad = make(np.ones((2, 2)))
    bad.obs["cell_type"] = ["a", np.nan]
    with pytest.raises(InputError, match="missing label"):
        preprocess(bad)


def test_processed_file_roundtrips(tmp_path):
    out = preprocess(make(np.arange(12).reshape(4, 3) + 1))
    path = tmp_path / "p.h5ad"
    io.write_h5ad(out, path)
    back = io.read_h5ad(path)
    assert (back.layers["counts"] != out.layers["counts"]).nnz == 0
    assert back.uns["preprocess"]["n_cells_out"] == 4


def test_align_genes_reorders_and_zero_fills():
    a = preprocess(make([[1, 2, 3], [4, 0, 6]], genes=["A", "B", "C"]))
    out = align_genes(a, ["C", "A", "Z", "B"], min_overlap=0.5)
    assert list(out.var_names) == ["C", "A", "Z", "B"]
    np.testing.assert_array_equal(out.layers["counts"].toarray(), [[3, 1, 0, 2], [6, 4, 0, 0]])
    np.testing.assert_allclose(out.X[:, 0].toarray(), a.X[:, 2].toarray())
    assert sp.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    assert out.uns["align_genes"]["share"] == pytest.approx(0.75)
    assert list(out.obs_names) == list(a.obs_names)


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_align_genes_errors():
    a = make([[1, 2, 3], [4, 0, 6]], genes=["A", "B", "C"])
    with pytest.raises(InputError, match="25.0%"):
        align_genes(a, ["A", "X", "Y", "Z"], min_overlap=0.5)
    with pytest.raises(InputError, match="duplicated"):
        align_genes(a, ["A", "A", "B"])
    dup = make([[1, 2, 3]], genes=["A", "B", "B"])
    with pytest.raises(InputError, match="duplicated") as err:
        align_genes(dup, ["A", "B"])
    assert "var_names" in str(err.value)
