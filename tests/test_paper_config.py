"""config/paper.yaml: the registry is complete and consistent, and the paper DAG plans.

No download happens here: the dry run only plans, and the registry checks read the YAML.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from celltype_bench.data.adapters import FORMATS, UNSUPPORTED_FORMATS, split_ref
from celltype_bench.data.download import read_lock
from celltype_bench.data.sources import SOURCES

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "config" / "paper.yaml"
LOCK = ROOT / "config" / "paper.lock.yaml"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

# scBalance Table 1 (cells, cell types), as in the facts sheet
TABLE1 = {
    "deng": (268, 6),
    "darmanis": (466, 9),
    "usoskin": (622, 4),
    "camp_liver": (777, 7),
    "baron_mouse": (1886, 13),
    "muraro": (2122, 9),
    "lake": (3042, 16),
    "baron_human": (8569, 14),
    "campbell": (21086, 32),
    "zilionis": (34558, 9),
    "tabula_muris": (54865, 55),
    "zheng68k": (65943, 11),
    "pbmc_10xv2": (23154, 9),
    "pbmc_10xv3": (19690, 8),
    "pbmc_celseq": (19754, 7),
    "pbmc_dropseq": (23154, 9),
    "pbmc_indrop": (21832, 7),
    "pbmc_seqwell": (18966, 7),
    "pbmc_smartseq2": (18886, 6),
    "xin": (1449, 4),
    "segerstolpe": (2133, 13),
    "cardiac_atlas": (487106, 11),
    "covid_atlas": (1462702, 64),
}
INTRA = [
    "deng",
    "darmanis",
    "usoskin",
    "camp_liver",
    "baron_mouse",
    "muraro",
    "lake",
    "baron_human",
    "campbell",
    "zilionis",
    "tabula_muris",
    "zheng68k",
]


@pytest.fixture(scope="module")
def paper() -> dict:
    return yaml.safe_load(PAPER.read_text())


def test_every_table1_dataset_registered(paper):
    datasets = paper["datasets"]
    for name, (cells, classes) in TABLE1.items():
        source = datasets[name]["source"]
        assert source["kind"] == "url" and source["name"] == name
        assert source["expected"] == {"cells": cells, "classes": classes}, name
        assert source.get("licence") and source.get("citation"), name
    census = datasets["census"]["source"]
    assert census["kind"] == "census" and census["census_version"] == "2023-05-15"
    assert (census["min_cells"], census["donors_above"], census["ancestors_above"]) == (
        5000,
        30,
        7,
    )
    assert (ROOT / census["cell_types"]).exists()
    assert len((ROOT / census["cell_types"]).read_text().split("\n")) >= 164


def test_url_sources_resolve_and_are_locked(paper):
    lock = read_lock(LOCK)
    for name, spec in paper["datasets"].items():
        source = spec["source"]
        assert source["kind"] in SOURCES
        if source["kind"] != "url":
            continue
        assert source["format"] in FORMATS or source["format"] in UNSUPPORTED_FORMATS, name
        for url in source["files"].values():
            assert url.startswith("https://"), url
            assert url in lock, f"{url} of {name} is missing from {LOCK.name}"
        for key in ("data", "labels", "matrix", "features", "barcodes"):
            if source.get(key):
                split_ref(source[key], source["files"])  # raises on a bad reference
    zenodo = next(u for u in lock if "zenodo.org/records/3357167" in u)
    assert lock[zenodo]["size"] == 3671466589
    assert lock[zenodo]["md5"] == "b799a660b8bcaf5f3580a9b6f9372e5b"
    for entry in lock.values():
        sha = entry.get("sha256")
        assert sha is None or re.fullmatch(r"[0-9a-f]{64}", sha)


def test_label_maps_name_current_cl_terms(paper):
    from celltype_bench.ontology import load_ontology

    onto = load_ontology()
    for name, spec in paper["datasets"].items():
        for label, value in (spec.get("label_map") or {}).items():
            tid = onto.find(str(value))
            assert tid is not None and not onto.is_obsolete(tid), (name, label, value)
        fallback = spec["source"].get("unmapped_cl")
        if fallback:
            assert onto.find(fallback) and not onto.is_obsolete(onto.find(fallback))


def test_tasks_cover_the_paper(paper):
    tasks = paper["tasks"]
    for name in INTRA:
        assert tasks[name]["split"] == {"kind": "stratified_kfold", "n_folds": 5, "seed": 0}
    combined = {
        k: v["source"]["parts"]
        for k, v in paper["datasets"].items()
        if v["source"]["kind"] == "combine"
    }
    assert combined["pbmcbench"] == [
        "pbmc_10xv2",
        "pbmc_10xv3",
        "pbmc_celseq",
        "pbmc_dropseq",
        "pbmc_indrop",
        "pbmc_seqwell",
        "pbmc_smartseq2",
    ]
    assert combined["pancreas"] == ["baron_human", "muraro", "segerstolpe", "xin"]
    pairs = {
        (t["dataset"], t["split"]["train"][0], t["split"]["test"])
        for t in tasks.values()
        if t["split"]["kind"] == "holdout_study"
    }
    for dataset, parts in combined.items():
        assert {(dataset, a, b) for a in parts for b in parts if a != b} <= pairs
    assert len(pairs) == 7 * 6 + 4 * 3
    census = tasks["census"]
    assert census["split"]["kind"] == "donor" and census["split"]["seed"] == 1
    linear = paper["methods"]["linear"]["params"]
    assert (linear["lr"], linear["weight_decay"], linear["batch_size"]) == (5e-4, 0.01, 2048)


def test_dry_run_plans_the_paper_dag(tmp_path):
    for item in ["Snakefile", "rules", "scripts", "config", "report", "envs", "profiles"]:
        src = ROOT / item
        if src.exists():
            (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    before = (tmp_path / "config" / "paper.lock.yaml").read_text()
    res = subprocess.run(
        [SNAKEMAKE, "-n", "--cores", "2", "--configfile", "config/paper.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    out = res.stdout + res.stderr
    counts = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", out, flags=re.M))
    n_datasets = len(yaml.safe_load(PAPER.read_text())["datasets"])
    assert int(counts["fetch"]) == n_datasets  # every registered dataset is fetched
    assert int(counts["split"]) >= 12 + 54 + 1
    assert int(counts["total"]) > 1000
    # combined datasets depend on their parts' raw files
    assert re.search(r"input: data/raw/baron_human\.h5ad, data/raw/muraro\.h5ad", out)
    assert (tmp_path / "config" / "paper.lock.yaml").read_text() == before
    assert not (tmp_path / "data").exists()  # planning downloads nothing
