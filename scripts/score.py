"""Snakemake entry: scores.json for one run."""

from celltype_bench.steps import run_logged, score_run

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    score_run,
    predictions=sm.input.predictions,
    data=sm.input.data,
    split=sm.input.split,
    replicate=sm.wildcards.replicate,
    out=sm.output[0],
    rare_fraction=sm.params.rare_fraction,
)
