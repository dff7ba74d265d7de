"""Published numbers beside reproduced ones (the report's reproduction section).

Published values live in the ``published:`` list of ``config/paper.yaml`` (each with its
source: paper, figure or table, mean and sd where given, the task and method of this
benchmark that reproduces it, and a tolerance). :func:`reproduction_table` joins them with the
summary of the runs: mean ± sd over replicates, the difference and whether it lies within the
tolerance. A value whose task and method did not run says "not run" and names the task (and
config) that would produce it, never a blank or a zero.
"""

from __future__ import annotations

import html as html_lib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from .errors import InputError

REQUIRED = ("id", "paper", "source", "metric", "value", "task", "method")
METRICS = ("macro_f1", "macro_f1_ontology", "rare_f1", "accuracy", "ece")


def load_published(path: str | Path) -> list[dict[str, Any]]:
    """The ``published`` list of a YAML file, checked (InputError names entry and field)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read published values ({exc})", file=str(path)) from exc
    entries = doc.get("published", [])
    if not isinstance(entries, list):
        raise InputError(
            "'published' must be a list",
            file=str(path),
            field="published",
            fix="see config/paper.yaml",
        )
    for i, e in enumerate(entries):
        missing = [k for k in REQUIRED if k not in e]
        if missing:
            raise InputError(
                f"published entry {i} ({e.get('id', '?')}) lacks {missing}",
                file=str(path),
                field=f"published[{i}]",
                fix="give " + ", ".join(REQUIRED),
            )
        if e["metric"] not in METRICS:
            raise InputError(
                f"published entry '{e['id']}' has unknown metric '{e['metric']}'",
                file=str(path),
                field=f"published[{i}].metric",
                fix="use one of: " + ", ".join(METRICS),
            )
    return entries


def _fmt(mean: float | None, sd: float | None) -> str:
    if mean is None or not np.isfinite(mean):
        return ""
    if sd is None or not np.isfinite(sd):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {sd:.4f}"


def reproduction_table(
    published: list[dict[str, Any]], summary: pd.DataFrame, config_name: str = "config/paper.yaml"
) -> pd.DataFrame:
    """One row per published value: published, reproduced (mean ± sd, n), difference, status."""
    rows = []
    for e in published:
        metric = e["metric"]
        sel = summary[(summary["task"] == e["task"]) & (summary["method"] == e["method"])]
        if "balancing" in e and len(sel):
            sel = sel[sel["balancing"] == e["balancing"]]
        pub, pub_sd = float(e["value"]), e.get("sd")
        row = {
            "id": e["id"],
            "paper": e["paper"],
            "source": e["source"],
            "metric": metric,
            "task": e["task"],
            "method": e["method"],
            "published": _fmt(pub, None if pub_sd is None else float(pub_sd)),
            "published_value": pub,
            "tolerance": float(e.get("tolerance", 0.01)),
        }
        col = f"{metric}_mean"
        if sel.empty or col not in sel or not np.isfinite(sel[col].iloc[0]):
            row.update(
                reproduced="not run",
                reproduced_value=np.nan,
                n_replicates=0,
                difference=np.nan,
                status="not run",
                note=f"produced by task '{e['task']}', method '{e['method']}' of {config_name}",
            )
        else:
            r = sel.iloc[0]
            mean = float(r[col])
            sd = float(r.get(f"{metric}_sd", np.nan))
            diff = mean - pub
            ok = abs(diff) <= row["tolerance"]
            row.update(
                reproduced=_fmt(mean, sd),
                reproduced_value=mean,
                n_replicates=int(r.get("n_replicates", 1)),
                difference=diff,
                status="within tolerance" if ok else "outside tolerance",
                note=e.get("note", ""),
            )
        rows.append(row)
    cols = [
        "id", "paper", "source", "metric", "task", "method", "published", "reproduced",
        "n_replicates", "difference", "tolerance", "status", "note", "published_value",
        "reproduced_value",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def reproduction_html(table: pd.DataFrame, config_name: str) -> str:
    """The reproduction section as HTML (status coloured; 'not run' rows say what to run)."""
    colour = {"within tolerance": "#e6f4e6", "outside tolerance": "#fbe3e3", "not run": "#f2f2f2"}
    show = table.drop(columns=["published_value", "reproduced_value"]).copy()
    show["difference"] = [
        "" if not np.isfinite(d) else f"{d:+.4f}" for d in table["difference"].astype(float)
    ]
    head = "".join(f"<th>{html_lib.escape(str(c))}</th>" for c in show.columns)
    body = []
    for _, r in show.iterrows():
        cells = "".join(f"<td>{html_lib.escape(str(v))}</td>" for v in r.to_numpy())
        body.append(f"<tr style='background:{colour.get(r['status'], '#fff')}'>{cells}</tr>")
    n_run = int((table["status"] != "not run").sum())
    return (
        "<html><head><meta charset='utf-8'><title>Reproduction</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}</style></head><body>"
        "<h2>Published numbers beside reproduced ones</h2>"
        f"<p>{len(table)} published values; {n_run} reproduced by this run. Reproduced = mean ± "
        "sd over replicates of the same task and method; status compares the difference "
        "with the stated tolerance. 'not run' rows name the task and method of "
        f"<code>{html_lib.escape(config_name)}</code> that produce them.</p>"
        f"<table><tr>{head}</tr>{''.join(body)}</table></body></html>"
    )


def reproduction_step(*, summary: str, published: str, out_table: str, out_html: str) -> None:
    """DAG step: results/tables/reproduction.{csv,html}."""
    from . import io

    entries = load_published(published)
    table = reproduction_table(entries, pd.read_csv(summary), config_name=published)
    io.write_table(table, out_table)
    tmp = Path(out_html).with_name(Path(out_html).name + ".tmp")
    tmp.write_text(reproduction_html(table, published))
    tmp.replace(out_html)
