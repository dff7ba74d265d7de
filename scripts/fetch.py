"""Snakemake entry: data/raw/{dataset}.h5ad from a source spec."""

from celltype_bench.steps import fetch_dataset, run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(sm.log[0], fetch_dataset, source=dict(sm.params.source), out=sm.output[0])
