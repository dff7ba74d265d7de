"""Snakemake entry: results/tables/tasks/{task}/*.csv from the task's runs' scores."""

from celltype_bench.steps import aggregate, run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    aggregate,
    score_paths=list(sm.input.scores),
    runs=list(sm.params.runs),
    methods=dict(sm.params.methods),
    out_scores=sm.output.scores,
    out_per_class=sm.output.per_class,
    out_summary=sm.output.summary,
    out_runtime=sm.output.runtime,
    out_history=sm.output.history,
    out_uncertainty=sm.output.uncertainty,
    out_failed=sm.output.failed_runs,
)
