import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from test_slurm import TINY
from test_workflow_e2e import SNAKEMAKE, _copy_workflow

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
    assert {r["task"] for r in runs} == set(bench.tasks)
    assert set(bench.primary_tasks) == set(cfg["tasks"])
    for base in bench.scaled_tasks:
        assert bench.scaling_tasks(base), f"{base} has a scaling block but no tier tasks"
    n_cross = len(cfg["balancing"]["per_method"]["scbalance"])
    on_pbmc = bench.methods_for("pbmc68k")
    assert "scbalance" in on_pbmc and "sctab" not in on_pbmc  # sctab: tasks [census_like*]
    assert len([r for r in runs if r["task"] == "pbmc68k"]) == 5 * (len(on_pbmc) - 1 + n_cross)


def test_method_tasks_patterns_and_replicate_cap(cfg):
    cfg = copy.deepcopy(cfg)
    cfg["methods"]["linear"]["tasks"] = ["census_like*"]
    cfg["methods"]["linear"]["replicates"] = 2
    bench = WorkflowConfig.from_dict(cfg)
    runs = [r for r in bench.all_runs() if r["method"] == "linear"]
    assert {r["task"] for r in runs} >= {"census_like", "census_like-donors-15"}
    assert "pbmc68k" not in {r["task"] for r in runs}
    assert {r["replicate"] for r in runs if r["task"] == "census_like"} == {"r0", "r1"}


def test_labeled_tiers_gain_table_and_their_figure_targets(cfg):
    bench = WorkflowConfig.from_dict(cfg)
    assert bench.labeled_bases == ["census_like"]
    tiers = bench.labeled_tasks("census_like")
    assert tiers == [f"census_like-labeled-{c}" for c in (50, 100, 500, "all")]
    assert all(bench.is_derived(t) and t not in bench.primary_tasks for t in tiers)
    for t in tiers:  # only the pre-trained method and its control run on the tiers
        assert set(bench.methods_for(t)) == {"scpretrain", "scpretrain_nopretrain"}
    assert "census_like_query" in bench.gain_tasks and tiers[0] in bench.gain_tasks
    assert "pbmc68k" not in bench.gain_tasks
    targets = bench.all_targets()
    assert "results/figures/census_like_labeled_cells.png" in targets
    assert "results/tables/unlabeled_gain.html" in targets
    figures = bench.figure_targets()
    assert figures["scpretrain_labeled"] == ["results/figures/census_like_labeled_cells.png"]
    assert figures["unlabeled_gain"] == ["results/tables/unlabeled_gain.html"]


def test_unknown_supervised_control_is_named(cfg):
    bad = copy.deepcopy(cfg)
    bad["methods"]["scnym"]["supervised_control"] = "scnym_nope"
    validate(bad, SCHEMA)
    with pytest.raises(InputError, match="scnym_nope") as err:
        WorkflowConfig.from_dict(bad)
    assert err.value.field == "methods.scnym.supervised_control"


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


def test_balancing_axis_resolves_native_and_crosses_scbalance(cfg):
    bench = WorkflowConfig.from_dict(cfg)
    assert bench.balancings_for("linear") == ["class_weight"]
    assert bench.balancings_for("majority") == ["none"]
    assert bench.balancings_for("scbalance") == cfg["balancing"]["per_method"]["scbalance"]
    assert bench.crossed_methods == ["scbalance"]
    targets = bench.all_targets()
    assert "results/figures/pbmc68k_balancing.png" in targets
    assert "results/figures/balancing_runtime.png" in targets


def test_unknown_strategy_and_unsupported_pair_are_named(cfg):
    bad = copy.deepcopy(cfg)
    bad["balancing"]["per_method"]["linear"] = ["smoot"]
    with pytest.raises(InputError, match="smoot") as err:
        WorkflowConfig.from_dict(bad)
    assert "balancing.per_method.linear" in str(err.value) and "smote" in str(err.value)
    bad = copy.deepcopy(cfg)
    bad["balancing"]["per_method"]["majority"] = ["class_weight"]
    with pytest.raises(InputError, match="majority"):
        WorkflowConfig.from_dict(bad)


def test_external_balancer_spec(cfg):
    good = copy.deepcopy(cfg)
    good["balancing"]["external"] = {"adasyn": {"class": "imblearn.over_sampling.ADASYN"}}
    good["balancing"]["per_method"]["scbalance"].append("adasyn")
    validate(good, SCHEMA)
    bench = WorkflowConfig.from_dict(good)
    assert bench.balancing_spec("adasyn") == {
        "strategy": "external",
        "name": "adasyn",
        "class": "imblearn.over_sampling.ADASYN",
        "params": {},
    }
    assert bench.balancing_spec("smote") == {"strategy": "smote", "name": "smote"}


def test_extra_method_resources_reach_only_that_methods_training_jobs(cfg):
    cfg = copy.deepcopy(cfg)
    cfg["methods"]["sctab"]["resources"] = {"gpu": 1, "slurm_partition": "gpu", "qos": "long"}
    cfg["methods"]["majority"]["resources"] = {"slurm_partition": "cpu"}
    validate(cfg, SCHEMA)
    bench = WorkflowConfig.from_dict(cfg)
    assert bench.extra_resource_names() == ["qos", "slurm_partition"]  # gpu is declared anyway
    extra = bench.train_resources()

    class W:  # the wildcards Snakemake passes
        def __init__(self, method: str) -> None:
            self.method = method

    assert extra["slurm_partition"](W("sctab")) == "gpu"
    assert extra["slurm_partition"](W("majority")) == "cpu"
    assert extra["slurm_partition"](W("linear")) is None  # left out of that job
    assert extra["qos"](W("sctab")) == "long" and extra["qos"](W("majority")) is None
    assert extra["gpu"](W("sctab")) == 1 and extra["gpu"](W("majority")) == 0
    plain = WorkflowConfig.from_dict(yaml.safe_load((ROOT / "config.yaml").read_text()))
    assert list(plain.train_resources()) == ["mem_mb", "runtime", "cpus_per_task", "gpu"]


def test_dry_run_gives_the_training_job_its_methods_slurm_partition(tmp_path):
    _copy_workflow(tmp_path)
    config = copy.deepcopy(TINY)  # majority and linear on pbmc68k
    config["methods"]["linear"]["resources"]["slurm_partition"] = "gpu"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    res = subprocess.run(
        [SNAKEMAKE, "-n", "--cores", "1", "results/pbmc68k/linear/class_weight/r0/run.json"]
        + ["results/pbmc68k/majority/none/r0/run.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    jobs = {}
    for block in (res.stdout + res.stderr).split("rule ")[1:]:
        out = re.search(r"output: (\S+)", block)
        if out and "/run.json" in block:
            jobs[out.group(1)] = block
    linear = next(b for o, b in jobs.items() if "/linear/" in o)
    majority = next(b for o, b in jobs.items() if "/majority/" in o)
    assert "slurm_partition=gpu" in linear
    assert "slurm_partition" not in majority
