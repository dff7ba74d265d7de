rule preprocess:
    input:
        "data/raw/{dataset}.h5ad",
    output:
        "data/processed/{dataset}.h5ad",
    params:
        label_map=lambda w: BENCH.datasets[w.dataset].get("label_map", {}),
        label_key=lambda w: BENCH.datasets[w.dataset].get("label_key", "cell_type"),
        min_genes=config["preprocess"]["min_genes"],
    log:
        "logs/preprocess/{dataset}.log",
    benchmark:
        "results/benchmarks/preprocess/{dataset}.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/preprocess.py"
