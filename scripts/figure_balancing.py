"""Snakemake entry: the balancing figures (strategy comparison, per class, runtime)."""

from celltype_bench import figures
from celltype_bench.steps import run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
kind = sm.params.kind
if kind == "comparison":
    run_logged(
        sm.log[0],
        figures.balancing_comparison,
        scores=sm.input.scores,
        tests=sm.input.tests,
        task=sm.wildcards.task,
        out=sm.output[0],
        dpi=sm.params.dpi,
    )
elif kind == "per_class":
    run_logged(
        sm.log[0],
        figures.balancing_per_class,
        per_class=sm.input.per_class,
        task=sm.wildcards.task,
        out=sm.output[0],
        dpi=sm.params.dpi,
    )
else:
    run_logged(
        sm.log[0],
        figures.balancing_runtime,
        runtime=sm.input.runtime,
        out=sm.output[0],
        dpi=sm.params.dpi,
    )
