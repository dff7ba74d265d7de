"""Snakemake entry: results/figures/{task}_method_comparison.png."""

from celltype_bench.figures import method_comparison
from celltype_bench.steps import run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    method_comparison,
    scores=sm.input.scores,
    task=sm.wildcards.task,
    out=sm.output[0],
    dpi=sm.params.dpi,
)
