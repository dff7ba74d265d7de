"""Snakemake entry: results/tables/unlabeled_gain.{csv,html} (each method vs its control)."""

from celltype_bench.steps import run_logged
from celltype_bench.unlabeled_gain import unlabeled_gain

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    unlabeled_gain,
    scores=sm.input.scores,
    methods=sm.params.methods,
    splits=sm.params.splits,
    out=sm.output.table,
    out_html=sm.output.html,
)
