# scTab's augmentation vectors, computed once per task and replicate from training cells only.
rule augmentation:
    input:
        data=dataset_of,
        split="data/splits/{task}.parquet",
    output:
        "data/augmentation/{task}/{replicate}.npz",
    params:
        augmentation=BENCH.augmentation_params(),
        seed=lambda w: BENCH.seed_for(w.replicate),
    log:
        "logs/augmentation/{task}/{replicate}.log",
    benchmark:
        "results/benchmarks/augmentation/{task}/{replicate}.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/augmentation.py"
