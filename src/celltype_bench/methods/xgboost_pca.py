"""scTab's XGBoost baseline (Fischer et al. 2024): gradient-boosted trees on 256 PCA components.

- PCA (scikit-learn ``PCA``, centred) of log1p(CP10k) with ``n_components`` (256) components,
  fitted on the TRAINING cells only; validation and test cells are projected with the
  training mean and components. Capped at ``min(n_cells - 1, n_genes - 1)`` (logged). The
  solver is exact: the covariance eigendecomposition for up to ``COVARIANCE_MAX_GENES`` genes,
  ARPACK above (both take the sparse matrix as is, both deterministic).
- XGBoost (``xgboost.train``, objective ``multi:softprob``) with the paper's non-default
  settings: 800 trees per class (``n_estimators``), eta 0.05, max_depth 10, subsample 0.75,
  early stopping after 10 rounds without gain in validation multi-class log loss (when
  validation cells are given; unweighted, as scTab's ``eval_set``); predictions use the trees
  up to the best round. ``tree_method`` hist, ``device`` cuda when torch sees a GPU (``auto``),
  ``nthread`` from ``torch.get_num_threads()`` unless given (it also caps the BLAS threads of
  the PCA: an oversubscribed BLAS is many times slower on a busy machine).
- Class weights ``n / (k * n_c)`` as per-cell sample weights (``class_weighted``, default True,
  scTab's setting; the 'class_weight' balancing strategy).
- Deterministic for a seed (``seed`` seeds XGBoost's row subsampling; the PCA is exact).
- Saved as ``pca_components.npy`` and ``pca_mean.npy`` plus the booster in XGBoost's JSON
  format (``xgboost_model.json``, ``save_model``); no pickle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from ..balancing import class_weights
from ..errors import InputError
from .base import Method
from .registry import register

PCA_COMPONENTS = "pca_components.npy"
PCA_MEAN = "pca_mean.npy"
BOOSTER_FILE = "xgboost_model.json"
COVARIANCE_MAX_GENES = 5000
"""Up to this many genes the PCA eigendecomposes the gene covariance (fast, exact)."""


def _save_npy(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    os.replace(tmp, path)


@register("xgboost")
class XGBoostPCA(Method):
    """XGBoost (multi:softprob) on the first 256 principal components of log1p(CP10k)."""

    native_balancing = "class_weight"
    supported_weightings = frozenset({"class_weight"})
    balancing_params = {"class_weight": "class_weighted"}
    default_params = {
        "n_components": 256,
        "n_estimators": 800,
        "eta": 0.05,
        "max_depth": 10,
        "subsample": 0.75,
        "early_stopping_rounds": 10,
        "class_weighted": True,
        "tree_method": "hist",
        "device": "auto",
        "nthread": None,
        "seed": 0,
    }
    nullable_params = frozenset({"early_stopping_rounds", "nthread"})

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        for key in ("n_components", "n_estimators", "max_depth"):
            if p[key] < 1:
                raise InputError(f"parameter '{key}' of method 'xgboost' must be >= 1", field=key)
        if not 0.0 < p["eta"] <= 1.0 or not 0.0 < p["subsample"] <= 1.0:
            raise InputError(
                "parameters 'eta' and 'subsample' of method 'xgboost' must be in (0, 1]",
                field="eta" if not 0.0 < p["eta"] <= 1.0 else "subsample",
            )
        if p["early_stopping_rounds"] is not None and p["early_stopping_rounds"] < 1:
            raise InputError(
                "parameter 'early_stopping_rounds' of method 'xgboost' must be >= 1 or null",
                field="early_stopping_rounds",
            )
        nthread = p["nthread"]
        if nthread is not None and (
            isinstance(nthread, bool) or not isinstance(nthread, int | np.integer) or nthread < 1
        ):
            raise InputError(
                f"parameter 'nthread' of method 'xgboost' must be an integer >= 1 or null, "
                f"got {nthread!r}",
                field="nthread",
            )
        if p["device"] not in ("auto", "cpu") and not str(p["device"]).startswith("cuda"):
            raise InputError(
                f"unknown device '{p['device']}'", field="device", fix="use auto, cpu or cuda"
            )
        self.components_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None
        self.booster_: Any = None
        self.best_iteration_: int | None = None
        self.class_weights_: np.ndarray | None = None
        self.fit_info_: dict[str, Any] = {}

    # ------------------------------------------------------------------ settings
    def _nthread(self) -> int:
        n = self.params["nthread"]
        return int(n) if n is not None else max(1, torch.get_num_threads())

    def _device(self) -> str:
        dev = str(self.params["device"])
        if dev == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(
                f"device '{dev}' was requested but CUDA is not available on this machine",
                field="device",
                fix="use device: auto (falls back to cpu) or device: cpu",
            )
        return dev

    # ------------------------------------------------------------------ PCA
    def _fit_pca(self, X: sp.csr_matrix) -> None:
        from sklearn.decomposition import PCA
        from threadpoolctl import threadpool_limits

        n_cells, n_genes = X.shape
        wanted = int(self.params["n_components"])
        cap = min(n_cells - 1, n_genes - 1)
        if cap < 1:
            raise InputError(
                f"PCA needs at least 2 training cells and 2 genes, got {n_cells} x {n_genes}",
                field="n_components",
            )
        n_comp = min(wanted, cap)
        if n_comp < wanted:
            self.logger.info(
                "xgboost: n_components %d capped at %d (min(n_cells - 1, n_genes - 1) for "
                "%d training cells x %d genes)",
                wanted,
                n_comp,
                n_cells,
                n_genes,
            )
        solver = "covariance_eigh" if n_genes <= COVARIANCE_MAX_GENES else "arpack"
        with threadpool_limits(limits=self._nthread(), user_api="blas"):
            pca = PCA(n_components=n_comp, svd_solver=solver, random_state=self.params["seed"]).fit(
                X
            )
        self.components_ = np.asarray(pca.components_, dtype=np.float32)
        self.mean_ = np.asarray(pca.mean_, dtype=np.float32)
        self.fit_info_.update(
            {
                "n_components": int(n_comp),
                "pca_solver": solver,
                "explained_variance_ratio": float(np.sum(pca.explained_variance_ratio_)),
            }
        )
        self.logger.info(
            "xgboost: PCA (%s) on %d training cells: %d components, %.1f%% of the variance",
            solver,
            n_cells,
            n_comp,
            100 * self.fit_info_["explained_variance_ratio"],
        )

    def transform(self, X: sp.csr_matrix) -> np.ndarray:
        """Project cells onto the training PCA: ``(X - mean) @ components.T`` (float32)."""
        if self.components_ is None or self.mean_ is None:
            raise InputError("method 'xgboost' is not fitted", fix="call fit(train) first")
        C = self.components_.astype(np.float64)
        proj = np.asarray(X @ C.T, dtype=np.float64) - self.mean_.astype(np.float64) @ C.T
        return proj.astype(np.float32)

    # ------------------------------------------------------------------ fit / predict
    def _booster_params(self, n_classes: int) -> dict[str, Any]:
        p = self.params
        return {
            "objective": "multi:softprob",
            "num_class": n_classes,
            "eta": p["eta"],
            "max_depth": p["max_depth"],
            "subsample": p["subsample"],
            "tree_method": p["tree_method"],
            "device": self._device(),
            "nthread": self._nthread(),
            "seed": p["seed"],
            "eval_metric": "mlogloss",
        }

    def _fit(
        self,
        X: sp.csr_matrix,
        y: np.ndarray,
        X_valid: sp.csr_matrix | None,
        y_valid: np.ndarray | None,
    ) -> None:
        import xgboost as xgb

        p = self.params
        k = len(self.classes_)
        self.fit_info_ = {}
        self._fit_pca(X)
        Z = self.transform(X)
        self.class_weights_ = class_weights(y, k) if p["class_weighted"] else np.ones(k)
        dtrain = xgb.DMatrix(Z, label=y, weight=self.class_weights_[y], nthread=self._nthread())
        evals = [(dtrain, "train")]
        early = p["early_stopping_rounds"]
        has_valid = X_valid is not None and y_valid is not None and len(y_valid) > 0
        if has_valid:
            dvalid = xgb.DMatrix(self.transform(X_valid), label=y_valid, nthread=self._nthread())
            evals.append((dvalid, "valid"))
        elif early is not None:
            self.logger.info(
                "xgboost: no validation cells; training all %d rounds", p["n_estimators"]
            )
        record: dict[str, Any] = {}
        booster = xgb.train(
            self._booster_params(k),
            dtrain,
            num_boost_round=p["n_estimators"],
            evals=evals,
            early_stopping_rounds=early if has_valid else None,
            evals_result=record,
            verbose_eval=False,
        )
        n_rounds = booster.num_boosted_rounds()
        if has_valid and early is not None:
            best = int(booster.best_iteration)
        else:
            best = n_rounds - 1
        self.booster_ = booster
        self.best_iteration_ = best
        train_loss = record.get("train", {}).get("mlogloss", [])
        valid_loss = record.get("valid", {}).get("mlogloss", [])
        self.history_ = [
            {
                "epoch": i + 1,
                "loss": float(train_loss[i]),
                "val_loss": float(valid_loss[i]) if i < len(valid_loss) else None,
                "val_macro_f1": None,
            }
            for i in range(len(train_loss))
        ]
        self.fit_info_.update({"n_rounds": int(n_rounds), "best_iteration": best})
        self.logger.info(
            "xgboost: %d boosting rounds x %d classes%s",
            n_rounds,
            k,
            f", best round {best + 1} by validation log loss" if has_valid and early else "",
        )

    def _predict_proba(self, X: sp.csr_matrix) -> np.ndarray:
        import xgboost as xgb

        assert self.booster_ is not None and self.best_iteration_ is not None
        d = xgb.DMatrix(self.transform(X), nthread=self._nthread())
        proba = self.booster_.predict(d, iteration_range=(0, self.best_iteration_ + 1))
        return np.asarray(proba, dtype=np.float64).reshape(X.shape[0], len(self.classes_))

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        cw = None if self.class_weights_ is None else self.class_weights_.tolist()
        return {
            "best_iteration": self.best_iteration_,
            "class_weights": cw,
            "fit_info": self.fit_info_,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self.best_iteration_ = state.get("best_iteration")
        if self.best_iteration_ is not None:
            self.best_iteration_ = int(self.best_iteration_)
        cw = state.get("class_weights")
        self.class_weights_ = None if cw is None else np.asarray(cw, dtype=np.float64)
        self.fit_info_ = dict(state.get("fit_info") or {})

    def _save_weights(self, path: Path) -> None:
        assert self.components_ is not None and self.mean_ is not None
        _save_npy(self.components_, path / PCA_COMPONENTS)
        _save_npy(self.mean_, path / PCA_MEAN)
        tmp = path / "xgboost_model.tmp.json"
        self.booster_.save_model(str(tmp))
        os.replace(tmp, path / BOOSTER_FILE)

    def _load_weights(self, path: Path) -> None:
        import xgboost as xgb

        for name in (PCA_COMPONENTS, PCA_MEAN, BOOSTER_FILE):
            if not (path / name).exists():
                raise InputError(
                    "saved xgboost model is incomplete", file=str(path / name), fix="rerun training"
                )
        try:
            self.components_ = np.load(path / PCA_COMPONENTS, allow_pickle=False)
            self.mean_ = np.load(path / PCA_MEAN, allow_pickle=False)
            booster = xgb.Booster()
            booster.load_model(str(path / BOOSTER_FILE))
        except (OSError, ValueError, xgb.core.XGBoostError) as exc:
            raise InputError(
                f"cannot read the saved xgboost model ({type(exc).__name__}: {exc})",
                file=str(path),
                fix="rerun training",
            ) from exc
        booster.set_param({"device": self._device(), "nthread": self._nthread()})
        if self.components_.shape != (self.components_.shape[0], len(self.var_names_)):
            raise InputError(
                f"saved PCA components have shape {self.components_.shape}, expected "
                f"(n, {len(self.var_names_)})",
                file=str(path / PCA_COMPONENTS),
                fix="rerun training",
            )
        self.booster_ = booster
        if self.best_iteration_ is None:
            self.best_iteration_ = booster.num_boosted_rounds() - 1
