"""Snakemake entry: data/splits/{task}.parquet."""

from celltype_bench.steps import run_logged, split_task

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(sm.log[0], split_task, data=sm.input[0], out=sm.output[0], spec=dict(sm.params.spec))
