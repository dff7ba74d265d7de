"""Per-task figures: method comparison and per-class F1 vs training cells."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .errors import InputError  # noqa: E402


def _task_rows(df: pd.DataFrame, task: str, path: str) -> pd.DataFrame:
    sub = df[df["task"] == task]
    if sub.empty:
        raise InputError(
            f"no rows for task '{task}'", file=path, field="task", fix="rerun the aggregate rule"
        )
    return sub


def _save(fig, out: str, dpi: int, methods: list[str]) -> None:
    """Write atomically; the PNG's text metadata lists the plotted methods (tests read it)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(".tmp." + Path(out).name)
    meta = {"Software": "celltype-bench", "Description": "methods: " + ", ".join(methods)}
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png", metadata=meta)
    plt.close(fig)
    tmp.replace(out)


def method_order(df: pd.DataFrame, metric: str = "macro_f1") -> list[str]:
    """Methods by descending mean score, controls last."""
    means = df.groupby("method")[metric].mean()
    controls = set(df.loc[df["control"].astype(bool), "method"])
    ranked = means.sort_values(ascending=False).index.tolist()
    return [m for m in ranked if m not in controls] + [m for m in ranked if m in controls]


def method_comparison(scores: str, task: str, out: str, dpi: int = 120) -> None:
    """Macro F1 (plain and ontology-corrected) per method, one point per replicate, box behind."""
    df = _task_rows(pd.read_csv(scores), task, scores)
    long = df.melt(
        id_vars=["method", "balancing", "replicate", "control"],
        value_vars=["macro_f1", "macro_f1_ontology"],
        var_name="metric",
        value_name="score",
    )
    long["metric"] = long["metric"].map(
        {"macro_f1": "macro F1", "macro_f1_ontology": "macro F1, ontology-corrected"}
    )
    order = method_order(df)
    n_rep = df.groupby("method").size().max()
    fig, ax = plt.subplots(figsize=(1.3 * len(order) + 2.5, 4.2))
    sns.boxplot(
        data=long,
        x="method",
        y="score",
        hue="metric",
        order=order,
        ax=ax,
        fliersize=0,
        boxprops={"alpha": 0.35},
    )
    sns.stripplot(
        data=long,
        x="method",
        y="score",
        hue="metric",
        order=order,
        dodge=True,
        ax=ax,
        size=5,
        legend=False,
    )
    n_controls = int(df.loc[df["control"].astype(bool), "method"].nunique())
    if n_controls:
        ax.axvspan(len(order) - n_controls - 0.5, len(order) - 0.5, color="0.9", zorder=0)
        ax.text(
            len(order) - n_controls / 2 - 0.5,
            1.02,
            "controls",
            ha="center",
            va="bottom",
            fontsize=8,
            color="0.4",
        )
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("")
    ax.set_ylabel("test score")
    ax.set_title(f"{task}: methods compared over {n_rep} replicates")
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    _save(fig, out, dpi, order)


def f1_vs_train_cells(per_class: str, task: str, out: str, dpi: int = 120) -> None:
    """Per-class F1 (mean over replicates) against training cells of the class, log x axis."""
    df = _task_rows(pd.read_csv(per_class), task, per_class)
    df = df[df["n_train"] > 0]
    agg = df.groupby(["method", "label"], as_index=False).agg(
        f1=("f1", "mean"), n_train=("n_train", "mean")
    )
    methods = sorted(agg["method"].unique())
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods)), strict=True))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.scatterplot(
        data=agg,
        x="n_train",
        y="f1",
        hue="method",
        style="method",
        hue_order=methods,
        palette=palette,
        ax=ax,
        s=45,
        alpha=0.85,
    )
    for method, sub in agg.groupby("method"):
        sub = sub.sort_values("n_train")
        smooth = sub["f1"].rolling(3, center=True, min_periods=1).mean()
        ax.plot(sub["n_train"], smooth, lw=0.9, alpha=0.6, color=palette[method])
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training cells of the class (log scale)")
    ax.set_ylabel("per-class F1 on test cells")
    ax.set_title(f"{task}: per-class F1 vs training cells (mean over replicates)")
    ax.legend(fontsize=8, frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")
    _save(fig, out, dpi, methods)


def figure_methods(png: str | Path) -> list[str]:
    """The methods a figure written here plotted, read back from its PNG metadata."""
    from PIL import Image

    with Image.open(png) as im:
        desc = im.info.get("Description", "")
    return [m for m in desc.removeprefix("methods: ").split(", ") if m]
