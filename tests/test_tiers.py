"""Nested training tiers for scaling curves (celltype_bench.data.tiers)."""

import numpy as np
import pandas as pd
import pytest

from celltype_bench.data.splits import donor_split
from celltype_bench.data.tiers import apply_tier, expand_scaling, tier_task_name
from celltype_bench.errors import InputError


@pytest.fixture()
def obs():
    rng = np.random.default_rng(0)
    n = 2000
    return pd.DataFrame(
        {"donor_id": rng.choice([f"d{i}" for i in range(40)], n), "cell_type": "A"},
        index=[f"c{i}" for i in range(n)],
    )


def _train(split, rep="r0"):
    return set(split.loc[(split.replicate == rep) & (split.role == "train"), "cell_id"])


def test_donor_tiers_are_nested_and_keep_valid_and_test(obs):
    split = donor_split(obs, n_replicates=2)
    tiers = {f: apply_tier(split, obs, "donors", f) for f in (0.15, 0.3, 0.5, 1.0)}
    sizes = [len(_train(t)) for t in tiers.values()]
    assert sizes == sorted(sizes) and sizes[-1] == len(_train(split))
    assert _train(tiers[0.15]) < _train(tiers[0.3]) < _train(tiers[0.5])
    for t in tiers.values():
        for role in ("valid", "test"):
            a = split.loc[split.role == role].sort_values(["replicate", "cell_id"])
            b = t.loc[t.role == role].sort_values(["replicate", "cell_id"])
            assert a["cell_id"].tolist() == b["cell_id"].tolist()
    donors = obs.loc[list(_train(tiers[0.15])), "donor_id"].nunique()
    n_train_donors = obs.loc[list(_train(split)), "donor_id"].nunique()
    assert donors == int(np.ceil(0.15 * n_train_donors))


def test_cell_tiers_match_donor_tier_sizes_and_spread_over_donors(obs):
    split = donor_split(obs)
    for f in (0.15, 0.5):
        by_donor = apply_tier(split, obs, "donors", f)
        by_cell = apply_tier(split, obs, "cells", f)
        assert len(_train(by_cell)) == len(_train(by_donor))
        # the control draws from all training donors, the donor tier from a few
        n_cell = obs.loc[list(_train(by_cell)), "donor_id"].nunique()
        n_donor = obs.loc[list(_train(by_donor)), "donor_id"].nunique()
        assert n_cell > n_donor
    assert _train(apply_tier(split, obs, "cells", 0.15)) < _train(
        apply_tier(split, obs, "cells", 0.5)
    )


def test_expand_scaling_derives_tasks():
    tasks = {
        "c": {
            "dataset": "c",
            "split": {"kind": "donor"},
            "scaling": {"fractions": [0.15, 1.0], "methods": ["linear"], "replicates": 1},
        }
    }
    out = expand_scaling(tasks)
    assert set(out) == {"c", "c-donors-15", "c-donors-100", "c-cells-15", "c-cells-100"}
    d = out[tier_task_name("c", "cells", 0.15)]
    assert d["tier"] == {"kind": "cells", "fraction": 0.15, "seed": 1}
    assert d["methods"] == ["linear"] and d["replicates"] == 1 and "scaling" not in d
    with pytest.raises(InputError, match="donor split"):
        expand_scaling(
            {"k": {"dataset": "k", "split": {"kind": "stratified_kfold"}, "scaling": {}}}
        )
