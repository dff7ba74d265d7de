"""Snakemake entry: results/tables/balancing_runtime.csv (strategy running time sweep)."""

from celltype_bench.steps import balancing_runtime_sweep, run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    balancing_runtime_sweep,
    sizes=list(sm.params.sweep["sizes"]),
    strategies=list(sm.params.sweep["strategies"]),
    seed=int(sm.params.sweep.get("seed", 0)),
    repeats=int(sm.params.sweep.get("repeats", 1)),
    repeat_max_cells=sm.params.sweep.get("repeat_max_cells"),
    out=sm.output[0],
)
