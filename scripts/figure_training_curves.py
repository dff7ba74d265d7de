"""Snakemake entry: results/figures/{task}_training_curves.png."""

from celltype_bench.figures import training_curves
from celltype_bench.steps import run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    training_curves,
    history=sm.input.history,
    task=sm.wildcards.task,
    out=sm.output[0],
    dpi=sm.params.dpi,
)
