"""Control methods: the floor any real method must beat.

- ``majority``: always the most frequent training class, with probability 1.
- ``random``: labels drawn by the training class frequencies (seeded); the probability row is
  the one-hot of the drawn label, so calibration metrics (ECE) score the hard guess.

Balancing: controls have no training loop, so they support only 'none' and the data-level
strategies (resampling changes the class frequencies they learn).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from .base import Method
from .registry import register


class _FrequencyControl(Method):
    """Shared state: the training class frequencies."""

    is_control = True
    native_balancing = "none"
    supported_weightings = frozenset()
    balancing_params = {}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.class_freq_: np.ndarray = np.zeros(0)

    def _fit(
        self,
        X: sp.csr_matrix,
        y: np.ndarray,
        X_valid: sp.csr_matrix | None,
        y_valid: np.ndarray | None,
    ) -> None:
        counts = np.bincount(y, minlength=len(self.classes_)).astype(np.float64)
        self.class_freq_ = counts / counts.sum()

    def _state(self) -> dict[str, Any]:
        return {"class_freq": self.class_freq_.tolist()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.class_freq_ = np.asarray(state["class_freq"], dtype=np.float64)


@register("majority")
class Majority(_FrequencyControl):
    """Predicts the most frequent training class (ties: first in sorted order), probability 1."""

    default_params = {}

    def _predict_proba(self, X: sp.csr_matrix) -> np.ndarray:
        proba = np.zeros((X.shape[0], len(self.classes_)), dtype=np.float64)
        proba[:, int(np.argmax(self.class_freq_))] = 1.0
        return proba


@register("random")
class RandomGuess(_FrequencyControl):
    """Samples each test cell's label by the training class frequencies (seeded, one-hot)."""

    default_params = {"seed": 0}

    def _predict_proba(self, X: sp.csr_matrix) -> np.ndarray:
        rng = np.random.default_rng(self.params["seed"])
        n, k = X.shape[0], len(self.classes_)
        drawn = rng.choice(k, size=n, p=self.class_freq_)
        proba = np.zeros((n, k), dtype=np.float64)
        proba[np.arange(n), drawn] = 1.0
        return proba
