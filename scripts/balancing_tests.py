"""Snakemake entry: results/tables/balancing_tests.csv (paired tests between strategies)."""

from celltype_bench.steps import balancing_tests, run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(sm.log[0], balancing_tests, scores=sm.input.scores, out=sm.output[0])
