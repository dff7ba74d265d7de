"""Figures and tables on learning from unlabeled cells: macro F1 vs labeled training cells.

scPretrain's question: does pre-training on unlabeled cells help most when labels are few?
The derived tasks ``{task}-labeled-{n}`` / ``{task}-labeled-all`` (config block ``labeled``,
:mod:`celltype_bench.data.tiers`) keep n labeled training cells (nested, stratified, seeded)
with the same validation and test cells; :func:`labeled_cells_figure` plots each method's
macro F1 over those tiers and, beside it, each method's gain over its supervised control
(:mod:`celltype_bench.unlabeled_gain`), and writes the numbers as a table.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .errors import InputError  # noqa: E402
from .figures import _save  # noqa: E402
from .unlabeled_gain import control_pairs, gain_table  # noqa: E402

LABELED_COLUMNS = [
    "base",
    "task",
    "tier",
    "n_labeled",
    "method",
    "balancing",
    "control",
    "uses_unlabeled",
    "supervised_control",
    "metric",
    "mean",
    "sd",
    "n_replicates",
    "gain",
    "gain_sd",
    "n_pairs",
    "p_ttest",
]
METRIC_NAMES = {
    "macro_f1": "macro F1",
    "macro_f1_ontology": "macro F1, ontology-corrected",
    "rare_f1": "rare-class F1",
    "accuracy": "accuracy",
}


def _read(paths: list[str]) -> pd.DataFrame:
    frames = []
    for p in paths:
        try:
            frames.append(pd.read_csv(p))
        except pd.errors.EmptyDataError:
            continue
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _tier_of(task: str, base: str) -> str | None:
    """'50' / 'all' for ``{base}-labeled-50`` / ``{base}-labeled-all``; None for other tasks."""
    prefix = f"{base}-labeled-"
    if not task.startswith(prefix):
        return None
    tier = task[len(prefix) :]
    return tier if tier == "all" or tier.isdigit() else None


def labeled_cells_table(
    scores: pd.DataFrame,
    runtime: pd.DataFrame | None,
    pairs: dict[str, str],
    base: str,
    metric: str = "macro_f1",
) -> pd.DataFrame:
    """Mean ± sd of ``metric`` per labeled-cell tier x method, with the gain over the control.

    ``n_labeled``: the training cells the runs actually fitted on (``n_train`` of the runtime
    table, so a count above the available cells shows the real number), else the tier's count.
    ``gain`` columns are filled on the rows of methods with a supervised control in ``pairs``
    (paired over replicates where they align, see :func:`~celltype_bench.unlabeled_gain.gain_table`).
    """
    if scores.empty or "task" not in scores:
        return pd.DataFrame(columns=LABELED_COLUMNS)
    tiers = {t: _tier_of(str(t), base) for t in scores["task"].unique()}
    df = scores[scores["task"].map(tiers).notna()].copy()
    if df.empty:
        return pd.DataFrame(columns=LABELED_COLUMNS)
    n_labeled: dict[str, float] = {}
    if runtime is not None and not runtime.empty and "n_train" in runtime:
        n_labeled = runtime.groupby("task")["n_train"].median().dropna().to_dict()
    for t in df["task"].unique():
        if t not in n_labeled and tiers[t] != "all":
            n_labeled[t] = float(tiers[t])
    gains = gain_table(df, pairs, metric=metric)
    gains = gains.set_index(["task", "method", "balancing"])
    rows = []
    for (task, method, bal), g in df.groupby(["task", "method", "balancing"], sort=True):
        key = (task, method, bal)
        gain = gains.loc[key] if key in gains.index else None
        if isinstance(gain, pd.DataFrame):  # one method paired with several control balancings
            gain = gain.iloc[0]
        rows.append(
            {
                "base": base,
                "task": task,
                "tier": tiers[task],
                "n_labeled": n_labeled.get(task, float("nan")),
                "method": method,
                "balancing": bal,
                "control": bool(g["control"].iloc[0]) if "control" in g else False,
                "uses_unlabeled": bool(g["uses_unlabeled"].iloc[0])
                if "uses_unlabeled" in g
                else False,
                "supervised_control": pairs.get(method, ""),
                "metric": metric,
                "mean": float(g[metric].mean()),
                "sd": float(g[metric].std(ddof=1)) if g[metric].count() > 1 else float("nan"),
                "n_replicates": int(g[metric].count()),
                "gain": float("nan") if gain is None else float(gain["gain"]),
                "gain_sd": float("nan") if gain is None else float(gain["gain_sd"]),
                "n_pairs": 0 if gain is None else int(gain["n_pairs"]),
                "p_ttest": float("nan") if gain is None else float(gain["p_ttest"]),
            }
        )
    out = pd.DataFrame(rows, columns=LABELED_COLUMNS)
    order = out["tier"].map(lambda t: np.inf if t == "all" else float(t))
    return (
        out.assign(_o=order)
        .sort_values(["_o", "method", "balancing"])
        .drop(columns="_o")
        .reset_index(drop=True)
    )


def _positions(table: pd.DataFrame) -> dict[str, float]:
    """x position of each tier: its labeled cells; 'all' at 2x the largest count if unknown."""
    pos = table.groupby("tier")["n_labeled"].first().to_dict()
    counts = [float(t) for t in pos if t != "all"]
    if "all" in pos and not np.isfinite(pos["all"]):
        pos["all"] = 2.0 * max(counts) if counts else 1.0
    return {k: float(v) for k, v in pos.items()}


def labeled_cells_figure(
    *,
    scores: list[str],
    task: str,
    out: str,
    out_table: str,
    methods: dict[str, dict[str, Any]] | None = None,
    pairs: dict[str, str] | None = None,
    runtime: list[str] | None = None,
    metric: str = "macro_f1",
    dpi: int = 120,
) -> None:
    """Macro F1 vs labeled training cells (left) and gain over the supervised control (right).

    ``scores`` / ``runtime``: the per-task tables of ``task``'s labeled tiers. Pairs come from
    ``pairs`` or, if None, from ``methods`` (``WorkflowConfig.method_table()``) via
    :func:`~celltype_bench.unlabeled_gain.control_pairs`. Lines: solid for methods that learn
    from unlabeled cells, dashed for the others, grey dotted for the controls (majority,
    random); error bars are sd over replicates (right: sd of the paired differences).
    """
    from . import io

    if pairs is None:
        pairs = control_pairs(methods or {})
    sc = _read(list(scores))
    rt = _read(list(runtime or []))
    table = labeled_cells_table(sc, rt if not rt.empty else None, pairs, task, metric=metric)
    io.write_table(table, out_table)
    if table.empty:
        raise InputError(
            f"no scores for the labeled-cell tiers of '{task}'",
            file=", ".join(scores),
            fix="rerun the tier tasks ({task}-labeled-{n})",
        )
    pos = _positions(table)
    table = table.assign(x=table["tier"].map(pos))
    plotted = sorted(table["method"].unique())
    # one colour per family (a supervised control and the methods paired with it), one
    # marker per member of the family
    coloured = sorted(table.loc[~table["control"].astype(bool), "method"].unique())
    family = {m: pairs.get(m, m) for m in coloured}
    families = sorted(set(family.values()))
    palette = dict(zip(families, sns.color_palette(n_colors=max(1, len(families))), strict=False))
    colours = {m: palette[family[m]] for m in coloured}
    markers = {}
    for f in families:
        members = sorted(m for m in coloured if family[m] == f)
        markers.update({m: "osD^v<>"[i % 7] for i, m in enumerate(members)})
    name = METRIC_NAMES.get(metric, metric)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    any_gain = False
    for (method, bal), g in table.groupby(["method", "balancing"], sort=True):
        g = g.sort_values("x")
        is_control = bool(g["control"].iloc[0])
        style = ":" if is_control else ("-" if bool(g["uses_unlabeled"].iloc[0]) else "--")
        label = method if table["balancing"].nunique() == 1 else f"{method} ({bal})"
        axes[0].errorbar(
            g["x"], g["mean"], yerr=g["sd"].fillna(0), label=label, marker=markers.get(method, "o"),
            linestyle=style, color="0.55" if is_control else colours[method], capsize=2,
        )  # fmt: skip
        if method in pairs and g["gain"].notna().any():
            gg = g[g["gain"].notna()]
            any_gain = True
            axes[1].errorbar(
                gg["x"], gg["gain"], yerr=gg["gain_sd"].fillna(0), marker=markers[method],
                label=f"{label} - {pairs[method]}", color=colours[method], capsize=2,
            )  # fmt: skip
    axes[1].axhline(0, color="0.3", linewidth=0.8)
    if not any_gain:
        axes[1].text(
            0.5, 0.5, "no method with its supervised control\nin these tiers",
            ha="center", va="center", transform=axes[1].transAxes, fontsize=9,
        )  # fmt: skip
    ticks = sorted(pos.items(), key=lambda kv: kv[1])
    n_all = table.loc[table["tier"] == "all", "n_labeled"]
    for ax, ylab in (
        (axes[0], f"test {name}"),
        (axes[1], f"gain over the supervised control ({name})"),
    ):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([x for _, x in ticks])
        ax.set_xticklabels(
            [
                f"all\n({int(n_all.iloc[0]):,})"
                if t == "all" and len(n_all) and np.isfinite(n_all.iloc[0])
                else t
                for t, _ in ticks
            ]
        )
        ax.set_xlabel("labeled training cells (log scale)")
        ax.set_ylabel(ylab)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, frameon=False)
    fig.suptitle(
        f"{task}: {name} vs labeled training cells (nested tiers; validation and test fixed)"
    )
    _save(fig, out, dpi, plotted)
