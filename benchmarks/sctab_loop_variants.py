"""Where does the scTab F1 gap come from: our network or our training loop?

Each arm changes one thing against the two arms of ``sctab_vs_pytorch_tabnet.py`` (same data,
split, settings and seeds), and its test macro F1 is compared per seed with the saved runs of
that benchmark (``benchmarks/out/sctab_vs_pytorch_tabnet*.json``):

- ``ours_in_their_loop``: our ``TabNet`` trained by pytorch-tabnet's ``TabNetClassifier.fit``
  (its initial weights copied into ours, its batch order kept), so only the network differs
  from pytorch-tabnet's own arm;
- ``plain``: our arm with the for-loop AdamW (not the fused kernel) and torch's default
  (non-deterministic) mode, as pytorch-tabnet's loop runs;
- ``torchorder``: our arm with each epoch's batch order drawn by ``torch.randperm`` (as a
  DataLoader's RandomSampler) instead of numpy's ``Generator.permutation``;
- ``torchbn``: our arm with torch's ``BatchNorm1d`` on the input, as pytorch-tabnet's network,
  instead of the normalisation folded into the first Linear (the same function, rounded as
  pytorch-tabnet rounds it). Since 2026-11-30 this is how our network computes (the module
  docstring of ``celltype_bench.methods.tabnet``), so the arm is no longer run: its fits are
  the current code's (checked: seed 0 gives the identical test F1).

- ``current``: our arm as the checked-out code computes it, unpatched (records carry the
  commit): more seeds of the current network at a quarter of a benchmark pair's cost, its
  test macro F1 compared with pytorch-tabnet's saved runs and with the previous network's
  fits of the same seeds.

The fits of every arm before that change ran with the folded normalisation; records written
since carry the commit they ran at (``commit``), and :func:`version` names the network a
commit computes: ``torchbn`` (the commits in ``TORCHBN_COMMITS`` and the ``torchbn`` arm),
``inputnorm`` and ``sparse`` (``OTHER_COMMITS``: cheaper backwards, measured and not kept)
and ``current`` (any later commit; since e969b52 it computes as ``torchbn`` again, and
since 2379e57 also skips unused outputs and puts exact attention ties in feature order:
bitwise ``torchbn``'s except where a tie among the selected features was ordered otherwise).
- ``exactw``: ``inputnorm``'s backward with the first Linear's weight gradient rounded as
  autograd rounds it (:func:`_patch_exactw`).

One json line per fit is appended to ``benchmarks/out/sctab_loop_variants.jsonl``; a rerun skips
the fits already there. ``--report`` prints the comparison table (markdown).

Usage: ``python benchmarks/sctab_loop_variants.py --arm torchorder --seeds 0-9`` (one arm per
process), then ``python benchmarks/sctab_loop_variants.py --report``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sctab_vs_pytorch_tabnet as bench  # noqa: E402
from sctab_same_loop import parse_seeds  # noqa: E402

OUT = HERE / "out" / "sctab_loop_variants.jsonl"
ARMS = ("ours_in_their_loop", "plain", "torchorder", "torchbn", "current", "exactw")
TORCHBN_COMMITS = frozenset({"d4b0de7", "357535e", "c729d0d", "e0eebef", "692f565"})
"""Commits whose network is torch's BatchNorm1d input with autograd's backward and the dense
masked backward (the ``torchbn`` arm)."""
OTHER_COMMITS = {"d73ffe0": "inputnorm", "0f7e6f6": "sparse"}
"""Commits of network versions not kept: ``inputnorm`` took the input batch norm's weight and
bias gradients from the first Linear's product (``InputNormLinear``) and had the masked
Linear's sparse backward; ``sparse`` had the sparse backward only. Later commits compute as
``torchbn`` again (called ``current`` until a version is named here)."""
VERSIONS = ("torchbn", "inputnorm", "sparse", "current")


def version(commit: str | None) -> str:
    """The network version of our arm at ``commit`` (``ours``: the folded form, no commit)."""
    if not commit:
        return "ours"
    if commit in TORCHBN_COMMITS:
        return "torchbn"
    return OTHER_COMMITS.get(commit, "current")


def _patch_their_loop() -> None:
    """Make ``TabNetClassifier`` train our network (its initial weights, its batch order)."""
    import torch
    from pytorch_tabnet import tab_model

    from celltype_bench.methods.tabnet import TabNet, pytorch_tabnet_key

    class Wrapped(torch.nn.Module):
        def __init__(self, ours: TabNet, ref: torch.nn.Module) -> None:
            super().__init__()
            self.ours = ours
            for name in ("input_dim", "cat_emb_dim", "cat_idxs", "post_embed_dim"):
                setattr(self, name, getattr(ref, name))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.ours(x), -self.ours.last_sparsity_loss  # (logits, M_loss)

    original = tab_model.TabNetClassifier._set_network

    def set_network(self: Any) -> None:
        original(self)
        ref = self.network
        rng = torch.get_rng_state()  # building ours draws too: keep pytorch-tabnet's batch order
        ours = TabNet(self.input_dim, self.output_dim, **bench.network_kwargs())
        torch.set_rng_state(rng)
        theirs = ref.state_dict()
        ours.load_state_dict(
            {
                k: v if "k_hint" in k else theirs[pytorch_tabnet_key(k)]
                for k, v in ours.state_dict().items()
            }
        )
        self.network = Wrapped(ours, ref)

    tab_model.TabNetClassifier._set_network = set_network


def _patch_exactw() -> None:
    """Arm ``exactw``: the ``inputnorm`` backward of the input batch norm (one product of the
    first Linear's size, not two) but with that Linear's weight gradient ``dY.T @ xn`` rounded
    exactly as autograd rounds it; the batch norm's gradients are derived from it
    (``G = (dW - outer(sum dY, b)) / w``, exact products for features with ``|w| < 1e-3``). If
    this arm scores as ``torchbn``, the weight gradient's rounding was what cost ``inputnorm``
    its F1; if as ``inputnorm``, the batch norm's."""
    import torch
    import torch.nn.functional as F

    from celltype_bench.methods import tabnet

    class ExactW(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx: Any, x: Any, w: Any, b: Any, weight: Any, rm: Any, rv: Any, mom: float, eps: float
        ) -> Any:
            xn, mean, invstd = torch.native_batch_norm(x, w, b, rm, rv, True, mom, eps)
            ctx.save_for_backward(x, mean, invstd, xn, w, b, weight)
            return xn, F.linear(xn, weight)

        @staticmethod
        def backward(ctx: Any, g_xn: Any, g_y: Any) -> Any:
            x, mean, invstd, xn, w, b, weight = ctx.saved_tensors
            g_weight = g_y.t().mm(xn)  # as autograd's MmBackward for F.linear
            s = g_y.sum(0)
            x_hat = (x - mean).mul_(invstd)
            small = w.abs() < 1e-3
            g = (g_weight - torch.outer(s, b)) / torch.where(small, torch.ones_like(w), w)
            if bool(small.any()):
                g[:, small] = g_y.t() @ x_hat[:, small]
            g_w = (weight * g).sum(0) + (g_xn * x_hat).sum(0)
            g_b = s @ weight + g_xn.sum(0)
            return None, g_w, g_b, g_weight, None, None, None, None

    original_run = tabnet.TabNet._run

    def run(self: Any, x: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return original_run(self, x)
        bn, splitter = self.initial_bn, self.initial_splitter
        bn.num_batches_tracked.add_(1)
        xn, proj = ExactW.apply(
            x,
            bn.weight,
            bn.bias,
            splitter.first_fc.weight,
            bn.running_mean,
            bn.running_var,
            float(bn.momentum),
            bn.eps,
        )
        # the original _run with the pair computed above: initial_bn gives xn, the splitter
        # gets the first Linear's output (instance attributes, deleted after)
        split_forward = splitter.forward
        bn.forward = lambda _x: xn
        splitter.forward = lambda _x, projected=False: split_forward(proj, projected=True)
        try:
            return original_run(self, x)
        finally:
            del bn.forward, splitter.forward

    tabnet.TabNet._run = run


def _patch_our_loop(arm: str) -> None:
    """Change one detail of our sctab arm: its loop (``fit_torch``) or its input normalisation."""
    import torch

    import celltype_bench.methods.base as base

    if arm == "torchbn":
        raise SystemExit(
            "--arm torchbn: our network normalises its input with torch's BatchNorm1d "
            "(src/celltype_bench/methods/tabnet.py) since d4b0de7, so this arm was adopted; "
            "run --arm current for more seeds of the current network"
        )
    if arm == "current":
        return
    if arm == "exactw":
        _patch_exactw()
        return
    fit_torch = base.fit_torch

    def fit(*args: Any, **kwargs: Any) -> Any:
        if arm == "plain":
            kwargs["fused_optimizer"] = False
            torch.use_deterministic_algorithms(False)  # after the method's seed_everything
        else:
            n = len(args[2])

            def sampler(rng: np.random.Generator) -> np.ndarray:
                gen = torch.Generator()
                gen.manual_seed(int(rng.integers(2**62)))
                return torch.randperm(n, generator=gen).numpy()

            kwargs["sampler"] = sampler
        return fit_torch(*args, **kwargs)

    base.fit_torch = fit


def _tag(arm: str, commit: str | None) -> str:
    return version(commit) if arm == "current" else ""


def run(arm: str, seeds: list[int], n_cells: int, epochs: int) -> None:
    """Fit ``arm`` for every seed not yet in the output file."""
    import torch

    torch.set_num_threads(1)
    if arm == "ours_in_their_loop":
        _patch_their_loop()
        runner = bench.run_pytorch_tabnet
    else:
        _patch_our_loop(arm)
        runner = bench.run_ours
    data = bench.make_data(n_cells, 0)
    commit = bench.git_commit()
    for seed in seeds:
        # read before every fit: another process may be working through the same seeds
        # (the arm ``current`` is redone for each network version)
        done = {
            (r["arm"], r["seed"], r["n_cells"], r["epochs"], _tag(r["arm"], r.get("commit")))
            for r in _records()
        }
        if (arm, seed, n_cells, epochs, _tag(arm, commit)) in done:
            continue
        t0 = time.perf_counter()
        r = runner(data["parts"], epochs, seed)
        rec = {
            "arm": arm,
            "seed": seed,
            "n_cells": n_cells,
            "epochs": epochs,
            "macro_f1": r["macro_f1"],
            "val_f1": r["val_f1"],
            "epoch_s": bench.per_epoch(r),
            "fit_s": time.perf_counter() - t0,
            "commit": commit,
        }
        print(f"{arm} seed {seed}: test macro F1 {rec['macro_f1']:.4f}", flush=True)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with OUT.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")


def _records() -> list[dict[str, Any]]:
    if not OUT.exists():
        return []
    return [json.loads(line) for line in OUT.read_text().splitlines() if line.strip()]


def _saved_benchmark() -> dict[str, dict[int, dict[str, Any]]]:
    """Per arm and seed, the runs of ``sctab_vs_pytorch_tabnet.py`` (30,000 cells, 30 epochs).

    ``ours``: our arm with the folded input normalisation (results without a ``commit``, all
    written before 2026-11-30); the :data:`VERSIONS`: our arm at the commits of that network
    version; ``pytorch_tabnet``: all of pytorch-tabnet's runs.
    """
    runs: dict[str, dict[int, dict[str, Any]]] = {
        key: {} for key in ("ours", "pytorch_tabnet", *VERSIONS)
    }
    for path in sorted(glob.glob(str(HERE / "out" / "sctab_vs_pytorch_tabnet*.json"))):
        result = json.loads(Path(path).read_text())
        args = result["args"]
        setting = (args["n_cells"], args["epochs"], args.get("data_seed", 0))
        if args.get("extra_test_cells") or setting != (30000, 30, 0):
            continue
        for arm, rs in result["runs"].items():
            key = version(result.get("commit")) if arm == "ours" else arm
            for r in rs:
                runs[key][int(r["seed"])] = r
    return runs


def _diff(a: list[float], b: list[float]) -> str:
    """``mean(a) - mean(b) +- standard error`` (unpaired, equal sizes)."""
    se = math.sqrt((statistics.variance(a) + statistics.variance(b)) / len(a))
    return f"{statistics.fmean(a) - statistics.fmean(b):+.4f} +- {se:.4f}"


def networks() -> dict[str, dict[int, dict[str, Any]]]:
    """Per network version (:data:`VERSIONS`, then ``exactw``), its fits by seed (30,000
    cells, 30 epochs): the benchmark runs, the ``torchbn`` and ``current`` loop-variant fits
    (by their commit) and the ``exactw`` fits."""
    out: dict[str, dict[int, dict[str, Any]]] = {**_saved_benchmark(), "exactw": {}}
    for r in _records():
        if r["arm"] not in ("torchbn", "current", "exactw"):
            continue
        if (r["n_cells"], r["epochs"]) == (30000, 30):
            key = version(r.get("commit")) if r["arm"] == "current" else r["arm"]
            out[key].setdefault(r["seed"], r)
    return {v: out[v] for v in (*VERSIONS, "exactw")}


def _row(label: str, a: list[float], b: list[float], seeds: list[int]) -> str:
    lo, hi = bench.welch_ci95(a, b)
    lower = sum(x < y for x, y in zip(a, b, strict=True))
    return (
        f"| {label} | {bench.seed_ranges({'seeds': seeds})} ({len(seeds)}) | "
        f"{statistics.fmean(a):.4f} +- {statistics.stdev(a):.4f} | "
        f"{statistics.fmean(b):.4f} +- {statistics.stdev(b):.4f} | "
        f"{_diff(a, b)} | {lo:+.4f} to {hi:+.4f} | {lower} of {len(seeds)} |"
    )


def network_versions() -> str:
    """Markdown: each network version's test macro F1 against pytorch-tabnet's and against the
    ``torchbn`` network's on the same seeds (versions with fewer than 2 such seeds left out)."""
    saved = _saved_benchmark()["pytorch_tabnet"]
    nets = networks()
    lines = [
        "| network - other | seeds | network | other | difference | 95% interval "
        "| network lower in |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    names = tuple(nets)
    pairs = [(f"{v} - pytorch-tabnet", nets[v], saved) for v in names]
    pairs += [(f"{v} - torchbn", nets[v], nets["torchbn"]) for v in names[1:]]
    for label, mine, other in pairs:
        seeds = sorted(s for s in mine if s in other)
        if len(seeds) < 2:
            continue
        a = [mine[s]["macro_f1"] for s in seeds]
        b = [other[s]["macro_f1"] for s in seeds]
        lines.append(_row(label, a, b, seeds))
    return "\n".join(lines) if len(lines) > 2 else ""


def report() -> str:
    """Markdown: each arm against our and pytorch-tabnet's benchmark runs on the same seeds."""
    saved = _saved_benchmark()
    lines = [
        "| arm | seeds | test macro F1 | ours, same seeds | pytorch-tabnet, same seeds "
        "| arm - ours | arm - pytorch-tabnet | validation F1 at epochs 5 / 10 / 20 / 30 "
        "(arm; ours; pytorch-tabnet) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for arm in ARMS:
        if arm == "current":  # its fits differ by commit: in the network versions table
            continue
        recs = {
            r["seed"]: r
            for r in _records()
            if r["arm"] == arm and (r["n_cells"], r["epochs"]) == (30000, 30)
        }
        seeds = sorted(s for s in recs if s in saved["ours"] and s in saved["pytorch_tabnet"])
        if len(seeds) < 2:
            continue
        x = [recs[s]["macro_f1"] for s in seeds]
        o = [saved["ours"][s]["macro_f1"] for s in seeds]
        p = [saved["pytorch_tabnet"][s]["macro_f1"] for s in seeds]

        def val(rs: list[dict[str, Any]]) -> str:
            return " / ".join(
                f"{statistics.fmean(r['val_f1'][e - 1] for r in rs):.3f}" for e in (5, 10, 20, 30)
            )

        curves = "; ".join(
            val(rs)
            for rs in (
                [recs[s] for s in seeds],
                [saved["ours"][s] for s in seeds],
                [saved["pytorch_tabnet"][s] for s in seeds],
            )
        )
        lines.append(
            f"| {arm} | {bench.seed_ranges({'seeds': seeds})} ({len(seeds)}) | "
            f"{statistics.fmean(x):.4f} | "
            f"{statistics.fmean(o):.4f} | {statistics.fmean(p):.4f} | {_diff(x, o)} | "
            f"{_diff(x, p)} | {curves} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", choices=ARMS)
    ap.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-9"))
    ap.add_argument("--n-cells", type=int, default=30000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--report", action="store_true", help="print the comparison table only")
    args = ap.parse_args(argv)
    if args.report:
        print(report())
        pooled = network_versions()
        if pooled:
            print("\nNetwork versions (loop-variant fits and benchmark runs by commit):\n")
            print(pooled)
        return 0
    if args.arm is None:
        ap.error("give --arm (or --report)")
    run(args.arm, args.seeds, args.n_cells, args.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
