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


TABLES = ["scores", "per_class", "summary", "runtime", "history", "uncertainty", "failed_runs"]


# Per task first (a figure of one task needs only that task's runs), then all tasks together.
rule aggregate_task:
    input:
        scores=lambda w: BENCH.run_paths(w.task, "scores.json"),
    output:
        **{t: f"results/tables/tasks/{{task}}/{t}.csv" for t in TABLES},
    params:
        runs=lambda w: BENCH.task_runs(w.task),
        methods=BENCH.method_table(),
    log:
        "logs/aggregate/{task}.log",
    benchmark:
        "results/benchmarks/aggregate/{task}.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/aggregate.py"


rule aggregate:
    input:
        **{t: expand(f"results/tables/tasks/{{task}}/{t}.csv", task=BENCH.tasks) for t in TABLES},
    output:
        **{t: f"results/tables/{t}.csv" for t in TABLES},
    log:
        "logs/aggregate.log",
    benchmark:
        "results/benchmarks/aggregate.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/concat_tables.py"


rule balancing_tests_task:
    input:
        scores="results/tables/tasks/{task}/scores.csv",
    output:
        "results/tables/tasks/{task}/balancing_tests.csv",
    log:
        "logs/balancing_tests/{task}.log",
    benchmark:
        "results/benchmarks/balancing_tests/{task}.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/balancing_tests.py"


rule balancing_tests:
    input:
        balancing_tests=expand(
            "results/tables/tasks/{task}/balancing_tests.csv", task=BENCH.crossed_tasks
        ),
    output:
        balancing_tests="results/tables/balancing_tests.csv",
    log:
        "logs/balancing_tests.log",
    benchmark:
        "results/benchmarks/balancing_tests.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/concat_tables.py"
