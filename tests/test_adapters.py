"""Format adapters and the 'url' / 'combine' sources on tiny files written by the tests.

Downloads use file:// URLs (local files only); the HTTP side is covered by test_download.py.
"""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from celltype_bench.data.adapters import load_combined, load_url_source
from celltype_bench.data.download import read_lock
from celltype_bench.data.sources import STANDARD_OBS, load_source, validate_raw
from celltype_bench.errors import InputError

LABELS = ["B cell", "alpha", "B cell", "T cell", "alpha", "alpha"]
GENES = ["INS", "GCG", "CD19", "CD3E", "GCG"]  # a duplicated symbol, as in real files
COUNTS = np.array(
    [
        [0, 1, 5, 0, 0],
        [9, 0, 0, 0, 2],
        [0, 0, 7, 1, 0],
        [0, 0, 0, 4, 0],
        [3, 8, 0, 0, 0],
        [1, 6, 0, 0, 1],
    ],
    dtype=float,
)
CELLS = [f"cell{i}" for i in range(len(LABELS))]


def _url(path: Path) -> str:
    return path.resolve().as_uri()


def _common(tmp_path: Path) -> dict:
    return {"lock": str(tmp_path / "lock.yaml"), "cache_dir": str(tmp_path / "cache")}


def _cl_ids(a: ad.AnnData) -> dict[str, str]:
    pairs = a.obs[["cell_type", "cell_type_ontology_term_id"]].astype(str).drop_duplicates()
    return dict(pairs.itertuples(index=False))


def _check_standard(a: ad.AnnData) -> None:
    assert sp.isspmatrix_csr(a.X) or sp.issparse(a.X)
    assert a.X.dtype == np.float32
    assert np.array_equal(a.X.data, np.rint(a.X.data))
    assert a.obs_names.is_unique and a.var_names.is_unique
    for col in STANDARD_OBS:
        assert col in a.obs
        assert not a.obs[col].astype(str).str.strip().eq("").any()
    validate_raw(a)


def _abdelaal_zip(tmp_path: Path, counts=COUNTS) -> Path:
    frame = pd.DataFrame(counts, index=CELLS, columns=GENES)
    archive = tmp_path / "bench.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Intra-dataset/Toy/Filtered_Toy_data.csv", frame.to_csv())
        zf.writestr("Intra-dataset/Toy/Labels.csv", pd.DataFrame({"x": LABELS}).to_csv(index=False))
    return archive


def _abdelaal_source(tmp_path: Path, archive: Path, **extra) -> dict:
    return {
        "name": "toy",
        "format": "abdelaal_csv",
        "files": {"bench": _url(archive)},
        "data": "bench/Intra-dataset/Toy/Filtered_Toy_data.csv",
        "labels": "bench/Intra-dataset/Toy/Labels.csv",
        "obs": {"tissue": "pancreas", "assay": "inDrop"},
        **_common(tmp_path),
        **extra,
    }


def test_abdelaal_zip_standard_shape_and_lock(tmp_path):
    archive = _abdelaal_zip(tmp_path)
    a = load_source(
        "url", **_abdelaal_source(tmp_path, archive, expected={"cells": 6, "classes": 3})
    )
    _check_standard(a)
    assert list(a.obs_names) == CELLS
    assert list(a.var_names) == ["INS", "GCG", "CD19", "CD3E", "GCG-1"]
    np.testing.assert_array_equal(a.X.toarray(), COUNTS)
    assert list(a.obs["cell_type"].astype(str)) == LABELS
    assert _cl_ids(a) == {"B cell": "CL:0000236", "T cell": "CL:0000084", "alpha": "unknown"}
    assert set(a.obs["tissue"]) == {"pancreas"} and set(a.obs["batch"]) == {"toy"}
    assert a.uns["source"]["labels_not_cl_terms"] == ["alpha"]
    # the lock file now pins the archive's sha256
    entry = read_lock(tmp_path / "lock.yaml")[_url(archive)]
    assert len(entry["sha256"]) == 64 and entry["size"] == archive.stat().st_size
    assert a.uns["source"]["sha256"]["bench"] == entry["sha256"]


def test_expected_counts_checked(tmp_path):
    archive = _abdelaal_zip(tmp_path)
    with pytest.raises(InputError) as err:
        load_url_source(**_abdelaal_source(tmp_path, archive, expected={"cells": 7, "classes": 3}))
    msg = str(err.value)
    assert "dataset 'toy'" in msg and "expected 7 cells, got 6" in msg
    assert "datasets.toy.source.expected.cells" in msg
    with pytest.raises(InputError, match="expected 4 classes, got 3"):
        load_url_source(**_abdelaal_source(tmp_path, archive, expected={"classes": 4}))
    a = load_url_source(
        **_abdelaal_source(tmp_path, archive, expected={"cells": 7}, on_mismatch="warn")
    )
    assert a.n_obs == 6


def test_non_integer_counts_refused_or_rounded(tmp_path):
    archive = _abdelaal_zip(tmp_path, counts=COUNTS + 0.25 * (COUNTS > 0))
    with pytest.raises(InputError, match="not integer counts") as err:
        load_url_source(**_abdelaal_source(tmp_path, archive))
    assert "counts: round" in str(err.value)
    a = load_url_source(**_abdelaal_source(tmp_path, archive, counts="round"))
    np.testing.assert_array_equal(a.X.toarray(), np.rint(COUNTS + 0.25 * (COUNTS > 0)))


def test_unmapped_cl_fallback_then_preprocess_does_not_crash(tmp_path):
    from celltype_bench.io import read_h5ad
    from celltype_bench.steps import fetch_dataset, preprocess_dataset

    archive = _abdelaal_zip(tmp_path)
    raw, processed = tmp_path / "raw.h5ad", tmp_path / "processed.h5ad"
    source = {"kind": "url", **_abdelaal_source(tmp_path, archive, unmapped_cl="CL:0000003")}
    source["obs"] = {**source["obs"], "donor_id": "donorA"}
    fetch_dataset(source, str(raw))
    # label_map entries win over the fallback, CL-named labels map themselves
    preprocess_dataset(str(raw), str(processed), label_map={"alpha": "CL:0000171"}, min_genes=1)
    out = read_h5ad(processed)
    assert _cl_ids(out) == {"B cell": "CL:0000236", "T cell": "CL:0000084", "alpha": "CL:0000171"}


def test_missing_member_and_bad_reference(tmp_path):
    archive = _abdelaal_zip(tmp_path)
    with pytest.raises(InputError, match="no member 'Intra-dataset/Toy/Nope.csv'"):
        load_url_source(
            **_abdelaal_source(tmp_path, archive, data="bench/Intra-dataset/Toy/Nope.csv")
        )
    with pytest.raises(InputError, match="names no downloaded file"):
        load_url_source(**_abdelaal_source(tmp_path, archive, labels="other/Labels.csv"))
    with pytest.raises(InputError, match="unknown format"):
        load_url_source(**_abdelaal_source(tmp_path, archive, format="rds"))


def test_transposed_tsv_gz(tmp_path):
    """Genes-as-rows, tab-separated, gzipped (GEO style), labels joined on cell ids."""
    table = pd.DataFrame(COUNTS.T, index=GENES, columns=CELLS)
    path = tmp_path / "dge.txt.gz"
    with gzip.open(path, "wt") as fh:
        table.to_csv(fh, sep="\t")
    meta = tmp_path / "meta.tsv"
    pd.DataFrame({"ID": CELLS[::-1], "type": LABELS[::-1], "mouse": list("abcabc")}).to_csv(
        meta, sep="\t", index=False
    )
    a = load_url_source(
        name="geo",
        format="abdelaal_csv",
        files={"dge": _url(path), "meta": _url(meta)},
        data="dge",
        labels="meta",
        labels_id_column="ID",
        label_column="type",
        transpose=True,
        sep="\t",
        obs={"donor_id": {"from": "mouse"}},
        **_common(tmp_path),
    )
    _check_standard(a)
    assert list(a.obs["cell_type"].astype(str)) == LABELS
    assert list(a.obs["donor_id"].astype(str)) == list("cbacba")
    np.testing.assert_array_equal(a.X.toarray(), COUNTS)


def test_h5ad_layer_and_obs_columns(tmp_path):
    src = ad.AnnData(
        X=np.log1p(COUNTS).astype(np.float32),
        obs=pd.DataFrame(
            {"cell_type": LABELS, "donor": list("xxyyzz"), "region": ["LV"] * 6}, index=CELLS
        ),
        var=pd.DataFrame(index=["INS", "GCG", "CD19", "CD3E", "MT-CO1"]),
    )
    src.layers["counts"] = sp.csr_matrix(COUNTS.astype(np.float32))
    path = tmp_path / "atlas.h5ad"
    src.write_h5ad(path)
    a = load_url_source(
        name="atlas",
        format="h5ad",
        files={"atlas": _url(path)},
        data="atlas",
        layer="counts",
        obs={"donor_id": {"from": "donor"}, "tissue": {"from": "region"}, "assay": "10x 3' v2"},
        drop_labels=["T cell"],
        expected={"cells": 5, "classes": 2},
        **_common(tmp_path),
    )
    _check_standard(a)
    assert "cell3" not in a.obs_names
    assert set(a.obs["tissue"]) == {"LV"}
    with pytest.raises(InputError, match="not integer counts"):
        load_url_source(
            name="atlas",
            format="h5ad",
            files={"atlas": _url(path)},
            data="atlas",
            **_common(tmp_path),
        )


def _write_mtx(tmp_path: Path) -> dict:
    d = tmp_path / "tenx"
    d.mkdir()
    # genes x cells, plus one antibody feature that must be dropped
    full = np.vstack([COUNTS.T, np.arange(1, 7)[None, :]])
    coo = sp.coo_matrix(full)
    with gzip.open(d / "matrix.mtx.gz", "wt") as fh:
        fh.write("%%MatrixMarket matrix coordinate integer general\n%metadata\n")
        fh.write(f"{full.shape[0]} {full.shape[1]} {coo.nnz}\n")
        for r, c, v in zip(coo.row, coo.col, coo.data, strict=True):
            fh.write(f"{r + 1} {c + 1} {int(v)}\n")
    with gzip.open(d / "features.tsv.gz", "wt") as fh:
        for i, g in enumerate(GENES):
            fh.write(f"ENSG{i}\t{g}\tGene Expression\n")
        fh.write("CD4_TotalSeqB\tCD4\tAntibody Capture\n")
    with gzip.open(d / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(f"{c}-1" for c in CELLS) + "\n")
    ann = pd.DataFrame(
        {"cellName": [f"{c}-1" for c in CELLS[:5]], "celltype": LABELS[:5], "sampleID": "S1"}
    )
    ann.to_csv(d / "annotation.csv.gz", index=False, compression="gzip")
    return {
        k: _url(d / f)
        for k, f in [
            ("m", "matrix.mtx.gz"),
            ("f", "features.tsv.gz"),
            ("b", "barcodes.tsv.gz"),
            ("a", "annotation.csv.gz"),
        ]
    }


def test_10x_mtx_with_annotation(tmp_path):
    files = _write_mtx(tmp_path)
    a = load_url_source(
        name="covid",
        format="10x_mtx",
        files=files,
        matrix="m",
        features="f",
        barcodes="b",
        labels="a",
        labels_id_column="cellName",
        label_column="celltype",
        obs={"donor_id": {"from": "sampleID"}},
        expected={"cells": 5, "classes": 3},
        **_common(tmp_path),
    )
    _check_standard(a)
    assert list(a.var_names) == ["INS", "GCG", "CD19", "CD3E", "GCG-1"]  # antibody dropped
    assert "feature_id" in a.var
    np.testing.assert_array_equal(a.X.toarray(), COUNTS[:5])  # cell5 has no annotation
    assert set(a.obs["donor_id"]) == {"S1"}


def test_10x_mtx_truncated(tmp_path):
    files = _write_mtx(tmp_path)
    m = Path(files["m"].removeprefix("file://"))
    lines = gzip.open(m, "rt").read().splitlines()
    with gzip.open(m, "wt") as fh:
        fh.write("\n".join(lines[:-2]) + "\n")
    with pytest.raises(InputError, match="truncated"):
        load_url_source(
            name="x",
            format="10x_mtx",
            files=files,
            matrix="m",
            features="f",
            barcodes="b",
            labels="a",
            labels_id_column="cellName",
            **_common(tmp_path),
        )


@pytest.mark.parametrize("version", [2, 3])
def test_10x_h5(tmp_path, version):
    csc = sp.csc_matrix(COUNTS.T.astype(np.int32))  # genes x cells, CSC over cells
    path = tmp_path / f"v{version}.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix" if version == 3 else "GRCh38")
        g["data"], g["indices"], g["indptr"] = csc.data, csc.indices, csc.indptr
        g["shape"] = np.array(csc.shape)
        g["barcodes"] = np.array([c.encode() for c in CELLS])
        ids = np.array([f"ENSG{i}".encode() for i in range(len(GENES))])
        names = np.array([n.encode() for n in GENES])
        if version == 3:
            feat = g.create_group("features")
            feat["id"], feat["name"] = ids, names
            feat["feature_type"] = np.array([b"Gene Expression"] * len(GENES))
        else:
            g["genes"], g["gene_names"] = ids, names
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"x": LABELS}).to_csv(labels, index=False)
    a = load_url_source(
        name="h5",
        format="10x_h5",
        files={"h5": _url(path), "labels": _url(labels)},
        data="h5",
        labels="labels",
        **_common(tmp_path),
    )
    _check_standard(a)
    np.testing.assert_array_equal(a.X.toarray(), COUNTS)
    assert list(a.obs_names) == CELLS


def test_labels_row_count_mismatch(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("d.csv", pd.DataFrame(COUNTS, index=CELLS, columns=GENES).to_csv())
        zf.writestr("l.csv", "x\nalpha\n")
    with pytest.raises(InputError, match="1 labels for 6 cells"):
        load_url_source(
            name="bad",
            format="abdelaal_csv",
            files={"z": _url(archive)},
            data="z/d.csv",
            labels="z/l.csv",
            **_common(tmp_path),
        )


def _raw(path: Path, genes: list[str], labels: list[str], study: str) -> None:
    n = len(labels)
    rng = np.random.default_rng(len(study))
    X = sp.csr_matrix(rng.integers(0, 5, size=(n, len(genes))).astype(np.float32))
    obs = pd.DataFrame(
        {
            "cell_type": labels,
            "cell_type_ontology_term_id": [
                "CL:0000171" if lab.startswith("alpha") else "unknown" for lab in labels
            ],
            "donor_id": "d",
            "tissue": "pancreas",
            "assay": "x",
            "batch": study,
        },
        index=[f"c{i}" for i in range(n)],  # same ids in both parts
    )
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)


def test_combine_on_shared_genes(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _raw(raw / "baron.h5ad", ["A", "B", "C", "D"], ["alpha", "beta", "alpha"], "baron")
    _raw(raw / "seger.h5ad", ["D", "B", "E"], ["alpha cell", "beta cell"], "seger")
    a = load_source(
        "combine",
        parts=["baron", "seger"],
        raw_dir=str(raw),
        relabel={"alpha cell": "alpha", "beta cell": "beta"},
    )
    _check_standard(a)
    assert list(a.var_names) == ["B", "D"]
    assert list(a.obs_names) == ["baron:c0", "baron:c1", "baron:c2", "seger:c0", "seger:c1"]
    assert list(a.obs["study"].astype(str)) == ["baron"] * 3 + ["seger"] * 2
    assert list(a.obs["dataset_id"].astype(str)) == list(a.obs["study"].astype(str))
    assert set(a.obs["cell_type"].astype(str)) == {"alpha", "beta"}
    assert _cl_ids(a) == {"alpha": "CL:0000171", "beta": "unknown"}
    b = ad.read_h5ad(raw / "baron.h5ad")
    np.testing.assert_array_equal(a.X[:3].toarray(), b[:, ["B", "D"]].X.toarray())
    with pytest.raises(InputError, match="at least two distinct parts"):
        load_combined(parts=["baron"], raw_dir=str(raw))
    with pytest.raises(InputError, match="does not exist"):
        load_combined(parts=["baron", "nope"], raw_dir=str(raw))


def test_lock_file_header_kept(tmp_path):
    archive = _abdelaal_zip(tmp_path)
    lock = tmp_path / "lock.yaml"
    lock.write_text(yaml.safe_dump({"files": {_url(archive): {"sha256": None, "size": None}}}))
    load_url_source(**_abdelaal_source(tmp_path, archive))
    assert lock.read_text().startswith("#")
    assert read_lock(lock)[_url(archive)]["sha256"]
