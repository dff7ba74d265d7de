"""scTab's MLP baseline (Fischer et al. 2024): 8 hidden layers of 128 units, with augmentation.

Network (scTab's released ``cellnet/models.py``, class ``MLP``): ``n_hidden`` (8) blocks of
``Linear -> BatchNorm1d -> SiLU -> Dropout``, the first from the genes to ``hidden_size``
(128), then ``Linear(hidden_size, classes)``. The paper lists only the sizes and the dropout;
the block (batch norm, SiLU) is the released code's. ``activation: relu`` swaps SiLU for ReLU.
Dropout is the paper's 0.1 (the code's class default is 0.2, and its training script does not
pass the paper's value; ``dropout`` sets it).

Training, the paper's table: class-weighted cross-entropy (``n / (k * n_c)``), AdamW (lr
0.002, weight decay 0.05), StepLR gamma 0.9 every epoch, batch 2048, gradient norm clipped at
1.0 (scTab's trainer), the epoch with the best validation macro F1 kept (``patience`` epochs
without gain stop training; scTab ran up to 1,000 epochs and picked the best checkpoint).

Augmentation (``augment``, default True as in the paper): each training cell gets a random
row of the task's augmentation vectors (``FitInputs.augmentation``, from the training cells
only) with a random sign, ``clamp(x + s * v, 0, 9)``
(:func:`celltype_bench.augmentation.apply_augmentation`), in training batches only, never at
validation or prediction. With ``augment`` on but no vectors handed in, the fit warns and
trains without; the saved state records ``augmented`` and the number of vectors.

Balancing switches as :mod:`celltype_bench.methods.linear`: ``class_weighted`` (default True,
the paper's) and ``weighted_sampling`` (default False).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..errors import InputError
from ..training import seed_everything
from .base import TorchMethod
from .registry import register

_ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "relu": nn.ReLU}


class MLPNet(nn.Module):
    """``n_hidden`` x (Linear, BatchNorm1d, activation, Dropout), then a linear classifier."""

    def __init__(
        self,
        n_genes: int,
        n_classes: int,
        hidden_size: int = 128,
        n_hidden: int = 8,
        dropout: float = 0.1,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        act = _ACTIVATIONS[activation]
        blocks: list[nn.Module] = []
        width = n_genes
        for _ in range(n_hidden):
            blocks += [
                nn.Linear(width, hidden_size),
                nn.BatchNorm1d(hidden_size),
                act(),
                nn.Dropout(p=dropout),
            ]
            width = hidden_size
        self.encoder = nn.Sequential(*blocks)
        self.linear = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.encoder(x))


@register("mlp")
class MLP(TorchMethod):
    """scTab's MLP baseline: 8 x 128 hidden units, class-weighted CE, scTab's augmentation."""

    native_balancing = "class_weight"
    supports_ondisk = True  # fit_torch reads on-disk X block by block (augmentation per batch)
    default_params = {
        "hidden_size": 128,
        "n_hidden": 8,
        "dropout": 0.1,
        "activation": "silu",
        "epochs": 50,
        "batch_size": 2048,
        "lr": 0.002,
        "weight_decay": 0.05,
        "gamma": 0.9,
        "grad_clip": 1.0,
        "patience": 10,
        "augment": True,
        "class_weighted": True,
        "weighted_sampling": False,
        "seed": 0,
        "device": "auto",
    }
    nullable_params = frozenset({"patience", "grad_clip"})

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        for key in ("hidden_size", "n_hidden"):
            if p[key] < 1:
                raise InputError(f"parameter '{key}' of method 'mlp' must be >= 1", field=key)
        if not 0.0 <= p["dropout"] < 1.0:
            raise InputError(
                f"parameter 'dropout' of method 'mlp' must be in [0, 1), got {p['dropout']}",
                field="dropout",
            )
        if p["activation"] not in _ACTIVATIONS:
            raise InputError(
                f"unknown activation '{p['activation']}' for method 'mlp'",
                field="activation",
                fix="use one of: " + ", ".join(_ACTIVATIONS),
            )
        self.class_weights_: np.ndarray | None = None
        self.augmented_: bool = False
        self.n_augmentation_vectors_: int | None = None

    def _build_module(self, n_genes: int, n_classes: int) -> nn.Module:
        p = self.params
        return MLPNet(
            n_genes,
            n_classes,
            hidden_size=p["hidden_size"],
            n_hidden=p["n_hidden"],
            dropout=p["dropout"],
            activation=p["activation"],
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
        module = self._build_module(X.shape[1], len(self.classes_))
        self.history_ = self._fit_adamw_steplr(
            module, X, y, X_valid, y_valid, grad_clip=p["grad_clip"], augment=self._augmenter()
        )
        self.module_ = module

    def _state(self) -> dict[str, Any]:
        cw = None if self.class_weights_ is None else self.class_weights_.tolist()
        return {
            "class_weights": cw,
            "augmented": self.augmented_,
            "n_augmentation_vectors": self.n_augmentation_vectors_,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        cw = state.get("class_weights")
        self.class_weights_ = None if cw is None else np.asarray(cw, dtype=np.float64)
        self.augmented_ = bool(state.get("augmented", False))
        self.n_augmentation_vectors_ = state.get("n_augmentation_vectors")
