"""`snakemake --profile slurm` on a real scheduler (issue 9).

A single-node SLURM cluster on loopback (tools/slurm/start.sh: Debian's slurmctld, slurmd and
munge, one GPU declared through gres on /dev/null, partitions `local` (the default) and `gpu`)
runs a small slice of the workflow with `snakemake --profile slurm` (the repository's
slurm/config.yaml; a few options below only make it faster): fetch (a local rule: downloads
run where snakemake runs), preprocess and split of one task, the training of a torch method
(asks for a GPU, on its own partition from the workflow config) and of a control (no GPU, the
default partition), and the scoring of both. About 3.5 minutes, mostly the plugin's status
polling and the Snakemake start-up inside each job; tools/slurm/stop.sh stops the daemons by
PID.

Needs root (the daemons, apt-get): skipped otherwise, or when SLURM is missing and there is no
apt-get to install it. Any other problem fails. Deselect with ``-m "not slurm"``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "tools" / "slurm" / "start.sh"
STOP = ROOT / "tools" / "slurm" / "stop.sh"
STATE_DIR = Path(os.environ.get("CELLTYPE_BENCH_SLURM_DIR", "/tmp/celltype-bench-slurm"))
# one cluster per machine (/etc/slurm): a second pytest waits for the first one's cluster
LOCK = Path("/tmp/celltype-bench-slurm.lock")
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

pytestmark = pytest.mark.slurm

TINY = {
    "seed": 0,
    "datasets": {"pbmc68k": {"source": {"kind": "pbmc68k"}}},
    "preprocess": {"min_genes": 10},
    "tasks": {
        "pbmc68k": {
            "dataset": "pbmc68k",
            "split": {"kind": "stratified_kfold", "n_folds": 2},
            "methods": ["majority", "linear"],
        }
    },
    "methods": {
        "majority": {},
        # resources from the workflow config reach sbatch (-t 10, --mem 1500, -p gpu: the
        # second partition of tools/slurm/start.sh); gpu stays the torch default (1)
        "linear": {
            "params": {"epochs": 3, "batch_size": 64, "lr": 0.01},
            "resources": {"runtime": 10, "mem_mb": 1500, "slurm_partition": "gpu"},
        },
    },
    "balancing": {"default": ["native"]},
    "reproduction": {"published": None},
}
RUNS = {
    "linear": "results/pbmc68k/linear/class_weight/r0",
    "majority": "results/pbmc68k/majority/none/r0",
}
TARGETS = [f"{run}/scores.json" for run in RUNS.values()]
# CI speed only; everything else comes from slurm/config.yaml. The plugin's first status check
# comes after 40 s and each check without news waits 10 s longer; preprocess and split
# share one SLURM job (fetch is a local rule) (each job starts Snakemake twice, ~10 s each on 2 cores).
FAST = [
    "--slurm-init-seconds-before-status-checks", "1",
    "--seconds-between-status-checks", "1",
    "--latency-wait", "5",
    "--groups", "preprocess=data", "split=data",
]  # fmt: skip
WORKFLOW = ["Snakefile", "rules", "scripts", "config", "report", "envs", "slurm", "config.yaml"]
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _lock(handle, wait: float = 1200.0) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                pytest.fail(f"{LOCK} still held after {wait:.0f} s by another SLURM test")
            time.sleep(2)


def _log_tails() -> str:
    out = []
    for name in ["slurmctld.log", "slurmd.log"]:
        path = STATE_DIR / "log" / name
        if path.exists():
            out.append(f"---- {path}\n" + "\n".join(path.read_text().splitlines()[-30:]))
    return "\n".join(out)


@pytest.fixture(scope="module")
def slurm_cluster():
    """The local cluster of tools/slurm/start.sh; one already running is used and left running."""
    if os.geteuid() != 0:
        pytest.skip("needs root: tools/slurm/start.sh runs SLURM's daemons (and apt-get)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    with open(LOCK, "w") as handle:
        _lock(handle)
        start = _run(["bash", str(START)], timeout=900)
        ours = not (start.returncode == 0 and "already running" in start.stdout)
        try:
            assert start.returncode == 0, start.stdout + start.stderr
            yield STATE_DIR
        finally:
            if ours:  # also after a failed start: stop what did start
                stop = _run(["bash", str(STOP)], timeout=120)
                assert stop.returncode == 0, stop.stdout + stop.stderr


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):
    """The workflow slice run with `snakemake --profile slurm` in a copy of the workflow."""
    wd = tmp_path_factory.mktemp("slurm_wf")
    for item in WORKFLOW:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, wd / item)
    (wd / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cmd = ["timeout", "-k", "10", "600", SNAKEMAKE, *TARGETS, "--profile", "slurm"]
    cmd += ["--configfile", "tiny.yaml", *FAST]
    t0 = time.monotonic()
    res = _run(cmd, cwd=wd, timeout=700)
    seconds = time.monotonic() - t0
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"exit {res.returncode}\n{log[-8000:]}\n{_log_tails()}"
    # SLURM job id per job, named by its log's folder under .snakemake/slurm_logs/, e.g.
    # rule_train/pbmc68k_linear_class_weight_r0/12.log
    jobs = {}
    for jobid, path in SUBMITTED.findall(log):
        parts = Path(path).parts
        jobs["/".join(parts[parts.index("slurm_logs") + 1 : -1])] = jobid
    return {"wd": wd, "log": log, "jobs": jobs, "seconds": seconds, "state": slurm_cluster}


def _show_job(jobid: str) -> dict[str, str]:
    """`scontrol show job` as key -> value (finished jobs stay visible for MinJobAge=300 s)."""
    res = _run(["scontrol", "show", "job", jobid], timeout=30)
    assert res.returncode == 0, res.stderr
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout))


def test_workflow_completes_through_slurm(slurm_run):
    wd, jobs = slurm_run["wd"], slurm_run["jobs"]
    assert set(jobs) == {
        "group_data_preprocess_split",
        "rule_train/pbmc68k_linear_class_weight_r0",
        "rule_train/pbmc68k_majority_none_r0",
        "rule_score/pbmc68k_linear_class_weight_r0",
        "rule_score/pbmc68k_majority_none_r0",
    }, slurm_run["log"][-4000:]
    for run in RUNS.values():
        scores = json.loads((wd / run / "scores.json").read_text())
        assert 0 <= scores["macro_f1"] <= 1
        assert (wd / run / "predictions.parquet").stat().st_size > 0
    assert (wd / "data/splits/pbmc68k.parquet").exists()
    # every job ran to completion on the scheduler: SLURM's job completion log (jobcomp/filetxt)
    done = {}
    for line in (slurm_run["state"] / "log" / "jobcomp.log").read_text().splitlines():
        rec = dict(re.findall(r"(\w+)=(\S*)", line))
        if rec.get("WorkDir") == str(wd):
            done[rec["JobId"]] = rec
    assert set(done) == set(jobs.values())
    assert {rec["JobState"] for rec in done.values()} == {"COMPLETED"}
    assert {rec["NodeList"] for rec in done.values()} == {"localhost"}
    print(f"snakemake --profile slurm: {slurm_run['seconds']:.0f} s")  # shown with -s


def test_torch_training_asks_for_the_gpu_and_the_control_does_not(slurm_run):
    jobs = slurm_run["jobs"]
    linear = _show_job(jobs["rule_train/pbmc68k_linear_class_weight_r0"])
    majority = _show_job(jobs["rule_train/pbmc68k_majority_none_r0"])
    # gpu=1 from workflow_config.method_resources became --gpus=1; the job could run only on
    # the node's one GPU (gres on /dev/null). gpu=0 adds no GPU request.
    assert linear.get("TresPerJob") == "gres:gpu:1", linear
    assert "gpu" not in majority.get("TresPerJob", ""), majority
    assert linear["JobState"] == majority["JobState"] == "COMPLETED"
    # the method's resources from the workflow config, and the profile's defaults
    assert linear["TimeLimit"] == "00:10:00" and "mem=1500M" in linear["TRES"]
    assert majority["TimeLimit"] == "01:00:00" and "mem=4000M" in majority["TRES"]
    # the method's own partition; the control's job names none and gets the cluster's default
    assert linear["Partition"] == "gpu", linear
    assert majority["Partition"] == "local", majority
