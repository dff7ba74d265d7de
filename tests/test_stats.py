import numpy as np
import pandas as pd
import pytest

from celltype_bench.stats import paired_strategy_tests
from celltype_bench.steps import rare_class_f1


def _scores(effect=0.1, n=5, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n):
        base = rng.normal(0.6, 0.05)  # replicate effect shared by all strategies: pairing matters
        for strategy, shift in [
            ("none", 0.0),
            ("weighted_sampling", effect),
            ("smote", effect / 2),
        ]:
            rows.append(
                dict(
                    task="t",
                    method="scbalance",
                    balancing=strategy,
                    replicate=f"r{r}",
                    macro_f1=base + shift + rng.normal(0, 0.005),
                    rare_f1=base - 0.2 + 2 * shift + rng.normal(0, 0.005),
                )
            )
        rows.append(
            dict(
                task="t",
                method="majority",
                balancing="none",
                replicate=f"r{r}",
                macro_f1=0.05,
                rare_f1=0.0,
            )
        )
    return pd.DataFrame(rows)


def test_best_strategy_is_compared_with_runner_up_and_others_with_best():
    t = paired_strategy_tests(_scores())
    assert set(t.method) == {"scbalance"}  # single-strategy methods are skipped
    f1 = t[t.metric == "macro_f1"].set_index("strategy")
    assert f1.loc["weighted_sampling", "best"]
    assert f1.loc["weighted_sampling", "compared_with"] == "smote"
    assert f1.loc["none", "compared_with"] == "weighted_sampling"
    assert f1.loc["none", "mean_diff"] == pytest.approx(-0.1, abs=0.01)
    # pairing removes the replicate effect: a clear, consistent gap is significant at n=5
    assert f1.loc["none", "p_ttest"] < 0.001
    assert (f1["n"] == 5).all()


def test_no_difference_gives_large_p():
    t = paired_strategy_tests(_scores(effect=0.0, seed=1))
    assert (t.loc[t.metric == "macro_f1", "p_ttest"] > 0.01).all()


def test_rare_class_f1_uses_training_share():
    per_class = [{"label": "a", "f1": 0.9}, {"label": "b", "f1": 0.2}, {"label": "c", "f1": 0.4}]
    counts = {"a": 960, "b": 30, "c": 10}
    out = rare_class_f1(per_class, counts, 0.05)
    assert out["n_rare_classes"] == 2
    assert out["rare_f1"] == pytest.approx(0.3)
    assert rare_class_f1(per_class, counts, 0.001)["rare_f1"] is None
