# Downloads run where snakemake runs (a cluster's login node has internet; compute nodes often not).
localrules:
    fetch,


rule fetch:
    input:
        fetch_inputs,
    output:
        "data/raw/{dataset}.h5ad",
    params:
        source=lambda w: BENCH.datasets[w.dataset]["source"],
    log:
        "logs/fetch/{dataset}.log",
    benchmark:
        "results/benchmarks/fetch/{dataset}.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/fetch.py"
