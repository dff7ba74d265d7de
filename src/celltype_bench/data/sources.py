"""Raw data sources. Every source returns the *standard raw shape*:

* ``X``: raw integer counts, ``scipy.sparse`` CSR, float32;
* unique ``obs_names`` (cell ids) and unique ``var_names`` (gene symbols);
* obs columns ``cell_type`` (author label), ``cell_type_ontology_term_id`` (CL id), ``donor_id``,
  ``tissue``, ``assay``, ``batch`` (categorical strings);
* ``uns['source']``: where the data came from and with which parameters.

Sources
-------
``pbmc68k``: the 700 real PBMCs x 765 genes bundled with scanpy
(``scanpy/datasets/10x_pbmc68k_reduced.h5ad``). Its ``raw.X`` holds log1p(counts / n_counts
* 1e4); integer counts are recovered as ``rint(expm1(raw.X) * n_counts / 1e4)``.

``census_like``: a synthetic census-like corpus (many donors, datasets, assays, tissues,
mixed-granularity Cell Ontology labels, power-law class sizes) generated from the model below,
grounded in the real PBMC68k counts.

Census-like generative model
----------------------------
1. Reference statistics from the real PBMC68k counts (10 author types k, 765 genes g):
   ``p_k`` = pooled counts of type k / pooled library size, shrunk towards the all-cell profile
   with a pseudo-library of 500 counts; ``m_k`` = mean log library size of type k, ``s`` = pooled
   within-type sd of log library size; ``phi_g`` = negative-binomial overdispersion by moments,
   ``sum_i[(x_ig - mu_ig)^2 - mu_ig] / sum_i mu_ig^2`` with ``mu_ig = lib_i p_k(i)g``, clipped to
   [0.01, 10].
2. Cell types (:data:`CENSUS_TYPES`, 26 real CL terms at mixed granularity). Each profile
   ``q_t`` comes from a *base*:
   ``real``   = a PBMC68k type's ``p_k`` unchanged;
   ``parent`` = mean of its real children's profiles (``T cell`` = mean of the 5 real T types),
   or the closest real type plus a weak perturbation (6 markers, |log2 FC| ~ U(0.5, 1));
   ``child``  = its parent's profile plus 12 marker genes with |log2 FC| ~ U(1, 2);
   ``novel``  (no PBMC counterpart: platelet, erythrocyte, mast, plasma, pDC, gamma-delta, MAIT)
   = the nearest real type plus 30 markers with |log2 FC| ~ U(2, 4).
   Markers are random genes, 60 % up-regulated (any gene) and 40 % down-regulated (genes above
   the base's median); ``q_t`` is renormalised to sum to 1; ``m_t`` is the mean of the bases'.
   Bases follow biological proximity, which is not always a CL ``is_a`` edge: in CL v2026-03-26
   ``plasma cell`` is not under ``B cell`` and ``regulatory T cell`` is under ``T cell`` but not
   under ``CD4-positive, alpha-beta T cell``; scoring uses the ontology, not these bases.
3. Class sizes follow a shifted power law over the abundance rank r = 1..T:
   ``n_t ~ (r + 2)^-a`` with ``a = ln(imbalance) / ln((T + 2) / 3)`` (largest/smallest =
   ``imbalance`` before flooring), floored at ``min(min_cells, n_cells // (2 T))`` cells and
   rounded to sum to ``n_cells``.
4. Datasets, donors, tissues: ``n_datasets`` datasets share the donors evenly
   (``donor_id = f"{dataset_id}_donorNN"``, as in scTab); each dataset has one assay from the
   scTab 10x list (a seeded shuffle, cycled) and covers ``blood`` plus two or three of
   ``bone marrow``, ``lung``, ``spleen``. A cell of type t draws its tissue with
   P(tissue | t) ~ prior(tissue) x enrichment(t, tissue) over the covered tissues, then its donor
   among the donors whose dataset covers that tissue, ~ donor weight ``w_d ~ LogNormal(0, 0.5)``.
   ``batch`` = ``dataset_id``.
5. Effects: donor gene factor ``e_dg = exp(N(0, donor_effect^2) - donor_effect^2 / 2)``, dataset
   gene factor ``b_jg`` likewise with ``batch_effect``; donor and dataset library factors
   ``exp(N(0, library_sd^2))``.
6. Counts: ``L_i = exp(N(m_t, s^2))`` x donor and dataset library factors;
   ``mu_ig = L_i q_tg e_dg b_jg / sum_g(q_tg e_dg b_jg)``;
   ``lambda_ig ~ Gamma(shape=1/phi_g, scale=mu_ig phi_g)``, ``x_ig ~ Poisson(lambda_ig)``,
   i.e. NB with mean ``mu_ig`` and variance ``mu_ig + phi_g mu_ig^2``.
All draws come from one ``numpy.random.default_rng(seed)`` in a fixed order, so the corpus is a
deterministic function of its parameters; the counts are drawn in vectorised blocks of cells.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from ..labels import empty_values
from .adapters import load_combined, load_url_source
from .census import load_census

log = logging.getLogger("celltype_bench")

STANDARD_OBS: tuple[str, ...] = (
    "cell_type",
    "cell_type_ontology_term_id",
    "donor_id",
    "tissue",
    "assay",
    "batch",
)
"""obs columns every raw source must provide."""

PBMC68K_FILE = "10x_pbmc68k_reduced.h5ad"
PBMC68K_COUNT_TOLERANCE = 0.1
"""Max distance to the nearest integer of the recovered counts (observed: 0.082, one entry)."""

PBMC68K_LABEL_MAP: dict[str, str] = {
    "Dendritic": "CL:0000451",  # dendritic cell
    "CD14+ Monocyte": "CL:0001054",  # CD14-positive monocyte
    "CD19+ B": "CL:0000236",  # B cell
    "CD4+/CD25 T Reg": "CL:0000815",  # regulatory T cell
    "CD8+ Cytotoxic T": "CL:0000794",  # CD8-positive, alpha-beta cytotoxic T cell
    "CD8+/CD45RA+ Naive Cytotoxic": "CL:0000900",  # naive thymus-derived CD8+ ab T cell
    "CD56+ NK": "CL:0000623",  # natural killer cell
    "CD4+/CD45RO+ Memory": "CL:0000897",  # CD4-positive, alpha-beta memory T cell
    "CD34+": "CL:0008001",  # hematopoietic precursor cell
    "CD4+/CD45RA+/CD25- Naive T": "CL:0000895",  # naive thymus-derived CD4+ ab T cell
}
"""PBMC68k author labels (``obs.bulk_labels``) -> Cell Ontology ids (CL v2026-03-26)."""

SCTAB_10X_ASSAYS: tuple[str, ...] = (
    "10x 5' v2",
    "10x 3' v3",
    "10x 3' v2",
    "10x 5' v1",
    "10x 3' v1",
    "10x 3' transcription profiling",
    "10x 5' transcription profiling",
)
"""The 10x assays scTab selected from the CELLxGENE census."""

TISSUES: tuple[str, ...] = ("blood", "bone marrow", "lung", "spleen")
TISSUE_PRIOR: tuple[float, ...] = (0.45, 0.2, 0.15, 0.2)


@dataclass(frozen=True)
class CensusType:
    """One cell type of the census-like corpus.

    ``kind`` is ``real`` | ``parent`` | ``child`` | ``novel``; ``base`` names PBMC68k author
    labels or earlier census types the profile derives from; ``rank`` is the abundance rank
    (1 = most abundant); ``enrich`` multiplies the tissue prior, in :data:`TISSUES` order.
    """

    label: str
    cl_id: str
    kind: str
    base: tuple[str, ...]
    rank: int
    enrich: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)


_T_REAL = (
    "CD4+/CD25 T Reg",
    "CD4+/CD45RO+ Memory",
    "CD4+/CD45RA+/CD25- Naive T",
    "CD8+ Cytotoxic T",
    "CD8+/CD45RA+ Naive Cytotoxic",
)

# In dependency order (a base must come before the types derived from it).
CENSUS_TYPES: tuple[CensusType, ...] = (
    CensusType("T cell", "CL:0000084", "parent", _T_REAL, 7),
    CensusType("CD4-positive, alpha-beta T cell", "CL:0000624", "parent", _T_REAL[:3], 9),
    CensusType("CD8-positive, alpha-beta T cell", "CL:0000625", "parent", _T_REAL[3:], 15),
    CensusType("regulatory T cell", "CL:0000815", "real", ("CD4+/CD25 T Reg",), 14),
    CensusType(
        "naive thymus-derived CD4-positive, alpha-beta T cell",
        "CL:0000895",
        "real",
        ("CD4+/CD45RA+/CD25- Naive T",),
        2,
        (1.5, 0.8, 0.5, 1.5),
    ),
    CensusType(
        "CD4-positive, alpha-beta memory T cell", "CL:0000897", "real", ("CD4+/CD45RO+ Memory",), 3
    ),
    CensusType(
        "naive thymus-derived CD8-positive, alpha-beta T cell",
        "CL:0000900",
        "real",
        ("CD8+/CD45RA+ Naive Cytotoxic",),
        8,
        (1.5, 0.8, 0.5, 1.5),
    ),
    CensusType(
        "CD8-positive, alpha-beta cytotoxic T cell",
        "CL:0000794",
        "real",
        ("CD8+ Cytotoxic T",),
        5,
        (1.0, 0.8, 1.5, 1.0),
    ),
    CensusType(
        "gamma-delta T cell",
        "CL:0000798",
        "novel",
        ("CD8+ Cytotoxic T",),
        18,
        (1.0, 0.5, 1.5, 1.5),
    ),
    CensusType(
        "mucosal-associated invariant T cell",
        "CL:0000940",
        "novel",
        ("CD8+ Cytotoxic T",),
        17,
        (1.0, 0.3, 2.0, 0.8),
    ),
    CensusType(
        "natural killer cell", "CL:0000623", "real", ("CD56+ NK",), 11, (1.5, 0.8, 1.5, 1.0)
    ),
    CensusType(
        "CD16-positive, CD56-dim natural killer cell, human",
        "CL:0000939",
        "child",
        ("natural killer cell",),
        4,
        (1.5, 0.8, 1.2, 1.0),
    ),
    CensusType("B cell", "CL:0000236", "real", ("CD19+ B",), 10, (1.0, 1.0, 0.5, 3.0)),
    CensusType("naive B cell", "CL:0000788", "child", ("B cell",), 6, (1.0, 1.0, 0.3, 3.0)),
    CensusType("memory B cell", "CL:0000787", "child", ("B cell",), 13, (1.0, 0.8, 0.8, 3.0)),
    CensusType("plasma cell", "CL:0000786", "novel", ("B cell",), 22, (0.3, 4.0, 2.0, 3.0)),
    CensusType(
        "CD14-positive monocyte", "CL:0001054", "real", ("CD14+ Monocyte",), 1, (2.0, 1.0, 1.0, 0.8)
    ),
    CensusType("monocyte", "CL:0000576", "parent", ("CD14+ Monocyte",), 16, (2.0, 1.0, 1.0, 0.8)),
    CensusType(
        "CD14-low, CD16-positive monocyte",
        "CL:0002396",
        "child",
        ("monocyte",),
        12,
        (2.0, 0.5, 1.0, 0.8),
    ),
    CensusType("mast cell", "CL:0000097", "novel", ("CD14+ Monocyte",), 26, (0.2, 1.0, 8.0, 0.5)),
    CensusType("dendritic cell", "CL:0000451", "real", ("Dendritic",), 21, (1.0, 1.0, 2.0, 1.5)),
    CensusType(
        "conventional dendritic cell",
        "CL:0000990",
        "child",
        ("dendritic cell",),
        19,
        (1.0, 1.0, 3.0, 2.0),
    ),
    CensusType(
        "plasmacytoid dendritic cell",
        "CL:0000784",
        "novel",
        ("dendritic cell",),
        24,
        (1.0, 2.0, 1.0, 1.5),
    ),
    CensusType(
        "hematopoietic precursor cell", "CL:0008001", "real", ("CD34+",), 25, (0.5, 8.0, 0.3, 1.0)
    ),
    CensusType("platelet", "CL:0000233", "novel", ("CD34+",), 20, (3.0, 1.0, 0.5, 0.5)),
    CensusType("erythrocyte", "CL:0000232", "novel", ("CD34+",), 23, (1.0, 6.0, 0.5, 2.0)),
)
"""The census-like cell types: real CL labels and ids at mixed granularity."""

# (number of marker genes, min |log2 FC|, max |log2 FC|) per kind of type.
_PERTURBATION = {
    "real": (0, 0.0, 0.0),
    "parent": (6, 0.5, 1.0),
    "child": (12, 1.0, 2.0),
    "novel": (30, 2.0, 4.0),
}
_SHRINK_COUNTS = 500.0
_RANK_SHIFT = 2.0  # flattens the head of the power law (largest class ~40 % of cells)
_BLOCK = 4096


# ---- PBMC68k --------------------------------------------------------------------------------
def pbmc68k_path() -> Path:
    """Path of the PBMC68k file shipped inside the installed scanpy package (no download)."""
    spec = importlib.util.find_spec("scanpy")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "scanpy is not installed, so its bundled PBMC68k file cannot be found",
            field="source.kind",
            fix="install the project's dependencies (scanpy==1.11.5)",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / PBMC68K_FILE


def load_pbmc68k() -> ad.AnnData:
    """The 700 real PBMCs bundled with scanpy, as integer counts in the standard raw shape."""
    path = pbmc68k_path()
    if not path.exists():
        raise InputError(
            "the PBMC68k file bundled with scanpy is missing",
            file=str(path),
            fix="reinstall scanpy==1.11.5, which ships scanpy/datasets/" + PBMC68K_FILE,
        )
    from ..io import read_h5ad

    with warnings.catch_warnings():
        # the bundled file predates the current h5ad encoding: anndata warns on every element
        warnings.simplefilter("ignore")
        src = read_h5ad(path)
    if src.raw is None or "n_counts" not in src.obs or "bulk_labels" not in src.obs:
        raise InputError(
            "expected raw.X, obs.n_counts and obs.bulk_labels",
            file=str(path),
            fix="reinstall scanpy==1.11.5",
        )
    raw = sp.csr_matrix(src.raw.X, dtype=np.float64)
    n_counts = src.obs["n_counts"].to_numpy(dtype=np.float64)
    values = np.expm1(raw.data) * np.repeat(n_counts, np.diff(raw.indptr)) / 1e4
    rounded = np.rint(values)
    err = float(np.abs(values - rounded).max()) if values.size else 0.0
    if err > PBMC68K_COUNT_TOLERANCE:
        raise InputError(
            f"counts recovered as expm1(raw.X) * n_counts / 1e4 are not integers "
            f"(max distance to an integer {err:.3f} > {PBMC68K_COUNT_TOLERANCE})",
            file=str(path),
            field="raw.X",
            fix="the bundled file changed; reinstall scanpy==1.11.5",
        )
    X = sp.csr_matrix(
        (rounded.astype(np.float32), raw.indices.copy(), raw.indptr.copy()), shape=raw.shape
    )
    X.eliminate_zeros()

    labels = src.obs["bulk_labels"].astype(str).to_numpy()
    unknown = sorted(set(labels) - set(PBMC68K_LABEL_MAP))
    if unknown:
        raise InputError(
            f"author labels without a Cell Ontology mapping: {unknown}",
            file=str(path),
            field="bulk_labels",
            fix="add them to PBMC68K_LABEL_MAP",
        )
    order = list(PBMC68K_LABEL_MAP)
    obs = pd.DataFrame(index=pd.Index(src.obs_names.astype(str), name=None))
    obs["cell_type"] = pd.Categorical(labels, categories=order)
    obs["cell_type_ontology_term_id"] = pd.Categorical(
        [PBMC68K_LABEL_MAP[lab] for lab in labels],
        categories=list(dict.fromkeys(PBMC68K_LABEL_MAP.values())),
    )
    for col, value in (
        ("donor_id", "pbmc68k_donorA"),
        ("tissue", "blood"),
        ("assay", "10x 3' v1"),
        ("batch", "pbmc68k"),
    ):
        obs[col] = pd.Categorical([value] * len(obs))
    obs["n_counts"] = n_counts.astype(np.float32)
    var = pd.DataFrame(index=pd.Index(src.raw.var_names.astype(str), name=None))
    out = ad.AnnData(X=X, obs=obs, var=var)
    out.uns["source"] = {
        "kind": "pbmc68k",
        "file": f"scanpy/datasets/{PBMC68K_FILE}",
        "description": "700 PBMCs x 765 genes (10x Genomics PBMC 68k, Zheng et al. 2017), "
        "reduced version bundled with scanpy",
        "counts": "rint(expm1(raw.X) * obs.n_counts / 1e4)",
        "max_rounding_distance": err,
        "labels": "obs.bulk_labels (author labels), mapped with PBMC68K_LABEL_MAP",
    }
    return out


# ---- census-like ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceStats:
    """Statistics of a real count matrix that ground the census-like model."""

    genes: tuple[str, ...]
    profiles: dict[str, np.ndarray]  # author label -> expression proportions (sum 1)
    log_lib_mean: dict[str, float]  # author label -> mean log library size
    log_lib_sd: float  # pooled within-type sd of log library size
    phi: np.ndarray  # per-gene NB overdispersion


def reference_stats(reference: ad.AnnData, label_key: str = "cell_type") -> ReferenceStats:
    """Per-type profiles, library-size distribution and per-gene dispersion of real counts."""
    if label_key not in reference.obs:
        raise InputError(
            f"the reference has no obs column '{label_key}'",
            field=label_key,
            fix="pass a reference in the standard raw shape (e.g. load_pbmc68k())",
        )
    X = sp.csr_matrix(reference.X, dtype=np.float64)
    labels = reference.obs[label_key].astype(str).to_numpy()
    lib = np.asarray(X.sum(axis=1)).ravel()
    if (lib <= 0).any():
        keep = lib > 0
        X, labels, lib = X[keep], labels[keep], lib[keep]
    codes, uniq = pd.factorize(labels, sort=True)
    onehot = sp.csr_matrix(
        (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(uniq), len(codes))
    )
    type_sums = np.asarray((onehot @ X).todense())  # types x genes
    global_p = type_sums.sum(axis=0) / type_sums.sum()
    global_p = np.maximum(global_p, 1e-12)
    global_p /= global_p.sum()
    type_lib = type_sums.sum(axis=1, keepdims=True)
    profiles_arr = (type_sums + _SHRINK_COUNTS * global_p) / (type_lib + _SHRINK_COUNTS)

    loglib = np.log(lib)
    counts_per_type = np.bincount(codes, minlength=len(uniq))
    mean_loglib = np.bincount(codes, weights=loglib, minlength=len(uniq)) / counts_per_type
    resid = loglib - mean_loglib[codes]
    dof = max(len(loglib) - len(uniq), 1)
    sd = float(np.sqrt((resid**2).sum() / dof))

    dense = X.toarray()
    mu = lib[:, None] * profiles_arr[codes]
    num = ((dense - mu) ** 2 - mu).sum(axis=0)
    den = (mu**2).sum(axis=0)
    phi = np.clip(num / np.maximum(den, 1e-12), 0.01, 10.0)

    return ReferenceStats(
        genes=tuple(str(g) for g in reference.var_names),
        profiles={str(k): profiles_arr[i] for i, k in enumerate(uniq)},
        log_lib_mean={str(k): float(mean_loglib[i]) for i, k in enumerate(uniq)},
        log_lib_sd=sd,
        phi=phi,
    )


@functools.lru_cache(maxsize=1)
def _default_reference_stats() -> ReferenceStats:
    return reference_stats(load_pbmc68k())


def _build_profiles(
    stats: ReferenceStats, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Profiles (types x genes, rows sum to 1), log library means, and a base description."""
    n_genes = len(stats.genes)
    built: dict[str, tuple[np.ndarray, float]] = {}
    described: dict[str, str] = {}
    for ct in CENSUS_TYPES:
        parts = []
        for name in ct.base:
            if name in built:
                parts.append(built[name])
            elif name in stats.profiles:
                parts.append((stats.profiles[name], stats.log_lib_mean[name]))
            else:
                raise InputError(
                    f"the reference has no type '{name}' needed for census type '{ct.label}'",
                    field="cell_type",
                    fix=f"use a reference with the PBMC68k author labels {list(PBMC68K_LABEL_MAP)}",
                )
        q = np.mean([p for p, _ in parts], axis=0)
        m = float(np.mean([lib for _, lib in parts]))
        n_markers, lo, hi = _PERTURBATION[ct.kind]
        if ct.kind == "parent" and len(ct.base) > 1:
            n_markers = 0
        if n_markers:
            n_up = int(round(0.6 * n_markers))
            n_down = n_markers - n_up
            up = rng.choice(n_genes, size=n_up, replace=False)
            high = np.setdiff1d(np.flatnonzero(q > np.median(q)), up)
            down = rng.choice(high, size=min(n_down, len(high)), replace=False)
            lfc = np.zeros(n_genes)
            lfc[up] = rng.uniform(lo, hi, size=len(up))
            lfc[down] = -rng.uniform(lo, hi, size=len(down))
            q = q * np.exp2(lfc)
        q = q / q.sum()
        built[ct.label] = (q, m)
        markers = f" + {n_markers} markers |log2FC| {lo}-{hi}" if n_markers else ""
        described[ct.label] = f"{ct.kind}: mean of {list(ct.base)}{markers}"
    Q = np.stack([built[ct.label][0] for ct in CENSUS_TYPES])
    M = np.array([built[ct.label][1] for ct in CENSUS_TYPES])
    return Q, M, described


def class_sizes(n_cells: int, n_types: int, imbalance: float, min_cells: int) -> np.ndarray:
    """Power-law class sizes by abundance rank (index 0 = rank 1), summing to ``n_cells``."""
    if n_cells < n_types:
        raise InputError(
            f"n_cells={n_cells} is smaller than the number of cell types ({n_types})",
            field="source.n_cells",
            fix=f"ask for at least {n_types} cells (a few thousand give realistic sizes)",
        )
    shift = _RANK_SHIFT
    a = math.log(imbalance) / math.log((n_types + shift) / (1 + shift))
    w = (np.arange(1, n_types + 1, dtype=np.float64) + shift) ** -a
    floor = max(1, min(int(min_cells), n_cells // (2 * n_types)))
    raw = np.maximum(w / w.sum() * n_cells, floor)
    big = raw > floor
    raw[big] -= (raw.sum() - n_cells) * raw[big] / raw[big].sum()
    sizes = np.maximum(np.floor(raw), floor).astype(np.int64)
    sizes[0] += n_cells - sizes.sum()
    return sizes


def _assign_datasets(
    n_datasets: int, rng: np.random.Generator
) -> tuple[list[str], list[list[int]]]:
    """One assay and a tissue list (indices into TISSUES) per dataset."""
    assays = [SCTAB_10X_ASSAYS[i] for i in rng.permutation(len(SCTAB_10X_ASSAYS))]
    ds_assay = [assays[j % len(assays)] for j in range(n_datasets)]
    ds_tissues: list[list[int]] = []
    for _ in range(n_datasets):
        others = [1, 2, 3]
        if n_datasets > 1 and rng.random() < 0.5:
            others.remove(int(rng.choice(others)))
        ds_tissues.append([0, *others])
    covered = set().union(*ds_tissues)
    for t in range(len(TISSUES)):
        if t not in covered:
            ds_tissues[int(rng.integers(n_datasets))].append(t)
    return ds_assay, [sorted(t) for t in ds_tissues]


def generate_census_like(
    n_cells: int = 20000,
    n_donors: int = 48,
    seed: int = 0,
    reference: ad.AnnData | None = None,
    donor_effect: float = 0.3,
    *,
    n_datasets: int = 6,
    batch_effect: float = 0.2,
    library_sd: float = 0.25,
    imbalance: float = 250.0,
    min_cells: int = 15,
) -> ad.AnnData:
    """A census-like corpus from the documented generative model (see the module docstring).

    ``reference`` (default :func:`load_pbmc68k`) provides the real profiles, library sizes and
    dispersions; its ``cell_type`` must hold the PBMC68k author labels. Deterministic per seed.
    """
    n_cells, n_donors, n_datasets = int(n_cells), int(n_donors), int(n_datasets)
    if n_donors < 1 or n_datasets < 1 or n_datasets > n_donors:
        raise InputError(
            f"need 1 <= n_datasets ({n_datasets}) <= n_donors ({n_donors})",
            field="source.n_donors",
            fix="ask for at least as many donors as datasets",
        )
    for name, value in (
        ("donor_effect", donor_effect),
        ("batch_effect", batch_effect),
        ("library_sd", library_sd),
    ):
        if value < 0:
            raise InputError(f"{name} must be >= 0, got {value}", field=f"source.{name}")
    if imbalance < 1:
        raise InputError(f"imbalance must be >= 1, got {imbalance}", field="source.imbalance")
    stats = _default_reference_stats() if reference is None else reference_stats(reference)
    rng = np.random.default_rng(seed)
    n_types, n_genes = len(CENSUS_TYPES), len(stats.genes)

    # cell types
    Q, M, described = _build_profiles(stats, rng)
    ranks = np.array([ct.rank for ct in CENSUS_TYPES])
    by_rank = class_sizes(n_cells, n_types, imbalance, min_cells)
    sizes = by_rank[ranks - 1]
    type_idx = np.repeat(np.arange(n_types), sizes)

    # datasets, donors
    ds_assay, ds_tissues = _assign_datasets(n_datasets, rng)
    donor_ds = np.array_split(np.arange(n_donors), n_datasets)
    donor_dataset = np.empty(n_donors, dtype=np.int64)
    donor_names = []
    for j, members in enumerate(donor_ds):
        donor_dataset[members] = j
        donor_names += [f"dataset{j:02d}_donor{k:02d}" for k in range(len(members))]
    donor_weight = rng.lognormal(0.0, 0.5, size=n_donors)

    # tissue | type, then donor | tissue
    covers = np.zeros((n_datasets, len(TISSUES)), dtype=bool)
    for j, ts in enumerate(ds_tissues):
        covers[j, ts] = True
    tissue_ok = covers.any(axis=0)
    tissue_idx = np.empty(n_cells, dtype=np.int64)
    start = 0
    for t, ct in enumerate(CENSUS_TYPES):
        p = np.asarray(TISSUE_PRIOR) * np.asarray(ct.enrich) * tissue_ok
        tissue_idx[start : start + sizes[t]] = rng.choice(
            len(TISSUES), size=sizes[t], p=p / p.sum()
        )
        start += sizes[t]
    donor_idx = np.empty(n_cells, dtype=np.int64)
    for ti in range(len(TISSUES)):
        cells = np.flatnonzero(tissue_idx == ti)
        if not len(cells):
            continue
        eligible = np.flatnonzero(covers[donor_dataset, ti])
        w = donor_weight[eligible]
        donor_idx[cells] = rng.choice(eligible, size=len(cells), p=w / w.sum())

    perm = rng.permutation(n_cells)
    type_idx, tissue_idx, donor_idx = type_idx[perm], tissue_idx[perm], donor_idx[perm]
    dataset_idx = donor_dataset[donor_idx]

    # donor and dataset effects
    def gene_factors(n: int, sd: float) -> np.ndarray:
        return np.exp(rng.normal(0.0, sd, size=(n, n_genes)) - sd**2 / 2)

    E = gene_factors(n_donors, donor_effect)
    B = gene_factors(n_datasets, batch_effect)
    donor_lib = np.exp(rng.normal(0.0, library_sd, size=n_donors))
    dataset_lib = np.exp(rng.normal(0.0, library_sd, size=n_datasets))
    L = (
        np.exp(rng.normal(M[type_idx], stats.log_lib_sd))
        * donor_lib[donor_idx]
        * dataset_lib[dataset_idx]
    )

    # gamma-Poisson counts, in blocks of cells
    shape = 1.0 / stats.phi
    blocks = []
    for b0 in range(0, n_cells, _BLOCK):
        sl = slice(b0, min(b0 + _BLOCK, n_cells))
        prof = Q[type_idx[sl]] * E[donor_idx[sl]] * B[dataset_idx[sl]]
        mu = prof * (L[sl] / prof.sum(axis=1))[:, None]
        lam = rng.gamma(shape, mu * stats.phi)
        blocks.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    X = sp.vstack(blocks, format="csr", dtype=np.float32)

    labels = [ct.label for ct in CENSUS_TYPES]
    cl_ids = [ct.cl_id for ct in CENSUS_TYPES]
    dataset_names = [f"dataset{j:02d}" for j in range(n_datasets)]
    obs = pd.DataFrame(index=pd.Index(np.char.mod("census_%06d", np.arange(n_cells)).astype(str)))
    obs["cell_type"] = pd.Categorical.from_codes(type_idx, categories=labels)
    obs["cell_type_ontology_term_id"] = pd.Categorical.from_codes(type_idx, categories=cl_ids)
    obs["donor_id"] = pd.Categorical.from_codes(donor_idx, categories=donor_names)
    obs["tissue"] = pd.Categorical.from_codes(tissue_idx, categories=list(TISSUES))
    obs["assay"] = pd.Categorical(np.asarray(ds_assay, dtype=object)[dataset_idx])
    obs["batch"] = pd.Categorical.from_codes(dataset_idx, categories=dataset_names)
    obs["dataset_id"] = pd.Categorical.from_codes(dataset_idx, categories=dataset_names)
    obs["n_counts"] = np.asarray(X.sum(axis=1)).ravel().astype(np.float32)
    categorical = ["cell_type", "cell_type_ontology_term_id", "donor_id", "tissue", "batch"]
    for col in [*categorical, "dataset_id"]:
        obs[col] = obs[col].cat.remove_unused_categories()

    out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(list(stats.genes))))
    out.uns["source"] = {
        "kind": "census_like",
        "params": {
            "n_cells": n_cells,
            "n_donors": n_donors,
            "seed": int(seed),
            "donor_effect": float(donor_effect),
            "n_datasets": n_datasets,
            "batch_effect": float(batch_effect),
            "library_sd": float(library_sd),
            "imbalance": float(imbalance),
            "min_cells": int(min_cells),
        },
        "reference": "pbmc68k (scanpy/datasets/" + PBMC68K_FILE + ")"
        if reference is None
        else "user-supplied AnnData",
        "model": "gamma-Poisson counts around real PBMC68k type profiles with marker "
        "perturbations, donor/dataset gene and library factors; see "
        "celltype_bench.data.sources",
        "type_base": described,
    }
    return out


# ---- registry and validation ----------------------------------------------------------------
SOURCES: dict[str, Callable[..., ad.AnnData]] = {
    "pbmc68k": load_pbmc68k,
    "census_like": generate_census_like,
    "url": load_url_source,
    "census": load_census,
    "combine": load_combined,
}
"""Source kind -> callable(**params) returning a raw AnnData in the standard shape."""


def load_source(kind: str, **params: Any) -> ad.AnnData:
    """Produce the raw AnnData of source ``kind`` with its parameters."""
    if kind not in SOURCES:
        raise InputError(
            f"unknown source kind '{kind}'",
            field="source.kind",
            fix=f"use one of: {', '.join(sorted(SOURCES))}",
        )
    fn = SOURCES[kind]
    sig = inspect.signature(fn)
    try:
        sig.bind(**params)
    except TypeError as exc:
        allowed = [p for p in sig.parameters if p != "reference"]
        raise InputError(
            f"bad parameters {sorted(params)} for source '{kind}' ({exc})",
            field="source",
            fix=f"use only: {', '.join(allowed) if allowed else '(no parameters)'}",
        ) from exc
    return fn(**params)


def validate_raw(adata: ad.AnnData, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check the standard raw shape; raise InputError naming file, field and fix.

    Returns a small report (cells, genes, labels, all-zero cells). All-zero cells are allowed
    at this stage (preprocessing drops them) but are counted and logged.
    """
    from .preprocess import check_counts

    file = None if path is None else str(path)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(
            f"empty dataset ({adata.n_obs} cells x {adata.n_vars} genes)",
            file=file,
            field="X",
            fix="check the source parameters",
        )
    for name, index in (("obs_names", adata.obs_names), ("var_names", adata.var_names)):
        if not index.is_unique:
            dups = index[index.duplicated()].unique()[:5].tolist()
            raise InputError(
                f"{name} are not unique (e.g. {dups})",
                file=file,
                field=name,
                fix="make them unique (AnnData.obs_names_make_unique / var_names_make_unique)",
            )
    missing = [c for c in STANDARD_OBS if c not in adata.obs]
    if missing:
        raise InputError(
            f"missing obs columns {missing}",
            file=file,
            field="obs",
            fix=f"the source adapter must provide all of {list(STANDARD_OBS)}",
        )
    for col in ("cell_type", "donor_id"):
        values = adata.obs[col]
        bad = empty_values(values)
        if bad.any():
            raise InputError(
                f"{int(bad.sum())} cells have an empty or missing {col}",
                file=file,
                field=col,
                fix="fill the column or drop those cells in the source adapter",
            )
    check_counts(adata.X, file=file, field="X")
    X = adata.X
    totals = np.asarray(X.sum(axis=1)).ravel()
    n_zero = int((totals == 0).sum())
    if n_zero:
        log.warning("%s: %d all-zero cells (dropped by preprocessing)", file or "raw data", n_zero)
    return {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_labels": int(adata.obs["cell_type"].nunique()),
        "n_all_zero_cells": n_zero,
    }
