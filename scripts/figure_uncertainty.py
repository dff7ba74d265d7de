"""Snakemake entry: results/figures/{task}_uncertainty.png."""

from celltype_bench.figures import uncertainty_accuracy
from celltype_bench.steps import run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    uncertainty_accuracy,
    uncertainty=sm.input.uncertainty,
    scores=sm.input.scores,
    task=sm.wildcards.task,
    out=sm.output[0],
    dpi=sm.params.dpi,
)
