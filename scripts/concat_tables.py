"""Snakemake entry: one table per output name, concatenating the same-named inputs."""

from celltype_bench.steps import concat_tables, run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    concat_tables,
    inputs={name: list(sm.input[name]) for name in sm.output.keys()},
    outputs={name: sm.output[name] for name in sm.output.keys()},
)
