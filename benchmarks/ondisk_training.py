#!/usr/bin/env python
"""Out-of-core training: one epoch of linear and scBalance from an on-disk CSR file.

Reproduce (from the repository root; 13 minutes on 2 shared cores, needs 4 GB free in /tmp):

    .venv/bin/python benchmarks/ondisk_training.py

Writes ``benchmarks/out/ondisk_training.json`` (all numbers, git-ignored) and
``benchmarks/results/ondisk_training.md`` (the table), and prints the table;
``--render-only`` rewrites the table from the JSON.

Data: a synthetic sparse dataset of ``--genes`` (5,000) genes, about ``--nnz`` (425) stored
values a cell (float32 value + int32 index: 8 bytes each, so 3.4 GB for 1,000,000 cells), 20
cell types with geometric frequencies (ratio 0.75; largest / smallest about 240x), each with
250 marker genes whose values are raised by 3 where present (values otherwise Gamma(2, 0.5)).
Cells are drawn i.i.d. (the file is not sorted by label). It is generated with a seeded RNG
chunk by chunk (10,000 cells at a time, chunk ``i`` seeded by ``(seed, i)``, so the first
100,000 cells of the 1M file equal the 100k file) and written with
``celltype_bench.data.ondisk.OnDiskWriter`` (HDF5, CSR, uncompressed, 4 MiB chunks) under
``--workdir`` (default ``/tmp/ondisk_bench``), fsynced, and deleted at the end (``--keep``
keeps it). A separate 20,000-cell test file comes from the same generator (seed + 1).

Runs, per size (``--sizes``, default 100,000 and 1,000,000 cells), each in a fresh Python
process with the file evicted from the page cache first (``posix_fadvise(DONTNEED)``, so every
run reads from the disk as a first epoch over data larger than memory would):

- ``raw read``: ``data`` and ``indices`` read front to back in 64 MiB pieces with
  ``h5py.Dataset.read_direct`` into one reused buffer: the physical ceiling of this file on
  this disk (nothing is decoded or densified);
- ``raw read (page cache)``: the same read again right after (file now cached);
- ``loader only``: the block-shuffled loader (``OnDiskCSR.block_minibatches``, default
  settings: 1,024-cell blocks, 128 MiB buffer, batch 2,048) over one epoch, batches densified
  to float32 tensors, no model;
- ``linear`` / ``scbalance``: ``celltype_bench.methods.create(name, epochs=1, device="cpu")``
  (published batch sizes: 2,048 / 128; scBalance with its weighted sampler) fitted with
  ``Method.fit`` on ``read_ondisk_anndata(file)`` (obs in memory, X on disk, the loader's
  default settings), i.e. one true full epoch; then ``predict_proba`` on the on-disk test
  file (batches of at most 4 MiB) for macro F1.

Peak RSS: ``ru_maxrss`` of the child process (also ``VmHWM``), which includes Python, torch,
obs and the loader; the page cache is not process memory. Throughput: cells per second of
the training loop (``history[0]['cells_per_s']``) and of the loader, beside the raw read's
cells per second (``n_cells / seconds``). The machine may be shared: the share of the CPUs
that other processes used during each run is recorded (``/proc/stat`` minus the child's own
CPU time); RSS does not depend on it, throughput does. Torch threads: ``--threads`` (default
1: on a loaded 2-core machine one thread is several times faster than two, see
``celltype_bench.training``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "out"
RESULTS_DIR = HERE / "results"
N_CLASSES = 20
MARKERS = 250
MARKER_BOOST = 3.0
CHUNK_CELLS = 10_000
TEST_CELLS = 20_000
TARGET_RSS_MB = 2048.0
TARGET_RATIO = 1.3
RUNS = ("raw", "raw_cached", "loader", "linear", "scbalance")
LABELS = {
    "raw": "raw sequential read (cold)",
    "raw_cached": "raw sequential read (page cache)",
    "loader": "block-shuffled loader only",
    "linear": "linear, 1 epoch",
    "scbalance": "scBalance, 1 epoch",
}


# ---------------------------------------------------------------------------- data
def class_probs(n_classes: int = N_CLASSES):
    import numpy as np

    p = 0.75 ** np.arange(n_classes)
    return p / p.sum()


def make_chunk(seed: int, index: int, n: int, genes: int, nnz: float, marker_seed: int):
    """One chunk of cells: (CSR float32, int labels). Sorted unique columns per row.

    ``seed`` and ``index`` seed the cells; ``marker_seed`` the marker genes of each class (the
    same for the training and the test file).
    """
    import numpy as np
    import scipy.sparse as sp

    markers = np.zeros((N_CLASSES, genes), dtype=np.float32)
    mrng = np.random.default_rng([marker_seed, 10**9])
    for c in range(N_CLASSES):
        markers[c, mrng.choice(genes, MARKERS, replace=False)] = MARKER_BOOST
    rng = np.random.default_rng([seed, index])
    y = rng.choice(N_CLASSES, size=n, p=class_probs())
    p = nnz / genes
    draws = int(nnz * 1.3 + 8 * (nnz**0.5) + 16)  # reaches the last gene with 6+ sd margin
    pos = np.cumsum(rng.geometric(p, size=(n, draws)).astype(np.int32), axis=1, dtype=np.int32)
    pos -= 1
    keep = pos < genes
    lens = keep.sum(axis=1)
    indices = pos[keep]
    del pos, keep
    values = rng.gamma(2.0, 0.5, size=len(indices)).astype(np.float32)
    values += markers[np.repeat(y, lens), indices]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    return sp.csr_matrix((values, indices, indptr), shape=(n, genes)), y


def write_dataset(
    path: Path, n_cells: int, genes: int, nnz: float, seed: int, marker_seed: int
) -> dict[str, Any]:
    """Write ``n_cells`` generated cells chunk by chunk; obs holds ``cell_type``."""
    import numpy as np
    import pandas as pd

    from celltype_bench.data.ondisk import OnDiskWriter

    t0 = time.perf_counter()
    labels = []
    with OnDiskWriter(path, genes) as w:
        for i, r0 in enumerate(range(0, n_cells, CHUNK_CELLS)):
            X, y = make_chunk(seed, i, min(CHUNK_CELLS, n_cells - r0), genes, nnz, marker_seed)
            w.append(X)
            labels.append(y.astype(np.int8))
            del X
        y = np.concatenate(labels)
        names = np.array([f"type_{c:02d}" for c in range(N_CLASSES)])
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical.from_codes(y, categories=names)},
            index=pd.Index([f"c{i:07d}" for i in range(n_cells)]),
        )
        var = pd.DataFrame(index=pd.Index([f"g{j:05d}" for j in range(genes)]))
        w.close(obs=obs, var=var)
        nnz_total = w.nnz
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    counts = np.bincount(y, minlength=N_CLASSES)
    return {
        "path": str(path),
        "n_cells": n_cells,
        "n_genes": genes,
        "nnz": int(nnz_total),
        "nnz_per_cell": nnz_total / n_cells,
        "bytes_on_disk": path.stat().st_size,
        "largest_class": int(counts.max()),
        "smallest_class": int(counts.min()),
        "write_s": time.perf_counter() - t0,
    }


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (clean pages; no privileges needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- child side
def _rss() -> dict[str, float]:
    out = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, val = line.split(":")
                out[key.lower() + "_mb"] = int(val.split()[0]) / 1024.0
    return out


def child_raw(args: argparse.Namespace) -> dict[str, Any]:
    import h5py
    import numpy as np

    piece = 64 * 2**20 // 4
    buf = np.empty(piece, dtype=np.float32)
    res: dict[str, Any] = {}
    for label in ("cold", "cached"):
        t0 = time.perf_counter()
        total = 0
        with h5py.File(args.data, "r") as f:
            for name in ("data", "indices"):
                d = f["X"][name]
                view = buf.view(d.dtype)[:piece]
                for p0 in range(0, d.shape[0], piece):
                    p1 = min(p0 + piece, d.shape[0])
                    d.read_direct(view, np.s_[p0:p1], np.s_[0 : p1 - p0])
                    total += (p1 - p0) * d.dtype.itemsize
            n = int(f["X"].attrs["shape"][0])
        s = time.perf_counter() - t0
        res[label] = {
            "seconds": s,
            "bytes": total,
            "mb_per_s": total / 2**20 / s,
            "cells_per_s": n / s,
        }
    return {**res, **_rss()}


def child_loader(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from celltype_bench.data.ondisk import read_ondisk_anndata

    torch.set_num_threads(args.threads)
    od = read_ondisk_anndata(args.data)
    y = od.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    rss_open = _rss()["ru_maxrss_mb"]
    t0 = time.perf_counter()
    seen = 0
    check = 0.0
    for xb, yb in od.X.block_minibatches(y, 2048, rng=np.random.default_rng(0)):
        seen += len(yb)
        check += float(xb[0, 0])
    s = time.perf_counter() - t0
    return {
        "seconds": s,
        "cells": seen,
        "cells_per_s": seen / s,
        "reads": od.X.stats.reads,
        "read_mb": od.X.stats.nnz * 8 / 2**20,
        "block_cells": od.X.block_cells,
        "buffer_blocks": od.X.buffer_blocks,
        "rss_before_mb": rss_open,
        **_rss(),
    }


def child_method(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import torch._dynamo  # noqa: F401  (the optimizer's one-time lazy import, before timing)

    from celltype_bench.data.ondisk import read_ondisk_anndata
    from celltype_bench.methods import create
    from celltype_bench.training import _macro_f1

    rss_imports = _rss()["ru_maxrss_mb"]
    train = read_ondisk_anndata(args.data)
    rss_open = _rss()["ru_maxrss_mb"]
    est = create(args.child, epochs=1, device="cpu", seed=0)
    t0 = time.perf_counter()
    est.fit(train)
    fit_s = time.perf_counter() - t0
    rss_fit = _rss()["ru_maxrss_mb"]
    test = read_ondisk_anndata(args.test)
    t0 = time.perf_counter()
    proba = est.predict_proba(test)
    predict_s = time.perf_counter() - t0
    pred = np.asarray(est.classes_)[proba.to_numpy().argmax(axis=1)]
    truth = test.obs["cell_type"].astype(str).to_numpy()
    h = est.history_[0]
    return {
        "fit_s": fit_s,
        "epoch_s": h["seconds"],
        "cells": h["cells"],
        "cells_per_s": h["cells_per_s"],
        "predict_s": predict_s,
        "predict_cells_per_s": len(truth) / predict_s,
        "macro_f1": float(_macro_f1(truth, pred)),
        "batch_size": est.params["batch_size"],
        "block_cells": train.X.block_cells,
        "buffer_blocks": train.X.buffer_blocks,
        "reads": train.X.stats.reads,
        "rss_imports_mb": rss_imports,
        "rss_before_mb": rss_open,
        "rss_after_fit_mb": rss_fit,
        **_rss(),
    }


def child_main(args: argparse.Namespace) -> None:
    fn = {"raw": child_raw, "loader": child_loader}.get(args.child, child_method)
    out = fn(args)
    Path(args.result).write_text(json.dumps(out))


# ---------------------------------------------------------------------------- parent side
def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), sum(v) - v[3] - v[4]  # minus idle and iowait


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_child(kind: str, data: Path, test: Path, args: argparse.Namespace) -> dict[str, Any]:
    result = Path(args.workdir) / f"{kind}-{data.stem}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind]
    cmd += ["--data", str(data), "--test", str(test), "--result", str(result)]
    cmd += ["--threads", str(args.threads)]
    evict(data)
    evict(test)
    clk = os.sysconf("SC_CLK_TCK")
    j0, c0, l0 = _cpu_jiffies(), _children_cpu_s(), os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    j1, c1 = _cpu_jiffies(), _children_cpu_s()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{kind} on {data} failed (exit {proc.returncode})")
    out = json.loads(result.read_text())
    result.unlink()
    total = max(1, j1[0] - j0[0])
    own = (c1 - c0) * clk
    out.update(
        {
            "process_wall_s": wall,
            "process_cpu_s": c1 - c0,
            "other_load": max(0.0, (j1[1] - j0[1] - own) / total),
            "loadavg_1min_before": l0,
        }
    )
    return out


def _command(args: argparse.Namespace) -> str:
    cmd = ".venv/bin/python benchmarks/ondisk_training.py"
    if args.sizes != [100_000, 1_000_000]:
        cmd += " --sizes " + " ".join(map(str, args.sizes))
    if args.genes != 5000:
        cmd += f" --genes {args.genes}"
    if args.nnz != 425:
        cmd += f" --nnz {args.nnz}"
    if args.threads != 1:
        cmd += f" --threads {args.threads}"
    if args.seed != 0:
        cmd += f" --seed {args.seed}"
    return cmd


def markdown(payload: dict[str, Any], args: argparse.Namespace) -> str:
    sizes = sorted(payload["runs"], key=int)
    data = payload["data"]
    lines = [
        "# Out-of-core training: one epoch from an on-disk CSR file",
        "",
        "Data: synthetic, "
        + "; ".join(
            f"{int(n):,} cells x {data[n]['n_genes']:,} genes, "
            f"{data[n]['nnz_per_cell']:.0f} stored values a cell, "
            f"{data[n]['bytes_on_disk'] / 1e9:.2f} GB on disk "
            f"({data[n]['bytes_on_disk'] / 2**30:.2f} GiB)"
            for n in sizes
        )
        + f"; {N_CLASSES} cell types (largest / smallest class "
        + ", ".join(f"{data[n]['largest_class']:,} / {data[n]['smallest_class']:,}" for n in sizes)
        + "). HDF5 CSR (celltype_bench.data.ondisk, uncompressed, 4 MiB chunks) on "
        + f"{payload['disk']}. Test: {TEST_CELLS:,} cells from the same generator, predicted from "
        "disk. Each run is a fresh process; the file is evicted from the page cache before it. "
        f"Torch threads: {args.threads}. Loader defaults: blocks of "
        f"{payload['runs'][sizes[0]]['linear']['block_cells']:,} cells, a 128 MiB shuffle "
        "buffer.",
        "",
        "| cells | run | batch | seconds | cells/s | x raw read | peak RSS MB | RSS before MB "
        "| macro F1 | other load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        r = payload["runs"][n]
        raw_cps = r["raw"]["cold"]["cells_per_s"]
        rows = [
            ("raw", "", r["raw"]["cold"]["seconds"], raw_cps, r["raw"], None),
            (
                "raw_cached",
                "",
                r["raw"]["cached"]["seconds"],
                r["raw"]["cached"]["cells_per_s"],
                r["raw"],
                None,
            ),
            (
                "loader",
                "2048",
                r["loader"]["seconds"],
                r["loader"]["cells_per_s"],
                r["loader"],
                None,
            ),
        ]
        for m in ("linear", "scbalance"):
            x = r[m]
            rows.append((m, str(x["batch_size"]), x["epoch_s"], x["cells_per_s"], x, x["macro_f1"]))
        for kind, batch, secs, cps, x, f1 in rows:
            rss = x["ru_maxrss_mb"] if kind != "raw_cached" else None
            before = x.get("rss_before_mb")
            lines.append(
                f"| {int(n):,} | {LABELS[kind]} | {batch} | {secs:.1f} | {cps:,.0f} "
                f"| {cps / raw_cps:.2f} | {'' if rss is None else f'{rss:.0f}'} "
                f"| {'' if before is None else f'{before:.0f}'} "
                f"| {'' if f1 is None else f'{f1:.3f}'} | {x['other_load']:.0%} |"
            )
    lines += ["", "| check | linear | scBalance | target |", "|---|---:|---:|---|"]
    lo, hi = sizes[0], sizes[-1]
    verdict = []
    for label, key in (
        (f"peak RSS at {int(hi):,} cells, MB", hi),
        (f"peak RSS at {int(lo):,}, MB", lo),
    ):
        a = payload["runs"][key]["linear"]["ru_maxrss_mb"]
        b = payload["runs"][key]["scbalance"]["ru_maxrss_mb"]
        verdict += [a <= TARGET_RSS_MB, b <= TARGET_RSS_MB]
        lines.append(f"| {label} | {a:.0f} | {b:.0f} | <= {TARGET_RSS_MB:.0f} |")
    ratios = {
        m: payload["runs"][hi][m]["ru_maxrss_mb"] / payload["runs"][lo][m]["ru_maxrss_mb"]
        for m in ("linear", "scbalance")
    }
    verdict += [v <= TARGET_RATIO for v in ratios.values()]
    lines.append(
        f"| peak RSS ratio {int(hi):,} / {int(lo):,} | {ratios['linear']:.2f} "
        f"| {ratios['scbalance']:.2f} | <= {TARGET_RATIO} |"
    )
    for n in sizes:
        raw = payload["runs"][n]["raw"]["cold"]
        lines.append(
            f"| epoch throughput / raw cold read, {int(n):,} cells "
            f"| {payload['runs'][n]['linear']['cells_per_s'] / raw['cells_per_s']:.2f} "
            f"| {payload['runs'][n]['scbalance']['cells_per_s'] / raw['cells_per_s']:.2f} "
            f"| (raw: {raw['mb_per_s']:,.0f} MB/s) |"
        )
    big = payload["runs"][hi]
    loader_cps = big["loader"]["cells_per_s"]
    lines += [
        "",
        f"Targets (peak RSS <= {TARGET_RSS_MB:.0f} MB at both sizes, ratio <= {TARGET_RATIO}): "
        f"**{'met' if all(verdict) else 'NOT met'}**.",
        "",
        f"Where the time goes at {int(hi):,} cells: the loader alone (block reads, CSR decode, "
        f"densify to float32, no model) delivers {loader_cps:,.0f} cells/s "
        f"({loader_cps / big['raw']['cold']['cells_per_s']:.2f} x the raw read: densifying "
        f"{data[hi]['n_genes']:,} genes a cell costs more than reading its "
        f"{data[hi]['nnz_per_cell']:.0f} values), so loading accounts for about "
        f"{big['linear']['cells_per_s'] / loader_cps:.0%} of the linear epoch and "
        f"{big['scbalance']['cells_per_s'] / loader_cps:.0%} of scBalance's; the rest is the "
        f"models' compute on {args.threads} torch thread(s) of a loaded machine (scBalance: "
        f"batch {big['scbalance']['batch_size']}, "
        f"{-(-int(hi) // big['scbalance']['batch_size']):,} optimizer steps), not the disk.",
        "",
        "Notes: both methods train one true full epoch over every cell (scBalance: as many "
        "weighted draws, with replacement, as cells), through `Method.fit` on "
        "`read_ondisk_anndata(file)`. 'seconds' and 'cells/s' are the training loop's "
        "(history), excluding imports, obs loading and prediction; 'x raw read' divides by the "
        "cold raw read's cells/s (the physical ceiling of this file on this disk; a second "
        "read from the page cache is shown too). 'RSS before' is the process after imports and "
        "opening the file (obs in memory, X on disk). 'other load' is the share of the CPUs "
        "other processes used during the run: the machine was shared "
        f"(1-min load average {payload['loadavg_start']:.1f} on {os.cpu_count()} CPUs at the "
        "start), so throughputs are lower bounds; RSS does not depend on the load. "
        f"Generating and writing the {int(hi):,}-cell file took "
        f"{data[hi]['write_s']:.0f} s. Total benchmark time: {payload['total_s'] / 60:.1f} min.",
        "",
        f"Command: `{_command(args)}`",
        "",
    ]
    return "\n".join(lines)


def parent_main(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "data": {},
        "runs": {},
        "loadavg_start": load0,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    st = os.statvfs(work)
    payload["disk"] = f"{work} ({st.f_blocks * st.f_frsize / 2**30:.0f} GiB filesystem)"
    test = work / "test.h5"
    files = [test]
    try:
        print(f"writing {TEST_CELLS:,} test cells", flush=True)
        write_dataset(test, TEST_CELLS, args.genes, args.nnz, args.seed + 1, args.seed)
        for n in sorted(args.sizes):
            path = work / f"cells_{n}.h5"
            files.append(path)
            print(f"writing {n:,} cells to {path}", flush=True)
            info = write_dataset(path, n, args.genes, args.nnz, args.seed, args.seed)
            payload["data"][str(n)] = info
            print(
                f"  {info['bytes_on_disk'] / 1e9:.2f} GB, "
                f"{info['nnz_per_cell']:.0f} values a cell, "
                f"{info['write_s']:.0f} s",
                flush=True,
            )
            runs: dict[str, Any] = {}
            for kind in ("raw", "loader", "linear", "scbalance"):
                res = run_child(kind, path, test, args)
                runs[kind] = res
                if kind == "raw":
                    cold, cached = res["cold"]["mb_per_s"], res["cached"]["mb_per_s"]
                    msg = f"cold {cold:.0f} MB/s, cached {cached:.0f} MB/s"
                else:
                    msg = f"{res['cells_per_s']:,.0f} cells/s"
                print(
                    f"  {kind}: {msg}, peak RSS {res['ru_maxrss_mb']:.0f} MB, "
                    f"other load {res['other_load']:.0%}",
                    flush=True,
                )
            payload["runs"][str(n)] = runs
            if not args.keep:
                path.unlink()
    finally:
        if not args.keep:
            for f in files:
                f.unlink(missing_ok=True)
    payload["total_s"] = time.perf_counter() - t_start
    payload["command"] = _command(args)
    payload["args"] = {k: v for k, v in vars(args).items() if k not in ("child", "result")}
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "ondisk_training.json").write_text(json.dumps(payload, indent=2, default=str))
    write_markdown(payload, args)


def write_markdown(payload: dict[str, Any], args: argparse.Namespace) -> None:
    """The results table (needs two sizes), written atomically and printed."""
    if len(payload["runs"]) < 2:
        return
    md = markdown(payload, args)
    RESULTS_DIR.mkdir(exist_ok=True)
    tmp = RESULTS_DIR / ".ondisk_training.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, RESULTS_DIR / "ondisk_training.md")
    print(md)


def render_only(args: argparse.Namespace) -> None:
    """Rewrite the table from benchmarks/out/ondisk_training.json (no runs)."""
    payload = json.loads((OUT_DIR / "ondisk_training.json").read_text())
    for key, value in payload.get("args", {}).items():
        setattr(args, key, value)
    write_markdown(payload, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--genes", type=int, default=5000)
    ap.add_argument("--nnz", type=float, default=425, help="mean stored values a cell")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/ondisk_bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument(
        "--render-only", action="store_true", help="rewrite the table from the saved JSON"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--test", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


if __name__ == "__main__":
    ns = parse_args()
    if ns.child:
        child_main(ns)
    elif ns.render_only:
        render_only(ns)
    else:
        parent_main(ns)
