rule figure_method_comparison:
    input:
        scores="results/tables/tasks/{task}/scores.csv",
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
        per_class="results/tables/tasks/{task}/per_class.csv",
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


rule figure_balancing:
    input:
        scores="results/tables/tasks/{task}/scores.csv",
        tests="results/tables/tasks/{task}/balancing_tests.csv",
    output:
        report(
            "results/figures/{task}_balancing.png",
            caption="../report/balancing.rst",
            category="Balancing",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "F1 by balancing strategy"},
        ),
    params:
        kind="comparison",
        dpi=config["figures"]["dpi"],
    log:
        "logs/figures/{task}_balancing.log",
    benchmark:
        "results/benchmarks/figures/{task}_balancing.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/figure_balancing.py"


rule figure_balancing_per_class:
    input:
        per_class="results/tables/tasks/{task}/per_class.csv",
    output:
        report(
            "results/figures/{task}_balancing_per_class.png",
            caption="../report/balancing_per_class.rst",
            category="Balancing",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "per-class F1 by balancing strategy"},
        ),
    params:
        kind="per_class",
        dpi=config["figures"]["dpi"],
    log:
        "logs/figures/{task}_balancing_per_class.log",
    benchmark:
        "results/benchmarks/figures/{task}_balancing_per_class.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/figure_balancing.py"


rule figure_balancing_runtime:
    input:
        runtime="results/tables/balancing_runtime.csv",
    output:
        report(
            "results/figures/balancing_runtime.png",
            caption="../report/balancing_runtime.rst",
            category="Balancing",
            subcategory="running time",
            labels={"figure": "balancing running time"},
        ),
    params:
        kind="runtime",
        dpi=config["figures"]["dpi"],
    log:
        "logs/figures/balancing_runtime.log",
    benchmark:
        "results/benchmarks/figures/balancing_runtime.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/figure_balancing.py"


rule figure_training_curves:
    input:
        history="results/tables/tasks/{task}/history.csv",
    output:
        report(
            "results/figures/{task}_training_curves.png",
            caption="../report/training_curves.rst",
            category="Training curves",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "training curves"},
        ),
    params:
        dpi=config["figures"]["dpi"],
    log:
        "logs/figures/{task}_training_curves.log",
    benchmark:
        "results/benchmarks/figures/{task}_training_curves.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/figure_training_curves.py"


rule figure_uncertainty:
    input:
        uncertainty="results/tables/tasks/{task}/uncertainty.csv",
        scores="results/tables/tasks/{task}/scores.csv",
    output:
        report(
            "results/figures/{task}_uncertainty.png",
            caption="../report/uncertainty.rst",
            category="Uncertainty",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "accuracy vs uncertainty"},
        ),
    params:
        dpi=config["figures"]["dpi"],
    log:
        "logs/figures/{task}_uncertainty.log",
    benchmark:
        "results/benchmarks/figures/{task}_uncertainty.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/figure_uncertainty.py"


rule figure_scaling:
    input:
        scores=lambda w: expand(
            "results/tables/tasks/{t}/scores.csv", t=BENCH.scaling_tasks(w.task)
        ),
        runtime=lambda w: expand(
            "results/tables/tasks/{t}/runtime.csv", t=BENCH.scaling_tasks(w.task)
        ),
    output:
        report(
            "results/figures/{task}_scaling.png",
            caption="../report/scaling.rst",
            category="Scaling",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "scaling with training data"},
        ),
    params:
        dpi=config["figures"]["dpi"],
    log:
        "logs/figures/{task}_scaling.log",
    benchmark:
        "results/benchmarks/figures/{task}_scaling.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/figure_scaling.py"


rule figure_model_size:
    input:
        scores="results/tables/tasks/{task}/scores.csv",
        runtime="results/tables/tasks/{task}/runtime.csv",
    output:
        report(
            "results/figures/{task}_model_size.png",
            caption="../report/model_size.rst",
            category="Scaling",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "macro F1 vs model size"},
        ),
    params:
        dpi=config["figures"]["dpi"],
    log:
        "logs/figures/{task}_model_size.log",
    benchmark:
        "results/benchmarks/figures/{task}_model_size.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/figure_model_size.py"
