"""Paired comparisons of balancing strategies over replicates (scBalance Fig. 1c)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def _pvalues(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sided paired t-test and Wilcoxon signed-rank p-values (NaN where undefined)."""
    d = a - b
    if len(d) < 2 or np.allclose(d, 0):
        return float("nan"), float("nan")
    p_t = float(stats.ttest_rel(a, b).pvalue) if np.std(d) > 0 else 0.0
    try:
        p_w = float(stats.wilcoxon(a, b).pvalue)
    except ValueError:
        p_w = float("nan")
    return p_t, p_w


def paired_strategy_tests(
    scores: pd.DataFrame, metrics: tuple[str, ...] = ("macro_f1", "rare_f1")
) -> pd.DataFrame:
    """For each task x method run with several strategies: each strategy against the best other.

    Replicates pair the runs (same fold or seed). The best strategy (highest mean) is compared
    with the runner-up; every other strategy with the best. Columns: task, method, metric,
    strategy, mean, sd, n, best, compared_with, mean_diff, p_ttest, p_wilcoxon.
    """
    rows = []
    for (task, method), sub in scores.groupby(["task", "method"], sort=True):
        if sub["balancing"].nunique() < 2:
            continue
        for metric in metrics:
            if metric not in sub or sub[metric].isna().all():
                continue
            wide = sub.pivot_table(index="replicate", columns="balancing", values=metric)
            wide = wide.dropna(axis=1, how="all")
            means = wide.mean().sort_values(ascending=False)
            if len(means) < 2:
                continue
            best = str(means.index[0])
            for strategy in means.index:
                other = str(means.index[1]) if strategy == best else best
                pair = wide[[strategy, other]].dropna()
                p_t, p_w = _pvalues(pair[strategy].to_numpy(), pair[other].to_numpy())
                rows.append(
                    {
                        "task": task,
                        "method": method,
                        "metric": metric,
                        "strategy": strategy,
                        "mean": float(wide[strategy].mean()),
                        "sd": float(wide[strategy].std(ddof=1))
                        if wide[strategy].count() > 1
                        else float("nan"),
                        "n": int(wide[strategy].count()),
                        "best": strategy == best,
                        "compared_with": other,
                        "mean_diff": float((pair[strategy] - pair[other]).mean()),
                        "p_ttest": p_t,
                        "p_wilcoxon": p_w,
                    }
                )
    columns = [
        "task",
        "method",
        "metric",
        "strategy",
        "mean",
        "sd",
        "n",
        "best",
        "compared_with",
        "mean_diff",
        "p_ttest",
        "p_wilcoxon",
    ]
    return pd.DataFrame(rows, columns=columns)
