rule score:
    input:
        predictions="results/{task}/{method}/{balancing}/{replicate}/predictions.parquet",
        data=dataset_of,
        split="data/splits/{task}.parquet",
    output:
        "results/{task}/{method}/{balancing}/{replicate}/scores.json",
    params:
        rare_fraction=BENCH.balancing.get("rare_fraction", 0.05),
    log:
        "logs/score/{task}/{method}/{balancing}/{replicate}.log",
    benchmark:
        "results/benchmarks/score/{task}/{method}/{balancing}/{replicate}.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/score.py"


rule aggregate:
    input:
        scores=BENCH.all_run_paths("scores.json"),
    output:
        scores="results/tables/scores.csv",
        per_class="results/tables/per_class.csv",
        summary="results/tables/summary.csv",
        runtime="results/tables/runtime.csv",
        history="results/tables/history.csv",
        uncertainty="results/tables/uncertainty.csv",
        failed="results/tables/failed_runs.csv",
    params:
        runs=BENCH.all_runs(),
        methods=BENCH.method_table(),
    log:
        "logs/aggregate.log",
    benchmark:
        "results/benchmarks/aggregate.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/aggregate.py"


rule balancing_tests:
    input:
        scores="results/tables/scores.csv",
    output:
        "results/tables/balancing_tests.csv",
    log:
        "logs/balancing_tests.log",
    benchmark:
        "results/benchmarks/balancing_tests.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/balancing_tests.py"
