"""Snakemake entry: results/figures/{task}_scaling.png (scaling curves over tiers)."""

from celltype_bench.figures import scaling_curves
from celltype_bench.steps import run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    scaling_curves,
    scores=list(sm.input.scores),
    runtime=list(sm.input.runtime),
    task=sm.wildcards.task,
    out=sm.output[0],
    dpi=sm.params.dpi,
)
