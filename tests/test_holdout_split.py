"""The inter-dataset split (kind holdout_study) of a combined dataset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from celltype_bench.data.splits import holdout_study, make_split
from celltype_bench.errors import InputError


def _obs() -> pd.DataFrame:
    studies = ["baron"] * 40 + ["muraro"] * 20 + ["xin"] * 10
    labels = (["alpha"] * 30 + ["beta"] * 9 + ["rare"]) + ["alpha", "beta"] * 10 + ["beta"] * 10
    return pd.DataFrame(
        {"dataset_id": studies, "cell_type": labels},
        index=[f"{s}:c{i}" for i, s in enumerate(studies)],
    )


def test_roles_and_stratified_validation():
    obs = _obs()
    split = holdout_study(obs, train=["baron"], test="muraro", val_fraction=0.1, seed=0)
    assert set(split["replicate"]) == {"r0"}
    by_role = split.groupby("role")["cell_id"].apply(list)
    assert all(c.startswith("muraro:") for c in by_role["test"]) and len(by_role["test"]) == 20
    assert all(c.startswith("baron:") for c in by_role["train"] + by_role["valid"])
    assert not any(c.startswith("xin:") for c in split["cell_id"])  # other studies left out
    valid = obs.loc[by_role["valid"], "cell_type"].value_counts().to_dict()
    assert valid == {"alpha": 3}  # floor(0.1 * 9) = 0 beta cells
    assert "baron:c39" in by_role["train"]  # the single 'rare' cell stays in training


def test_seeded_and_replicated():
    obs = _obs()
    spec = {"kind": "holdout_study", "train": ["baron", "xin"], "test": "muraro", "seed": 3}
    a = make_split(obs, {**spec, "n_replicates": 3})
    b = make_split(obs, {**spec, "n_replicates": 3})
    pd.testing.assert_frame_equal(a, b)
    assert sorted(a["replicate"].unique()) == ["r0", "r1", "r2"]
    roles = [a[a["replicate"] == r]["role"].to_numpy() for r in ("r0", "r1", "r2")]
    assert all(np.array_equal(roles[0], r) for r in roles)
    assert (a[a["replicate"] == "r0"]["role"] == "train").sum() == 50 - 4  # 3 alpha + 1 beta valid


def test_no_validation():
    split = holdout_study(_obs(), train=["baron"], test="xin", val_fraction=0)
    assert set(split["role"]) == {"train", "test"}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"train": ["baron"], "test": "segerstolpe"}, r"studies \['segerstolpe'\] are not in"),
        ({"train": ["baron"], "test": "baron"}, "exclude the test study"),
        ({"train": ["baron"]}, "needs 'test'"),
        ({"train": ["baron"], "test": "xin", "n_folds": 3}, "unknown parameters"),
        ({"train": ["baron"], "test": "xin", "val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_errors(spec, match):
    with pytest.raises(InputError, match=match):
        make_split(_obs(), {"kind": "holdout_study", **spec})
