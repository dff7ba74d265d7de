"""Snakemake entry: results/tables/reproduction.{csv,html} (published vs reproduced)."""

from celltype_bench.reproduction import reproduction_step
from celltype_bench.steps import run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    reproduction_step,
    summary=sm.input.summary,
    published=sm.input.published,
    out_table=sm.output.table,
    out_html=sm.output.html,
)
