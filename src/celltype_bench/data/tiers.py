"""Nested training tiers: scaling curves (scTab Fig. 2b/2d) and labeled-cell curves (scPretrain).

Three ways to shrink the training set of a split, validation and test cells left unchanged:

- ``donors``: the training donors of each replicate (sorted) are shuffled with
  ``default_rng(seed)``; tier f keeps the cells of the first ceil(f * n_donors) of them
  (scTab's donor subsampling: more donors = more biological diversity);
- ``cells``: the control. The same number of training cells as the donor tier of the same
  fraction, drawn uniformly from all training cells (one seeded permutation, so tiers are
  nested as well): more cells, same diversity.
- ``labeled``: an absolute number of *labeled* training cells (scPretrain's "few labels"
  question: does learning from unlabeled cells help most when labels are scarce?). Per
  replicate the training cells (sorted by id) get one seeded, stratified order
  (:func:`labeled_order`): first one cell of every class, then the remaining cells
  interleaved so that any prefix holds each class roughly in proportion to its size. Tier n
  keeps the first n cells of that order, so tiers are nested, every class keeps at least one
  cell whenever n >= the number of classes, and the same seed gives the same cells (each
  replicate draws its own order, seeded by the replicate name, so replicates also vary which
  cells are labeled; methods compared on one replicate see the same labeled cells). A count
  above the number of training cells keeps them all; ``count=None`` is the full tier ("all").
  With ``rest_unlabeled`` the training cells left out stay in the split table with role
  ``unlabeled`` (their labels are never read): the train step hands their expression, with
  the test cells', to methods that learn from unlabeled cells, so every tier has the same cell
  pool and only the number of labels changes. Methods without ``uses_unlabeled`` (the
  supervised controls) and every other step read roles ``train`` / ``valid`` / ``test`` only.
  Validation cells stay labeled and fixed in every tier (early stopping as in the full task).

Derived tasks: ``expand_scaling`` (config block ``scaling``: ``{task}-{donors|cells}-{pct}``,
marked ``scaling_of``), ``expand_labeled`` (config block ``labeled``: ``{task}-labeled-{n}``
and ``{task}-labeled-all``, marked ``labeled_of``); ``expand_tiers`` does both.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from .splits import subsample_tiers

KINDS = ("donors", "cells")
TIER_KINDS = (*KINDS, "labeled")
UNLABELED_ROLE = "unlabeled"
DEFAULT_LABELED_COUNTS = (50, 100, 500)


def apply_tier(
    split: pd.DataFrame,
    obs: pd.DataFrame,
    kind: str,
    fraction: float | None = None,
    seed: int = 1,
    donor_key: str = "donor_id",
    count: int | None = None,
    label_key: str = "cell_type",
    rest_unlabeled: bool = False,
) -> pd.DataFrame:
    """The split table with the training cells of one tier only (same columns).

    ``donors`` / ``cells`` take ``fraction``; ``labeled`` takes ``count`` (None = all training
    cells) and ``rest_unlabeled`` (the left-out training cells get role ``unlabeled``).
    """
    if kind not in TIER_KINDS:
        raise InputError(
            f"unknown tier kind '{kind}'", field="tier.kind", fix=f"use {list(TIER_KINDS)}"
        )
    if kind == "labeled":
        return apply_labeled_tier(
            split, obs, count, seed=seed, label_key=label_key, rest_unlabeled=rest_unlabeled
        )
    if fraction is None:
        raise InputError(
            f"a '{kind}' tier needs a fraction", field="tier.fraction", fix="e.g. fraction: 0.3"
        )
    by_donor = subsample_tiers(split, obs, fractions=[fraction], seed=seed, donor_key=donor_key)
    by_donor = by_donor.drop(columns="fraction")
    if kind == "donors":
        return by_donor.reset_index(drop=True)
    parts = []
    for rep, table in split.groupby("replicate", sort=True):
        n_keep = int(((by_donor["replicate"] == rep) & (by_donor["role"] == "train")).sum())
        train = table[table["role"] == "train"]
        order = np.random.default_rng([int(seed), 7]).permutation(len(train))
        kept = train.iloc[np.sort(order[:n_keep])]
        parts.append(pd.concat([table[table["role"] != "train"], kept]))
    return pd.concat(parts, ignore_index=True)


def labeled_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A stratified order of cells (positions into ``labels``): every prefix is a tier.

    Each class's cells are shuffled; the j-th cell of a class of size m gets the key
    (j + u) / m with one uniform offset u per class (systematic sampling), so a prefix of
    length n holds about n * m / N cells of the class. The first cell of every class comes
    before all second cells (in key order, which favours large classes), so any prefix of at
    least as many cells as there are classes holds every class.
    """
    labels = np.asarray(labels).astype(str)
    classes = np.unique(labels)
    keys = np.empty(len(labels), dtype=np.float64)
    first = np.zeros(len(labels), dtype=bool)
    offsets = rng.random(len(classes))
    for c, u in zip(classes, offsets, strict=True):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        keys[idx] = (np.arange(len(idx)) + u) / len(idx)
        first[idx[0]] = True
    # phase (first cells, then the rest), then key; positions break (impossible) ties
    return np.lexsort((np.arange(len(labels)), keys, ~first))


def apply_labeled_tier(
    split: pd.DataFrame,
    obs: pd.DataFrame,
    count: int | None,
    seed: int = 1,
    label_key: str = "cell_type",
    rest_unlabeled: bool = False,
) -> pd.DataFrame:
    """Keep ``count`` labeled training cells per replicate (see :func:`labeled_order`).

    Validation and test rows are unchanged. The other training cells are dropped, or kept
    with role ``unlabeled`` when ``rest_unlabeled``. ``count=None`` keeps every training cell.
    """
    if count is not None and (isinstance(count, bool) or int(count) != count or count < 1):
        raise InputError(
            f"labeled-cell count {count!r} is not a whole number >= 1",
            field="labeled.counts",
            fix="e.g. counts: [50, 100, 500]",
        )
    if count is None:
        return split.reset_index(drop=True)
    if label_key not in obs:
        raise InputError(
            f"no label column '{label_key}' in obs for a labeled-cell tier",
            field="tier.label_key",
            fix="labeled tiers stratify by the processed data's 'cell_type' column",
        )
    label_of = obs[label_key].astype(str)
    label_of.index = obs.index.astype(str)
    parts = []
    for rep, table in split.groupby("replicate", sort=True):
        train = table[table["role"] == "train"].sort_values("cell_id", kind="stable")
        labels = label_of.reindex(train["cell_id"].astype(str)).to_numpy()
        if pd.isna(labels).any():
            raise InputError(
                f"{int(pd.isna(labels).sum())} training cells of replicate '{rep}' are not "
                "in the dataset",
                field="cell_id",
                fix="delete the split table and rerun the split rule",
            )
        rng = np.random.default_rng([int(seed), 13, zlib.crc32(str(rep).encode())])
        order = labeled_order(labels, rng)
        keep = np.zeros(len(train), dtype=bool)
        keep[order[: int(count)]] = True
        rest = train.loc[~keep]
        if rest_unlabeled:
            rest = rest.assign(role=UNLABELED_ROLE)
        else:
            rest = rest.iloc[0:0]
        parts.append(pd.concat([table[table["role"] != "train"], train.loc[keep], rest]))
    return pd.concat(parts, ignore_index=True)


def tier_task_name(task: str, kind: str, fraction: float) -> str:
    """Name of a derived task, e.g. ``census-donors-30`` for 30% of the donors."""
    return f"{task}-{kind}-{round(100 * float(fraction)):d}"


def expand_scaling(tasks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tasks plus one derived task per (kind, fraction) of each task's ``scaling`` block."""
    out: dict[str, dict[str, Any]] = {}
    for name, spec in tasks.items():
        out[name] = spec
        scaling = spec.get("scaling")
        if scaling is None:
            continue
        if spec["split"]["kind"] != "donor":
            raise InputError(
                f"task '{name}' asks for scaling tiers but has a '{spec['split']['kind']}' split",
                field=f"tasks.{name}.scaling",
                fix="scaling tiers need a donor split (tiers are nested by donors)",
            )
        for kind in scaling.get("kinds", list(KINDS)):
            for f in scaling.get("fractions", [0.15, 0.3, 0.5, 0.7, 1.0]):
                derived = {k: v for k, v in spec.items() if k not in ("scaling", "labeled")}
                derived["tier"] = {
                    "kind": kind,
                    "fraction": float(f),
                    "seed": int(scaling.get("seed", 1)),
                }
                derived["scaling_of"] = name
                if "methods" in scaling:
                    derived["methods"] = list(scaling["methods"])
                if "replicates" in scaling:
                    derived["replicates"] = int(scaling["replicates"])
                out[tier_task_name(name, kind, f)] = derived
    return out


def labeled_task_name(task: str, count: int | None) -> str:
    """Name of a derived labeled-cell task, e.g. ``census-labeled-50`` or ``census-labeled-all``."""
    return f"{task}-labeled-{'all' if count is None else int(count)}"


def expand_labeled(tasks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tasks plus one derived task per count of each task's ``labeled`` block, plus ``all``.

    Block keys: ``counts`` (default 50, 100, 500), ``seed`` (1), ``rest_unlabeled`` (true),
    ``methods``, ``replicates``. Derived tasks carry ``tier`` (kind ``labeled``) and
    ``labeled_of`` (the base task); any split kind works.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, spec in tasks.items():
        out[name] = spec
    for name, spec in tasks.items():
        block = spec.get("labeled")
        if block is None:
            continue
        counts = list(block.get("counts", DEFAULT_LABELED_COUNTS))
        bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, int) or c < 1]
        if bad or not counts:
            raise InputError(
                f"task '{name}': labeled-cell counts must be whole numbers >= 1, got {counts}",
                field=f"tasks.{name}.labeled.counts",
                fix="e.g. counts: [50, 100, 500] (all training cells are always added)",
            )
        for count in [*sorted(set(counts)), None]:
            derived = {k: v for k, v in spec.items() if k not in ("scaling", "labeled")}
            derived["tier"] = {
                "kind": "labeled",
                "count": count,
                "seed": int(block.get("seed", 1)),
                "rest_unlabeled": bool(block.get("rest_unlabeled", True)),
            }
            derived["labeled_of"] = name
            if "methods" in block:
                derived["methods"] = list(block["methods"])
            if "replicates" in block:
                derived["replicates"] = int(block["replicates"])
            task = labeled_task_name(name, count)
            if task in out:
                raise InputError(
                    f"derived task '{task}' of task '{name}' clashes with another task",
                    field=f"tasks.{name}.labeled",
                    fix=f"rename the task '{task}'",
                )
            out[task] = derived
    return out


def expand_tiers(tasks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tasks plus the derived tasks of their ``scaling`` and ``labeled`` blocks."""
    return expand_labeled(expand_scaling(tasks))


def labeled_tasks(tasks: dict[str, dict[str, Any]], base: str) -> list[str]:
    """The derived labeled-cell tasks of ``base``, fewest labels first, ``all`` last."""
    derived = [t for t, s in tasks.items() if s.get("labeled_of") == base]

    def key(t: str) -> float:
        count = tasks[t]["tier"]["count"]
        return float("inf") if count is None else float(count)

    return sorted(derived, key=key)


def labeled_count_of(task: str) -> int | None:
    """The labeled-cell count in a derived task name (None for ``-labeled-all``)."""
    tail = task.rsplit("-labeled-", 1)
    if len(tail) != 2:
        raise InputError(
            f"'{task}' is not a labeled-cell task name", fix="use {task}-labeled-{n|all}"
        )
    return None if tail[1] == "all" else int(tail[1])
