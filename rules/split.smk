rule split:
    input:
        dataset_of,
    output:
        "data/splits/{task}.parquet",
    params:
        spec=lambda w: BENCH.split_spec(w.task),
    log:
        "logs/split/{task}.log",
    benchmark:
        "results/benchmarks/split/{task}.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/split.py"
