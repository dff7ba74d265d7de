"""Nested training tiers for scaling curves (scTab Fig. 2b/2d).

Two ways to shrink the training set of a split, validation and test cells left unchanged:

- ``donors``: the training donors of each replicate (sorted) are shuffled with
  ``default_rng(seed)``; tier f keeps the cells of the first ceil(f * n_donors) of them
  (scTab's donor subsampling: more donors = more biological diversity);
- ``cells``: the control. The same number of training cells as the donor tier of the same
  fraction, drawn uniformly from all training cells (one seeded permutation, so tiers are
  nested as well): more cells, same diversity.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from .splits import subsample_tiers

KINDS = ("donors", "cells")


def apply_tier(
    split: pd.DataFrame,
    obs: pd.DataFrame,
    kind: str,
    fraction: float,
    seed: int = 1,
    donor_key: str = "donor_id",
) -> pd.DataFrame:
    """The split table with the training cells of one tier only (same columns)."""
    if kind not in KINDS:
        raise InputError(
            f"unknown tier kind '{kind}'", field="scaling.kinds", fix=f"use {list(KINDS)}"
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
                derived = {k: v for k, v in spec.items() if k != "scaling"}
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
