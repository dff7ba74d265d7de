"""Snakemake entry: data/processed/{dataset}.h5ad."""

from celltype_bench.steps import preprocess_dataset, run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    preprocess_dataset,
    raw=sm.input[0],
    out=sm.output[0],
    label_map=dict(sm.params.label_map),
    label_key=sm.params.label_key,
    min_genes=sm.params.min_genes,
)
