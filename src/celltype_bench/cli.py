"""The ``celltype-bench`` command: helpers around the workflow.

- ``celltype-bench new-method NAME [--external]``: write a working skeleton of a new method
  (module or rule + config block + a test), see ``docs/adding-a-method.md``.
- ``celltype-bench annotate QUERY.h5ad --model PATH``: apply a trained model to your cells.
- ``celltype-bench retry-failed``: remove the outputs of runs recorded as failed, so the next
  ``snakemake`` run trains them again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .errors import CellTypeBenchError

RUN_FILES = ("predictions.parquet", "run.json", "history.tsv", "scores.json")


def failed_run_dirs(results: Path) -> list[Path]:
    """Run directories whose ``run.json`` says the run failed."""
    out = []
    for run_json in sorted(results.glob("*/*/*/r*/run.json")):
        try:
            status = json.loads(run_json.read_text()).get("status")
        except (OSError, json.JSONDecodeError):
            continue
        if status == "failed":
            out.append(run_json.parent)
    return out


def retry_failed(results: str | Path = "results", dry_run: bool = False) -> list[Path]:
    """Delete the outputs of failed runs (and the tables built from them); return the runs."""
    results = Path(results)
    runs = failed_run_dirs(results)
    for run in runs:
        print(("would remove " if dry_run else "removing ") + str(run))
        if dry_run:
            continue
        for name in RUN_FILES:
            (run / name).unlink(missing_ok=True)
        shutil.rmtree(run / "model", ignore_errors=True)
    if not runs:
        print("no failed runs under " + str(results))
    return runs


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``celltype-bench`` command."""
    parser = argparse.ArgumentParser(prog="celltype-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("retry-failed", help="remove failed runs' outputs so snakemake reruns them")
    p.add_argument("--results", default="results", help="results directory (default: results)")
    p.add_argument("-n", "--dry-run", action="store_true", help="only list the failed runs")
    p = sub.add_parser("new-method", help="write a working skeleton of a new method")
    p.add_argument("name", help="method name (letters, digits, underscores)")
    p.add_argument("--external", action="store_true", help="a Snakemake rule instead of Python")
    p.add_argument("--config", default="config.yaml", help="config file to add the block to")
    p.add_argument("--root", default=".", help="workflow directory (default: .)")
    p = sub.add_parser("annotate", help="apply a trained model to a query h5ad")
    p.add_argument("query", help="query .h5ad with raw counts (layers['counts'] or X)")
    p.add_argument("--model", required=True, help="a saved model directory (results/.../model)")
    p.add_argument("--out", help="output .h5ad (default: QUERY.annotated.h5ad)")
    p.add_argument(
        "--min-overlap",
        type=float,
        default=0.5,
        help="minimum share of the model's genes found in the query (default 0.5)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "retry-failed":
            retry_failed(args.results, args.dry_run)
        elif args.command == "annotate":
            import logging

            from .annotate import OBS_LABEL, annotate_file

            logging.basicConfig(level=logging.INFO, format="%(message)s")
            out = args.out or str(Path(args.query).with_suffix("")) + ".annotated.h5ad"
            res = annotate_file(args.query, args.model, out, min_overlap=args.min_overlap)
            counts = res.obs[OBS_LABEL].value_counts()
            print(f"wrote {out}: {res.n_obs} cells annotated")
            print(counts.to_string())
        elif args.command == "new-method":
            from .scaffold import new_method

            for path in new_method(args.name, args.external, args.root, args.config):
                print("wrote " + str(path))
            print(f"added methods.{args.name} to {args.config}; run `snakemake` to include it")
    except CellTypeBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
