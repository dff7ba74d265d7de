"""scPretrain (Zhang et al. 2022, Bioinformatics 38:1607), reimplemented from the paper and
the released code (ruiyi-zhang/scPretrain: ``data.get_pretrain_label``, ``model.mtclf``,
``pretrain.py``, ``finetune.py``, ``rf_svm_lr.py``).

Pre-training (self-supervised, multi-task):

- cells: the unlabeled cells the benchmark hands over (``FitInputs.unlabeled_X``: the query /
  test cells and any extra unlabeled data) PLUS the training cells' expression without their
  labels. scPretrain pre-trains on many unannotated datasets; here the unannotated pool is
  whatever this run may see without labels. Without unlabeled cells the pool is the training
  cells alone (logged). Validation cells are not used;
- datasets: one per value of the ``study`` column (else ``batch``) of the training and
  unlabeled cells' ``obs``, else a single dataset; datasets with fewer than
  ``min_dataset_cells`` cells are pooled into one;
- pseudo-labels per dataset from k-means at three granularities (released code: ``n // 100``,
  ``n // 50`` and ``n // 200 + 1`` clusters, i.e. about 100, 50 and 200 cells per cluster with
  ``avg_cluster_size=100``; each at least 2 and at most ``n``). The code clusters with faiss
  (20 iterations); here sklearn's MiniBatchKMeans (``max_iter=kmeans_max_iter``, seeded), on
  the log1p(CP10k) input;
- model: a shared encoder ``Linear(genes, 200)`` with a sigmoid, one linear head per dataset
  and granularity; loss = sum over datasets and granularities of the cross-entropy. The
  released code passes each head's output through a sigmoid before the cross-entropy
  (``head_sigmoid=True`` keeps that; False gives plain logits);
- optimisation: Adam (lr 1e-4), 50 epochs; every epoch each dataset is cut into
  ``pretrain_batches`` (30, the code's ``batch_num``) batches and step ``s`` trains on batch
  ``s`` of every dataset (more steps if a batch would exceed ``pretrain_max_batch_size``
  cells). Early stopping (patience 5) watches the loss on a held-out ``pretrain_holdout``
  (10%) of each dataset's cells (the code watched the training loss); the best encoder is
  kept.

Fine-tuning (``scpretrain``): the pre-trained encoder + ``Linear(200, 100)``, sigmoid,
``Linear(100, classes)`` (the code's ``clf``), all trained on the labeled training cells with
cross-entropy, Adam lr 0.002, batch 5000, up to 500 epochs, early stopping with patience 30 on
the validation macro F1 (the code: validation accuracy), best epoch kept (the shared
``fit_torch`` loop). ``scpretrain_nopretrain`` is the same network from random initialisation
(the paper's "without pre-training" control, ``uses_unlabeled = False``).

Representation (``scpretrain_lr``, ``scpretrain_rf``, ``scpretrain_svm``): the pre-trained
encoder's output for the training cells feeds scikit-learn's LogisticRegression
(``max_iter=10000``), RandomForestClassifier (10 trees of depth 5) or SVC (linear kernel,
``probability=True``), all seeded, as in ``rf_svm_lr.py``; ``embedding='linear'`` uses the
encoder's pre-activation as that script does, ``'sigmoid'`` the activated code.

Saving without pickle: the encoder (and the fine-tuned network) as torch state dicts loaded
with ``weights_only=True``; logistic regression as its ``coef_`` / ``intercept_`` arrays in
``classifier.npz`` (probabilities recomputed from them exactly as sklearn does); random forest
and SVM are refitted at load from the saved training embedding and labels (npz, loaded with
``allow_pickle=False``), which is deterministic for the same scikit-learn version (their fit is
seeded); the saved probabilities of a few training cells are compared after the refit and a
mismatch is logged. Nothing on load executes stored code (skops is not installed here).

``max_train_cells`` (default null = all) draws a stratified, seeded subset of the labeled cells
for the supervised stage (scPretrain fine-tuned on at most 1,000 labeled cells per dataset);
pre-training always uses all training cells' expression.

Balancing: ``class_weighted`` (class-weighted cross-entropy, ``n / (k n_c)``; sklearn's
``class_weight='balanced'`` for the representation classifiers) and, for the fine-tuned
networks, ``weighted_sampling`` (scBalance's sampler). Off by default, as in scPretrain.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ..balancing import class_weights, epoch_indices
from ..errors import InputError
from ..training import (
    PREDICT_BYTES,
    Checkpoint,
    choose_device,
    densify,
    epoch_seed,
    fit_torch,
    seed_everything,
    use_fused_kernel,
)
from .base import Method, TorchMethod
from .registry import register

__all__ = [
    "PretrainNet",
    "ScPretrain",
    "ScPretrainClassifier",
    "ScPretrainLR",
    "ScPretrainNoPretrain",
    "ScPretrainRF",
    "ScPretrainSVM",
    "cluster_counts",
    "dataset_keys",
    "lr_predict_proba",
    "pretrain_encoder",
    "pseudo_labels",
]

ENCODER_WEIGHTS = "encoder.pt"
CLASSIFIER_FILE = "classifier.npz"
N_CHECK = 32  # training cells whose probabilities are stored to verify a refit at load

PRETRAIN_DEFAULTS: dict[str, Any] = {
    "hidden": 200,
    "avg_cluster_size": 100,
    "pretrain_epochs": 50,
    "pretrain_lr": 1e-4,
    "pretrain_patience": 5,
    "pretrain_holdout": 0.1,
    "pretrain_batches": 30,
    "pretrain_max_batch_size": 4096,
    "head_sigmoid": True,
    "min_dataset_cells": 50,
    "kmeans_max_iter": 20,
}
DATASET_COLUMNS = ("study", "batch")
POOLED = "pooled_small_datasets"


# ---------------------------------------------------------------------------- helpers
def cluster_counts(n_cells: int, avg_cluster_size: int = 100) -> tuple[int, int, int]:
    """Clusters at the three granularities: ``n // a``, ``n // (a // 2)``, ``n // (2 a) + 1``
    (released code), each clipped to ``[min(2, n), n]``."""
    a = int(avg_cluster_size)
    if a < 2:
        raise InputError("avg_cluster_size must be >= 2", field="avg_cluster_size")
    n = int(n_cells)
    raw = (n // a, n // (a // 2), n // (2 * a) + 1)
    lo = min(2, n)
    return tuple(int(min(max(k, lo), n)) for k in raw)  # type: ignore[return-value]


def _column_values(obs: pd.DataFrame | None, column: str, n: int, fallback: str) -> np.ndarray:
    if obs is None or column not in obs.columns or len(obs) != n:
        return np.full(n, fallback, dtype=object)
    s = obs[column]
    out = s.astype(object).to_numpy().copy()
    out[pd.isna(s).to_numpy()] = fallback
    return np.array([str(v) for v in out], dtype=object)


def dataset_keys(
    train_obs: pd.DataFrame | None,
    n_train: int,
    unlabeled_obs: pd.DataFrame | None,
    n_unlabeled: int,
    min_cells: int = 50,
) -> tuple[np.ndarray, list[str], str | None]:
    """Dataset of every pre-training cell (training cells first, then unlabeled cells).

    The key is the first of ``study``, ``batch`` found in either ``obs``; cells without it
    are ``training`` / ``unlabeled``. No key: one dataset. Datasets smaller than
    ``min_cells`` are pooled (when more than one dataset remains). Returns (codes, names,
    column used).
    """
    column = None
    for c in DATASET_COLUMNS:
        in_train = train_obs is not None and c in train_obs.columns
        in_unl = unlabeled_obs is not None and c in unlabeled_obs.columns
        if in_train or in_unl:
            column = c
            break
    if column is None:
        keys = np.full(n_train + n_unlabeled, "all", dtype=object)
    else:
        keys = np.concatenate(
            [
                _column_values(train_obs, column, n_train, "training"),
                _column_values(unlabeled_obs, column, n_unlabeled, "unlabeled"),
            ]
        )
    names, counts = np.unique(keys.astype(str), return_counts=True)
    small = set(names[counts < min_cells].tolist())
    if small and len(names) > 1:
        keys = np.array([POOLED if k in small else k for k in keys.astype(str)], dtype=object)
    names = sorted(set(keys.astype(str).tolist()))
    code = {k: i for i, k in enumerate(names)}
    return np.array([code[k] for k in keys.astype(str)], dtype=np.int64), names, column


def pseudo_labels(
    X: sp.csr_matrix, counts: tuple[int, ...], seed: int, max_iter: int = 20
) -> np.ndarray:
    """k-means cluster labels of the rows of ``X`` at each granularity, shape (n, len(counts)),
    relabelled 0..m-1 (empty clusters dropped); seeded. OpenMP threads are capped at torch's
    thread count (the job's cores)."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    n = X.shape[0]
    out = np.zeros((n, len(counts)), dtype=np.int64)
    for g, k in enumerate(counts):
        if k <= 1 or n <= 1:
            continue
        rs = int(np.random.SeedSequence([int(seed) % 2**32, g]).generate_state(1)[0])
        km = MiniBatchKMeans(
            n_clusters=int(k),
            random_state=rs,
            n_init=3,
            max_iter=int(max_iter),
            batch_size=1024,
        )
        with warnings.catch_warnings(), threadpool_limits(limits=torch.get_num_threads()):
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            lab = km.fit_predict(X)
        _, out[:, g] = np.unique(lab, return_inverse=True)
    return out


class PretrainNet(nn.Module):
    """Shared encoder ``Linear(genes, hidden)`` (+ sigmoid) and one linear head per dataset and
    granularity (``heads[d][g]``), as scPretrain's ``mtclf``."""

    def __init__(
        self,
        n_genes: int,
        hidden: int,
        head_sizes: list[list[int]],
        head_sigmoid: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = nn.Linear(n_genes, hidden)
        self.heads = nn.ModuleList(
            nn.ModuleList(nn.Linear(hidden, int(k)) for k in sizes) for sizes in head_sizes
        )
        self.head_sigmoid = bool(head_sigmoid)

    def head_outputs(self, dataset: int, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of dataset ``dataset``'s heads for input ``x``."""
        h = torch.sigmoid(self.encoder(x))
        outs = [head(h) for head in self.heads[dataset]]
        return [torch.sigmoid(o) for o in outs] if self.head_sigmoid else outs

    def dataset_loss(
        self, dataset: int, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """Sum over granularities of the cross-entropy against pseudo-labels ``y[:, g]``."""
        outs = self.head_outputs(dataset, x)
        return sum(F.cross_entropy(o, y[:, g], reduction=reduction) for g, o in enumerate(outs))  # type: ignore[return-value]


class ScPretrainClassifier(nn.Module):
    """Fine-tuning network: sigmoid(encoder) -> Linear(hidden, head_hidden), sigmoid ->
    Linear(head_hidden, classes) (scPretrain's ``clf``)."""

    def __init__(
        self, n_genes: int, n_classes: int, hidden: int = 200, head_hidden: int = 100
    ) -> None:
        super().__init__()
        self.encoder = nn.Linear(n_genes, hidden)
        self.fc1 = nn.Linear(hidden, head_hidden)
        self.fc2 = nn.Linear(head_hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.encoder(x))
        return self.fc2(torch.sigmoid(self.fc1(h)))


@dataclass
class PretrainResult:
    """What pre-training returns: the best encoder, the full model, labels and history."""

    encoder_state: dict[str, torch.Tensor]
    model: PretrainNet
    labels: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)
    head_sizes: list[list[int]] = field(default_factory=list)
    best_epoch: int = 0


def _cpu_state(obj: Any) -> Any:
    def to_cpu(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().to("cpu", copy=True)
        if isinstance(v, dict):
            return {k: to_cpu(x) for k, x in v.items()}
        if isinstance(v, list):
            return [to_cpu(x) for x in v]
        return v

    return to_cpu(obj.state_dict())


def _in_memory(X: Any) -> sp.csr_matrix:
    if hasattr(X, "read_rows"):
        return sp.csr_matrix(X.read_rows(np.arange(X.shape[0])), dtype=np.float32)
    return sp.csr_matrix(X, dtype=np.float32)


def _rows(X: Any, rows: np.ndarray) -> Any:
    if hasattr(X, "read_rows"):
        return sp.csr_matrix(X.read_rows(rows), dtype=np.float32)
    return X[rows]


def _held_out_loss(
    model: PretrainNet,
    X: sp.csr_matrix,
    held: list[np.ndarray],
    labels: np.ndarray,
    batch: int,
    device: torch.device,
) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for d, rows in enumerate(held):
            if len(rows) == 0:
                continue
            s = 0.0
            for b0 in range(0, len(rows), batch):
                r = rows[b0 : b0 + batch]
                x = densify(X, r, device)
                y = torch.from_numpy(labels[r]).to(device)
                s += float(model.dataset_loss(d, x, y, reduction="sum"))
            total += s / len(rows)
    model.train()
    return total


def pretrain_encoder(
    X: sp.csr_matrix,
    datasets: np.ndarray,
    *,
    hidden: int = 200,
    avg_cluster_size: int = 100,
    epochs: int = 50,
    lr: float = 1e-4,
    patience: int | None = 5,
    holdout: float = 0.1,
    batches: int = 30,
    max_batch_size: int = 4096,
    head_sigmoid: bool = True,
    kmeans_max_iter: int = 20,
    seed: int = 0,
    device: torch.device | str = "cpu",
    logger: Any = None,
    checkpoint: Checkpoint | None = None,
) -> PretrainResult:
    """scPretrain's multi-task pre-training on the rows of ``X`` (``datasets``: code per row).

    Per epoch and seed deterministic; with ``checkpoint`` the state after every epoch is
    saved (pseudo-labels included) and a rerun resumes from it.
    """
    from ..training import get_logger

    log = logger if logger is not None else get_logger()
    device = torch.device(device)
    seed = int(seed)
    seed_everything(seed)
    X = sp.csr_matrix(X, dtype=np.float32)
    n, n_genes = X.shape
    datasets = np.asarray(datasets, dtype=np.int64)
    n_datasets = int(datasets.max()) + 1 if n else 0
    members = [np.flatnonzero(datasets == d) for d in range(n_datasets)]
    saved = checkpoint.load(log) if checkpoint is not None else None
    if saved is not None:
        labels = saved["labels"].numpy().astype(np.int64)
        held_mask = saved["held"].numpy().astype(bool)
    else:
        labels = np.zeros((n, 3), dtype=np.int64)
        for d, rows in enumerate(members):
            counts = cluster_counts(len(rows), avg_cluster_size)
            t0 = time.perf_counter()
            labels[rows] = pseudo_labels(
                X[rows], counts, seed=seed * 1000 + d, max_iter=kmeans_max_iter
            )
            log.info(
                "scPretrain: dataset %d (%d cells): k-means with %s clusters (%.1fs)",
                d,
                len(rows),
                "/".join(map(str, counts)),
                time.perf_counter() - t0,
            )
        held_mask = np.zeros(n, dtype=bool)
        rng = np.random.default_rng([seed, 7])
        for rows in members:
            n_hold = int(round(holdout * len(rows))) if holdout > 0 else 0
            if 0 < n_hold < len(rows):
                held_mask[rng.choice(rows, size=n_hold, replace=False)] = True
    head_sizes = [[int(labels[rows, g].max()) + 1 for g in range(3)] for rows in members]
    model = PretrainNet(n_genes, hidden, head_sizes, head_sigmoid).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    use_fused_kernel(optimizer)
    train_rows = [rows[~held_mask[rows]] for rows in members]
    held_rows = [rows[held_mask[rows]] for rows in members]
    has_held = any(len(r) for r in held_rows)
    largest = max((len(r) for r in train_rows), default=0)
    steps = max(int(batches), -(-largest // int(max_batch_size)))
    eval_batch = max(1, min(int(max_batch_size), PREDICT_BYTES // (4 * max(1, n_genes))))

    history: list[dict[str, Any]] = []
    best = np.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = 0
    since_best = 0
    stopped = False
    first = 1
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history = list(saved["history"])
        best = float(saved["best"])
        best_state = saved["best_state"]
        best_epoch = int(saved["best_epoch"])
        since_best = int(saved["since_best"])
        stopped = bool(saved["stopped"])
        first = int(saved["epoch"]) + 1
        log.info("scPretrain: resuming pre-training after epoch %d of %d", first - 1, epochs)
    for epoch in range(first, int(epochs) + 1):
        if stopped:
            break
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, epoch, 1])
        torch.manual_seed(epoch_seed(seed, epoch))
        parts = [np.array_split(rng.permutation(r), steps) for r in train_rows]
        model.train()
        total, n_steps, seen = 0.0, 0, 0
        for s in range(steps):
            loss = None
            for d in range(n_datasets):
                rows = parts[d][s]
                if len(rows) == 0:
                    continue
                x = densify(X, rows, device)
                y = torch.from_numpy(labels[rows]).to(device)
                term = model.dataset_loss(d, x, y)
                loss = term if loss is None else loss + term
                seen += len(rows)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            n_steps += 1
        train_loss = total / max(n_steps, 1)
        held_loss = (
            _held_out_loss(model, X, held_rows, labels, eval_batch, device) if has_held else None
        )
        monitor = held_loss if held_loss is not None else train_loss
        if monitor < best:
            best, best_epoch, since_best = monitor, epoch, 0
            best_state = _cpu_state(model)
        else:
            since_best += 1
            if patience is not None and since_best >= patience:
                stopped = True
        seconds = time.perf_counter() - t0
        history.append(
            {
                "epoch": epoch,
                "loss": train_loss,
                "held_out_loss": held_loss,
                "seconds": seconds,
                "cells": seen,
            }
        )
        log.info(
            "scPretrain pre-training epoch %d/%d loss %.4f%s%s",
            epoch,
            epochs,
            train_loss,
            "" if held_loss is None else f" held-out {held_loss:.4f}",
            " (early stop)" if stopped else "",
        )
        if checkpoint is not None:
            checkpoint.save(
                {
                    "epoch": epoch,
                    "model": _cpu_state(model),
                    "optimizer": _cpu_state(optimizer),
                    "history": history,
                    "best": float(best),
                    "best_state": best_state,
                    "best_epoch": best_epoch,
                    "since_best": since_best,
                    "stopped": stopped,
                    "labels": torch.from_numpy(labels),
                    "held": torch.from_numpy(held_mask),
                }
            )
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    encoder_state = {k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()}
    return PretrainResult(
        encoder_state=encoder_state,
        model=model,
        labels=labels,
        history=history,
        head_sizes=head_sizes,
        best_epoch=best_epoch,
    )


def stratified_subsample(
    y: np.ndarray, max_cells: int | None, rng: np.random.Generator
) -> np.ndarray:
    """Sorted row indices of at most about ``max_cells`` cells, classes in proportion, every
    class kept (at least one cell). All rows when ``max_cells`` is None or not smaller."""
    n = len(y)
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    keep = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        quota = max(1, int(len(rows) * max_cells / n))
        keep.append(rng.choice(rows, size=min(quota, len(rows)), replace=False))
    return np.sort(np.concatenate(keep))


def lr_predict_proba(coef: np.ndarray, intercept: np.ndarray, E: np.ndarray) -> np.ndarray:
    """LogisticRegression probabilities from its arrays: logistic for one coefficient row
    (binary), softmax otherwise (multinomial), as sklearn computes them."""
    z = np.asarray(E, dtype=np.float64) @ np.asarray(coef, dtype=np.float64).T + intercept
    if z.shape[1] == 1:
        p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return np.column_stack([1.0 - p1, p1])
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------- methods
class _Pretraining:
    """Mixin: keeps the training cells' dataset columns and runs pre-training."""

    params: dict[str, Any]
    fit_inputs_: Any
    logger: Any
    name: str

    def _init_pretraining(self) -> None:
        self._train_obs: pd.DataFrame | None = None
        self.pretrain_info_: dict[str, Any] = {}
        self.pretrain_history_: list[dict[str, Any]] = []
        self.pretrain_model_: PretrainNet | None = None
        self.pretrained_encoder_: dict[str, torch.Tensor] | None = None

    def fit(
        self,
        train: ad.AnnData,
        valid: ad.AnnData | None = None,
        label_key: str = "cell_type",
        **kwargs: Any,
    ) -> Self:
        """As :meth:`Method.fit`; keeps the training cells' ``study`` / ``batch`` columns
        (dataset keys for pre-training; never a label column)."""
        cols = [c for c in DATASET_COLUMNS if c in train.obs.columns]
        self._train_obs = train.obs[cols].copy() if cols else None
        return super().fit(train, valid, label_key, **kwargs)  # type: ignore[misc]

    def _pretrain(self, X: Any, device: torch.device) -> dict[str, torch.Tensor]:
        p = self.params
        inputs = self.fit_inputs_
        U = inputs.unlabeled_X
        n_u = 0 if U is None else int(U.shape[0])
        if n_u == 0:
            self.logger.warning(
                "%s: no unlabeled cells were given: pre-training on the training cells' "
                "expression only",
                self.name,
            )
        parts = [_in_memory(X)] + ([_in_memory(U)] if n_u else [])
        X_pre = sp.vstack(parts, format="csr", dtype=np.float32)
        codes, names, column = dataset_keys(
            self._train_obs,
            X.shape[0],
            inputs.unlabeled_obs if n_u else None,
            n_u,
            p["min_dataset_cells"],
        )
        keys = [k for k in PRETRAIN_DEFAULTS if k in p] + ["seed"]
        checkpoint = None
        if inputs.checkpoint_dir is not None:
            checkpoint = Checkpoint(
                Path(inputs.checkpoint_dir) / "pretrain.pt",
                _fingerprint(
                    self.name,
                    {k: p[k] for k in keys},
                    list(X_pre.shape),
                    np.bincount(codes).tolist(),
                ),
            )
        self.logger.info(
            "%s: pre-training on %d cells (%d training + %d unlabeled), %d dataset(s) by %s",
            self.name,
            X_pre.shape[0],
            X.shape[0],
            n_u,
            len(names),
            column or "none (one dataset)",
        )
        result = pretrain_encoder(
            X_pre,
            codes,
            hidden=p["hidden"],
            avg_cluster_size=p["avg_cluster_size"],
            epochs=p["pretrain_epochs"],
            lr=p["pretrain_lr"],
            patience=p["pretrain_patience"],
            holdout=p["pretrain_holdout"],
            batches=p["pretrain_batches"],
            max_batch_size=p["pretrain_max_batch_size"],
            head_sigmoid=p["head_sigmoid"],
            kmeans_max_iter=p["kmeans_max_iter"],
            seed=p["seed"],
            device=device,
            logger=self.logger,
            checkpoint=checkpoint,
        )
        self.pretrain_model_ = result.model
        self.pretrain_history_ = result.history
        self.pretrained_encoder_ = result.encoder_state
        self.pretrain_info_ = {
            "n_cells": int(X_pre.shape[0]),
            "n_training_cells": int(X.shape[0]),
            "n_unlabeled_cells": n_u,
            "dataset_column": column,
            "datasets": names,
            "dataset_sizes": np.bincount(codes, minlength=len(names)).tolist(),
            "clusters": result.head_sizes,
            "best_epoch": result.best_epoch,
        }
        return result.encoder_state

    def _pretrain_state(self) -> dict[str, Any]:
        return {"pretrain": self.pretrain_info_, "pretrain_history": self.pretrain_history_}

    def _set_pretrain_state(self, state: dict[str, Any]) -> None:
        self.pretrain_info_ = dict(state.get("pretrain") or {})
        self.pretrain_history_ = list(state.get("pretrain_history") or [])

    def _validate_pretrain_params(self) -> None:
        p = self.params
        if "pretrain_holdout" in p and not 0.0 <= p["pretrain_holdout"] < 1.0:
            raise InputError(
                f"pretrain_holdout must be in [0, 1), got {p['pretrain_holdout']}",
                field="pretrain_holdout",
            )
        for key in ("avg_cluster_size",):
            if key in p and p[key] < 2:
                raise InputError(f"{key} must be >= 2, got {p[key]}", field=key)
        for key in ("hidden", "pretrain_epochs", "pretrain_batches", "pretrain_max_batch_size"):
            if key in p and p[key] < 1:
                raise InputError(f"{key} must be >= 1, got {p[key]}", field=key)
        mtc = p.get("max_train_cells")
        if mtc is not None and (isinstance(mtc, bool) or not isinstance(mtc, int) or mtc < 2):
            raise InputError(
                f"max_train_cells must be a whole number >= 2 or null, got {mtc!r}",
                field="max_train_cells",
            )


@register("scpretrain")
class ScPretrain(_Pretraining, TorchMethod):
    """scPretrain: multi-task k-means pre-training, then fine-tuning on the labeled cells."""

    uses_unlabeled = True
    # the same network from random initialisation (celltype_bench.unlabeled_gain pairs them)
    supervised_control: ClassVar[str | None] = "scpretrain_nopretrain"
    native_balancing = "none"
    pretrained: ClassVar[bool] = True
    default_params: ClassVar[dict[str, Any]] = {
        **PRETRAIN_DEFAULTS,
        "head_hidden": 100,
        "epochs": 500,
        "lr": 0.002,
        "batch_size": 5000,
        "patience": 30,
        "max_train_cells": None,
        "class_weighted": False,
        "weighted_sampling": False,
        "seed": 0,
        "device": "auto",
    }
    nullable_params = frozenset({"patience", "pretrain_patience", "max_train_cells"})

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._init_pretraining()
        self._validate_pretrain_params()

    def _build_module(self, n_genes: int, n_classes: int) -> nn.Module:
        return ScPretrainClassifier(
            n_genes, n_classes, hidden=self.params["hidden"], head_hidden=self.params["head_hidden"]
        )

    def _fit(
        self,
        X: sp.csr_matrix,
        y: np.ndarray,
        X_valid: sp.csr_matrix | None,
        y_valid: np.ndarray | None,
    ) -> None:
        p = self.params
        seed_everything(p["seed"])
        device = self.device
        module = self._build_module(X.shape[1], len(self.classes_))
        if self.pretrained:
            encoder = self._pretrain(X, device)
            module.encoder.load_state_dict(encoder)
            self.logger.info("%s: fine-tuning from the pre-trained encoder", self.name)
        rows = stratified_subsample(y, p["max_train_cells"], np.random.default_rng([p["seed"], 3]))
        X_ft, y_ft = (X, y) if len(rows) == len(y) else (_rows(X, rows), y[rows])
        if len(rows) < len(y):
            self.logger.info(
                "%s: fine-tuning on %d of %d labeled cells", self.name, len(rows), len(y)
            )
        k = len(self.classes_)
        weights = class_weights(y_ft, k) if p["class_weighted"] else None
        sampler = (lambda rng: epoch_indices(y_ft, rng)) if p["weighted_sampling"] else None
        ck = self.checkpoint(X)
        if ck is not None:
            ck = Checkpoint(ck.path, _fingerprint(ck.fingerprint, self.pretrain_info_))
        self.history_ = fit_torch(
            module,
            X_ft,
            y_ft,
            X_valid=X_valid,
            y_valid=y_valid,
            loss_fn=None if weights is not None else nn.CrossEntropyLoss(),
            class_weights=weights,
            optimizer=lambda params: torch.optim.Adam(params, lr=p["lr"]),
            sampler=sampler,
            epochs=p["epochs"],
            batch_size=p["batch_size"],
            patience=p["patience"],
            device=device,
            seed=p["seed"],
            logger=self.logger,
            checkpoint=ck,
        )
        self.module_ = module

    def _state(self) -> dict[str, Any]:
        return {
            "architecture": {
                "encoder": self.params["hidden"],
                "head_hidden": self.params["head_hidden"],
            },
            "pretrained": self.pretrained,
            **self._pretrain_state(),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._set_pretrain_state(state)


@register("scpretrain_nopretrain")
class ScPretrainNoPretrain(ScPretrain):
    """scPretrain's fine-tuning network from random initialisation (no pre-training)."""

    uses_unlabeled = False
    supervised_control = None
    pretrained = False
    default_params: ClassVar[dict[str, Any]] = {
        k: v
        for k, v in ScPretrain.default_params.items()
        if k == "hidden" or k not in PRETRAIN_DEFAULTS
    }
    nullable_params = frozenset({"patience", "max_train_cells"})


class _ScPretrainRepresentation(_Pretraining, Method):
    """The pre-trained embedding feeding a scikit-learn classifier."""

    uses_unlabeled = True
    # no registered method fits the same classifier on the raw expression: no pair
    supervised_control: ClassVar[str | None] = None
    native_balancing = "none"
    supported_weightings: ClassVar[frozenset[str]] = frozenset({"class_weight"})
    balancing_params: ClassVar[dict[str, str]] = {"class_weight": "class_weighted"}
    classifier_kind: ClassVar[str] = ""
    base_params: ClassVar[dict[str, Any]] = {
        **PRETRAIN_DEFAULTS,
        "embedding": "linear",
        "max_train_cells": None,
        "class_weighted": False,
        "seed": 0,
        "device": "auto",
    }
    nullable_params = frozenset({"pretrain_patience", "max_train_cells"})

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._init_pretraining()
        self._validate_pretrain_params()
        if self.params["embedding"] not in ("linear", "sigmoid"):
            raise InputError(
                f"unknown embedding '{self.params['embedding']}'",
                field="embedding",
                fix="use 'linear' (encoder pre-activation, as scPretrain's script) or 'sigmoid'",
            )
        self.encoder_: nn.Linear | None = None
        self.classifier_: Any = None
        self.train_embedding_: np.ndarray | None = None
        self.train_labels_: np.ndarray | None = None
        self.check_proba_: np.ndarray | None = None

    @property
    def device(self) -> torch.device:
        """The torch device for the encoder (``device`` parameter)."""
        return choose_device(self.params.get("device", "auto"))

    # ------------------------------------------------------------------ embedding
    def embed(self, X: Any) -> np.ndarray:
        """The pre-trained embedding of the rows of ``X`` (log1p(CP10k)), float32."""
        assert self.encoder_ is not None
        n, g = X.shape
        device = next(self.encoder_.parameters()).device
        batch = max(1, min(4096, PREDICT_BYTES // (4 * max(1, g))))
        out = np.zeros((n, self.encoder_.out_features), dtype=np.float32)
        self.encoder_.eval()
        with torch.no_grad():
            for b0 in range(0, n, batch):
                x = densify(X, slice(b0, min(n, b0 + batch)), device)
                h = self.encoder_(x)
                if self.params["embedding"] == "sigmoid":
                    h = torch.sigmoid(h)
                out[b0 : b0 + len(x)] = h.cpu().numpy()
        return out

    def _make_classifier(self) -> Any:
        """The unfitted scikit-learn classifier for the embedding; each concrete variant
        (``ScPretrainLR``, ``ScPretrainRF``, ``ScPretrainSVM``) supplies its own."""
        raise NotImplementedError(f"{type(self).__name__} must define _make_classifier")

    def _fit_classifier(self, E: np.ndarray, y: np.ndarray) -> Any:
        """Fit a fresh classifier (OpenMP threads capped at torch's thread count).

        scikit-learn 1.9 deprecates ``SVC(probability=True)`` (removal in 1.11) in favour of
        ``CalibratedClassifierCV``; scPretrain used the former, kept while the pin allows."""
        from threadpoolctl import threadpool_limits

        with warnings.catch_warnings(), threadpool_limits(limits=torch.get_num_threads()):
            warnings.filterwarnings("ignore", message=".*probability.*", category=FutureWarning)
            return self._make_classifier().fit(E, y)

    def _classifier_proba(self, E: np.ndarray) -> np.ndarray:
        clf = self.classifier_
        proba = clf.predict_proba(E)
        out = np.zeros((E.shape[0], len(self.classes_)), dtype=np.float64)
        out[:, np.asarray(clf.classes_, dtype=np.int64)] = proba
        return out

    # ------------------------------------------------------------------ fit / predict
    def _fit(
        self,
        X: sp.csr_matrix,
        y: np.ndarray,
        X_valid: sp.csr_matrix | None,
        y_valid: np.ndarray | None,
    ) -> None:
        p = self.params
        seed_everything(p["seed"])
        device = self.device
        encoder_state = self._pretrain(X, device)
        self.encoder_ = nn.Linear(X.shape[1], p["hidden"]).to(device)
        self.encoder_.load_state_dict(encoder_state)
        self.encoder_.eval()
        rows = stratified_subsample(y, p["max_train_cells"], np.random.default_rng([p["seed"], 3]))
        X_fit = X if len(rows) == len(y) else _rows(X, rows)
        y_fit = y[rows]
        E = self.embed(X_fit)
        t0 = time.perf_counter()
        self.classifier_ = self._fit_classifier(E, y_fit)
        self.train_embedding_ = E
        self.train_labels_ = y_fit.astype(np.int64)
        self.check_proba_ = self._classifier_proba(E[:N_CHECK])
        fit_s = time.perf_counter() - t0
        info = f"{self.classifier_kind} fitted on {len(y_fit)} embedded cells in {fit_s:.2f}s"
        if y_valid is not None and X_valid is not None:
            acc = float(np.mean(self._predict_proba(X_valid).argmax(axis=1) == y_valid))
            info += f", validation accuracy {acc:.3f}"
        self.logger.info("%s: %s", self.name, info)
        self.history_ = []

    def _predict_proba(self, X: sp.csr_matrix) -> np.ndarray:
        return self._classifier_proba(self.embed(X))

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        return {"classifier": self.classifier_kind, **self._pretrain_state()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._set_pretrain_state(state)

    def _classifier_arrays(self) -> dict[str, np.ndarray]:
        assert self.train_embedding_ is not None and self.train_labels_ is not None
        return {"embedding": self.train_embedding_, "labels": self.train_labels_}

    def _restore_classifier(self, arrays: dict[str, np.ndarray]) -> None:
        """Refit the (seeded, deterministic) classifier on the saved embedding and labels."""
        self.train_embedding_ = arrays["embedding"].astype(np.float32)
        self.train_labels_ = arrays["labels"].astype(np.int64)
        self.classifier_ = self._fit_classifier(self.train_embedding_, self.train_labels_)

    def _save_weights(self, path: Path) -> None:
        assert self.encoder_ is not None and self.check_proba_ is not None
        state = {k: v.detach().cpu() for k, v in self.encoder_.state_dict().items()}
        tmp = path / (ENCODER_WEIGHTS + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path / ENCODER_WEIGHTS)
        arrays = {**self._classifier_arrays(), "check_proba": self.check_proba_}
        tmp = path / ("tmp_" + CLASSIFIER_FILE)
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        tmp.replace(path / CLASSIFIER_FILE)

    def _load_weights(self, path: Path) -> None:
        enc_file, clf_file = path / ENCODER_WEIGHTS, path / CLASSIFIER_FILE
        for f in (enc_file, clf_file):
            if not f.exists():
                raise InputError("saved model file is missing", file=str(f), fix="rerun training")
        state = torch.load(enc_file, map_location="cpu", weights_only=True)
        self.encoder_ = nn.Linear(len(self.var_names_), self.params["hidden"])
        self.encoder_.load_state_dict(state)
        self.encoder_.eval()
        with np.load(clf_file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        self._restore_classifier(arrays)
        self.check_proba_ = arrays["check_proba"]
        if self.train_embedding_ is not None:
            again = self._classifier_proba(self.train_embedding_[:N_CHECK])
            if again.shape != self.check_proba_.shape or not np.allclose(
                again, self.check_proba_, atol=1e-6
            ):
                self.logger.warning(
                    "%s: the classifier refitted at load differs from the saved one (max "
                    "probability difference %.3g; another scikit-learn version?)",
                    self.name,
                    float(np.max(np.abs(again - self.check_proba_)))
                    if again.shape == self.check_proba_.shape
                    else float("nan"),
                )


@register("scpretrain_lr")
class ScPretrainLR(_ScPretrainRepresentation):
    """Logistic regression on the pre-trained embedding (saved as its coefficient arrays)."""

    classifier_kind = "logistic_regression"
    default_params: ClassVar[dict[str, Any]] = {
        **_ScPretrainRepresentation.base_params,
        "max_iter": 10000,
        "C": 1.0,
    }

    def _make_classifier(self) -> Any:
        from sklearn.linear_model import LogisticRegression

        p = self.params
        return LogisticRegression(
            C=p["C"],
            max_iter=p["max_iter"],
            class_weight="balanced" if p["class_weighted"] else None,
            random_state=p["seed"],
        )

    def _classifier_proba(self, E: np.ndarray) -> np.ndarray:
        clf = self.classifier_
        proba = lr_predict_proba(clf.coef_, clf.intercept_, E)
        out = np.zeros((E.shape[0], len(self.classes_)), dtype=np.float64)
        out[:, np.asarray(clf.classes_, dtype=np.int64)] = proba
        return out

    def _classifier_arrays(self) -> dict[str, np.ndarray]:
        clf = self.classifier_
        return {
            "coef": np.asarray(clf.coef_, dtype=np.float64),
            "intercept": np.asarray(clf.intercept_, dtype=np.float64),
            "classes": np.asarray(clf.classes_, dtype=np.int64),
        }

    def _restore_classifier(self, arrays: dict[str, np.ndarray]) -> None:
        """No refit: the arrays are the model."""
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression()
        clf.coef_ = arrays["coef"]
        clf.intercept_ = arrays["intercept"]
        clf.classes_ = arrays["classes"]
        clf.n_features_in_ = int(arrays["coef"].shape[1])
        self.classifier_ = clf
        self.train_embedding_ = None


@register("scpretrain_rf")
class ScPretrainRF(_ScPretrainRepresentation):
    """Random forest on the pre-trained embedding (refitted from the saved embedding at load)."""

    classifier_kind = "random_forest"
    default_params: ClassVar[dict[str, Any]] = {
        **_ScPretrainRepresentation.base_params,
        "n_estimators": 10,
        "max_depth": 5,
    }
    nullable_params = frozenset({"pretrain_patience", "max_train_cells", "max_depth"})

    def _make_classifier(self) -> Any:
        from sklearn.ensemble import RandomForestClassifier

        p = self.params
        return RandomForestClassifier(
            n_estimators=p["n_estimators"],
            max_depth=p["max_depth"],
            class_weight="balanced" if p["class_weighted"] else None,
            random_state=p["seed"],
            n_jobs=1,
        )


@register("scpretrain_svm")
class ScPretrainSVM(_ScPretrainRepresentation):
    """Linear SVM with Platt probabilities on the pre-trained embedding (refitted at load)."""

    classifier_kind = "svm"
    default_params: ClassVar[dict[str, Any]] = {
        **_ScPretrainRepresentation.base_params,
        "kernel": "linear",
        "C": 1.0,
    }

    def _make_classifier(self) -> Any:
        from sklearn.svm import SVC

        p = self.params
        return SVC(
            kernel=p["kernel"],
            C=p["C"],
            probability=True,
            class_weight="balanced" if p["class_weighted"] else None,
            random_state=p["seed"],
        )
