# The generic rule for every Python method in the registry. External tools add
# rules/methods/<name>.smk writing the same predictions file (docs/method-contract.md).
rule train:
    input:
        data=dataset_of,
        split="data/splits/{task}.parquet",
        # scTab-style augmentation vectors, for methods with `augment: true`
        augmentation=lambda w: (
            f"data/augmentation/{w.task}/{w.replicate}.npz"
            if BENCH.method_augments(w.method)
            else []
        ),
        # extra unlabeled datasets (task `unlabeled:`), for methods that learn from unlabeled cells
        unlabeled=lambda w: BENCH.unlabeled_paths(w.task, w.method),
    output:
        predictions="results/{task}/{method}/{balancing}/{replicate}/predictions.parquet",
        run="results/{task}/{method}/{balancing}/{replicate}/run.json",
        history="results/{task}/{method}/{balancing}/{replicate}/history.tsv",
        model=directory("results/{task}/{method}/{balancing}/{replicate}/model"),
    params:
        method=lambda w: BENCH.method_spec(w.method),
        balancing=lambda w: BENCH.balancing_spec(w.balancing),
        seed=lambda w: BENCH.seed_for(w.replicate),
        # survives a killed job (not an output): the rerun resumes from the last epoch
        checkpoint_dir="results/checkpoints/{task}/{method}/{balancing}/{replicate}",
        memory_budget_mb=config.get("memory_budget_mb"),
        on_failure=config.get("on_failure", "record"),
    wildcard_constraints:
        method=BENCH.python_method_regex,
    threads: lambda w: BENCH.method_threads(w.method)
    resources:
        # from the workflow config, per method (BENCH.method_resources): mem_mb, runtime,
        # cpus_per_task, gpu (torch methods ask for one GPU unless it says gpu: 0; ignored by
        # the local executor) and any other resource it names (slurm_partition, qos, ...)
        **BENCH.train_resources(),
    log:
        "logs/train/{task}/{method}/{balancing}/{replicate}.log",
    benchmark:
        "results/benchmarks/train/{task}/{method}/{balancing}/{replicate}.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/train.py"
