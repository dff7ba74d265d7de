"""scNym: each mechanism of the paper (MixMatch, domain adversary, schedules, input scale) and
the method contract (small queries, label blindness, determinism, resume, save/load)."""

from __future__ import annotations

import copy
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from celltype_bench import balancing
from celltype_bench.methods import Method, create, get
from celltype_bench.methods import scnym as S
from celltype_bench.methods.scbalance import MaskDropout
from celltype_bench.training import Checkpoint

N_GENES = 30
CLASSES = ["A", "B", "C", "D"]
# short, fast settings; everything else at the paper's defaults
FAST = {
    "epochs": 6,
    "batch_size": 64,
    "ssl_ramp_epochs": 4,
    "dan_ramp_epochs": 2,
    "device": "cpu",
    "seed": 3,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch / OpenMP thread: the machine is shared, and small ops run faster so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cells(n: int, seed: int, batch: str = "b1", shift: float = 0.0) -> ad.AnnData:
    """``n`` cells of 4 imbalanced classes; X = log1p(CP10k) of Poisson counts (CSR)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(CLASSES, size=n, p=[0.4, 0.3, 0.2, 0.1])
    mean = np.full((n, N_GENES), 1.0)
    for i, c in enumerate(CLASSES):
        mean[y == c, 5 * i : 5 * i + 5] += 6.0
    counts = rng.poisson(mean * (1.0 + shift)).astype(np.float32)
    counts[:, -1] += 1  # no empty cell
    X = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": y, "cell_type_ontology_term_id": "CL:0000000", "batch": batch},
        index=[f"s{seed}c{i}" for i in range(n)],
    )
    a = ad.AnnData(
        sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)])
    )
    a.layers["counts"] = sp.csr_matrix(counts)
    return a


@pytest.fixture(scope="module")
def data() -> dict[str, ad.AnnData]:
    return {
        "train": make_cells(240, 0, batch="b1"),
        "valid": make_cells(60, 1, batch="b1"),
        "test": make_cells(80, 2, batch="b2", shift=0.3),
    }


def fit(name: str, data, unlabeled=None, **params) -> Method:
    est = create(name, **{**FAST, **params})
    if est.uses_unlabeled:
        unlabeled = data["test"] if unlabeled is None else unlabeled
        return est.fit(data["train"], data["valid"], unlabeled=unlabeled)
    return est.fit(data["train"], data["valid"])


@pytest.fixture(scope="module")
def fitted(data) -> dict[str, Method]:
    return {n: fit(n, data) for n in ("scnym", "scnym_no_adversary", "scnym_supervised")}


# ---------------------------------------------------------------- presets and architecture
def test_presets_registered_with_the_papers_defaults():
    full, noadv, sup = get("scnym"), get("scnym_no_adversary"), get("scnym_supervised")
    assert full.uses_unlabeled and noadv.uses_unlabeled and not sup.uses_unlabeled
    p = full.default_params
    assert (p["lr"], p["weight_decay"], p["batch_size"], p["epochs"], p["patience"]) == (
        1.0,
        1e-4,
        256,
        100,
        40,
    )
    assert (p["sharpen_temperature"], p["mixup_alpha"], p["input_dropout"]) == (0.5, 0.3, 0.1)
    assert (p["ssl_max_weight"], p["ssl_ramp_epochs"], p["ssl_ramp"]) == (1.0, 100, "linear")
    assert (p["dan_max_weight"], p["dan_ramp_epochs"]) == (0.1, 20)
    assert p["target_sum"] == 1e6 and p["pseudolabel_min_confidence"] is None
    assert p["ssl"] and p["adversary"]
    assert noadv.default_params["ssl"] and not noadv.default_params["adversary"]
    assert not sup.default_params["ssl"] and not sup.default_params["adversary"]
    with pytest.raises(Exception, match="ssl_ramp"):
        create("scnym", ssl_ramp="cubic")
    with pytest.raises(Exception, match="pseudolabel_min_confidence"):
        create("scnym", pseudolabel_min_confidence=1.5)
    assert create("scnym", pseudolabel_min_confidence=0.9).params["pseudolabel_min_confidence"]


def test_network_is_genes_256_256_classes(fitted):
    net = fitted["scnym"].module_
    assert isinstance(net, S.ScNymNet)
    kinds = [type(m) for m in net.embed]
    assert kinds == [nn.Linear, nn.BatchNorm1d, MaskDropout, nn.ReLU] * 2
    lin = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [
        (N_GENES, 256),
        (256, 256),
        (256, 4),
    ]
    assert all(m.p == 0.5 for m in net.embed if isinstance(m, MaskDropout))


def test_input_is_log1p_cpm(data):
    a = data["train"]
    counts = a.layers["counts"].toarray()
    cpm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e6)
    net = S.ScNymNet(N_GENES, 4, input_factor=1e6 / 1e4)
    got = net.to_model_input(torch.from_numpy(a.X.toarray())).numpy()
    np.testing.assert_allclose(got, cpm, rtol=1e-4, atol=1e-4)
    assert (got[counts == 0] == 0).all()


# ---------------------------------------------------------------- mechanisms
def test_gradient_reversal_flips_and_scales_the_gradient():
    torch.manual_seed(0)
    w = torch.randn(8, 3)
    x1 = torch.randn(5, 8, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out_plain = (x1 @ w).pow(2).sum()
    out_rev = (S.grad_reverse(x2, 0.3) @ w).pow(2).sum()
    assert torch.equal(out_plain, out_rev)  # identity forward
    out_plain.backward()
    out_rev.backward()
    torch.testing.assert_close(x2.grad, -0.3 * x1.grad)
    # the adversary's own parameters get normal gradients; only the embedding's is reversed
    adv = S.DomainAdversary(8, 2)
    target = torch.tensor([0, 1, 0, 1, 1])
    e1 = torch.randn(5, 8, requires_grad=True)
    e2 = e1.detach().clone().requires_grad_(True)
    nn.functional.cross_entropy(adv.domain_clf(e1), target).backward()
    g_params = [p.grad.clone() for p in adv.parameters()]
    adv.zero_grad()
    nn.functional.cross_entropy(adv(e2, 0.1), target).backward()
    torch.testing.assert_close(e2.grad, -0.1 * e1.grad)
    for p, g in zip(adv.parameters(), g_params, strict=True):
        torch.testing.assert_close(p.grad, g)


def _entropy(q: torch.Tensor) -> torch.Tensor:
    return -(q * q.clamp_min(1e-12).log()).sum(1)


def test_sharpening_lowers_entropy():
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(50, 5), dim=1)
    s = S.sharpen(q, 0.5)
    torch.testing.assert_close(s, q**2 / (q**2).sum(1, keepdim=True))
    torch.testing.assert_close(s.sum(1), torch.ones(50))
    assert (_entropy(s) < _entropy(q)).all()
    assert torch.equal(s.argmax(1), q.argmax(1))
    assert torch.equal(S.sharpen(q, 1.0), q)
    assert torch.equal(S.sharpen(q, 0.0).argmax(1), q.argmax(1))
    assert set(S.sharpen(q, 0.0).unique().tolist()) == {0.0, 1.0}


def test_mixup_mixes_inputs_and_targets_with_dominant_lambda():
    rng = np.random.default_rng(0)
    x = torch.randn(400, 6)
    y = torch.softmax(torch.randn(400, 3), dim=1)
    mx, my, lam, perm = S.mixup(x, y, 0.3, rng)
    assert (lam >= 0.5).all() and (lam <= 1.0).all()
    assert sorted(perm.tolist()) == list(range(400))
    torch.testing.assert_close(mx, lam * x + (1 - lam) * x[perm])
    torch.testing.assert_close(my, lam * y + (1 - lam) * y[perm])
    torch.testing.assert_close(my.sum(1), torch.ones(400))  # targets stay distributions
    assert (lam < 0.999).float().mean() > 0.2  # Beta(0.3, 0.3): real mixing happens
    mx0, my0, _, _ = S.mixup(x, y, 0.0, rng)
    assert mx0 is x and my0 is y


def test_ramps_follow_scnym_schedules():
    lin = [S.ramp_weight(e, 100, 1.0, "linear") for e in range(0, 121, 10)]
    assert lin[0] == 0.0 and lin[10] == 1.0 and lin[-1] == 1.0 and lin[5] == 0.5
    assert all(a <= b for a, b in zip(lin, lin[1:], strict=False))
    sig = [S.ramp_weight(e, 20, 0.1, "sigmoid") for e in range(25)]
    assert math.isclose(sig[0], 0.1 * math.exp(-5)) and sig[20] == 0.1 and sig[24] == 0.1
    assert all(a < b for a, b in zip(sig[:20], sig[1:21], strict=True))


def test_training_applies_the_ramped_weights(fitted):
    hist = fitted["scnym"].history_
    ssl = [h["unsup_weight"] for h in hist]
    np.testing.assert_allclose(ssl[:5], [0.0, 0.25, 0.5, 0.75, 1.0])  # 0 at start, 1 at end
    dan = [h["dan_weight"] for h in hist]
    np.testing.assert_allclose(dan[:3], [0.1 * math.exp(-5), 0.1 * math.exp(-5 / 4), 0.1])
    assert all(h["unsup_loss"] > 0 and h["dan_loss"] > 0 for h in hist)
    noadv = fitted["scnym_no_adversary"].history_
    assert all(h["dan_loss"] == 0 and h["dan_weight"] == 0 for h in noadv)
    assert all(h["unsup_loss"] > 0 for h in noadv)
    sup = fitted["scnym_supervised"]
    assert all(h["unsup_loss"] == 0 and h["dan_loss"] == 0 for h in sup.history_)
    assert sup.fit_info_["semi_supervised"] is False and sup.fit_info_["n_unlabeled"] == 0


def test_input_dropout_zeroes_ten_percent_of_counts_and_renormalises(data):
    x = S.ScNymNet(N_GENES, 4, input_factor=100.0).to_model_input(
        torch.from_numpy(data["train"].X.toarray())
    )
    x = torch.cat([x] * 20)  # 4,800 cells for a tight estimate
    gen = torch.Generator().manual_seed(0)
    out = S.input_dropout(x, 0.1, gen)
    nonzero = x > 0
    dropped = (out == 0) & nonzero
    assert 0.09 < dropped.sum() / nonzero.sum() < 0.11
    assert (out[~nonzero] == 0).all()
    lib_in, lib_out = torch.expm1(x).sum(1), torch.expm1(out).sum(1)
    torch.testing.assert_close(lib_out, lib_in, rtol=1e-4, atol=1e-2)
    kept = ~dropped & nonzero
    ratio = torch.where(kept, torch.expm1(out) / torch.expm1(x).clamp_min(1e-12), torch.nan)
    spread = torch.nan_to_num(ratio, nan=1.0).amax(1) - torch.nan_to_num(ratio, nan=1e9).amin(1)
    assert spread.max() < 1e-3  # survivors of a cell share one scale factor
    again = S.input_dropout(x, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(S.input_dropout(x, 0.0, gen), x)


def test_confidence_threshold_keeps_unconfident_cells_out_of_the_loss():
    torch.manual_seed(0)
    net = S.ScNymNet(N_GENES, 4)
    xl = torch.rand(16, N_GENES) * 3
    yl = nn.functional.one_hot(torch.arange(16) % 4, 4).float()
    xu = torch.rand(16, N_GENES) * 3
    kw = dict(
        temperature=0.5,
        alpha=0.3,
        n_augmentations=2,
        augment_pseudolabels=True,
        p_drop=0.1,
        generator=torch.Generator().manual_seed(1),
    )
    net.train()
    on = S.mixmatch_losses(net, xl, yl, xu, min_confidence=None, rng=np.random.default_rng(0), **kw)
    assert on["confident"].all() and on["unsup"] > 0
    assert net.training  # pseudolabelling in eval mode leaves the model in training mode
    off = S.mixmatch_losses(
        net, xl, yl, xu, min_confidence=0.99, rng=np.random.default_rng(0), **kw
    )
    assert not off["confident"].any()  # an untrained net is never 99% sure
    assert off["unsup"] == 0 and off["sup"] > 0
    torch.testing.assert_close(off["pseudolabels"].sum(1), torch.ones(16))
    # pseudolabels = the eval-mode prediction of the unlabeled cells, sharpened (T = 0.5)
    net.eval()
    with torch.no_grad():
        guess = torch.softmax(net.forward_model(xu), dim=1)
    net.train()
    plain = S.mixmatch_losses(
        net,
        xl,
        yl,
        xu,
        **{**kw, "augment_pseudolabels": False},
        min_confidence=None,
        rng=np.random.default_rng(0),
    )
    torch.testing.assert_close(plain["pseudolabels"], S.sharpen(guess, 0.5))


def test_training_step_sums_the_losses_and_reverses_the_adversary_gradient():
    torch.manual_seed(0)
    base, base_adv = S.ScNymNet(N_GENES, 4), S.DomainAdversary(256, 2)
    xl, xu = torch.rand(32, N_GENES) * 3, torch.rand(32, N_GENES) * 3 + 0.5
    yl = nn.functional.one_hot(torch.arange(32) % 4, 4).float()
    dl, du = torch.zeros(32, dtype=torch.long), torch.ones(32, dtype=torch.long)
    params = get("scnym").default_params

    def step(w_dan):
        net, adv = copy.deepcopy(base), copy.deepcopy(base_adv)
        torch.manual_seed(1)  # same dropout masks in every call
        out = S.step_losses(
            net,
            adv,
            xl,
            yl,
            dl,
            xu,
            du,
            params=params,
            ssl=True,
            w_ssl=0.7,
            w_dan=w_dan,
            rng=np.random.default_rng(0),
            generator=torch.Generator().manual_seed(2),
        )
        return net, adv, out

    net, adv, out = step(0.1)
    assert out["sup"] > 0 and out["unsup"] > 0 and out["dan"] > 0
    torch.testing.assert_close(out["loss"], out["sup"] + 0.7 * out["unsup"] + out["dan"])
    out["dan"].backward()
    reversed_grad = net.embed[0].weight.grad.clone()
    adv_grads = [q.grad.clone() for q in adv.parameters()]
    net2, adv2, plain = step(-1.0)  # a reversal by -1 gives back the plain gradient
    torch.testing.assert_close(plain["dan"], out["dan"])
    plain["dan"].backward()
    torch.testing.assert_close(reversed_grad, -0.1 * net2.embed[0].weight.grad)
    for g, q in zip(adv_grads, adv2.parameters(), strict=True):
        torch.testing.assert_close(g, q.grad)  # the adversary itself learns normally
    no_adv = S.step_losses(
        copy.deepcopy(base),
        None,
        xl,
        yl,
        dl,
        xu,
        du,
        params=params,
        ssl=False,
        w_ssl=0.7,
        w_dan=0.1,
        rng=np.random.default_rng(0),
        generator=None,
    )
    assert no_adv["unsup"] == 0 and no_adv["dan"] == 0 and no_adv["confident"] is None
    torch.testing.assert_close(no_adv["loss"], no_adv["sup"])


def test_unlabeled_stream_cycles_every_cell():
    rng = np.random.default_rng(0)
    assert (S.unlabeled_stream(1, 300, rng) == 0).all()
    s = S.unlabeled_stream(10, 25, rng)
    assert len(s) == 25 and sorted(s[:10].tolist()) == list(range(10))
    assert set(np.bincount(s, minlength=10).tolist()) <= {2, 3}


def test_domain_labels():
    uobs = pd.DataFrame({"domain": ["query", "query", "extra"], "batch": ["b2", "b3", "b3"]})
    tobs = pd.DataFrame({"batch": ["b1", "b2"]})
    dl, du, names = S.domain_labels(2, tobs, 3, uobs, "query")
    assert names == ["extra", "query", "training"]
    assert [names[i] for i in dl] == ["training"] * 2
    assert [names[i] for i in du] == ["query", "query", "extra"]
    dl, du, names = S.domain_labels(2, tobs, 3, uobs, "batch")
    assert [names[i] for i in dl] == ["b1", "b2"] and [names[i] for i in du] == ["b2", "b3", "b3"]
    _, du, names = S.domain_labels(2, None, 3, None, "query")
    assert names == ["query", "training"] and (du == 0).all()


def test_class_weights_follow_scnym():
    y = np.array([0] * 6 + [1] * 3 + [2])
    np.testing.assert_allclose(S.scnym_class_weights(y, 3), [1.0, 2.0, 6.0])
    logits = torch.zeros(2, 3)
    target = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    w = torch.tensor([1.0, 2.0, 6.0])
    ce = math.log(3)
    torch.testing.assert_close(S.soft_cross_entropy(logits, target), torch.tensor(ce))
    torch.testing.assert_close(
        S.soft_cross_entropy(logits, target, w), torch.tensor((1 * ce + 6 * ce) / 2)
    )
    params = balancing.configure("scnym", {}, "class_weight")
    assert params["class_weighted"] is True and params["weighted_sampling"] is False
    assert create("scnym", **params).params["class_weighted"] is True


# ---------------------------------------------------------------- the method
def test_predictions_contract_and_accuracy(fitted, data):
    test = data["test"]
    truth = test.obs["cell_type"].astype(str).to_numpy()
    for name, m in fitted.items():
        proba = m.predict_proba(test)
        assert list(proba.columns) == CLASSES and list(proba.index) == list(test.obs_names)
        np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
        assert np.mean(m.predict(test) == truth) > 0.9, name
    info = fitted["scnym"].fit_info_
    assert info["semi_supervised"] and info["adversary"] and info["n_unlabeled"] == 80
    assert info["domains"] == ["query", "training"]


@pytest.mark.parametrize("n_query", [1, 10])
def test_small_query_works(data, n_query):
    small = data["test"][:n_query].copy()
    m = fit("scnym", data, unlabeled=small, epochs=3)
    assert m.fit_info_["n_unlabeled"] == n_query and m.fit_info_["adversary"]
    assert all(h["cells"] == 240 for h in m.history_)  # every labeled batch got its partner
    proba = m.predict_proba(small)
    assert proba.shape == (n_query, 4)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)


def test_labels_of_unlabeled_cells_cannot_matter(data, fitted):
    shuffled = data["test"].copy()
    rng = np.random.default_rng(5)
    shuffled.obs["cell_type"] = rng.permutation(shuffled.obs["cell_type"].to_numpy())
    shuffled.obs["cell_type_ontology_term_id"] = "CL:9999999"
    m = fit("scnym", data, unlabeled=shuffled)
    assert "cell_type" not in m.fit_inputs_.unlabeled_obs.columns
    assert "cell_type_ontology_term_id" not in m.fit_inputs_.unlabeled_obs.columns
    pd.testing.assert_frame_equal(
        m.predict_proba(data["test"]), fitted["scnym"].predict_proba(data["test"]), check_exact=True
    )


@pytest.mark.parametrize(
    ("name", "extra"),
    [("scnym", {}), ("scnym_no_adversary", {}), ("scnym", {"ssl": False})],
    ids=["mixmatch+adversary", "mixmatch-only", "adversary-only"],
)
def test_unlabeled_cells_are_used(data, name, extra):
    other = make_cells(80, 9, batch="b3", shift=1.0)
    a = fit(name, data, unlabeled=other, **extra).predict_proba(data["test"]).to_numpy()
    b = fit(name, data, **extra).predict_proba(data["test"]).to_numpy()
    assert np.abs(a - b).max() > 1e-4


def test_same_seed_same_predictions_other_seed_differs(data, fitted):
    again = fit("scnym", data)
    pd.testing.assert_frame_equal(
        again.predict_proba(data["test"]),
        fitted["scnym"].predict_proba(data["test"]),
        check_exact=True,
    )
    other = fit("scnym", data, seed=4)
    diff = np.abs(
        other.predict_proba(data["test"]).to_numpy()
        - fitted["scnym"].predict_proba(data["test"]).to_numpy()
    )
    assert diff.max() > 1e-4


def test_resume_after_interruption_equals_uninterrupted_run(data, tmp_path, monkeypatch):
    def run(where):
        est = create("scnym", **{**FAST, "epochs": 4})
        return est.fit(data["train"], data["valid"], unlabeled=data["test"], checkpoint_dir=where)

    full = run(tmp_path / "a")
    original = Checkpoint.save
    calls = {"n": 0}

    def dies_in_epoch_3(self, state):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        original(self, state)

    monkeypatch.setattr(Checkpoint, "save", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(Checkpoint, "save", original)
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["adversary"] is not None
    resumed = run(tmp_path / "b")
    assert [h["epoch"] for h in resumed.history_] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed.history_] == [h["loss"] for h in full.history_]
    for k, v in full.module_.state_dict().items():
        assert torch.equal(v, resumed.module_.state_dict()[k]), k
    pd.testing.assert_frame_equal(
        resumed.predict_proba(data["test"]), full.predict_proba(data["test"]), check_exact=True
    )


def test_save_load_round_trip(fitted, data, tmp_path):
    for name, m in fitted.items():
        m.save(tmp_path / name)
        state = torch.load(tmp_path / name / "model.pt", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        loaded = Method.load(tmp_path / name)
        assert type(loaded) is type(m) and loaded.params == m.params
        pd.testing.assert_frame_equal(
            loaded.predict_proba(data["test"]), m.predict_proba(data["test"]), check_exact=True
        )
    assert Method.load(tmp_path / "scnym").domain_names_ == ["query", "training"]


def test_batch_domains_and_early_stopping(data):
    m = fit("scnym", data, adversary_domains="batch", epochs=8, min_epochs=0, patience=1)
    assert m.fit_info_["domains"] == ["b1", "b2"]  # training batch b1, query batch b2
    assert m.fit_info_["selection_start_epoch"] == 1
    assert len(m.history_) <= 8
    f1 = [h["val_macro_f1"] for h in m.history_]
    assert m.fit_info_["best_epoch"] == int(np.argmax(f1)) + 1


def test_without_unlabeled_cells_it_trains_supervised(data, caplog):
    with caplog.at_level("WARNING", logger="celltype_bench"):
        m = create("scnym", **{**FAST, "epochs": 2}).fit(data["train"])
    assert "no unlabeled cells" in caplog.text
    assert m.fit_info_["semi_supervised"] is False and m.fit_info_["adversary"] is False
