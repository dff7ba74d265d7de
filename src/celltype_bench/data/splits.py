"""Split tables: long DataFrames with columns ``cell_id`` (str), ``replicate`` ('r0', 'r1', ...)
and ``role`` ('train' | 'valid' | 'test'); one row per cell and replicate.

* :func:`stratified_kfold`: replicate ``ri`` tests on fold i, validates on fold (i+1) % k and
  trains on the rest (with k = 2 there is no validation fold: train on the other fold).
* :func:`donor_split`: scTab-style split by donor, the same split for every replicate
  (replicates then differ by training seed).
* :func:`holdout_study`: inter-dataset split of a combined dataset: train on the cells of the
  ``train`` studies (minus a seeded stratified validation fraction), test on the ``test``
  study; cells of other studies get no row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ..labels import empty_values

ROLES: tuple[str, ...] = ("train", "valid", "test")
SPLIT_COLUMNS: tuple[str, ...] = ("cell_id", "replicate", "role")


def _replicate(i: int) -> str:
    return f"r{i}"


def _column(obs: pd.DataFrame, key: str, what: str) -> np.ndarray:
    if key not in obs:
        raise InputError(
            f"no {what} column '{key}' in obs (columns: {list(obs.columns)})",
            field=key,
            fix=f"name the obs column that holds the {what} in the split settings",
        )
    values = obs[key]
    bad = empty_values(values)
    if bad.any():
        raise InputError(
            f"{int(bad.sum())} cells have an empty or missing {what}",
            field=key,
            fix=f"fill obs['{key}'] or drop those cells before splitting",
        )
    return values.astype(str).to_numpy()


def _table(cell_ids: np.ndarray, role_rows: Sequence[np.ndarray]) -> pd.DataFrame:
    n = len(cell_ids)
    return pd.DataFrame(
        {
            "cell_id": np.tile(cell_ids, len(role_rows)),
            "replicate": np.repeat([_replicate(i) for i in range(len(role_rows))], n),
            "role": np.concatenate(role_rows) if role_rows else np.array([], dtype=object),
        }
    )


def assign_folds(labels: Sequence[Any], n_folds: int, seed: int = 0) -> np.ndarray:
    """Stratified fold index per cell, never failing on tiny classes.

    Classes are visited in sorted order; each class's cells are shuffled with
    ``numpy.random.default_rng(seed)`` and dealt round-robin to the folds, continuing from the
    fold where the previous class stopped. Every class thus puts floor or ceil of n_c / k cells
    in each fold (the StratifiedKFold proportions), and classes with fewer cells than folds
    (down to a single cell) are spread over different folds instead of raising a warning.
    """
    labels = np.asarray(labels).astype(str)
    codes, _ = pd.factorize(labels, sort=True)
    rng = np.random.default_rng(seed)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    folds = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for members in np.split(order, bounds) if len(order) else []:
        members = rng.permutation(members)
        folds[members] = (offset + np.arange(len(members))) % n_folds
        offset = (offset + len(members)) % n_folds
    return folds


def stratified_kfold(
    obs: pd.DataFrame, n_folds: int = 5, seed: int = 0, label_key: str = "cell_type"
) -> pd.DataFrame:
    """k replicates: ri tests on fold i, validates on fold (i+1) % k if k > 2, trains on others."""
    n_folds = int(n_folds)
    if n_folds < 2:
        raise InputError(
            f"n_folds must be >= 2, got {n_folds}", field="split.n_folds", fix="use 2 or more"
        )
    labels = _column(obs, label_key, "cell-type label")
    if len(labels) < n_folds:
        raise InputError(
            f"{len(labels)} cells cannot fill {n_folds} folds",
            field="split.n_folds",
            fix="use fewer folds or a larger dataset",
        )
    folds = assign_folds(labels, n_folds, seed)
    rows = []
    for i in range(n_folds):
        role = np.full(len(folds), "train", dtype=object)
        if n_folds >= 3:
            role[folds == (i + 1) % n_folds] = "valid"
        role[folds == i] = "test"
        rows.append(role)
    return _table(obs.index.astype(str).to_numpy(), rows)


def _n_donors(fraction: float, n: int) -> int:
    # round first so that e.g. 0.15 * 100 = 15.000000000000002 gives 15, not 16
    return math.ceil(round(fraction * n, 9))


def donor_split(
    obs: pd.DataFrame,
    donor_key: str = "donor_id",
    seed: int = 1,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    n_replicates: int = 1,
) -> pd.DataFrame:
    """scTab's donor split, repeated for each replicate.

    The unique donors, sorted, are shuffled with ``numpy.random.default_rng(seed).permutation``;
    validation takes the first ceil(val_fraction * n) donors, test the next
    ceil(test_fraction * n), training the rest.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise InputError(
                f"{name} must be in (0, 1), got {value}", field=f"split.{name}", fix="e.g. 0.15"
            )
    if int(n_replicates) < 1:
        raise InputError(
            f"n_replicates must be >= 1, got {n_replicates}",
            field="replicates",
            fix="use 1 or more",
        )
    donors_of_cell = _column(obs, donor_key, "donor")
    donors = np.array(sorted(set(donors_of_cell)), dtype=object)
    n = len(donors)
    if n < 3:
        raise InputError(
            f"a donor split needs at least 3 donors, found {n}",
            field=donor_key,
            fix="use a stratified_kfold split for this dataset, or a dataset with more donors",
        )
    n_val, n_test = _n_donors(val_fraction, n), _n_donors(test_fraction, n)
    if n_val + n_test >= n:
        raise InputError(
            f"{n} donors leave none for training ({n_val} validation + {n_test} test)",
            field="split.val_fraction",
            fix="lower val_fraction / test_fraction or use more donors",
        )
    perm = np.random.default_rng(seed).permutation(donors)
    role_of = dict.fromkeys(perm[n_val + n_test :], "train")
    role_of.update(dict.fromkeys(perm[:n_val], "valid"))
    role_of.update(dict.fromkeys(perm[n_val : n_val + n_test], "test"))
    role = pd.Series(donors_of_cell).map(role_of).to_numpy(dtype=object)
    return _table(obs.index.astype(str).to_numpy(), [role] * int(n_replicates))


def holdout_study(
    obs: pd.DataFrame,
    train: Sequence[str],
    test: str,
    study_key: str = "dataset_id",
    val_fraction: float = 0.1,
    seed: int = 0,
    label_key: str = "cell_type",
    n_replicates: int = 1,
) -> pd.DataFrame:
    """Train on the ``train`` studies, test on the ``test`` study (same split per replicate).

    Validation: per class (sorted) of the training cells, the cells are shuffled with one
    ``numpy.random.default_rng(seed)`` and the first ``floor(val_fraction * n_c)`` go to
    validation, so classes with fewer than ``1 / val_fraction`` cells stay in training.
    ``val_fraction = 0`` means no validation cells. Cells of other studies are left out.
    """
    train = [str(t) for t in ([train] if isinstance(train, str) else train)]
    test = str(test)
    if not 0 <= val_fraction < 1:
        raise InputError(
            f"val_fraction must be in [0, 1), got {val_fraction}",
            field="split.val_fraction",
            fix="e.g. 0.1",
        )
    if not train or test in train:
        raise InputError(
            f"train studies {train} must be non-empty and exclude the test study '{test}'",
            field="split.train",
            fix="list the reference studies under 'train' and the query study under 'test'",
        )
    if int(n_replicates) < 1:
        raise InputError(
            f"n_replicates must be >= 1, got {n_replicates}",
            field="replicates",
            fix="use 1 or more",
        )
    studies = _column(obs, study_key, "study")
    present = sorted(set(studies))
    missing = [s for s in [*train, test] if s not in present]
    if missing:
        raise InputError(
            f"studies {missing} are not in obs['{study_key}'] (present: {present})",
            field="split.train" if test not in missing else "split.test",
            fix="use the part names of the combined dataset",
        )
    in_train = np.isin(studies, train)
    in_test = studies == test
    keep = in_train | in_test
    labels = _column(obs.loc[keep], label_key, "cell-type label")
    role = np.where(in_test[keep], "test", "train").astype(object)
    if val_fraction > 0:
        rng = np.random.default_rng(seed)
        train_idx = np.flatnonzero(role == "train")
        train_labels = labels[train_idx]
        for label in sorted(set(train_labels)):
            members = rng.permutation(train_idx[train_labels == label])
            n_val = math.floor(round(val_fraction * len(members), 9))
            role[members[:n_val]] = "valid"
    cell_ids = obs.index.astype(str).to_numpy()[keep]
    return _table(cell_ids, [role] * int(n_replicates))


def subsample_tiers(
    split: pd.DataFrame,
    obs: pd.DataFrame,
    fractions: Sequence[float] = (0.15, 0.3, 0.5, 0.7, 1.0),
    seed: int = 1,
    donor_key: str = "donor_id",
) -> pd.DataFrame:
    """Nested training-donor subsamples: adds a ``fraction`` column to the split table.

    For each replicate the training donors (sorted) are shuffled with
    ``default_rng(seed).permutation``; tier f keeps the training cells of the first
    max(1, ceil(f * n_train_donors)) of them, so smaller tiers are subsets of larger ones.
    Validation and test rows are the same in every tier.
    """
    for f in fractions:
        if not 0 < f <= 1:
            raise InputError(
                f"subsample fraction {f} is not in (0, 1]", field="fractions", fix="e.g. 0.15"
            )
    donor_of = pd.Series(_column(obs, donor_key, "donor"), index=obs.index.astype(str))
    parts = []
    for _, table in split.groupby("replicate", sort=True):
        is_train = (table["role"] == "train").to_numpy()
        cell_donor = donor_of.reindex(table["cell_id"].astype(str)).to_numpy()
        train_donors = np.array(sorted(set(cell_donor[is_train])), dtype=object)
        order = np.random.default_rng(seed).permutation(train_donors)
        for f in fractions:
            kept = set(order[: max(1, _n_donors(f, len(order)))])
            mask = ~is_train | np.isin(cell_donor, list(kept))
            part = table.loc[mask, list(SPLIT_COLUMNS)].copy()
            part["fraction"] = float(f)
            parts.append(part)
    return pd.concat(parts, ignore_index=True)


_KFOLD_KEYS = {"n_folds", "seed", "label_key"}
_DONOR_KEYS = {"donor_key", "seed", "val_fraction", "test_fraction"}
_HOLDOUT_KEYS = {"train", "test", "study_key", "val_fraction", "seed", "label_key"}


def make_split(obs: pd.DataFrame, spec: Mapping[str, Any]) -> pd.DataFrame:
    """Dispatch on ``spec['kind']`` ('stratified_kfold' | 'donor' | 'holdout_study').

    Other keys are parameters.

    ``n_replicates`` (added by the workflow) sets the replicates of a donor split; for k-fold it
    must equal ``n_folds``.
    """
    params = dict(spec)
    kind = params.pop("kind", None)
    n_replicates = params.pop("n_replicates", None)
    allowed = {
        "stratified_kfold": _KFOLD_KEYS,
        "donor": _DONOR_KEYS,
        "holdout_study": _HOLDOUT_KEYS,
    }
    if kind not in allowed:
        raise InputError(
            f"unknown split kind {kind!r}",
            field="split.kind",
            fix=f"use one of: {', '.join(allowed)}",
        )
    unknown = sorted(set(params) - allowed[kind])
    if unknown:
        raise InputError(
            f"unknown parameters {unknown} for a '{kind}' split",
            field="split",
            fix=f"use only: {', '.join(sorted(allowed[kind]))}",
        )
    if kind == "stratified_kfold":
        n_folds = int(params.get("n_folds", 5))
        if n_replicates is not None and int(n_replicates) != n_folds:
            raise InputError(
                f"a {n_folds}-fold split has {n_folds} replicates, not {n_replicates}",
                field="replicates",
                fix="drop 'replicates' from k-fold tasks (one replicate per fold)",
            )
        return stratified_kfold(obs, **params)
    if kind == "holdout_study":
        for key in ("train", "test"):
            if key not in params:
                raise InputError(
                    f"a holdout_study split needs '{key}'",
                    field=f"split.{key}",
                    fix="name the training studies ('train') and the test study ('test')",
                )
        return holdout_study(
            obs, n_replicates=1 if n_replicates is None else n_replicates, **params
        )
    return donor_split(obs, n_replicates=1 if n_replicates is None else n_replicates, **params)


def roles(split: pd.DataFrame, replicate: str) -> dict[str, list[str]]:
    """Cell ids per role ('train', 'valid', 'test'; possibly empty) of one replicate."""
    table = split[split["replicate"] == replicate]
    if table.empty:
        raise InputError(
            f"no rows for replicate '{replicate}' "
            f"(available: {sorted(split['replicate'].unique().tolist())})",
            field="replicate",
            fix="use a replicate of this split table or rerun the split rule",
        )
    return {
        role: table.loc[table["role"] == role, "cell_id"].astype(str).tolist() for role in ROLES
    }
