"""Per-task figures: method comparison and per-class F1 vs training cells."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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


STRATEGY_ORDER = ["none", "class_weight", "weighted_sampling", "oversample", "undersample", "smote"]


def _strategy_order(names) -> list[str]:
    names = list(dict.fromkeys(names))
    return [s for s in STRATEGY_ORDER if s in names] + sorted(
        n for n in names if n not in STRATEGY_ORDER
    )


def _p_label(p: float) -> str:
    if not np.isfinite(p):
        return "p n/a"
    return f"p={p:.2g}"


def _crossed_methods(df: pd.DataFrame, task: str, path: str) -> list[str]:
    """Methods of a task run with more than one balancing strategy; InputError if none."""
    crossed = [m for m, sub in df.groupby("method") if sub["balancing"].nunique() > 1]
    if not crossed:
        raise InputError(
            f"no method of task '{task}' ran with more than one balancing strategy",
            file=path,
            field="balancing",
            fix="cross a method with strategies under balancing.per_method in the config",
        )
    return crossed


def balancing_comparison(scores: str, tests: str, task: str, out: str, dpi: int = 120) -> None:
    """Macro F1 and rare-class F1 by balancing strategy, per crossed method (scBalance Fig. 1c).

    Each strategy is annotated with the paired t-test p-value against the best alternative.
    """
    df = _task_rows(pd.read_csv(scores), task, scores)
    crossed = _crossed_methods(df, task, scores)
    tt = pd.read_csv(tests)
    metrics = [("macro_f1", "macro F1"), ("rare_f1", "rare-class F1")]
    fig, axes = plt.subplots(len(crossed), 2, figsize=(11, 3.8 * len(crossed)), squeeze=False)
    for row, method in enumerate(crossed):
        sub = df[df["method"] == method]
        order = _strategy_order(sub["balancing"])
        for col, (metric, title) in enumerate(metrics):
            ax = axes[row, col]
            data = sub.dropna(subset=[metric])
            sns.boxplot(
                data=data, x="balancing", y=metric, order=order, ax=ax, color="0.85", fliersize=0
            )
            sns.stripplot(
                data=data, x="balancing", y=metric, order=order, ax=ax, size=5, color="C0"
            )
            t = tt[(tt["task"] == task) & (tt["method"] == method) & (tt["metric"] == metric)]
            for i, strategy in enumerate(order):
                hit = t[t["strategy"] == strategy]
                if hit.empty:
                    continue
                h = hit.iloc[0]
                label = "best" if bool(h["best"]) else _p_label(h["p_ttest"])
                ax.text(i, 1.02, label, ha="center", va="bottom", fontsize=7, color="0.3")
            ax.set_ylim(0, 1.12)
            ax.set_xlabel("")
            ax.set_ylabel(title)
            n = int(data.groupby("balancing").size().max()) if len(data) else 0
            ax.set_title(
                f"{task} · {method}: {title} by balancing (n={n})\n"
                "p: paired t-test against the best strategy",
                fontsize=9,
            )
            plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    _save(fig, out, dpi, crossed)


def balancing_per_class(per_class: str, task: str, out: str, dpi: int = 120) -> None:
    """Per-class F1 vs training cells of the class, one colour per balancing strategy."""
    df = _task_rows(pd.read_csv(per_class), task, per_class)
    crossed = _crossed_methods(df, task, per_class)
    df = df[df["method"].isin(crossed) & (df["n_train"] > 0)]
    agg = df.groupby(["method", "balancing", "label"], as_index=False).agg(
        f1=("f1", "mean"), n_train=("n_train", "mean")
    )
    order = _strategy_order(agg["balancing"])
    palette = dict(zip(order, sns.color_palette("tab10", len(order)), strict=True))
    fig, axes = plt.subplots(1, len(crossed), figsize=(7.5 * len(crossed), 4.5), squeeze=False)
    for ax, method in zip(axes[0], crossed, strict=True):
        sub = agg[agg["method"] == method]
        sns.scatterplot(
            data=sub,
            x="n_train",
            y="f1",
            hue="balancing",
            hue_order=order,
            palette=palette,
            ax=ax,
            s=35,
            alpha=0.8,
        )
        for strategy, s2 in sub.groupby("balancing"):
            s2 = s2.sort_values("n_train")
            smooth = s2["f1"].rolling(3, center=True, min_periods=1).mean()
            ax.plot(s2["n_train"], smooth, lw=1, alpha=0.7, color=palette[strategy])
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("training cells of the class (log scale)")
        ax.set_ylabel("per-class F1 (mean over replicates)")
        ax.set_title(f"{task} · {method}: per-class F1 by balancing strategy", fontsize=10)
        ax.legend(fontsize=8, frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    _save(fig, out, dpi, order)


def balancing_runtime(runtime: str, out: str, dpi: int = 120) -> None:
    """Seconds each strategy needs for one epoch's balanced data vs training cells (log-log)."""
    df = pd.read_csv(runtime)
    if df.empty:
        raise InputError(
            "the runtime table is empty", file=runtime, fix="rerun the balancing_runtime rule"
        )
    agg = df.groupby(["strategy", "n_cells"], as_index=False)["seconds"].median()
    order = _strategy_order(agg["strategy"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sns.lineplot(
        data=agg,
        x="n_cells",
        y="seconds",
        hue="strategy",
        hue_order=order,
        style="strategy",
        markers=True,
        dashes=False,
        ax=ax,
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training cells (log scale)")
    ax.set_ylabel("seconds for one balanced epoch (log scale)")
    ax.set_title("Balancing running time vs training cells")
    ax.legend(fontsize=8, frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")
    _save(fig, out, dpi, order)


def training_curves(history: str, task: str, out: str, dpi: int = 120) -> None:
    """Per-epoch training loss and validation macro F1 of the iterative methods of one task.

    One line per method (balancing strategy when a method is crossed), mean over replicates.
    A task whose methods are all one-shot (controls, CellTypist) gets a figure saying so.
    """
    df = pd.read_csv(history)
    sub = df[(df["task"] == task) & df["epoch"].notna()] if not df.empty else df
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods: list[str] = []
    if sub.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "no iterative method ran on this task", ha="center", va="center")
            ax.set_axis_off()
    else:
        sub = sub.copy()
        sub["run"] = sub["method"] + " / " + sub["balancing"]
        methods = sorted(sub["method"].unique())
        order = sorted(sub["run"].unique())
        for ax, col, label in (
            (axes[0], "loss", "training loss"),
            (axes[1], "val_macro_f1", "validation macro F1"),
        ):
            data = sub[sub[col].notna()]
            if data.empty:
                ax.text(0.5, 0.5, f"no {label} recorded", ha="center", va="center")
                ax.set_axis_off()
                continue
            sns.lineplot(data=data, x="epoch", y=col, hue="run", hue_order=order, ax=ax)
            ax.set_ylabel(label)
            ax.legend(fontsize=7, frameon=False)
        axes[0].set_yscale("log")
    fig.suptitle(f"{task}: training curves (mean over replicates)")
    _save(fig, out, dpi, methods)


def uncertainty_accuracy(
    uncertainty: str, scores: str, task: str, out: str, dpi: int = 120
) -> None:
    """Accuracy vs per-cell uncertainty (1 - max probability), one line per method.

    Wrong predictions should carry higher uncertainty: accuracy should fall from left to
    right. The legend gives each method's error AUROC (uncertainty as a detector of errors).
    """
    bins = pd.read_csv(uncertainty)
    sc = _task_rows(pd.read_csv(scores), task, scores)
    sub = bins[bins["task"] == task]
    sub = sub[~sub["method"].isin(sc.loc[sc["control"].astype(bool), "method"])]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    methods = sorted(sub["method"].unique()) if not sub.empty else []
    for method in methods:
        m = sub[sub["method"] == method]
        agg = m.groupby("lo").apply(
            lambda g: pd.Series(
                {"accuracy": np.average(g["accuracy"], weights=g["n"]), "n": g["n"].sum()}
            ),
            include_groups=False,
        )
        auroc = sc.loc[sc["method"] == method, "error_auroc"].mean()
        label = f"{method} (error AUROC {auroc:.2f})" if np.isfinite(auroc) else method
        ax.plot(agg.index + 0.05, agg["accuracy"], marker="o", label=label)
    if not methods:
        ax.text(0.5, 0.5, "no non-control method ran on this task", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("uncertainty (1 - max probability), bin centre")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"{task}: accuracy vs uncertainty")
    if methods:
        ax.legend(fontsize=7, frameon=False)
    _save(fig, out, dpi, methods)


def scaling_curves(
    scores: list[str], runtime: list[str], task: str, out: str, dpi: int = 120
) -> None:
    """Macro F1 and test loss vs training cells over nested tiers (scTab Fig. 2b/2d).

    One line per model and subsampling kind (by donors: more diversity; by cells: the
    control with the same cell counts); points are tiers, mean over replicates with sd bars.
    """
    sc = pd.concat([pd.read_csv(p) for p in scores], ignore_index=True)
    rt = pd.concat([pd.read_csv(p) for p in runtime], ignore_index=True)
    if sc.empty:
        raise InputError(f"no scores for the tiers of '{task}'", fix="rerun the tier tasks")
    keys = ["task", "method", "balancing", "replicate"]
    df = sc.merge(rt[[*keys, "n_train"]], on=keys, how="left")
    df = df[~df["control"].astype(bool)]
    df["kind"] = df["task"].str.extract(r"-(donors|cells)-\d+$")[0]
    df = df.dropna(subset=["kind"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted(df["method"].unique())
    styles = {"donors": "-", "cells": "--"}
    colours = dict(zip(methods, sns.color_palette(n_colors=max(1, len(methods))), strict=False))
    for (method, kind), g in df.groupby(["method", "kind"]):
        agg = g.groupby("task").agg(
            n=("n_train", "mean"),
            f1=("macro_f1", "mean"),
            f1_sd=("macro_f1", "std"),
            loss=("test_loss", "mean"),
            loss_sd=("test_loss", "std"),
        )
        agg = agg.sort_values("n")
        label = f"{method}, by {kind}"
        for ax, y, e in ((axes[0], "f1", "f1_sd"), (axes[1], "loss", "loss_sd")):
            ax.errorbar(
                agg["n"], agg[y], yerr=agg[e].fillna(0), label=label, marker="o",
                linestyle=styles[kind], color=colours[method], capsize=2,
            )  # fmt: skip
    for ax, lab in ((axes[0], "test macro F1"), (axes[1], "test loss (cross-entropy)")):
        ax.set_xscale("log")
        ax.set_xlabel("training cells (log scale)")
        ax.set_ylabel(lab)
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(f"{task}: scaling with training data (nested tiers, validation and test fixed)")
    _save(fig, out, dpi, methods)


def model_size(scores: str, runtime: str, task: str, out: str, dpi: int = 120) -> None:
    """Test macro F1 vs trainable parameters (log x), scTab Fig. 2e.

    One point per configured method (mean ± sd over replicates); methods built on the same
    model (e.g. ``sctab`` at several widths) are joined by a line.
    """
    sc = _task_rows(pd.read_csv(scores), task, scores)
    rt = pd.read_csv(runtime)
    keys = ["task", "method", "balancing", "replicate"]
    cols = [c for c in ("model", "n_parameters") if c in rt.columns]
    df = sc.merge(rt[[*keys, *cols]], on=keys, how="left")
    if "n_parameters" not in df:
        df["n_parameters"] = np.nan
    if "model" not in df:
        df["model"] = df["method"]
    df = df[df["n_parameters"].notna() & ~df["control"].astype(bool)]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    methods: list[str] = []
    if df.empty:
        ax.text(0.5, 0.5, "no method with a parameter count ran on this task", ha="center")
        ax.set_axis_off()
    else:
        agg = (
            df.groupby(["model", "method"])
            .agg(n=("n_parameters", "mean"), f1=("macro_f1", "mean"), sd=("macro_f1", "std"))
            .reset_index()
            .sort_values("n")
        )
        methods = sorted(agg["method"].unique())
        for model, g in agg.groupby("model"):
            ax.errorbar(
                g["n"], g["f1"], yerr=g["sd"].fillna(0), marker="o", capsize=2,
                linestyle="-" if len(g) > 1 else "none", label=str(model),
            )  # fmt: skip
            for _, r in g.iterrows():
                ax.annotate(r["method"], (r["n"], r["f1"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("test macro F1")
        ax.legend(fontsize=7, frameon=False, title="model")
    fig.suptitle(f"{task}: macro F1 vs model size")
    _save(fig, out, dpi, methods)
