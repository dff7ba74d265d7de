"""scTab's network vs pytorch-tabnet's network, both in this project's training loop.

Separates the two halves of ``sctab_vs_pytorch_tabnet.py``'s comparison: here the loop, the
batches and the initial weights are the same and only the network differs.

For each seed:

- pytorch-tabnet 4.1.0's ``tab_network.TabNet`` is built after ``torch.manual_seed(seed)``
  (the weights ``TabNetClassifier(seed=seed)`` starts from); our
  :class:`celltype_bench.methods.tabnet.TabNet` gets a copy of those weights;
- each is trained by :func:`celltype_bench.training.fit_torch` with scTab's settings
  (class-weighted CE + lambda_sparse times the mask entropy, AdamW lr 0.005 wd 0.05, StepLR 0.9,
  clip 1.0, batch 2048, best validation macro F1 restored), the same seed, hence the same batch
  order;
- recorded: the training loss and the validation macro F1 of every epoch, and the test macro
  F1 of the restored state.

Data: as the main benchmark (census_like, preprocessed, stratified 80/10/10).

Run: ``.venv/bin/python benchmarks/sctab_same_loop.py --n-cells 30000 --epochs 30 --seeds 0-7``
(``--epochs 5 --seeds 8-13`` adds seeds to the early-epoch loss comparison; about 10 minutes per seed for 30 epochs on one CPU thread; ``--seeds`` takes ``a-b`` or ``a,b,c``, so seed
ranges can run in parallel processes). Results: ``benchmarks/out/sctab_same_loop_<seeds>.jsonl``
(one line per fit, appended; a rerun skips the fits already there) and, with ``--report``,
``benchmarks/results/sctab_same_loop.md`` from all the jsonl files.
"""

from __future__ import annotations

import argparse
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

from sctab_vs_pytorch_tabnet import PAPER, macro_f1, make_data, network_kwargs  # noqa: E402

OUT_DIR = HERE / "out"
RESULTS = HERE / "results" / "sctab_same_loop.md"
ARMS = ("ours", "pytorch_tabnet_net")


def parse_seeds(text: str) -> list[int]:
    """``"0-7"`` or ``"0,2,4"`` -> seeds."""
    try:
        if "-" in text:
            a, b = text.split("-")
            return list(range(int(a), int(b) + 1))
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: give a range like 0-7 or a list like 0,2,4") from None


def build(arm: str, n_genes: int, n_classes: int, seed: int) -> Any:
    """The arm's network with pytorch-tabnet's initial weights for ``seed``."""
    import torch
    from pytorch_tabnet import tab_network

    from celltype_bench.methods.tabnet import TabNet, pytorch_tabnet_key

    torch.manual_seed(seed)
    ref = tab_network.TabNet(
        n_genes,
        n_classes,
        **network_kwargs(),
        mask_type="entmax",
        group_attention_matrix=torch.eye(n_genes),
    )
    if arm == "pytorch_tabnet_net":

        class Wrapped(torch.nn.Module):
            """pytorch-tabnet's network with our interface (logits; entropy stored)."""

            def __init__(self, net: torch.nn.Module) -> None:
                super().__init__()
                self.net = net
                self.last_sparsity_loss = torch.zeros(())

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out, m_loss = self.net(x)
                self.last_sparsity_loss = -m_loss  # pytorch-tabnet's M_loss is minus the entropy
                return out

        return Wrapped(ref)
    ours = TabNet(n_genes, n_classes, **network_kwargs())
    theirs = ref.state_dict()
    ours.load_state_dict(
        {
            key: value if "k_hint" in key else theirs[pytorch_tabnet_key(key)]
            for key, value in ours.state_dict().items()
        }
    )
    return ours


def fit_one(arm: str, data: dict[str, Any], epochs: int, seed: int) -> dict[str, Any]:
    """Train one arm for one seed; training loss and validation F1 per epoch, test F1."""
    import torch

    from celltype_bench.balancing import class_weights
    from celltype_bench.training import fit_torch, predict_proba_torch

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = data["train"], data["valid"], data["test"]
    k = data["n_classes"]
    model = build(arm, x_tr.shape[1], k, seed)
    p = PAPER
    lam = p["lambda_sparse"]
    t0 = time.perf_counter()
    history = fit_torch(
        model,
        x_tr,
        y_tr,
        X_valid=x_va,
        y_valid=y_va,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=p["lr"], weight_decay=p["weight_decay"]),
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=p["gamma"]),
        class_weights=class_weights(y_tr, k),
        epochs=epochs,
        batch_size=p["batch_size"],
        patience=None,
        device="cpu",
        seed=seed,
        regularizer=lambda: lam * model.last_sparsity_loss,
        grad_clip=p["grad_clip"],
    )
    proba = predict_proba_torch(model, x_te)
    return {
        "seed": seed,
        "arm": arm,
        "epochs": epochs,
        "test_f1": macro_f1(y_te, proba.argmax(axis=1)),
        "fit_s": time.perf_counter() - t0,
        "loss": [h["loss"] for h in history],
        "val_f1": [h["val_macro_f1"] for h in history],
    }


def coded_parts(n_cells: int) -> dict[str, Any]:
    """The benchmark's split as CSR matrices and integer labels (training classes only)."""
    from celltype_bench.training import as_csr

    parts = make_data(n_cells, 0)["parts"]
    classes = sorted(set(parts["train"].obs["cell_type"].astype(str)))
    code = {c: i for i, c in enumerate(classes)}
    out: dict[str, Any] = {"n_classes": len(classes)}
    for name, adata in parts.items():
        labels = adata.obs["cell_type"].astype(str).to_numpy()
        y = np.array([code.get(c, -1) for c in labels], dtype=np.int64)
        keep = np.flatnonzero(y >= 0)
        out[name] = (as_csr(adata.X)[keep], y[keep])
    return out


def report(paths: list[Path]) -> str:
    """Markdown summary of all recorded fits (paired by seed).

    Test macro F1 is compared over the seeds trained for the most epochs; the training loss at
    each listed epoch over every seed trained at least that long (shorter runs, e.g.
    ``--epochs 5``, add seeds to the early-epoch comparison).
    """
    fits: dict[tuple[int, str], dict[str, Any]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            fits[(rec["seed"], rec["arm"])] = rec
    seeds = sorted({s for s, a in fits if all((s, b) in fits for b in ARMS)})
    if not seeds:
        return "no paired fits recorded\n"

    def n_epochs(seed: int) -> int:
        return min(len(fits[(seed, a)]["loss"]) for a in ARMS)

    def gap(seed: int, epoch: int) -> float:
        a, b = (fits[(seed, arm)]["loss"][epoch - 1] for arm in ARMS)
        return a - b

    full = max(n_epochs(s) for s in seeds)
    long_seeds = [s for s in seeds if n_epochs(s) == full]
    checkpoints = [e for e in (1, 3, 5, 10, 20, 30) if e <= full]
    lines = [
        "# scTab: our network vs pytorch-tabnet's network in the same training loop",
        "",
        "Same data as `sctab_vs_pytorch_tabnet.md` (census_like, 24,000 / 3,000 / 3,000 cells), "
        "same initial weights (pytorch-tabnet's for the seed, copied into ours), same batches, "
        "same loop (`fit_torch`, scTab's settings, best validation macro F1 restored), "
        "CPU float32, 1 thread. Only the network differs.",
        "",
        "| seed | epochs | test macro F1, ours | pytorch-tabnet's net | "
        + " | ".join(f"train loss ep {e} (ours / theirs)" for e in checkpoints)
        + " |",
        "|---:|---:|---:|---:|" + "---:|" * len(checkpoints),
    ]
    for s in seeds:
        a, b = fits[(s, "ours")], fits[(s, "pytorch_tabnet_net")]
        cells = [
            f"{a['loss'][e - 1]:.3f} / {b['loss'][e - 1]:.3f}" if e <= n_epochs(s) else "-"
            for e in checkpoints
        ]
        f1 = (
            f"{a['test_f1']:.4f} | {b['test_f1']:.4f}"
            if s in long_seeds and a.get("test_f1") is not None
            else "- | -"
        )
        lines.append(f"| {s} | {n_epochs(s)} | {f1} | " + " | ".join(cells) + " |")
    diff = [fits[(s, ARMS[0])]["test_f1"] - fits[(s, ARMS[1])]["test_f1"] for s in long_seeds]
    n = len(diff)
    se = statistics.stdev(diff) / math.sqrt(n) if n > 1 else float("nan")
    parts = []
    for e in checkpoints:
        gaps = [gap(s, e) for s in seeds if n_epochs(s) >= e]
        parts.append(
            f"epoch {e}: {statistics.fmean(gaps):+.3f} ({sum(g > 0 for g in gaps)}/{len(gaps)})"
        )
    lines += [
        "",
        f"Test macro F1 after {full} epochs, ours minus pytorch-tabnet's network: "
        f"{statistics.fmean(diff):+.4f} +- {se:.4f} (standard error, {n} seeds); ours lower in "
        f"{sum(d < 0 for d in diff)} of {n}.",
        "",
        "Training loss, ours minus theirs (mean over the seeds trained that long; seeds where "
        "ours is higher / seeds): " + ", ".join(parts) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cells", type=int, default=30000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", default="0-7")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only write the results table")
    args = ap.parse_args(argv)
    if args.report:
        table = report(sorted(OUT_DIR.glob("sctab_same_loop_*.jsonl")))
        print(table)
        RESULTS.write_text(table)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    seeds = parse_seeds(args.seeds)
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"sctab_same_loop_{args.seeds.replace(',', '_')}.jsonl"
    done = set()
    if out.exists():
        done = {(r["seed"], r["arm"]) for r in map(json.loads, out.read_text().splitlines())}
    data = coded_parts(args.n_cells)
    for seed in seeds:
        for arm in ARMS:
            if (seed, arm) in done:
                continue
            rec = fit_one(arm, data, args.epochs, seed)
            print(
                f"seed {seed} {arm}: test macro F1 {rec['test_f1']:.4f}, "
                f"final loss {rec['loss'][-1]:.3f}, {rec['fit_s']:.0f} s",
                flush=True,
            )
            with out.open("a") as fh:  # one complete line per fit: a killed run loses one fit
                fh.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
