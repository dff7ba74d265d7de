"""The shared torch training loop: device choice, seeding, batching, early stopping, logging.

Data stay sparse (scipy CSR) at rest. Batches are formed chunk by chunk: the rows of up to
``CHUNK_BATCHES`` consecutive batches are gathered from the CSR matrix in one call, densified
once into a float32 tensor of at most ``CHUNK_BYTES`` (``chunk_cells x n_genes``), and the
batches are then views (row slices) of that tensor. The batches are exactly those of densifying
each batch on its own; only the number of scipy / numpy -> torch calls changes. Memory is
bounded by the chunk whatever the number of cells. Prediction densifies consecutive rows in
batches of at most ``PREDICT_BYTES``.

Adam / AdamW run with torch's fused kernel unless the caller chose an implementation
(:func:`use_fused_kernel`): same update rule, fewer ops per step.

Where the time goes (scBalance's 765-128-64-32 network, batch 128, 2 cores, idle): about 1.8 ms
per step, of which the three Dropout layers' Bernoulli draws take 0.4 ms and the first Linear
(forward + weight gradient) 0.5 ms; batching takes under 0.1 ms per step. Torch runs these
small ops with OpenMP: when another process occupies a core, 2 intra-op threads make each step
10-40 times slower (threads wait for each other), so give a job as many torch threads as it
has cores to itself.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.metrics import f1_score
from torch import nn

from .errors import InputError

LOGGER_NAME = "celltype_bench"

Sampler = Callable[[np.random.Generator], np.ndarray]

CHUNK_BATCHES = 64
"""Batches densified together (at most; see ``CHUNK_BYTES``)."""
CHUNK_BYTES = 4 * 2**20
"""Upper bound of one dense float32 training chunk (``chunk_cells x n_genes x 4`` bytes).

Measured on 20,000 cells x 765 genes, batch 128, 2 cores: gathering + densifying an epoch
costs 24 ms batch by batch, 12 ms in chunks of 1.5-4.5 MiB (8 batches), but 41-50 ms in
chunks of 9-24 MiB (fresh pages and cache misses outweigh the saved calls)."""
PREDICT_BYTES = 4 * 2**20
"""Upper bound of one dense float32 prediction batch (caps ``batch_size``; 1,370 cells of 765
genes). Predicting 5,000 such cells from CSR: 16 ms with 4 MiB batches, 41 ms with 4,096-cell
(12 MiB) batches, the difference being fresh pages touched by each large dense block."""


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
    """Return X as a float32 scipy CSR matrix, without densifying (no copy if already so).

    An on-disk matrix (any object with ``shape`` and ``read_rows(rows) -> CSR``, e.g.
    :class:`celltype_bench.data.ondisk.OnDiskCSR`) is returned as is: batches then read only
    their rows from disk.
    """
    if hasattr(X, "read_rows") and hasattr(X, "shape"):
        return X
    if isinstance(X, sp.csr_matrix) and X.dtype == np.float32:
        return X
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32)
    return sp.csr_matrix(np.asarray(X, dtype=np.float32))


def densify(X: sp.csr_matrix, rows: np.ndarray | slice, device: torch.device) -> torch.Tensor:
    """Densify the given rows (index array or slice) of a CSR matrix into a float32 tensor."""
    if hasattr(X, "read_rows"):
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(X.shape[0]))
        block = X.read_rows(np.asarray(rows)).toarray()
    else:
        block = X[rows].toarray()
    if block.dtype != np.float32:
        block = block.astype(np.float32)
    return torch.from_numpy(block).to(device)


def chunk_cells(
    n_genes: int,
    batch_size: int,
    chunk_batches: int = CHUNK_BATCHES,
    max_bytes: int = CHUNK_BYTES,
) -> int:
    """Cells densified at once: a multiple of ``batch_size``, at most ``chunk_batches`` batches
    and ``max_bytes`` of float32 (but always at least one batch)."""
    per_batch = max(1, int(batch_size) * max(1, int(n_genes)) * 4)
    k = max(1, min(int(chunk_batches), int(max_bytes) // per_batch))
    return k * int(batch_size)


def iterate_minibatches(
    X: Any,
    y: np.ndarray | None,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    indices: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    min_batch: int = 1,
    chunk_batches: int = CHUNK_BATCHES,
    max_chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(x, y)`` tensors batch by batch: dense float32 ``x``, int64 ``y``.

    Order: ``indices`` if given (e.g. from a weighted sampler; may repeat cells), else a
    permutation drawn from ``rng``, else the natural order. A trailing batch smaller than
    ``min_batch`` is dropped (BatchNorm cannot train on one cell).

    The rows of up to ``chunk_batches`` batches (and ``max_chunk_bytes`` of float32) are
    gathered and densified in one call; batches are row-slice views of that chunk (each chunk
    row belongs to exactly one batch). ``chunk_batches=1`` densifies batch by batch. The
    yielded batches are the same whatever the chunking.
    """
    X = as_csr(X)
    device = torch.device(device)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    n = X.shape[0]
    natural = indices is None and rng is None
    if indices is None:
        indices = rng.permutation(n) if rng is not None else np.arange(n)
    indices = np.asarray(indices, dtype=np.int64)
    n_idx = len(indices)
    if batch_size < min_batch:
        return  # every batch would be dropped
    tail = n_idx % batch_size
    stop = n_idx - tail if 0 < tail < min_batch else n_idx
    chunk = chunk_cells(X.shape[1], batch_size, chunk_batches, max_chunk_bytes)
    y_all = None if y is None else torch.from_numpy(np.asarray(y).astype(np.int64, copy=False))
    for c0 in range(0, stop, chunk):
        c1 = min(c0 + chunk, stop)
        rows = indices[c0:c1]
        xc = densify(X, slice(c0, c1) if natural else rows, device)
        yc = None if y_all is None else y_all[torch.from_numpy(rows)].to(device)
        for b0 in range(0, c1 - c0, batch_size):
            b1 = b0 + batch_size
            yield xc[b0:b1], (None if yc is None else yc[b0:b1])


_FUSABLE = (torch.optim.Adam, torch.optim.AdamW)


def use_fused_kernel(optimizer: torch.optim.Optimizer) -> bool:
    """Switch an Adam / AdamW optimizer to torch's fused kernel if no implementation was chosen.

    The update rule is the same (Adam / AdamW, same hyper-parameters); the fused kernel does it
    in one pass per parameter instead of about ten tensor ops, several times faster for small
    networks on CPU (scBalance's: 0.65 -> 0.26 ms per step). Rounding differs from the for-loop
    implementation in the last bits; results stay deterministic per seed. Left alone: other
    optimizers, an explicit ``foreach``/``fused``/``capturable``/``differentiable`` choice, an
    optimizer that has already stepped, parameters on devices without fused kernels.
    Returns True if switched.
    """
    if type(optimizer) not in _FUSABLE or optimizer.state:
        return False
    groups = optimizer.param_groups
    for g in groups:
        chosen = g.get("foreach") is not None or g.get("fused") is not None
        if chosen or g.get("capturable") or g.get("differentiable"):
            return False
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older / newer torch
        return False
    params = [p for g in groups for p in g["params"]]
    if not params or not all(
        type(p) in (torch.Tensor, nn.Parameter)
        and p.device.type in devices
        and torch.is_floating_point(p)
        for p in params
    ):
        return False
    for g in groups:
        g["fused"] = True
    optimizer.defaults["fused"] = True
    optimizer._step_supports_amp_scaling = True  # as Adam.__init__(fused=True) sets
    return True


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the classes present in ``y_true``."""
    labels = np.unique(y_true)
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Checkpoint:
    """One file holding a training run's state after its last finished epoch.

    Written atomically (temporary name, then rename) every epoch, read with
    ``torch.load(weights_only=True)`` (tensors and plain Python values only, no code runs). A
    run killed mid-epoch resumes after the last saved epoch and, because every epoch's random
    streams are derived from ``(seed, epoch)``, ends with the same weights as a run that was
    never interrupted. ``fingerprint`` (e.g. a hash of the parameters and data shape) guards
    against resuming from another run's file: a mismatch starts afresh with a warning.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str = "") -> None:
        self.path = Path(path)
        self.fingerprint = str(fingerprint)

    def load(self, log: logging.Logger | None = None) -> dict[str, Any] | None:
        """The saved state, or None when there is none (or it belongs to another run)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file: start afresh, never crash
            (log or get_logger()).warning("ignoring unreadable checkpoint %s (%s)", self.path, exc)
            return None
        if state.get("fingerprint") != self.fingerprint:
            (log or get_logger()).warning(
                "ignoring checkpoint %s: it was written by a run with other settings", self.path
            )
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (plus the fingerprint) atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({**state, "fingerprint": self.fingerprint}, tmp)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        """Delete the file (after a run finished and its result was saved)."""
        self.path.unlink(missing_ok=True)


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch seed of one epoch (dropout masks, augmentation draws): a function of both."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(epoch)]).generate_state(1)[0])


def _cpu_state(module_or_opt: Any) -> dict[str, Any]:
    def to_cpu(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().to("cpu", copy=True)
        if isinstance(v, dict):
            return {k: to_cpu(x) for k, x in v.items()}
        if isinstance(v, list):
            return [to_cpu(x) for x in v]
        return v

    return to_cpu(module_or_opt.state_dict())


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
    fused_optimizer: bool = True,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    regularizer: Callable[[], torch.Tensor] | None = None,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` on sparse ``X_train`` with integer labels ``y_train``.

    - ``optimizer``: an optimizer over ``model.parameters()`` or a factory ``params -> optimizer``.
    - ``scheduler``: an LR scheduler, or a factory ``optimizer -> scheduler``; stepped once per
      epoch.
    - ``loss_fn``: defaults to cross-entropy, weighted by ``class_weights`` if given (pass one
      or the other, not both).
    - ``sampler``: callable ``epoch_rng -> index array`` giving the epoch's cells (may repeat);
      default is a uniform shuffle.
    - ``augment``: ``(x_batch, generator) -> x_batch`` applied to training batches only (never
      to validation or prediction); ``generator`` is the epoch's seeded torch generator.
    - ``regularizer``: called after each forward pass, its value is added to the loss (e.g.
      TabNet's sparsity term the model stored during ``forward``).
    - ``checkpoint``: a :class:`Checkpoint` (or a path): state saved after every epoch and
      resumed from at start, so a killed run continues where it stopped with the same result.
    - With validation data, the validation macro F1 and loss are computed every epoch, the
      best state is restored at the end, and training stops after ``patience`` epochs without
      improvement.
    - ``fused_optimizer``: run Adam / AdamW with torch's fused kernel when the optimizer did not
      choose an implementation (see :func:`use_fused_kernel`: same update rule, faster).
    - Batches: see :func:`iterate_minibatches` (chunked densification, same batches). An
      on-disk ``X_train`` (``celltype_bench.data.ondisk.OnDiskCSR``) is read by its
      block-shuffled loader instead: the epoch's cells (sampler draws or permutation) are
      regrouped into buffers of contiguous blocks read sequentially.

    Returns one dict per epoch: epoch, loss, val_macro_f1 and val_loss (None without
    validation), seconds, cells (seen this epoch), cells_per_s, lr. Deterministic on CPU for a
    given seed, with or without an interruption.
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
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint(checkpoint)

    seed_everything(seed)
    model.to(device)
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model.parameters())
    if fused_optimizer:
        use_fused_kernel(optimizer)
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
    first_epoch = 1
    stopped = False
    saved = checkpoint.load(log) if checkpoint is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None and saved.get("scheduler") is not None:
            scheduler.load_state_dict(saved["scheduler"])
        history = list(saved["history"])
        best_f1 = float(saved["best_f1"])
        best_state = saved["best_state"]
        best_epoch = int(saved["best_epoch"])
        since_best = int(saved["since_best"])
        stopped = bool(saved["stopped"])
        first_epoch = int(saved["epoch"]) + 1
        log.info(
            "resuming from checkpoint %s after epoch %d of %d",
            checkpoint.path,
            first_epoch - 1,
            epochs,
        )
    for epoch in range(first_epoch, epochs + 1):
        if stopped:
            break
        t0 = time.perf_counter()
        epoch_rng = np.random.default_rng([int(seed), epoch])
        torch.manual_seed(epoch_seed(seed, epoch))
        gen = torch.Generator(device=device)
        gen.manual_seed(epoch_seed(seed + 1, epoch))
        indices = sampler(epoch_rng) if sampler is not None else epoch_rng.permutation(len(y_train))
        model.train()
        total_loss, seen = 0.0, 0
        if hasattr(X_train, "block_minibatches"):  # on disk: block-shuffled, sequential reads
            batches = X_train.block_minibatches(
                y_train,
                batch_size,
                indices=indices,
                rng=epoch_rng,
                device=device,
                min_batch=min_batch,
            )
        else:
            batches = iterate_minibatches(
                X_train, y_train, batch_size, indices=indices, device=device, min_batch=min_batch
            )
        for xb, yb in batches:
            if augment is not None:
                xb = augment(xb, gen)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            if regularizer is not None:
                loss = loss + regularizer()
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
        val_f1 = val_loss = None
        if has_valid:
            proba = predict_proba_torch(model, X_valid, batch_size=4096, device=device)
            val_f1 = _macro_f1(y_valid, proba.argmax(axis=1))
            picked = proba[np.arange(len(y_valid)), y_valid]
            val_loss = float(-np.log(np.clip(picked, 1e-12, None)).mean())
        seconds = time.perf_counter() - t0
        cells_per_s = seen / train_seconds if train_seconds > 0 else float("nan")
        history.append(
            {
                "epoch": epoch,
                "loss": mean_loss,
                "val_macro_f1": val_f1,
                "val_loss": val_loss,
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
                best_state = _cpu_state(model)
            else:
                since_best += 1
                if patience is not None and since_best >= patience:
                    log.info(
                        "early stopping at epoch %d: no val_macro_f1 gain for %d epochs",
                        epoch,
                        since_best,
                    )
                    stopped = True
        if checkpoint is not None:
            checkpoint.save(
                {
                    "epoch": epoch,
                    "model": _cpu_state(model),
                    "optimizer": _cpu_state(optimizer),
                    "scheduler": None if scheduler is None else scheduler.state_dict(),
                    "history": history,
                    "best_f1": float(best_f1),
                    "best_state": best_state,
                    "best_epoch": best_epoch,
                    "since_best": since_best,
                    "stopped": stopped,
                }
            )
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
    """Softmax class probabilities (cells x classes, float64), in eval mode, batch by batch.

    ``X`` stays sparse; batches of consecutive rows are densified one at a time, each of at
    most ``batch_size`` rows and ``PREDICT_BYTES`` of float32.
    """
    X = as_csr(X)
    batch_size = min(int(batch_size), max(1, PREDICT_BYTES // (4 * max(1, X.shape[1]))))
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
        for xb, _ in iterate_minibatches(X, None, batch_size, device=device, chunk_batches=1):
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
