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
from torch import nn

from ..balancing import class_weights
from ..training import seed_everything
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
        seed_everything(self.params["seed"])
        module = self._build_module(X.shape[1], len(self.classes_))
        self.history_ = self._fit_adamw_steplr(module, X, y, X_valid, y_valid)
        self.module_ = module

    def _state(self) -> dict[str, Any]:
        cw = None if self.class_weights_ is None else self.class_weights_.tolist()
        return {"class_weights": cw}

    def _set_state(self, state: dict[str, Any]) -> None:
        cw = state.get("class_weights")
        self.class_weights_ = None if cw is None else np.asarray(cw, dtype=np.float64)
