"""The whole DAG on a tiny config in a temporary copy of the workflow, with toy methods added
both ways (a Python module + config block, and an external rule)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

TINY = {
    "seed": 0,
    "datasets": {
        "pbmc68k": {"source": {"kind": "pbmc68k"}},
        "census_like": {
            "source": {"kind": "census_like", "n_cells": 2500, "n_donors": 40, "seed": 0}
        },
    },
    "preprocess": {"min_genes": 10},
    "tasks": {
        "pbmc68k": {"dataset": "pbmc68k", "split": {"kind": "stratified_kfold", "n_folds": 2}},
        "census_like": {
            "dataset": "census_like",
            "split": {"kind": "donor", "val_fraction": 0.15, "test_fraction": 0.15, "seed": 1},
            "replicates": 1,
            "methods": ["majority", "linear", "scbalance"],
            "scaling": {
                "fractions": [0.5, 1.0],
                "kinds": ["donors", "cells"],
                "methods": ["linear"],
                "replicates": 1,
            },
            "labeled": {
                "counts": [50],
                "methods": ["scpretrain", "scpretrain_nopretrain"],
                "replicates": 1,
            },
        },
    },
    "methods": {
        "majority": {},
        "random": {},
        "linear": {"params": {"epochs": 10, "batch_size": 64, "lr": 0.01}},
        "scbalance": {"params": {"epochs": 2}},
        "celltypist": {"params": {"epochs": 1, "batch_size": 100}},
        "toy_centroid": {"module": "toy_method.py"},
        "toy_crash": {
            "method": "toy_centroid",
            "module": "toy_method.py",
            "params": {"fail": True},
        },
        "toy_external": {"external": True},
        "scpretrain": {
            "params": {"pretrain_epochs": 1, "epochs": 2, "batch_size": 64},
            "tasks": ["census_like-labeled-*"],
        },
        "scpretrain_nopretrain": {
            "params": {"epochs": 2, "batch_size": 64},
            "tasks": ["census_like-labeled-*"],
        },
    },
    "balancing": {
        "default": ["native"],
        "per_method": {
            "scbalance": ["none", "weighted_sampling", "oversample", "smote", "ros_ext"]
        },
        "external": {
            "ros_ext": {"class": "imblearn.over_sampling.RandomOverSampler", "params": {}}
        },
        "runtime_sweep": {
            "sizes": [300, 1000],
            "strategies": ["none", "weighted_sampling", "smote"],
        },
    },
    "paper_figures": {
        "sctab_fig1c": {"figure": "method_comparison", "tasks": ["census_like"]},
        "scbalance_fig1d": {"figure": "balancing_runtime"},
    },
    "reproduction": {"published": "published.yaml"},
}
PUBLISHED = {
    "published": [
        {"id": "lin", "paper": "scTab", "source": "Fig. 1c", "metric": "macro_f1",
         "value": 0.7848, "sd": 0.0001, "task": "census_like", "method": "linear",
         "tolerance": 0.9},
        {"id": "xgb", "paper": "scTab", "source": "Fig. 1c", "metric": "macro_f1",
         "value": 0.8127, "task": "census", "method": "xgboost"},
    ]
}  # fmt: skip


def _copy_workflow(dest: Path) -> None:
    for item in [
        "Snakefile",
        "rules",
        "scripts",
        "config",
        "report",
        "envs",
        "profiles",
        "config.yaml",
    ]:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / item)
    shutil.copy(FIXTURES / "toy_method.py", dest / "toy_method.py")
    shutil.copy(FIXTURES / "toy_external.smk", dest / "rules" / "methods" / "toy_external.smk")
    shutil.copy(FIXTURES / "toy_external.py", dest / "rules" / "methods" / "toy_external.py")
    (dest / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    (dest / "published.yaml").write_text(yaml.safe_dump(PUBLISHED))


def _scaffold(dest: Path) -> None:
    """Add one method each way with `celltype-bench new-method`, as a user would."""
    cli = str(Path(sys.executable).with_name("celltype-bench"))
    for extra in ([], ["--external"]):
        name = "toy_scaffold_ext" if extra else "toy_scaffold"
        res = subprocess.run(
            [cli, "new-method", name, *extra, "--config", "tiny.yaml"],
            cwd=dest,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr


def _snakemake(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SNAKEMAKE, "--cores", "2", "--configfile", "tiny.yaml", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=2400,
    )


@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("wf")
    _copy_workflow(wd)
    _scaffold(wd)
    res = _snakemake(wd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    rep = _snakemake(wd, "--report", "results/report.html")
    assert rep.returncode == 0, rep.stderr[-3000:]
    return wd


@pytest.mark.e2e
def test_scores_table_has_every_method_and_control(workflow_run):
    scores = pd.read_csv(workflow_run / "results/tables/scores.csv")
    pbmc = scores[scores.task == "pbmc68k"]
    scaffolds = {"toy_scaffold", "toy_scaffold_ext"}
    tier_only = {m for m, spec in TINY["methods"].items() if "tasks" in spec}  # scPretrain
    # failed runs are listed apart; the scaffolds run as written
    assert set(pbmc.method) == (set(TINY["methods"]) - {"toy_crash"} - tier_only) | scaffolds
    n_strategies = len(TINY["balancing"]["per_method"]["scbalance"])
    n_methods = len(TINY["methods"]) - len(tier_only)
    assert len(pbmc) == (n_methods - 2 + n_strategies + 2) * 2  # two folds each
    assert set(scores.loc[scores.placeholder, "method"]) == scaffolds
    assert set(scores[scores.task == "census_like"].method) == {"majority", "linear", "scbalance"}
    assert scores.loc[scores.method == "majority", "control"].all()
    assert not scores.loc[scores.method == "linear", "control"].any()
    for col in ["accuracy", "macro_f1", "macro_f1_ontology", "ece"]:
        assert scores[col].between(0, 1).all(), col
    assert (scores["macro_f1_ontology"] >= scores["macro_f1"] - 1e-9).all()
    # a learned method beats the majority control on the real cells
    mean = pbmc.groupby("method")["macro_f1"].mean()
    assert mean["linear"] > mean["majority"] + 0.2


@pytest.mark.e2e
def test_per_class_table_and_runtime(workflow_run):
    per_class = pd.read_csv(workflow_run / "results/tables/per_class.csv")
    assert {"label", "cl_id", "f1", "n_train", "support_test"} <= set(per_class.columns)
    assert per_class["cl_id"].str.startswith("CL:").all()
    runtime = pd.read_csv(workflow_run / "results/tables/runtime.csv")
    assert (runtime["wall_seconds"] > 0).all()


@pytest.mark.e2e
def test_figures_report_and_logs(workflow_run):
    from celltype_bench.figures import figure_methods

    for task in TINY["tasks"]:
        for fig in ["method_comparison", "f1_vs_train_cells"]:
            png = workflow_run / f"results/figures/{task}_{fig}.png"
            assert png.stat().st_size > 10_000
    for fig in ["method_comparison", "f1_vs_train_cells"]:
        plotted = figure_methods(workflow_run / f"results/figures/pbmc68k_{fig}.png")
        assert {"toy_centroid", "toy_external", "majority", "random"} <= set(plotted), plotted
    html = (workflow_run / "results/report.html").read_text(errors="ignore")
    assert "pbmc68k_method_comparison.png" in html
    summary = (workflow_run / "results/tables/summary.html").read_text()
    assert "toy_scaffold" in summary and "toy_scaffold_ext" in summary
    log = (workflow_run / "logs/train/pbmc68k/linear/class_weight/r0.log").read_text()
    assert "epoch" in log
    run = json.loads((workflow_run / "results/pbmc68k/linear/class_weight/r0/run.json").read_text())
    assert run["n_train"] > 0 and run["fit_seconds"] > 0


@pytest.mark.e2e
def test_balancing_axis(workflow_run):
    from celltype_bench.figures import figure_methods

    scores = pd.read_csv(workflow_run / "results/tables/scores.csv")
    sb = scores[(scores.task == "pbmc68k") & (scores.method == "scbalance")]
    assert set(sb.balancing) == set(TINY["balancing"]["per_method"]["scbalance"])
    # native strategies resolve to each method's published setting
    assert set(scores.loc[scores.method == "linear", "balancing"]) == {"class_weight"}
    assert set(scores.loc[scores.method == "majority", "balancing"]) == {"none"}
    assert scores["rare_f1"].notna().any()
    runs = pd.read_csv(workflow_run / "results/tables/runtime.csv")
    over = runs[(runs.method == "scbalance") & (runs.balancing == "oversample")]
    assert (over["n_train_balanced"] > over["n_train"]).all()
    tests = pd.read_csv(workflow_run / "results/tables/balancing_tests.csv")
    assert set(tests.strategy) == set(TINY["balancing"]["per_method"]["scbalance"])
    assert tests.groupby(["task", "metric"])["best"].sum().eq(1).all()
    for task in TINY["tasks"]:
        for fig in ["balancing", "balancing_per_class"]:
            png = workflow_run / f"results/figures/{task}_{fig}.png"
            assert png.stat().st_size > 10_000
    assert figure_methods(workflow_run / "results/figures/pbmc68k_balancing.png") == ["scbalance"]
    runtime = pd.read_csv(workflow_run / "results/tables/balancing_runtime.csv")
    assert set(runtime.strategy) == set(TINY["balancing"]["runtime_sweep"]["strategies"])
    assert set(runtime.n_cells) == {300, 1000}
    assert (workflow_run / "results/figures/balancing_runtime.png").stat().st_size > 10_000


@pytest.mark.e2e
def test_a_crashing_method_is_listed_with_its_log_and_the_rest_goes_on(workflow_run):
    failed = pd.read_csv(workflow_run / "results/tables/failed_runs.csv")
    assert set(failed.method) == {"toy_crash"} and len(failed) == 2  # both folds
    assert failed["error"].str.contains("toy failure on purpose").all()
    assert failed["log_tail"].str.contains("Traceback").all()
    summary = (workflow_run / "results/tables/summary.html").read_text()
    assert "Failed runs (2)" in summary and "toy failure on purpose" in summary
    run = json.loads((workflow_run / "results/pbmc68k/toy_crash/none/r0/run.json").read_text())
    assert run["status"] == "failed"


@pytest.mark.e2e
def test_history_uncertainty_tables_and_figures(workflow_run):
    hist = pd.read_csv(workflow_run / "results/tables/history.csv")
    lin = hist[(hist.method == "linear") & (hist.task == "census_like")]  # has a validation set
    assert lin["epoch"].max() >= 2 and lin["val_macro_f1"].notna().all()
    assert lin["val_loss"].notna().all()
    unc = pd.read_csv(workflow_run / "results/tables/uncertainty.csv")
    assert {"lo", "hi", "n", "accuracy"} <= set(unc.columns) and len(unc)
    pred = pd.read_parquet(
        workflow_run / "results/pbmc68k/linear/class_weight/r0/predictions.parquet"
    )
    assert pred["uncertainty"].between(0, 1).all()
    for task in TINY["tasks"]:
        for fig in ["training_curves", "uncertainty"]:
            assert (workflow_run / f"results/figures/{task}_{fig}.png").stat().st_size > 10_000
    # checkpoints are removed once a run's outputs are written
    assert not list((workflow_run / "results/checkpoints").rglob("checkpoint.pt"))


@pytest.mark.e2e
def test_scaling_tiers_and_figure(workflow_run):
    scores = pd.read_csv(workflow_run / "results/tables/scores.csv")
    runtime = pd.read_csv(workflow_run / "results/tables/runtime.csv")
    tiers = ["census_like-donors-50", "census_like-donors-100", "census_like-cells-50"]
    assert set(tiers) <= set(scores.task)
    assert set(scores.loc[scores.task.isin(tiers), "method"]) == {"linear"}
    n = runtime.set_index("task")["n_train"]
    assert n["census_like-donors-50"] < n["census_like-donors-100"]
    assert n["census_like-cells-50"] == n["census_like-donors-50"]  # the control, same size
    assert scores["test_loss"].notna().any()
    from celltype_bench.figures import figure_methods

    png = workflow_run / "results/figures/census_like_scaling.png"
    assert figure_methods(png) == ["linear"]


@pytest.mark.e2e
def test_labeled_cell_tiers_figure_and_gain_table(workflow_run):
    runtime = pd.read_csv(workflow_run / "results/tables/runtime.csv")
    n = runtime.groupby("task")["n_train"].first()
    assert n["census_like-labeled-50"] == 50
    assert n["census_like-labeled-all"] == n["census_like"]
    table = pd.read_csv(workflow_run / "results/tables/tasks/census_like/labeled_cells.csv")
    assert set(table["method"]) == {"scpretrain", "scpretrain_nopretrain"}
    assert set(table["n_labeled"]) == {50, n["census_like"]}
    assert (workflow_run / "results/figures/census_like_labeled_cells.png").stat().st_size > 0
    gain = pd.read_csv(workflow_run / "results/tables/unlabeled_gain.csv")
    pairs = set(zip(gain["method"], gain["control"], strict=True))
    assert pairs == {("scpretrain", "scpretrain_nopretrain")}
    assert {"census_like-labeled-50", "census_like-labeled-all"} <= set(gain["task"])
    scores = pd.read_csv(workflow_run / "results/tables/scores.csv")
    seen = scores.drop_duplicates("method").set_index("method")["uses_unlabeled"]
    assert bool(seen["scpretrain"]) and not bool(seen["scpretrain_nopretrain"])


@pytest.mark.e2e
def test_reproduction_section_and_paper_figure_targets(workflow_run, tmp_path):
    rep = pd.read_csv(workflow_run / "results/tables/reproduction.csv")
    assert rep.set_index("id").loc["lin", "status"] == "within tolerance"
    assert rep.set_index("id").loc["xgb", "status"] == "not run"
    assert rep.set_index("id").loc["xgb", "reproduced"] == "not run"
    html = (workflow_run / "results/tables/reproduction.html").read_text()
    assert "not run" in html and "0.7848" in html
    # a figure target plans only its own task's runs
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _copy_workflow(fresh)
    res = _snakemake(fresh, "-n", "sctab_fig1c")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "results/census_like/linear" in out and "results/pbmc68k/" not in out


@pytest.mark.e2e
def test_rerun_has_nothing_to_do(workflow_run):
    res = _snakemake(workflow_run, "-n")
    assert res.returncode == 0
    assert "Nothing to be done" in res.stdout + res.stderr
