rule figure_method_comparison:
    input:
        scores="results/tables/scores.csv",
    output:
        report(
            "results/figures/{task}_method_comparison.png",
            caption="../report/method_comparison.rst",
            category="Method comparison",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "method comparison"},
        ),
    params:
        dpi=config["figures"]["dpi"],
    log:
        "logs/figures/{task}_method_comparison.log",
    benchmark:
        "results/benchmarks/figures/{task}_method_comparison.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/figure_method_comparison.py"


rule figure_f1_vs_train_cells:
    input:
        per_class="results/tables/per_class.csv",
    output:
        report(
            "results/figures/{task}_f1_vs_train_cells.png",
            caption="../report/f1_vs_train_cells.rst",
            category="Per-class F1 vs training cells",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "per-class F1 vs training cells"},
        ),
    params:
        dpi=config["figures"]["dpi"],
    log:
        "logs/figures/{task}_f1_vs_train_cells.log",
    benchmark:
        "results/benchmarks/figures/{task}_f1_vs_train_cells.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/figure_f1_vs_train_cells.py"
