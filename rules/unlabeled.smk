# Learning from unlabeled cells: macro F1 vs labeled training cells over the `labeled` tiers
# of a task (scPretrain), and each such method beside its supervised control (gain table).
rule figure_labeled_cells:
    input:
        scores=lambda w: expand(
            "results/tables/tasks/{t}/scores.csv", t=BENCH.labeled_tasks(w.task)
        ),
        runtime=lambda w: expand(
            "results/tables/tasks/{t}/runtime.csv", t=BENCH.labeled_tasks(w.task)
        ),
    output:
        figure=report(
            "results/figures/{task}_labeled_cells.png",
            caption="../report/labeled_cells.rst",
            category="Unlabeled cells",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "macro F1 vs labeled cells"},
        ),
        table="results/tables/tasks/{task}/labeled_cells.csv",
    params:
        methods=BENCH.method_table(),
        dpi=config["figures"]["dpi"],
    log:
        "logs/figures/{task}_labeled_cells.log",
    benchmark:
        "results/benchmarks/figures/{task}_labeled_cells.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/figure_labeled_cells.py"


rule table_unlabeled_gain:
    input:
        scores="results/tables/scores.csv",
    output:
        table="results/tables/unlabeled_gain.csv",
        html=report(
            "results/tables/unlabeled_gain.html",
            caption="../report/unlabeled_gain.rst",
            category="Unlabeled cells",
            subcategory="gain over the supervised control",
            labels={"table": "gain from unlabeled cells"},
        ),
    params:
        methods=BENCH.method_table(),
        splits={t: s["split"]["kind"] for t, s in BENCH.tasks.items()},
    log:
        "logs/unlabeled_gain.log",
    benchmark:
        "results/benchmarks/unlabeled_gain.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/unlabeled_gain.py"
