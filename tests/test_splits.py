"""Tests of the split tables: stratified k-fold, scTab donor split, tiers, dispatch."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celltype_bench.data.splits import (
    assign_folds,
    donor_split,
    make_split,
    roles,
    stratified_kfold,
    subsample_tiers,
)
from celltype_bench.errors import InputError


def make_obs(class_sizes: dict[str, int], n_donors: int = 10, seed: int = 0) -> pd.DataFrame:
    labels = np.concatenate([[k] * n for k, n in class_sizes.items()])
    rng = np.random.default_rng(seed)
    labels = labels[rng.permutation(len(labels))]
    return pd.DataFrame(
        {
            "cell_type": labels,
            "donor_id": [f"donor{i:02d}" for i in rng.integers(0, n_donors, len(labels))],
        },
        index=[f"cell{i}" for i in range(len(labels))],
    )


def check_table(split: pd.DataFrame, obs: pd.DataFrame, n_rep: int) -> None:
    assert list(split.columns) == ["cell_id", "replicate", "role"]
    assert set(split["role"]) <= {"train", "valid", "test"}
    assert sorted(split["replicate"].unique()) == sorted(f"r{i}" for i in range(n_rep))
    # one row per cell and replicate: roles are disjoint within a replicate
    assert not split.duplicated(["cell_id", "replicate"]).any()
    assert (split.groupby("replicate").size() == len(obs)).all()
    assert set(split["cell_id"]) == set(obs.index)


# ---- k-fold ---------------------------------------------------------------------------------
def test_kfold_every_cell_tested_once_and_valid_is_next_fold():
    obs = make_obs({"A": 500, "B": 120, "C": 33, "D": 4, "E": 1})
    split = stratified_kfold(obs, n_folds=5, seed=0)
    check_table(split, obs, 5)
    test = split[split["role"] == "test"]
    assert test["cell_id"].value_counts().eq(1).all() and len(test) == len(obs)
    valid = split[split["role"] == "valid"]
    assert valid["cell_id"].value_counts().eq(1).all() and len(valid) == len(obs)
    for i in range(5):
        r = roles(split, f"r{i}")
        nxt = roles(split, f"r{(i + 1) % 5}")
        assert set(r["valid"]) == set(nxt["test"])
        assert not set(r["train"]) & set(r["test"])
        assert len(r["train"]) > len(r["test"])


def test_kfold_stratification_keeps_class_proportions():
    sizes = {"A": 1000, "B": 203, "C": 57, "D": 11}
    obs = make_obs(sizes)
    split = stratified_kfold(obs, n_folds=5, seed=1)
    test = split[split["role"] == "test"].merge(obs, left_on="cell_id", right_index=True)
    per_fold = pd.crosstab(test["replicate"], test["cell_type"])
    for label, n in sizes.items():
        assert set(per_fold[label]) <= {n // 5, math.ceil(n / 5)}
    overall = test["replicate"].value_counts()
    assert overall.max() - overall.min() <= 1


def test_kfold_tiny_classes_do_not_crash_or_warn():
    obs = make_obs({"A": 50, "B": 2, "C": 1, "D": 1, "E": 1, "F": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = stratified_kfold(obs, n_folds=5, seed=0)
    check_table(split, obs, 5)
    single = obs.index[obs["cell_type"] == "C"][0]
    assert (split.loc[split["cell_id"] == single, "role"] == "test").sum() == 1
    # the three singleton classes land in different folds (round-robin)
    folds = assign_folds(obs["cell_type"], 5, seed=0)
    singles = folds[obs["cell_type"].isin(["C", "D", "E"]).to_numpy()]
    assert len(set(singles)) == 3


def test_kfold_two_folds_have_no_validation():
    obs = make_obs({"A": 20, "B": 7})
    split = stratified_kfold(obs, n_folds=2)
    assert set(split["role"]) == {"train", "test"}
    r0, r1 = roles(split, "r0"), roles(split, "r1")
    assert set(r0["train"]) == set(r1["test"]) and r0["valid"] == []


def test_kfold_deterministic_and_seeded():
    obs = make_obs({"A": 100, "B": 30})
    a = stratified_kfold(obs, seed=3)
    pd.testing.assert_frame_equal(a, stratified_kfold(obs, seed=3))
    assert not a.equals(stratified_kfold(obs, seed=4))


def test_kfold_errors():
    obs = make_obs({"A": 3})
    with pytest.raises(InputError, match="n_folds"):
        stratified_kfold(obs, n_folds=1)
    with pytest.raises(InputError, match="cannot fill"):
        stratified_kfold(obs, n_folds=5)
    with pytest.raises(InputError, match="label"):
        stratified_kfold(obs, label_key="nope")


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8),
    k=st.integers(min_value=2, max_value=6),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_kfold_property(sizes, k, seed):
    obs = make_obs({f"L{i}": n for i, n in enumerate(sizes)}, seed=seed)
    if len(obs) < k:
        return
    split = stratified_kfold(obs, n_folds=k, seed=seed)
    check_table(split, obs, k)
    assert (split["role"] == "test").sum() == len(obs)
    folds = assign_folds(obs["cell_type"], k, seed)
    for label in obs["cell_type"].unique():
        counts = np.bincount(folds[(obs["cell_type"] == label).to_numpy()], minlength=k)
        assert counts.max() - counts.min() <= 1


# ---- donor split ----------------------------------------------------------------------------
@pytest.mark.parametrize("n_donors", [3, 40, 48, 100])
def test_donor_split_disjoint_donors_and_counts(n_donors):
    obs = make_obs({"A": 3000, "B": 500}, n_donors=n_donors, seed=2)
    n = obs["donor_id"].nunique()
    split = donor_split(obs, seed=1, n_replicates=3)
    check_table(split, obs, 3)
    rows = split[split["replicate"] == "r0"].merge(obs, left_on="cell_id", right_index=True)
    donors = rows.groupby("role")["donor_id"].agg(lambda s: set(s))
    assert not donors["train"] & donors["valid"]
    assert not donors["train"] & donors["test"]
    assert not donors["valid"] & donors["test"]
    expected = math.ceil(round(0.15 * n, 9))
    assert len(donors["valid"]) == expected and len(donors["test"]) == expected
    assert len(donors["train"]) == n - 2 * expected
    # the same split in every replicate
    by_rep = [g["role"].to_numpy() for _, g in split.groupby("replicate")]
    assert all((r == by_rep[0]).all() for r in by_rep)


def test_donor_split_follows_sctab_order():
    obs = make_obs({"A": 2000}, n_donors=20, seed=5)
    split = donor_split(obs, seed=7)
    donors = np.array(sorted(obs["donor_id"].unique()), dtype=object)
    perm = np.random.default_rng(7).permutation(donors)
    rows = split.merge(obs, left_on="cell_id", right_index=True)
    role_of = rows.groupby("donor_id")["role"].first()
    assert list(role_of[perm[:3]]) == ["valid"] * 3
    assert list(role_of[perm[3:6]]) == ["test"] * 3
    assert set(role_of[perm[6:]]) == {"train"}
    pd.testing.assert_frame_equal(split, donor_split(obs, seed=7))
    assert not split.equals(donor_split(obs, seed=8))


def test_donor_split_errors():
    obs = make_obs({"A": 50}, n_donors=2)
    with pytest.raises(InputError, match="at least 3 donors"):
        donor_split(obs)
    obs = make_obs({"A": 200}, n_donors=5)
    with pytest.raises(InputError, match="none for training"):
        donor_split(obs, val_fraction=0.45, test_fraction=0.45)
    with pytest.raises(InputError, match="donor"):
        donor_split(obs, donor_key="patient")


def test_subsample_tiers_are_nested():
    obs = make_obs({"A": 3000, "B": 300}, n_donors=40, seed=3)
    split = donor_split(obs, n_replicates=2)
    tiers = subsample_tiers(split, obs, fractions=(0.15, 0.5, 1.0))
    r0 = tiers[tiers["replicate"] == "r0"]
    train = {f: set(g.loc[g["role"] == "train", "cell_id"]) for f, g in r0.groupby("fraction")}
    assert train[0.15] < train[0.5] < train[1.0]
    full = set(roles(split, "r0")["train"])
    assert train[1.0] == full
    test = {f: set(g.loc[g["role"] == "test", "cell_id"]) for f, g in r0.groupby("fraction")}
    assert test[0.15] == test[1.0] == set(roles(split, "r0")["test"])


# ---- dispatch and helpers -------------------------------------------------------------------
def test_make_split_dispatch():
    obs = make_obs({"A": 300, "B": 40}, n_donors=12)
    kfold = make_split(obs, {"kind": "stratified_kfold", "n_folds": 3, "n_replicates": 3})
    pd.testing.assert_frame_equal(kfold, stratified_kfold(obs, n_folds=3))
    donor = make_split(obs, {"kind": "donor", "seed": 1, "val_fraction": 0.2, "n_replicates": 2})
    pd.testing.assert_frame_equal(donor, donor_split(obs, val_fraction=0.2, n_replicates=2))
    with pytest.raises(InputError, match="unknown split kind") as err:
        make_split(obs, {"kind": "random"})
    assert "stratified_kfold" in str(err.value)
    with pytest.raises(InputError, match="unknown parameters"):
        make_split(obs, {"kind": "donor", "n_folds": 3})
    with pytest.raises(InputError, match="replicates"):
        make_split(obs, {"kind": "stratified_kfold", "n_folds": 3, "n_replicates": 2})


def test_roles_helper():
    obs = make_obs({"A": 30, "B": 9})
    split = stratified_kfold(obs, n_folds=3)
    r = roles(split, "r1")
    assert set(r) == {"train", "valid", "test"}
    assert sum(len(v) for v in r.values()) == len(obs)
    assert all(isinstance(c, str) for c in r["test"])
    with pytest.raises(InputError, match="r7"):
        roles(split, "r7")
