"""The shared torch training loop: device choice, seeding, batching, early stopping, logging.

Data stay sparse (scipy CSR) at rest; every batch is densified on its own and moved to the
device, so memory is bounded by ``batch_size x n_genes`` whatever the number of cells.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.metrics import f1_score
from torch import nn

from .errors import InputError

LOGGER_NAME = "celltype_bench"

Sampler = Callable[[np.random.Generator], np.ndarray]


def get_logger() -> logging.Logger:
    """The project's logger (name ``celltype_bench``)."""
    return logging.getLogger(LOGGER_NAME)


def choose_device(preference: str | torch.device = "auto") -> torch.device:
    """Pick the torch device: ``'auto'`` = CUDA when available, else CPU; ``'cpu'`` forces CPU.

    ``'cuda'`` / ``'cuda:N'`` are accepted only when CUDA is really available.
    """
    if isinstance(preference, torch.device):
        preference = str(preference)
    pref = str(preference).strip().lower()
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(
                f"device '{preference}' was requested but CUDA is not available on this machine",
                field="device",
                fix="use device: auto (falls back to cpu) or device: cpu",
            )
        return torch.device(pref)
    raise InputError(
        f"unknown device '{preference}'",
        field="device",
        fix="use one of: auto, cpu, cuda, cuda:N",
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic algorithms (warn only)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def as_csr(X: Any) -> sp.csr_matrix:
    """Return X as a float32 scipy CSR matrix, without densifying (no copy if already so)."""
    if isinstance(X, sp.csr_matrix) and X.dtype == np.float32:
        return X
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32)
    return sp.csr_matrix(np.asarray(X, dtype=np.float32))


def densify(X: sp.csr_matrix, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Densify the given rows of a CSR matrix into a float32 tensor on ``device``."""
    block = X[rows].toarray().astype(np.float32, copy=False)
    return torch.from_numpy(block).to(device)


def iterate_minibatches(
    X: Any,
    y: np.ndarray | None,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    indices: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    min_batch: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(x, y)`` tensors batch by batch, each batch densified on its own.

    Order: ``indices`` if given (e.g. from a weighted sampler; may repeat cells), else a
    permutation drawn from ``rng``, else the natural order. A trailing batch smaller than
    ``min_batch`` is dropped (BatchNorm cannot train on one cell).
    """
    X = as_csr(X)
    device = torch.device(device)
    n = X.shape[0]
    if indices is None:
        indices = rng.permutation(n) if rng is not None else np.arange(n)
    indices = np.asarray(indices, dtype=np.int64)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    for start in range(0, len(indices), batch_size):
        rows = indices[start : start + batch_size]
        if len(rows) < min_batch:
            break
        xb = densify(X, rows, device)
        yb = (
            None if y is None else torch.from_numpy(np.asarray(y)[rows].astype(np.int64)).to(device)
        )
        yield xb, yb


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the classes present in ``y_true``."""
    labels = np.unique(y_true)
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fit_torch(
    model: nn.Module,
    X_train: Any,
    y_train: np.ndarray,
    *,
    X_valid: Any = None,
    y_valid: np.ndarray | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer],
    epochs: int,
    batch_size: int,
    sampler: Sampler | None = None,
    scheduler: Any = None,
    grad_clip: float | None = None,
    patience: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    logger: logging.Logger | None = None,
    class_weights: np.ndarray | torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` on sparse ``X_train`` with integer labels ``y_train``.

    - ``optimizer``: an optimizer over ``model.parameters()`` or a factory ``params -> optimizer``.
    - ``scheduler``: an LR scheduler, or a factory ``optimizer -> scheduler``; stepped once per
      epoch.
    - ``loss_fn``: defaults to cross-entropy, weighted by ``class_weights`` if given (pass one
      or the other, not both).
    - ``sampler``: callable ``epoch_rng -> index array`` giving the epoch's cells (may repeat);
      default is a uniform shuffle.
    - With validation data, the validation macro F1 is computed every epoch, the best state is
      restored at the end, and training stops after ``patience`` epochs without improvement.

    Returns one dict per epoch: epoch, loss, val_macro_f1 (None without validation), seconds,
    cells (seen this epoch), cells_per_s, lr. Deterministic on CPU for a given seed.
    """
    log = logger if logger is not None else get_logger()
    device = torch.device(device)
    y_train = np.asarray(y_train, dtype=np.int64)
    X_train = as_csr(X_train)
    if X_train.shape[0] != len(y_train):
        raise InputError(
            f"X_train has {X_train.shape[0]} rows but y_train has {len(y_train)} labels",
            field="y_train",
        )
    if X_train.shape[0] < 2:
        raise InputError("training needs at least 2 cells", field="X_train")
    has_valid = X_valid is not None and y_valid is not None and len(y_valid) > 0
    if has_valid:
        X_valid = as_csr(X_valid)
        y_valid = np.asarray(y_valid, dtype=np.int64)
    if epochs < 1:
        raise InputError(f"epochs must be >= 1, got {epochs}", field="epochs")

    seed_everything(seed)
    model.to(device)
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model.parameters())
    if scheduler is not None and callable(scheduler) and not hasattr(scheduler, "step"):
        scheduler = scheduler(optimizer)
    if loss_fn is None:
        weight = None
        if class_weights is not None:
            weight = torch.as_tensor(np.asarray(class_weights), dtype=torch.float32).to(device)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
    elif class_weights is not None:
        raise InputError(
            "fit_torch got both loss_fn and class_weights",
            field="class_weights",
            fix="put the weights into loss_fn, or pass class_weights alone for weighted CE",
        )
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    min_batch = 2 if _has_batchnorm(model) else 1

    history: list[dict[str, Any]] = []
    best_f1 = -np.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = 0
    since_best = 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        epoch_rng = np.random.default_rng([int(seed), epoch])
        indices = sampler(epoch_rng) if sampler is not None else epoch_rng.permutation(len(y_train))
        model.train()
        total_loss, seen = 0.0, 0
        for xb, yb in iterate_minibatches(
            X_train, y_train, batch_size, indices=indices, device=device, min_batch=min_batch
        ):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            total_loss += float(loss.detach()) * len(yb)
            seen += len(yb)
        lr = float(optimizer.param_groups[0]["lr"])
        if scheduler is not None:
            scheduler.step()
        train_seconds = time.perf_counter() - t0
        mean_loss = total_loss / max(seen, 1)
        val_f1 = None
        if has_valid:
            proba = predict_proba_torch(model, X_valid, batch_size=4096, device=device)
            val_f1 = _macro_f1(y_valid, proba.argmax(axis=1))
        seconds = time.perf_counter() - t0
        cells_per_s = seen / train_seconds if train_seconds > 0 else float("nan")
        history.append(
            {
                "epoch": epoch,
                "loss": mean_loss,
                "val_macro_f1": val_f1,
                "seconds": seconds,
                "cells": seen,
                "cells_per_s": cells_per_s,
                "lr": lr,
            }
        )
        val_txt = f" val_macro_f1 {val_f1:.3f}" if val_f1 is not None else ""
        log.info(
            "epoch %d/%d loss %.3f%s %.0f cells/s", epoch, epochs, mean_loss, val_txt, cells_per_s
        )
        if has_valid:
            if val_f1 > best_f1:
                best_f1, best_epoch, since_best = val_f1, epoch, 0
                best_state = {
                    k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                }
            else:
                since_best += 1
                if patience is not None and since_best >= patience:
                    log.info(
                        "early stopping at epoch %d: no val_macro_f1 gain for %d epochs",
                        epoch,
                        since_best,
                    )
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
        log.info("restored the best state: epoch %d, val_macro_f1 %.3f", best_epoch, best_f1)
    model.eval()
    return history


@torch.no_grad()
def predict_proba_torch(
    model: nn.Module,
    X: Any,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Softmax class probabilities (cells x classes, float64), in eval mode, batch by batch."""
    X = as_csr(X)
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.to(device)
    model.eval()
    out: list[np.ndarray] = []
    try:
        for xb, _ in iterate_minibatches(X, None, batch_size, device=device):
            out.append(torch.softmax(model(xb).float(), dim=1).cpu().numpy().astype(np.float64))
    finally:
        model.train(was_training)
    if not out:
        n_out = _n_outputs(model)
        return np.zeros((0, n_out), dtype=np.float64)
    proba = np.concatenate(out, axis=0)
    proba /= proba.sum(axis=1, keepdims=True)
    return proba


def _n_outputs(model: nn.Module) -> int:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return 0 if last is None else int(last.out_features)
