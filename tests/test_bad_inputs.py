"""Bad inputs (issue 7): each gives the project's InputError naming file, field and fix, or is
handled gracefully as documented. Cases already covered elsewhere are only referenced:

- validate_raw: missing obs columns, empty labels, duplicated names, non-counts
  (tests/test_sources.py::test_validate_raw_rejects);
- stratified split with single-cell classes (tests/test_splits.py::test_kfold_tiny_classes_*);
- SMOTE with a single-cell class (tests/test_balancing.py::test_smote_single_cell_class_*);
- predictions-table contract violations (tests/test_contract.py);
- unknown method / balancing strategy / task dataset, misspelt method key, task names that
  escape paths (tests/test_config.py).
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from celltype_bench import balancing, io
from celltype_bench.contract import make_predictions, write_predictions
from celltype_bench.data.preprocess import align_genes, check_counts, log1p_cp10k, preprocess
from celltype_bench.data.splits import roles, stratified_kfold
from celltype_bench.errors import InputError
from celltype_bench.methods import create
from celltype_bench.ontology import load_ontology, map_labels
from celltype_bench.steps import preprocess_dataset, score_run
from celltype_bench.workflow_config import WorkflowConfig

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "config" / "schema.yaml")
RAW = "data/raw/toy.h5ad"


def raw(
    X=None,
    labels: list | None = None,
    *,
    n: int = 6,
    g: int = 4,
    obs_names: list[str] | None = None,
    var_names: list[str] | None = None,
    sparse: bool = True,
) -> ad.AnnData:
    """A small raw dataset: integer counts, standard obs columns, CL labels."""
    if X is None:
        X = np.random.default_rng(0).integers(1, 9, size=(n, g))
    X = np.asarray(X)
    n, g = X.shape
    labels = labels if labels is not None else (["T cell", "B cell"] * n)[:n]
    obs = pd.DataFrame(
        {
            "cell_type": labels,
            "donor_id": [f"d{i % 3}" for i in range(n)],
            "tissue": "blood",
            "assay": "10x 3' v3",
            "batch": "b1",
        },
        index=obs_names or [f"c{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=var_names or [f"G{j}" for j in range(g)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about non-unique names
        return ad.AnnData(X=sp.csr_matrix(X) if sparse else X, obs=obs, var=var)


def assert_names(err: InputError, file: str | None, field: str) -> None:
    """The message names the file, the field and a fix."""
    msg = str(err)
    if file is not None:
        assert err.file == file and file in msg
    assert err.field == field and f"'{field}'" in msg
    assert err.fix and "Fix:" in msg


@pytest.fixture(scope="module")
def onto():
    return load_ontology()


@pytest.fixture
def cfg() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


# ---------------------------------------------------------------- labels
def test_missing_label_column(tmp_path):
    with pytest.raises(InputError) as err:
        preprocess(raw(), label_key="author_label", source=RAW)
    assert_names(err.value, RAW, "author_label")
    assert "cell_type" in str(err.value)  # the columns that exist are listed

    path = tmp_path / "raw.h5ad"
    io.write_h5ad(raw(), path)
    with pytest.raises(InputError) as err:
        preprocess_dataset(str(path), str(tmp_path / "out.h5ad"), label_key="author_label")
    assert_names(err.value, str(path), "author_label")
    assert "label_key" in err.value.fix


@pytest.mark.parametrize(
    "bad",
    [np.nan, None, "", "   ", "categorical-nan"],
    ids=["nan", "none", "empty", "blank", "categorical-nan"],
)
def test_empty_or_nan_labels(bad):
    labels: list = ["T cell", "B cell", "T cell", "B cell"]
    if bad == "categorical-nan":
        labels = pd.Categorical(["T cell", None, "T cell", "B cell"])
    else:
        labels[1] = bad
    with pytest.raises(InputError, match="1 cells have an empty or missing label") as err:
        preprocess(raw(labels=list(labels), n=4), source=RAW)
    assert_names(err.value, RAW, "cell_type")


def test_unmapped_labels_are_listed_with_closest_terms(tmp_path):
    labels = ["T cell", "Megakaryocytes", "xyzzy qwerty", "B cells", "T cell", "T cell"]
    path = tmp_path / "raw.h5ad"
    io.write_h5ad(raw(labels=labels), path)
    out = tmp_path / "processed.h5ad"
    with pytest.raises(InputError) as err:
        preprocess_dataset(str(path), str(out), min_genes=1)
    assert_names(err.value, str(path), "cell_type")
    msg = str(err.value)
    assert "3 author label(s)" in msg
    assert "'Megakaryocytes' (closest CL labels: 'megakaryocyte' (CL:0000556)" in msg
    assert "'B cells' (closest CL labels: 'B cell' (CL:0000236)" in msg
    assert "'xyzzy qwerty' (no close CL label)" in msg
    assert "label_map" in err.value.fix and not out.exists()

    # the fix works: a label_map entry per unmapped label
    label_map = {
        "Megakaryocytes": "megakaryocyte",
        "xyzzy qwerty": "CL:0000084",
        "B cells": "B cell",
    }
    preprocess_dataset(str(path), str(out), label_map=label_map, min_genes=1)
    done = io.read_h5ad(out)
    got = dict(zip(done.obs["cell_type"], done.obs["cell_type_ontology_term_id"], strict=True))
    assert got["Megakaryocytes"] == "CL:0000556" and got["B cells"] == "CL:0000236"


def test_many_unmapped_labels_are_listed_up_to_a_limit(onto):
    labels = [f"qq{i:03d} zz" for i in range(40)]
    with pytest.raises(InputError) as err:
        map_labels(labels, ontology=onto, source=RAW)
    msg = str(err.value)
    assert msg.startswith("40 author label(s)")
    assert "'qq000 zz'" in msg and "'qq039 zz'" not in msg and "and 15 more" in msg


# ---------------------------------------------------------------- a class with one cell
def _one_cell_class_data() -> ad.AnnData:
    """Processed data with classes of 40, 24 and 1 cells (distinct marker genes)."""
    rng = np.random.default_rng(3)
    sizes = {"T cell": 40, "B cell": 24, "platelet": 1}
    blocks, labels = [], []
    for c, (label, n) in enumerate(sizes.items()):
        mean = np.full(30, 1.0)
        mean[c * 8 : (c + 1) * 8] += 10
        blocks.append(rng.poisson(mean, size=(n, 30)))
        labels += [label] * n
    return preprocess(raw(np.vstack(blocks), labels=labels), source=RAW)


def test_one_cell_class_through_split_smote_and_early_stopping(caplog):
    data = _one_cell_class_data()
    assert data.uns["preprocess"]["n_small_class_dropped"] == 0  # kept (min_cells_per_class=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn "least populated class" warning
        split = stratified_kfold(data.obs, n_folds=5, seed=0)
    single = data.obs_names[data.obs["cell_type"] == "platelet"][0]
    placed = split[split["cell_id"] == single].set_index("replicate")["role"]
    assert sorted(placed) == ["test", "train", "train", "train", "valid"]
    rep = placed.index[placed == "train"][0]
    parts = {role: data[ids].copy() for role, ids in roles(split, rep).items()}
    assert "platelet" not in set(parts["valid"].obs["cell_type"])  # a validation class is empty

    # SMOTE adapts: the single training cell is randomly oversampled (logged), no crash
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        train = balancing.resample_adata(parts["train"], "smote", seed=0)
    counts = train.obs["cell_type"].value_counts()
    assert counts["platelet"] == counts.max()
    assert any("single cell" in r.getMessage() for r in caplog.records)

    # early stopping on a validation set that lacks a training class
    m = create("linear", epochs=8, patience=1, batch_size=32, lr=0.05, device="cpu")
    m.fit(train, parts["valid"])
    assert "platelet" in m.classes_
    assert all(h["val_macro_f1"] is not None for h in m.history_)
    assert m.predict_proba(parts["test"]).shape == (parts["test"].n_obs, 3)


def test_validation_set_of_only_unseen_classes_trains_without_selection(caplog):
    data = _one_cell_class_data()
    train = data[data.obs["cell_type"] != "platelet"].copy()
    valid = data[data.obs["cell_type"] == "platelet"].copy()
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        m = create("linear", epochs=2, batch_size=32, device="cpu").fit(train, valid)
    assert all(h["val_macro_f1"] is None for h in m.history_)
    assert any("unseen in training" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- duplicated names
@pytest.mark.parametrize("field", ["obs_names", "var_names"])
def test_duplicated_cell_ids_or_gene_names(field):
    kwargs = {field: ["x", "y", "x", "z"]}
    a = raw(n=4, g=4, **kwargs)
    with pytest.raises(InputError, match="not unique") as err:
        preprocess(a, source=RAW)
    assert_names(err.value, RAW, field)
    assert "'x'" in str(err.value)


def test_duplicated_gene_names_at_training():
    data = _one_cell_class_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.var_names = ["G0"] * 2 + list(data.var_names[2:])
    with pytest.raises(InputError, match="duplicate gene names") as err:
        create("majority").fit(data)
    assert err.value.field == "var_names"


# ---------------------------------------------------------------- gene overlap
def test_low_gene_overlap_reported_refused_or_zero_filled(caplog):
    query = preprocess(raw(n=4, g=4, var_names=["A", "B", "C", "D"]))
    target = ["A", "B", "X", "Y"]  # half of the reference genes are in the query
    with caplog.at_level(logging.INFO, logger="celltype_bench"):
        out = align_genes(query, target, min_overlap=0.5, source="query.h5ad")
    rec = out.uns["align_genes"]
    assert rec["share"] == 0.5 and rec["n_zero_filled"] == 2 and rec["n_data_genes_dropped"] == 2
    assert out.layers["counts"][:, 2:].nnz == 0  # missing genes are zero-filled
    assert any("2 of 4 target genes found (50.0%)" in r.getMessage() for r in caplog.records)

    with pytest.raises(InputError, match=r"only 50.0% of the 4 target genes \(2\)") as err:
        align_genes(query, target, min_overlap=0.75, source="query.h5ad")
    assert_names(err.value, "query.h5ad", "var_names")
    assert "minimum 75%" in str(err.value) and "Ensembl" in err.value.fix

    with pytest.raises(InputError, match="min_overlap"):
        align_genes(query, target, min_overlap=50)


# ---------------------------------------------------------------- counts
def _log_normalised(counts: np.ndarray) -> sp.csr_matrix:
    return log1p_cp10k(sp.csr_matrix(counts.astype(np.float32)))


@pytest.mark.parametrize(
    "X, problem",
    [
        ([[1.5, 2, 0], [3, 0.25, 4]], "non-integer values"),
        ([[1, -2, 0], [3, 0, 1]], "negative values"),
        ([[1, np.nan, 0], [3, 0, 1]], "NaN or infinite"),
        ([[1, np.inf, 0], [3, 0, 1]], "NaN or infinite"),
        ([[1, 1e30, 0], [3, 0, 1]], "above 16777216"),
        ([[5000.5, 4999.5, 0], [2500.25, 2500.25, 5000.5]], r"every cell sums to ~1e\+04"),
    ],
    ids=["fractional", "negative", "nan", "inf", "huge", "cp10k"],
)
@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_non_count_values_are_refused(X, problem, sparse):
    X = np.asarray(X, dtype=np.float64)
    a = raw(n=2, g=3, sparse=sparse, X=X)
    with pytest.raises(InputError, match=problem) as err:
        preprocess(a, source=RAW)
    assert_names(err.value, RAW, "X")
    assert "raw integer UMI counts" in err.value.fix


@pytest.mark.parametrize(
    "X, problem",
    [
        (np.array([[1, 0], [0, 2]], dtype=complex), "dtype complex128"),
        (np.array([[True, False], [False, True]]), "dtype bool"),
        (None, "no count matrix"),
    ],
    ids=["complex", "bool", "none"],
)
def test_non_real_count_matrix(X, problem):
    with pytest.raises(InputError, match=problem) as err:
        check_counts(X, file=RAW)
    assert_names(err.value, RAW, "X")


def test_log_normalised_data_passed_as_counts():
    counts = np.random.default_rng(1).poisson(3.0, size=(20, 15)) + np.eye(20, 15, dtype=int)
    a = raw(counts, labels=["T cell"] * 20)
    a.X = _log_normalised(counts)
    with pytest.raises(InputError, match="looks log-normalised") as err:
        preprocess(a, source=RAW)
    assert_names(err.value, RAW, "X")
    assert "expm1(X) sums to ~1e+04 in every cell" in str(err.value)
    assert "layers['counts']" in err.value.fix

    # the object carries its counts: the fix names them precisely and works
    a.layers["counts"] = sp.csr_matrix(counts.astype(np.float32))
    with pytest.raises(InputError) as err:
        preprocess(a, source=RAW)
    assert "adata.X = adata.layers['counts']" in err.value.fix
    a.X = a.layers["counts"]
    assert preprocess(a).n_obs == 20


def test_integer_valued_floats_and_integer_dtypes_are_counts():
    counts = np.array([[1, 0, 2], [0, 3, 1]])
    for X in (counts.astype(np.float32), counts.astype(np.int64), counts.astype(np.uint16)):
        assert preprocess(raw(X, n=2, g=3, sparse=False)).n_obs == 2


# ---------------------------------------------------------------- filtering
def test_all_zero_cells_dropped_with_logged_count(caplog):
    X = [[1, 2, 3], [0, 0, 0], [4, 0, 1], [0, 0, 0]]
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        out = preprocess(raw(X, n=4, g=3), source=RAW)
    assert list(out.obs_names) == ["c0", "c2"]
    assert out.uns["preprocess"]["n_all_zero_dropped"] == 2
    assert any(
        f"{RAW}: dropped 2 all-zero cells" in r.getMessage() and r.levelno == logging.WARNING
        for r in caplog.records
    )


def test_empty_after_filtering_names_the_filter_settings():
    X = [[1, 0, 0], [0, 0, 0], [0, 2, 0]]  # one gene per cell at most
    with pytest.raises(InputError, match="no cells left after filtering") as err:
        preprocess(raw(X, n=3, g=3), min_genes=2, source=RAW)
    assert_names(err.value, RAW, "X")
    msg = str(err.value)
    assert "1 all-zero" in msg and "2 with < 2 genes" in msg and "min_genes=2" in msg
    assert "preprocess.min_genes" in err.value.fix


@pytest.mark.parametrize("shape", [(0, 3), (3, 0)])
def test_empty_dataset(shape):
    a = raw(np.zeros(shape), labels=["T cell"] * shape[0])
    with pytest.raises(InputError, match="empty dataset") as err:
        preprocess(a, source=RAW)
    assert_names(err.value, RAW, "X")


# ---------------------------------------------------------------- damaged files
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)
    elif how == "not-anndata":
        path.unlink()
        with h5py.File(path, "w") as fh:
            fh["x"] = [1, 2, 3]
    else:
        path.write_bytes(b"")


@pytest.mark.filterwarnings("ignore:Element '/x' was written without encoding metadata")
@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "not-anndata"])
def test_corrupt_h5ad_names_file_and_rule(tmp_path, how):
    path = tmp_path / "data" / "processed" / "toy.h5ad"
    io.write_h5ad(raw(), path)
    _damage(path, how)
    for read in (io.read_h5ad, io.read_obs):
        with pytest.raises(InputError, match="corrupt or truncated") as err:
            read(path)
        assert err.value.file == str(path) and str(path) in str(err.value)
        assert "delete it and rerun the 'preprocess' rule" in err.value.fix


def test_corrupt_raw_file_in_the_preprocess_step(tmp_path):
    path = tmp_path / "data" / "raw" / "toy.h5ad"
    io.write_h5ad(raw(), path)
    _damage(path, "truncated")
    with pytest.raises(InputError) as err:
        preprocess_dataset(str(path), str(tmp_path / "out.h5ad"))
    assert err.value.file == str(path) and "'fetch' rule" in err.value.fix
    with pytest.raises(InputError, match="does not exist"):
        io.read_h5ad(tmp_path / "nope.h5ad")


def test_corrupt_table(tmp_path):
    path = tmp_path / "data" / "splits" / "t.parquet"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PAR1 truncated")
    with pytest.raises(InputError, match="corrupt or truncated") as err:
        io.read_table(path)
    assert err.value.file == str(path) and "'split' rule" in err.value.fix


# ---------------------------------------------------------------- scoring step inputs
@pytest.fixture
def score_files(tmp_path) -> dict[str, str]:
    """A processed dataset, a split and a predictions file for score_run."""
    data = preprocess(raw(n=8))
    data.obs["cell_type_ontology_term_id"] = (
        data.obs["cell_type"].map({"T cell": "CL:0000084", "B cell": "CL:0000236"}).astype(str)
    )
    paths = {k: str(tmp_path / f) for k, f in [("data", "d.h5ad"), ("split", "s.parquet")]}
    io.write_h5ad(data, paths["data"])
    ids = list(data.obs_names)
    io.write_table(
        pd.DataFrame({"cell_id": ids, "replicate": "r0", "role": ["train"] * 4 + ["test"] * 4}),
        paths["split"],
    )
    proba = pd.DataFrame({"T cell": [0.9, 0.2, 0.6, 0.6], "B cell": [0.1, 0.8, 0.4, 0.4]})
    pred = make_predictions(ids[4:], data.obs["cell_type"].iloc[4:], proba)
    paths["predictions"] = str(tmp_path / "run" / "predictions.parquet")
    write_predictions(pred, paths["predictions"])
    paths["out"] = str(tmp_path / "run" / "scores.json")
    return paths


def test_score_run_happy_path(score_files):
    score_run(replicate="r0", **score_files)
    scores = json.loads(Path(score_files["out"]).read_text())
    assert scores["n_test"] == 4 and scores["accuracy"] == 0.75


def test_score_run_with_corrupt_dataset(score_files):
    _damage(Path(score_files["data"]), "truncated")
    with pytest.raises(InputError, match="corrupt or truncated") as err:
        score_run(replicate="r0", **score_files)
    assert err.value.file == score_files["data"]


def test_score_run_with_stale_split(score_files):
    table = io.read_table(score_files["split"])
    table.loc[0, "cell_id"] = "gone"
    io.write_table(table, score_files["split"])
    with pytest.raises(InputError, match="the split is stale") as err:
        score_run(replicate="r0", **score_files)
    assert_names(err.value, score_files["split"], "cell_id")


# ---------------------------------------------------------------- config
def _schema_error(config: dict) -> str:
    with pytest.raises(WorkflowError) as err:
        validate(config, SCHEMA)
    return str(err.value)


def test_misspelt_keys_are_named_with_the_valid_keys(cfg):
    bad = copy.deepcopy(cfg)
    bad["tsks"] = bad.pop("tasks")
    msg = _schema_error(bad)
    assert "'tsks' was unexpected" in msg and "'tasks'" in msg  # the schema excerpt lists keys

    bad = copy.deepcopy(cfg)
    bad["datasets"]["pbmc68k"]["lable_map"] = {}
    msg = _schema_error(bad)
    assert "'lable_map' was unexpected" in msg and "'label_map'" in msg

    bad = copy.deepcopy(cfg)
    bad["preprocess"] = {"min_gene": 5}
    msg = _schema_error(bad)
    assert "'min_gene' was unexpected" in msg and "'min_genes'" in msg


def test_unknown_dataset_kind_lists_valid_kinds(cfg):
    bad = copy.deepcopy(cfg)
    bad["datasets"]["pbmc68k"]["source"]["kind"] = "pbmc"
    msg = _schema_error(bad)
    assert "'pbmc' is not one of ['pbmc68k', 'census_like', 'url', 'census'" in msg


@pytest.mark.parametrize(
    "mutate, name, field",
    [
        (lambda c: c["methods"]["linear"].__setitem__("method", "lineer"), "lineer", "method"),
        (lambda c: c["tasks"]["pbmc68k"].__setitem__("methods", ["lnear"]), "lnear", "methods"),
        (lambda c: c["balancing"].__setitem__("default", ["smoote"]), "smoote", "default"),
        (lambda c: c["tasks"]["pbmc68k"].__setitem__("unlabeled", ["pbmc"]), "pbmc", "unlabeled"),
        (lambda c: c["tasks"]["pbmc68k"].__setitem__("dataset", "pbmc"), "pbmc", "dataset"),
    ],
    ids=["method", "task-method", "balancing", "unlabeled-dataset", "task-dataset"],
)
def test_unknown_names_in_config_list_the_valid_names(cfg, mutate, name, field):
    bad = copy.deepcopy(cfg)
    mutate(bad)
    validate(bad, SCHEMA)  # well-formed: only the cross-check knows the valid names
    with pytest.raises(InputError) as err:
        WorkflowConfig.from_dict(bad, source="config.yaml")
    e = err.value
    assert e.file == "config.yaml" and e.field.endswith(field) and f"'{name}'" in str(e)
    assert "use one of" in e.fix


BAD_NAMES = ["../x", "a b", "a;rm", "$(x)", "-x", "a/b", "`x`"]
NAME_PLACES = {
    "dataset": lambda c, n: c["datasets"].__setitem__(n, c["datasets"]["pbmc68k"]),
    "method": lambda c, n: c["methods"].__setitem__(n, {"method": "majority"}),
    "balancing": lambda c, n: c["balancing"].__setitem__("default", [n]),
}


@pytest.mark.parametrize("place", sorted(NAME_PLACES))
@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_that_escape_paths_or_shells_are_rejected(cfg, place, name):
    bad = copy.deepcopy(cfg)
    NAME_PLACES[place](bad, name)
    msg = _schema_error(bad)
    assert "does not match" in msg
    # also without the schema (WorkflowConfig is the Snakefile's second line of defence)
    with pytest.raises(InputError, match="is not allowed") as err:
        WorkflowConfig.from_dict(bad, source="config.yaml")
    assert err.value.file == "config.yaml" and "letters, digits" in err.value.fix
