import copy
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from celltype_bench.errors import InputError
from celltype_bench.workflow_config import WorkflowConfig

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "config" / "schema.yaml")


@pytest.fixture
def cfg():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_default_config_is_valid(cfg):
    validate(cfg, SCHEMA)
    bench = WorkflowConfig.from_dict(cfg)
    runs = bench.all_runs()
    assert {r["task"] for r in runs} == set(cfg["tasks"])
    assert len([r for r in runs if r["task"] == "pbmc68k"]) == 5 * len(cfg["methods"])


def test_misspelt_key_is_named(cfg):
    bad = copy.deepcopy(cfg)
    bad["methods"]["linear"]["parms"] = {}
    with pytest.raises(WorkflowError, match="parms"):
        validate(bad, SCHEMA)


@pytest.mark.parametrize("name", ["../escape", "a;rm -rf", "a b", "$(x)"])
def test_names_that_escape_paths_or_shells_are_rejected(cfg, name):
    bad = copy.deepcopy(cfg)
    bad["tasks"][name] = bad["tasks"]["pbmc68k"]
    with pytest.raises(WorkflowError):
        validate(bad, SCHEMA)


def test_unknown_method_lists_valid_names(cfg):
    bad = copy.deepcopy(cfg)
    bad["methods"]["scbalanse"] = {}
    with pytest.raises(InputError) as err:
        WorkflowConfig.from_dict(bad, source="config.yaml")
    msg = str(err.value)
    assert "scbalanse" in msg and "scbalance" in msg and "config.yaml" in msg


def test_unknown_dataset_in_task(cfg):
    bad = copy.deepcopy(cfg)
    bad["tasks"]["pbmc68k"]["dataset"] = "nope"
    with pytest.raises(InputError, match="tasks.pbmc68k.dataset"):
        WorkflowConfig.from_dict(bad)


def test_seeds_differ_per_replicate(cfg):
    bench = WorkflowConfig.from_dict(cfg)
    assert bench.seed_for("r0") != bench.seed_for("r1")
    assert bench.n_replicates("census_like") == cfg["tasks"]["census_like"]["replicates"]
