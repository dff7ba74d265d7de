"""scTab's baselines: the MLP (with augmentation), XGBoost on PCA, and deep ensembles."""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import celltype_bench.methods.base as base_mod  # the shared torch recipe
from celltype_bench.augmentation import compute_augmentation_vectors
from celltype_bench.balancing import configure
from celltype_bench.errors import InputError
from celltype_bench.methods import Method, create
from celltype_bench.methods.ensemble import Ensemble, member_seed
from celltype_bench.methods.mlp import MLPNet

torch.set_num_threads(1)

SIZES = [120, 80, 50, 30, 20]  # imbalanced classes
N_GENES = 40
MLP_FAST = {
    "hidden_size": 32,
    "n_hidden": 2,
    "epochs": 6,
    "batch_size": 64,
    "lr": 0.01,
    "device": "cpu",
    "patience": None,
}
XGB_FAST = {"n_components": 10, "n_estimators": 30, "max_depth": 3, "nthread": 1}


def make_adata(seed: int = 0) -> ad.AnnData:
    """5 imbalanced classes over 6 donors (donor effects); X = log1p(CP10k) CSR float32."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, size=N_GENES)
    donor_fx = np.exp(rng.normal(0.0, 0.5, size=(6, N_GENES)))
    counts, labels, donors = [], [], []
    for c, n in enumerate(SIZES):
        mean = base.copy()
        mean[c * 5 : (c + 1) * 5] += 6.0
        d = rng.integers(0, 6, size=n)
        counts.append(rng.poisson(mean * donor_fx[d] * 3.0))
        labels += [f"type_{c}"] * n
        donors += [f"donor_{i}" for i in d]
    C = np.vstack(counts).astype(np.float32)
    C[C.sum(axis=1) == 0, 0] = 1.0
    X = np.log1p(C / C.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels), "donor_id": pd.Categorical(donors)},
        index=[f"cell{i}" for i in range(len(labels))],
    )
    return ad.AnnData(
        sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"gene{j}" for j in range(N_GENES)])
    )


@pytest.fixture(scope="module")
def splits() -> dict[str, ad.AnnData]:
    adata = make_adata()
    perm = np.random.default_rng(1).permutation(adata.n_obs)
    return {
        "train": adata[perm[:200]].copy(),
        "valid": adata[perm[200:250]].copy(),
        "test": adata[perm[250:]].copy(),
    }


@pytest.fixture(scope="module")
def vectors(splits) -> np.ndarray:
    return compute_augmentation_vectors(
        splits["train"], n_clusters=4, min_cluster_size=3, n_vectors=60, seed=0
    )


def _labels(a: ad.AnnData) -> np.ndarray:
    return a.obs["cell_type"].astype(str).to_numpy()


def _accuracy(est: Method, a: ad.AnnData) -> float:
    return float((est.predict(a) == _labels(a)).mean())


def _expected_weights(a: ad.AnnData) -> np.ndarray:
    y = _labels(a)
    classes, counts = np.unique(y, return_counts=True)
    return len(y) / (len(classes) * counts)


# ============================================================================ MLP
def test_mlp_default_architecture_is_sctabs():
    net = create("mlp")._build_module(100, 7)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(100, 128)] + [(128, 128)] * 7 + [
        (128, 7)
    ]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in net.modules()) == 8
    assert sum(isinstance(m, nn.SiLU) for m in net.modules()) == 8
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 8 and all(d.p == 0.1 for d in drops)
    p = create("mlp").params
    assert (p["lr"], p["weight_decay"], p["gamma"], p["batch_size"], p["grad_clip"]) == (
        0.002,
        0.05,
        0.9,
        2048,
        1.0,
    )
    assert p["augment"] is True and p["class_weighted"] is True
    relu = MLPNet(10, 3, hidden_size=8, n_hidden=2, activation="relu")
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 2
    with pytest.raises(InputError):
        create("mlp", activation="tanh")


@pytest.fixture(scope="module")
def mlp_aug(splits, vectors):
    return create("mlp", **MLP_FAST).fit(splits["train"], splits["valid"], augmentation=vectors)


def test_mlp_learns_with_class_weights(mlp_aug, splits):
    assert _accuracy(mlp_aug, splits["test"]) > 0.8
    np.testing.assert_allclose(mlp_aug.class_weights_, _expected_weights(splits["train"]))
    assert mlp_aug.augmented_ and mlp_aug.n_augmentation_vectors_ == 60


def test_mlp_augments_training_batches_only(splits, vectors, monkeypatch):
    calls = []
    real = base_mod.apply_augmentation

    def spy(x, v, g):
        calls.append(x.shape[0])
        return real(x, v, g)

    monkeypatch.setattr(base_mod, "apply_augmentation", spy)
    est = create("mlp", **MLP_FAST).fit(splits["train"], splits["valid"], augmentation=vectors)
    n_batches = -(-splits["train"].n_obs // MLP_FAST["batch_size"])
    assert len(calls) == MLP_FAST["epochs"] * n_batches  # every training batch, nothing else
    assert sum(calls) == MLP_FAST["epochs"] * splits["train"].n_obs
    calls.clear()
    p1 = est.predict_proba(splits["test"]).to_numpy()
    p2 = est.predict_proba(splits["test"]).to_numpy()
    assert calls == []  # never at prediction
    np.testing.assert_array_equal(p1, p2)
    with torch.no_grad():
        x = torch.from_numpy(splits["test"].X.toarray())
        plain = torch.softmax(est.module_.eval()(x), dim=1).numpy()
    np.testing.assert_allclose(p1, plain, atol=1e-6)


def test_mlp_with_and_without_vectors_differ(mlp_aug, splits, caplog):
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        plain = create("mlp", **MLP_FAST).fit(splits["train"], splits["valid"])
    assert "no augmentation vectors were given" in caplog.text
    assert plain.augmented_ is False and plain._state()["augmented"] is False
    losses_aug = [h["loss"] for h in mlp_aug.history_]
    losses_plain = [h["loss"] for h in plain.history_]
    assert losses_aug != losses_plain
    assert not np.allclose(
        mlp_aug.predict_proba(splits["test"]).to_numpy(),
        plain.predict_proba(splits["test"]).to_numpy(),
    )
    off = create("mlp", **MLP_FAST, augment=False)
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        caplog.clear()
        off.fit(splits["train"], splits["valid"], augmentation=np.zeros((1, N_GENES)))
    assert "augmentation" not in caplog.text and off.augmented_ is False


def test_mlp_same_seed_identical_and_round_trip(mlp_aug, splits, vectors, tmp_path):
    again = create("mlp", **MLP_FAST).fit(splits["train"], splits["valid"], augmentation=vectors)
    p = mlp_aug.predict_proba(splits["test"])
    pd.testing.assert_frame_equal(p, again.predict_proba(splits["test"]))
    mlp_aug.save(tmp_path / "m")
    loaded = Method.load(tmp_path / "m")
    assert loaded.name == "mlp" and loaded.augmented_ and loaded.n_augmentation_vectors_ == 60
    pd.testing.assert_frame_equal(p, loaded.predict_proba(splits["test"]))


def test_mlp_balancing_switches(splits):
    params = configure("mlp", MLP_FAST, "none")
    assert params["class_weighted"] is False and params["weighted_sampling"] is False
    est = create("mlp", **params, augment=False).fit(splits["train"])
    np.testing.assert_array_equal(est.class_weights_, np.ones(len(SIZES)))


# ============================================================================ XGBoost
@pytest.fixture(scope="module")
def xgb_fit(splits):
    return create("xgboost", **XGB_FAST).fit(splits["train"], splits["valid"])


def test_xgboost_learns(xgb_fit, splits):
    assert _accuracy(xgb_fit, splits["test"]) > 0.8
    p = xgb_fit.predict_proba(splits["test"]).to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert xgb_fit.fit_info_["n_components"] == 10


def test_xgboost_pca_fitted_on_training_cells_only(xgb_fit, splits):
    from sklearn.decomposition import PCA

    Xtr = splits["train"].X.toarray().astype(np.float64)
    ref = PCA(10, svd_solver="full").fit(Xtr)
    np.testing.assert_allclose(xgb_fit.mean_, Xtr.mean(axis=0), atol=1e-5)
    # same subspace (up to signs): |cosine| of matching components ~ 1
    cos = np.abs(np.sum(ref.components_ * xgb_fit.components_, axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-3)
    # other validation / test cells do not move the projection
    other_valid = splits["valid"].copy()
    other_valid.X = sp.csr_matrix(np.flip(other_valid.X.toarray(), axis=1).copy())
    other = create("xgboost", **XGB_FAST).fit(splits["train"], other_valid)
    np.testing.assert_array_equal(other.components_, xgb_fit.components_)
    np.testing.assert_array_equal(other.mean_, xgb_fit.mean_)
    Xte = splits["test"].X.toarray().astype(np.float64)
    proj = (Xte - xgb_fit.mean_) @ xgb_fit.components_.T.astype(np.float64)
    np.testing.assert_allclose(xgb_fit.transform(splits["test"].X), proj, atol=1e-4)


def test_xgboost_early_stopping_uses_validation(splits):
    noisy = splits["valid"].copy()
    noisy.obs["cell_type"] = pd.Categorical(
        np.random.default_rng(0).permutation(_labels(noisy))
    )  # validation labels unrelated to the cells: its loss soon stops improving
    params = {**XGB_FAST, "n_estimators": 300, "early_stopping_rounds": 5}
    est = create("xgboost", **params).fit(splits["train"], noisy)
    info = est.fit_info_
    assert info["n_rounds"] < 300
    assert info["n_rounds"] - 1 - info["best_iteration"] == 5
    val_loss = [h["val_loss"] for h in est.history_]
    assert int(np.argmin(val_loss)) == info["best_iteration"]
    # predictions use the trees up to the best round, not all of them
    import xgboost as xgb

    d = xgb.DMatrix(est.transform(splits["test"].X))
    best = est.booster_.predict(d, iteration_range=(0, info["best_iteration"] + 1))
    np.testing.assert_allclose(est.predict_proba(splits["test"]).to_numpy(), best, atol=1e-6)
    no_valid = create("xgboost", **{**params, "n_estimators": 40}).fit(splits["train"])
    assert no_valid.fit_info_["n_rounds"] == 40 and no_valid.best_iteration_ == 39


def test_xgboost_class_weights_are_sample_weights(splits, monkeypatch):
    import xgboost as xgb

    seen = {}
    real = xgb.train

    def spy(params, dtrain, *args, **kwargs):
        seen["params"] = params
        seen["weights"] = dtrain.get_weight()
        seen["labels"] = dtrain.get_label()
        return real(params, dtrain, *args, **kwargs)

    monkeypatch.setattr(xgb, "train", spy)
    est = create("xgboost", **XGB_FAST).fit(splits["train"], splits["valid"])
    w = _expected_weights(splits["train"])
    np.testing.assert_allclose(est.class_weights_, w)
    np.testing.assert_allclose(seen["weights"], w[seen["labels"].astype(int)], rtol=1e-6)
    assert seen["params"]["objective"] == "multi:softprob"
    assert seen["params"]["tree_method"] == "hist" and seen["params"]["device"] == "cpu"
    unweighted = create("xgboost", **XGB_FAST, class_weighted=False).fit(splits["train"])
    np.testing.assert_array_equal(unweighted.class_weights_, np.ones(len(SIZES)))
    assert (seen["weights"] == 1).all()
    defaults = create("xgboost").params
    assert (defaults["n_components"], defaults["n_estimators"], defaults["eta"]) == (256, 800, 0.05)
    assert (defaults["max_depth"], defaults["subsample"], defaults["early_stopping_rounds"]) == (
        10,
        0.75,
        10,
    )


def test_xgboost_same_seed_identical_and_round_trip(xgb_fit, splits, tmp_path):
    p = xgb_fit.predict_proba(splits["test"])
    again = create("xgboost", **XGB_FAST).fit(splits["train"], splits["valid"])
    pd.testing.assert_frame_equal(p, again.predict_proba(splits["test"]))
    other = create("xgboost", **XGB_FAST, seed=7).fit(splits["train"], splits["valid"])
    assert not np.array_equal(p.to_numpy(), other.predict_proba(splits["test"]).to_numpy())
    xgb_fit.save(tmp_path / "x")
    names = sorted(f.name for f in (tmp_path / "x").iterdir())
    assert names == ["method.json", "pca_components.npy", "pca_mean.npy", "xgboost_model.json"]
    json.loads((tmp_path / "x" / "xgboost_model.json").read_text())  # JSON, not pickle
    loaded = Method.load(tmp_path / "x")
    pd.testing.assert_frame_equal(p, loaded.predict_proba(splits["test"]))


def test_xgboost_caps_components_on_tiny_data(splits, caplog):
    tiny = splits["train"][:12].copy()
    tiny = tiny[tiny.obs["cell_type"].isin(tiny.obs["cell_type"].unique()[:2])].copy()
    with caplog.at_level(logging.INFO, logger="celltype_bench"):
        est = create("xgboost", **{**XGB_FAST, "n_components": 256}).fit(tiny)
    assert est.fit_info_["n_components"] == tiny.n_obs - 1
    assert "capped" in caplog.text


# ============================================================================ ensemble
ENS = {"member": "mlp", "n_members": 3, "member_params": {**MLP_FAST, "epochs": 3}}


@pytest.fixture(scope="module")
def ens_fit(splits, vectors):
    return create("ensemble", **ENS).fit(splits["train"], splits["valid"], augmentation=vectors)


def test_ensemble_is_mean_of_members(ens_fit, splits):
    test = splits["test"]
    members = [m.predict_proba(test).to_numpy() for m in ens_fit.members_]
    proba = ens_fit.predict_proba(test).to_numpy()
    np.testing.assert_allclose(proba, np.mean(members, axis=0), atol=1e-12)
    np.testing.assert_allclose(ens_fit.uncertainty(test), 1.0 - proba.max(axis=1))
    assert not np.allclose(members[0], members[1])  # different seeds, different members
    assert ens_fit.member_seeds_ == [member_seed(0, k) for k in range(3)]
    assert len(set(ens_fit.member_seeds_)) == 3
    assert [m.params["seed"] for m in ens_fit.members_] == ens_fit.member_seeds_
    assert all(m.augmented_ for m in ens_fit.members_)  # vectors passed through
    spread = ens_fit.member_spread(test)
    assert spread.shape == (test.n_obs,) and (spread >= 0).all()
    assert {h["member"] for h in ens_fit.history_} == {0, 1, 2}


def test_ensemble_parameter_count_sums_its_members(ens_fit):
    from celltype_bench.steps import count_parameters

    members = [count_parameters(m) for m in ens_fit.members_]
    assert len(members) > 1 and all(n and n > 0 for n in members)
    assert count_parameters(ens_fit) == sum(members)


def test_ensemble_same_seed_identical_and_round_trip(ens_fit, splits, vectors, tmp_path):
    p = ens_fit.predict_proba(splits["test"])
    again = create("ensemble", **ENS).fit(splits["train"], splits["valid"], augmentation=vectors)
    pd.testing.assert_frame_equal(p, again.predict_proba(splits["test"]))
    ens_fit.save(tmp_path / "e")
    meta = json.loads((tmp_path / "e" / "method.json").read_text())
    assert [m["dir"] for m in meta["state"]["members"]] == ["member_0", "member_1", "member_2"]
    assert (tmp_path / "e" / "member_2" / "model.pt").exists()
    loaded = Method.load(tmp_path / "e")
    pd.testing.assert_frame_equal(p, loaded.predict_proba(splits["test"]))
    np.testing.assert_array_equal(
        loaded.uncertainty(splits["test"]), ens_fit.uncertainty(splits["test"])
    )


def test_ensemble_resumes_finished_members(splits, vectors, tmp_path, caplog):
    params = {**ENS, "n_members": 2}
    first = create("ensemble", **params).fit(
        splits["train"], splits["valid"], augmentation=vectors, checkpoint_dir=tmp_path
    )
    assert (tmp_path / "member_0" / "model" / "method.json").exists()
    assert (tmp_path / "member_1" / "checkpoint.pt").exists()  # member's own checkpoints
    with caplog.at_level(logging.INFO, logger="celltype_bench"):
        second = create("ensemble", **params).fit(
            splits["train"], splits["valid"], augmentation=vectors, checkpoint_dir=tmp_path
        )
    assert caplog.text.count("reusing the finished member") == 2
    pd.testing.assert_frame_equal(
        first.predict_proba(splits["test"]), second.predict_proba(splits["test"])
    )


def test_ensemble_params_and_balancing(splits):
    assert (
        Ensemble.default_params["member"] == "sctab" and Ensemble.default_params["n_members"] == 5
    )
    est = create("ensemble")
    est.params["member_params"]["x"] = 1
    assert Ensemble.default_params["member_params"] == {}  # the default dict is not shared
    with pytest.raises(InputError, match="seed"):
        create("ensemble", member_params={"seed": 3})
    with pytest.raises(InputError, match="unknown parameter"):
        create("ensemble", member="mlp", member_params={"n_layers": 3})
    with pytest.raises(InputError):
        create("ensemble", member="ensemble")
    with pytest.raises(InputError, match="no seed"):
        create("ensemble", member="majority")
    with pytest.raises(InputError, match="mapping"):
        create("ensemble", member_params=[1, 2])
    # balancing switches reach the member's own switches
    none = create("ensemble", **configure("ensemble", {"member": "xgboost"}, "none"))
    assert none.member_params_ == {"class_weighted": False}
    native = create("ensemble", **configure("ensemble", {"member": "mlp"}, "native"))
    assert native.member_params_ == {"class_weighted": True, "weighted_sampling": False}
    with pytest.raises(InputError, match="does not support"):
        create("ensemble", **configure("ensemble", {"member": "xgboost"}, "weighted_sampling"))
    assert Ensemble.augments({}) is True  # scTab members augment
    assert Ensemble.augments({"member": "mlp", "member_params": {"augment": False}}) is False
    assert Ensemble.augments({"member": "xgboost"}) is False


def test_ensemble_of_xgboost(splits):
    est = create(
        "ensemble", member="xgboost", n_members=2, member_params={**XGB_FAST, "n_estimators": 10}
    ).fit(splits["train"], splits["valid"])
    members = [m.predict_proba(splits["test"]).to_numpy() for m in est.members_]
    np.testing.assert_allclose(
        est.predict_proba(splits["test"]).to_numpy(), np.mean(members, axis=0), atol=1e-12
    )
    assert not np.allclose(members[0], members[1])  # seeds change XGBoost's subsampling


def test_ensemble_checks_member_params_at_config_time():
    with pytest.raises(InputError) as exc:
        Ensemble.check_params(
            {"member": "mlp", "member_params": {"n_layers": 3}}, where="config.yaml: methods.e"
        )
    assert exc.value.file == "config.yaml: methods.e"
    assert exc.value.field == "member_params.n_layers"


def test_ensemble_hands_unlabeled_cells_to_members(splits):
    est = create(
        "ensemble",
        member="scnym",
        n_members=2,
        member_params={"epochs": 1, "device": "cpu"},
    )
    assert est.uses_unlabeled is True  # mirrored from the member class
    est.fit(splits["train"], unlabeled=splits["test"])
    for member in est.members_:
        shape = member.fit_inputs_.unlabeled_X.shape
        assert shape == (splits["test"].n_obs, N_GENES)
    assert create("ensemble", member="mlp").uses_unlabeled is False
