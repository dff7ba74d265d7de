"""scTab's data augmentation (Fischer et al. 2024): donor-difference vectors added in training.

Vectors are computed from the TRAINING cells only (:func:`compute_augmentation_vectors`):

1. sample ``n_sample`` (500,000) cells with probability proportional to 1 / (size of the
   cell's class), without replacement (as scTab's notebook) when there are at least that
   many cells (``n_sample`` = number of cells takes every cell once), with replacement
   otherwise (a cell drawn twice weighs twice in its donor mean);
2. per cell type, the mean expression (``X`` = log1p(CP10k)) of each donor's sampled cells;
3. per cell type, differences of pairs of donor means: all pairs ``i < j`` of its donors,
   at most ``max_pairs`` (300) of them drawn without replacement (seeded). A type seen in a
   single donor gives no vector (logged); if no type has two donors, :class:`InputError`;
4. entries with ``|v| <= zero_below`` (0.25) set to zero;
5. clipped to ``[-clip, clip]`` ([-1.5, 1.5]);
6. k-means with ``n_clusters`` (50) clusters (scikit-learn ``KMeans``, k-means++, seeded; at
   most one cluster per vector); the members of the clusters with more than
   ``min_cluster_size`` (2,000) vectors are kept, and ``n_vectors`` (5,000) of them drawn
   without replacement (all of them when fewer are kept, logged).

Small data. The paper's size thresholds fit the census (~49,000 difference vectors, a mean
cluster of ~1,000): on a few thousand cells no cluster may exceed 2,000 vectors. Then
(logged as a warning, recorded in the saved ``info``) the clusters at least as large as the
mean cluster size (``n_difference_vectors / n_clusters``) are kept instead: still an outlier
filter that drops the small clusters, never an empty set. If every kept vector is zero (no
donor difference exceeds ``zero_below``), :class:`InputError` (augmentation would be a no-op).

Two deliberate differences from scTab's notebook: it drew one pair fewer than exist per type
(``n * (n - 1) / 2 - 1``, so a type with two donors gave none); here every pair counts. The
donor unit is ``obs[donor_key]`` (scTab: ``dataset_id + "_" + donor_id``, which the census
source already writes into ``donor_id``).

In training (:func:`apply_augmentation`) every cell gets a uniformly drawn vector with a random
sign: ``clamp(x + s * v, 0, 9)``. Vectors are stored as npz (:func:`save_vectors` /
:func:`load_vectors`) with the gene order they were computed on; :func:`augmentation_step` is
the DAG step (one file per task replicate).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .errors import InputError
from .labels import empty_values
from .training import as_csr, get_logger

AUGMENT_MIN = 0.0
AUGMENT_MAX = 9.0
VECTORS_KEY = "vectors"
GENES_KEY = "genes"
INFO_KEY = "info"

DEFAULTS: dict[str, Any] = {
    "n_sample": 500_000,
    "max_pairs": 300,
    "zero_below": 0.25,
    "clip": 1.5,
    "n_clusters": 50,
    "min_cluster_size": 2000,
    "n_vectors": 5000,
}
"""scTab's settings (the keys of the config block ``augmentation``)."""


def _check_settings(settings: dict[str, Any]) -> None:
    ints = ("n_sample", "max_pairs", "n_clusters", "n_vectors")
    for key in ints:
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise InputError(
                f"augmentation setting '{key}' must be an integer >= 1, got {value!r}",
                field=f"augmentation.{key}",
                fix=f"use a whole number like scTab's {DEFAULTS[key]}",
            )
    mcs = settings["min_cluster_size"]
    if isinstance(mcs, bool) or not isinstance(mcs, int | np.integer) or mcs < 0:
        raise InputError(
            f"augmentation setting 'min_cluster_size' must be an integer >= 0, got {mcs!r}",
            field="augmentation.min_cluster_size",
            fix="use a whole number like scTab's 2000",
        )
    for key, low_ok in (("zero_below", True), ("clip", False)):
        value = settings[key]
        bad = isinstance(value, bool) or not isinstance(value, int | float | np.number)
        if bad or not np.isfinite(value) or value < 0 or (value == 0 and not low_ok):
            raise InputError(
                f"augmentation setting '{key}' must be a number {'>=' if low_ok else '>'} 0, "
                f"got {value!r}",
                field=f"augmentation.{key}",
                fix=f"use a number like scTab's {DEFAULTS[key]}",
            )


def _column(adata: ad.AnnData, key: str, what: str) -> np.ndarray:
    if key not in adata.obs.columns:
        cols = ", ".join(map(str, list(adata.obs.columns)[:12])) or "none"
        raise InputError(
            f"the training cells have no {what} column '{key}'",
            field=key,
            fix=f"name the {what} column (obs columns: {cols}), or set augment: false",
        )
    s = adata.obs[key]
    bad = empty_values(s)
    if bad.any():
        raise InputError(
            f"{int(bad.sum())} training cells have a missing {what} "
            f"(e.g. cell '{adata.obs_names[np.flatnonzero(bad)[0]]}')",
            field=key,
            fix=f"fill obs['{key}'] for every training cell",
        )
    return s.astype(str).to_numpy()


def _sample_weights(codes: np.ndarray, n_sample: int, rng: np.random.Generator) -> np.ndarray:
    """How often each cell is drawn: ``n_sample`` draws with p ~ 1/(class size)."""
    n = len(codes)
    p = 1.0 / np.bincount(codes)[codes]
    p /= p.sum()
    replace = n < n_sample
    idx = rng.choice(n, size=n_sample, replace=replace, p=p)
    return np.bincount(idx, minlength=n).astype(np.float64)


def _donor_means(
    X: sp.csr_matrix, weight: np.ndarray, types: np.ndarray, donors: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted mean expression per (type, donor) group: (means, group type, group donor)."""
    drawn = np.flatnonzero(weight > 0)
    groups = pd.DataFrame({"t": types[drawn], "d": donors[drawn]})
    keys = groups.drop_duplicates().sort_values(["t", "d"]).reset_index(drop=True)
    index = pd.MultiIndex.from_frame(keys)
    gid = index.get_indexer(pd.MultiIndex.from_frame(groups))
    G = sp.csr_matrix((weight[drawn], (gid, drawn)), shape=(len(keys), X.shape[0]))
    sums = np.asarray((G @ X).toarray(), dtype=np.float64)
    totals = np.asarray(G.sum(axis=1), dtype=np.float64)
    return sums / totals, keys["t"].to_numpy(), keys["d"].to_numpy()


def _compute(
    adata: ad.AnnData,
    *,
    label_key: str,
    donor_key: str,
    seed: int,
    **settings: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The vectors and a record of how they were made (see :func:`compute_augmentation_vectors`)."""
    _check_settings(settings)
    log = get_logger()
    if adata.n_obs == 0:
        raise InputError("no training cells to compute augmentation vectors from", field="obs")
    labels = _column(adata, label_key, "label")
    donors = _column(adata, donor_key, "donor")
    X = as_csr(adata.X)
    if hasattr(X, "read_rows"):
        X = X.read_rows(np.arange(X.shape[0]))
    rng = np.random.default_rng(int(seed))
    types, codes = np.unique(labels, return_inverse=True)
    n_sample = int(settings["n_sample"])
    weight = _sample_weights(codes, n_sample, rng)
    log.info(
        "augmentation: %d draws from %d training cells (%s replacement, p ~ 1/class size)",
        n_sample,
        adata.n_obs,
        "with" if adata.n_obs < n_sample else "without",
    )
    means, g_type, _ = _donor_means(X, weight, labels, donors)

    diffs, per_type, single = [], {}, []
    for t in types:
        rows = np.flatnonzero(g_type == t)
        d = len(rows)
        if d < 2:
            single.append(str(t))
            per_type[str(t)] = 0
            continue
        i, j = np.triu_indices(d, k=1)
        if len(i) > settings["max_pairs"]:
            pick = np.sort(rng.choice(len(i), size=int(settings["max_pairs"]), replace=False))
            i, j = i[pick], j[pick]
        diffs.append((means[rows[i]] - means[rows[j]]).astype(np.float32))
        per_type[str(t)] = len(i)
    if not diffs:
        raise InputError(
            f"no cell type has training cells from 2 or more donors ({len(types)} types, "
            f"{len(np.unique(donors))} donors in obs['{donor_key}']): augmentation vectors are "
            "differences between donors of the same cell type",
            field=donor_key,
            fix="train on several donors per cell type (e.g. a donor split of a multi-donor "
            f"dataset), check obs['{donor_key}'] holds donor ids, or set augment: false for "
            "the method on this task",
        )
    if single:
        log.warning(
            "augmentation: %d cell types have training cells from one donor only and give no "
            "vectors: %s",
            len(single),
            single[:10],
        )
    V = np.concatenate(diffs, axis=0)
    V[np.abs(V) <= settings["zero_below"]] = 0.0
    np.clip(V, -settings["clip"], settings["clip"], out=V)
    n_diff = V.shape[0]

    labels_k, sizes, k = _kmeans(V, int(settings["n_clusters"]), int(seed))
    min_size = int(settings["min_cluster_size"])
    kept = sizes > min_size
    fallback = not kept.any()
    if fallback:
        mean_size = n_diff / k
        kept = sizes >= mean_size
        log.warning(
            "augmentation: no k-means cluster has more than min_cluster_size=%d vectors "
            "(%d difference vectors, largest cluster %d); keeping the %d clusters at least as "
            "large as the mean cluster (%.1f vectors) instead",
            min_size,
            n_diff,
            int(sizes.max()),
            int(kept.sum()),
            mean_size,
        )
    members = np.flatnonzero(kept[labels_k])
    n_vectors = int(settings["n_vectors"])
    if len(members) > n_vectors:
        chosen = np.sort(rng.choice(members, size=n_vectors, replace=False))
    else:
        chosen = members
        if len(members) < n_vectors:
            log.info(
                "augmentation: the kept clusters hold %d vectors (< n_vectors=%d); keeping all",
                len(members),
                n_vectors,
            )
    out = np.ascontiguousarray(V[chosen])
    nonzero = np.abs(out).sum(axis=1) > 0
    if not nonzero.any():
        raise InputError(
            f"every augmentation vector is zero: no donor difference of a cell type exceeds "
            f"zero_below={settings['zero_below']}",
            field="augmentation.zero_below",
            fix="lower augmentation.zero_below, or set augment: false for the method",
        )
    info = {
        "seed": int(seed),
        "settings": {
            k_: (v.item() if isinstance(v, np.generic) else v) for k_, v in settings.items()
        },
        "label_key": label_key,
        "donor_key": donor_key,
        "n_train_cells": int(adata.n_obs),
        "sampled_with_replacement": bool(adata.n_obs < n_sample),
        "pairs_per_type": per_type,
        "single_donor_types": single,
        "n_difference_vectors": int(n_diff),
        "n_clusters": int(k),
        "cluster_sizes": sizes.astype(int).tolist(),
        "clusters_kept": np.flatnonzero(kept).astype(int).tolist(),
        "fallback_mean_size": bool(fallback),
        "n_vectors": int(out.shape[0]),
        "n_zero_vectors": int((~nonzero).sum()),
        "density": float(np.count_nonzero(out) / max(out.size, 1)),
    }
    log.info(
        "augmentation: %d difference vectors, %d clusters (%d kept%s), %d vectors, "
        "%.1f%% nonzero entries",
        n_diff,
        k,
        len(info["clusters_kept"]),
        ", mean-size fallback" if fallback else "",
        out.shape[0],
        100 * info["density"],
    )
    return out, info


def _kmeans(V: np.ndarray, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Cluster labels, cluster sizes and the number of clusters (at most one per vector)."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    k = min(n_clusters, V.shape[0])
    if k < n_clusters:
        get_logger().info(
            "augmentation: %d difference vectors < n_clusters=%d; using %d clusters",
            V.shape[0],
            n_clusters,
            k,
        )
    if k == 1:
        labels = np.zeros(V.shape[0], dtype=np.int64)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            km = KMeans(n_clusters=k, n_init="auto", random_state=seed).fit(sp.csr_matrix(V))
        for w in caught:
            get_logger().warning("augmentation: k-means: %s", w.message)
        labels = np.asarray(km.labels_, dtype=np.int64)
    return labels, np.bincount(labels, minlength=k), k


def compute_augmentation_vectors(
    adata: ad.AnnData,
    *,
    label_key: str = "cell_type",
    donor_key: str = "donor_id",
    n_sample: int = 500_000,
    max_pairs: int = 300,
    zero_below: float = 0.25,
    clip: float = 1.5,
    n_clusters: int = 50,
    min_cluster_size: int = 2000,
    n_vectors: int = 5000,
    seed: int = 0,
) -> np.ndarray:
    """scTab's augmentation vectors (``n x genes``, float32) from the cells of ``adata``.

    Pass TRAINING cells only (``X`` = log1p(CP10k)); the recipe, the small-data fallback and
    the errors are described in the module docstring. Deterministic for a seed.
    """
    vectors, _ = _compute(
        adata,
        label_key=label_key,
        donor_key=donor_key,
        seed=seed,
        n_sample=n_sample,
        max_pairs=max_pairs,
        zero_below=zero_below,
        clip=clip,
        n_clusters=n_clusters,
        min_cluster_size=min_cluster_size,
        n_vectors=n_vectors,
    )
    return vectors


# ---------------------------------------------------------------------------- files
def save_vectors(
    vectors: np.ndarray,
    genes: list[str] | np.ndarray | pd.Index,
    path: str | os.PathLike,
    info: dict[str, Any] | None = None,
) -> None:
    """Write vectors (float32), their gene order and an optional info record as npz, atomically."""
    path = Path(path)
    vectors = np.asarray(vectors, dtype=np.float32)
    genes_arr = np.asarray([str(g) for g in genes], dtype=str)
    if vectors.ndim != 2 or vectors.shape[1] != len(genes_arr):
        raise ValueError(
            f"vectors of shape {vectors.shape} do not match {len(genes_arr)} gene names"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                **{
                    VECTORS_KEY: vectors,
                    GENES_KEY: genes_arr,
                    INFO_KEY: np.asarray(json.dumps(info or {}, sort_keys=True)),
                },
            )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_vectors_info(path: str | os.PathLike) -> dict[str, Any]:
    """The info record saved beside the vectors ({} if none)."""
    with _open_npz(Path(path)) as data:
        return json.loads(str(data[INFO_KEY])) if INFO_KEY in data.files else {}


def _open_npz(path: Path) -> Any:
    if not path.exists():
        raise InputError(
            "augmentation vectors file does not exist",
            file=str(path),
            fix="run the augmentation rule for this task and replicate",
        )
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(
            f"cannot read augmentation vectors ({type(exc).__name__}: {exc})",
            file=str(path),
            fix=f"delete it and rerun the augmentation rule (`rm {path}`)",
        ) from exc


def load_vectors(path: str | os.PathLike, genes: list[str] | np.ndarray | pd.Index) -> np.ndarray:
    """Vectors saved by :func:`save_vectors`, checked to be on exactly ``genes`` (same order)."""
    path = Path(path)
    expected = [str(g) for g in genes]
    try:
        with _open_npz(path) as data:
            if VECTORS_KEY not in data.files or GENES_KEY not in data.files:
                raise InputError(
                    f"not an augmentation vectors file (keys: {sorted(data.files)})",
                    file=str(path),
                    fix="rerun the augmentation rule",
                )
            vectors = np.asarray(data[VECTORS_KEY], dtype=np.float32)
            saved = [str(g) for g in data[GENES_KEY]]
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(
            f"cannot read augmentation vectors ({type(exc).__name__}: {exc})",
            file=str(path),
            fix=f"delete it and rerun the augmentation rule (`rm {path}`)",
        ) from exc
    if saved != expected:
        if set(saved) == set(expected):
            detail = "the same genes in a different order"
        else:
            missing, extra = set(expected) - set(saved), set(saved) - set(expected)
            detail = (
                f"{len(missing)} training genes missing (e.g. {sorted(missing)[:3]}), "
                f"{len(extra)} extra genes (e.g. {sorted(extra)[:3]})"
            )
        raise InputError(
            f"augmentation vectors were computed on other genes than the training genes: {detail}",
            file=str(path),
            field="genes",
            fix="recompute them from this task's training cells (rerun the augmentation rule)",
        )
    if vectors.ndim != 2 or vectors.shape[1] != len(expected) or not np.isfinite(vectors).all():
        raise InputError(
            f"augmentation vectors have shape {vectors.shape} or non-finite values",
            file=str(path),
            fix="rerun the augmentation rule",
        )
    return vectors


# ---------------------------------------------------------------------------- training
def apply_augmentation(
    x: torch.Tensor, vectors: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """scTab's augmentation of a batch: ``clamp(x + s * v, 0, 9)`` per row.

    Each row gets a vector ``v`` drawn uniformly from the rows of ``vectors`` and a sign ``s``
    = +1 or -1 with equal probability, both from ``generator`` (on ``x``'s device). Returns a
    new tensor; ``x`` is not modified.
    """
    if vectors.ndim != 2 or vectors.shape[1] != x.shape[1]:
        raise ValueError(f"vectors {tuple(vectors.shape)} do not fit batch {tuple(x.shape)}")
    if vectors.shape[0] == 0:
        raise ValueError("no augmentation vectors")
    n = x.shape[0]
    idx = torch.randint(vectors.shape[0], (n,), generator=generator, device=x.device)
    sign = torch.randint(0, 2, (n, 1), generator=generator, device=x.device).to(x.dtype)
    sign = sign.mul_(2.0).sub_(1.0)
    return torch.addcmul(x, sign, vectors[idx].to(x.dtype)).clamp_(AUGMENT_MIN, AUGMENT_MAX)


# ---------------------------------------------------------------------------- DAG step
def augmentation_step(data: str, split: str, replicate: str, out: str, params: dict) -> None:
    """DAG step: vectors from one task replicate's training cells -> ``out`` (npz).

    ``params``: ``seed`` and any of :data:`DEFAULTS` (config block ``augmentation``), plus
    optional ``label_key`` / ``donor_key``. Validation and test cells are never read into the
    computation.
    """
    from .steps import load_run_data

    settings = dict(DEFAULTS)
    params = dict(params or {})
    seed = int(params.pop("seed", 0))
    label_key = str(params.pop("label_key", "cell_type"))
    donor_key = str(params.pop("donor_key", "donor_id"))
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise InputError(
            f"unknown augmentation setting(s) {unknown}",
            field="augmentation",
            fix="accepted: " + ", ".join(sorted(DEFAULTS)),
        )
    settings.update(params)
    train = load_run_data(data, split, replicate)["train"]
    try:
        vectors, info = _compute(
            train, label_key=label_key, donor_key=donor_key, seed=seed, **settings
        )
    except InputError as exc:
        raise InputError(exc.problem, file=exc.file or data, field=exc.field, fix=exc.fix) from None
    info.update({"data": str(data), "split": str(split), "replicate": str(replicate)})
    save_vectors(vectors, list(map(str, train.var_names)), out, info=info)
    get_logger().info("augmentation: wrote %d x %d vectors to %s", *vectors.shape, out)
