"""Class imbalance as a study axis: every method can be crossed with every balancing strategy.

Strategies (``STRATEGIES``):

- ``none``: the training data and the loss as they are.
- ``class_weight``: class-weighted cross-entropy, class ``c`` weighted ``n / (k * n_c)``
  (scTab; scikit-learn's "balanced"). Done inside the method (see ``configure``).
- ``weighted_sampling``: scBalance's sampler. Every epoch draws as many cells as the training
  set has, with replacement, cell probability proportional to 1 / (size of its class), so
  each class makes up about 1/k of an epoch (``epoch_indices``). Done inside the method.
- ``oversample``: imbalanced-learn's ``RandomOverSampler`` (copies cells of the smaller
  classes until every class has as many cells as the largest).
- ``undersample``: imbalanced-learn's ``RandomUnderSampler`` (keeps a random subset of every
  class as large as the smallest class).
- ``smote``: imbalanced-learn's ``SMOTE``: each new cell lies on the segment between a cell
  and one of its ``k_neighbors`` (default 5) nearest same-class neighbours. ``X`` here is
  log1p(CP10k), so synthetic cells interpolate in that space (they are not count profiles:
  a resampled AnnData has no ``counts`` layer). ``k_neighbors`` adapts to the smallest
  class being oversampled (``min(k, n_c - 1)``); a class of one cell cannot be interpolated
  and is randomly oversampled instead (with a warning naming it). Neighbours are exact
  Euclidean neighbours computed block by block with dense BLAS (``ExactNeighbors``), the
  same neighbours scikit-learn's brute force finds (up to floating-point ties), several
  times faster than its sparse path.

``WEIGHTINGS`` are applied by the method (``configure`` maps them to method parameters);
``RESAMPLERS`` change the training data (``resample`` / ``resample_adata``) and run with every
method, whose own balancing is then switched off. An *external* balancer is any
imbalanced-learn-compatible resampler (a class whose instances have ``fit_resample(X, y)``)
named by import path: ``'imblearn.over_sampling.ADASYN'``, ``'my_pkg.mod:MyBalancer'`` or
``'path/to/file.py:MyBalancer'``, with keyword ``params``; it is data-level like the
resamplers (strategy ``'external'``).

All resampling keeps ``X`` sparse (CSR float32) and is deterministic for a seed.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .errors import InputError
from .training import as_csr, get_logger

STRATEGIES: tuple[str, ...] = (
    "none",
    "class_weight",
    "weighted_sampling",
    "oversample",
    "undersample",
    "smote",
)
"""The built-in strategy names."""

RESAMPLERS: frozenset[str] = frozenset({"oversample", "undersample", "smote"})
"""Built-in strategies that change the training data (data-level)."""

WEIGHTINGS: frozenset[str] = frozenset({"class_weight", "weighted_sampling"})
"""Built-in strategies applied inside a method's training (algorithm-level)."""

EXTERNAL = "external"
"""Strategy name of an external (import-path) resampler; data-level like ``RESAMPLERS``."""

NATIVE = "native"
"""Alias resolved per method to the method's published setting (``resolve``)."""

SMOTE_K = 5
"""imbalanced-learn's default ``k_neighbors``."""

_BUILTIN_PARAMS: dict[str, tuple[str, ...]] = {
    "oversample": ("sampling_strategy", "shrinkage"),
    "undersample": ("sampling_strategy", "replacement"),
    "smote": ("sampling_strategy", "k_neighbors"),
}

_EXTERNAL_FIX = (
    "name a class whose instances have fit_resample(X, y) by its full import path, e.g. "
    "'imblearn.over_sampling.ADASYN', 'my_package.module:MyBalancer' or "
    "'path/to/file.py:MyBalancer' (and install the package that provides it)"
)


# ---------------------------------------------------------------------------- weightings
def class_weights(y: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Per-class loss weights ``n / (k * n_c)`` (scTab, scikit-learn "balanced").

    ``k = n_classes`` (default: ``max(y) + 1``); a class with no cells gets weight 0.
    """
    y = np.asarray(y, dtype=np.int64)
    k = int(y.max()) + 1 if n_classes is None else int(n_classes)
    counts = np.bincount(y, minlength=k).astype(np.float64)
    with np.errstate(divide="ignore"):
        w = len(y) / (k * counts)
    w[counts == 0] = 0.0
    return w


def class_balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-cell sampling weight 1/(size of the cell's class) (scBalance)."""
    y = np.asarray(y, dtype=np.int64)
    counts = np.bincount(y)
    return 1.0 / counts[y]


def epoch_indices(
    y: np.ndarray, rng: np.random.Generator, weighted: bool = True, n_draws: int | None = None
) -> np.ndarray:
    """One epoch's cell indices (scBalance's sampler).

    ``weighted=True``: ``n_draws`` (default: number of cells) draws with replacement, cell
    probability proportional to 1/(class size), so classes are about equally represented.
    ``weighted=False``: a uniform shuffle of all cells (class mix follows class frequencies).
    """
    n = len(y)
    if not weighted:
        return rng.permutation(n)
    w = class_balanced_weights(y)
    return rng.choice(n, size=n if n_draws is None else n_draws, replace=True, p=w / w.sum())


# ---------------------------------------------------------------------------- names
def is_resampler(strategy: str) -> bool:
    """True for data-level strategies (built-in resamplers and ``'external'``)."""
    return strategy in RESAMPLERS or strategy == EXTERNAL


def _method_class(method_name: str) -> type:
    from .methods import get  # late import: the methods import this module

    return get(method_name)


def resolve(strategy: str, method_name: str) -> str:
    """``'native'`` -> the method's published setting (``native_balancing``); others unchanged."""
    if strategy == NATIVE:
        return str(getattr(_method_class(method_name), "native_balancing", "none"))
    return strategy


def _check_name(strategy: Any) -> None:
    if strategy not in STRATEGIES and strategy != EXTERNAL:
        raise InputError(
            f"unknown balancing strategy {strategy!r}",
            field="balancing",
            fix=f"use one of {[NATIVE, *STRATEGIES, EXTERNAL]} ('external' with an import "
            "path of an imbalanced-learn-compatible resampler)",
        )


def supported_strategies(method_name: str) -> list[str]:
    """The strategies method ``method_name`` can run with (built-in names + 'external')."""
    cls = _method_class(method_name)
    weightings = set(getattr(cls, "supported_weightings", frozenset()))
    return [s for s in STRATEGIES if s not in WEIGHTINGS or s in weightings] + [EXTERNAL]


def configure(method_name: str, params: Mapping[str, Any] | None, strategy: str) -> dict[str, Any]:
    """The parameters to pass to ``create(method_name, ...)`` to run with exactly ``strategy``.

    Every balancing switch of the method (``Method.balancing_params``: linear and scbalance
    have ``class_weighted`` and ``weighted_sampling``, celltypist ``balance_cell_type``) is
    set: on for the strategy's own weighting, off otherwise, so a data-level strategy
    (resamplers, 'external') and 'none' run with no internal balancing. A value the caller
    gave that disagrees is overridden with a warning. ``'native'`` is resolved first. An
    unsupported (method, strategy) pair raises InputError naming both and the supported ones.
    """
    cls = _method_class(method_name)
    concrete = resolve(strategy, method_name)
    _check_name(concrete)
    supported = supported_strategies(method_name)
    if concrete not in supported:
        raise InputError(
            f"method '{method_name}' does not support balancing strategy '{concrete}'",
            field="balancing",
            fix=f"'{method_name}' supports: {', '.join(supported)}",
        )
    switches: Mapping[str, str] = getattr(cls, "balancing_params", {})
    out = dict(params or {})
    log = get_logger()
    for weighting, param in switches.items():
        value = weighting == concrete
        if param in out and out[param] is not value:
            log.warning(
                "balancing %s: parameter %s of method %s set to %s (was %r)",
                concrete,
                param,
                method_name,
                value,
                out[param],
            )
        out[param] = value
    return out


# ---------------------------------------------------------------------------- exact k-NN
def _dense_block(X: sp.csr_matrix, start: int, stop: int) -> torch.Tensor:
    return torch.from_numpy(X[start:stop].toarray().astype(np.float32, copy=False))


def _row_sq_norms(X: sp.csr_matrix) -> torch.Tensor:
    sq = np.asarray(X.multiply(X).sum(axis=1, dtype=np.float64), dtype=np.float32).ravel()
    return torch.from_numpy(sq)


def _merge(
    best_d: torch.Tensor, best_i: torch.Tensor, cand_d: torch.Tensor, cand_i: torch.Tensor
) -> None:
    """Keep the ``k`` smallest of (best, candidates) per row, in place, sorted ascending."""
    k = best_d.shape[1]
    d = torch.cat([best_d, cand_d], dim=1)
    i = torch.cat([best_i, cand_i], dim=1)
    vals, pos = torch.topk(d, k, dim=1, largest=False, sorted=True)
    best_d.copy_(vals)
    best_i.copy_(torch.gather(i, 1, pos))


def exact_knn(
    X_fit: Any, k: int, X_query: Any = None, *, block: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k nearest neighbours: ``(distances, indices)``, each ``(n_query, k)``.

    ``X_query=None`` queries the fitted cells themselves, each excluding itself (like
    scikit-learn's ``kneighbors()``); then each pair of blocks is computed once and used for
    both blocks' rows (half the arithmetic). Squared distances come from
    ``|a|^2 + |b|^2 - 2 a.b`` in float32 on dense blocks of ``block`` rows (matrix products
    through BLAS); memory is a few ``block x block`` matrices whatever the number of cells.
    """
    F = as_csr(X_fit)
    n_fit = F.shape[0]
    self_query = X_query is None
    Q = F if self_query else as_csr(X_query)
    n_q = Q.shape[0]
    limit = n_fit - 1 if self_query else n_fit
    if k > limit:
        raise ValueError(
            f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, "
            f"n_samples_fit = {n_fit}"
            + (" (the query point itself is excluded)" if self_query else "")
        )
    best_d = torch.full((n_q, k), float("inf"), dtype=torch.float32)
    best_i = torch.full((n_q, k), -1, dtype=torch.int64)
    if k == 0 or n_q == 0:
        return best_d.numpy(), best_i.numpy()
    sq_f = _row_sq_norms(F)
    sq_q = sq_f if self_query else _row_sq_norms(Q)
    f_starts = list(range(0, n_fit, block))
    if self_query:
        for a0 in f_starts:
            a1 = min(a0 + block, n_fit)
            A = _dense_block(F, a0, a1)
            for b0 in f_starts:
                if b0 < a0:
                    continue
                b1 = min(b0 + block, n_fit)
                B = A if b0 == a0 else _dense_block(F, b0, b1)
                d = torch.addmm(sq_f[a0:a1, None] + sq_f[None, b0:b1], A, B.T, alpha=-2.0)
                if b0 == a0:
                    d.fill_diagonal_(float("inf"))
                kk = min(k, b1 - b0)
                vals, idx = torch.topk(d, kk, dim=1, largest=False, sorted=True)
                _merge(best_d[a0:a1], best_i[a0:a1], vals, idx + b0)
                if b0 != a0:
                    dt = d.T.contiguous()
                    kk = min(k, a1 - a0)
                    vals, idx = torch.topk(dt, kk, dim=1, largest=False, sorted=True)
                    _merge(best_d[b0:b1], best_i[b0:b1], vals, idx + a0)
    else:
        for b0 in f_starts:
            b1 = min(b0 + block, n_fit)
            B = _dense_block(F, b0, b1)
            for a0 in range(0, n_q, block):
                a1 = min(a0 + block, n_q)
                A = _dense_block(Q, a0, a1)
                d = torch.addmm(sq_q[a0:a1, None] + sq_f[None, b0:b1], A, B.T, alpha=-2.0)
                kk = min(k, b1 - b0)
                vals, idx = torch.topk(d, kk, dim=1, largest=False, sorted=True)
                _merge(best_d[a0:a1], best_i[a0:a1], vals, idx + b0)
    return best_d.clamp_(min=0).sqrt_().numpy(), best_i.numpy()


class ExactNeighbors:
    """A scikit-learn-style k-NN estimator computing exact neighbours with ``exact_knn``.

    Drop-in for ``NearestNeighbors(n_neighbors)`` where imbalanced-learn accepts one (SMOTE's
    ``k_neighbors``): ``fit``, ``kneighbors``, ``kneighbors_graph``, ``get_params``.
    ``kneighbors(X)`` with the very matrix given to ``fit`` returns each cell first (distance
    0), then its ``n_neighbors - 1`` nearest other cells, as scikit-learn does.
    """

    def __init__(self, n_neighbors: int = SMOTE_K + 1, block: int = 4096) -> None:
        self.n_neighbors = n_neighbors
        self.block = block

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"n_neighbors": self.n_neighbors, "block": self.block}

    def set_params(self, **params: Any) -> ExactNeighbors:
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def fit(self, X: Any, y: Any = None) -> ExactNeighbors:
        self._fit_input = X
        self._fit_X = as_csr(X)
        self.n_samples_fit_ = self._fit_X.shape[0]
        return self

    def kneighbors(
        self, X: Any = None, n_neighbors: int | None = None, return_distance: bool = True
    ) -> Any:
        k = int(self.n_neighbors if n_neighbors is None else n_neighbors)
        if X is None:
            dist, idx = exact_knn(self._fit_X, k, block=self.block)
        elif X is self._fit_input or X is self._fit_X:
            if k > self.n_samples_fit_:
                raise ValueError(
                    f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, "
                    f"n_samples_fit = {self.n_samples_fit_}"
                )
            d, i = exact_knn(self._fit_X, k - 1, block=self.block)
            own = np.arange(self.n_samples_fit_, dtype=np.int64)[:, None]
            idx = np.hstack([own, i])
            dist = np.hstack([np.zeros_like(own, dtype=d.dtype), d])
        else:
            dist, idx = exact_knn(self._fit_X, k, X, block=self.block)
        return (dist, idx) if return_distance else idx

    def kneighbors_graph(
        self, X: Any = None, n_neighbors: int | None = None, mode: str = "connectivity"
    ) -> sp.csr_matrix:
        dist, idx = self.kneighbors(X, n_neighbors, return_distance=True)
        n_q, k = idx.shape
        data = np.ones(idx.size) if mode == "connectivity" else dist.ravel().astype(np.float64)
        indptr = np.arange(0, n_q * k + 1, k)
        return sp.csr_matrix((data, idx.ravel(), indptr), shape=(n_q, self.n_samples_fit_))


# ---------------------------------------------------------------------------- SMOTE
def _interpolate_rows(
    X: sp.csr_matrix, base: np.ndarray, other: np.ndarray, steps: np.ndarray
) -> sp.csr_matrix:
    """Rows ``X[base] + steps * (X[other] - X[base])`` as CSR, in two sparse passes.

    The same formula and operation order as imbalanced-learn's SMOTE (differences in float64,
    result cast to X's dtype), without its diagonal-matrix product and re-sorting.
    """
    A = X[base]
    A.sort_indices()
    B = X[other]
    B.sort_indices()
    D = (B - A).astype(np.float64)  # union support; zeros (a == b) dropped
    D.data *= np.repeat(np.asarray(steps, dtype=np.float64).ravel(), np.diff(D.indptr))
    out = A.astype(np.float64) + D
    result = sp.csr_matrix(
        (out.data.astype(X.dtype), out.indices, out.indptr), shape=out.shape, copy=False
    )
    result.has_sorted_indices = True
    return result


def _smote_class() -> type:
    """imbalanced-learn's SMOTE with a faster sparse sample generation (same samples)."""
    from imblearn.over_sampling import SMOTE

    class _SMOTE(SMOTE):
        def _generate_samples(self, X, nn_data, nn_num, rows, cols, steps, y_type=None, y=None):  # noqa: D401  (imblearn's private hook, same contract)
            if not sp.issparse(X) or y is not None or nn_data is not X:
                return super()._generate_samples(X, nn_data, nn_num, rows, cols, steps, y_type, y)
            return _interpolate_rows(as_csr(X), rows, nn_num[rows, cols], steps)

    return _SMOTE


# ---------------------------------------------------------------------------- external
def _import_object(path: str) -> Any:
    """The object named by ``pkg.mod.Attr``, ``pkg.mod:Attr`` or ``file.py:Attr``."""
    if ":" in path:
        module_name, attr = path.rsplit(":", 1)
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError("expected <module>.<Class>, <module>:<Class> or <file.py>:<Class>")
    if module_name.endswith(".py") or "/" in module_name:
        file = Path(module_name).expanduser().resolve()
        if not file.exists():
            raise FileNotFoundError(f"no file {file}")
        mod_name = f"_celltype_bench_balancer_{file.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {file} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, attr)


def _accepts(factory: Any, name: str) -> bool:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return False
    return name in sig.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
    )


def load_external(path: str, params: Mapping[str, Any] | None = None, *, seed: int = 0) -> Any:
    """Instantiate the external resampler at import ``path`` with ``params``.

    ``random_state=seed`` is added when the class accepts it and ``params`` does not set it.
    InputError naming the path and the fix if it cannot be imported, built, or has no
    ``fit_resample``.
    """
    if not isinstance(path, str) or not path.strip():
        raise InputError(
            f"external balancer path must be a non-empty string, got {path!r}",
            field="balancing.external",
            fix=_EXTERNAL_FIX,
        )
    try:
        factory = _import_object(path.strip())
    except Exception as exc:  # noqa: BLE001  (any import failure is the user's path)
        raise InputError(
            f"cannot import external balancer '{path}' ({type(exc).__name__}: {exc})",
            field="balancing.external",
            fix=_EXTERNAL_FIX,
        ) from None
    kwargs = dict(params or {})
    if callable(factory):
        if "random_state" not in kwargs and _accepts(factory, "random_state"):
            kwargs["random_state"] = int(seed) % (2**32)
        try:
            sampler = factory(**kwargs)
        except TypeError as exc:
            raise InputError(
                f"cannot create external balancer '{path}' with params {dict(params or {})} "
                f"({exc})",
                field="balancing.external.params",
                fix="pass only keyword arguments the class accepts",
            ) from None
    else:
        sampler = factory
    if not callable(getattr(sampler, "fit_resample", None)):
        raise InputError(
            f"external balancer '{path}' is not a resampler: "
            f"{type(sampler).__name__} has no fit_resample(X, y) method",
            field="balancing.external",
            fix=_EXTERNAL_FIX,
        )
    return sampler


# ---------------------------------------------------------------------------- resampling
def _counts(y: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(y, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def _check_xy(X: Any, y: Any) -> tuple[sp.csr_matrix, np.ndarray]:
    X = as_csr(X)
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != X.shape[0]:
        raise InputError(
            f"labels have shape {y.shape} but X has {X.shape[0]} rows",
            field="y",
            fix="pass one integer label per row of X",
        )
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise InputError(
                f"labels must be integer class codes, got dtype {y.dtype}",
                field="y",
                fix="encode labels, e.g. codes, classes = pd.factorize(labels, sort=True)",
            )
    if len(np.unique(y)) < 2:
        raise InputError(
            "balancing needs at least 2 classes in the training data",
            field="y",
            fix="check the split and the label column",
        )
    return X, y.astype(np.int64, copy=False)


def _builtin_kwargs(strategy: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(params or {})
    accepted = _BUILTIN_PARAMS[strategy]
    for key in kwargs:
        if key not in accepted:
            raise InputError(
                f"unknown parameter '{key}' for balancing strategy '{strategy}'",
                field=f"balancing.params.{key}",
                fix=f"accepted parameters: {', '.join(accepted)} (the seed sets random_state)",
            )
    return kwargs


def _run_sampler(sampler: Any, X: sp.csr_matrix, y: np.ndarray, what: str) -> tuple[Any, Any]:
    try:
        return sampler.fit_resample(X, y)
    except (ValueError, TypeError, RuntimeError) as exc:
        msg = str(exc)
        problem = f"balancing with {what} failed on the training data: {msg}"
        fix = "check the balancer's params against the training data"
        if "sparse" in msg.lower():
            fix = (
                "use a balancer that accepts sparse input (training data stay sparse here), "
                "e.g. imbalanced-learn's random samplers, SMOTE, ADASYN or NearMiss"
            )
        if "n_neighbors" in msg or "n_samples" in msg or "neighbo" in msg:
            counts = _counts(y)
            small = min(counts, key=counts.__getitem__)
            problem = (
                f"balancing with {what} failed: class {small} has only {counts[small]} cells, "
                f"too few for its neighbour setting ({msg})"
            )
            fix = (
                f"lower the balancer's n_neighbors/k_neighbors below {counts[small]}, "
                "or drop or merge classes that small"
            )
        raise InputError(problem, field="balancing", fix=fix) from None


def _smote(
    X: sp.csr_matrix,
    y: np.ndarray,
    seed: int,
    params: Mapping[str, Any] | None,
    log: logging.Logger,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, dict[str, Any]]:
    from imblearn.utils import check_sampling_strategy

    SMOTE = _smote_class()

    kwargs = _builtin_kwargs("smote", params)
    k = kwargs.get("k_neighbors", SMOTE_K)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InputError(
            f"smote's k_neighbors must be a whole number >= 1, got {k!r}",
            field="balancing.params.k_neighbors",
            fix="write e.g. k_neighbors: 5",
        )
    k = int(k)
    try:
        n_new = check_sampling_strategy(kwargs.get("sampling_strategy", "auto"), y, "over-sampling")
    except ValueError as exc:
        raise InputError(
            f"smote: bad sampling_strategy ({exc})",
            field="balancing.params.sampling_strategy",
            fix="use 'auto', 'minority', 'not majority', 'all', a float or {class: target}",
        ) from None
    counts = _counts(y)
    groups: dict[int, dict[int, int]] = {}
    singles: dict[int, int] = {}
    used_k: dict[int, int] = {}
    for c, extra in n_new.items():
        c, extra = int(c), int(extra)
        if extra <= 0:
            continue
        n_c = counts[c]
        if n_c == 1:
            log.warning(
                "smote: class %s has a single cell; it cannot be interpolated, so it is "
                "randomly oversampled instead (%d copies)",
                c,
                extra,
            )
            singles[c] = extra
            continue
        kc = min(k, n_c - 1)
        if kc < k:
            log.warning(
                "smote: class %s has %d cells; k_neighbors reduced from %d to %d for it",
                c,
                n_c,
                k,
                kc,
            )
        used_k[c] = kc
        groups.setdefault(kc, {})[c] = n_c + extra
    n = X.shape[0]
    parts_X: list[sp.csr_matrix] = [X]
    parts_y: list[np.ndarray] = [y]
    parts_src: list[np.ndarray] = [np.arange(n, dtype=np.int64)]
    for kc in sorted(groups, reverse=True):
        sampler = SMOTE(
            sampling_strategy=groups[kc],
            k_neighbors=ExactNeighbors(n_neighbors=kc + 1),
            random_state=int(seed) % (2**32),
        )
        Xr, yr = _run_sampler(sampler, X, y, "smote")
        Xr = as_csr(Xr)
        if parts_X[0] is X and len(parts_X) == 1:
            parts_X[0], parts_y[0] = Xr, np.asarray(yr)  # originals first, then synthetic
            parts_src[0] = np.concatenate(
                [parts_src[0], np.full(Xr.shape[0] - n, -1, dtype=np.int64)]
            )
        else:
            parts_X.append(Xr[n:])
            parts_y.append(np.asarray(yr)[n:])
            parts_src.append(np.full(Xr.shape[0] - n, -1, dtype=np.int64))
    for c, extra in singles.items():
        row = int(np.flatnonzero(y == c)[0])
        src = np.full(extra, row, dtype=np.int64)
        parts_X.append(X[src])
        parts_y.append(np.full(extra, c, dtype=np.int64))
        parts_src.append(src)
    X_out = parts_X[0] if len(parts_X) == 1 else sp.vstack(parts_X, format="csr")
    notes = {
        "k_neighbors": k,
        "k_used": {int(c): int(v) for c, v in used_k.items()},
        "randomly_oversampled_single_cells": sorted(int(c) for c in singles),
    }
    return as_csr(X_out), np.concatenate(parts_y), np.concatenate(parts_src), notes


def _provenance(
    sampler: Any, X: sp.csr_matrix, y: np.ndarray, X_out: sp.csr_matrix, y_out: np.ndarray
) -> np.ndarray:
    """Row of ``X`` each output row copies, or -1 for a synthetic row."""
    n, n_out = X.shape[0], X_out.shape[0]
    idx = getattr(sampler, "sample_indices_", None)
    if idx is not None and len(idx) == n_out:
        return np.asarray(idx, dtype=np.int64)
    if n_out >= n and np.array_equal(y_out[:n], y) and (X_out[:n] != X).nnz == 0:
        return np.concatenate([np.arange(n), np.full(n_out - n, -1)]).astype(np.int64)
    return np.full(n_out, -1, dtype=np.int64)


def _resample(
    X: Any,
    y: Any,
    strategy: str,
    *,
    seed: int,
    external: str | None = None,
    params: Mapping[str, Any] | None = None,
    logger: logging.Logger | None = None,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, dict[str, Any]]:
    """``resample`` plus the source row of every output row (-1: synthetic)."""
    log = logger if logger is not None else get_logger()
    if external is not None and strategy not in (EXTERNAL, *STRATEGIES):
        strategy_name = strategy  # a user's label for an external balancer
        strategy = EXTERNAL
    else:
        strategy_name = strategy
    _check_name(strategy)
    if external is not None and strategy != EXTERNAL:
        raise InputError(
            f"an external balancer ('{external}') was given with built-in strategy '{strategy}'",
            field="balancing",
            fix="use strategy 'external' with an external path, or no external path",
        )
    if strategy == EXTERNAL and external is None:
        raise InputError(
            "strategy 'external' needs the import path of a resampler",
            field="balancing.external",
            fix=_EXTERNAL_FIX,
        )
    X, y = _check_xy(X, y)
    n = X.shape[0]
    info: dict[str, Any] = {
        "strategy": strategy_name,
        "external": external,
        "params": dict(params or {}),
        "seed": int(seed),
        "n_before": int(n),
        "class_counts_before": _counts(y),
    }
    t0 = time.perf_counter()
    if not is_resampler(strategy):
        if params:
            raise InputError(
                f"strategy '{strategy}' takes no resampling params, got {dict(params)}",
                field="balancing.params",
                fix="drop the params",
            )
        X_out, y_out, src = X, y, np.arange(n, dtype=np.int64)
        info["resampled"] = False
    elif strategy == "smote":
        X_out, y_out, src, notes = _smote(X, y, seed, params, log)
        info.update(notes)
        info["resampled"] = True
    else:
        if strategy == EXTERNAL:
            sampler = load_external(str(external), params, seed=seed)
            what = f"external balancer '{external}'"
        else:
            from imblearn.over_sampling import RandomOverSampler
            from imblearn.under_sampling import RandomUnderSampler

            kwargs = _builtin_kwargs(strategy, params)
            klass = RandomOverSampler if strategy == "oversample" else RandomUnderSampler
            sampler = klass(random_state=int(seed) % (2**32), **kwargs)
            what = strategy
        Xr, yr = _run_sampler(sampler, X, y, what)
        y_out = np.asarray(yr)
        if y_out.ndim != 1 or len(y_out) != Xr.shape[0]:
            raise InputError(
                f"{what} returned {Xr.shape[0]} rows but {y_out.shape} labels",
                field="balancing",
                fix="its fit_resample must return (X, y) with one label per row",
            )
        if not sp.issparse(Xr):
            log.warning("%s returned a dense matrix; converting it back to sparse CSR", what)
        X_out = as_csr(Xr)
        y_out = y_out.astype(np.int64, copy=False)
        src = _provenance(sampler, X, y, X_out, y_out)
        info["resampled"] = True
    info["seconds"] = time.perf_counter() - t0
    info["n_after"] = int(X_out.shape[0])
    info["n_synthetic"] = int((src < 0).sum())
    info["class_counts_after"] = _counts(y_out)
    if info["resampled"]:
        log.info(
            "balancing %s: %d -> %d cells (%d synthetic) in %.2fs",
            strategy_name,
            n,
            X_out.shape[0],
            info["n_synthetic"],
            info["seconds"],
        )
    return X_out, y_out, src, info


def resample(
    X: Any,
    y: Any,
    strategy: str,
    *,
    seed: int,
    external: str | None = None,
    params: Mapping[str, Any] | None = None,
    logger: logging.Logger | None = None,
) -> tuple[sp.csr_matrix, np.ndarray, dict[str, Any]]:
    """Resample ``(X, y)`` with a data-level strategy: ``(X_resampled, y_resampled, info)``.

    ``X``: cells x genes (kept sparse; returned as CSR float32), ``y``: integer class codes.
    ``strategy``: 'oversample', 'undersample', 'smote', or 'external' with ``external`` = an
    import path (see the module docstring); 'none' and the weightings return the input
    unchanged (they act inside the method). ``params`` go to the sampler (built-ins:
    ``sampling_strategy``, plus ``k_neighbors`` for smote, ``shrinkage`` for oversample,
    ``replacement`` for undersample); ``seed`` is its ``random_state``. ``info``: strategy,
    n_before/n_after, class_counts_before/after, n_synthetic, seconds (and smote's k used per
    class). Originals come first in the same order when the sampler keeps them all.
    """
    X_out, y_out, _src, info = _resample(
        X, y, strategy, seed=seed, external=external, params=params, logger=logger
    )
    return X_out, y_out, info


def _synthetic_column(col: pd.Series, mask: np.ndarray) -> pd.Series:
    """``col`` with rows ``mask`` set to 'synthetic' (numbers and booleans: NaN)."""
    if not mask.any():
        return col
    if isinstance(col.dtype, pd.CategoricalDtype):
        if "synthetic" not in col.cat.categories:
            col = col.cat.add_categories(["synthetic"])
        col = col.copy()
        col[mask] = "synthetic"
        return col
    if pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
        values = col.to_numpy(dtype=np.float64, na_value=np.nan).copy()
        values[mask] = np.nan
        return pd.Series(values, index=col.index, name=col.name)
    values = col.astype(object).to_numpy().copy()
    values[mask] = "synthetic"
    return pd.Series(values, index=col.index, name=col.name)


def resample_adata(
    train: ad.AnnData,
    strategy: str,
    *,
    label_key: str = "cell_type",
    seed: int,
    external: str | None = None,
    params: Mapping[str, Any] | None = None,
    logger: logging.Logger | None = None,
) -> ad.AnnData:
    """Resample a training AnnData (``X`` = log1p(CP10k)) with a data-level strategy.

    Returns a new AnnData: ``X`` CSR float32; ``obs[label_key]`` the labels; copied cells keep
    every other obs column, the first copy of a cell keeps its name and further copies are
    named ``'<name>-dup<j>'``; synthetic cells (SMOTE, external oversamplers) are named
    ``'smote-<i>'`` / ``'synthetic-<i>'`` and hold 'synthetic' in the other text columns (NaN
    in numeric ones). ``var`` is kept; layers, obsm and obsp are not (synthetic cells have no
    counts); ``uns['balancing']`` holds the info of ``resample`` with class labels as keys.
    'none' and the weighting strategies return ``train`` itself, unchanged.
    """
    from .methods.base import read_labels

    labels = read_labels(train, label_key, "training")
    codes, classes = pd.factorize(labels, sort=True)
    X_out, y_out, src, info = _resample(
        train.X, codes, strategy, seed=seed, external=external, params=params, logger=logger
    )
    if not info["resampled"]:
        return train
    classes = np.asarray(classes, dtype=object)
    for key in ("class_counts_before", "class_counts_after"):
        info[key] = {str(classes[c]): n for c, n in info[key].items()}
    if "k_used" in info:
        info["k_used"] = {str(classes[c]): v for c, v in info["k_used"].items()}
        info["randomly_oversampled_single_cells"] = [
            str(classes[c]) for c in info["randomly_oversampled_single_cells"]
        ]
    synthetic = src < 0
    take = np.where(synthetic, 0, src)
    obs = train.obs.iloc[take].copy()
    orig = pd.Series(np.asarray(train.obs_names, dtype=object)[take])
    dup = pd.Series(src).groupby(src).cumcount().to_numpy()
    names = orig.where(dup == 0, orig + "-dup" + pd.Series(dup).astype(str))
    prefix = "smote" if info["strategy"] == "smote" else "synthetic"
    n_syn = int(synthetic.sum())
    names = names.to_numpy(dtype=object)
    names[synthetic] = (prefix + "-" + pd.Series(np.arange(n_syn)).astype(str)).to_numpy(
        dtype=object
    )
    index = pd.Index(names, dtype=object)
    if not index.is_unique:
        index = ad.utils.make_index_unique(index)
    obs.index = index
    for col in obs.columns:
        if col != label_key:
            obs[col] = _synthetic_column(obs[col], synthetic).set_axis(obs.index)
    label_values = classes[y_out]
    if isinstance(train.obs[label_key].dtype, pd.CategoricalDtype):
        obs[label_key] = pd.Categorical(
            label_values, categories=train.obs[label_key].cat.categories
        )
    else:
        obs[label_key] = label_values
    out = ad.AnnData(
        X=as_csr(X_out), obs=obs, var=train.var.copy(), uns={"balancing": _jsonable(info)}
    )
    return out


def _jsonable(info: Mapping[str, Any]) -> dict[str, Any]:
    """``info`` storable in ``uns`` (h5ad): string keys, no None, no empty dicts."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            value = _jsonable(value)
            if not value:
                continue
        elif isinstance(value, np.generic):
            value = value.item()
        out[str(key)] = value
    return out


# ---------------------------------------------------------------------------- timing
def time_strategies(
    X: Any,
    y: Any,
    strategies: Iterable[str],
    *,
    seed: int,
    repeats: int = 1,
    externals: Mapping[str, Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """Wall seconds each strategy needs to produce one epoch's balanced training data.

    - resamplers ('oversample', 'undersample', 'smote', externals): the resampling;
    - 'weighted_sampling': the per-cell weights, one epoch of indices, gathering those rows;
    - 'class_weight': computing the class weights (the data are used as they are);
    - 'none': nothing (about 0).

    ``externals`` maps extra strategy names to ``{'class': import path, 'params': {...}}``; a
    strategy written as an import path (containing '.' or ':') is an external too. Seconds
    are the median over ``repeats``. Columns: strategy, n_cells, seconds, n_out (cells
    produced).
    """
    X, y = _check_xy(X, y)
    n, k = X.shape[0], int(y.max()) + 1
    externals = dict(externals or {})
    rows = []
    log = get_logger()
    for strategy in strategies:
        ext = None
        if strategy in externals:
            ext = externals[strategy]
        elif strategy not in STRATEGIES and ("." in strategy or ":" in strategy):
            ext = {"class": strategy}
        elif strategy not in STRATEGIES:
            _check_name(strategy)
        times: list[float] = []
        n_out = n
        for r in range(max(1, int(repeats))):
            t0 = time.perf_counter()
            if ext is not None:
                _, yr, _ = resample(
                    X,
                    y,
                    EXTERNAL,
                    seed=seed + r,
                    external=str(ext["class"]),
                    params=ext.get("params"),
                    logger=log,
                )
                n_out = len(yr)
            elif strategy in RESAMPLERS:
                Xr, yr, _ = resample(X, y, strategy, seed=seed + r, logger=log)
                n_out = len(yr)
                del Xr
            elif strategy == "weighted_sampling":
                idx = epoch_indices(y, np.random.default_rng([seed, r]))
                Xe = X[idx]
                n_out = Xe.shape[0]
                del Xe
            elif strategy == "class_weight":
                class_weights(y, k)
            times.append(time.perf_counter() - t0)
        rows.append(
            {
                "strategy": strategy,
                "n_cells": int(n),
                "seconds": float(np.median(times)),
                "n_out": int(n_out),
            }
        )
    return pd.DataFrame(rows, columns=["strategy", "n_cells", "seconds", "n_out"])
