"""Snakemake entry: scTab augmentation vectors of one task replicate's training cells."""

from celltype_bench.augmentation import augmentation_step
from celltype_bench.steps import run_logged

sm = snakemake  # noqa: F821  (injected by Snakemake)
run_logged(
    sm.log[0],
    augmentation_step,
    data=sm.input.data,
    split=sm.input.split,
    replicate=sm.wildcards.replicate,
    out=sm.output[0],
    params={"seed": sm.params.seed, **dict(sm.params.augmentation)},
)
