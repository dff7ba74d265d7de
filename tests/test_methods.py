"""Tests of the method interface, the registry and every registered method."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from celltype_bench.errors import InputError
from celltype_bench.methods import Method, available, create, register
from celltype_bench.methods.linear import balanced_class_weights
from celltype_bench.methods.scbalance import MaskDropout, ScBalanceNet, epoch_indices

torch.set_num_threads(2)
HERE = Path(__file__).resolve().parent

ALL_METHODS = ["celltypist", "linear", "majority", "random", "scbalance"]
# Fast settings for 600 cells (the defaults are tuned for census-scale data).
FAST = {
    "majority": {},
    "random": {"seed": 0},
    "linear": {"batch_size": 64, "lr": 0.01, "epochs": 15, "device": "cpu"},
    "scbalance": {"epochs": 8, "device": "cpu"},
    "celltypist": {"top_genes": 10, "batch_size": 100, "epochs": 5},
}
SIZES = [300, 150, 90, 45, 15]  # imbalanced classes


def make_adata(seed: int = 0, n_genes: int = 50) -> ad.AnnData:
    """600 cells, 5 imbalanced classes with distinct means; X = log1p(CP10k) CSR float32."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.0, 1.0, size=n_genes)
    counts, labels = [], []
    for c, n in enumerate(SIZES):
        mean = base.copy()
        mean[c * 5 : (c + 1) * 5] += 8.0
        counts.append(rng.poisson(mean * 3.0, size=(n, n_genes)))
        labels += [f"type_{c}"] * n
    counts = np.vstack(counts).astype(np.float32)
    lib = counts.sum(axis=1, keepdims=True)
    X = np.log1p(counts / lib * 1e4).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(len(labels))]
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    adata = ad.AnnData(sp.csr_matrix(X), obs=obs, var=var)
    adata.layers["counts"] = sp.csr_matrix(counts)
    return adata


@pytest.fixture(scope="module")
def splits() -> dict[str, ad.AnnData]:
    adata = make_adata()
    perm = np.random.default_rng(1).permutation(adata.n_obs)
    return {
        "train": adata[perm[:420]].copy(),
        "valid": adata[perm[420:510]].copy(),
        "test": adata[perm[510:]].copy(),
    }


@pytest.fixture(scope="module")
def fitted(splits) -> dict[str, Method]:
    return {
        name: create(name, **FAST[name]).fit(splits["train"], splits["valid"])
        for name in ALL_METHODS
    }


# ---------------------------------------------------------------- registry
def test_registry_lists_and_creates_every_method():
    assert set(ALL_METHODS) <= set(available())
    assert available() == sorted(available())
    for name in ALL_METHODS:
        m = create(name)
        assert isinstance(m, Method) and m.name == name
        assert m.uses_unlabeled is False
        assert set(m.params) == set(type(m).default_params)


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(InputError) as err:
        create("scbalanse")
    msg = str(err.value)
    assert "scbalanse" in msg
    for name in ALL_METHODS:
        assert name in msg


def test_registry_unknown_or_bad_param():
    with pytest.raises(InputError) as err:
        create("linear", learning_rate=0.1)
    assert err.value.field == "learning_rate"
    assert "learning_rate" in str(err.value)
    for accepted in ("lr", "epochs", "batch_size", "patience", "seed", "device"):
        assert accepted in str(err.value)
    with pytest.raises(InputError, match="integer"):
        create("scbalance", epochs="20")
    with pytest.raises(InputError, match="true or false"):
        create("scbalance", weighted_sampling="yes")
    with pytest.raises(InputError, match="> 0"):
        create("linear", batch_size=0)
    assert create("linear", lr=1).params["lr"] == 1.0  # int accepted for a float
    assert create("linear", patience=None).params["patience"] is None


def test_register_decorator_adds_a_method():
    @register("_test_constant")
    class Constant(Method):
        default_params = {}

        def _fit(self, X, y, X_valid, y_valid):
            pass

        def _predict_proba(self, X):
            return np.ones((X.shape[0], len(self.classes_)))

    assert "_test_constant" in available()
    assert isinstance(create("_test_constant"), Constant)


# ---------------------------------------------------------------- contract of every method
@pytest.mark.parametrize("name", ALL_METHODS)
def test_predict_proba_contract(name, fitted, splits):
    m = fitted[name]
    test = splits["test"]
    proba = m.predict_proba(test)
    assert m.classes_ == [f"type_{c}" for c in range(5)]
    assert proba.shape == (test.n_obs, 5)
    assert list(proba.columns) == m.classes_
    assert list(proba.index) == list(test.obs_names)
    assert np.all(proba.to_numpy() >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    pred = m.predict(test)
    assert pred.shape == (test.n_obs,)
    np.testing.assert_array_equal(pred, np.asarray(m.classes_)[proba.to_numpy().argmax(1)])


@pytest.mark.parametrize("name", ["linear", "scbalance", "celltypist"])
def test_real_methods_are_accurate_on_separable_data(name, fitted, splits):
    test = splits["test"]
    acc = np.mean(fitted[name].predict(test) == test.obs["cell_type"].astype(str).to_numpy())
    assert acc > 0.95, f"{name} accuracy {acc:.3f}"


@pytest.mark.parametrize("name", ALL_METHODS)
def test_save_load_round_trip(name, fitted, splits, tmp_path):
    m = fitted[name]
    m.save(tmp_path / name)
    meta = json.loads((tmp_path / name / "method.json").read_text())
    assert meta["name"] == name
    assert meta["classes_"] == m.classes_
    assert meta["var_names"] == list(splits["train"].var_names)
    assert meta["params"] == m.params
    loaded = Method.load(tmp_path / name)
    assert type(loaded) is type(m)
    pd.testing.assert_frame_equal(
        loaded.predict_proba(splits["test"]), m.predict_proba(splits["test"])
    )
    if name in ("linear", "scbalance"):
        state = torch.load(tmp_path / name / "model.pt", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    if name == "celltypist":
        assert (tmp_path / name / "celltypist_model.pkl").exists()
    if name != "majority":  # a class-specific load refuses another method's directory
        with pytest.raises(InputError, match="not 'majority'"):
            type(fitted["majority"]).load(tmp_path / name)


@pytest.mark.parametrize("name", ["linear", "scbalance", "celltypist", "random"])
def test_same_seed_same_predictions(name, fitted, splits):
    again = create(name, **FAST[name]).fit(splits["train"], splits["valid"])
    pd.testing.assert_frame_equal(
        again.predict_proba(splits["test"]), fitted[name].predict_proba(splits["test"])
    )


def test_random_control_seeded_and_follows_frequencies(fitted, splits):
    big = ad.concat([splits["train"]] * 5, index_unique="-")
    a = fitted["random"].predict_proba(big)
    assert set(np.unique(a.to_numpy())) == {0.0, 1.0}  # one-hot
    other = create("random", seed=1).fit(splits["train"]).predict_proba(big)
    assert (a.to_numpy().argmax(1) != other.to_numpy().argmax(1)).mean() > 0.3
    share = a.to_numpy().mean(axis=0)
    freq = np.array(SIZES) / sum(SIZES)
    train_freq = splits["train"].obs["cell_type"].value_counts(normalize=True)
    np.testing.assert_allclose(share, train_freq[fitted["random"].classes_].to_numpy(), atol=0.04)
    assert abs(share[0] - freq[0]) < 0.06


def test_majority_predicts_training_majority(fitted, splits):
    majority = splits["train"].obs["cell_type"].value_counts().idxmax()
    assert majority == "type_0"
    proba = fitted["majority"].predict_proba(splits["test"])
    assert (fitted["majority"].predict(splits["test"]) == majority).all()
    assert (proba[majority] == 1.0).all()


# ---------------------------------------------------------------- input errors
def test_missing_label_column_names_the_field(splits):
    with pytest.raises(InputError) as err:
        create("majority").fit(splits["train"], label_key="author_label")
    assert err.value.field == "author_label"
    assert "author_label" in str(err.value)


@pytest.mark.parametrize("bad", [np.nan, "", "  "])
def test_missing_or_empty_labels_rejected(splits, bad):
    train = splits["train"].copy()
    labels = train.obs["cell_type"].astype(object).to_numpy()
    labels[3] = bad
    train.obs["cell_type"] = labels
    with pytest.raises(InputError, match="missing \\(NaN\\) or empty label") as err:
        create("linear").fit(train)
    assert err.value.field == "cell_type"


def test_single_class_training_rejected(splits):
    one = splits["train"][splits["train"].obs["cell_type"] == "type_0"].copy()
    with pytest.raises(InputError, match="at least 2 classes"):
        create("linear").fit(one)


def test_label_key_is_configurable(splits):
    train = splits["train"].copy()
    train.obs["my_label"] = train.obs["cell_type"].astype(str)
    del train.obs["cell_type"]
    m = create("majority").fit(train, label_key="my_label")
    assert m.label_key == "my_label" and m.classes_[0] == "type_0"


@pytest.mark.parametrize("name", ["majority", "linear"])
def test_mismatched_genes_at_predict(name, fitted, splits):
    test = splits["test"]
    with pytest.raises(InputError) as err:
        fitted[name].predict_proba(test[:, :40])
    assert err.value.field == "var_names" and "align genes" in str(err.value)
    reordered = test[:, test.var_names[::-1]]
    with pytest.raises(InputError, match="different order"):
        fitted[name].predict_proba(reordered)


def test_predict_before_fit_and_bad_valid(splits):
    with pytest.raises(InputError, match="not fitted"):
        create("linear").predict_proba(splits["test"])
    with pytest.raises(InputError, match="validation"):
        create("majority").fit(splits["train"], splits["valid"][:, :10])


def test_validation_classes_unseen_in_training_are_ignored(splits, caplog):
    valid = splits["valid"].copy()
    labels = valid.obs["cell_type"].astype(str).to_numpy()
    labels[:5] = "novel"
    valid.obs["cell_type"] = labels
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        m = create("linear", **{**FAST["linear"], "epochs": 2}).fit(splits["train"], valid)
    assert "novel" not in m.classes_
    assert any("unseen in training" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- linear
def test_linear_class_weights_follow_sctab():
    y = np.array([0] * 6 + [1] * 3 + [2] * 1)
    np.testing.assert_allclose(
        balanced_class_weights(y, 3), [10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)]
    )


def test_linear_uses_class_weights_and_architecture(fitted, splits):
    m = fitted["linear"]
    counts = splits["train"].obs["cell_type"].astype(str).value_counts()[m.classes_].to_numpy()
    np.testing.assert_allclose(m.class_weights_, counts.sum() / (len(counts) * counts))
    assert isinstance(m.module_, nn.Linear)
    assert (m.module_.in_features, m.module_.out_features) == (50, 5)
    p = create("linear").params
    assert (p["lr"], p["weight_decay"], p["batch_size"], p["epochs"], p["gamma"]) == (
        5e-4,
        0.01,
        2048,
        20,
        0.9,
    )
    unweighted = create("linear", class_weighted=False, epochs=1).fit(splits["train"])
    np.testing.assert_array_equal(unweighted.class_weights_, np.ones(5))


# ---------------------------------------------------------------- scBalance
def test_scbalance_weighted_sampler_balances_classes():
    y = np.repeat([0, 1, 2], [500, 50, 5])
    rng = np.random.default_rng(0)
    draws = [epoch_indices(y, rng, weighted=True) for _ in range(4)]
    assert all(len(d) == len(y) for d in draws)  # as many draws as cells per epoch
    assert len(np.unique(draws[0])) < len(y)  # with replacement
    share = np.bincount(y[np.concatenate(draws)], minlength=3) / (4 * len(y))
    np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.03)
    # ablation: uniform shuffling follows the class frequencies exactly
    plain = epoch_indices(y, rng, weighted=False)
    assert sorted(plain.tolist()) == list(range(len(y)))
    np.testing.assert_allclose(np.bincount(y[plain]) / len(y), [500 / 555, 50 / 555, 5 / 555])


def test_scbalance_network_architecture(fitted):
    net = fitted["scbalance"].module_
    assert isinstance(net, ScBalanceNet)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (50, 128),
        (128, 64),
        (64, 32),
        (32, 5),
    ]
    kinds = [type(m) for m in net]
    block = [nn.Linear, nn.BatchNorm1d, nn.ELU, MaskDropout]
    assert kinds == block * 3 + [nn.Linear]
    assert all(m.p == 0.5 for m in net if isinstance(m, MaskDropout))
    p = create("scbalance").params
    assert (p["lr"], p["batch_size"], p["epochs"], p["weighted_sampling"]) == (0.005, 128, 20, True)


def test_mask_dropout_matches_inverted_dropout():
    torch.manual_seed(0)
    d = MaskDropout(0.5)
    x = torch.ones(2000, 50)
    out = d.train()(x)
    kept = out != 0
    assert 0.47 < kept.float().mean() < 0.53  # each unit dropped with probability p
    assert torch.allclose(out[kept], torch.full_like(out[kept], 2.0))  # survivors scaled 1/(1-p)
    assert torch.equal(d.eval()(x), x)  # identity at prediction


def test_scbalance_dropout_off_at_prediction(fitted, splits):
    m = fitted["scbalance"]
    a = m.predict_proba(splits["test"])
    b = m.predict_proba(splits["test"])
    pd.testing.assert_frame_equal(a, b)
    x = torch.from_numpy(splits["test"].X[:32].toarray())
    m.module_.train()  # dropout on: outputs vary, so the equality above is meaningful
    try:
        assert not torch.equal(m.module_(x), m.module_(x))
    finally:
        m.module_.eval()


def test_scbalance_sampling_ablation_changes_training(fitted, splits):
    plain = create("scbalance", **FAST["scbalance"], weighted_sampling=False)
    plain.fit(splits["train"], splits["valid"])
    assert plain.params["weighted_sampling"] is False
    diff = np.abs(
        plain.predict_proba(splits["test"]).to_numpy()
        - fitted["scbalance"].predict_proba(splits["test"]).to_numpy()
    )
    assert diff.max() > 1e-3


# ---------------------------------------------------------------- celltypist
def test_celltypist_matches_celltypist_annotate(fitted, splits):
    import celltypist

    m = fitted["celltypist"]
    assert m.fit_info_["mini_batch"] is True
    assert m.fit_info_["feature_selection"] is True
    assert m.fit_info_["n_features"] <= 50
    # celltypist.annotate itself fails on sparse X with a with_mean=False model on this scipy
    # (it divides a sparse matrix into COO, then item-assigns); give it a dense copy.
    test = splits["test"].copy()
    test.X = test.X.toarray()
    result = celltypist.annotate(test, model=m.model_, majority_voting=False)
    ref = result.probability_matrix[m.classes_]
    ref = ref.div(ref.sum(axis=1), axis=0)
    ours = m.predict_proba(splits["test"])
    np.testing.assert_allclose(ours.to_numpy(), ref.to_numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(
        m.predict(splits["test"]), result.predicted_labels["predicted_labels"].astype(str)
    )


def test_celltypist_small_training_set_falls_back_to_plain_sgd(splits, caplog):
    train = splits["train"]
    before = train.X.copy()
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        m = create("celltypist", feature_selection=False).fit(train)  # batch_size 1000 > 420
    assert m.fit_info_["mini_batch"] is False
    assert any("falling back to plain SGD" in r.getMessage() for r in caplog.records)
    assert (train.X != before).nnz == 0  # input untouched
    acc = np.mean(m.predict(splits["test"]) == splits["test"].obs["cell_type"].astype(str))
    assert acc > 0.95


def test_celltypist_chatter_stays_off_the_console(tmp_path):
    """In a fresh interpreter: no root handler from celltypist, nothing printed by it."""
    code = (
        "import logging, sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "from test_methods import make_adata\n"
        "from celltype_bench.methods import create\n"
        "a = make_adata()\n"
        "create('celltypist', feature_selection=False).fit(a)\n"
        "print(len(logging.getLogger().handlers), logging.getLogger().level)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", str(logging.WARNING)]
    assert "Training data" not in out.stderr and "Preparing data" not in out.stderr


# ---------------------------------------------------------------- balancing switches
def test_linear_weighted_sampling_changes_training(fitted, splits):
    m = create("linear", **FAST["linear"], weighted_sampling=True)
    m.fit(splits["train"], splits["valid"])
    assert (
        m.params["weighted_sampling"] is True
        and create("linear").params["weighted_sampling"] is False
    )
    diff = np.abs(
        m.predict_proba(splits["test"]).to_numpy()
        - fitted["linear"].predict_proba(splits["test"]).to_numpy()
    )
    assert diff.max() > 1e-3


def test_scbalance_class_weighted_changes_training(fitted, splits):
    assert create("scbalance").params["class_weighted"] is False  # the paper: plain CE
    m = create("scbalance", **FAST["scbalance"], class_weighted=True)
    m.fit(splits["train"], splits["valid"])
    diff = np.abs(
        m.predict_proba(splits["test"]).to_numpy()
        - fitted["scbalance"].predict_proba(splits["test"]).to_numpy()
    )
    assert diff.max() > 1e-3


def test_celltypist_balance_cell_type_warns_when_it_only_reorders(splits, caplog):
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        create("celltypist", **FAST["celltypist"], balance_cell_type=True).fit(splits["train"])
    assert any("only reorders" in r.getMessage() for r in caplog.records)


def test_balancing_class_attributes():
    from celltype_bench.methods import get

    assert get("linear").native_balancing == "class_weight"
    assert get("scbalance").native_balancing == "weighted_sampling"
    assert get("celltypist").native_balancing == "none"
    assert get("majority").native_balancing == get("random").native_balancing == "none"
    assert get("celltypist").supported_weightings == {"weighted_sampling"}
    assert get("majority").supported_weightings == frozenset()
