#!/usr/bin/env python
"""scTab: this project's TabNet (``sctab``) vs pytorch-tabnet 4.1.0's ``TabNetClassifier``.

Reproduce (from the repository root; about 30 minutes on 2 idle cores):

    .venv/bin/pip install --no-deps -r benchmarks/requirements.txt
    .venv/bin/python benchmarks/sctab_vs_pytorch_tabnet.py --n-cells 60000 --epochs 20 --repeats 5

Writes ``benchmarks/out/sctab_vs_pytorch_tabnet.json`` (all numbers) and
``benchmarks/results/sctab_vs_pytorch_tabnet.md`` (the table), and prints the table.

What is compared (same data, same split, same epochs, CPU, same number of torch threads):

- data: ``generate_census_like(n_cells, seed=0)`` + ``preprocess`` (X = log1p(CP10k), 765
  genes, 26 imbalanced cell types); stratified split by ``assign_folds(labels, 10, seed=0)``:
  fold 0 test, fold 1 validation, folds 2-9 training;
- the model of scTab's table in both: TabNet with one decision step, 1.5-entmax masks, n_d 128,
  n_a 64, n_shared 3, n_independent 5, virtual batch 256, batch-norm momentum 0.02,
  lambda_sparse 1e-5; class-weighted cross-entropy (``n / (k * n_c)``), AdamW (lr 0.005,
  weight decay 0.05), StepLR gamma 0.9 per epoch, gradient norm clipped at 1.0, batch 2048,
  every cell every epoch (no dropped last batch), the epoch with the best validation macro F1
  restored at the end (no early stopping: every fit runs all epochs); no augmentation in either
  (pytorch-tabnet has no scTab augmentation; the vectors come from another workflow step);
- ``ours``: ``create("sctab", epochs=E, augment=False, patience=None, device="cpu")``,
  ``fit(train, valid)`` on the sparse AnnData, ``predict(test)``;
- ``pytorch-tabnet``: ``TabNetClassifier(n_steps=1, mask_type="entmax", ...)`` with
  ``optimizer_fn=AdamW``, ``scheduler_fn=StepLR``, ``clip_value=1.0``,
  ``loss_fn=CrossEntropyLoss(weight=class weights)``, ``eval_metric=[macro F1]``,
  ``patience=epochs + 1`` (no early stopping; the best weights restored), ``drop_last=False``,
  ``compute_importance=False``, dense float32 numpy input (its fast path: a CSR input is
  densified row by row by its dataset class).

Time per epoch = training + the validation pass (both arms do both every epoch): ours from
the fit history, pytorch-tabnet from a callback (epoch begin -> epoch end). The first epoch of
every fit is left out (warm-up). Both arms run in the same process, alternating (ours first in
even repeats, pytorch-tabnet first in odd ones), seeds 0..repeats-1; the per-epoch time of a
fit is the median over its epochs, reported as the median over repeats; macro F1 (test) is the
mean over repeats. The machine may be shared: the share of the CPUs other processes took
during each fit is measured (``/proc/stat``), and a fit above ``--max-other`` is rerun (up to
``--retries`` times, the least disturbed attempt kept).

Before the timed fits, :func:`equivalence_check` copies our network's weights into
pytorch-tabnet's (scTab's sizes, float64) and reports how far logits, mask entropy, gradients
and running statistics differ (about 1e-12: the same function). Training is chaotic: from the
same weights and batches (float32), pytorch-tabnet with its weights perturbed by 1e-7 differs
from itself in the batch loss by 1e-3 after 5 steps, and the two implementations (rounded in
another order) by 1e-4 after one step and 0.07 after 5; two runs that differ only in rounding
end as different models, so the F1 comparison is statistical, over seeds. ``--from-json``
re-renders the table from a saved result.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "out"
RESULTS_DIR = HERE / "results"
NAME = "sctab_vs_pytorch_tabnet"
TARGET_SPEEDUP = 1.5
LABELS = {
    "ours": "ours (celltype_bench sctab)",
    "pytorch_tabnet": "pytorch-tabnet 4.1.0 TabNetClassifier",
}
PAPER = {
    "n_d": 128,
    "n_a": 64,
    "n_shared": 3,
    "n_independent": 5,
    "virtual_batch_size": 256,
    "momentum": 0.02,
    "lambda_sparse": 1e-5,
    "lr": 0.005,
    "weight_decay": 0.05,
    "gamma": 0.9,
    "grad_clip": 1.0,
    "batch_size": 2048,
}


def _busy_s() -> float:
    """CPU seconds all processes have spent busy (``/proc/stat``), or NaN off Linux."""
    try:
        with open("/proc/stat") as fh:
            v = [int(t) for t in fh.readline().split()[1:]]
    except OSError:
        return float("nan")
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


class Meter:
    """Wall time, this process's CPU time and the CPU share other processes took meanwhile."""

    def __enter__(self) -> Meter:
        self.wall0, self.cpu0, self.busy0 = time.perf_counter(), time.process_time(), _busy_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0
        other = _busy_s() - self.busy0 - self.cpu
        self.other_share = max(0.0, other / (self.wall * (os.cpu_count() or 1)))


def git_commit() -> str | None:
    """The repository's HEAD commit (with ``+`` when the work tree has changes), or None."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ":/src"],
            cwd=HERE,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (head + ("+" if dirty else "")) or None


def make_data(n_cells: int, data_seed: int, extra_test_cells: int = 0) -> dict[str, Any]:
    """census-like data, preprocessed, split 80/10/10 (stratified).

    ``extra_test_cells``: that many more cells are generated and added to the test set only (a
    stratified random draw from all generated cells), so the test macro F1 has less sampling
    noise while training and validation keep ``n_cells``' sizes.
    """
    import anndata as ad

    from celltype_bench.data.preprocess import preprocess
    from celltype_bench.data.sources import generate_census_like
    from celltype_bench.data.splits import assign_folds

    total = n_cells + extra_test_cells
    adata = preprocess(generate_census_like(n_cells=total, seed=data_seed))
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    extra = np.zeros(adata.n_obs, dtype=bool)
    if extra_test_cells:
        from sklearn.model_selection import train_test_split

        try:
            _, pick = train_test_split(
                np.arange(adata.n_obs),
                test_size=extra_test_cells,
                stratify=labels,
                random_state=data_seed,
            )
        except ValueError as err:  # e.g. fewer extra cells than cell types
            raise SystemExit(
                f"--extra-test-cells {extra_test_cells}: {err} (use 0, or at least one cell "
                "per cell type)"
            ) from err
        extra[pick] = True
    rest = adata[~extra].copy()
    folds = assign_folds(labels[~extra], 10, seed=0)
    parts = {
        "train": rest[folds >= 2].copy(),
        "valid": rest[folds == 1].copy(),
        "test": ad.concat([rest[folds == 0], adata[extra]])
        if extra_test_cells
        else rest[folds == 0].copy(),
    }
    counts = adata.obs["cell_type"].value_counts()
    info = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "density": float(adata.X.nnz / (adata.n_obs * adata.n_vars)),
        "n_classes": int(len(counts)),
        "largest_class": int(counts.max()),
        "smallest_class": int(counts.min()),
        **{f"n_{k}": int(v.n_obs) for k, v in parts.items()},
    }
    if extra_test_cells:
        info["n_extra_test"] = int(extra_test_cells)
    return {"parts": parts, "info": info}


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the classes present in ``y_true``."""
    from sklearn.metrics import f1_score

    return float(
        f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)
    )


class _EpochCPU(logging.Handler):
    """Records this process's CPU time at every "epoch i/n" line of the training log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks = [time.process_time()]

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("epoch "):
            self.marks.append(time.process_time())


def run_ours(parts: dict[str, Any], epochs: int, seed: int) -> dict[str, Any]:
    """Fit + predict with this project's ``sctab``."""
    from celltype_bench.methods import create
    from celltype_bench.training import get_logger

    p = dict(PAPER)
    est = create(
        "sctab",
        **p,
        epochs=epochs,
        patience=None,
        augment=False,
        seed=seed,
        device="cpu",
    )
    log = get_logger()
    handler, level = _EpochCPU(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with Meter() as fit:
            est.fit(parts["train"], parts["valid"])
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    t0 = time.perf_counter()
    pred = est.predict(parts["test"])
    predict_s = time.perf_counter() - t0
    y = parts["test"].obs["cell_type"].astype(str).to_numpy()
    return {
        "epoch_s": [h["seconds"] for h in est.history_],
        "epoch_cpu_s": list(np.diff(handler.marks)),
        "fit_s": fit.wall,
        "fit_cpu_s": fit.cpu,
        "other_share": fit.other_share,
        "predict_s": predict_s,
        "macro_f1": macro_f1(y, np.asarray(pred, dtype=str)),
        "accuracy": float(np.mean(y == np.asarray(pred, dtype=str))),
        "val_f1": [h["val_macro_f1"] for h in est.history_],
    }


def run_pytorch_tabnet(parts: dict[str, Any], epochs: int, seed: int) -> dict[str, Any]:
    """Fit + predict with pytorch-tabnet's TabNetClassifier, scTab's settings."""
    import torch
    from pytorch_tabnet.callbacks import Callback
    from pytorch_tabnet.metrics import Metric
    from pytorch_tabnet.tab_model import TabNetClassifier

    from celltype_bench.balancing import class_weights

    # our arm's seeding turns on torch's deterministic mode process-wide (and NaN-filling of
    # fresh tensors); pytorch-tabnet runs with torch's defaults, as in its own process
    torch.use_deterministic_algorithms(False)
    classes = sorted(set(parts["train"].obs["cell_type"].astype(str)))
    code = {c: i for i, c in enumerate(classes)}

    def xy(a):
        x = np.asarray(a.X.toarray(), dtype=np.float32)
        labels = a.obs["cell_type"].astype(str).to_numpy()
        return x, np.array([code.get(c, -1) for c in labels], dtype=np.int64), labels

    x_tr, y_tr, _ = xy(parts["train"])
    x_va, y_va, _ = xy(parts["valid"])
    keep = y_va >= 0
    x_va, y_va = x_va[keep], y_va[keep]
    x_te, _, labels_te = xy(parts["test"])

    class MacroF1(Metric):
        def __init__(self) -> None:
            self._name = "macro_f1"
            self._maximize = True

        def __call__(self, y_true, y_score):
            return macro_f1(np.asarray(y_true), np.asarray(y_score).argmax(axis=1))

    class EpochTimer(Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epoch_s: list[float] = []
            self.epoch_cpu_s: list[float] = []
            self._t0 = self._c0 = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._t0, self._c0 = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_s.append(time.perf_counter() - self._t0)
            self.epoch_cpu_s.append(time.process_time() - self._c0)

    p = PAPER
    weight = torch.as_tensor(class_weights(y_tr, len(classes)), dtype=torch.float32)
    clf = TabNetClassifier(
        n_d=p["n_d"],
        n_a=p["n_a"],
        n_steps=1,
        n_shared=p["n_shared"],
        n_independent=p["n_independent"],
        momentum=p["momentum"],
        lambda_sparse=p["lambda_sparse"],
        mask_type="entmax",
        optimizer_fn=torch.optim.AdamW,
        optimizer_params={"lr": p["lr"], "weight_decay": p["weight_decay"]},
        scheduler_fn=torch.optim.lr_scheduler.StepLR,
        scheduler_params={"step_size": 1, "gamma": p["gamma"]},
        clip_value=p["grad_clip"],
        seed=seed,
        verbose=0,
        device_name="cpu",
    )
    timer = EpochTimer()
    meter = Meter()
    meter.__enter__()
    clf.fit(
        x_tr,
        y_tr,
        eval_set=[(x_va, y_va)],
        eval_name=["valid"],
        eval_metric=[MacroF1],
        loss_fn=torch.nn.CrossEntropyLoss(weight=weight),
        max_epochs=epochs,
        patience=epochs + 1,
        batch_size=p["batch_size"],
        virtual_batch_size=p["virtual_batch_size"],
        num_workers=0,
        drop_last=False,
        callbacks=[timer],
        compute_importance=False,
    )
    meter.__exit__()
    t0 = time.perf_counter()
    pred_codes = clf.predict(x_te)
    predict_s = time.perf_counter() - t0
    pred = np.asarray(classes, dtype=object)[np.asarray(pred_codes, dtype=np.int64)]
    return {
        "epoch_s": timer.epoch_s,
        "epoch_cpu_s": timer.epoch_cpu_s,
        "fit_s": meter.wall,
        "fit_cpu_s": meter.cpu,
        "other_share": meter.other_share,
        "predict_s": predict_s,
        "macro_f1": macro_f1(labels_te, np.asarray(pred, dtype=str)),
        "accuracy": float(np.mean(labels_te == np.asarray(pred, dtype=str))),
        "val_f1": [float(v) for v in clf.history["valid_macro_f1"]],
    }


RUNNERS = {"ours": run_ours, "pytorch_tabnet": run_pytorch_tabnet}


def _ref_key(key: str) -> str:
    from celltype_bench.methods.tabnet import pytorch_tabnet_key

    return pytorch_tabnet_key(key)


def equivalence_check(parts: dict[str, Any], seed: int = 0) -> dict[str, float]:
    """Same weights in both networks (scTab's sizes), float64: largest relative differences.

    Our TabNet is built, its weights copied into pytorch-tabnet's network, both in float64.
    Two training batches of real cells (2,048 = 8 equal virtual batches, then 1,472 = 5 of 246
    + 1 of 242, as ``torch.chunk`` splits an epoch's tail), then evaluation mode on the
    validation cells;
    once with the masks of a fresh network (dense: the masked input enters as a dense
    product) and once with the attention batch-norm gain raised to 6 (sparse masks: our
    sparse masked-input path). Reported: logits (training and evaluation mode), mask entropy,
    every parameter's gradient and every running statistic, each as max |ours - theirs| /
    max |theirs|. pytorch-tabnet's residual scale sqrt(0.5) is a float32 constant (alone a
    difference of about 1e-7 in the logits and 1e-5 in some gradients, float64); the check
    gives ours the same constant, so what remains is float64 rounding.
    """
    import torch

    from celltype_bench.methods import tabnet

    n = 3520
    labels = parts["train"].obs["cell_type"].astype(str).to_numpy()
    code = {c: i for i, c in enumerate(sorted(set(labels)))}
    data = {
        "x": torch.from_numpy(parts["train"].X[:n].toarray().astype(np.float64)),
        "y": torch.as_tensor([code[c] for c in labels[:n]]),
        "x_val": torch.from_numpy(parts["valid"].X.toarray().astype(np.float64)),
        "n_classes": len(code),
    }
    worst: dict[str, float] = {}
    was, sqrt_half = torch.are_deterministic_algorithms_enabled(), tabnet.SQRT_HALF
    tabnet.SQRT_HALF = float(torch.sqrt(torch.tensor([0.5])))  # pytorch-tabnet's float32 value
    try:
        for gain in (None, 6.0):
            for key, value in _equivalence_pass(data, gain, seed).items():
                worst[key] = max(worst.get(key, 0.0), value)
    finally:
        tabnet.SQRT_HALF = sqrt_half
        torch.use_deterministic_algorithms(was)
    return worst


def network_kwargs() -> dict[str, Any]:
    """scTab's network settings, as keyword arguments of both networks' constructors
    (ours and pytorch-tabnet's ``tab_network.TabNet``)."""
    p = PAPER
    return {
        "n_d": p["n_d"],
        "n_a": p["n_a"],
        "n_shared": p["n_shared"],
        "n_independent": p["n_independent"],
        "n_steps": 1,
        "virtual_batch_size": p["virtual_batch_size"],
        "momentum": p["momentum"],
    }


def _equivalence_pass(data: dict[str, Any], gain: float | None, seed: int) -> dict[str, float]:
    """One network pair of :func:`equivalence_check` (``gain``: attention BN weight)."""
    import torch
    import torch.nn.functional as F
    from pytorch_tabnet import tab_network

    from celltype_bench.methods.tabnet import TabNet

    x, y, x_val = data["x"], data["y"], data["x_val"]
    g, k = x.shape[1], data["n_classes"]
    torch.manual_seed(seed)
    ours = TabNet(g, k, **network_kwargs())
    ref = tab_network.TabNet(
        g, k, **network_kwargs(), mask_type="entmax", group_attention_matrix=torch.eye(g)
    )
    if gain is not None:
        with torch.no_grad():
            ours.att_transformers[0].bn.weight.fill_(gain)
    mine = ours.state_dict()
    state = {_ref_key(key): v for key, v in mine.items() if "k_hint" not in key}
    for key, v in ref.state_dict().items():
        if ".shared.shared_layers." in key:  # pytorch-tabnet lists the shared Linears twice
            i = key.split(".shared.shared_layers.")[1].split(".")[0]
            state[key] = mine[f"initial_splitter.shared.layers.{i}.fc.weight"]
        elif key not in state:
            state[key] = v
    ref.load_state_dict(state)
    ours.double()
    ref.double()
    ref.tabnet.encoder.group_attention_matrix = torch.eye(g, dtype=torch.float64)
    theirs = dict(ref.named_parameters(remove_duplicate=False))
    out: dict[str, float] = {}

    def note(key: str, a: Any, b: Any) -> None:
        a, b = a.detach(), b.detach()
        value = float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))
        out[key] = max(out.get(key, 0.0), value)

    for lo, hi in ((0, 2048), (2048, 3520)):  # 8 equal virtual batches; 6 unequal (1,472)
        ours.train()
        ref.train()
        ours.zero_grad()
        ref.zero_grad()
        a = ours(x[lo:hi])
        b, m_loss = ref(x[lo:hi])
        note("logits, training", a, b)
        note("mask entropy", ours.last_sparsity_loss, -m_loss)
        (F.cross_entropy(a, y[lo:hi]) + ours.last_sparsity_loss).backward()
        (F.cross_entropy(b, y[lo:hi]) - m_loss).backward()
        for name, param in ours.named_parameters():
            note("gradients", param.grad, theirs[_ref_key(name)].grad)
    ref_buffers = ref.state_dict()
    skipped = ours.skipped_channels()  # channels ours does not compute (unused outputs)
    for key, v in ours.state_dict().items():
        if "running" in key:
            theirs_v = ref_buffers[_ref_key(key)]
            channels = skipped.get(key.rsplit(".", 1)[0])
            if channels is not None:
                kept = torch.ones(len(v), dtype=torch.bool)
                kept[channels] = False
                v, theirs_v = v[kept], theirs_v[kept]
            note("running statistics", v, theirs_v)
    ours.eval()
    ref.eval()
    with torch.no_grad():
        note("logits, evaluation", ours(x_val), ref(x_val)[0])
    return out


def per_epoch(run: dict[str, Any], key: str = "epoch_s") -> float:
    """Median seconds (wall, or CPU with ``epoch_cpu_s``) per epoch of one fit, the first
    (warm-up) epoch left out."""
    times = run[key][1:] or run[key]
    return float(statistics.median(times))


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def welch_ci95(a: list[float], b: list[float]) -> list[float]:
    """95% confidence interval of ``mean(a) - mean(b)`` (Welch's t, unequal variances)."""
    from scipy import stats

    va, vb = _sd(a) ** 2 / len(a), _sd(b) ** 2 / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:
        return [diff, diff]
    df = (va + vb) ** 2 / (va**2 / max(len(a) - 1, 1) + vb**2 / max(len(b) - 1, 1))
    half = float(stats.t.ppf(0.975, df)) * math.sqrt(va + vb)
    return [diff - half, diff + half]


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians / means over repeats per arm, and the ratios."""
    out: dict[str, Any] = {}
    for arm, rs in runs.items():
        f1 = [r["macro_f1"] for r in rs]
        walls = [per_epoch(r) for r in rs]
        out[arm] = {
            "epoch_s": statistics.median(walls),
            "epoch_s_min": min(walls),
            "epoch_s_max": max(walls),
            "epoch_cpu_s": statistics.median(per_epoch(r, "epoch_cpu_s") for r in rs),
            "fit_s": statistics.median(r["fit_s"] for r in rs),
            "predict_s": statistics.median(r["predict_s"] for r in rs),
            "macro_f1": statistics.fmean(f1),
            "macro_f1_sd": _sd(f1),
            "accuracy": statistics.fmean(r["accuracy"] for r in rs),
            "val_f1_best": statistics.fmean(max(r["val_f1"]) for r in rs),
            "val_f1_best_sd": _sd([max(r["val_f1"]) for r in rs]),
            "val_f1_last": statistics.fmean(r["val_f1"][-1] for r in rs),
            "val_f1_last_sd": _sd([r["val_f1"][-1] for r in rs]),
            "other_share": statistics.median(r["other_share"] for r in rs),
        }
    ours, ref = out["ours"], out["pytorch_tabnet"]
    pairs = list(zip(runs["ours"], runs["pytorch_tabnet"], strict=True))
    out["ratios"] = {
        "epoch_speedup": ref["epoch_s"] / ours["epoch_s"],
        "epoch_speedup_per_repeat": [per_epoch(b) / per_epoch(a) for a, b in pairs],
        "epoch_cpu_speedup": ref["epoch_cpu_s"] / ours["epoch_cpu_s"],
        "fit_speedup": ref["fit_s"] / ours["fit_s"],
        "predict_speedup": ref["predict_s"] / ours["predict_s"],
        "macro_f1_diff": ours["macro_f1"] - ref["macro_f1"],
    }
    n = min(len(runs["ours"]), len(runs["pytorch_tabnet"]))

    def se(key: str) -> float:  # standard error of the difference of the arms' means
        return math.sqrt((ours[key + "_sd"] ** 2 + ref[key + "_sd"] ** 2) / max(n, 1))

    out["ratios"]["macro_f1_diff_se"] = se("macro_f1")
    out["ratios"]["macro_f1_diff_ci95"] = welch_ci95(
        [r["macro_f1"] for r in runs["ours"]], [r["macro_f1"] for r in runs["pytorch_tabnet"]]
    )
    out["ratios"]["val_f1_last_diff"] = ours["val_f1_last"] - ref["val_f1_last"]
    out["ratios"]["val_f1_last_diff_se"] = se("val_f1_last")
    lower = sum(a["macro_f1"] < b["macro_f1"] for a, b in pairs)
    out["ratios"]["seeds_lower"] = lower
    # two-sided sign test over the paired seeds (ties count against neither side)
    n_pairs = sum(a["macro_f1"] != b["macro_f1"] for a, b in pairs)
    k = min(lower, n_pairs - lower)
    p_sign = min(1.0, 2 * sum(math.comb(n_pairs, i) for i in range(k + 1)) / 2**n_pairs)
    out["ratios"]["sign_test_p"] = p_sign if n_pairs else 1.0
    # "not lower": the seeds do not show ours lower, i.e. the 95% interval of the difference
    # reaches 0 (the sign of the mean alone flips with the seed noise: sd 0.03-0.04 per fit)
    out["f1_not_lower"] = bool(out["ratios"]["macro_f1_diff_ci95"][1] >= 0)
    out["target_met"] = bool(
        out["ratios"]["epoch_speedup"] >= TARGET_SPEEDUP and out["f1_not_lower"]
    )
    return out


def markdown(result: dict[str, Any]) -> str:
    """The results table."""
    info, s, args = result["data"], result["summary"], result["args"]
    r = s["ratios"]
    lines = [
        "# scTab: celltype_bench `sctab` vs pytorch-tabnet 4.1.0",
        "",
        f"Data: census_like, {info['n_cells']:,} cells x {info['n_genes']} genes (X density "
        f"{info['density']:.2f}), {info['n_classes']} cell types ({info['largest_class']:,} to "
        f"{info['smallest_class']} cells); stratified split {info['n_train']:,} train / "
        f"{info['n_valid']:,} validation / {info['n_test']:,} test"
        + (
            f" (of which {info['n_extra_test']:,} extra cells, a stratified draw, only for testing)"
            if info.get("n_extra_test")
            else ""
        )
        + ". scTab's model and training "
        "settings in both (one decision step, 1.5-entmax, n_d 128, n_a 64, 3 shared + 5 "
        "independent GLU layers, virtual batch 256, lambda_sparse 1e-5, class-weighted CE, "
        "AdamW lr 0.005 wd 0.05, StepLR 0.9, clip 1.0, batch 2048), no augmentation, "
        f"{args['epochs']} epochs, best validation macro F1 restored; CPU, "
        f"{args['threads']} torch threads; {args['repeats']} repeats (seeds "
        f"{seed_ranges(args)}), the "
        "two arms alternating "
        + (
            f"within each of {args['processes']} processes (one per seed range, merged)."
            if args.get("processes", 1) > 1
            else "in one process."
        ),
        "",
        "| implementation | s / epoch, wall (median; min-max over repeats) | CPU s / epoch "
        "| fit s | predict s | test macro F1 (mean +- sd) | accuracy "
        "| best validation macro F1 (mean +- sd) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ("ours", "pytorch_tabnet"):
        a = s[arm]
        lines.append(
            f"| {LABELS[arm]} | {a['epoch_s']:.2f} ({a['epoch_s_min']:.2f}-{a['epoch_s_max']:.2f})"
            f" | {a['epoch_cpu_s']:.2f} | {a['fit_s']:.1f} | {a['predict_s']:.3f} | "
            f"{a['macro_f1']:.4f} +- {a['macro_f1_sd']:.4f} | {a['accuracy']:.4f} | "
            f"{a['val_f1_best']:.4f} +- {a['val_f1_best_sd']:.4f} |"
        )
    per_rep = ", ".join(f"{x:.2f}x" for x in r["epoch_speedup_per_repeat"])
    lines += [
        "",
        "| ratio (pytorch-tabnet / ours; F1: ours - pytorch-tabnet) | value |",
        "|---|---:|",
        f"| per-epoch speed-up, wall (medians) | {r['epoch_speedup']:.2f}x |",
        f"| per-epoch speed-up, wall, per repeat | {per_rep} |",
        f"| per-epoch speed-up, CPU time (medians) | {r['epoch_cpu_speedup']:.2f}x |",
        f"| fit speed-up (whole fit, wall) | {r['fit_speedup']:.2f}x |",
        f"| predict speed-up | {r['predict_speedup']:.2f}x |",
        f"| macro F1 difference (+- standard error) | {r['macro_f1_diff']:+.4f} +- "
        f"{r['macro_f1_diff_se']:.4f} |",
        "| macro F1 difference, 95% confidence interval (Welch) | "
        + (
            "{:+.4f} to {:+.4f}".format(*r["macro_f1_diff_ci95"])
            if "macro_f1_diff_ci95" in r
            else "-"
        )
        + " |",
        "| last-epoch validation macro F1 difference (+- standard error; the other held-out "
        f"set; the last epoch's model, so no selection on it) | {r['val_f1_last_diff']:+.4f} +- "
        f"{r['val_f1_last_diff_se']:.4f} |",
        "",
        *_learning_curve_lines(result["runs"]),
        "Per repeat (wall s / epoch, test macro F1, share of the machine's CPU other processes "
        "used during the fit):",
        "",
        "| seed | ours | pytorch-tabnet |",
        "|---:|---:|---:|",
    ]
    pairs = zip(result["runs"]["ours"], result["runs"]["pytorch_tabnet"], strict=True)
    for i, (a, b) in enumerate(pairs):
        lines.append(
            f"| {a.get('seed', i)} | {per_epoch(a):.2f} s, {a['macro_f1']:.4f}, others "
            f"{a['other_share']:.0%} | {per_epoch(b):.2f} s, {b['macro_f1']:.4f}, others "
            f"{b['other_share']:.0%} |"
        )
    verdict = "met" if s["target_met"] else "NOT met"
    lines += [
        "",
        f"Target (at least {TARGET_SPEEDUP}x faster per epoch on CPU, and a macro F1 not "
        "lower: the 95% interval of the difference reaches 0): "
        f"**{verdict}** (speed-up {r['epoch_speedup']:.2f}x; F1 "
        f"{'not lower' if s['f1_not_lower'] else 'lower'}: difference "
        f"{r['macro_f1_diff']:+.4f}, interval {r['macro_f1_diff_ci95'][0]:+.4f} to "
        f"{r['macro_f1_diff_ci95'][1]:+.4f}; ours lower in "
        f"{r.get('seeds_lower', '?')} of {len(result['runs']['ours'])} seeds, two-sided sign "
        f"test p = {r.get('sign_test_p', float('nan')):.3f}). With "
        f"{len(result['runs']['ours'])} repeats the standard error of the "
        f"difference is {r['macro_f1_diff_se']:.4f}, so differences smaller than about "
        f"{2 * r['macro_f1_diff_se']:.3f} are not resolved (the smallest classes have about "
        f"{max(1, round(info['smallest_class'] * info['n_test'] / info['n_cells']))} test "
        "cells; each run's score also depends on its chaotic training trajectory).",
        "",
        *_equivalence_lines(result.get("equivalence")),
        "Notes: an epoch's seconds include the validation pass (both arms predict the "
        f"{info['n_valid']:,} validation cells every epoch); the first epoch of every fit is "
        "left out. pytorch-tabnet gets dense float32 numpy input (its fast path), ours the "
        "CSR AnnData. pytorch-tabnet runs with torch's default (non-deterministic) mode, ours "
        "with the project's deterministic mode. The machine is shared: a fit during which other "
        f"processes took more than {args['max_other']:.0%} of the CPUs was rerun (up to "
        f"{args['retries']} times, keeping the least disturbed attempt); the per-repeat table "
        "shows what remained. CPU seconds count this process only (with 2 threads, spinning "
        "while waiting for a descheduled thread counts too).",
        "",
        f"Machine: {result['machine']}.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def _learning_curve_lines(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Mean validation macro F1 at every fifth epoch per arm, and how many seeds ours trailed."""
    n_epochs = min(len(r["val_f1"]) for rs in runs.values() for r in rs)
    epochs = sorted({*range(5, n_epochs + 1, 5), n_epochs} - {0})
    if not epochs:
        return []
    pairs = list(zip(runs["ours"], runs["pytorch_tabnet"], strict=True))
    lines = [
        "Validation macro F1 during training (mean over the seeds; the seeds in which ours was "
        "lower than pytorch-tabnet's fit with the same seed number):",
        "",
        "| epoch | " + " | ".join(str(e) for e in epochs) + " |",
        "|---|" + "---:|" * len(epochs),
    ]
    for arm in ("ours", "pytorch_tabnet"):
        means = [statistics.fmean(r["val_f1"][e - 1] for r in runs[arm]) for e in epochs]
        lines.append(f"| {LABELS[arm]} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    lower = [sum(a["val_f1"][e - 1] < b["val_f1"][e - 1] for a, b in pairs) for e in epochs]
    lines.append("| ours lower in | " + " | ".join(f"{k} of {len(pairs)}" for k in lower) + " |")
    return [*lines, ""]


def _equivalence_lines(same: dict[str, float] | None) -> list[str]:
    """The markdown paragraph of :func:`equivalence_check`'s result."""
    if not same:
        return []
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in same.items())
    return [
        "Same function: with identical weights (scTab's sizes, these genes and classes, "
        "float64), one batch of 8 equal and one of 6 unequal virtual batches, fresh (dense "
        "masks) and with sparse masks, the two networks agree to a max relative difference of: "
        f"{diffs} (see `equivalence_check`). Differences between the arms' scores therefore "
        "come from the training trajectory (initial weights, batch order, floating-point "
        "rounding), not from the model.",
        "",
    ]


def run_arm(arm: str, parts: dict[str, Any], args: argparse.Namespace, seed: int) -> dict:
    """One fit of ``arm``, rerun while other processes took too much of the machine."""
    best: dict[str, Any] | None = None
    for attempt in range(args.retries + 1):
        r = RUNNERS[arm](parts, args.epochs, seed)
        r["attempt"] = attempt
        if best is None or r["other_share"] < best["other_share"]:
            best = r
        print(
            f"  {arm} seed {seed} attempt {attempt}: {per_epoch(r):.2f} s/epoch, "
            f"fit {r['fit_s']:.1f} s, macro F1 {r['macro_f1']:.4f}, "
            f"others {r['other_share']:.0%}",
            flush=True,
        )
        if r["other_share"] <= args.max_other:
            break
    assert best is not None
    return best


def results_md_name(result: dict[str, Any]) -> str:
    """The results file of a run: runs with extra test cells are another data set."""
    extra = result["data"].get("n_extra_test")
    return f"{NAME}_extratest.md" if extra else f"{NAME}.md"


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several saved ones of the same data and settings (other seeds).

    Runs are ordered by seed (results saved before runs recorded their seed count from
    ``first_seed``, default 0); a seed present twice is an error, as are different data or
    epochs. The summary and the command are recomputed.
    """
    merged = dict(results[0])
    runs: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in merged["runs"]}
    for res in results:
        if res["data"] != merged["data"]:
            raise SystemExit("--from-json: the results are on different data")
        if res["args"]["epochs"] != merged["args"]["epochs"]:
            raise SystemExit("--from-json: the results ran different numbers of epochs")
        first = int(res["args"].get("first_seed", 0))
        for arm, rs in res["runs"].items():
            for i, run in enumerate(rs):
                seed = int(run.get("seed", first + i))
                if seed in runs[arm]:
                    raise SystemExit(f"--from-json: seed {seed} of {arm} appears twice")
                runs[arm][seed] = {**run, "seed": seed}
    merged["runs"] = {arm: [by_seed[s] for s in sorted(by_seed)] for arm, by_seed in runs.items()}
    seeds = sorted(runs["ours"])
    merged["args"] = {
        **merged["args"],
        "repeats": len(seeds),
        "first_seed": seeds[0],
        "seeds": seeds,
        "processes": sum(r["args"].get("processes", 1) for r in results),
    }
    merged["summary"] = summarise(merged["runs"])  # columns added since it was saved
    if len(results) > 1:
        merged["command"] = " + ".join(r["command"] for r in results) + " (merged with --from-json)"
    return merged


def seed_ranges(args: dict[str, Any]) -> str:
    """The run's seeds as ranges, e.g. ``0-39, 48-51`` (merged runs may leave gaps)."""
    first = int(args.get("first_seed", 0))
    seeds = sorted(args.get("seeds") or range(first, first + int(args["repeats"])))
    parts, start = [], seeds[0]
    for prev, cur in zip(seeds, seeds[1:] + [None], strict=True):
        if cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(parts)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--n-cells", type=int, default=60000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument(
        "--extra-test-cells",
        type=_non_negative_int,
        default=0,
        help="generate this many more cells and add them to the test set only (less noise in "
        "the test macro F1; training and validation keep --n-cells' sizes)",
    )
    ap.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds first-seed .. first-seed + repeats - 1 (split seeds over processes, then "
        "merge the saved results with --from-json A.json B.json ...)",
    )
    ap.add_argument("--max-other", type=float, default=0.25, help="rerun above this share")
    ap.add_argument("--retries", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument(
        "--from-json",
        metavar="PATH",
        nargs="+",
        help="only re-render the table from saved results (e.g. benchmarks/out/NAME.json); "
        "several files (the same settings, other seeds) are merged",
    )
    args = ap.parse_args(argv)
    if args.from_json:
        missing = [f for f in args.from_json if not Path(f).is_file()]
        if missing:
            raise SystemExit(
                f"--from-json: no such file: {', '.join(missing)} (saved results are written to "
                f"{OUT_DIR}/{NAME}*.json by a run without --no-write)"
            )
        result = merge_results([json.loads(Path(f).read_text()) for f in args.from_json])
        table = markdown(result)
        print(table)
        if not args.no_write:
            (RESULTS_DIR / results_md_name(result)).write_text(table)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    import torch._dynamo  # noqa: F401  (torch's one-time lazy import, paid before timing)

    data = make_data(args.n_cells, args.data_seed, args.extra_test_cells)
    print(json.dumps(data["info"]), flush=True)
    same = equivalence_check(data["parts"])
    print("same weights, float64, max relative difference:", json.dumps(same), flush=True)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in RUNNERS}
    for rep in range(args.repeats):
        seed = args.first_seed + rep
        order = list(RUNNERS) if seed % 2 == 0 else list(reversed(RUNNERS))
        for arm in order:
            run = run_arm(arm, data["parts"], args, seed)
            run["seed"] = seed
            runs[arm].append(run)
    cmd = [".venv/bin/python", "benchmarks/sctab_vs_pytorch_tabnet.py"]
    cmd += ["--n-cells", str(args.n_cells), "--epochs", str(args.epochs)]
    cmd += ["--repeats", str(args.repeats)]
    if args.extra_test_cells:
        cmd += ["--extra-test-cells", str(args.extra_test_cells)]
    if args.first_seed:
        cmd += ["--first-seed", str(args.first_seed)]
    if args.threads != 2:
        cmd += ["--threads", str(args.threads)]
    if args.max_other != 0.25 or args.retries != 1:
        cmd += ["--max-other", str(args.max_other), "--retries", str(args.retries)]
    result = {
        "args": vars(args),
        "data": data["info"],
        "runs": runs,
        "summary": summarise(runs),
        "equivalence": same,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, Python {platform.python_version()}",
        "command": " ".join(cmd),
        "commit": git_commit(),
    }
    table = markdown(result)
    print(table)
    if not args.no_write:
        OUT_DIR.mkdir(exist_ok=True)
        RESULTS_DIR.mkdir(exist_ok=True)
        suffix = f"_seeds{args.first_seed}-{args.first_seed + args.repeats - 1}"
        out_name = NAME if args.first_seed == 0 else NAME + suffix
        if args.extra_test_cells:  # another data set: its own files
            out_name = f"{NAME}_extratest{args.extra_test_cells}{suffix}"
        (OUT_DIR / f"{out_name}.json").write_text(json.dumps(result, indent=1))
        (RESULTS_DIR / results_md_name(result)).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
