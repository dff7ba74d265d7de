"""Kill -9 a training job mid-run: the rerun resumes from the last checkpoint and ends with
the same predictions as a run that was never interrupted (same config and seed)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_workflow_e2e import SNAKEMAKE, _copy_workflow

CONFIG = {
    "seed": 0,
    "datasets": {"pbmc68k": {"source": {"kind": "pbmc68k"}}},
    "tasks": {
        "pbmc68k": {
            "dataset": "pbmc68k",
            "split": {"kind": "stratified_kfold", "n_folds": 2},
            "methods": ["scbalance"],
        }
    },
    "methods": {"scbalance": {"params": {"epochs": 150, "batch_size": 16}}},
    "balancing": {"default": ["native"]},
}
TARGET = "results/pbmc68k/scbalance/weighted_sampling/r0/predictions.parquet"
CKPT = "results/checkpoints/pbmc68k/scbalance/weighted_sampling/r0/checkpoint.pt"


def _workdir(base: Path) -> Path:
    base.mkdir(parents=True)
    _copy_workflow(base)
    (base / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    return base


def _cmd(*extra: str) -> list[str]:
    return [SNAKEMAKE, "--cores", "1", "--configfile=tiny.yaml", *extra, TARGET]


@pytest.mark.e2e
def test_kill_minus_9_then_rerun_resumes_with_identical_predictions(tmp_path):
    clean = _workdir(tmp_path / "clean")
    res = subprocess.run(_cmd(), cwd=clean, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]

    wd = _workdir(tmp_path / "killed")
    proc = subprocess.Popen(
        _cmd(), cwd=wd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt = wd / CKPT
    deadline = time.time() + 600
    epoch = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists():
                try:
                    epoch = int(torch.load(ckpt, weights_only=True)["epoch"])
                except Exception:  # caught mid-rename: try again
                    epoch = 0
                if epoch >= 10:
                    break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: snakemake and its job
        proc.wait()
    assert 10 <= epoch < 150, f"the job was not caught mid-training (epoch {epoch})"
    assert not (wd / TARGET).exists()

    # what a user does after a kill: release Snakemake's lock, rerun the incomplete job
    subprocess.run(_cmd("--unlock"), cwd=wd, capture_output=True, text=True, timeout=300)
    res = subprocess.run(
        _cmd("--rerun-incomplete"), cwd=wd, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-4000:]
    log = (wd / "logs/train/pbmc68k/scbalance/weighted_sampling/r0.log").read_text()
    assert "resuming from checkpoint" in log
    a = pd.read_parquet(clean / TARGET)
    b = pd.read_parquet(wd / TARGET)
    pd.testing.assert_frame_equal(a, b)
    assert not ckpt.exists()  # removed after the outputs were written
