# Published numbers beside reproduced ones, and one target per paper figure.
if BENCH.published_file:

    rule reproduction:
        input:
            summary="results/tables/summary.csv",
            published=BENCH.published_file,
        output:
            table="results/tables/reproduction.csv",
            html=report(
                "results/tables/reproduction.html",
                caption="../report/reproduction.rst",
                category="Reproduction",
                labels={"table": "published vs reproduced"},
            ),
        log:
            "logs/reproduction.log",
        benchmark:
            "results/benchmarks/reproduction.tsv"
        conda:
            "../envs/bench.yaml"
        script:
            "../scripts/reproduction.py"


# `snakemake NAME` builds only what one paper figure needs (names and tasks: config
# `paper_figures`; `snakemake --list-target-rules` lists them).
for _name, _files in BENCH.figure_targets().items():

    rule:
        name:
            _name
        input:
            _files,
        localrule: True
