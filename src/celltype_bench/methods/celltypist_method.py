"""CellTypist (Domínguez Conde et al. 2022) through the real ``celltypist`` package (1.7.1).

Training calls ``celltypist.train`` with SGD logistic regression in mini-batches, the setup
scTab benchmarked (optionally with its two-pass feature selection). Notes, per the project's
facts sheet and celltypist's source:

- ``use_SGD=True`` always: celltypist 1.7.1's default trainer passes ``multi_class`` to
  scikit-learn's LogisticRegression, which this scikit-learn no longer accepts.
- Mini-batch mode needs more training cells than ``batch_size``. With fewer, the method falls
  back to plain SGD over all cells (``mini_batch=False``, celltypist's own advice) and logs it.
- ``check_expression=False``: ``X`` is already log1p(CP10k).
- ``with_mean`` defaults to False (celltypist's default is True): centring makes celltypist
  densify the whole training matrix, which this project never does. Set ``with_mean=True`` to
  get celltypist's default on data that fits in memory densely.
- Feature selection needs more expressed genes than ``top_genes``; otherwise it is skipped
  (it would keep every gene anyway) and logged.
- Prediction reproduces ``celltypist.annotate`` (best match, no majority voting) batch by
  batch on the sparse matrix: model genes, scaler centring/scaling, clip at 10, decision
  function, sigmoid. Celltypist's per-class sigmoid "probabilities" do not sum to 1; rows are
  divided by their sum (as scikit-learn's one-vs-rest ``predict_proba`` does); argmax is
  unchanged.
- Balancing: celltypist supports the 'weighted_sampling' strategy through its own
  ``balance_cell_type=True`` (``celltype_bench.balancing.configure`` sets it), which is
  celltypist's mini-batch balancing, NOT scBalance's sampler: each epoch celltypist draws
  ``min(batch_number * batch_size, n)`` cells WITHOUT replacement with probability
  proportional to 1/(class size) and cuts them into mini-batches. When the training set has
  at most ``batch_number * batch_size`` cells (100,000 by default) every epoch still holds
  every cell exactly once: the weights only move rare cells to earlier mini-batches and the
  class mix per epoch stays the training frequencies (logged as a warning). Without
  mini-batches (the small-data fallback) it has no effect (also logged). 'class_weight' is
  not supported (celltypist's SGD gets no class weights).
- Saved with the model's own ``write()`` (celltypist's pickle format) beside ``method.json``.

Celltypist's log messages go to the ``celltype_bench`` logger at DEBUG (warnings stay warnings)
instead of the console; importing it no longer leaves a handler on the root logger.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.special import expit

from ..errors import InputError
from .base import Method
from .registry import register

MODEL_FILE = "celltypist_model.pkl"
_CT_LOGGER = "celltypist.logger"


class _Forward(logging.Handler):
    """Send celltypist's records to our logger (INFO and below at DEBUG)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        level = logging.DEBUG if record.levelno <= logging.INFO else record.levelno
        self.target.log(level, "celltypist: %s", record.getMessage())


def _import_celltypist() -> Any:
    """Import celltypist without letting its ``logging.basicConfig`` touch the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import celltypist
    except PermissionError as exc:
        raise InputError(
            f"celltypist cannot create its data folder ({exc})",
            field="CELLTYPIST_FOLDER",
            fix="set the environment variable CELLTYPIST_FOLDER to a writable directory",
        ) from exc
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return celltypist


@contextmanager
def _celltypist_logs_to(target: logging.Logger):
    ct = logging.getLogger(_CT_LOGGER)
    old = (list(ct.handlers), ct.propagate, ct.level)
    ct.handlers[:] = [_Forward(target)]
    ct.propagate = False
    ct.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        ct.handlers[:], ct.propagate = old[0], old[1]
        ct.setLevel(old[2])


@register("celltypist")
class CellTypist(Method):
    """CellTypist SGD logistic regression (mini-batch, optional feature selection)."""

    native_balancing = "none"
    supported_weightings = frozenset({"weighted_sampling"})
    balancing_params = {"weighted_sampling": "balance_cell_type"}

    default_params = {
        "feature_selection": True,
        "top_genes": 300,
        "mini_batch": True,
        "batch_size": 1000,
        "batch_number": 100,
        "epochs": 10,
        "balance_cell_type": False,
        "alpha": 1e-4,
        "with_mean": False,
        "max_iter": None,
        "n_jobs": None,
        "seed": 0,
    }
    predict_batch_size = 4096

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.model_: Any = None
        self.fit_info_: dict[str, Any] = {}

    def _fit(
        self,
        X: sp.csr_matrix,
        y: np.ndarray,
        X_valid: sp.csr_matrix | None,
        y_valid: np.ndarray | None,
    ) -> None:
        p = self.params
        celltypist = _import_celltypist()
        n_cells = X.shape[0]
        mini_batch, batch_size = p["mini_batch"], p["batch_size"]
        if mini_batch and n_cells <= batch_size:
            self.logger.warning(
                "celltypist: %d training cells <= batch_size %d; mini-batch SGD needs more "
                "cells than batch_size, falling back to plain SGD over all cells",
                n_cells,
                batch_size,
            )
            mini_batch = False
        if p["balance_cell_type"]:
            if not mini_batch:
                self.logger.warning(
                    "celltypist: balance_cell_type has no effect without mini-batches "
                    "(plain SGD over all cells)"
                )
            elif n_cells <= p["batch_number"] * batch_size:
                self.logger.warning(
                    "celltypist: balance_cell_type with %d training cells <= batch_number x "
                    "batch_size (%d): every epoch still holds every cell once, so it only "
                    "reorders the mini-batches (rare cells first); the class mix per epoch is "
                    "unchanged",
                    n_cells,
                    p["batch_number"] * batch_size,
                )
        n_expressed = int(np.count_nonzero(np.asarray(X.getnnz(axis=0))))
        feature_selection = p["feature_selection"]
        if feature_selection and n_expressed <= p["top_genes"]:
            self.logger.warning(
                "celltypist: %d expressed genes <= top_genes %d; skipping feature selection "
                "(it would keep every gene)",
                n_expressed,
                p["top_genes"],
            )
            feature_selection = False
        self.fit_info_ = {
            "mini_batch": mini_batch,
            "feature_selection": feature_selection,
            "n_train_cells": int(n_cells),
        }
        if X_valid is not None:
            self.logger.info("celltypist: no model selection; the validation set is not used")
        labels = np.asarray(self.classes_, dtype=object)[y].astype(str)
        kwargs: dict[str, Any] = {"random_state": p["seed"]}
        if p["max_iter"] is not None:
            kwargs["max_iter"] = p["max_iter"]
        np_state = np.random.get_state()
        np.random.seed(p["seed"] % (2**32))  # celltypist's mini-batches use the global RNG
        try:
            with _celltypist_logs_to(self.logger):
                model = celltypist.train(
                    X=sp.csr_matrix(X),
                    labels=labels,
                    genes=np.asarray(self.var_names_, dtype=object),
                    check_expression=False,
                    use_SGD=True,
                    mini_batch=mini_batch,
                    batch_size=batch_size,
                    batch_number=p["batch_number"],
                    epochs=p["epochs"],
                    balance_cell_type=p["balance_cell_type"],
                    feature_selection=feature_selection,
                    top_genes=p["top_genes"],
                    alpha=p["alpha"],
                    with_mean=p["with_mean"],
                    n_jobs=p["n_jobs"],
                    **kwargs,
                )
        finally:
            np.random.set_state(np_state)
        self.model_ = model
        self.fit_info_["n_features"] = len(model.features)
        self.logger.info(
            "celltypist: trained on %d cells, %d features, mini_batch=%s",
            n_cells,
            len(model.features),
            mini_batch,
        )

    def _predict_proba(self, X: sp.csr_matrix) -> np.ndarray:
        model = self.model_
        clf, scaler = model.classifier, model.scaler
        pos = {g: i for i, g in enumerate(self.var_names_)}
        idx = np.array([pos[str(g)] for g in model.features], dtype=np.int64)
        mean = np.asarray(scaler.mean_, dtype=np.float64) if scaler.with_mean else 0.0
        scale = np.asarray(scaler.scale_, dtype=np.float64)
        ct_classes = [str(c) for c in clf.classes_]
        order = [ct_classes.index(c) for c in self.classes_]
        out = []
        for start in range(0, X.shape[0], self.predict_batch_size):
            rows = X[start : start + self.predict_batch_size]
            xb = rows[:, idx].toarray().astype(np.float64)
            xb = (xb - mean) / scale
            xb[xb > 10] = 10
            scores = clf.decision_function(xb)
            if scores.ndim == 1:
                scores = np.column_stack([-scores, scores])
            out.append(expit(scores)[:, order])
        if not out:
            return np.zeros((0, len(self.classes_)))
        proba = np.concatenate(out, axis=0)
        return proba / proba.sum(axis=1, keepdims=True)

    def _state(self) -> dict[str, Any]:
        return {"fit_info": self.fit_info_}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.fit_info_ = dict(state.get("fit_info", {}))

    def _save_weights(self, path: Path) -> None:
        tmp = path / "celltypist_model.tmp.pkl"
        with _celltypist_logs_to(self.logger):
            self.model_.write(str(tmp))
        os.replace(tmp, path / MODEL_FILE)

    def _load_weights(self, path: Path) -> None:
        file = (path / MODEL_FILE).resolve()
        if not file.exists():
            raise InputError(
                "saved celltypist model is missing", file=str(file), fix="rerun training"
            )
        celltypist = _import_celltypist()
        with _celltypist_logs_to(self.logger):
            self.model_ = celltypist.models.Model.load(str(file))
