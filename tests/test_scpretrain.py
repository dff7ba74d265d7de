"""scPretrain: k-means pseudo-labels at three granularities, per-dataset heads on a shared
encoder, fine-tuning from the pre-trained encoder, the representation variants, save/load."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from celltype_bench import balancing
from celltype_bench.methods import Method, create, get
from celltype_bench.methods import scpretrain as P
from celltype_bench.training import Checkpoint

N_GENES = 30
CLASSES = ["A", "B", "C", "D"]
PRETRAIN = {
    "pretrain_epochs": 6,
    "pretrain_batches": 5,
    "avg_cluster_size": 20,
    "device": "cpu",
    "seed": 3,
}
FINETUNE = {"epochs": 25, "batch_size": 64, "patience": 10}
REPRESENTATIONS = ["scpretrain_lr", "scpretrain_rf", "scpretrain_svm"]
ALL = ["scpretrain", "scpretrain_nopretrain", *REPRESENTATIONS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch / OpenMP thread: the machine is shared, and small ops run faster so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cells(n: int, seed: int, batch: str | None = None, shift: float = 0.0) -> ad.AnnData:
    """``n`` cells of 4 imbalanced classes; X = log1p(CP10k) of Poisson counts (CSR)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(CLASSES, size=n, p=[0.4, 0.3, 0.2, 0.1])
    mean = np.full((n, N_GENES), 1.0)
    for i, c in enumerate(CLASSES):
        mean[y == c, 5 * i : 5 * i + 5] += 6.0
    counts = rng.poisson(mean * (1.0 + shift)).astype(np.float32)
    counts[:, -1] += 1
    X = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": y, "cell_type_ontology_term_id": "CL:0000000"},
        index=[f"s{seed}c{i}" for i in range(n)],
    )
    if batch is not None:
        obs["batch"] = batch
    return ad.AnnData(
        sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)])
    )


@pytest.fixture(scope="module")
def data() -> dict[str, ad.AnnData]:
    return {
        "train": make_cells(240, 0, batch="b1"),
        "valid": make_cells(60, 1, batch="b1"),
        "test": make_cells(100, 2, batch="b2", shift=0.2),
    }


def params(name: str, **extra) -> dict:
    accepted = get(name).default_params
    merged = {**PRETRAIN, **FINETUNE, **extra}
    return {k: v for k, v in merged.items() if k in accepted}


def fit(name: str, data, unlabeled=None, checkpoint_dir=None, **extra) -> Method:
    est = create(name, **params(name, **extra))
    kw = {"checkpoint_dir": checkpoint_dir}
    if est.uses_unlabeled:
        kw["unlabeled"] = data["test"] if unlabeled is None else unlabeled
    return est.fit(data["train"], data["valid"], **kw)


@pytest.fixture(scope="module")
def fitted(data) -> dict[str, Method]:
    return {name: fit(name, data) for name in ALL}


# ---------------------------------------------------------------- registry and defaults
def test_variants_registered_with_the_papers_defaults():
    for name in ALL:
        assert get(name).name == name
    assert get("scpretrain").uses_unlabeled and not get("scpretrain_nopretrain").uses_unlabeled
    assert all(get(n).uses_unlabeled for n in REPRESENTATIONS)
    p = get("scpretrain").default_params
    assert (p["hidden"], p["head_hidden"], p["avg_cluster_size"]) == (200, 100, 100)
    assert (p["pretrain_lr"], p["pretrain_epochs"], p["pretrain_patience"]) == (1e-4, 50, 5)
    assert (p["lr"], p["patience"], p["epochs"], p["batch_size"]) == (0.002, 30, 500, 5000)
    nopre = get("scpretrain_nopretrain").default_params
    assert "pretrain_epochs" not in nopre and nopre["hidden"] == 200 and nopre["lr"] == 0.002
    assert get("scpretrain_rf").default_params["n_estimators"] == 10
    assert get("scpretrain_svm").default_params["kernel"] == "linear"
    # balancing switches exist wherever the strategy is offered
    assert balancing.configure("scpretrain", {}, "weighted_sampling")["weighted_sampling"]
    assert balancing.configure("scpretrain_lr", {}, "class_weight")["class_weighted"]
    assert "weighted_sampling" not in balancing.supported_strategies("scpretrain_svm")


# ---------------------------------------------------------------- pseudo-labels
def test_cluster_counts_three_granularities():
    assert P.cluster_counts(1000) == (10, 20, 6)  # n/100, n/50, n/200 + 1
    assert P.cluster_counts(20000) == (200, 400, 101)
    assert P.cluster_counts(30) == (2, 2, 2)  # at least 2 ...
    assert P.cluster_counts(1) == (1, 1, 1)  # ... and at most n


def test_dataset_keys_prefer_study_then_batch_and_pool_small_ones():
    tobs = pd.DataFrame({"batch": ["b1"] * 60, "study": ["s1"] * 60})
    uobs = pd.DataFrame({"batch": ["b2"] * 50 + ["b3"] * 5, "study": ["s2"] * 55})
    codes, names, col = P.dataset_keys(tobs, 60, uobs, 55, min_cells=10)
    assert col == "study" and names == ["s1", "s2"] and np.bincount(codes).tolist() == [60, 55]
    codes, names, col = P.dataset_keys(tobs[["batch"]], 60, uobs[["batch"]], 55, min_cells=10)
    assert col == "batch" and names == ["b1", "b2", P.POOLED]
    assert np.bincount(codes).tolist() == [60, 50, 5]
    codes, names, col = P.dataset_keys(None, 60, None, 55)
    assert col is None and names == ["all"] and (codes == 0).all()


def test_pseudo_labels_recover_blobs_and_are_seeded():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 10, size=(4, 8))
    X = sp.csr_matrix(np.repeat(centers, 50, axis=0) + rng.normal(0, 0.1, size=(200, 8)))
    truth = np.repeat(np.arange(4), 50)
    lab = P.pseudo_labels(X, (4, 8, 2), seed=1)
    assert lab.shape == (200, 3)
    for g, k in enumerate((4, 8, 2)):
        assert lab[:, g].max() + 1 <= k and set(np.unique(lab[:, g])) == set(
            range(lab[:, g].max() + 1)
        )
    # the 4-cluster granularity is the blob partition
    assert len({(t, c) for t, c in zip(truth, lab[:, 0], strict=True)}) == 4
    assert np.array_equal(lab, P.pseudo_labels(X, (4, 8, 2), seed=1))


# ---------------------------------------------------------------- pre-training
def test_pretraining_heads_per_dataset_and_granularity(data):
    unl = ad.concat(
        [make_cells(80, 5, batch="b2"), make_cells(70, 6, batch="b3")], index_unique="-"
    )
    m = fit("scpretrain", data, unlabeled=unl, epochs=2)
    info = m.pretrain_info_
    assert info["dataset_column"] == "batch" and info["datasets"] == ["b1", "b2", "b3"]
    assert info["dataset_sizes"] == [240, 80, 70]
    assert info["n_cells"] == 240 + 150 and info["n_unlabeled_cells"] == 150
    net = m.pretrain_model_
    assert isinstance(net, P.PretrainNet) and len(net.heads) == 3
    assert net.encoder.out_features == 200
    for d, size in enumerate(info["dataset_sizes"]):
        heads = net.heads[d]
        assert len(heads) == 3
        assert all(isinstance(h, nn.Linear) and h.in_features == 200 for h in heads)
        wanted = P.cluster_counts(size, 20)
        sizes = [h.out_features for h in heads]
        assert sizes == info["clusters"][d]
        assert all(0.8 * w <= s <= w for s, w in zip(sizes, wanted, strict=True))
        assert sizes[1] > sizes[0] > sizes[2]  # n/50 > n/100 > n/200 + 1


def test_each_dataset_trains_its_own_heads_on_the_shared_encoder():
    net = P.PretrainNet(10, 8, [[3, 5, 2], [4, 6, 2]])
    x, y = torch.rand(6, 10), torch.tensor([[0, 1, 1]] * 6)
    net.dataset_loss(1, x, y).backward()
    assert all(h.weight.grad is None for h in net.heads[0])
    assert all(h.weight.grad.abs().sum() > 0 for h in net.heads[1])
    assert net.encoder.weight.grad.abs().sum() > 0
    h = torch.sigmoid(net.encoder(x))
    want = sum(
        nn.functional.cross_entropy(torch.sigmoid(head(h)), y[:, g])
        for g, head in enumerate(net.heads[1])
    )
    torch.testing.assert_close(net.dataset_loss(1, x, y), want)  # sigmoid heads, summed CE


def test_pretraining_keeps_the_best_held_out_epoch_and_stops_early(tmp_path):
    X, one = make_cells(200, 0).X, np.zeros(200, dtype=np.int64)
    kw = dict(avg_cluster_size=20, epochs=8, lr=0.2, batches=5, seed=0)
    ck = Checkpoint(tmp_path / "pt.pt")
    res = P.pretrain_encoder(X, one, patience=None, checkpoint=ck, **kw)
    held = [h["held_out_loss"] for h in res.history]
    assert len(held) == 8 and res.best_epoch == int(np.argmin(held)) + 1 < 8
    saved = torch.load(ck.path, weights_only=True)
    assert torch.equal(res.encoder_state["weight"], saved["best_state"]["encoder.weight"])
    assert not torch.equal(res.encoder_state["weight"], saved["model"]["encoder.weight"])
    early = P.pretrain_encoder(X, one, patience=2, **kw)
    assert len(early.history) == early.best_epoch + 2


def test_pretraining_lowers_the_held_out_loss(fitted):
    hist = fitted["scpretrain"].pretrain_history_
    assert len(hist) == 6 and all(h["held_out_loss"] is not None for h in hist)
    assert hist[-1]["held_out_loss"] < hist[0]["held_out_loss"]
    info = fitted["scpretrain"].pretrain_info_
    assert info["n_cells"] == 240 + 100  # training expression + the query cells
    assert info["best_epoch"] == int(np.argmin([h["held_out_loss"] for h in hist])) + 1


def test_plain_head_logits_option_trains_too(data):
    m = fit("scpretrain", data, head_sigmoid=False, epochs=2)
    assert m.pretrain_model_.head_sigmoid is False
    hist = m.pretrain_history_
    assert hist[-1]["held_out_loss"] < hist[0]["held_out_loss"]


def test_finetuning_starts_from_the_pretrained_encoder(data, monkeypatch):
    seen = {}
    real = P.fit_torch

    def spy(module, *args, **kwargs):
        seen["encoder"] = {k: v.clone() for k, v in module.encoder.state_dict().items()}
        return real(module, *args, **kwargs)

    monkeypatch.setattr(P, "fit_torch", spy)
    m = fit("scpretrain", data, epochs=3)
    pre = m.pretrained_encoder_
    assert set(seen["encoder"]) == {"weight", "bias"}
    for k, v in pre.items():
        assert torch.equal(seen["encoder"][k], v), k
    # the pre-trained encoder is not the random initialisation the control starts from
    fit("scpretrain_nopretrain", data, epochs=3)
    assert not torch.equal(seen["encoder"]["weight"], pre["weight"])
    # and fine-tuning then moves it
    assert not torch.equal(m.module_.encoder.weight.detach(), pre["weight"])


# ---------------------------------------------------------------- the methods
@pytest.mark.parametrize("name", ALL)
def test_valid_probabilities_and_accuracy(name, fitted, data):
    test = data["test"]
    proba = fitted[name].predict_proba(test)
    assert list(proba.columns) == CLASSES and list(proba.index) == list(test.obs_names)
    values = proba.to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all()
    np.testing.assert_allclose(values.sum(1), 1.0, atol=1e-9)
    acc = np.mean(fitted[name].predict(test) == test.obs["cell_type"].astype(str).to_numpy())
    assert acc > 0.8, f"{name}: {acc:.3f}"


@pytest.mark.parametrize("name", REPRESENTATIONS)
def test_representation_is_the_pretrained_encoder(name, fitted, data):
    m = fitted[name]
    enc = nn.Linear(N_GENES, 200)
    enc.load_state_dict(m.pretrained_encoder_)
    x = torch.from_numpy(data["test"].X.toarray())
    with torch.no_grad():
        want = enc(x).numpy()  # the encoder's pre-activation, as scPretrain's script
    np.testing.assert_allclose(m.embed(data["test"].X), want, rtol=1e-5, atol=1e-5)
    kind = {"scpretrain_lr": "LogisticRegression", "scpretrain_rf": "RandomForestClassifier"}
    assert type(m.classifier_).__name__ == kind.get(name, "SVC")


def test_lr_probabilities_match_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    E = rng.normal(size=(120, 5))
    for k in (2, 4):
        y = rng.integers(0, k, size=120)
        clf = LogisticRegression(max_iter=1000).fit(E, y)
        np.testing.assert_allclose(
            P.lr_predict_proba(clf.coef_, clf.intercept_, E), clf.predict_proba(E), atol=1e-12
        )


@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip_without_pickle(name, fitted, data, tmp_path):
    m = fitted[name]
    m.save(tmp_path / name)
    files = {p.name for p in (tmp_path / name).iterdir()}
    assert not {f for f in files if f.endswith((".pkl", ".pickle", ".joblib"))}
    for f in files & {"model.pt", "encoder.pt"}:
        state = torch.load(tmp_path / name / f, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    if name in REPRESENTATIONS:
        with np.load(tmp_path / name / "classifier.npz", allow_pickle=False) as npz:
            keys = set(npz.files)
        assert keys == (
            {"coef", "intercept", "classes", "check_proba"}
            if name == "scpretrain_lr"
            else {"embedding", "labels", "check_proba"}
        )
    loaded = Method.load(tmp_path / name)
    assert type(loaded) is type(m)
    pd.testing.assert_frame_equal(
        loaded.predict_proba(data["test"]), m.predict_proba(data["test"]), check_exact=True
    )
    assert loaded.pretrain_info_ == m.pretrain_info_


def test_labels_of_unlabeled_cells_cannot_matter(data, fitted):
    shuffled = data["test"].copy()
    shuffled.obs["cell_type"] = np.random.default_rng(5).permutation(
        shuffled.obs["cell_type"].to_numpy()
    )
    for name in ("scpretrain", "scpretrain_lr"):
        m = fit(name, data, unlabeled=shuffled)
        assert "cell_type" not in m.fit_inputs_.unlabeled_obs.columns
        pd.testing.assert_frame_equal(
            m.predict_proba(data["test"]),
            fitted[name].predict_proba(data["test"]),
            check_exact=True,
        )


def test_same_seed_same_predictions(data, fitted):
    again = fit("scpretrain", data)
    pd.testing.assert_frame_equal(
        again.predict_proba(data["test"]),
        fitted["scpretrain"].predict_proba(data["test"]),
        check_exact=True,
    )


@pytest.mark.parametrize("name", ["scpretrain", "scpretrain_svm"])
def test_small_query_works(name, data):
    one = data["test"][:1].copy()
    m = fit(name, data, unlabeled=one, epochs=2)
    assert m.pretrain_info_["n_unlabeled_cells"] == 1
    proba = m.predict_proba(one)
    assert proba.shape == (1, 4)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)


def test_max_train_cells_subsamples_every_class(data):
    m = fit("scpretrain_lr", data, max_train_cells=40)
    labels = m.train_labels_
    assert 36 <= len(labels) <= 44 and set(labels.tolist()) == {0, 1, 2, 3}


def test_resume_after_interruption_in_pretraining(data, tmp_path, monkeypatch):
    full = fit("scpretrain", data, checkpoint_dir=tmp_path / "a", epochs=4)
    original = Checkpoint.save
    calls = {"n": 0}

    def dies_in_pretraining_epoch_3(self, state):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        original(self, state)

    monkeypatch.setattr(Checkpoint, "save", dies_in_pretraining_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        fit("scpretrain", data, checkpoint_dir=tmp_path / "b", epochs=4)
    monkeypatch.setattr(Checkpoint, "save", original)
    saved = torch.load(tmp_path / "b" / "pretrain.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["labels"].shape == (340, 3)
    resumed = fit("scpretrain", data, checkpoint_dir=tmp_path / "b", epochs=4)

    def losses(m):
        return [(h["epoch"], h["loss"], h["held_out_loss"]) for h in m.pretrain_history_]

    assert losses(resumed) == losses(full)
    pd.testing.assert_frame_equal(
        resumed.predict_proba(data["test"]), full.predict_proba(data["test"]), check_exact=True
    )
