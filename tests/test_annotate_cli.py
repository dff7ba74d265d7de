"""`celltype-bench annotate`, `new-method` and `retry-failed` (library functions and CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest

from celltype_bench.annotate import OBS_CL, OBS_LABEL, OBS_UNCERTAINTY, annotate_file
from celltype_bench.cli import main, retry_failed
from celltype_bench.data.preprocess import preprocess
from celltype_bench.data.sources import load_pbmc68k
from celltype_bench.errors import InputError
from celltype_bench.methods import create
from celltype_bench.scaffold import new_method

CLI = str(Path(sys.executable).with_name("celltype-bench"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("annot")
    raw = load_pbmc68k()
    proc = preprocess(raw, min_genes=10)
    model = create("linear", epochs=5, batch_size=64, lr=0.01).fit(proc)
    model.save(d / "model")
    raw.write_h5ad(d / "query.h5ad")
    return d, raw


def test_annotate_labels_every_cell_with_cl_id_and_uncertainty(trained):
    d, raw = trained
    res = subprocess.run(
        [
            CLI,
            "annotate",
            str(d / "query.h5ad"),
            "--model",
            str(d / "model"),
            "--out",
            str(d / "o.h5ad"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    out = ad.read_h5ad(d / "o.h5ad")
    assert out.n_obs == raw.n_obs
    assert out.obs[OBS_LABEL].notna().all() and (out.obs[OBS_LABEL] != "").all()
    assert out.obs[OBS_CL].str.startswith("CL:").all()
    assert out.obs[OBS_UNCERTAINTY].between(0, 1).all()
    # the model learned something: most cells get their author label back
    assert (out.obs[OBS_LABEL] == out.obs["cell_type"].astype(str)).mean() > 0.5
    assert out.uns["celltype_bench_annotate"]["gene_overlap"] == 1.0


def test_annotate_zero_fills_missing_genes_and_refuses_low_overlap(trained, caplog):
    d, raw = trained
    part = raw[:, : int(raw.n_vars * 0.7)].copy()
    part.write_h5ad(d / "part.h5ad")
    res = annotate_file(d / "part.h5ad", d / "model", d / "part_out.h5ad")
    info = res.uns["celltype_bench_annotate"]
    assert info["n_genes_zero_filled"] == raw.n_vars - part.n_vars
    few = raw[:, :50].copy()
    few.write_h5ad(d / "few.h5ad")
    with pytest.raises(InputError, match="target genes") as err:
        annotate_file(d / "few.h5ad", d / "model", d / "few_out.h5ad")
    assert "few.h5ad" in str(err.value)
    assert not (d / "few_out.h5ad").exists()
    assert main(["annotate", str(d / "few.h5ad"), "--model", str(d / "model")]) == 2


def test_new_method_writes_skeleton_and_config_block(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\nmethods:\n  majority: {}\n")
    files = new_method("my_thing", root=tmp_path)
    assert (tmp_path / "user_methods/my_thing.py").exists() and len(files) == 2
    cfg = (tmp_path / "config.yaml").read_text()
    assert "  my_thing:\n    # scaffold" in cfg and "majority" in cfg
    with pytest.raises(InputError, match="overwrite"):
        new_method("my_thing", root=tmp_path)
    new_method("my_tool", external=True, root=tmp_path)
    assert (tmp_path / "rules/methods/my_tool.smk").exists()
    assert "external: true" in (tmp_path / "config.yaml").read_text()
    with pytest.raises(InputError, match="invalid method name"):
        new_method("../evil", root=tmp_path)
    # the written test passes as is
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(tmp_path / "tests/test_method_my_thing.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-2000:]


def test_retry_failed_removes_only_failed_runs(tmp_path):
    for rep, status in (("r0", "failed"), ("r1", None)):
        run = tmp_path / "results/t/m/none" / rep
        (run / "model").mkdir(parents=True)
        (run / "predictions.parquet").write_text("x")
        (run / "run.json").write_text(json.dumps({"status": status} if status else {}))
    runs = retry_failed(tmp_path / "results")
    assert [r.name for r in runs] == ["r0"]
    assert not (tmp_path / "results/t/m/none/r0/predictions.parquet").exists()
    assert (tmp_path / "results/t/m/none/r1/predictions.parquet").exists()
