"""The new sources through the workflow: url fetch (file:// URLs) -> combine -> preprocess ->
holdout_study split, in a temporary copy of the workflow (data steps only, no training)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def _study(path: Path, genes: list[str], n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, size=(n, len(genes)))
    labels = np.where(np.arange(n) % 3 == 0, "beta", "alpha")
    with zipfile.ZipFile(path, "w") as zf:
        frame = pd.DataFrame(counts, index=[f"cell{i}" for i in range(n)], columns=genes)
        zf.writestr("Study/Filtered_data.csv", frame.to_csv())
        zf.writestr("Study/Labels.csv", pd.DataFrame({"x": labels}).to_csv(index=False))


def test_fetch_combine_preprocess_split(tmp_path):
    for item in ["Snakefile", "rules", "scripts", "config", "report", "envs", "profiles"]:
        (shutil.copytree if (ROOT / item).is_dir() else shutil.copy)(ROOT / item, tmp_path / item)
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    genes_a = [f"G{i}" for i in range(30)]
    genes_b = [f"G{i}" for i in range(10, 45)]
    _study(tmp_path / "a.zip", genes_a, 40, 0)
    _study(tmp_path / "b.zip", genes_b, 30, 1)
    label_map = {"alpha": "CL:0000171", "beta": "CL:0000169"}

    def part(name: str) -> dict:
        return {
            "source": {
                "kind": "url",
                "name": name,
                "format": "abdelaal_csv",
                "files": {"z": (tmp_path / f"{name}.zip").as_uri()},
                "data": "z/Study/Filtered_data.csv",
                "labels": "z/Study/Labels.csv",
                "expected": {"classes": 2},
                "lock": "downloads.lock.yaml",
            },
            "label_map": label_map,
        }

    config = {
        "datasets": {
            "a": part("a"),
            "b": part("b"),
            "ab": {"source": {"kind": "combine", "parts": ["a", "b"]}, "label_map": label_map},
        },
        "preprocess": {"min_genes": 1},
        "tasks": {
            "a_to_b": {
                "dataset": "ab",
                "split": {
                    "kind": "holdout_study",
                    "train": ["a"],
                    "test": "b",
                    "val_fraction": 0.25,
                },
            }
        },
        "methods": {"majority": {}},
    }
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(config))
    res = subprocess.run(
        [
            SNAKEMAKE,
            "--cores",
            "1",
            "--configfile",
            "mini.yaml",
            "--",
            "data/splits/a_to_b.parquet",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").rglob("*.log")))
    assert res.returncode == 0, res.stderr[-3000:] + logs[-3000:]
    split = pd.read_parquet(tmp_path / "data/splits/a_to_b.parquet")
    roles = split.groupby("role")["cell_id"].apply(list)
    assert len(roles["test"]) == 30 and all(c.startswith("b:") for c in roles["test"])
    assert len(roles["train"]) + len(roles["valid"]) == 40
    assert len(roles["valid"]) == 6 + 3  # floor(0.25 * 26 alpha) + floor(0.25 * 14 beta)
    lock = yaml.safe_load((tmp_path / "downloads.lock.yaml").read_text())["files"]
    assert len(lock) == 2 and all(len(v["sha256"]) == 64 for v in lock.values())
    import anndata as ad

    processed = ad.read_h5ad(tmp_path / "data/processed/ab.h5ad")
    assert list(processed.var_names) == [f"G{i}" for i in range(10, 30)]
    assert set(processed.obs["dataset_id"]) == {"a", "b"}
