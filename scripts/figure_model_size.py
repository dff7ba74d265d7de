"""Snakemake entry: results/figures/{task}_model_size.png (macro F1 vs parameters)."""

from celltype_bench.figures import model_size
from celltype_bench.steps import run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    model_size,
    scores=sm.input.scores,
    runtime=sm.input.runtime,
    task=sm.wildcards.task,
    out=sm.output[0],
    dpi=sm.params.dpi,
)
