"""Preprocessing: count checks, cell filters, counts layer, log1p(CP10k), gene alignment.

``preprocess`` turns a raw dataset (integer counts in ``X``) into the processed shape:
``layers['counts']`` = raw counts and ``X = log1p(counts / total * 1e4)``, both CSR float32,
with the standard obs columns kept and what was dropped recorded in ``uns['preprocess']``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from ..labels import empty_values

KEEP_OBS: tuple[str, ...] = (
    "cell_type",
    "cell_type_ontology_term_id",
    "donor_id",
    "tissue",
    "assay",
    "batch",
    "dataset_id",
    "study",
)
"""obs columns carried over by :func:`preprocess` when present."""

log = logging.getLogger("celltype_bench")

TARGET_SUM = 1e4
LOG_NORMALISED_MAX = 20.0
"""Non-integer data whose maximum is below this look log-normalised."""
MAX_COUNT = float(2**24)
"""Largest count accepted: float32 (the processed dtype) holds integers exactly up to 2**24."""
CONSTANT_SUM_CV = 1e-3
"""Per-cell sums (of X or expm1(X)) with a smaller coefficient of variation are "constant"."""
_INT_TOL = 1e-4

_RAW_FIX = (
    "pass raw integer UMI counts in X (e.g. adata.raw.X or adata.layers['counts'] of the "
    "original object), not normalised, log-transformed or scaled values"
)


def _values(X: Any) -> np.ndarray:
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def _row_sums(X: Any, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Per-row sums of ``X`` (or of ``transform(X)``, applied to the stored values), float64."""
    if sp.issparse(X):
        M = sp.csr_matrix(X, dtype=np.float64, copy=True)
        if transform is not None:
            M.data = transform(M.data)
        return np.asarray(M.sum(axis=1)).ravel()
    A = np.asarray(X, dtype=np.float64)
    if transform is not None:
        A = transform(A)
    return A.sum(axis=1) if A.ndim == 2 else np.atleast_1d(A.sum())


def _constant_sum(sums: np.ndarray) -> float | None:
    """The common value of per-cell sums when (at least 2 non-empty cells) they are constant."""
    sums = sums[sums > 0]
    if len(sums) < 2:
        return None
    mean = float(sums.mean())
    return mean if float(sums.std()) <= CONSTANT_SUM_CV * mean else None


def _not_counts_problem(X: Any, n_frac: int, hi: float) -> str:
    """Why non-integer data are not counts: log-normalised, normalised, or just non-integer."""
    if hi < LOG_NORMALISED_MAX:
        problem = (
            f"X looks log-normalised: {n_frac} non-integer values and max {hi:.4g} "
            f"< {LOG_NORMALISED_MAX:g}"
        )
        total = _constant_sum(_row_sums(X, np.expm1))
        if total is not None:
            problem += (
                f"; expm1(X) sums to ~{total:.4g} in every cell (log1p of counts scaled to a "
                "fixed total per cell)"
            )
        return problem
    total = _constant_sum(_row_sums(X))
    if total is not None:
        return (
            f"X looks normalised, not raw counts: {n_frac} non-integer values and every cell "
            f"sums to ~{total:.4g} (CP10k/CPM-like)"
        )
    return (
        f"X has {n_frac} non-integer values (max {hi:.4g}); it looks normalised "
        "(e.g. CP10k/CPM/TPM), not raw counts"
    )


def check_counts(X: Any, *, file: str | None = None, field: str = "X", fix: str = _RAW_FIX) -> None:
    """Raise InputError unless ``X`` holds finite, non-negative integer counts.

    Non-integer data are diagnosed: log-normalised (max below :data:`LOG_NORMALISED_MAX`, with
    per-cell expm1 sums reported when constant), normalised (constant per-cell sums) or other.
    ``fix`` is the advice given in the error.
    """
    if X is None:
        raise InputError("there is no count matrix", file=file, field=field, fix=fix)
    data = _values(X)
    if data.size == 0:
        return
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise InputError(
            f"count matrix has dtype {data.dtype}, not a real integer or float type",
            file=file,
            field=field,
            fix=fix,
        )
    finite = np.isfinite(data)
    if not finite.all():
        raise InputError(
            f"count matrix has {int((~finite).sum())} NaN or infinite values",
            file=file,
            field=field,
            fix=fix,
        )
    lo, hi = float(data.min()), float(data.max())
    if lo < 0:
        raise InputError(
            f"count matrix has negative values (min {lo:.4g}); it looks scaled or centred, "
            "not raw counts",
            file=file,
            field=field,
            fix=fix,
        )
    if hi > MAX_COUNT:
        raise InputError(
            f"count matrix has values up to {hi:.4g}, above {MAX_COUNT:.0f} (2**24, the largest "
            "integer float32 holds exactly); these are not UMI counts of single cells",
            file=file,
            field=field,
            fix=fix,
        )
    if np.issubdtype(data.dtype, np.integer):
        return
    n_frac = int(np.count_nonzero(np.abs(data - np.rint(data)) > _INT_TOL))
    if n_frac:
        raise InputError(_not_counts_problem(X, n_frac, hi), file=file, field=field, fix=fix)


def _as_counts_csr(X: Any) -> sp.csr_matrix:
    """Checked counts as CSR float32, rounded to exact integers (within-tolerance floats)."""
    M = sp.csr_matrix(X, dtype=np.float32, copy=True)
    M.sum_duplicates()
    M.data = np.rint(M.data)
    M.eliminate_zeros()
    M.sort_indices()
    return M


def log1p_cp10k(counts: sp.csr_matrix, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """``log1p(counts / row total * target_sum)`` as CSR float32 (all-zero rows stay zero)."""
    counts = sp.csr_matrix(counts)
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    data = np.log1p(counts.data.astype(np.float64) * np.repeat(scale, np.diff(counts.indptr)))
    return sp.csr_matrix(
        (data.astype(np.float32), counts.indices.copy(), counts.indptr.copy()), shape=counts.shape
    )


def _check_names(adata: ad.AnnData, file: str | None) -> None:
    for name, index in (("obs_names", adata.obs_names), ("var_names", adata.var_names)):
        if not index.is_unique:
            dups = index[index.duplicated()].unique()[:5].tolist()
            raise InputError(
                f"{name} are not unique (e.g. {dups})",
                file=file,
                field=name,
                fix="make them unique at the source (obs/var_names_make_unique)",
            )


def _storable(col: pd.Series) -> pd.Series:
    """An obs column h5ad can store: numbers and booleans stay, anything else becomes
    categorical strings (missing values stay missing)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        return col.cat.remove_unused_categories()
    if pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
        return col
    missing = col.isna().to_numpy(dtype=bool)
    text = col.astype(str).to_numpy(dtype=object)
    text[missing] = None
    return pd.Series(pd.Categorical(text), index=col.index, name=col.name)


def _counts_fix(adata: ad.AnnData) -> str:
    """The advice for non-count X, pointing at the counts this object already carries."""
    if "counts" in adata.layers:
        return (
            "pass raw counts: this object has layers['counts'], use adata.X = "
            "adata.layers['counts'] (X must hold raw integer UMI counts, not normalised, "
            "log-transformed or scaled values)"
        )
    if adata.raw is not None:
        return (
            "pass raw counts: if adata.raw.X holds them, use adata = adata.raw.to_adata() "
            "(X must hold raw integer UMI counts, not normalised, log-transformed or scaled "
            "values)"
        )
    return _RAW_FIX


def preprocess(
    adata: ad.AnnData,
    *,
    min_genes: int = 1,
    min_cells_per_class: int = 1,
    label_key: str = "cell_type",
    source: str | os.PathLike | None = None,
) -> ad.AnnData:
    """Check counts, drop empty/low-gene cells and tiny classes, add counts layer and log1p CP10k.

    ``source`` names the input file in error messages. Cells with no counts, or fewer than
    ``min_genes`` detected genes, are dropped; then cells of classes with fewer than
    ``min_cells_per_class`` cells. Counts of each are recorded in ``uns['preprocess']``.
    """
    file = None if source is None else str(source)
    _check_names(adata, file)
    if label_key not in adata.obs:
        raise InputError(
            f"no label column '{label_key}' in obs (columns: {list(adata.obs.columns)})",
            file=file,
            field=label_key,
            fix="set the dataset's label_key to the column holding the cell-type labels",
        )
    labels = adata.obs[label_key]
    missing = empty_values(labels)
    if missing.any():
        raise InputError(
            f"{int(missing.sum())} cells have an empty or missing label",
            file=file,
            field=label_key,
            fix="drop unlabeled cells or fill their labels before preprocessing",
        )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(
            f"empty dataset ({adata.n_obs} cells x {adata.n_vars} genes)",
            file=file,
            field="X",
            fix="check the source settings of this dataset and rerun the rule that writes it",
        )
    check_counts(adata.X, file=file, field="X", fix=_counts_fix(adata))
    counts = _as_counts_csr(adata.X)

    n_in = counts.shape[0]
    n_detected = np.diff(counts.indptr)
    all_zero = n_detected == 0
    low = ~all_zero & (n_detected < min_genes)
    keep = ~(all_zero | low)
    n_small_class = 0
    small_classes: list[str] = []
    if min_cells_per_class > 1:
        lab = labels.astype(str).to_numpy()
        sizes = pd.Series(lab[keep]).value_counts()
        small_classes = sorted(sizes.index[sizes < min_cells_per_class].tolist())
        small = keep & np.isin(lab, small_classes)
        n_small_class = int(small.sum())
        keep &= ~small
    n_out = int(keep.sum())
    where = file or "data"
    if all_zero.any():
        log.warning("%s: dropped %d all-zero cells (no counts)", where, int(all_zero.sum()))
    if low.any():
        log.info("%s: dropped %d cells with < %d detected genes", where, int(low.sum()), min_genes)
    if n_small_class:
        log.info(
            "%s: dropped %d cells of %d classes with < %d cells: %s",
            where,
            n_small_class,
            len(small_classes),
            min_cells_per_class,
            small_classes[:10],
        )
    if n_out == 0:
        raise InputError(
            f"no cells left after filtering ({n_in} cells: {int(all_zero.sum())} all-zero, "
            f"{int(low.sum())} with < {min_genes} genes, {n_small_class} in classes with "
            f"< {min_cells_per_class} cells; filter settings min_genes={min_genes}, "
            f"min_cells_per_class={min_cells_per_class})",
            file=file,
            field="X",
            fix="check that X holds counts of this dataset, or lower preprocess.min_genes "
            "in the config",
        )

    rows = np.flatnonzero(keep)
    counts = counts[rows]
    cols = [c for c in KEEP_OBS if c in adata.obs]
    if label_key not in cols:
        cols.append(label_key)
    obs = adata.obs.iloc[rows][cols].copy()
    for col in cols:
        obs[col] = _storable(obs[col])
    obs["n_counts"] = np.asarray(counts.sum(axis=1)).ravel().astype(np.float32)
    obs["n_genes"] = np.diff(counts.indptr).astype(np.int32)

    out = ad.AnnData(
        X=log1p_cp10k(counts),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(adata.var_names.astype(str))),
        layers={"counts": counts},
    )
    if "source" in adata.uns:
        out.uns["source"] = copy.deepcopy(adata.uns["source"])
    out.uns["preprocess"] = {
        "n_cells_in": int(n_in),
        "n_cells_out": n_out,
        "n_all_zero_dropped": int(all_zero.sum()),
        "n_low_genes_dropped": int(low.sum()),
        "n_small_class_dropped": n_small_class,
        "small_classes_dropped": small_classes,
        "min_genes": int(min_genes),
        "min_cells_per_class": int(min_cells_per_class),
        "target_sum": TARGET_SUM,
        "X": "log1p(counts / total * 1e4)",
    }
    return out


def _take_columns(M: Any, selector: sp.csr_matrix) -> sp.csr_matrix:
    out = (sp.csr_matrix(M, dtype=np.float32) @ selector).tocsr().astype(np.float32)
    out.sort_indices()
    return out


def align_genes(
    adata: ad.AnnData,
    genes: Sequence[str],
    min_overlap: float = 0.5,
    source: str | os.PathLike | None = None,
) -> ad.AnnData:
    """Reorder/zero-fill the columns (X and layers) to ``genes`` by name.

    The share of ``genes`` found in ``adata`` is logged and recorded in ``uns['align_genes']``;
    below ``min_overlap`` (a fraction in [0, 1]) an InputError reports it, at or above it the
    missing genes are zero-filled. Duplicated names on either side are an error.
    """
    file = None if source is None else str(source)
    if not 0.0 <= float(min_overlap) <= 1.0:
        raise InputError(
            f"min_overlap must be a fraction in [0, 1], got {min_overlap}",
            field="min_overlap",
            fix="e.g. 0.5 (refuse data holding less than half of the target genes)",
        )
    target = pd.Index([str(g) for g in genes])
    if len(target) == 0:
        raise InputError(
            "the target gene list is empty",
            file=file,
            field="genes",
            fix="pass the reference's gene names (e.g. the trained model's var_names)",
        )
    if target.has_duplicates:
        dups = target[target.duplicated()].unique()[:5].tolist()
        raise InputError(
            f"duplicated gene names in the target list (e.g. {dups})",
            file=file,
            field="genes",
            fix="pass each gene once",
        )
    have = pd.Index(adata.var_names.astype(str))
    if have.has_duplicates:
        dups = have[have.duplicated()].unique()[:5].tolist()
        raise InputError(
            f"duplicated gene names in the data (e.g. {dups})",
            file=file,
            field="var_names",
            fix="make var_names unique (var_names_make_unique) or sum duplicated genes",
        )
    idx = have.get_indexer(target)
    found = idx >= 0
    n_overlap = int(found.sum())
    share = n_overlap / len(target)
    if share < min_overlap:
        raise InputError(
            f"only {share:.1%} of the {len(target)} target genes ({n_overlap}) are in the data "
            f"(minimum {min_overlap:.0%})",
            file=file,
            field="var_names",
            fix="check that both use the same gene identifiers (symbols vs Ensembl ids, species)",
        )
    log.info(
        "%s: %d of %d target genes found (%.1f%%); %d zero-filled, %d data genes dropped",
        file or "data",
        n_overlap,
        len(target),
        100 * share,
        len(target) - n_overlap,
        adata.n_vars - n_overlap,
    )
    selector = sp.csr_matrix(
        (np.ones(n_overlap, dtype=np.float32), (idx[found], np.flatnonzero(found))),
        shape=(adata.n_vars, len(target)),
    )
    out = ad.AnnData(
        X=_take_columns(adata.X, selector),
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=target),
        layers={k: _take_columns(v, selector) for k, v in adata.layers.items()},
        obsm={k: v.copy() for k, v in adata.obsm.items()},
        uns=copy.deepcopy(dict(adata.uns)),
    )
    out.uns["align_genes"] = {
        "n_target": int(len(target)),
        "n_overlap": n_overlap,
        "share": float(share),
        "n_zero_filled": int(len(target) - n_overlap),
        "n_data_genes_dropped": int(adata.n_vars - n_overlap),
    }
    return out
