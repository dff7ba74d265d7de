"""Snakemake entry: one method on one replicate -> predictions.parquet, run.json, model/."""

from celltype_bench.steps import run_logged, train_or_record

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    train_or_record,
    on_failure=sm.params.on_failure,
    log_file=sm.log[0],
    data=sm.input.data,
    split=sm.input.split,
    replicate=sm.wildcards.replicate,
    method=dict(sm.params.method),
    balancing=dict(sm.params.balancing),
    seed=sm.params.seed,
    out_predictions=sm.output.predictions,
    out_run=sm.output.run,
    out_model=sm.output.model,
    out_history=sm.output.history,
    threads=sm.threads,
    augmentation=sm.input.augmentation or None,
    unlabeled_data=list(sm.input.unlabeled),
    checkpoint_dir=sm.params.checkpoint_dir,
    memory_budget_mb=sm.params.memory_budget_mb,
)
