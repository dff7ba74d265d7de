"""What learning from unlabeled cells buys: each such method beside its own supervised control.

A method that learns from unlabeled cells names, as the class attribute
``supervised_control``, the registry name of the same model trained on the labeled cells only
(``scnym`` and ``scnym_no_adversary`` -> ``scnym_supervised``, ``scpretrain`` ->
``scpretrain_nopretrain``). :func:`control_pairs` resolves those names to the config's method
keys; :func:`gain_table` puts each method's score beside its control's, per task and balancing
strategy, with the gain (method minus control):

- paired where replicates align (same fold or seed: the same training, validation and test
  cells): the gain is the mean over the shared replicates of the per-replicate differences,
  with their sd, the number of replicates the method won, and a two-sided paired t-test and
  Wilcoxon signed-rank p-value (NaN with fewer than two pairs); both means are then taken over
  the shared replicates, so method minus control equals the gain;
- unpaired otherwise (no shared replicate, e.g. one side failed): the difference of the two
  means over all their replicates, ``paired`` false, no test.

:func:`gain_html` renders the table for the report, inter-dataset tasks (``holdout_study``
splits: train on some studies, predict another) first.
"""

from __future__ import annotations

import html as html_lib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import InputError

GAIN_COLUMNS = [
    "task",
    "split",
    "method",
    "control",
    "balancing",
    "control_balancing",
    "metric",
    "paired",
    "n_pairs",
    "n_method",
    "n_control",
    "method_mean",
    "control_mean",
    "gain",
    "gain_sd",
    "wins",
    "p_ttest",
    "p_wilcoxon",
]
INTER_DATASET_SPLITS = ("holdout_study",)


def control_of_class(name: str) -> str | None:
    """The registry name of the supervised control of registry method ``name`` (or None)."""
    from .methods import get

    return getattr(get(name), "supervised_control", None)


def control_pairs(methods: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Method key -> the key of its supervised control, among the configured methods.

    ``methods``: per config key, ``method`` (registry name), ``external`` and
    ``class_control`` (the class's ``supervised_control``), as
    ``WorkflowConfig.method_table()`` gives them. An entry's own ``supervised_control`` (a
    config key) wins, which is how an external method or a second configuration of a method
    names its control. Otherwise the class attribute names a registry method; the key of that
    name is taken if configured, else the first key (config order) running that registry
    method. Methods whose control is not configured get no pair.
    """
    out: dict[str, str] = {}
    for key, spec in methods.items():
        explicit = spec.get("supervised_control")
        if explicit:
            if explicit not in methods:
                raise InputError(
                    f"method '{key}' names unknown supervised control '{explicit}'",
                    field=f"methods.{key}.supervised_control",
                    fix=f"use one of {sorted(methods)}",
                )
            out[key] = str(explicit)
            continue
        if spec.get("external"):
            continue
        # the method table carries the class attribute (resolved where the config was loaded,
        # with the user's method modules imported); look it up only when it is absent
        if "class_control" in spec:
            control = spec["class_control"]
        else:
            control = control_of_class(spec.get("method", key))
        if control is None:
            continue
        candidates = [
            k
            for k, s in methods.items()
            if not s.get("external") and s.get("method", k) == control and k != key
        ]
        if not candidates:
            continue
        out[key] = control if control in candidates else candidates[0]
    return out


def _nan_sd(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if values.count() > 1 else float("nan")


def pair_gain(method: pd.Series, control: pd.Series) -> dict[str, Any]:
    """Gain of ``method`` over ``control`` (scores indexed by replicate), paired if possible."""
    from .stats import _pvalues

    method = method.dropna()
    control = control.dropna()
    common = sorted(set(method.index) & set(control.index))
    out: dict[str, Any] = {"n_method": int(method.count()), "n_control": int(control.count())}
    if common:
        m = method.loc[common].astype(float)
        c = control.loc[common].astype(float)
        d = m - c
        p_t, p_w = _pvalues(m.to_numpy(), c.to_numpy())
        out.update(
            paired=True,
            n_pairs=len(common),
            method_mean=float(m.mean()),
            control_mean=float(c.mean()),
            gain=float(d.mean()),
            gain_sd=_nan_sd(d),
            wins=f"{int((d > 0).sum())}/{len(common)}",
            p_ttest=p_t,
            p_wilcoxon=p_w,
        )
    else:
        m_mean = float(method.mean()) if len(method) else float("nan")
        c_mean = float(control.mean()) if len(control) else float("nan")
        out.update(
            paired=False,
            n_pairs=0,
            method_mean=m_mean,
            control_mean=c_mean,
            gain=m_mean - c_mean,
            gain_sd=float("nan"),
            wins="",
            p_ttest=float("nan"),
            p_wilcoxon=float("nan"),
        )
    return out


def gain_table(
    scores: pd.DataFrame,
    pairs: dict[str, str],
    metric: str = "macro_f1",
    splits: dict[str, str] | None = None,
) -> pd.DataFrame:
    """One row per task x (method, control) pair x balancing strategy, both present.

    Runs pair on the same balancing strategy; when the two share none but each ran with
    exactly one (e.g. each with its native setting), those two are paired. ``splits``: task ->
    split kind, shown as column ``split``. Failed runs are not in ``scores`` and simply leave
    fewer pairs.
    """
    rows = []
    if scores.empty or metric not in scores:
        return pd.DataFrame(columns=GAIN_COLUMNS)
    for task, sub in scores.groupby("task", sort=True):
        for method, control in pairs.items():
            ms = sub[sub["method"] == method]
            cs = sub[sub["method"] == control]
            if ms.empty or cs.empty:
                continue
            m_bal = sorted(ms["balancing"].astype(str).unique())
            c_bal = sorted(cs["balancing"].astype(str).unique())
            shared = [b for b in m_bal if b in c_bal]
            combos = [(b, b) for b in shared]
            if not combos and len(m_bal) == 1 and len(c_bal) == 1:
                combos = [(m_bal[0], c_bal[0])]
            for mb, cb in combos:
                m = ms[ms["balancing"].astype(str) == mb].set_index("replicate")[metric]
                c = cs[cs["balancing"].astype(str) == cb].set_index("replicate")[metric]
                rows.append(
                    {
                        "task": task,
                        "split": (splits or {}).get(str(task), ""),
                        "method": method,
                        "control": control,
                        "balancing": mb,
                        "control_balancing": cb,
                        "metric": metric,
                        **pair_gain(m, c),
                    }
                )
    return pd.DataFrame(rows, columns=GAIN_COLUMNS)


def unlabeled_gain(
    *,
    scores: str,
    methods: dict[str, dict[str, Any]],
    out: str,
    out_html: str | None = None,
    splits: dict[str, str] | None = None,
    metric: str = "macro_f1",
) -> None:
    """DAG step: results/tables/unlabeled_gain.csv (+ the report's HTML) from the scores."""
    import logging

    from . import io
    from .steps import LOGGER_NAME

    try:
        df = pd.read_csv(scores)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame()
    pairs = control_pairs(methods)
    logging.getLogger(LOGGER_NAME).info("method -> supervised control: %s", pairs or "none")
    table = gain_table(df, pairs, metric=metric, splits=splits)
    io.write_table(table, out)
    if out_html:
        gain_html(table, out_html)


def _fmt(x: Any, digits: int = 3, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return ""
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _section(df: pd.DataFrame) -> str:
    shown = pd.DataFrame(
        {
            "task": df["task"],
            "method": df["method"],
            "supervised control": df["control"],
            "balancing": [
                b if b == cb else f"{b} / {cb}"
                for b, cb in zip(df["balancing"], df["control_balancing"], strict=True)
            ],
            "method F1": [_fmt(v) for v in df["method_mean"]],
            "control F1": [_fmt(v) for v in df["control_mean"]],
            "gain": [_fmt(v, signed=True) for v in df["gain"]],
            "gain sd": [_fmt(v) for v in df["gain_sd"]],
            "replicates": [
                f"{int(n)} paired" if p else f"{int(a)} vs {int(b)} (unpaired)"
                for n, p, a, b in zip(
                    df["n_pairs"], df["paired"], df["n_method"], df["n_control"], strict=True
                )
            ],
            "method better": df["wins"],
            "p (paired t)": [_fmt(v) for v in df["p_ttest"]],
        }
    )
    return shown.to_html(index=False, border=0, escape=True)


def gain_html(table: pd.DataFrame, out: str) -> None:
    """The gain table as a small standalone HTML page (inter-dataset tasks first)."""
    metric = str(table["metric"].iloc[0]) if len(table) else "macro_f1"
    metric = {"macro_f1": "macro F1", "macro_f1_ontology": "ontology-corrected macro F1"}.get(
        metric, metric
    )
    head = (
        "<html><head><meta charset='utf-8'><title>gain from unlabeled cells</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        f"<h2>Gain from unlabeled cells ({html_lib.escape(metric)})</h2>"
        "<p>Each method that learns from unlabeled cells beside its own supervised control "
        "(the same model trained on the labeled cells only). Gain = method minus control: the "
        "mean of per-replicate differences where replicates align (same fold or seed), else "
        "the difference of the means.</p>"
    )
    if table.empty:
        body = "<p>No task ran both a method that learns from unlabeled cells and its control.</p>"
    else:
        inter = table["split"].isin(INTER_DATASET_SPLITS)
        body = ""
        if inter.any():
            body += (
                "<h3>Inter-dataset tasks (train on some studies, predict another)</h3>"
                + _section(table[inter])
            )
        if (~inter).any():
            body += "<h3>Other tasks</h3>" + _section(table[~inter])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    tmp.write_text(head + body + "</body></html>")
    tmp.replace(out)
