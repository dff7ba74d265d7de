"""Tests of the shared torch loop (celltype_bench.training)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from celltype_bench.errors import InputError
from celltype_bench.training import (
    CHUNK_BATCHES,
    CHUNK_BYTES,
    choose_device,
    chunk_cells,
    fit_torch,
    iterate_minibatches,
    predict_proba_torch,
    seed_everything,
    use_fused_kernel,
)

torch.set_num_threads(2)


def _blobs(n: int = 300, genes: int = 20, k: int = 3, seed: int = 0):
    """Sparse, separable data: class c has extra signal on genes [4c, 4c+4)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    X = rng.poisson(0.3, size=(n, genes)).astype(np.float32)
    for c in range(k):
        X[y == c, 4 * c : 4 * c + 4] += rng.poisson(4.0, size=((y == c).sum(), 4))
    return sp.csr_matrix(np.log1p(X)), y.astype(np.int64)


def _mlp(genes: int, k: int) -> nn.Module:
    return nn.Sequential(nn.Linear(genes, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, k))


def test_choose_device_cpu_here():
    if not torch.cuda.is_available():
        assert choose_device() == torch.device("cpu")
        assert choose_device("auto") == torch.device("cpu")
        with pytest.raises(InputError, match="CUDA is not available"):
            choose_device("cuda")
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device("CPU") == torch.device("cpu")
    with pytest.raises(InputError) as err:
        choose_device("tpu")
    assert err.value.field == "device"


def test_seed_everything_reproducible():
    seed_everything(3)
    a = (torch.rand(5), np.random.rand(3))
    seed_everything(3)
    b = (torch.rand(5), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    seed_everything(4)
    assert not torch.equal(a[0], torch.rand(5))


def test_iterate_minibatches_covers_rows_and_densifies():
    X, y = _blobs(n=53)
    rng = np.random.default_rng(0)
    seen_rows = []
    batches = list(iterate_minibatches(X, y, 10, rng=rng))
    assert [len(b[1]) for b in batches] == [10, 10, 10, 10, 10, 3]
    perm = np.random.default_rng(0).permutation(53)
    for i, (xb, yb) in enumerate(batches):
        assert xb.dtype == torch.float32 and xb.layout == torch.strided
        rows = perm[i * 10 : (i + 1) * 10]
        np.testing.assert_array_equal(xb.numpy(), X[rows].toarray())
        np.testing.assert_array_equal(yb.numpy(), y[rows])
        seen_rows.extend(rows)
    assert sorted(seen_rows) == list(range(53))
    # explicit indices (with repeats) are honoured; a trailing singleton batch can be dropped
    idx = np.array([5, 5, 5, 1, 2])
    got = list(iterate_minibatches(X, y, 2, indices=idx, min_batch=2))
    assert len(got) == 2
    np.testing.assert_array_equal(got[0][0].numpy(), X[[5, 5]].toarray())
    # X stays sparse: iterate without y
    assert next(iterate_minibatches(X, None, 4))[1] is None


def test_fit_torch_learns_logs_and_is_deterministic(caplog):
    X, y = _blobs()
    Xv, yv = _blobs(n=120, seed=1)

    def run(seed: int):
        seed_everything(seed)
        model = _mlp(X.shape[1], 3)
        hist = fit_torch(
            model,
            X,
            y,
            X_valid=Xv,
            y_valid=yv,
            optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
            scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.9),
            epochs=5,
            batch_size=32,
            grad_clip=1.0,
            device="cpu",
            seed=seed,
        )
        return model, hist

    with caplog.at_level(logging.INFO, logger="celltype_bench"):
        m1, h1 = run(0)
    lines = [r.getMessage() for r in caplog.records if r.name == "celltype_bench"]
    assert any(
        line.startswith("epoch 1/5 loss ") and "val_macro_f1" in line and "cells/s" in line
        for line in lines
    )
    assert [h["epoch"] for h in h1] == [1, 2, 3, 4, 5]
    assert set(h1[0]) >= {"epoch", "loss", "val_macro_f1", "seconds"}
    assert h1[-1]["loss"] < h1[0]["loss"]
    assert max(h["val_macro_f1"] for h in h1) > 0.9
    assert h1[1]["lr"] == pytest.approx(0.01 * 0.9)  # the scheduler steps once per epoch
    m2, h2 = run(0)
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    m3, _ = run(1)
    assert not torch.equal(m1[0].weight, m3[0].weight)


def test_fit_torch_restores_best_state_and_stops_early():
    """Learn for 3 epochs from a wrong start, then do gradient *ascent*: F1 peaks, then drops."""
    n = 200
    y = np.arange(n) % 2
    X = sp.csr_matrix(np.eye(2, dtype=np.float32)[y])
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # predicts every cell wrong
    ce = nn.CrossEntropyLoss()
    calls = [0]

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls[0] += 1  # 10 batches per epoch
        return ce(logits, target) if calls[0] <= 30 else -ce(logits, target)

    class Snapshots:
        """A 'scheduler' that records the weights at the end of every epoch."""

        def __init__(self) -> None:
            self.states: list[torch.Tensor] = []

        def step(self) -> None:
            self.states.append(model.weight.detach().clone())

    snaps = Snapshots()
    hist = fit_torch(
        model,
        X,
        y,
        X_valid=X,
        y_valid=y,
        loss_fn=loss_fn,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        scheduler=snaps,
        epochs=30,
        batch_size=20,
        patience=3,
        device="cpu",
        seed=0,
    )
    f1 = [h["val_macro_f1"] for h in hist]
    best_epoch = int(np.argmax(f1)) + 1
    assert f1[0] < max(f1) and f1[-1] < max(f1)  # the best epoch is in the middle
    assert len(hist) == best_epoch + 3 < 30  # stopped `patience` epochs after the best
    assert torch.equal(model.weight, snaps.states[best_epoch - 1])  # best state restored
    assert not torch.equal(model.weight, snaps.states[-1])
    proba = predict_proba_torch(model, X)
    assert float(np.mean(proba.argmax(1) == y)) == pytest.approx(max(f1)) == pytest.approx(1.0)


def test_fit_torch_without_validation_and_sampler():
    X, y = _blobs(n=100)
    model = _mlp(X.shape[1], 3)
    calls = []

    def sampler(rng: np.random.Generator) -> np.ndarray:
        calls.append(rng)
        return rng.choice(len(y), size=3 * len(y), replace=True)

    hist = fit_torch(
        model,
        X,
        y,
        optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
        sampler=sampler,
        epochs=2,
        batch_size=50,
        device="cpu",
        seed=0,
    )
    assert len(calls) == 2 and all(isinstance(r, np.random.Generator) for r in calls)
    assert [h["cells"] for h in hist] == [300, 300]
    assert all(h["val_macro_f1"] is None for h in hist)
    assert not model.training  # left in eval mode


def test_fit_torch_rejects_both_loss_and_class_weights():
    X, y = _blobs(n=20)
    model = nn.Linear(X.shape[1], 3)
    with pytest.raises(InputError, match="both loss_fn and class_weights"):
        fit_torch(
            model,
            X,
            y,
            loss_fn=nn.CrossEntropyLoss(),
            class_weights=np.ones(3),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            epochs=1,
            batch_size=8,
        )


def test_predict_proba_torch_batched_eval_mode():
    X, _ = _blobs(n=37)
    model = nn.Sequential(nn.Linear(X.shape[1], 8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    p_small = predict_proba_torch(model, X, batch_size=5, device="cpu")
    p_big = predict_proba_torch(model, X, batch_size=4096, device="cpu")
    assert p_small.shape == (37, 3)
    np.testing.assert_allclose(p_small, p_big, rtol=1e-5, atol=1e-6)  # dropout was off
    np.testing.assert_allclose(p_small.sum(axis=1), 1.0, atol=1e-9)
    assert model.training  # previous mode restored


# ---------------------------------------------------------------- chunked batching
def _naive_minibatches(X, y, batch_size, indices, min_batch=1):
    """The reference: every batch sliced from the CSR matrix and densified on its own."""
    for start in range(0, len(indices), batch_size):
        rows = indices[start : start + batch_size]
        if len(rows) < min_batch:
            break
        xb = torch.from_numpy(X[rows].toarray().astype(np.float32))
        yb = None if y is None else torch.from_numpy(np.asarray(y)[rows].astype(np.int64))
        yield xb, yb


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for (xg, yg), (xw, yw) in zip(got, want, strict=True):
        assert xg.dtype == torch.float32 and xg.shape == xw.shape
        assert torch.equal(xg, xw)
        if yw is None:
            assert yg is None
        else:
            assert yg.dtype == torch.int64 and torch.equal(yg, yw)


@pytest.mark.parametrize("n_idx", [1, 2, 127, 128, 129, 1000, 1281])
@pytest.mark.parametrize("chunk_batches", [1, 3, 64])
@pytest.mark.parametrize("min_batch", [1, 2])
def test_chunked_minibatches_equal_naive(n_idx, chunk_batches, min_batch):
    X, y = _blobs(n=300, genes=20)
    rng = np.random.default_rng(n_idx)
    idx = rng.choice(300, size=n_idx, replace=True)  # repeats, like the weighted sampler
    want = list(_naive_minibatches(X, y, 128, idx, min_batch=min_batch))
    got = list(
        iterate_minibatches(
            X, y, 128, indices=idx, min_batch=min_batch, chunk_batches=chunk_batches
        )
    )
    _assert_same_batches(got, want)
    # a permutation from rng, and the natural order, without labels
    perm = np.random.default_rng(5).permutation(300)
    got = list(
        iterate_minibatches(X, y, 7, rng=np.random.default_rng(5), chunk_batches=chunk_batches)
    )
    _assert_same_batches(got, list(_naive_minibatches(X, y, 7, perm)))
    got = list(iterate_minibatches(X, None, 64, chunk_batches=chunk_batches))
    _assert_same_batches(got, list(_naive_minibatches(X, None, 64, np.arange(300))))


def test_chunk_memory_is_bounded():
    # as many batches as fit in CHUNK_BYTES (at most CHUNK_BATCHES), at least one
    assert chunk_cells(765, 128) == (CHUNK_BYTES // (128 * 765 * 4)) * 128
    assert chunk_cells(10, 128) == CHUNK_BATCHES * 128
    assert chunk_cells(2000, 128) * 2000 * 4 <= CHUNK_BYTES
    assert chunk_cells(19331, 128) == 128  # a batch above the budget: one batch per chunk
    X, y = _blobs(n=300, genes=20)
    # a tiny byte budget forces one batch per chunk; the batches do not change
    got = list(iterate_minibatches(X, y, 16, rng=np.random.default_rng(0), max_chunk_bytes=1))
    want = list(iterate_minibatches(X, y, 16, rng=np.random.default_rng(0), chunk_batches=1))
    _assert_same_batches(got, want)


def test_chunked_batches_are_independent_views():
    """Changing one yielded batch in place (e.g. augmentation) leaves the others alone."""
    X, y = _blobs(n=300, genes=20)
    idx = np.zeros(40, dtype=np.int64)  # the same cell 40 times
    batches = list(iterate_minibatches(X, y, 10, indices=idx))
    batches[0][0].add_(100.0)
    for xb, _ in batches[1:]:
        np.testing.assert_array_equal(xb.numpy(), X[idx[:10]].toarray())


def test_iterate_minibatches_drops_everything_when_batches_are_too_small():
    X, y = _blobs(n=30)
    assert list(iterate_minibatches(X, y, 1, min_batch=2)) == []


# ---------------------------------------------------------------- fused optimizer
def _fit_once(seed: int, fused: bool, opt: str = "adam"):
    X, y = _blobs(n=200)
    seed_everything(seed)
    model = _mlp(X.shape[1], 3)
    make = {
        "adam": lambda p: torch.optim.Adam(p, lr=0.01),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    }[opt]
    hist = fit_torch(
        model,
        X,
        y,
        optimizer=make,
        epochs=3,
        batch_size=32,
        device="cpu",
        seed=seed,
        fused_optimizer=fused,
    )
    return model, hist


def test_use_fused_kernel_only_when_no_choice_was_made():
    params = list(nn.Linear(3, 2).parameters())
    adam = torch.optim.Adam(params, lr=0.01)
    assert use_fused_kernel(adam) and all(g["fused"] for g in adam.param_groups)
    assert use_fused_kernel(torch.optim.AdamW(params))
    assert not use_fused_kernel(torch.optim.Adam(params, foreach=False))  # explicit choice
    assert not use_fused_kernel(torch.optim.Adam(params, fused=False))
    assert not use_fused_kernel(torch.optim.SGD(params, lr=0.1))  # not Adam
    stepped = torch.optim.Adam(params, lr=0.01)
    params[0].grad = torch.ones_like(params[0])
    stepped.step()
    assert not use_fused_kernel(stepped)  # has state already


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_fused_optimizer_same_update_rule_and_deterministic(opt):
    # the same steps on the same gradients: equal up to rounding
    torch.manual_seed(0)
    start = [torch.randn(16, 20), torch.randn(16)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(5)]
    make = torch.optim.Adam if opt == "adam" else torch.optim.AdamW
    finals = []
    for fused in (False, True):
        params = [nn.Parameter(w.clone()) for w in start]
        optimizer = make(params, lr=0.01)
        if fused:
            assert use_fused_kernel(optimizer)
        for step in grads:
            for prm, g in zip(params, step, strict=True):
                prm.grad = g.clone()
            optimizer.step()
        finals.append([prm.detach().clone() for prm in params])
    for w0, a, b in zip(start, *finals, strict=True):
        assert not torch.equal(a, w0)  # it did step
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # fit_torch with the fused kernel: deterministic per seed, the same first-epoch loss
    m1, h1 = _fit_once(0, True, opt)
    m2, h2 = _fit_once(0, True, opt)
    _, h_plain = _fit_once(0, False, opt)
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert h1[0]["loss"] == pytest.approx(h_plain[0]["loss"], rel=1e-3)


def test_predict_proba_torch_bounds_batch_bytes_for_wide_data(monkeypatch):
    import celltype_bench.training as training

    X, _ = _blobs(n=37, genes=20)
    model = nn.Sequential(nn.Linear(X.shape[1], 3))
    seen = []
    real = training.densify

    def spy(X_, rows, device):
        out = real(X_, rows, device)
        seen.append(out.shape[0])
        return out

    monkeypatch.setattr(training, "densify", spy)
    monkeypatch.setattr(training, "PREDICT_BYTES", 20 * 4 * 8)  # room for 8 cells of 20 genes
    p = training.predict_proba_torch(model, X, batch_size=4096)
    assert max(seen) == 8 and sum(seen) == 37
    monkeypatch.undo()
    np.testing.assert_allclose(p, predict_proba_torch(model, X), rtol=1e-5, atol=1e-7)


# ---- checkpoint / resume, augmentation, regulariser ------------------------------------------
def _fit_with(tmp_path, epochs=6, sampler=None, checkpoint=True, **kw):
    X, y = _blobs()
    Xv, yv = _blobs(n=90, seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
    )
    hist = fit_torch(
        model,
        X,
        y,
        X_valid=Xv,
        y_valid=yv,
        optimizer=lambda p: torch.optim.AdamW(p, lr=0.01),
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.9),
        epochs=epochs,
        batch_size=32,
        sampler=sampler,
        seed=3,
        checkpoint=(tmp_path / "ck.pt") if checkpoint else None,
        **kw,
    )
    return model, hist


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    full, full_hist = _fit_with(tmp_path / "a")
    calls = {"n": 0}

    def dies_in_epoch_4(rng):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return rng.permutation(300)

    with pytest.raises(KeyboardInterrupt):
        _fit_with(tmp_path / "b", sampler=dies_in_epoch_4)
    saved = torch.load(tmp_path / "b" / "ck.pt", weights_only=True)
    assert saved["epoch"] == 3  # the last finished epoch
    resumed, hist = _fit_with(tmp_path / "b")
    assert [h["epoch"] for h in hist] == list(range(1, 7))
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert [h["loss"] for h in hist] == [h["loss"] for h in full_hist]


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path, caplog):
    from celltype_bench.training import Checkpoint

    X, y = _blobs()
    m1 = _mlp(20, 3)
    fit_torch(
        m1,
        X,
        y,
        optimizer=lambda p: torch.optim.Adam(p),
        epochs=2,
        batch_size=32,
        checkpoint=Checkpoint(tmp_path / "ck.pt", "settings-A"),
    )
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        hist = fit_torch(
            _mlp(20, 3),
            X,
            y,
            optimizer=lambda p: torch.optim.Adam(p),
            epochs=3,
            batch_size=32,
            checkpoint=Checkpoint(tmp_path / "ck.pt", "settings-B"),
        )
    assert len(hist) == 3 and "other settings" in caplog.text


def test_augment_only_in_training_and_regularizer_enters_the_loss(tmp_path):
    seen = []

    def augment(x, gen):
        seen.append(x.shape[0])
        return x + torch.rand(x.shape, generator=gen)

    _, plain = _fit_with(tmp_path / "p", epochs=2, checkpoint=False)
    _, aug = _fit_with(tmp_path / "a", epochs=2, checkpoint=False, augment=augment)
    assert sum(seen) == 2 * 300  # every training batch, no validation batch
    assert aug[0]["loss"] != plain[0]["loss"]
    _, reg = _fit_with(
        tmp_path / "r", epochs=2, checkpoint=False, regularizer=lambda: torch.tensor(5.0)
    )
    assert reg[0]["loss"] == pytest.approx(plain[0]["loss"] + 5.0, abs=0.5)
    assert all(h["val_loss"] is not None and h["val_loss"] > 0 for h in plain)
