"""Format adapters: downloaded files -> the standard raw shape (see :mod:`.sources`).

Formats (``format`` of a ``url`` source in the registry, config/paper.yaml):

``abdelaal_csv``
    The filtered datasets of Abdelaal et al. 2019 (Zenodo record 3357167): a dense CSV with
    cells as rows (first column cell ids, header = gene symbols) and a ``Labels.csv`` with one
    label per row (column ``x``, or ``label_column``). ``transpose: true`` reads genes-as-rows
    tables (tab-separated with ``sep: "\\t"``). Read in row chunks into a sparse matrix.
``h5ad``
    An AnnData file; counts from ``X``, a ``layer`` or ``raw`` (``use_raw: true``).
``10x_mtx``
    ``matrix.mtx(.gz)`` (genes x cells, MatrixMarket coordinate) with ``features.tsv(.gz)``
    (or ``genes.tsv``) and ``barcodes.tsv(.gz)``, streamed in chunks.
``10x_h5``
    Cell Ranger's HDF5 matrix (v3 ``/matrix`` group with ``features/``; v2 ``/<genome>`` group
    with ``genes``/``gene_names``).

File references: a source names its downloads in ``files`` (key -> URL) and points at data
with ``<key>`` (the downloaded file itself) or ``<key>/<member path>`` (a member of a
downloaded zip archive, read without extracting it). ``.gz`` files and members are
decompressed on the fly.

Labels come from the matrix file's own ``obs`` (``h5ad``) or from a ``labels`` table (CSV/TSV,
optionally gzipped) joined on ``labels_id_column`` (or by row order when it is omitted, as for
Abdelaal's ``Labels.csv``). ``obs`` fills the other standard columns: a plain value is a
constant, ``{from: COLUMN}`` copies a column of the labels table or of the source's obs.

Cell Ontology ids: an author label that is itself a CL id, label or synonym gets that id;
other labels get ``unmapped_cl`` when the registry gives one, else ``"unknown"`` (never an
empty string). Preprocessing then applies the dataset's ``label_map`` first, so a label_map
entry always wins; a dataset whose labels are neither CL terms nor in its label_map needs
``unmapped_cl`` or preprocessing stops with the list of unmapped labels.

After adaptation the cell and class counts are compared with ``expected`` (the paper's
Table 1); a difference raises :class:`InputError` naming dataset, field, expected and actual
(``on_mismatch: warn`` logs it instead, for sources known to differ from the paper's copy).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import logging
import os
import urllib.parse
import zipfile
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from ..labels import empty_values

log = logging.getLogger("celltype_bench")

FORMATS: tuple[str, ...] = ("abdelaal_csv", "h5ad", "10x_mtx", "10x_h5")
UNSUPPORTED_FORMATS: dict[str, str] = {
    "sce_rds": "a SingleCellExperiment saved by R (.rds), which Python cannot read without R; "
    "convert it once (R: zellkonverter::writeH5AD(readRDS(f), 'x.h5ad')) and register the h5ad "
    "with `format: h5ad` (a file:// URL works)",
    "geo_raw_tar": "GEO's per-sample RAW tar of count tables; build one 10x-style matrix or an "
    "h5ad from it and register that instead",
}
"""Formats named in the registry whose files have no adapter here, with the way forward."""
UNKNOWN = "unknown"
CHUNK_ROWS = 2000
MTX_CHUNK = 5_000_000
COUNT_TOLERANCE = 1e-6
_OBS_DEFAULTS = {"donor_id": UNKNOWN, "tissue": UNKNOWN, "assay": UNKNOWN}


# ---- file references ------------------------------------------------------------------------
def cache_name(url: str) -> str:
    """Cache file name of a URL: a short hash of the URL plus its base name."""
    base = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download"
    return f"{hashlib.sha1(url.encode()).hexdigest()[:10]}-{base}"


def split_ref(ref: str, files: Mapping[str, Any]) -> tuple[str, str | None]:
    """``'key/member/path'`` -> ``('key', 'member/path')``; ``'key'`` -> ``('key', None)``."""
    key, _, member = str(ref).partition("/")
    if key not in files:
        raise InputError(
            f"file reference '{ref}' names no downloaded file (have: {sorted(files)})",
            field="source",
            fix="start each path with a key of the source's 'files'",
        )
    return key, (member or None)


@contextlib.contextmanager
def open_ref(path: str | os.PathLike, member: str | None = None) -> Iterator[IO[bytes]]:
    """A binary stream of a file or of a zip member; ``.gz`` is decompressed on the fly."""
    path = Path(path)
    with contextlib.ExitStack() as stack:
        if member is None:
            fh: IO[bytes] = stack.enter_context(open(path, "rb"))
            name = path.name
        else:
            try:
                archive = stack.enter_context(zipfile.ZipFile(path))
            except zipfile.BadZipFile as exc:
                raise InputError(
                    f"not a zip archive ({exc})", file=str(path), fix="delete it and fetch again"
                ) from exc
            try:
                fh = stack.enter_context(archive.open(member))
            except KeyError as exc:
                names = archive.namelist()
                close = [n for n in names if Path(n).name == Path(member).name][:5]
                raise InputError(
                    f"the archive has no member '{member}'"
                    + (f" (same file name at: {close})" if close else ""),
                    file=str(path),
                    field="source",
                    fix="correct the member path in the dataset registry",
                ) from exc
            name = member
        if name.endswith(".gz"):
            fh = stack.enter_context(gzip.open(fh, "rb"))  # type: ignore[assignment]
        yield fh


# ---- readers -------------------------------------------------------------------------------
def read_dense_table(
    fh: IO[bytes],
    *,
    sep: str = ",",
    transpose: bool = False,
    chunk_rows: int = CHUNK_ROWS,
    where: str = "",
) -> tuple[sp.csr_matrix, list[str], list[str]]:
    """A dense table with row ids in the first column -> (CSR cells x genes, cells, genes).

    Rows are cells (``transpose=False``) or genes. Read ``chunk_rows`` rows at a time, so
    memory stays near the sparse result plus one dense chunk.
    """
    text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
    # the header is read here: pandas would rename duplicated gene symbols (GCG -> GCG.1)
    header = next(csv.reader([text.readline()], delimiter=sep), [])
    dtypes = defaultdict(lambda: np.float64, {0: object})
    reader = pd.read_csv(text, sep=sep, header=None, dtype=dtypes, chunksize=chunk_rows)
    blocks: list[sp.csr_matrix] = []
    rows: list[str] = []
    columns: list[str] | None = None
    try:
        for chunk in reader:
            if columns is None:
                # R's write.table omits the corner cell: then the header names every column
                columns = header if chunk.shape[1] == len(header) + 1 else header[1:]
                if len(columns) != chunk.shape[1] - 1:
                    raise ValueError(f"header has {len(header)} fields, rows have {chunk.shape[1]}")
            rows.extend(chunk.iloc[:, 0].astype(str).tolist())
            values = chunk.iloc[:, 1:].to_numpy(dtype=np.float64)
            values[np.isnan(values)] = 0.0
            blocks.append(sp.csr_matrix(values.astype(np.float32)))
    except (ValueError, pd.errors.ParserError) as exc:
        raise InputError(
            f"cannot parse the expression table ({exc})",
            file=where or None,
            fix="check the 'format', 'sep' and 'transpose' settings of the source",
        ) from exc
    if columns is None:
        raise InputError("the expression table is empty", file=where or None)
    X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(columns)))
    if transpose:
        return sp.csr_matrix(X.T), columns, rows
    return X, rows, columns


def read_table(fh: IO[bytes], name: str) -> pd.DataFrame:
    """A small CSV/TSV table (labels, annotations), all columns as strings."""
    sep = "\t" if any(s in name for s in (".tsv", ".txt", ".tab")) else ","
    return pd.read_csv(
        io.TextIOWrapper(fh, encoding="utf-8", newline=""),
        sep=sep,
        dtype=str,
        keep_default_na=False,
    )


def _read_lines(fh: IO[bytes]) -> list[list[str]]:
    return [
        line.rstrip("\r\n").split("\t")
        for line in io.TextIOWrapper(fh, encoding="utf-8")
        if line.strip()
    ]


def read_mtx(fh: IO[bytes], *, chunk: int = MTX_CHUNK, where: str = "") -> sp.csr_matrix:
    """A MatrixMarket coordinate file of genes x cells -> CSR cells x genes (chunked)."""
    text = io.TextIOWrapper(fh, encoding="ascii")
    header = text.readline()
    if not header.startswith("%%MatrixMarket matrix coordinate"):
        raise InputError(
            f"not a MatrixMarket coordinate matrix (header {header.strip()[:60]!r})",
            file=where or None,
            fix="point 'matrix' at the 10x matrix.mtx(.gz) file",
        )
    line = text.readline()
    while line.startswith("%"):
        line = text.readline()
    n_genes, n_cells, nnz = (int(v) for v in line.split())
    genes = np.empty(nnz, dtype=np.int32)
    cells = np.empty(nnz, dtype=np.int32)
    values = np.empty(nnz, dtype=np.float32)
    pos = 0
    for block in pd.read_csv(
        text,
        sep=r"\s+",
        header=None,
        names=["g", "c", "v"],
        dtype={"g": np.int64, "c": np.int64, "v": np.float64},
        chunksize=chunk,
    ):
        n = len(block)
        if pos + n > nnz:
            raise InputError(
                f"the matrix has more entries than its header's {nnz}", file=where or None
            )
        genes[pos : pos + n] = block["g"].to_numpy() - 1
        cells[pos : pos + n] = block["c"].to_numpy() - 1
        values[pos : pos + n] = block["v"].to_numpy()
        pos += n
        log.info("read %d / %d matrix entries", pos, nnz)
    if pos != nnz:
        raise InputError(
            f"the matrix is truncated: {pos} entries, header says {nnz}",
            file=where or None,
            fix="delete the download and fetch again",
        )
    X = sp.csr_matrix((values, (cells, genes)), shape=(n_cells, n_genes))
    X.sum_duplicates()
    return X


def read_10x_h5(
    path: str | os.PathLike,
) -> tuple[sp.csr_matrix, list[str], list[str], pd.DataFrame]:
    """Cell Ranger HDF5 (v3 ``matrix`` group or v2 genome group), gene-expression features.

    Returns (CSR cells x genes, barcodes, gene symbols, var with ``feature_id``).
    """
    import h5py

    def strings(ds: Any) -> list[str]:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in ds[()]]

    with h5py.File(path, "r") as f:
        if "matrix" in f:
            g = f["matrix"]
            feat = g["features"]
            ids, names = strings(feat["id"]), strings(feat["name"])
            ftype = strings(feat["feature_type"]) if "feature_type" in feat else None
        else:
            groups = [k for k in f if isinstance(f[k], h5py.Group)]
            if len(groups) != 1:
                raise InputError(
                    f"not a 10x HDF5 matrix (top-level groups {groups})",
                    file=str(path),
                    fix="use format h5ad for AnnData files",
                )
            g = f[groups[0]]
            ids, names, ftype = strings(g["genes"]), strings(g["gene_names"]), None
        n_genes, n_cells = (int(v) for v in g["shape"][()])
        X = sp.csr_matrix(
            (g["data"][()].astype(np.float32), g["indices"][()], g["indptr"][()]),
            shape=(n_cells, n_genes),
        )
        barcodes = strings(g["barcodes"])
    keep = np.ones(len(ids), dtype=bool)
    if ftype is not None:
        keep = np.asarray(ftype) == "Gene Expression"
    var = pd.DataFrame({"feature_id": np.asarray(ids)[keep]})
    return X[:, keep], barcodes, list(np.asarray(names)[keep]), var


# ---- assembling the standard shape ---------------------------------------------------------
def integer_counts(
    X: sp.csr_matrix, *, name: str, counts: str = "integer", where: str | None = None
) -> tuple[sp.csr_matrix, float]:
    """Check (``counts: integer``) or round (``counts: round``) the counts; returns max offset.

    ``round`` is for sources that publish corrected, non-integer UMI counts (e.g. Muraro's
    saturation-corrected transcript counts); the largest distance to an integer is recorded.
    """
    X = sp.csr_matrix(X, dtype=np.float32)
    data = X.data
    if data.size and (not np.isfinite(data).all() or data.min() < 0):
        raise InputError(
            f"dataset '{name}': the matrix has negative or non-finite values",
            file=where,
            field="X",
            fix="point the source at raw counts (layer / use_raw for h5ad)",
        )
    offset = float(np.abs(data - np.rint(data)).max()) if data.size else 0.0
    if offset > COUNT_TOLERANCE:
        if counts != "round":
            raise InputError(
                f"dataset '{name}': the matrix is not integer counts (a value is {offset:.3g} "
                "from the nearest integer)",
                file=where,
                field="counts",
                fix="point the source at raw counts, or set `counts: round` in the registry for "
                "sources that publish corrected (non-integer) UMI counts",
            )
        log.warning("dataset %s: rounding non-integer counts (max offset %.3g)", name, offset)
    X.data = np.rint(data).astype(np.float32)
    X.eliminate_zeros()
    return X, offset


def _obs_value(
    spec: Any, column: str, tables: Sequence[pd.DataFrame], n: int, name: str
) -> np.ndarray:
    if isinstance(spec, Mapping):
        src = spec.get("from")
        for table in tables:
            if src in table:
                return table[src].astype(str).to_numpy()
        raise InputError(
            f"dataset '{name}': obs.{column} takes column '{src}', which is not in the labels "
            f"table or the source's obs (columns: {sorted({c for t in tables for c in t})})",
            field=f"source.obs.{column}",
            fix="name an existing column",
        )
    return np.full(n, str(spec), dtype=object)


def ontology_ids(
    labels: Sequence[str], unmapped_cl: str | None
) -> tuple[dict[str, str], list[str]]:
    """Author label -> CL id when the label is itself a CL term, else ``unmapped_cl``/unknown.

    Also returns the labels that are no CL term (those given the fallback).
    """
    from ..ontology import load_ontology

    onto = load_ontology()
    fallback = unmapped_cl or UNKNOWN
    if unmapped_cl is not None:
        tid = onto.find(unmapped_cl)
        if tid is None:
            raise InputError(
                f"unmapped_cl '{unmapped_cl}' is no CL id or label of CL {onto.version}",
                field="source.unmapped_cl",
                fix="use a CL id such as CL:0000003 (native cell)",
            )
        fallback = tid
    out: dict[str, str] = {}
    unmapped: list[str] = []
    for label in labels:
        tid = onto.find(label)
        if tid is None or onto.is_obsolete(tid):
            tid = fallback
            unmapped.append(label)
        out[label] = tid
    return out, unmapped


def standardise(
    X: sp.csr_matrix,
    cells: Sequence[str],
    genes: Sequence[str],
    labels: Sequence[str],
    *,
    name: str,
    obs: Mapping[str, Any] | None = None,
    tables: Sequence[pd.DataFrame] = (),
    var: pd.DataFrame | None = None,
    drop_labels: Sequence[str] = (),
    counts: str = "integer",
    unmapped_cl: str | None = None,
    where: str | None = None,
) -> ad.AnnData:
    """Build the standard raw AnnData (CSR integer counts, standard obs, unique names)."""
    n = len(cells)
    if X.shape != (n, len(genes)) or len(labels) != n:
        raise InputError(
            f"dataset '{name}': {X.shape[0]} x {X.shape[1]} matrix, {n} cell ids, "
            f"{len(genes)} genes, {len(labels)} labels do not line up",
            file=where,
            field="labels",
            fix="check that the labels file belongs to the matrix (same cells, same order)",
        )
    X, offset = integer_counts(X, name=name, counts=counts, where=where)
    frame = pd.DataFrame(index=pd.RangeIndex(n))
    frame["cell_type"] = np.asarray(labels, dtype=object).astype(str)
    spec = {**_OBS_DEFAULTS, "batch": name, **dict(obs or {})}
    for column, value in spec.items():
        frame[column] = _obs_value(value, column, tables, n, name)
    keep = ~empty_values(frame["cell_type"])
    keep &= ~frame["cell_type"].isin([str(v) for v in drop_labels]).to_numpy()
    dropped = int((~keep).sum())
    if dropped:
        log.warning(
            "dataset %s: dropping %d cells with an empty label or one of %s",
            name,
            dropped,
            list(drop_labels),
        )
    for column in spec:
        bad = empty_values(frame[column])
        frame.loc[bad, column] = UNKNOWN
    frame = frame.loc[keep]
    obs_names = pd.Index(np.asarray(cells, dtype=object)[keep].astype(str))
    X = X[np.flatnonzero(keep)]
    frame.index = obs_names
    var_frame = var.copy() if var is not None else pd.DataFrame(index=pd.Index(genes, dtype=object))
    var_frame.index = pd.Index([str(g) for g in genes])
    for axis, frame_ in (("cell ids", frame), ("gene names", var_frame)):
        if not frame_.index.is_unique:
            log.info("dataset %s: duplicated %s made unique (suffix -1, -2, ...)", name, axis)
            frame_.index = ad.utils.make_index_unique(frame_.index.astype(str))
    adata = ad.AnnData(X=X, obs=frame, var=var_frame)
    labels_present = sorted(adata.obs["cell_type"].unique())
    cl_of, unmapped = ontology_ids(labels_present, unmapped_cl)
    adata.obs["cell_type_ontology_term_id"] = adata.obs["cell_type"].map(cl_of)
    for column in adata.obs:
        adata.obs[column] = adata.obs[column].astype(str).astype("category")
    adata.uns["adapter"] = {
        "max_count_offset": offset,
        "dropped_cells": dropped,
        "labels_not_cl_terms": unmapped,
    }
    return adata


def check_expected(
    adata: ad.AnnData,
    name: str,
    expected: Mapping[str, Any] | None,
    on_mismatch: str = "error",
) -> None:
    """Compare cells / classes with the registry's ``expected``; raise (or warn) on difference."""
    if not expected:
        return
    actual = {"cells": int(adata.n_obs), "classes": int(adata.obs["cell_type"].nunique())}
    for field in ("cells", "classes"):
        want = expected.get(field)
        if want is None or int(want) == actual[field]:
            continue
        message = (
            f"dataset '{name}': expected {int(want)} {field}, got {actual[field]} "
            "(the paper's Table 1 count)"
        )
        if on_mismatch == "warn":
            log.warning("%s; continuing (on_mismatch: warn)", message)
            continue
        raise InputError(
            message,
            field=f"datasets.{name}.source.expected.{field}",
            fix="check the source URL / file paths and the label column; if the source is known "
            "to differ from the paper's copy, set `on_mismatch: warn` in the registry",
        )


# ---- the 'url' source ----------------------------------------------------------------------
def load_url_source(
    *,
    name: str,
    format: str,  # noqa: A002 (the registry's word)
    files: Mapping[str, str],
    data: str | None = None,
    labels: str | None = None,
    matrix: str | None = None,
    features: str | None = None,
    barcodes: str | None = None,
    label_column: str | None = None,
    labels_id_column: str | None = None,
    obs: Mapping[str, Any] | None = None,
    drop_labels: Sequence[str] = (),
    expected: Mapping[str, Any] | None = None,
    on_mismatch: str = "error",
    counts: str = "integer",
    unmapped_cl: str | None = None,
    transpose: bool = False,
    sep: str = ",",
    layer: str | None = None,
    use_raw: bool = False,
    lock: str | None = "config/paper.lock.yaml",
    cache_dir: str = "data/downloads",
    retries: int = 5,
    licence: str | None = None,
    citation: str | None = None,
    description: str | None = None,
) -> ad.AnnData:
    """Download (verified, cached) the files of a registry entry and adapt them.

    ``licence``, ``citation`` and ``description`` are recorded in ``uns['source']``.
    """
    from .download import fetch_locked

    if format in UNSUPPORTED_FORMATS:
        raise InputError(
            f"dataset '{name}': format '{format}' has no adapter: the source is "
            + UNSUPPORTED_FORMATS[format],
            field=f"datasets.{name}.source.format",
            fix="convert the file as described and point the registry entry at the result",
        )
    if format not in FORMATS:
        raise InputError(
            f"dataset '{name}': unknown format '{format}'",
            field="source.format",
            fix=f"use one of {list(FORMATS)}",
        )
    if on_mismatch not in ("error", "warn") or counts not in ("integer", "round"):
        raise InputError(
            f"dataset '{name}': on_mismatch must be error|warn and counts integer|round",
            field="source",
        )
    if not files:
        raise InputError(f"dataset '{name}' lists no files", field="source.files")
    local: dict[str, Path] = {}
    checksums: dict[str, str] = {}
    for key, url in files.items():
        dest = Path(cache_dir) / cache_name(str(url))
        got = fetch_locked(str(url), dest, lock, retries=retries)
        local[key] = got.path
        checksums[str(key)] = got.sha256

    def ref(value: str | None, what: str) -> tuple[Path, str | None, str]:
        if not value:
            raise InputError(
                f"dataset '{name}' ({format}) needs '{what}'",
                field=f"source.{what}",
                fix=f"give the file reference of the {what} (<files key>[/<zip member>])",
            )
        key, member = split_ref(value, files)
        return local[key], member, f"{files[key]}" + (f" [{member}]" if member else "")

    tables: list[pd.DataFrame] = []
    var = None
    if format == "abdelaal_csv":
        path, member, where = ref(data, "data")
        log.info("dataset %s: reading %s", name, where)
        with open_ref(path, member) as fh:
            X, cells, genes = read_dense_table(fh, sep=sep, transpose=transpose, where=where)
        src_obs = pd.DataFrame(index=pd.Index(cells))
    elif format == "h5ad":
        from ..io import read_h5ad

        path, member, where = ref(data, "data")
        if member is not None:
            raise InputError(
                f"dataset '{name}': h5ad files cannot be read from inside an archive",
                field="source.data",
            )
        src = read_h5ad(path)
        if use_raw:
            if src.raw is None:
                raise InputError(f"dataset '{name}': no raw in {where}", field="source.use_raw")
            matrix_in, genes = src.raw.X, list(src.raw.var_names)
        elif layer:
            if layer not in src.layers:
                raise InputError(
                    f"dataset '{name}': no layer '{layer}' (layers: {list(src.layers)})",
                    file=where,
                    field="source.layer",
                )
            matrix_in, genes = src.layers[layer], list(src.var_names)
        else:
            matrix_in, genes = src.X, list(src.var_names)
        X = sp.csr_matrix(matrix_in, dtype=np.float32)
        cells = list(src.obs_names)
        src_obs = src.obs.reset_index(drop=True)
        if not use_raw:
            var = src.var.copy()
    elif format == "10x_mtx":
        mpath, mmember, where = ref(matrix, "matrix")
        log.info("dataset %s: reading %s", name, where)
        with open_ref(mpath, mmember) as fh:
            X = read_mtx(fh, where=where)
        fpath, fmember, _ = ref(features, "features")
        with open_ref(fpath, fmember) as fh:
            feat = _read_lines(fh)
        bpath, bmember, _ = ref(barcodes, "barcodes")
        with open_ref(bpath, bmember) as fh:
            cells = [row[0] for row in _read_lines(fh)]
        genes = [row[1] if len(row) > 1 else row[0] for row in feat]
        var = pd.DataFrame({"feature_id": [row[0] for row in feat]})
        if X.shape != (len(cells), len(genes)):
            raise InputError(
                f"dataset '{name}': matrix is {X.shape[1]} genes x {X.shape[0]} cells but "
                f"there are {len(genes)} features and {len(cells)} barcodes",
                file=where,
                fix="the three files must come from the same 10x output",
            )
        if feat and len(feat[0]) > 2:
            keep = np.array([row[2] == "Gene Expression" for row in feat])
            X, genes = X[:, keep], list(np.asarray(genes)[keep])
            var = var.loc[keep].reset_index(drop=True)
        src_obs = pd.DataFrame(index=pd.Index(cells))
    else:  # 10x_h5
        path, member, where = ref(data, "data")
        X, cells, genes, var = read_10x_h5(path)
        src_obs = pd.DataFrame(index=pd.Index(cells))

    if labels:
        lpath, lmember, lwhere = ref(labels, "labels")
        with open_ref(lpath, lmember) as fh:
            table = read_table(fh, lmember or str(lpath))
        if labels_id_column:
            if labels_id_column not in table:
                raise InputError(
                    f"dataset '{name}': no column '{labels_id_column}' in the labels table "
                    f"(columns: {list(table.columns)})",
                    file=lwhere,
                    field="source.labels_id_column",
                )
            table = table.drop_duplicates(labels_id_column).set_index(labels_id_column)
            table = table.reindex(pd.Index(cells).astype(str))
            missing = int(table.isna().all(axis=1).sum())
            if missing:
                log.warning("dataset %s: %d cells have no row in the labels table", name, missing)
            table = table.fillna("").reset_index(drop=True)
        elif len(table) != len(cells):
            raise InputError(
                f"dataset '{name}': {len(table)} labels for {len(cells)} cells",
                file=lwhere,
                field="source.labels",
                fix="the labels file must have one row per cell, in the matrix's order "
                "(or set labels_id_column to join on cell ids)",
            )
        tables.append(table)
    tables.append(src_obs)
    column = label_column or (tables[0].columns[0] if labels else "cell_type")
    if not any(column in t for t in tables):
        raise InputError(
            f"dataset '{name}': no label column '{column}' "
            f"(columns: {sorted({c for t in tables for c in t})})",
            field="source.label_column",
            fix="name the column holding the author cell-type labels",
        )
    label_values = next(t for t in tables if column in t)[column].astype(str).to_numpy()
    adata = standardise(
        X,
        cells,
        genes,
        label_values,
        name=name,
        obs=obs,
        tables=tables,
        var=var,
        drop_labels=drop_labels,
        counts=counts,
        unmapped_cl=unmapped_cl,
        where=str(data or matrix),
    )
    check_expected(adata, name, expected, on_mismatch)
    adapter = adata.uns.pop("adapter")
    adata.uns["source"] = {
        "kind": "url",
        "name": name,
        "format": format,
        "files": dict(files),
        "sha256": checksums,
        "licence": licence or "",
        "citation": citation or "",
        "description": description or "",
        **adapter,
    }
    log.info(
        "dataset %s: %d cells x %d genes, %d classes",
        name,
        adata.n_obs,
        adata.n_vars,
        adata.obs["cell_type"].nunique(),
    )
    return adata


# ---- the 'combine' source ------------------------------------------------------------------
def load_combined(
    *,
    parts: Sequence[str],
    raw_dir: str = "data/raw",
    relabel: Mapping[str, str] | None = None,
    description: str | None = None,
) -> ad.AnnData:
    """Concatenate the raw files of ``parts`` on the intersection of their genes.

    obs ``study`` and ``dataset_id`` (kept by preprocessing) name the part; ``batch`` is the
    part too; cell ids become ``<part>:<cell id>``. ``relabel`` harmonises author labels across
    studies (e.g. ``{'alpha cell': 'alpha'}``); each label's CL id is the most frequent one
    the parts gave it.
    """
    from ..io import read_h5ad
    from .sources import STANDARD_OBS

    parts = [str(p) for p in parts]
    if len(parts) < 2 or len(set(parts)) != len(parts):
        raise InputError(
            f"a combined dataset needs at least two distinct parts, got {parts}",
            field="source.parts",
            fix="list the datasets to combine",
        )
    adatas = []
    for part in parts:
        a = read_h5ad(Path(raw_dir) / f"{part}.h5ad")
        a.var_names_make_unique()
        adatas.append(a)
    common = set(adatas[0].var_names)
    for a in adatas[1:]:
        common &= set(a.var_names)
    genes = [g for g in adatas[0].var_names if g in common]
    if not genes:
        raise InputError(
            f"the parts {parts} share no gene names",
            field="source.parts",
            fix="combine datasets of the same organism with gene symbols as var names",
        )
    pieces = []
    for part, a in zip(parts, adatas, strict=True):
        sub = a[:, genes]
        obs = pd.DataFrame(
            {c: sub.obs[c].astype(str).to_numpy() for c in STANDARD_OBS},
            index=pd.Index([f"{part}:{c}" for c in sub.obs_names]),
        )
        obs["batch"] = part
        obs["study"] = part
        obs["dataset_id"] = part
        pieces.append(
            ad.AnnData(
                X=sp.csr_matrix(sub.X, dtype=np.float32), obs=obs, var=pd.DataFrame(index=genes)
            )
        )
        log.info("part %s: %d cells, %d of %d genes shared", part, a.n_obs, len(genes), a.n_vars)
    out = ad.concat(pieces, join="inner", merge="first")
    if relabel:
        out.obs["cell_type"] = out.obs["cell_type"].astype(str).replace(dict(relabel))
    pairs = out.obs[["cell_type", "cell_type_ontology_term_id"]].astype(str)
    cl_of = (
        pairs[pairs["cell_type_ontology_term_id"] != UNKNOWN]
        .groupby("cell_type")["cell_type_ontology_term_id"]
        .agg(lambda s: s.value_counts().index[0])
        .to_dict()
    )
    out.obs["cell_type_ontology_term_id"] = (
        out.obs["cell_type"].astype(str).map(cl_of).fillna(UNKNOWN)
    )
    for column in out.obs:
        out.obs[column] = out.obs[column].astype(str).astype("category")
    out.uns["source"] = {
        "kind": "combine",
        "parts": parts,
        "n_genes_shared": len(genes),
        "relabel": dict(relabel or {}),
        "description": description or "",
    }
    return out
