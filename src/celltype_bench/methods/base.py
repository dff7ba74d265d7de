"""The method interface every annotation method implements.

Input convention: ``AnnData`` whose ``.X`` is log1p(CP10k) as scipy CSR float32, labels in
``obs[label_key]``; training, validation and test share ``var_names``.

A saved method is a directory holding ``method.json`` (name, params, classes_, var_names,
small state) plus the weights in the method's own format (``model.pt`` state dict for torch
models, loaded with ``weights_only=True``).
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from .. import __version__
from ..augmentation import apply_augmentation
from ..balancing import class_weights, epoch_indices
from ..errors import InputError
from ..io import write_json
from ..labels import empty_values
from ..training import (
    Checkpoint,
    as_csr,
    choose_device,
    fit_torch,
    get_logger,
    predict_proba_torch,
)

METHOD_JSON = "method.json"
_LABEL_COLUMNS = ("cell_type", "cell_type_ontology_term_id", "cell_type_label")
TORCH_WEIGHTS = "model.pt"
FORMAT_VERSION = 1

# Parameters that must be strictly positive / non-negative when present.
_POSITIVE = {"epochs", "batch_size", "batch_number", "top_genes", "patience", "lr", "alpha"}
_NON_NEGATIVE = {"weight_decay", "grad_clip"}


def _check_param(method: str, key: str, value: Any, default: Any, nullable: bool) -> Any:
    """Check one parameter's type against its default's, coercing int -> float where safe."""
    if value is None:
        if default is None or nullable:
            return None
        raise InputError(
            f"parameter '{key}' of method '{method}' must not be null",
            field=key,
            fix=f"give a value like the default ({default!r}) or leave it out",
        )
    if default is None:
        checked = value
    elif isinstance(default, bool):
        if not isinstance(value, bool | np.bool_):
            raise InputError(
                f"parameter '{key}' of method '{method}' must be true or false, got {value!r}",
                field=key,
                fix="write true or false",
            )
        checked = bool(value)
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InputError(
                f"parameter '{key}' of method '{method}' must be an integer, got {value!r}",
                field=key,
                fix=f"write a whole number like the default ({default})",
            )
        checked = int(value)
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise InputError(
                f"parameter '{key}' of method '{method}' must be a number, got {value!r}",
                field=key,
                fix=f"write a number like the default ({default})",
            )
        checked = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise InputError(
                f"parameter '{key}' of method '{method}' must be a string, got {value!r}",
                field=key,
                fix=f"write a string like the default ('{default}')",
            )
        checked = value
    else:
        checked = value
    if key in _POSITIVE and isinstance(checked, int | float) and checked <= 0:
        raise InputError(
            f"parameter '{key}' of method '{method}' must be > 0, got {checked}", field=key
        )
    if key in _NON_NEGATIVE and isinstance(checked, int | float) and checked < 0:
        raise InputError(
            f"parameter '{key}' of method '{method}' must be >= 0, got {checked}", field=key
        )
    return checked


def read_labels(adata: ad.AnnData, label_key: str, role: str) -> np.ndarray:
    """Labels of ``adata.obs[label_key]`` as a string array; InputError if missing or empty."""
    if adata.n_obs == 0:
        raise InputError(f"the {role} data has no cells", field="obs", fix="check the split")
    if label_key not in adata.obs.columns:
        cols = ", ".join(map(str, list(adata.obs.columns)[:12])) or "none"
        raise InputError(
            f"the {role} data has no label column '{label_key}'",
            field=label_key,
            fix=f"set label_key to one of the obs columns ({cols}) or add obs['{label_key}']",
        )
    s = adata.obs[label_key]
    bad = empty_values(s)
    if bad.any():
        first = adata.obs_names[np.flatnonzero(bad)[0]]
        raise InputError(
            f"{int(bad.sum())} {role} cells have a missing (NaN) or empty label, "
            f"e.g. cell '{first}'",
            field=label_key,
            fix="drop unlabeled cells from the training and validation sets, or fill their labels",
        )
    if isinstance(s.dtype, pd.CategoricalDtype):  # the same strings, one object per category
        return s.cat.categories.astype(str).to_numpy(dtype=object)[s.cat.codes.to_numpy()]
    return s.astype(str).to_numpy()


def _check_var_names(expected: list[str], adata: ad.AnnData, role: str) -> None:
    got = [str(v) for v in adata.var_names]
    if got == expected:
        return
    exp_set, got_set = set(expected), set(got)
    if exp_set == got_set:
        detail = "the same genes in a different order"
    else:
        missing, extra = exp_set - got_set, got_set - exp_set
        detail = (
            f"{len(missing)} training genes missing (e.g. {sorted(missing)[:3]}), "
            f"{len(extra)} extra genes (e.g. {sorted(extra)[:3]})"
        )
    raise InputError(
        f"the {role} data's genes differ from the training genes: {detail}",
        field="var_names",
        fix="align genes to the training data, e.g. adata = adata[:, train.var_names] "
        "(the preprocess step aligns all splits of a dataset)",
    )


def _label_ontology(adata: ad.AnnData, label_key: str) -> dict[str, str]:
    """Label -> Cell Ontology id from ``obs['cell_type_ontology_term_id']`` (if present)."""
    col = "cell_type_ontology_term_id"
    if col not in adata.obs or label_key not in adata.obs:
        return {}
    pairs = adata.obs[[label_key, col]].astype(str).drop_duplicates()
    pairs = pairs[pairs[col].str.startswith("CL:")]
    return dict(zip(pairs[label_key], pairs[col], strict=True))


@dataclass
class FitInputs:
    """What a method receives besides the labelled training (and validation) cells.

    - ``unlabeled_X``: expression of cells whose labels the method must not see (for methods
      with ``uses_unlabeled``: the test cells and any configured extra unlabeled data), CSR on
      the training genes, log1p(CP10k) like ``X``; ``unlabeled_obs`` their non-label
      annotations (``batch``, ``donor_id``, ``study``, ...), never a label column.
    - ``augmentation``: scTab-style augmentation vectors (n_vectors x genes) computed from the
      training cells only (``celltype_bench.augmentation``), for methods that augment.
    - ``checkpoint_dir``: where a method may keep per-epoch checkpoints to resume after a kill.
    """

    unlabeled_X: sp.csr_matrix | None = None
    unlabeled_obs: pd.DataFrame | None = None
    augmentation: np.ndarray | None = None
    checkpoint_dir: Path | None = None


class Method(abc.ABC):
    """Base class of all annotation methods.

    Subclasses set ``default_params`` (every accepted parameter with its default), optionally
    ``native_balancing`` / ``supported_weightings`` / ``balancing_params``, and
    implement ``_fit(X, y, X_valid, y_valid)`` (CSR matrices, integer codes into ``classes_``)
    and ``_predict_proba(X) -> ndarray``; optionally ``_state``/``_set_state`` (small
    JSON-able state) and ``_save_weights``/``_load_weights``.
    """

    name: ClassVar[str] = "method"
    uses_unlabeled: ClassVar[bool] = False
    is_control: ClassVar[bool] = False
    # Class imbalance (celltype_bench.balancing): the method's published setting, the
    # in-training weightings it implements ('class_weight', 'weighted_sampling'), and the
    # boolean parameter that switches each on. Every method also runs with 'none' and with
    # data-level resampling; balancing.configure sets these parameters per strategy.
    native_balancing: ClassVar[str] = "none"
    supported_weightings: ClassVar[frozenset[str]] = frozenset()
    balancing_params: ClassVar[dict[str, str]] = {}
    default_params: ClassVar[dict[str, Any]] = {}
    nullable_params: ClassVar[frozenset[str]] = frozenset()
    # Trains and predicts from an on-disk X (celltype_bench.data.ondisk.OnDiskCSR) without
    # loading it: the train step opens data above the memory budget on disk for such methods.
    supports_ondisk: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = type(self).check_params(params)
        self.classes_: list[str] = []
        self.var_names_: list[str] = []
        self.label_key: str = "cell_type"
        self.history_: list[dict[str, Any]] = []
        self.logger = get_logger()
        self.fit_inputs_ = FitInputs()
        self.label_ontology_: dict[str, str] = {}
        self._fitted = False

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str | None = None) -> dict[str, Any]:
        """All parameters with defaults filled in; InputError for unknown or mistyped ones."""
        accepted = cls.default_params
        try:
            for key in params:
                if key not in accepted:
                    raise InputError(
                        f"unknown parameter '{key}' for method '{cls.name}'",
                        field=key,
                        fix="accepted parameters: " + (", ".join(sorted(accepted)) or "none"),
                    )
            return {
                k: _check_param(cls.name, k, params.get(k, d), d, k in cls.nullable_params)
                for k, d in accepted.items()
            }
        except InputError as exc:
            if where is None:
                raise
            raise InputError(exc.problem, file=where, field=exc.field, fix=exc.fix) from None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ public API
    def fit(
        self,
        train: ad.AnnData,
        valid: ad.AnnData | None = None,
        label_key: str = "cell_type",
        *,
        unlabeled: ad.AnnData | None = None,
        augmentation: np.ndarray | None = None,
        checkpoint_dir: str | Path | None = None,
    ) -> Self:
        """Fit on ``train`` (labels in ``obs[label_key]``); ``valid`` serves model selection.

        ``unlabeled``: cells without labels (only for methods with ``uses_unlabeled``; their
        label column, if any, is dropped before the method sees them). ``augmentation``:
        augmentation vectors (see :class:`FitInputs`). ``checkpoint_dir``: per-epoch
        checkpoints for resuming a killed fit.
        """
        labels = read_labels(train, label_key, "training")
        var_names = [str(v) for v in train.var_names]
        if len(set(var_names)) != len(var_names):
            raise InputError(
                "the training data has duplicate gene names",
                field="var_names",
                fix="make var_names unique (the preprocess step does this)",
            )
        classes = sorted(set(labels.tolist()))
        if len(classes) < 2:
            raise InputError(
                f"the training data has only {len(classes)} class ({classes})",
                field=label_key,
                fix="train on at least 2 classes (check the split and the label column)",
            )
        self.label_key = label_key
        self.classes_ = classes
        self.label_ontology_ = _label_ontology(train, label_key)
        self.var_names_ = var_names
        code = {c: i for i, c in enumerate(self.classes_)}
        y = np.array([code[c] for c in labels], dtype=np.int64)
        X_valid = y_valid = None
        if valid is not None:
            _check_var_names(self.var_names_, valid, "validation")
            v_labels = read_labels(valid, label_key, "validation")
            known = np.array([c in code for c in v_labels], dtype=bool)
            if not known.all():
                unseen = sorted(set(v_labels[~known].tolist()))
                self.logger.warning(
                    "%s: %d validation cells of %d classes unseen in training are ignored for "
                    "model selection: %s",
                    self.name,
                    int((~known).sum()),
                    len(unseen),
                    unseen[:5],
                )
            if known.any():
                X_valid = as_csr(valid.X)[np.flatnonzero(known)]
                y_valid = np.array([code[c] for c in v_labels[known]], dtype=np.int64)
        self.logger.info(
            "%s: fitting on %d cells, %d genes, %d classes%s",
            self.name,
            train.n_obs,
            train.n_vars,
            len(self.classes_),
            "" if y_valid is None else f", validating on {len(y_valid)} cells",
        )
        self.fit_inputs_ = FitInputs(
            augmentation=None if augmentation is None else np.asarray(augmentation, np.float32),
            checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        )
        if unlabeled is not None:
            if not self.uses_unlabeled:
                raise InputError(
                    f"method '{self.name}' does not learn from unlabeled cells",
                    field="unlabeled",
                    fix="pass unlabeled cells only to methods with uses_unlabeled = True",
                )
            _check_var_names(self.var_names_, unlabeled, "unlabeled")
            keep = [c for c in unlabeled.obs.columns if c not in _LABEL_COLUMNS + (label_key,)]
            self.fit_inputs_.unlabeled_X = as_csr(unlabeled.X)
            self.fit_inputs_.unlabeled_obs = unlabeled.obs[keep].copy()
        if self.fit_inputs_.augmentation is not None:
            aug = self.fit_inputs_.augmentation
            if aug.ndim != 2 or aug.shape[1] != len(self.var_names_):
                raise InputError(
                    f"augmentation vectors have shape {aug.shape}, expected (n, "
                    f"{len(self.var_names_)}) for the training genes",
                    field="augmentation",
                    fix="recompute them from this task's training cells (augmentation rule)",
                )
        self._fit(as_csr(train.X), y, X_valid, y_valid)
        self._fitted = True
        return self

    def checkpoint(self, X: Any) -> Checkpoint | None:
        """A per-epoch :class:`Checkpoint` in ``checkpoint_dir`` (None without one).

        Its fingerprint covers the method, its parameters, the classes and the data shape, so
        a leftover file of another configuration is never resumed from.
        """
        where = self.fit_inputs_.checkpoint_dir
        if where is None:
            return None
        key = json.dumps(
            [self.name, self.params, self.classes_, list(X.shape)], sort_keys=True, default=str
        )
        return Checkpoint(where / "checkpoint.pt", hashlib.sha256(key.encode()).hexdigest())

    def predict_proba(self, test: ad.AnnData) -> pd.DataFrame:
        """Class probabilities: index = test.obs_names, columns = classes_, rows sum to 1."""
        self._require_fitted()
        _check_var_names(self.var_names_, test, "test")
        proba = np.asarray(self._predict_proba(as_csr(test.X)), dtype=np.float64)
        if proba.shape != (test.n_obs, len(self.classes_)):
            raise RuntimeError(
                f"{self.name} returned probabilities of shape {proba.shape}, "
                f"expected {(test.n_obs, len(self.classes_))}"
            )
        proba = np.clip(proba, 0.0, None)
        sums = proba.sum(axis=1, keepdims=True)
        proba = np.divide(
            proba, sums, out=np.full_like(proba, 1.0 / proba.shape[1]), where=sums > 0
        )
        return pd.DataFrame(proba, index=pd.Index(test.obs_names), columns=list(self.classes_))

    def predict(self, test: ad.AnnData) -> np.ndarray:
        """Predicted label per test cell (the most probable class)."""
        proba = self.predict_proba(test)
        return np.asarray(self.classes_, dtype=object)[np.argmax(proba.to_numpy(), axis=1)]

    def save(self, path: str | Path) -> None:
        """Save to a directory: weights first, then ``method.json`` (its presence = complete)."""
        self._require_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._save_weights(path)
        meta = {
            "format_version": FORMAT_VERSION,
            "celltype_bench_version": __version__,
            "name": self.name,
            "params": self.params,
            "classes_": list(self.classes_),
            "var_names": list(self.var_names_),
            "label_key": self.label_key,
            "label_ontology": self.label_ontology_,
            "state": self._state(),
            "history": self.history_,
        }
        write_json(meta, path / METHOD_JSON)

    @classmethod
    def load(cls, path: str | Path) -> Method:
        """Load a method saved by ``save``; ``Method.load`` dispatches on the saved name."""
        path = Path(path)
        meta_path = path / METHOD_JSON
        if not meta_path.exists():
            raise InputError(
                "no saved method here",
                file=str(meta_path),
                fix="point to a directory written by Method.save (rerun training)",
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(
                f"cannot read method.json ({exc})", file=str(meta_path), fix="rerun training"
            ) from exc
        from .registry import get

        klass = get(meta["name"]) if cls is Method else cls
        if klass.name != meta["name"]:
            raise InputError(
                f"saved method is '{meta['name']}', not '{klass.name}'",
                file=str(meta_path),
                field="name",
                fix="load it with Method.load(path)",
            )
        obj = klass(**meta["params"])
        obj.classes_ = [str(c) for c in meta["classes_"]]
        obj.var_names_ = [str(v) for v in meta["var_names"]]
        obj.label_key = meta.get("label_key", "cell_type")
        obj.label_ontology_ = dict(meta.get("label_ontology") or {})
        obj.history_ = meta.get("history", [])
        obj._set_state(meta.get("state") or {})
        obj._load_weights(path)
        obj._fitted = True
        return obj

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def _fit(
        self,
        X: sp.csr_matrix,
        y: np.ndarray,
        X_valid: sp.csr_matrix | None,
        y_valid: np.ndarray | None,
    ) -> None:
        """Fit on CSR ``X`` and integer codes ``y`` into ``classes_`` (validation optional)."""

    @abc.abstractmethod
    def _predict_proba(self, X: sp.csr_matrix) -> np.ndarray:
        """Probabilities, shape (cells, classes_)."""

    def _state(self) -> dict[str, Any]:
        return {}

    def _set_state(self, state: dict[str, Any]) -> None:
        return None

    def _save_weights(self, path: Path) -> None:
        return None

    def _load_weights(self, path: Path) -> None:
        return None

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise InputError(
                f"method '{self.name}' is not fitted",
                fix="call fit(train) first, or Method.load(path) a saved one",
            )


class TorchMethod(Method):
    """A method backed by a torch ``nn.Module`` built by ``_build_module``."""

    predict_batch_size: ClassVar[int] = 4096
    # every torch method takes both weighting switches (balancing.configure sets them)
    supported_weightings: ClassVar[frozenset[str]] = frozenset(
        {"class_weight", "weighted_sampling"}
    )
    balancing_params: ClassVar[dict[str, str]] = {
        "class_weight": "class_weighted",
        "weighted_sampling": "weighted_sampling",
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.module_: nn.Module | None = None

    @abc.abstractmethod
    def _build_module(self, n_genes: int, n_classes: int) -> nn.Module:
        """The torch module for ``n_genes`` inputs and ``n_classes`` outputs."""

    @property
    def device(self) -> torch.device:
        """The torch device chosen from the ``device`` parameter."""
        return choose_device(self.params.get("device", "auto"))

    def _fit_adamw_steplr(
        self,
        module: nn.Module,
        X: sp.csr_matrix,
        y: np.ndarray,
        X_valid: sp.csr_matrix | None,
        y_valid: np.ndarray | None,
        **extra: Any,
    ) -> list[dict[str, Any]]:
        """``fit_torch`` with scTab's recipe, shared by linear, MLP and scTab.

        Class weights ``n / (k n_c)`` when ``class_weighted`` (else ones, kept in
        ``class_weights_``), weighted sampling when ``weighted_sampling``, AdamW (``lr``,
        ``weight_decay``), StepLR ``gamma`` every epoch, ``epochs``, ``batch_size``,
        ``patience``, the method's device, seed, logger and checkpoint. ``extra`` goes to
        ``fit_torch`` as is (``augment``, ``regularizer``, ``grad_clip``).
        """
        p = self.params
        k = len(self.classes_)
        self.class_weights_ = class_weights(y, k) if p["class_weighted"] else np.ones(k)
        sampler = (lambda rng: epoch_indices(y, rng)) if p["weighted_sampling"] else None
        return fit_torch(
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
            **extra,
        )

    def _augmenter(self) -> Any:
        """scTab's augmentation as the ``augment`` callable of ``fit_torch`` (or None).

        Needs the ``augment`` parameter and the vectors handed to ``fit(augmentation=...)``;
        without vectors it warns and trains without. Sets ``augmented_`` and
        ``n_augmentation_vectors_`` (saved with the model).
        """
        self.augmented_ = False
        self.n_augmentation_vectors_ = None
        if not self.params["augment"]:
            return None
        vectors = self.fit_inputs_.augmentation
        if vectors is None:
            self.logger.warning(
                "%s: augment=True but no augmentation vectors were given; training without "
                "augmentation (pass fit(..., augmentation=vectors), or set augment: false)",
                self.name,
            )
            return None
        v = torch.as_tensor(np.asarray(vectors, dtype=np.float32), device=self.device)
        self.augmented_ = True
        self.n_augmentation_vectors_ = int(v.shape[0])
        self.logger.info("%s: augmenting training batches with %d vectors", self.name, v.shape[0])
        return lambda xb, gen: apply_augmentation(xb, v, gen)

    def _predict_proba(self, X: sp.csr_matrix) -> np.ndarray:
        assert self.module_ is not None
        return predict_proba_torch(
            self.module_, X, batch_size=self.predict_batch_size, device=self.device
        )

    def _save_weights(self, path: Path) -> None:
        assert self.module_ is not None
        state = {k: v.detach().cpu() for k, v in self.module_.state_dict().items()}
        tmp = path / (TORCH_WEIGHTS + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path / TORCH_WEIGHTS)

    def _load_weights(self, path: Path) -> None:
        file = path / TORCH_WEIGHTS
        if not file.exists():
            raise InputError(
                "saved torch weights are missing", file=str(file), fix="rerun training"
            )
        module = self._build_module(len(self.var_names_), len(self.classes_))
        state = torch.load(file, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        module.eval()
        self.module_ = module
