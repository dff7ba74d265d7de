"""Fuzzing the entry points with malformed inputs (issue 7).

Randomly malformed small AnnData objects go to ``validate_raw``, ``preprocess`` and
``align_genes``; malformed prediction tables go to ``metrics.score_predictions`` and
``contract.validate_predictions``. Each call either succeeds (and then its output is checked)
or raises the project's own error type with a message naming the field and a fix; an exception
from deep inside numpy/scipy/pandas/anndata is a failure.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from celltype_bench import io
from celltype_bench.contract import PROBA_PREFIX, validate_predictions
from celltype_bench.data.preprocess import align_genes, log1p_cp10k, preprocess
from celltype_bench.data.sources import STANDARD_OBS, validate_raw
from celltype_bench.errors import CellTypeBenchError, InputError
from celltype_bench.metrics import score_predictions
from celltype_bench.ontology import load_ontology

FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FILE = "data/raw/fuzz.h5ad"
OBS_COLUMNS = (*STANDARD_OBS, "dataset_id")
WEIRD_LABELS = ("T cell", "B cell", "x", "", "  ", None, np.nan, 3, 2.5)


def expect_own_error(err: CellTypeBenchError, file: str | None = None) -> None:
    """A deliberate error: InputError with a field and a fix (and the file, when given)."""
    assert isinstance(err, InputError), f"{type(err).__name__}: {err}"
    assert err.field and err.fix and "Fix:" in str(err), str(err)
    if file is not None:
        assert err.file == file, str(err)


# ---------------------------------------------------------------- AnnData strategy
def _values(kind: str) -> st.SearchStrategy[float]:
    if kind == "counts":
        return st.integers(0, 30).map(float)
    if kind == "float":
        return st.floats(0, 50, allow_nan=False, width=32)
    return st.sampled_from([0.0, 1.0, 2.0, 7.0, -1.0, 0.5, np.nan, np.inf, -np.inf, 1e30])


def _names(draw: st.DrawFn, n: int, prefix: str) -> list[str]:
    if not draw(st.sampled_from([False] * 5 + [True])):  # 1 in 6: possibly duplicated
        return [f"{prefix}{i}" for i in range(n)]
    pool = [f"{prefix}{i}" for i in range(max(n - 1, 1))]  # duplicates when n > 1
    return draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))


def _column(draw: st.DrawFn, n: int, name: str) -> Any:
    clean = [f"{name}{i % 2}" for i in range(n)]
    kinds = ["clean"] * 6 + ["weird", "categorical", "numeric", "string", "datetime"]
    how = draw(st.sampled_from(kinds))
    if how == "clean":
        return clean
    if how == "numeric":
        return draw(st.lists(st.sampled_from([1.0, 2.0, np.nan]), min_size=n, max_size=n))
    if how == "datetime":
        return pd.to_datetime(["2024-01-01"] * n)
    values = draw(st.lists(st.sampled_from(WEIRD_LABELS), min_size=n, max_size=n))
    strings = [v if isinstance(v, str) else None for v in values]
    if how == "categorical":
        return pd.Categorical(strings)
    if how == "string":
        return pd.array(strings, dtype="string")
    return np.array(values, dtype=object)


@st.composite
def anndatas(draw: st.DrawFn) -> ad.AnnData:
    """Small AnnData: 0-6 cells x 0-5 genes, any values, names and obs columns."""
    n, g = draw(st.integers(0, 6)), draw(st.integers(0, 5))
    kind = draw(st.sampled_from(["counts", "counts", "counts", "float", "special"]))
    X = draw(hnp.arrays(np.float64, (n, g), elements=_values(kind)))
    if kind == "counts":
        X = X.astype(draw(st.sampled_from([np.int32, np.int64, np.uint8, np.float32])))
    elif draw(st.booleans()):
        X = X.astype(np.float32)
    layout = draw(st.sampled_from(["dense", "csr", "csc"]))
    if layout != "dense":
        with np.errstate(invalid="ignore"):
            X = sp.csr_matrix(X) if layout == "csr" else sp.csc_matrix(X)
    missing = draw(st.sets(st.sampled_from(OBS_COLUMNS), max_size=2))
    obs = pd.DataFrame(
        {c: _column(draw, n, c) for c in OBS_COLUMNS if c not in missing},
        index=_names(draw, n, "c"),
    )
    var = pd.DataFrame(index=_names(draw, g, "G"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-unique names
        adata = ad.AnnData(X=X, obs=obs, var=var)
    if draw(st.booleans()):
        adata.layers["counts"] = adata.X.copy()
    return adata


# ---------------------------------------------------------------- raw data entry points
@FUZZ
@given(adata=anndatas())
def test_validate_raw_fuzz(adata: ad.AnnData) -> None:
    try:
        report = validate_raw(adata, path=FILE)
    except CellTypeBenchError as err:
        expect_own_error(err, FILE)
        return
    assert report["n_cells"] == adata.n_obs > 0 and report["n_genes"] == adata.n_vars > 0


def _check_processed(out: ad.AnnData, adata: ad.AnnData, label_key: str, min_genes: int) -> None:
    counts = out.layers["counts"]
    assert out.n_obs > 0 and out.n_vars == adata.n_vars
    assert sp.isspmatrix_csr(out.X) and sp.isspmatrix_csr(counts)
    assert out.X.dtype == np.float32 and counts.dtype == np.float32
    assert np.isfinite(out.X.data).all() and (out.X.data > 0).all()
    assert (counts.data > 0).all() and (counts.data == np.rint(counts.data)).all()
    assert (np.diff(counts.indptr) >= max(min_genes, 1)).all()  # no all-zero/low-gene cells
    assert set(out.obs_names) <= set(adata.obs_names) and out.obs_names.is_unique
    assert label_key in out.obs
    np.testing.assert_allclose(out.X.toarray(), log1p_cp10k(counts).toarray(), rtol=1e-6)


@FUZZ
@given(
    adata=anndatas(),
    min_genes=st.integers(0, 3),
    min_cells=st.integers(1, 3),
    label_key=st.sampled_from(["cell_type", "cell_type", "donor_id", "author"]),
)
def test_preprocess_fuzz(adata: ad.AnnData, min_genes: int, min_cells: int, label_key: str) -> None:
    try:
        out = preprocess(
            adata,
            min_genes=min_genes,
            min_cells_per_class=min_cells,
            label_key=label_key,
            source=FILE,
        )
    except CellTypeBenchError as err:
        expect_own_error(err, FILE)
        return
    _check_processed(out, adata, label_key, min_genes)


@settings(FUZZ, max_examples=40)
@given(adata=anndatas())
def test_preprocessed_output_round_trips_through_h5ad(adata: ad.AnnData) -> None:
    """Whatever preprocess accepts can be written and read back (the preprocess step)."""
    try:
        out = preprocess(adata, source=FILE)
    except CellTypeBenchError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.h5ad"
        io.write_h5ad(out, path)
        back = io.read_h5ad(path)
    assert back.shape == out.shape and (back.layers["counts"] != out.layers["counts"]).nnz == 0
    assert list(back.obs["cell_type"].astype(str)) == list(out.obs["cell_type"].astype(str))


@FUZZ
@given(
    adata=anndatas(),
    genes=st.lists(st.sampled_from(["G0", "G1", "G2", "G3", "G9", "X", ""]), max_size=6),
    min_overlap=st.floats(0, 1),
)
def test_align_genes_fuzz(adata: ad.AnnData, genes: list[str], min_overlap: float) -> None:
    try:
        out = align_genes(adata, genes, min_overlap=min_overlap, source="query.h5ad")
    except CellTypeBenchError as err:
        expect_own_error(err)
        return
    assert list(out.var_names) == genes and out.n_obs == adata.n_obs
    assert out.uns["align_genes"]["share"] >= min_overlap
    absent = [j for j, gene in enumerate(genes) if gene not in set(adata.var_names)]
    assert out.X[:, absent].nnz == 0


# ---------------------------------------------------------------- prediction tables
CLASSES = ("T cell", "B cell", "CD4 T", "weird", "")
L2C = {"T cell": "CL:0000084", "CD4 T": "CL:0000624", "B cell": "CL:0000236", "weird": "CL:9"}


@st.composite
def prediction_tables(draw: st.DrawFn, numeric_only: bool = False) -> pd.DataFrame:
    """Prediction tables, mostly close to the contract with a few random defects."""
    n = draw(st.integers(0, 6))
    classes = draw(st.lists(st.sampled_from(CLASSES), max_size=3, unique=True))
    proba_kind = draw(st.sampled_from(["softmax", "softmax", "one-hot", "random"]))
    if proba_kind == "random":
        elements = st.one_of(
            st.floats(-1, 2), st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1.0, 1e300])
        )
        P = draw(hnp.arrays(np.float64, (n, len(classes)), elements=elements))
    else:
        raw = draw(hnp.arrays(np.float64, (n, len(classes)), elements=st.floats(0, 5)))
        if proba_kind == "one-hot":
            raw = (raw == raw.max(axis=1, keepdims=True)).astype(float) if raw.size else raw
        else:
            raw = np.exp(raw)
        with np.errstate(invalid="ignore", divide="ignore"):
            P = raw / raw.sum(axis=1, keepdims=True)
    argmax = [classes[i] for i in P.argmax(axis=1)] if len(classes) and n else [None] * n
    df = pd.DataFrame(
        {
            "cell_id": (
                [f"c{i}" for i in range(n)]
                if draw(st.sampled_from([True, True, True, False]))
                else draw(
                    st.lists(st.sampled_from(["c0", "c1", None, "", 7]), min_size=n, max_size=n)
                )
            ),
            "true_label": draw(
                st.lists(
                    st.sampled_from(
                        [*CLASSES, "other"]
                        if draw(st.sampled_from([True, True, True, False]))
                        else [*CLASSES, None, np.nan, 3]
                    ),
                    min_size=n,
                    max_size=n,
                )
            ),
            "predicted_label": (
                argmax
                if draw(st.sampled_from([True, True, True, False]))
                else draw(st.lists(st.sampled_from([*CLASSES, None, "zz"]), min_size=n, max_size=n))
            ),
        }
    )
    for j, c in enumerate(classes):
        df[PROBA_PREFIX + c] = P[:, j]
    defect = draw(
        st.sampled_from(
            ["none"] * 4
            + ["uncertainty", "drop", "duplicate", "object-proba"]
            + ([] if numeric_only else ["string-proba", "complex-proba"])
        )
    )
    if defect == "uncertainty":
        values = st.sampled_from([0.0, 0.3, 1.0, -0.5, 2.0, np.nan, None, "high"])
        df["uncertainty"] = np.array(draw(st.lists(values, min_size=n, max_size=n)), dtype=object)
    elif defect == "drop":
        df = df.drop(columns=draw(st.sampled_from(list(df.columns))))
    elif defect == "duplicate" and len(df.columns):
        col = draw(st.sampled_from(list(df.columns)))
        df = pd.concat([df, df[[col]]], axis=1)
    elif defect == "object-proba" and classes:
        col = PROBA_PREFIX + classes[0]
        df[col] = np.array([None if i == 0 else v for i, v in enumerate(df[col])], dtype=object)
    elif defect == "string-proba" and classes:
        df[PROBA_PREFIX + classes[0]] = df[PROBA_PREFIX + classes[0]].map(lambda v: f"{v:.3f}?")
    elif defect == "complex-proba" and classes:
        df[PROBA_PREFIX + classes[0]] = df[PROBA_PREFIX + classes[0]].astype(complex)
    return df


@pytest.fixture(scope="module")
def onto():
    return load_ontology()


@FUZZ
@given(pred=prediction_tables(), train=st.dictionaries(st.sampled_from(CLASSES), st.integers(0, 9)))
def test_score_predictions_fuzz(onto, pred: pd.DataFrame, train: dict[str, int]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", np.exceptions.ComplexWarning)
        try:
            scores = score_predictions(pred, L2C, train, onto, source="predictions.parquet")
        except CellTypeBenchError as err:
            expect_own_error(err, "predictions.parquet")
            return
    assert scores["n_test"] == len(pred) > 0
    for key in ("accuracy", "macro_f1", "macro_f1_ontology", "weighted_f1", "ece"):
        assert 0.0 <= scores[key] <= 1.0 + 1e-9, key
    assert scores["macro_f1_ontology"] >= scores["macro_f1"] - 1e-9
    assert {c["label"] for c in scores["per_class"]} == set(pred["true_label"].astype(str))


@FUZZ
@given(pred=prediction_tables())
def test_validate_predictions_fuzz(pred: pd.DataFrame) -> None:
    try:
        out = validate_predictions(pred, "predictions.parquet")
    except CellTypeBenchError as err:
        expect_own_error(err, "predictions.parquet")
        return
    assert out is pred


def test_validate_predictions_non_numeric_proba() -> None:
    df = pd.DataFrame(
        {
            "cell_id": ["a"],
            "true_label": ["T cell"],
            "predicted_label": ["T cell"],
            "proba:T cell": ["1.0?"],
        }
    )
    with pytest.raises(InputError):
        validate_predictions(df, "predictions.parquet")
