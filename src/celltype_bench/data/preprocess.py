"""Preprocessing: count checks, cell filters, counts layer, log1p(CP10k), gene alignment.

``preprocess`` turns a raw dataset (integer counts in ``X``) into the processed shape:
``layers['counts']`` = raw counts and ``X = log1p(counts / total * 1e4)``, both CSR float32,
with the standard obs columns kept and what was dropped recorded in ``uns['preprocess']``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
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
)
"""obs columns carried over by :func:`preprocess` when present."""

TARGET_SUM = 1e4
LOG_NORMALISED_MAX = 20.0
"""Non-integer data whose maximum is below this look log-normalised."""
_INT_TOL = 1e-4

_RAW_FIX = (
    "pass raw integer UMI counts in X (e.g. adata.raw.X or adata.layers['counts'] of the "
    "original object), not normalised, log-transformed or scaled values"
)


def _values(X: Any) -> np.ndarray:
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def check_counts(X: Any, *, file: str | None = None, field: str = "X") -> None:
    """Raise InputError unless ``X`` holds finite, non-negative integer counts."""
    data = _values(X)
    if data.size == 0:
        return
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(
            f"count matrix has non-numeric dtype {data.dtype}", file=file, field=field, fix=_RAW_FIX
        )
    finite = np.isfinite(data)
    if not finite.all():
        raise InputError(
            f"count matrix has {int((~finite).sum())} NaN or infinite values",
            file=file,
            field=field,
            fix=_RAW_FIX,
        )
    lo, hi = float(data.min()), float(data.max())
    if lo < 0:
        raise InputError(
            f"count matrix has negative values (min {lo:.4g}); it looks scaled or centred, "
            "not raw counts",
            file=file,
            field=field,
            fix=_RAW_FIX,
        )
    if np.issubdtype(data.dtype, np.integer):
        return
    n_frac = int(np.count_nonzero(np.abs(data - np.rint(data)) > _INT_TOL))
    if n_frac:
        if hi < LOG_NORMALISED_MAX:
            problem = (
                f"X looks log-normalised: {n_frac} non-integer values and max {hi:.4g} "
                f"< {LOG_NORMALISED_MAX:g}"
            )
        else:
            problem = (
                f"X has {n_frac} non-integer values (max {hi:.4g}); it looks normalised "
                "(e.g. CP10k/CPM/TPM), not raw counts"
            )
        raise InputError(problem, file=file, field=field, fix=_RAW_FIX)


def _as_csr_float32(X: Any) -> sp.csr_matrix:
    M = sp.csr_matrix(X, dtype=np.float32, copy=True)
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
    check_counts(adata.X, file=file, field="X")
    counts = _as_csr_float32(adata.X)

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
    if n_out == 0:
        raise InputError(
            f"no cells left after filtering ({n_in} cells: {int(all_zero.sum())} all-zero, "
            f"{int(low.sum())} with < {min_genes} genes, {n_small_class} in classes with "
            f"< {min_cells_per_class} cells)",
            file=file,
            field="X",
            fix="check that X holds counts of this dataset, or lower preprocess.min_genes",
        )

    rows = np.flatnonzero(keep)
    counts = counts[rows]
    cols = [c for c in KEEP_OBS if c in adata.obs]
    if label_key not in cols:
        cols.append(label_key)
    obs = adata.obs.iloc[rows][cols].copy()
    for col in cols:
        if isinstance(obs[col].dtype, pd.CategoricalDtype):
            obs[col] = obs[col].cat.remove_unused_categories()
        elif obs[col].dtype == object:
            obs[col] = obs[col].astype(str).astype("category")
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

    The share of ``genes`` found in ``adata`` is recorded in ``uns['align_genes']``; below
    ``min_overlap`` an InputError reports it. Duplicated names on either side are an error.
    """
    file = None if source is None else str(source)
    target = pd.Index([str(g) for g in genes])
    if len(target) == 0:
        raise InputError("the target gene list is empty", file=file, field="genes")
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
        "n_data_genes_dropped": int(adata.n_vars - n_overlap),
    }
    return out
