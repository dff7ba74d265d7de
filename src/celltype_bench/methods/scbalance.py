"""scBalance (Cheng et al. 2023, Commun Biol 6:545), reimplemented from the paper.

- Adaptive weighted sampling: each training cell has weight 1/(size of its class); every epoch
  draws as many cells as the training set has, WITH replacement, by these weights, so each
  class makes up about 1/k of an epoch. The loss is plain (unweighted) cross-entropy.
- Network: genes -> 128 -> 64 -> 32 -> classes; each hidden layer is Linear, BatchNorm1d,
  ELU, Dropout(0.5). Dropout is off at prediction (eval mode).
- Adam lr 0.005, batch 128, 20 epochs. Input: log1p(CP10k) ``X``.

``weighted_sampling=False`` replaces the sampler by uniform shuffling (ablation);
``class_weighted=True`` weights the cross-entropy by ``n / (k * n_c)`` (off in the paper).
``celltype_bench.balancing.configure`` sets both per balancing strategy. With a
validation set the shared loop also keeps the epoch with the best validation macro F1 (no early
stopping), the benchmark's common model-selection protocol.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..balancing import class_balanced_weights, class_weights, epoch_indices
from ..training import fit_torch, seed_everything
from .base import TorchMethod
from .registry import register

__all__ = ["MaskDropout", "ScBalance", "ScBalanceNet", "class_balanced_weights", "epoch_indices"]

HIDDEN = (128, 64, 32)
DROPOUT = 0.5


class MaskDropout(nn.Module):
    """Inverted dropout (as ``nn.Dropout``): zero each unit with probability ``p`` in training,
    scale the rest by 1/(1-p); identity in eval mode.

    Same distribution as ``nn.Dropout``; the mask is drawn with ``rand_like`` + compare,
    about 10% faster per scBalance training step on CPU than ``nn.Dropout``'s Bernoulli draw
    (400 steps, batch 128, 765 genes, 1 thread: 0.83 s vs 0.94 s).
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * ((torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p)))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ScBalanceNet(nn.Sequential):
    """input -> 128 -> 64 -> 32 -> classes; hidden blocks Linear, BatchNorm1d, ELU, Dropout."""

    def __init__(
        self,
        n_genes: int,
        n_classes: int,
        hidden: tuple[int, ...] = HIDDEN,
        dropout: float = DROPOUT,
    ) -> None:
        layers: list[nn.Module] = []
        width = n_genes
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ELU(), MaskDropout(dropout)]
            width = h
        layers.append(nn.Linear(width, n_classes))
        super().__init__(*layers)


@register("scbalance")
class ScBalance(TorchMethod):
    """scBalance: weighted random sampling + a 3-hidden-layer dropout network."""

    native_balancing = "weighted_sampling"
    supports_ondisk = True  # fit_torch reads on-disk X block by block
    default_params = {
        "epochs": 20,
        "batch_size": 128,
        "lr": 0.005,
        "weighted_sampling": True,
        "class_weighted": False,
        "seed": 0,
        "device": "auto",
    }

    def _build_module(self, n_genes: int, n_classes: int) -> nn.Module:
        return ScBalanceNet(n_genes, n_classes)

    def _fit(
        self,
        X: sp.csr_matrix,
        y: np.ndarray,
        X_valid: sp.csr_matrix | None,
        y_valid: np.ndarray | None,
    ) -> None:
        p = self.params
        seed_everything(p["seed"])
        module = self._build_module(X.shape[1], len(self.classes_))
        weighted = p["weighted_sampling"]
        weights = class_weights(y, len(self.classes_)) if p["class_weighted"] else None
        self.history_ = fit_torch(
            module,
            X,
            y,
            X_valid=X_valid,
            y_valid=y_valid,
            loss_fn=None if weights is not None else nn.CrossEntropyLoss(),
            class_weights=weights,
            optimizer=lambda params: torch.optim.Adam(params, lr=p["lr"]),
            sampler=lambda rng: epoch_indices(y, rng, weighted=weighted),
            epochs=p["epochs"],
            batch_size=p["batch_size"],
            device=self.device,
            seed=p["seed"],
            logger=self.logger,
            checkpoint=self.checkpoint(X),
        )
        self.module_ = module

    def _state(self) -> dict[str, Any]:
        return {"hidden": list(HIDDEN), "dropout": DROPOUT}
