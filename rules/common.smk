# Shared helpers (config lookups, target lists) for every stage's file; defines no jobs.
from pathlib import Path

from celltype_bench.workflow_config import WorkflowConfig

BENCH = WorkflowConfig.from_dict(config, source=workflow.configfiles[-1] if workflow.configfiles else "config")


wildcard_constraints:
    dataset=BENCH.name_regex,
    task=BENCH.name_regex,
    method=BENCH.name_regex,
    balancing=BENCH.name_regex,
    replicate=r"r\d+",


def all_targets():
    return BENCH.all_targets()


def dataset_of(wildcards):
    return f"data/processed/{BENCH.tasks[wildcards.task]['dataset']}.h5ad"


def fetch_inputs(wildcards):
    """A combined dataset (source kind 'combine') is built from its parts' raw files."""
    source = BENCH.datasets[wildcards.dataset]["source"]
    if source.get("kind") == "combine":
        return [f"data/raw/{part}.h5ad" for part in source.get("parts", [])]
    return []
