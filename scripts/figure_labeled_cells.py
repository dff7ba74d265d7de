"""Snakemake entry: results/figures/{task}_labeled_cells.png + its table (labeled-cell tiers)."""

from celltype_bench.figures_unlabeled import labeled_cells_figure
from celltype_bench.steps import run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    labeled_cells_figure,
    scores=list(sm.input.scores),
    runtime=list(sm.input.runtime),
    methods=sm.params.methods,
    task=sm.wildcards.task,
    out=sm.output.figure,
    out_table=sm.output.table,
    dpi=sm.params.dpi,
)
