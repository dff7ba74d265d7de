"""Snakemake entry: results/figures/{task}_f1_vs_train_cells.png."""

from celltype_bench.figures import f1_vs_train_cells
from celltype_bench.steps import run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    f1_vs_train_cells,
    per_class=sm.input.per_class,
    task=sm.wildcards.task,
    out=sm.output[0],
    dpi=sm.params.dpi,
)
