# The tables as HTML for `snakemake --report` (figures register themselves in figures.smk).
rule summary_table:
    input:
        summary="results/tables/summary.csv",
        scores="results/tables/scores.csv",
        failed="results/tables/failed_runs.csv",
    output:
        report(
            "results/tables/summary.html",
            caption="../report/summary_table.rst",
            category="Tables",
            labels={"table": "scores summary"},
        ),
    log:
        "logs/summary_table.log",
    benchmark:
        "results/benchmarks/summary_table.tsv"
    conda:
        "../envs/bench.yaml"
    script:
        "../scripts/summary_table.py"
