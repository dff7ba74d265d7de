"""scTab: 1.5-entmax, TabNet (ghost batch norm, attention masks, sparsity term), the method."""

from __future__ import annotations

import logging
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from celltype_bench import balancing
from celltype_bench.augmentation import apply_augmentation
from celltype_bench.errors import InputError
from celltype_bench.methods import Method, create
from celltype_bench.methods import base as base_mod  # the shared torch recipe
from celltype_bench.methods.entmax import entmax15, entmax15_sparse
from celltype_bench.methods.sctab import ScTab
from celltype_bench.methods.tabnet import GhostBatchNorm, TabNet
from celltype_bench.training import Checkpoint, as_csr

torch.set_num_threads(2)

SIZES = [200, 100, 60, 40, 20]  # imbalanced classes
MARKERS = 4  # marker genes per class: class c over-expresses genes c*4 .. c*4+3
FAST = {
    "n_d": 8,
    "n_a": 8,
    "n_shared": 2,
    "n_independent": 2,
    "virtual_batch_size": 32,
    "batch_size": 64,
    "lr": 0.02,
    "momentum": 0.2,
    "input_momentum": 0.2,
    "epochs": 12,
    "patience": None,
    "augment": False,
    "device": "cpu",
}


def make_adata(seed: int = 0, n_genes: int = 40) -> ad.AnnData:
    """420 cells, 5 imbalanced classes with marker genes; X = log1p(CP10k) CSR float32."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.0, 1.0, size=n_genes)
    counts, labels = [], []
    for c, n in enumerate(SIZES):
        mean = base.copy()
        mean[c * MARKERS : (c + 1) * MARKERS] += 8.0
        counts.append(rng.poisson(mean * 3.0, size=(n, n_genes)))
        labels += [f"type_{c}"] * n
    counts = np.vstack(counts).astype(np.float32)
    X = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(len(labels))]
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(X), obs=obs, var=var)


@pytest.fixture(scope="module")
def splits() -> dict[str, ad.AnnData]:
    adata = make_adata()
    perm = np.random.default_rng(1).permutation(adata.n_obs)
    return {
        "train": adata[perm[:300]].copy(),
        "valid": adata[perm[300:360]].copy(),
        "test": adata[perm[360:]].copy(),
    }


@pytest.fixture(scope="module")
def fitted(splits) -> ScTab:
    est = create("sctab", **FAST).fit(splits["train"], splits["valid"])
    assert isinstance(est, ScTab)
    return est


def dense(adata: ad.AnnData) -> torch.Tensor:
    return torch.from_numpy(as_csr(adata.X).toarray())


def sparse_model(n_features: int = 40, n_classes: int = 5, seed: int = 0, **kw) -> TabNet:
    """A small TabNet whose attention masks are sparse (large gain on the attention BN)."""
    torch.manual_seed(seed)
    model = TabNet(n_features, n_classes, n_d=8, n_a=8, n_shared=2, n_independent=2, **kw)
    with torch.no_grad():
        for att in model.att_transformers:
            att.bn.weight.fill_(6.0)
    return model


# ---------------------------------------------------------------------------- entmax
@pytest.mark.parametrize("scale", [0.05, 1.0, 5.0, 300.0])
def test_entmax15_matches_the_entmax_package(scale):
    entmax_pkg = pytest.importorskip("entmax")
    torch.manual_seed(0)
    z = (torch.randn(32, 30, dtype=torch.float64) * scale).requires_grad_()
    g = torch.randn(32, 30, dtype=torch.float64)
    for k in (None, 3, 8):
        ours = entmax15(z, k=k)
        ref = entmax_pkg.entmax15(z, dim=-1)
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
        (g_ours,) = torch.autograd.grad(ours, z, g)
        (g_ref,) = torch.autograd.grad(ref, z, g)
        torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=1e-8)
        assert (ours >= 0).all()
        torch.testing.assert_close(ours.sum(-1), torch.ones(32, dtype=torch.float64))
    if scale >= 1.0:
        assert (entmax15(z) == 0).any(), "1.5-entmax must give exact zeros"


def test_entmax15_any_dim_gradcheck_and_float32():
    z = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    for dim in (0, 1, 2, -1):
        p = entmax15(z, dim=dim)
        torch.testing.assert_close(p.sum(dim), torch.ones_like(p.sum(dim)))
    assert torch.autograd.gradcheck(lambda t: entmax15(t, dim=1), (z,))
    z32 = torch.randn(64, 100) * 3
    p = entmax15(z32)
    assert p.dtype == torch.float32 and (p == 0).any()
    torch.testing.assert_close(p.sum(-1), torch.ones(64))


def test_entmax15_numerically_stable_and_exact_for_a_dominant_entry():
    z = torch.randn(16, 50) * 1e4
    z[:, 0] = 1e6
    p = entmax15(z)
    assert torch.isfinite(p).all()
    assert (p[:, 0] == 1.0).all() and (p[:, 1:] == 0).all()
    # huge common offsets change nothing
    z = torch.randn(8, 20, dtype=torch.float64)
    torch.testing.assert_close(entmax15(z + 1e8), entmax15(z), atol=1e-7, rtol=0)


def test_entmax15_partial_sort_hint_is_exact_bitwise():
    torch.manual_seed(1)
    z = torch.randn(256, 200) * 2
    full = entmax15(z)
    for k in (2, 5, 16, 64, 199):  # small hints retry longer prefixes, then a full sort
        assert torch.equal(entmax15(z, k=k), full)


def test_entmax15_exact_ties_are_in_feature_order_whatever_the_hint():
    from celltype_bench.methods.entmax import entmax15_sparse

    torch.manual_seed(3)
    z = torch.randn(64, 300) * 3
    z[:, 7] = z[:, 250] = z[:, 120] = z.max(dim=1).values - 0.01  # a three-way tie, selected
    results = [entmax15_sparse(z, k) for k in (None, 8, 16, 64)]
    for p, idx, _, _ in results:
        tied = (p[:, :-1] == p[:, 1:]) & (p[:, 1:] > 0)
        first = idx[:, :-1][tied]
        assert tied.any() and (first < idx[:, 1:][tied]).all()  # equal values by feature
        assert torch.equal(p, results[0][0])
        assert torch.equal(idx[p > 0], results[0][1][results[0][0] > 0])


def test_entmax15_too_small_hint_retries_a_longer_prefix_not_a_full_sort(monkeypatch):
    import celltype_bench.methods.entmax as entmax_module

    torch.manual_seed(1)
    z = torch.randn(256, 200) * 2
    full = entmax15(z)
    support = int((full > 0).sum(1).max())
    sorts: list = []
    real_sort = torch.sort
    monkeypatch.setattr(
        entmax_module.torch, "sort", lambda *a, **k: sorts.append(1) or real_sort(*a, **k)
    )
    hint = max(2, support // 2)  # too small, but twice (or four times) it is not
    assert 4 * hint <= 100
    assert torch.equal(entmax15(z, k=hint), full)
    assert not sorts
    assert torch.equal(entmax15(z, k=150), full)  # more than half the row: sorted fully
    assert sorts


def test_attention_hint_follows_training_batches_only():
    model = sparse_model()
    x = torch.rand(64, 40) * 4
    model.train()
    model(x)
    assert int(model.att_transformers[0].k_hint) % 8 == 0  # set by training: multiples of 8
    model.att_transformers[0].k_hint.fill_(13)
    model.eval()
    with torch.no_grad():
        model(x)
    assert int(model.att_transformers[0].k_hint) == 13  # evaluation left it alone


def test_entmax15_sparse_entropy_and_its_gradient():
    torch.manual_seed(2)
    z = (torch.randn(10, 12, dtype=torch.float64) * 0.7).requires_grad_()
    p, idx, h, support = entmax15_sparse(z)
    dense_p = torch.zeros_like(z).scatter(1, idx, p)
    torch.testing.assert_close(dense_p, entmax15(z))
    ref = -(dense_p * torch.log(dense_p + 1e-15)).sum(1)
    torch.testing.assert_close(h, ref)
    assert (support.squeeze(1) >= (dense_p > 0).sum(1)).all()
    assert torch.autograd.gradcheck(lambda t: entmax15_sparse(t)[2], (z,))


# ---------------------------------------------------------------------------- ghost batch norm
def test_ghost_batch_norm_normalises_each_virtual_batch_separately():
    torch.manual_seed(0)
    x = torch.randn(512, 6)
    x[256:] += 10.0  # second virtual batch: another mean
    gbn = GhostBatchNorm(6, virtual_batch_size=256).train()
    y = gbn(x)
    for chunk in (y[:256], y[256:]):
        torch.testing.assert_close(chunk.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
        torch.testing.assert_close(chunk.std(0, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)
    plain = torch.nn.BatchNorm1d(6).train()(x)  # one batch: the chunks end up at about -1, +1
    assert plain[:256].mean() < -0.9 and plain[256:].mean() > 0.9


@pytest.mark.parametrize("n", [512, 600, 513, 200, 300, 1472])
def test_ghost_batch_norm_equals_a_loop_over_chunks(n):
    """Outputs, gradients and running statistics equal TabNet's loop over ``torch.chunk``
    into ``ceil(n / virtual_batch_size)`` chunks (300 cells: 2 chunks of 150, not one)."""
    torch.manual_seed(n)
    x = torch.randn(n, 5) * 3 + 1
    g = torch.randn(n, 5)
    gbn = GhostBatchNorm(5, virtual_batch_size=256, momentum=0.3)
    ref = torch.nn.BatchNorm1d(5, momentum=0.3)
    with torch.no_grad():
        gbn.weight.uniform_(0.5, 2)
        gbn.bias.uniform_(-1, 1)
    ref.load_state_dict(gbn.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = gbn(xa)
    chunks = int(np.ceil(n / 256))  # pytorch-tabnet's GBN
    yb = torch.cat([ref(c) for c in xb.chunk(chunks, 0)])
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gbn.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gbn.running_mean, ref.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gbn.running_var, ref.running_var, atol=1e-5, rtol=1e-5)
    assert int(gbn.num_batches_tracked) == chunks
    gbn.eval()
    ref.eval()
    torch.testing.assert_close(gbn(x), ref(x), atol=1e-5, rtol=1e-5)  # eval: running stats


# ---------------------------------------------------------------------------- TabNet
def test_glu_blocks_residual_scaling_and_shared_layers():
    torch.manual_seed(0)
    model = TabNet(12, 3, n_d=4, n_a=4, n_shared=2, n_independent=3, virtual_batch_size=8)
    split, step = model.initial_splitter, model.feat_transformers[0]
    for i in range(2):  # the shared Linears are the same modules in every transformer
        assert split.shared.layers[i].fc is step.shared.layers[i].fc
        assert split.shared.layers[i].bn is not step.shared.layers[i].bn
    assert split.specific.layers[0].fc is not step.specific.layers[0].fc
    assert len(step.specific.layers) == 3 and not step.specific.first and step.shared.first
    block = step.specific.eval()
    h = torch.randn(5, 8)
    expected = h
    for layer in block.layers:
        expected = (expected + layer(expected)) * math.sqrt(0.5)
    torch.testing.assert_close(block(h), expected)
    first = step.shared.eval()
    x = torch.randn(5, 12)
    expected = first.layers[0](x)  # the first layer (input width 12) has no residual
    expected = (expected + first.layers[1](expected)) * math.sqrt(0.5)
    torch.testing.assert_close(first(x), expected)
    glu = first.layers[0]
    z = glu.bn(glu.fc(x))
    torch.testing.assert_close(glu(x), z[:, :8] * torch.sigmoid(z[:, 8:]))


def _ref_key(key: str) -> str:
    from celltype_bench.methods.tabnet import pytorch_tabnet_key

    return pytorch_tabnet_key(key)


@pytest.mark.parametrize("ratio", [1e9, 1.0])  # dense / sparse masked-input path
def test_tabnet_equals_pytorch_tabnet_with_the_same_weights(ratio):
    tab_network = pytest.importorskip("pytorch_tabnet.tab_network")
    n_features, n_classes = 40, 5
    ours = sparse_model(n_features, n_classes, virtual_batch_size=32)
    ours.sparse_input_ratio = ratio
    ref = tab_network.TabNet(
        n_features,
        n_classes,
        n_d=8,
        n_a=8,
        n_steps=1,
        n_independent=2,
        n_shared=2,
        virtual_batch_size=32,
        momentum=0.02,
        mask_type="entmax",
        group_attention_matrix=torch.eye(n_features),
    )
    state = {_ref_key(k): v for k, v in ours.state_dict().items() if "k_hint" not in k}
    ref_state = ref.state_dict()
    for key in ref_state:
        if ".shared.shared_layers." in key:  # pytorch-tabnet lists the shared Linears twice
            i = key.split(".shared.shared_layers.")[1].split(".")[0]
            state[key] = ours.state_dict()[f"initial_splitter.shared.layers.{i}.fc.weight"]
        elif key not in state:
            state[key] = ref_state[key]
    ref.load_state_dict(state)
    x = torch.rand(128, n_features) * 4
    y = torch.randint(0, n_classes, (128,))
    for train in (True, False):
        ours.train(train)
        ref.train(train)
        out, m_loss = ref(x)
        ours_out = ours(x)
        torch.testing.assert_close(ours_out, out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.last_sparsity_loss, -m_loss, atol=1e-5, rtol=1e-5)
    ours.train()
    ref.train()
    F.cross_entropy(ours(x), y).backward()
    out, _ = ref(x)
    F.cross_entropy(out, y).backward()
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    for name, param in ours.named_parameters():
        theirs = ref_params[_ref_key(name)].grad
        torch.testing.assert_close(param.grad, theirs, atol=1e-5, rtol=1e-3)


def test_unused_outputs_are_not_computed_and_the_rest_is_the_whole_layers():
    """The splitter's decision part and the last step's attention part are skipped: their
    batch-norm channels never see a batch, and logits and gradients equal those of a network
    that computes every column (the same weights)."""
    from celltype_bench.methods import tabnet as tabnet_module

    model = sparse_model()
    full = sparse_model()
    full.load_state_dict(model.state_dict())
    x = torch.rand(64, 40) * 4
    y = torch.randint(0, 5, (64,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    F.cross_entropy(model(x), y).backward()
    skipped = model.skipped_channels()
    assert set(skipped) == {
        "initial_splitter.specific.layers.1.bn",
        "feat_transformers.0.specific.layers.1.bn",
    }
    assert [len(v) for v in skipped.values()] == [16, 16]  # 2 x n_d and 2 x n_a (8 each)
    state = model.state_dict()
    for name, channels in skipped.items():
        for stat in ("running_mean", "running_var"):
            key = f"{name}.{stat}"
            assert torch.equal(state[key][channels], before[key][channels])
            kept = torch.ones(len(state[key]), dtype=torch.bool)
            kept[channels] = False
            assert not torch.equal(state[key][kept], before[key][kept])
    real_forward = tabnet_module.GLULayer.forward

    def whole_layer(self, h, projected=False, keep=None):
        out = real_forward(self, h, projected)
        return out if keep is None else out[:, keep[0] : keep[1]]

    try:
        tabnet_module.GLULayer.forward = whole_layer
        logits = full(x)
        F.cross_entropy(logits, y).backward()
    finally:
        tabnet_module.GLULayer.forward = real_forward
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    full_grads = dict(full.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, full_grads[name].grad, rtol=1e-6, atol=1e-7)


def test_splitter_gets_the_input_batch_norm_output_as_torch_computes_it():
    """The first Linear sees ``BatchNorm1d(x)`` itself, rounded as torch (and pytorch-tabnet)
    round it: not a form folded into the Linear, which computes the same function but trained
    more slowly (benchmarks/results/sctab_loop_variants.md, arm torchbn)."""
    model = sparse_model()
    ref = torch.nn.BatchNorm1d(40, momentum=model.initial_bn.momentum)
    with torch.no_grad():
        model.initial_bn.weight.uniform_(0.5, 2)
        model.initial_bn.bias.uniform_(-1, 1)
    ref.load_state_dict(model.initial_bn.state_dict())
    seen: list = []
    fc = model.initial_splitter.first_fc
    handle = fc.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    try:
        x = torch.rand(64, 40) * 4
        for train in (True, False):
            model.train(train)
            ref.train(train)
            seen.clear()
            model(x)
            assert torch.equal(seen[0], ref(x).detach())
    finally:
        handle.remove()
    torch.testing.assert_close(model.initial_bn.running_mean, ref.running_mean, rtol=0, atol=0)


def test_masked_linear_equals_the_dense_product_and_its_gradients():
    """The masked step input's Linear (compact mask values and column indices, in no order):
    its backward equals autograd's gradients of the dense ``dense(P) @ W.T`` (float64)."""
    from celltype_bench.methods.entmax import to_dense
    from celltype_bench.methods.tabnet import masked_linear

    torch.manual_seed(1)
    n, d, h, k = 40, 25, 8, 5
    idx = torch.stack([torch.randperm(d)[:k] for _ in range(n)])
    values = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(h, d, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n, h, dtype=torch.float64)
    masked_linear(values, idx, weight).backward(g)
    v2 = values.detach().clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    (to_dense(v2, idx, d) @ w2.t()).backward(g)
    torch.testing.assert_close(values.grad, v2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-12, atol=1e-12)


def test_masks_gate_the_inputs_reaching_the_classifier():
    model = sparse_model().eval()
    x = torch.rand(64, 40) * 4
    masks = model.masks(x)
    assert masks.shape == (64, 40)
    torch.testing.assert_close(masks.sum(1), torch.ones(64))
    off = (masks == 0).nonzero()
    on = (masks > 0.05).nonzero()
    assert len(off) > 0 and len(on) > 0
    base = model(x)

    # hold the attention fixed: then only features with mask > 0 can move the logits
    att = model.att_transformers[0]
    frozen: list = []
    handle = att.register_forward_hook(lambda mod, inp, out: frozen.append(out))
    model(x)
    handle.remove()
    handle = att.register_forward_hook(lambda mod, inp, out: frozen[0])
    try:
        torch.testing.assert_close(model(x), base)
        (i, j), (i2, j2) = off[0].tolist(), on[0].tolist()
        x_off, x_on = x.clone(), x.clone()
        x_off[i, j] += 5.0
        x_on[i2, j2] += 5.0
        torch.testing.assert_close(model(x_off), base)
        assert not torch.allclose(model(x_on)[i2], base[i2])
    finally:
        handle.remove()

    # a uniform mask (attention switched off) changes the logits
    d = model.n_features
    uniform = (
        torch.full((64, d), 1.0 / d),
        torch.arange(d).repeat(64, 1),
        torch.zeros(64),
    )
    handle = att.register_forward_hook(lambda mod, inp, out: uniform)
    try:
        assert not torch.allclose(model(x), base, atol=1e-3)
    finally:
        handle.remove()


def test_sparse_and_dense_masked_input_paths_agree():
    model = sparse_model().train()
    x = torch.rand(96, 40) * 4
    grads = []
    outs = []
    for ratio in (1e9, 1.0):
        model.zero_grad()
        model.sparse_input_ratio = ratio
        state = {k: v.clone() for k, v in model.state_dict().items()}
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.load_state_dict(state)  # same running statistics for the second pass
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-3, rtol=1e-3)


def test_sparsity_loss_is_the_mask_entropy():
    model = sparse_model().train()
    x = torch.rand(64, 40) * 4
    _, masks = model.forward_masks(x)
    m = masks[0]
    expected = (-m * torch.log(m + 1e-15)).sum(1).mean()
    torch.testing.assert_close(model.last_sparsity_loss, expected)
    assert 0 < float(expected.detach()) < math.log(40)
    assert model.last_sparsity_loss.requires_grad


# ---------------------------------------------------------------------------- augmentation
def test_apply_augmentation_random_vector_random_sign_clamped():
    torch.manual_seed(0)
    x = torch.rand(400, 6) * 8
    vectors = torch.tensor(
        [[1.5, 0, 0, 0, 0, -1.5], [0, 1.0, 0, 0, 0.5, 0], [0, 0, 1.2, -1.2, 0, 0]]
    )
    out = apply_augmentation(x, vectors, torch.Generator().manual_seed(3))
    assert out.min() >= 0.0 and out.max() <= 9.0
    candidates = torch.stack(
        [(x + s * v).clamp(0, 9) for v in vectors for s in (1.0, -1.0)], dim=1
    )  # cells x 6 candidates x genes
    match = (candidates == out[:, None, :]).all(-1)
    assert match.any(1).all(), "every row is x plus or minus one vector, clamped to [0, 9]"
    which = match.float().argmax(1)
    signs = which % 2
    assert 0.35 < signs.float().mean() < 0.65  # both signs, about equally often
    assert len(torch.unique(which // 2)) == 3  # every vector is used
    again = apply_augmentation(x, vectors, torch.Generator().manual_seed(3))
    other = apply_augmentation(x, vectors, torch.Generator().manual_seed(4))
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert (apply_augmentation(torch.full((5, 6), 8.5), vectors * 10, torch.Generator()) <= 9).all()


def test_augmentation_applies_in_training_only(splits, monkeypatch):
    calls = {"n": 0}
    real = base_mod.apply_augmentation

    def counting(x, vectors, generator):
        calls["n"] += 1
        return real(x, vectors, generator)

    monkeypatch.setattr(base_mod, "apply_augmentation", counting)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    vectors = np.random.default_rng(0).normal(0, 1.0, size=(20, train.n_vars)).astype(np.float32)
    params = {**FAST, "augment": True, "epochs": 2}
    plain = create("sctab", **{**params, "augment": False}).fit(train, valid)
    aug = create("sctab", **params).fit(train, valid, augmentation=vectors)
    n_train_calls = calls["n"]
    assert n_train_calls == 2 * math.ceil(train.n_obs / FAST["batch_size"])
    assert aug.augmented_ and not plain.augmented_
    assert aug._state()["augmented"] is True and aug._state()["n_augmentation_vectors"] == 20
    assert aug.history_[0]["loss"] != plain.history_[0]["loss"]
    proba = aug.predict_proba(test).to_numpy()
    assert calls["n"] == n_train_calls, "no augmentation at prediction"
    module = aug.module_.eval()
    with torch.no_grad():
        direct = torch.softmax(module(dense(test)), 1).numpy()
    np.testing.assert_allclose(proba, direct, atol=1e-5)


def test_augment_without_vectors_warns_and_records_it(splits, caplog):
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        est = create("sctab", **{**FAST, "augment": True, "epochs": 1}).fit(splits["train"])
    warnings = [r for r in caplog.records if "no augmentation vectors" in r.getMessage()]
    assert len(warnings) == 1
    assert est._state()["augmented"] is False


# ---------------------------------------------------------------------------- training
def test_fit_torch_gets_the_papers_training_mechanisms(splits, monkeypatch):
    seen = {}
    real = base_mod.fit_torch

    def spy(module, X, y, **kw):
        seen.update(kw, y=y, module=module)
        return real(module, X, y, **kw)

    monkeypatch.setattr(base_mod, "fit_torch", spy)
    est = create("sctab", **{**FAST, "epochs": 1, "lambda_sparse": 0.5}).fit(splits["train"])
    y = seen["y"]
    n, k = len(y), len(est.classes_)
    expected = n / (k * np.bincount(y, minlength=k))
    np.testing.assert_allclose(seen["class_weights"], expected)
    np.testing.assert_allclose(est.class_weights_, expected)
    assert seen["grad_clip"] == 1.0 and seen["batch_size"] == FAST["batch_size"]
    module = seen["module"]
    module.train()(dense(splits["train"])[:64])
    reg = seen["regularizer"]().item()
    assert reg == pytest.approx(0.5 * module.last_sparsity_loss.item())
    opt = seen["optimizer"](module.parameters())
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == FAST["lr"] and opt.defaults["weight_decay"] == 0.05
    sched = seen["scheduler"](opt)
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR) and sched.gamma == 0.9
    seen.clear()
    create("sctab", **{**FAST, "epochs": 1, "class_weighted": False}).fit(splits["train"])
    np.testing.assert_allclose(seen["class_weights"], np.ones(k))


def test_sparsity_regulariser_enters_the_loss(splits):
    """One batch per epoch: the first epoch's loss differs by lambda x the mask entropy."""
    params = {**FAST, "epochs": 1, "batch_size": 512, "virtual_batch_size": 128}
    base = create("sctab", **params, lambda_sparse=0.0).fit(splits["train"])
    reg = create("sctab", **params, lambda_sparse=10.0).fit(splits["train"])
    diff = reg.history_[0]["loss"] - base.history_[0]["loss"]
    assert 0 < diff / 10.0 <= math.log(splits["train"].n_vars) + 1e-6


def test_learns_and_roundtrips_save_load(fitted, splits, tmp_path):
    test = splits["test"]
    truth = test.obs["cell_type"].astype(str).to_numpy()
    pred = fitted.predict(test)
    assert np.mean(pred == truth) > 0.8  # chance: 0.2 (majority class 0.48)
    proba = fitted.predict_proba(test)
    assert proba.shape == (test.n_obs, 5)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    fitted.save(tmp_path / "m")
    loaded = Method.load(tmp_path / "m")
    assert isinstance(loaded, ScTab) and loaded.params == fitted.params
    np.testing.assert_array_equal(loaded.predict_proba(test).to_numpy(), proba.to_numpy())
    np.testing.assert_allclose(loaded.class_weights_, fitted.class_weights_)


# ---------------------------------------------------------------------------- model size
def _tabnet_parameters(g: int, k: int, n_d: int, n_a: int, n_shared: int, n_ind: int) -> int:
    """TabNet's parameter count by hand (one step): shared Linears once, per transformer its
    GLU batch norms and step-specific Linears, the attention Linear + BN, the input BN."""
    w = n_d + n_a
    shared = (g * 2 * w + (n_shared - 1) * w * 2 * w) if n_shared else 0
    first_in = w if n_shared else g
    specific = (first_in * 2 * w + (n_ind - 1) * w * 2 * w) if n_ind else 0
    bn = (n_shared + n_ind) * 2 * (2 * w)
    transformers = 2 * (specific + bn)  # the initial splitter and the decision step
    attention = n_a * g + 2 * g
    return 2 * g + shared + transformers + attention + n_d * k


@pytest.mark.parametrize("n_shared, n_ind", [(3, 5), (0, 2), (2, 0)])
def test_parameter_count_grows_with_the_width(n_shared, n_ind):
    """scTab Fig. 2f: model size is set by the widths n_d / n_a (counted without fitting)."""
    counts = []
    for n_d in (32, 64, 128, 256):
        n_a = n_d // 2
        params = {"n_d": n_d, "n_a": n_a, "n_shared": n_shared, "n_independent": n_ind}
        n = ScTab.count_parameters(19331, 164, **params)
        assert n == _tabnet_parameters(19331, 164, n_d, n_a, n_shared, n_ind)
        counts.append(n)
    assert counts == sorted(counts) and len(set(counts)) == 4
    assert counts[-1] > 6 * counts[0]  # about linear in n_d + n_a: 2.3M -> 21.0M (3, 5)
    if (n_shared, n_ind) == (3, 5):  # the paper's defaults on the census: about 9.7 million
        assert ScTab.count_parameters(19331, 164) == pytest.approx(9.66e6, rel=0.01)
    with pytest.raises(InputError):
        ScTab.count_parameters(100, 3, n_a=0)


def test_n_parameters_after_fit_is_saved_and_grows_with_n_d(fitted, splits, tmp_path):
    train = splits["train"]
    g, k = train.n_vars, len(fitted.classes_)
    module = fitted.module_
    assert fitted.n_parameters_ == sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert fitted.n_parameters_ == ScTab.count_parameters(g, k, **FAST)
    assert fitted._state()["n_parameters"] == fitted.n_parameters_
    fitted.save(tmp_path / "m")
    assert Method.load(tmp_path / "m").n_parameters_ == fitted.n_parameters_
    wider = create("sctab", **{**FAST, "n_d": 32, "n_a": 16, "epochs": 1}).fit(train)
    assert wider.n_parameters_ > fitted.n_parameters_
    assert wider.module_.final.in_features == 32
    assert wider.module_.att_transformers[0].fc.in_features == 16
    from celltype_bench.steps import count_parameters  # what the workflow records

    assert count_parameters(wider) == wider.n_parameters_


def test_class_masks_and_top_genes(fitted, splits):
    test = splits["test"]
    masks = fitted.class_masks(test)
    assert list(masks.columns) == list(test.var_names)
    assert set(masks.index) <= set(fitted.classes_)
    np.testing.assert_allclose(masks.sum(1), 1.0, atol=1e-5)
    by_prediction = fitted.class_masks(test, use_labels=False)
    assert set(by_prediction.index) <= set(fitted.classes_)
    unlabeled = test.copy()
    del unlabeled.obs["cell_type"]
    pd.testing.assert_frame_equal(fitted.class_masks(unlabeled), by_prediction)
    top = fitted.top_genes(test, n=3)
    assert top.shape == (len(masks), 3) and list(top.columns) == [1, 2, 3]
    with_marker = 0
    for cls, genes in top.iterrows():
        row = masks.loc[cls]
        assert list(genes) == list(row.sort_values(ascending=False, kind="stable").index[:3])
        c = int(str(cls).split("_")[1])
        markers = {f"gene{j}" for j in range(c * MARKERS, (c + 1) * MARKERS)}
        with_marker += bool(markers & set(genes))
    assert with_marker >= 3, "most classes attend to their own marker genes"


def test_same_seed_same_predictions(splits):
    params = {**FAST, "epochs": 3}
    a = create("sctab", **params, seed=5).fit(splits["train"], splits["valid"])
    b = create("sctab", **params, seed=5).fit(splits["train"], splits["valid"])
    c = create("sctab", **params, seed=6).fit(splits["train"], splits["valid"])
    pa, pb, pc = (m.predict_proba(splits["test"]).to_numpy() for m in (a, b, c))
    np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(pa, pc)


class _Killed(RuntimeError):
    pass


def test_resume_after_a_kill_ends_like_an_uninterrupted_fit(splits, tmp_path, monkeypatch, caplog):
    params = {**FAST, "epochs": 4}
    vectors = np.random.default_rng(0).normal(0, 0.5, size=(10, splits["train"].n_vars))
    params["augment"] = True
    kwargs = {"augmentation": vectors.astype(np.float32)}
    full = create("sctab", **params).fit(
        splits["train"], splits["valid"], checkpoint_dir=tmp_path / "a", **kwargs
    )

    real_save = Checkpoint.save

    def save_then_die(self, state):
        real_save(self, state)
        if state["epoch"] == 2:
            raise _Killed("killed after epoch 2")

    monkeypatch.setattr(Checkpoint, "save", save_then_die)
    with pytest.raises(_Killed):
        create("sctab", **params).fit(
            splits["train"], splits["valid"], checkpoint_dir=tmp_path / "b", **kwargs
        )
    monkeypatch.setattr(Checkpoint, "save", real_save)
    with caplog.at_level(logging.INFO, logger="celltype_bench"):
        resumed = create("sctab", **params).fit(
            splits["train"], splits["valid"], checkpoint_dir=tmp_path / "b", **kwargs
        )
    assert any("resuming from checkpoint" in r.getMessage() for r in caplog.records)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert logged and all(m.startswith(("epoch 3/", "epoch 4/")) for m in logged)
    assert [h["epoch"] for h in resumed.history_] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed.history_] == [h["loss"] for h in full.history_]
    np.testing.assert_array_equal(
        resumed.predict_proba(splits["test"]).to_numpy(),
        full.predict_proba(splits["test"]).to_numpy(),
    )


# ---------------------------------------------------------------------------- interface
def test_registered_with_the_papers_defaults_and_balancing_switches():
    est = create("sctab")
    p = est.params
    assert (p["n_d"], p["n_a"], p["n_steps"], p["n_shared"], p["n_independent"]) == (
        128,
        64,
        1,
        3,
        5,
    )
    assert (p["virtual_batch_size"], p["lambda_sparse"], p["lr"], p["weight_decay"]) == (
        256,
        1e-5,
        0.005,
        0.05,
    )
    assert (p["gamma"], p["batch_size"], p["grad_clip"], p["augment"]) == (0.9, 2048, 1.0, True)
    assert p["class_weighted"] is True and p["weighted_sampling"] is False
    assert ScTab.native_balancing == "class_weight"
    sampled = balancing.configure("sctab", {}, "weighted_sampling")
    assert sampled["weighted_sampling"] is True and sampled["class_weighted"] is False


@pytest.mark.parametrize(
    "bad",
    [{"n_d": 0}, {"lambda_sparse": -1.0}, {"momentum": 0.0}, {"n_shared": 0, "n_independent": 0}],
)
def test_bad_parameters_are_refused(bad):
    with pytest.raises(InputError):
        create("sctab", **bad)
    with pytest.raises(InputError, match="unknown parameter"):
        create("sctab", n_decision_steps=2)
