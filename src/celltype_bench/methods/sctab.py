"""scTab (Fischer et al. 2024): TabNet with one decision step and 1.5-entmax attention.

Model (:class:`celltype_bench.methods.tabnet.TabNet`): input BatchNorm on log1p(CP10k), a
feature transformer (3 shared + 5 step-specific GLU layers, ghost batch norm over virtual
batches of 256), an attentive transformer giving a sparse feature mask (1.5-entmax), one
decision step ``M * x -> feature transformer -> ReLU(d)`` and a linear layer to the classes.

Training, with the paper's hyper-parameters as defaults: class-weighted cross-entropy (weights
``n_samples / (n_classes * n_c)``) plus ``lambda_sparse`` (1e-5) times the mask entropy,
AdamW (lr 0.005, weight decay 0.05), StepLR gamma 0.9 every epoch, batch 2048, gradient norm
clipped at 1.0, the epoch with the best validation macro F1 kept. The paper trains about 50
epochs on 15 million cells with early stopping on validation macro F1; the default here is
``epochs=50`` (StepLR has then decayed the learning rate 190-fold) with ``patience=10``.

Augmentation (``augment``, default True as in the paper): every training cell gets a random
augmentation vector (a row of the task's vectors, ``FitInputs.augmentation``, drawn uniformly)
with a random sign, and ``x + v`` is clamped to [0, 9]
(:func:`celltype_bench.augmentation.apply_augmentation`, with the epoch's seeded generator of
the shared training loop); never at validation or prediction. Without vectors (e.g. the
method used outside the workflow) the fit warns once and trains without; the saved state
records ``augmented``.

Model size (scTab Fig. 2f, 1.7 to 16.2 million parameters): set by the widths ``n_d`` (decision
output) and ``n_a`` (attention embedding); the count is about linear in ``n_d + n_a`` (the
first shared layer, ``genes x 2(n_d + n_a)``, and the attention layer, ``n_a x genes``,
dominate). After a fit ``n_parameters_`` holds the trainable parameters (shared weights
counted once; saved in the state and read by the workflow's run record), and
:meth:`ScTab.count_parameters` gives it for any widths without fitting.

Interpretation: :meth:`ScTab.class_masks` (mean attention mask per class) and
:meth:`ScTab.top_genes` (the genes each class attends to most).

Balancing switches as :mod:`celltype_bench.methods.linear`: ``class_weighted`` (default True,
the paper's) and ``weighted_sampling`` (default False).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from ..errors import InputError
from ..training import (
    PREDICT_BYTES,
    as_csr,
    iterate_minibatches,
    seed_everything,
)
from .base import TorchMethod, _check_var_names
from .registry import register
from .tabnet import TabNet


@contextlib.contextmanager
def _no_uninitialized_fill() -> Iterator[None]:
    """Skip torch's NaN-filling of fresh tensors while training (restored afterwards).

    ``seed_everything`` turns on deterministic algorithms, which by default also fill every
    ``torch.empty`` with NaN (``torch.utils.deterministic.fill_uninitialized_memory``), a guard
    against kernels that read memory before writing it. TabNet's kernels (batch norm, GLU,
    matrix products) write all of their outputs; the fill costs about 6% of a training step.
    """
    import torch.utils.deterministic as det

    before = det.fill_uninitialized_memory
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        det.fill_uninitialized_memory = before


@register("sctab")
class ScTab(TorchMethod):
    """scTab: TabNet with one decision step, entmax attention and scTab's augmentation."""

    native_balancing = "class_weight"
    supports_ondisk = True  # fit_torch reads on-disk X block by block (augmentation per batch)
    default_params = {
        "n_d": 128,
        "n_a": 64,
        "n_steps": 1,
        "n_shared": 3,
        "n_independent": 5,
        "virtual_batch_size": 256,
        "momentum": 0.02,
        "input_momentum": 0.01,
        "relaxation": 1.3,
        "lambda_sparse": 1e-5,
        "epochs": 50,
        "batch_size": 2048,
        "lr": 0.005,
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
        for key in ("n_d", "n_a", "n_steps", "virtual_batch_size"):
            if p[key] < 1:
                raise InputError(f"parameter '{key}' of method 'sctab' must be >= 1", field=key)
        for key in ("n_shared", "n_independent", "lambda_sparse"):
            if p[key] < 0:
                raise InputError(f"parameter '{key}' of method 'sctab' must be >= 0", field=key)
        if p["n_shared"] + p["n_independent"] == 0:
            raise InputError(
                "method 'sctab' needs at least one GLU layer",
                field="n_shared",
                fix="set n_shared or n_independent >= 1 (the paper: 3 and 5)",
            )
        for key in ("momentum", "input_momentum"):
            if not 0.0 < p[key] <= 1.0:
                raise InputError(
                    f"parameter '{key}' of method 'sctab' must be in (0, 1]", field=key
                )
        self.class_weights_: np.ndarray | None = None
        self.augmented_: bool = False
        self.n_augmentation_vectors_: int | None = None
        self.n_parameters_: int | None = None

    @classmethod
    def count_parameters(cls, n_genes: int, n_classes: int, **params: Any) -> int:
        """Trainable parameters of the network for ``n_genes`` x ``n_classes`` with these
        parameters (defaults filled in), without fitting (built on torch's meta device: no
        memory, no initialisation). Equals ``n_parameters_`` after a fit on such data; e.g.
        to choose widths for the model-size curve (scTab Fig. 2f: 1.7 to 16.2 million)."""
        with torch.device("meta"):
            module = cls(**params)._build_module(int(n_genes), int(n_classes))
        assert isinstance(module, TabNet)
        return module.n_parameters()

    def _build_module(self, n_genes: int, n_classes: int) -> nn.Module:
        p = self.params
        return TabNet(
            n_genes,
            n_classes,
            n_d=p["n_d"],
            n_a=p["n_a"],
            n_steps=p["n_steps"],
            n_shared=p["n_shared"],
            n_independent=p["n_independent"],
            virtual_batch_size=p["virtual_batch_size"],
            momentum=p["momentum"],
            input_momentum=p["input_momentum"],
            relaxation=p["relaxation"],
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
        lam = float(p["lambda_sparse"])
        regularizer = (lambda: lam * module.last_sparsity_loss) if lam > 0 else None
        self.n_parameters_ = module.n_parameters()
        self.logger.info(
            "sctab: n_d %d, n_a %d: %d trainable parameters", p["n_d"], p["n_a"], self.n_parameters_
        )
        with _no_uninitialized_fill():
            self.history_ = self._fit_adamw_steplr(
                module,
                X,
                y,
                X_valid,
                y_valid,
                augment=self._augmenter(),
                regularizer=regularizer,
                grad_clip=p["grad_clip"] or None,
            )
        self.module_ = module

    def _predict_proba(self, X: sp.csr_matrix) -> np.ndarray:
        with _no_uninitialized_fill():
            return super()._predict_proba(X)

    # ------------------------------------------------------------------ interpretation
    def _mask_sums(
        self, adata: ad.AnnData, use_labels: bool | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-class sums of the attention masks and cell counts, over ``adata``'s cells."""
        self._require_fitted()
        _check_var_names(self.var_names_, adata, "interpreted")
        assert isinstance(self.module_, TabNet)
        module = self.module_
        if use_labels is None:
            use_labels = self.label_key in adata.obs.columns
        code = {c: i for i, c in enumerate(self.classes_)}
        groups = None
        if use_labels:
            labels = adata.obs[self.label_key].astype(str).to_numpy()
            groups = torch.as_tensor([code.get(c, -1) for c in labels], dtype=torch.int64)
        k, g = len(self.classes_), len(self.var_names_)
        device = self.device
        sums = torch.zeros(k, g, dtype=torch.float64, device=device)
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        X = as_csr(adata.X)
        batch = max(1, min(self.predict_batch_size, PREDICT_BYTES // (4 * max(1, g))))
        was_training = module.training
        module.to(device).eval()
        start = 0
        try:
            with torch.no_grad():
                for xb, _ in iterate_minibatches(X, None, batch, device=device, chunk_batches=1):
                    logits, masks = module.forward_masks(xb)
                    m = masks[0] if len(masks) == 1 else torch.stack(masks).mean(0)
                    if groups is None:
                        gb = logits.argmax(dim=1)
                    else:
                        gb = groups[start : start + len(xb)].to(device)
                    start += len(xb)
                    keep = gb >= 0
                    sums.index_add_(0, gb[keep], m[keep].double())
                    counts.index_add_(0, gb[keep], torch.ones_like(gb[keep], dtype=torch.float64))
        finally:
            module.train(was_training)
        return sums.cpu().numpy(), counts.cpu().numpy()

    def class_masks(self, adata: ad.AnnData, use_labels: bool | None = None) -> pd.DataFrame:
        """Mean attention mask per class (classes x genes; each row sums to 1).

        Cells are grouped by their label (``obs[label_key]``, when present; cells of classes
        unknown to the model are skipped) or else by the predicted class
        (``use_labels=False`` forces predictions). Classes without cells are left out.
        """
        sums, counts = self._mask_sums(adata, use_labels)
        has = counts > 0
        mean = sums[has] / counts[has, None]
        index = pd.Index(np.asarray(self.classes_, dtype=object)[has], name="class")
        return pd.DataFrame(mean, index=index, columns=pd.Index(self.var_names_, name="gene"))

    def top_genes(
        self, adata: ad.AnnData, n: int = 10, use_labels: bool | None = None
    ) -> pd.DataFrame:
        """The ``n`` genes with the largest mean attention per class (classes x ranks 1..n)."""
        masks = self.class_masks(adata, use_labels)
        n = max(1, min(int(n), masks.shape[1]))
        order = np.argsort(-masks.to_numpy(), axis=1, kind="stable")[:, :n]
        genes = np.asarray(masks.columns, dtype=object)[order]
        return pd.DataFrame(genes, index=masks.index, columns=pd.RangeIndex(1, n + 1, name="rank"))

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        cw = None if self.class_weights_ is None else self.class_weights_.tolist()
        return {
            "class_weights": cw,
            "augmented": bool(self.augmented_),
            "n_augmentation_vectors": self.n_augmentation_vectors_,
            "n_parameters": self.n_parameters_,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        cw = state.get("class_weights")
        self.class_weights_ = None if cw is None else np.asarray(cw, dtype=np.float64)
        self.augmented_ = bool(state.get("augmented", False))
        n_vec = state.get("n_augmentation_vectors")
        self.n_augmentation_vectors_ = None if n_vec is None else int(n_vec)
        n_par = state.get("n_parameters")
        self.n_parameters_ = None if n_par is None else int(n_par)

    def _load_weights(self, path: Path) -> None:
        super()._load_weights(path)
        if self.n_parameters_ is None and isinstance(self.module_, TabNet):  # older saves
            self.n_parameters_ = self.module_.n_parameters()
