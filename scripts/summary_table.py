"""Snakemake entry: results/tables/summary.html for the report."""

from celltype_bench.steps import run_logged, summary_html

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    summary_html,
    summary=sm.input.summary,
    failed=sm.input.failed,
    out=sm.output[0],
)
