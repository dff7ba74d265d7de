# Balancing as a stage of its own: how long each strategy takes as training sets grow
# (scBalance Fig. 1d). The strategies' effect on accuracy comes from the train/score rules.
rule balancing_runtime:
    output:
        "results/tables/balancing_runtime.csv",
    params:
        sweep=BENCH.balancing.get("runtime_sweep", {}),
    threads: 1
    resources:
        # SMOTE / oversampling to the largest class: ~70 MB per 1,000 cells of the largest size
        mem_mb=lambda w: max(2000, 70 * max(BENCH.balancing.get("runtime_sweep", {}).get("sizes", [0])) // 1000),
    log:
        "logs/balancing_runtime.log",
    benchmark:
        "results/benchmarks/balancing_runtime.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/balancing_runtime.py"
