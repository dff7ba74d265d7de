"""scTab's linear baseline: one ``nn.Linear(genes, classes)`` on log1p(CP10k).

Class-weighted cross-entropy with weights ``n_samples / (n_classes * n_c)`` (scTab), AdamW
(lr 5e-4, weight decay 0.01), batch 2048, StepLR gamma 0.9 per epoch, best checkpoint by
validation macro F1 with early stopping (``patience``).

Balancing switches (``celltype_bench.balancing.configure`` sets them per strategy):
``class_weighted`` (default True, scTab's setting) and ``weighted_sampling`` (default False:
scBalance's sampler, each epoch drawn with replacement with cell probability 1/(class size)).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..balancing import class_weights, epoch_indices
from ..training import fit_torch, seed_everything
from .base import TorchMethod
from .registry import register


def balanced_class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """scTab's class weights ``n_samples / (n_classes * n_c)`` (0 for a class with no cells)."""
    return class_weights(y, n_classes)


@register("linear")
class Linear(TorchMethod):
    """Linear classifier trained with class-weighted cross-entropy."""

    native_balancing = "class_weight"
    supports_ondisk = True  # fit_torch reads on-disk X block by block
    default_params = {
        "epochs": 20,
        "batch_size": 2048,
        "lr": 5e-4,
        "weight_decay": 0.01,
        "gamma": 0.9,
        "patience": 5,
        "class_weighted": True,
        "weighted_sampling": False,
        "seed": 0,
        "device": "auto",
    }
    nullable_params = frozenset({"patience"})

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.class_weights_: np.ndarray | None = None

    def _build_module(self, n_genes: int, n_classes: int) -> nn.Module:
        return nn.Linear(n_genes, n_classes)

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
        k = len(self.classes_)
        self.class_weights_ = balanced_class_weights(y, k) if p["class_weighted"] else np.ones(k)
        sampler = (lambda rng: epoch_indices(y, rng)) if p["weighted_sampling"] else None
        self.history_ = fit_torch(
            module,
            X,
            y,
            X_valid=X_valid,
            y_valid=y_valid,
            optimizer=lambda params: torch.optim.AdamW(
                params, lr=p["lr"], weight_decay=p["weight_decay"]
            ),
            scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(
                opt, step_size=1, gamma=p["gamma"]
            ),
            class_weights=self.class_weights_,
            sampler=sampler,
            epochs=p["epochs"],
            batch_size=p["batch_size"],
            patience=p["patience"],
            device=self.device,
            seed=p["seed"],
            logger=self.logger,
            checkpoint=self.checkpoint(X),
        )
        self.module_ = module

    def _state(self) -> dict[str, Any]:
        cw = None if self.class_weights_ is None else self.class_weights_.tolist()
        return {"class_weights": cw}

    def _set_state(self, state: dict[str, Any]) -> None:
        cw = state.get("class_weights")
        self.class_weights_ = None if cw is None else np.asarray(cw, dtype=np.float64)
