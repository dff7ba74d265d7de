# The generic rule for every Python method in the registry. External tools add
# rules/methods/<name>.smk writing the same predictions file (docs/method-contract.md).
rule train:
    input:
        data=dataset_of,
        split="data/splits/{task}.parquet",
    output:
        predictions="results/{task}/{method}/{balancing}/{replicate}/predictions.parquet",
        run="results/{task}/{method}/{balancing}/{replicate}/run.json",
        model=directory("results/{task}/{method}/{balancing}/{replicate}/model"),
    params:
        method=lambda w: BENCH.method_spec(w.method),
        balancing=lambda w: BENCH.balancing_spec(w.balancing),
        seed=lambda w: BENCH.seed_for(w.replicate),
    wildcard_constraints:
        method=BENCH.python_method_regex,
    threads: lambda w: BENCH.method_threads(w.method)
    resources:
        mem_mb=lambda w: BENCH.method_resource(w.method, "mem_mb"),
        runtime=lambda w: BENCH.method_resource(w.method, "runtime"),
    log:
        "logs/train/{task}/{method}/{balancing}/{replicate}.log",
    benchmark:
        "results/benchmarks/train/{task}/{method}/{balancing}/{replicate}.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/train.py"
