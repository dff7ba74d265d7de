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
    choose_device,
    fit_torch,
    iterate_minibatches,
    predict_proba_torch,
    seed_everything,
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
