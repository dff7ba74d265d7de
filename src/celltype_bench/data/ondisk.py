"""Out-of-core training data: a chunked on-disk CSR matrix and a block-shuffled batch loader.

Layout. The matrix is stored as anndata stores a CSR ``X`` (encoding ``csr_matrix`` 0.1.0:
arrays ``data``, ``indices``, ``indptr`` and a ``shape`` attribute) in an HDF5 file (``.h5``,
``.h5ad``) or a zarr store (a ``.zarr`` directory), with ``obs`` / ``var`` written by anndata,
so a file written here is also an h5ad (``anndata.read_h5ad`` reads it) and the processed
h5ad files of the workflow can be read in place (their ``X`` is CSR). :class:`OnDiskWriter`
appends CSR row chunks (never the whole matrix in memory), writes under a temporary name and
renames at the end.

Reading. :class:`OnDiskCSR` keeps only ``indptr`` in memory (8 bytes a cell); ``read_rows``
reads any rows (sorted, then coalesced into contiguous ranges: one read per range and array),
``read_block`` one contiguous range of rows. ``X[rows]`` is a lazy row subset (a view).

Block-shuffled loader (:meth:`OnDiskCSR.block_minibatches`, what ``training.fit_torch`` uses
for on-disk data). The rows are cut into blocks of ``block_cells`` consecutive cells; every
epoch the blocks are put in a random order and grouped ``buffer_blocks`` at a time into
buffers. A buffer's blocks are read with one contiguous read each (adjacent blocks merged),
and its cells are served in a random order, so reads stay sequential while each batch mixes
cells of ``buffer_blocks`` blocks spread over the file (scTab's loader reads chunked parquet
the same way). The epoch's cells are any index array: a permutation (every cell once) or the
draws of a weighted sampler (scBalance: with replacement, cell probability 1 / class size);
the draws are grouped by buffer, keeping their relative (random) order, so the sampler's
class mix is kept exactly and every buffer is read once per epoch. With a single buffer
(``n_cells <= block_cells * buffer_blocks``) the cells come in exactly the sampler's order, so
the batches equal those of the in-memory loop (``training.iterate_minibatches``). Memory:
one buffer (about ``buffer_mb``) plus one dense chunk whatever the number of cells, plus
about 40 bytes a cell (``indptr``, the epoch's index arrays, labels). A batch mixes cells of
one buffer only (two where it straddles a boundary): when the file is sorted by label,
batches are as mixed as the buffer's blocks are, so prefer many small blocks per buffer
(tests/test_ondisk.py: on a class-sorted file 20 blocks a buffer match in-memory macro F1, 4
lose up to 0.2).

Memory budget (:func:`open_training_matrix`, :func:`open_run_data`): when loading a processed
h5ad (``X`` plus its layers) would take more than ``budget_mb``, the train step opens ``X`` on
disk instead and methods that support it (``Method.supports_ondisk``: linear, scbalance, sctab, mlp) train
and predict from disk.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..errors import InputError
from ..training import CHUNK_BYTES, chunk_cells

LOGGER_NAME = "celltype_bench"

BLOCK_CELLS = 1024
"""Default cells per block (one contiguous read; about 3 MiB at 400 stored values a cell)."""
BUFFER_MB = 128.0
"""Default size of the shuffle buffer (blocks read together, then served in random order)."""
MAX_GAP_ROWS = 64
"""``read_rows`` reads two wanted rows with one read when fewer rows than this lie between."""
CHUNK_ELEMS = 2**20
"""Chunk length (elements) of the on-disk ``data`` / ``indices`` arrays (4 MiB at float32)."""
CSR_ENCODING = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0"}
_ANNDATA_ENCODING = {"encoding-type": "anndata", "encoding-version": "0.1.0"}
_H5_CACHE_BYTES = 8 * 2**20


def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr"


def _fix_for(path: Path) -> str:
    return (
        f"rewrite it with celltype_bench.data.ondisk.write_ondisk (delete {path} first), or "
        "rerun the rule that wrote it"
    )


# ---------------------------------------------------------------------------- writing
class OnDiskWriter:
    """Append CSR row chunks to an on-disk CSR matrix; ``close`` makes it appear atomically.

    ``path`` ending in ``.zarr`` writes a zarr store, anything else an HDF5 file. Rows are
    appended with :meth:`append` (CSR or anything ``scipy.sparse.csr_matrix`` accepts, with
    ``n_vars`` columns); only ``indptr`` (8 bytes a cell) is kept in memory. ``close(obs,
    var)`` writes ``indptr``, the encoding attributes and ``obs`` / ``var`` (anndata's
    encoding; defaults: cell ids ``cell_0``... and gene ids ``gene_0``...), then renames the
    temporary file to ``path``. Used as a context manager, an exception removes the temporary
    file and leaves ``path`` untouched. ``compression``: none by default (fastest reads); an
    HDF5 filter name (``'gzip'``, ``'lzf'``) for HDF5, any value selects zarr's default
    compressor for zarr. ``chunk_elems``: elements per on-disk chunk of data / indices.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n_vars: int,
        *,
        dtype: Any = np.float32,
        chunk_elems: int = CHUNK_ELEMS,
        compression: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.n_vars = int(n_vars)
        if self.n_vars < 1:
            raise InputError(f"n_vars must be >= 1, got {n_vars}", field="n_vars")
        self.dtype = np.dtype(dtype)
        self.index_dtype = np.dtype(np.int32 if self.n_vars < 2**31 else np.int64)
        self.chunk_elems = max(1, int(chunk_elems))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        _remove(self.tmp)
        self._ptr: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.nnz = 0
        self.n_obs = 0
        self._closed = False
        if _is_zarr(self.path):
            import zarr

            self._root = zarr.open_group(self.tmp, mode="w")
            grp = self._root.create_group("X")
            comp = {} if compression else {"compressors": None}
            self._data = grp.create_array(
                "data", shape=(0,), chunks=(self.chunk_elems,), dtype=self.dtype, **comp
            )
            self._indices = grp.create_array(
                "indices", shape=(0,), chunks=(self.chunk_elems,), dtype=self.index_dtype, **comp
            )
        else:
            import h5py

            self._root = h5py.File(self.tmp, "w")
            grp = self._root.create_group("X")
            kw: dict[str, Any] = {"chunks": (self.chunk_elems,), "maxshape": (None,)}
            if compression:
                kw["compression"] = compression
            self._data = grp.create_dataset("data", shape=(0,), dtype=self.dtype, **kw)
            self._indices = grp.create_dataset("indices", shape=(0,), dtype=self.index_dtype, **kw)
        self._grp = grp

    def append(self, rows: Any) -> None:
        """Append the rows of a CSR chunk (same number of columns as ``n_vars``)."""
        if self._closed:
            raise InputError("the writer is closed", file=str(self.path))
        M = rows if isinstance(rows, sp.csr_matrix | sp.csr_array) else sp.csr_matrix(rows)
        if M.shape[1] != self.n_vars:
            raise InputError(
                f"a chunk has {M.shape[1]} columns, the matrix has {self.n_vars}",
                file=str(self.path),
                field="n_vars",
                fix="append chunks of the same genes",
            )
        if not M.has_sorted_indices:
            M = M.sorted_indices()
        lo, hi = int(M.indptr[0]), int(M.indptr[-1])
        data = np.asarray(M.data[lo:hi], dtype=self.dtype)
        indices = np.asarray(M.indices[lo:hi], dtype=self.index_dtype)
        k = len(data)
        if k and _is_zarr(self.path):
            self._data.append(data)
            self._indices.append(indices)
        elif k:
            self._data.resize((self.nnz + k,))
            self._indices.resize((self.nnz + k,))
            self._data[self.nnz : self.nnz + k] = data
            self._indices[self.nnz : self.nnz + k] = indices
        ptr = np.asarray(M.indptr[1:], dtype=np.int64) - lo + self.nnz
        self._ptr.append(ptr)
        self.nnz += k
        self.n_obs += M.shape[0]

    def close(self, obs: pd.DataFrame | None = None, var: pd.DataFrame | None = None) -> Path:
        """Finish the file (indptr, attributes, obs / var) and rename it to ``path``."""
        if self._closed:
            return self.path
        from anndata.io import write_elem

        indptr = np.concatenate(self._ptr)
        self._ptr = []
        if obs is None:
            obs = pd.DataFrame(index=pd.Index([f"cell_{i}" for i in range(self.n_obs)]))
        if var is None:
            var = pd.DataFrame(index=pd.Index([f"gene_{j}" for j in range(self.n_vars)]))
        if len(obs) != self.n_obs or len(var) != self.n_vars:
            self.abort()
            raise InputError(
                f"obs has {len(obs)} rows and var {len(var)} for a matrix of "
                f"{self.n_obs} x {self.n_vars}",
                file=str(self.path),
                fix="pass one obs row per written cell and one var row per gene",
            )
        ptr_dtype = np.int32 if self.nnz < 2**31 else np.int64
        if _is_zarr(self.path):
            arr = self._grp.create_array(
                "indptr", shape=indptr.shape, dtype=ptr_dtype, chunks=(self.chunk_elems,)
            )
            arr[:] = indptr.astype(ptr_dtype)
        else:
            self._grp.create_dataset(
                "indptr", data=indptr.astype(ptr_dtype), chunks=(min(len(indptr), 2**20),)
            )
        self._grp.attrs.update({**CSR_ENCODING, "shape": [self.n_obs, self.n_vars]})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*autosharding", category=UserWarning)
            write_elem(self._root, "obs", obs)
            write_elem(self._root, "var", var)
            for name in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
                write_elem(self._root, name, {})
        self._root.attrs.update(_ANNDATA_ENCODING)
        if not _is_zarr(self.path):
            self._root.flush()
            self._root.close()
        self._closed = True
        _remove(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (``path`` is left as it was)."""
        if not self._closed:
            if not _is_zarr(self.path):
                try:
                    self._root.close()
                except Exception:  # pragma: no cover - already closed
                    pass
            self._closed = True
        _remove(self.tmp)

    def __enter__(self) -> OnDiskWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def _remove(path: Path) -> None:
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_ondisk(
    X: Any,
    path: str | os.PathLike,
    *,
    n_vars: int | None = None,
    obs: pd.DataFrame | None = None,
    var: pd.DataFrame | None = None,
    chunk_rows: int = 10_000,
    **writer_kw: Any,
) -> Path:
    """Write a matrix to the on-disk CSR layout, ``chunk_rows`` rows at a time.

    ``X``: an AnnData (its ``X``, ``obs`` and ``var``; a backed AnnData is read chunk by
    chunk), a scipy sparse matrix or dense array, or an iterable of CSR row chunks (then
    ``n_vars`` is required). Returns ``path``.
    """
    if hasattr(X, "obs") and hasattr(X, "X"):
        obs = X.obs if obs is None else obs
        var = X.var if var is None else var
        X = X.X
    if hasattr(X, "shape") and not isinstance(X, Iterator):
        n_rows, n_vars = int(X.shape[0]), int(X.shape[1])

        def chunks() -> Iterator[Any]:
            for r0 in range(0, n_rows, chunk_rows):
                part = X[r0 : min(r0 + chunk_rows, n_rows)]
                yield part if sp.issparse(part) else sp.csr_matrix(np.asarray(part))

        source: Iterable[Any] = chunks()
    else:
        if n_vars is None:
            raise InputError(
                "n_vars is needed to write an iterable of chunks",
                field="n_vars",
                fix="pass n_vars=<number of genes>",
            )
        source = X
    with OnDiskWriter(path, int(n_vars), **writer_kw) as w:
        for part in source:
            w.append(part)
        return w.close(obs=obs, var=var)


# ---------------------------------------------------------------------------- reading
@dataclass
class ReadStats:
    """Reads made from one file (shared by its views): calls, rows and stored values."""

    reads: int = 0
    rows: int = 0
    nnz: int = 0
    log: list[tuple[int, int]] | None = None
    """(first row, stop row) of every read when recording (``record_reads=True``)."""

    def reset(self, record: bool | None = None) -> None:
        self.reads = self.rows = self.nnz = 0
        if record is not None:
            self.log = [] if record else None
        elif self.log is not None:
            self.log = []


@dataclass
class _Store:
    path: Path
    handle: Any
    data: Any
    indices: Any
    indptr: np.ndarray
    shape: tuple[int, int]
    is_h5: bool
    stats: ReadStats = field(default_factory=ReadStats)

    def read_into(self, arr: Any, p0: int, p1: int, out: np.ndarray) -> None:
        """Stored elements ``p0:p1`` of ``arr`` into ``out`` (same length)."""
        if p1 <= p0:
            return
        if self.is_h5 and arr.dtype == out.dtype:
            arr.read_direct(out, np.s_[p0:p1], np.s_[0 : p1 - p0])
        else:
            out[:] = arr[p0:p1]


def _open_store(path: Path, group: str) -> _Store:
    if not path.exists():
        raise InputError("file does not exist", file=str(path), fix="check the path")
    try:
        if _is_zarr(path):
            import zarr

            handle = zarr.open_group(path, mode="r")
            is_h5 = False
        else:
            import h5py

            handle = h5py.File(path, "r", rdcc_nbytes=_H5_CACHE_BYTES)
            is_h5 = True
        grp = handle[group]
        attrs = dict(grp.attrs)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(
            f"cannot open the on-disk matrix '{group}' ({type(exc).__name__}: {exc})",
            file=str(path),
            fix=_fix_for(path),
        ) from exc
    enc = attrs.get("encoding-type")
    if enc != "csr_matrix":
        if is_h5:
            handle.close()
        what = "a dense array" if enc in (None, "array") else f"'{enc}'"
        raise InputError(
            f"'{group}' is stored as {what}, not as a CSR matrix, so it cannot be read by rows",
            file=str(path),
            field=group,
            fix="store X as CSR (the preprocess step does; or convert with "
            "celltype_bench.data.ondisk.write_ondisk)",
        )
    shape = tuple(int(s) for s in attrs["shape"])
    indptr = np.asarray(grp["indptr"][:], dtype=np.int64)
    if len(indptr) != shape[0] + 1 or indptr[-1] != grp["data"].shape[0]:
        raise InputError(
            f"'{group}' is inconsistent: indptr has {len(indptr)} entries for {shape[0]} rows, "
            f"ends at {int(indptr[-1])} for {grp['data'].shape[0]} stored values",
            file=str(path),
            fix=_fix_for(path),
        )
    return _Store(path, handle, grp["data"], grp["indices"], indptr, shape, is_h5)


def _ranges(rows: np.ndarray, max_gap: int, cuts: np.ndarray | None = None) -> np.ndarray:
    """Sorted unique rows -> (k, 3) array: [first, stop) of each read and its end in ``rows``.

    Rows less than ``max_gap`` apart share a read; a read also ends before each position in
    ``cuts`` (indices into ``rows``).
    """
    if len(rows) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    cut = np.flatnonzero(np.diff(rows) > max_gap + 1) + 1
    if cuts is not None and len(cuts):
        cut = np.union1d(cut, cuts[(cuts > 0) & (cuts < len(rows))])
    starts = np.concatenate([[0], cut])
    stops = np.concatenate([cut, [len(rows)]])
    return np.stack([rows[starts], rows[stops - 1] + 1, stops], axis=1)


class OnDiskCSR:
    """A CSR matrix on disk (HDF5 or zarr), read by rows; duck-types what training needs.

    - ``shape``, ``nnz``, ``dtype`` (float32: values are returned as float32);
    - ``read_rows(rows)`` -> CSR of those rows in that order (repeats allowed);
    - ``read_block(start, stop)`` -> CSR of rows ``start:stop`` (one read per array);
    - ``X[rows]`` (increasing row indices, a slice or a boolean mask) -> a lazy row subset;
    - ``block_minibatches(...)``: the block-shuffled training batches (module docstring);
    - ``stats``: reads made (calls, rows, stored values; the ranges with ``record_reads``).

    ``block_cells`` cells form a block; ``buffer_blocks`` blocks are shuffled together, by
    default as many as fit in ``buffer_mb`` (at least 2). Open with :func:`open_ondisk`;
    ``close()`` (or ``with``) closes the file for this matrix and all its views.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        group: str = "X",
        *,
        block_cells: int = BLOCK_CELLS,
        buffer_mb: float = BUFFER_MB,
        buffer_blocks: int | None = None,
        record_reads: bool = False,
        _store: _Store | None = None,
        _rows: np.ndarray | None = None,
    ) -> None:
        if _store is None:
            if path is None:
                raise InputError("OnDiskCSR needs a path", field="path")
            _store = _open_store(Path(path), group)
        self._store = _store
        self._rows = _rows
        if record_reads:
            _store.stats.reset(record=True)
        n = _store.shape[0] if _rows is None else len(_rows)
        self.shape: tuple[int, int] = (int(n), int(_store.shape[1]))
        self.dtype = np.dtype(np.float32)
        self.block_cells = max(1, int(block_cells))
        self.buffer_mb = float(buffer_mb)
        if buffer_blocks is None:
            block_bytes = max(1.0, self.row_bytes * self.block_cells)
            buffer_blocks = int(self.buffer_mb * 2**20 // block_bytes)
        self.buffer_blocks = max(2, int(buffer_blocks))

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def stats(self) -> ReadStats:
        return self._store.stats

    @property
    def nnz(self) -> int:
        ip = self._store.indptr
        if self._rows is None:
            return int(ip[-1])
        return int((ip[self._rows + 1] - ip[self._rows]).sum())

    @property
    def row_bytes(self) -> float:
        """Mean bytes of one row in memory (float32 values, int32 indices, its indptr entry)."""
        n = max(1, self._store.shape[0])
        return float(self._store.indptr[-1]) / n * 8.0 + 8.0

    @property
    def n_blocks(self) -> int:
        return -(-self.shape[0] // self.block_cells)

    def __repr__(self) -> str:
        view = "" if self._rows is None else ", view"
        return (
            f"OnDiskCSR({str(self.path)!r}, shape={self.shape}, block_cells={self.block_cells}, "
            f"buffer_blocks={self.buffer_blocks}{view})"
        )

    def close(self) -> None:
        """Close the file (of this matrix and every view of it)."""
        if self._store.is_h5:
            try:
                self._store.handle.close()
            except Exception:  # pragma: no cover - already closed
                pass

    def __enter__(self) -> OnDiskCSR:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def with_loader(
        self, *, block_cells: int | None = None, buffer_mb: float | None = None, **kw: Any
    ) -> OnDiskCSR:
        """The same rows with other loader settings (``block_cells``, ``buffer_mb``/_blocks)."""
        return OnDiskCSR(
            block_cells=self.block_cells if block_cells is None else block_cells,
            buffer_mb=self.buffer_mb if buffer_mb is None else buffer_mb,
            _store=self._store,
            _rows=self._rows,
            **kw,
        )

    # ------------------------------------------------------------------ subsets
    def _positions(self, rows: Any) -> np.ndarray:
        n = self.shape[0]
        if isinstance(rows, slice):
            return np.arange(*rows.indices(n), dtype=np.int64)
        arr = np.asarray(rows)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise InputError(f"a boolean row mask needs {n} entries, got {arr.shape}")
            return np.flatnonzero(arr).astype(np.int64)
        arr = arr.astype(np.int64, copy=False).ravel()
        if len(arr) and (arr.min() < -n or arr.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        return np.where(arr < 0, arr + n, arr)

    def _base(self, pos: np.ndarray) -> np.ndarray:
        return pos if self._rows is None else self._rows[pos]

    def __getitem__(self, rows: Any) -> OnDiskCSR:
        """A lazy subset of rows (increasing indices, a slice with step > 0, or a mask)."""
        if isinstance(rows, tuple):
            raise InputError(
                "on-disk matrices are indexed by rows only",
                fix="read the rows with read_rows(...) and index the columns in memory",
            )
        pos = self._positions(rows)
        if len(pos) > 1 and not (np.diff(pos) > 0).all():
            raise InputError(
                "a row subset of an on-disk matrix needs increasing row indices",
                fix="sort the row indices (np.sort / np.unique), or use read_rows for any order",
            )
        return OnDiskCSR(
            block_cells=self.block_cells,
            buffer_mb=self.buffer_mb,
            buffer_blocks=self.buffer_blocks,
            _store=self._store,
            _rows=self._base(pos),
        )

    # ------------------------------------------------------------------ reads
    def _fill(self, base: np.ndarray, cuts: np.ndarray | None = None) -> sp.csr_matrix:
        """CSR of the given sorted unique file rows, read range by range (see ``_ranges``)."""
        st = self._store
        ip = st.indptr
        row_nnz = ip[base + 1] - ip[base]
        total = int(row_nnz.sum())
        idx_dtype = np.int32 if total < 2**31 and st.shape[1] < 2**31 else np.int64
        indptr = np.zeros(len(base) + 1, dtype=idx_dtype)
        np.cumsum(row_nnz, out=indptr[1:])
        data = np.empty(total, dtype=np.float32)
        indices = np.empty(total, dtype=idx_dtype)
        r0 = 0
        for first, stop, r1 in _ranges(base, MAX_GAP_ROWS, cuts):
            p0, p1 = int(ip[first]), int(ip[stop])
            o0, o1 = int(indptr[r0]), int(indptr[r1])
            if r1 - r0 == stop - first:  # every row of the range is wanted
                st.read_into(st.data, p0, p1, data[o0:o1])
                st.read_into(st.indices, p0, p1, indices[o0:o1])
            else:
                tmp_d = np.empty(p1 - p0, dtype=np.float32)
                tmp_i = np.empty(p1 - p0, dtype=idx_dtype)
                st.read_into(st.data, p0, p1, tmp_d)
                st.read_into(st.indices, p0, p1, tmp_i)
                wanted = base[r0:r1]
                lens = row_nnz[r0:r1]
                starts = ip[wanted] - p0
                take = np.repeat(starts - (indptr[r0:r1] - o0), lens) + np.arange(o1 - o0)
                data[o0:o1] = tmp_d[take]
                indices[o0:o1] = tmp_i[take]
            st.stats.reads += 1
            st.stats.rows += int(stop - first)
            st.stats.nnz += p1 - p0
            if st.stats.log is not None:
                st.stats.log.append((int(first), int(stop)))
            r0 = int(r1)
        return sp.csr_matrix((data, indices, indptr), shape=(len(base), st.shape[1]))

    def read_rows(self, rows: Any) -> sp.csr_matrix:
        """CSR float32 of the given rows, in the given order (repeats allowed).

        Rows are sorted and deduplicated, then read as contiguous ranges (wanted rows less
        than ``MAX_GAP_ROWS`` apart share a read).
        """
        pos = self._positions(rows)
        if len(pos) == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        base = self._base(pos)
        if len(base) == 1 or (np.diff(base) > 0).all():
            return self._fill(base)
        uniq, inverse = np.unique(base, return_inverse=True)
        return self._fill(uniq)[inverse]

    def read_block(self, start: int, stop: int) -> sp.csr_matrix:
        """CSR float32 of rows ``start:stop`` (one contiguous read for a whole-file matrix)."""
        start, stop, _ = slice(start, stop).indices(self.shape[0])
        return self.read_rows(np.arange(start, max(start, stop), dtype=np.int64))

    def to_memory(self) -> sp.csr_matrix:
        """The whole matrix as an in-memory CSR (only for data that fit in memory)."""
        return self.read_block(0, self.shape[0])

    # ------------------------------------------------------------------ loader
    def plan_epoch(
        self, indices: np.ndarray, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, list[tuple[np.ndarray, int, int]]]:
        """An epoch's reading plan for the cells ``indices`` (may repeat).

        Returns ``(order, buffers)``: ``order`` is ``indices`` grouped by buffer (within a
        buffer, in their given order); ``buffers`` lists ``(blocks, start, stop)``: the sorted
        block numbers read for the buffer and its slice ``order[start:stop]``. Blocks are
        assigned to buffers in an order drawn from ``rng`` (file order without one); a single
        buffer keeps ``order`` equal to ``indices``.
        """
        indices = np.asarray(indices, dtype=np.int64)
        nb, k, bc = self.n_blocks, self.buffer_blocks, self.block_cells
        if len(indices) == 0:
            return indices, []
        block_of = indices // bc
        if nb <= k:
            return indices, [(np.unique(block_of), 0, len(indices))]
        perm = rng.permutation(nb) if rng is not None else np.arange(nb)
        rank = np.empty(nb, dtype=np.int64)
        rank[perm] = np.arange(nb)
        group = rank[block_of] // k
        del block_of
        o = np.argsort(group, kind="stable")
        order = indices[o]
        bounds = np.searchsorted(group[o], np.arange(-(-nb // k) + 1))
        del o, group
        buffers = []
        for g in range(len(bounds) - 1):
            s0, s1 = int(bounds[g]), int(bounds[g + 1])
            if s1 > s0:
                buffers.append((np.unique(order[s0:s1] // bc), s0, s1))
        return order, buffers

    def _load_buffer(self, blocks: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        """The rows of ``blocks`` (sorted) as one CSR and each block's first row in it."""
        bc, n = self.block_cells, self.shape[0]
        starts = blocks * bc
        sizes = np.minimum(starts + bc, n) - starts
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        pos = np.repeat(starts - offsets[:-1], sizes) + np.arange(offsets[-1])
        # one read per run of adjacent blocks: never read the blocks between two of them
        cuts = offsets[1:-1][np.diff(blocks) > 1]
        return self._fill(self._base(pos), cuts), offsets[:-1]

    def block_minibatches(
        self,
        y: np.ndarray | None,
        batch_size: int,
        *,
        indices: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
        device: torch.device | str = "cpu",
        min_batch: int = 1,
        max_chunk_bytes: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield ``(x, y)`` batches (dense float32, int64) read buffer by buffer.

        ``indices``: the epoch's cells (a permutation, or a weighted sampler's draws; default
        a permutation from ``rng``, or all cells in order). They are regrouped by buffer
        (:meth:`plan_epoch`, block order drawn from ``rng``); batches of ``batch_size`` run
        on across buffers; a trailing batch smaller than ``min_batch`` is dropped (as
        ``training.iterate_minibatches``). Rows are densified a chunk (at most
        ``max_chunk_bytes`` of float32, a whole number of batches) at a time.
        """
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
        device = torch.device(device)
        n = self.shape[0]
        if indices is None:
            indices = rng.permutation(n) if rng is not None else np.arange(n, dtype=np.int64)
        order, buffers = self.plan_epoch(indices, rng)
        m = len(order)
        if batch_size < min_batch or m == 0:
            return
        tail = m % batch_size
        stop = m - tail if 0 < tail < min_batch else m
        chunk = chunk_cells(
            self.shape[1],
            batch_size,
            max_bytes=CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes,
        )
        y_arr = None if y is None else np.asarray(y).astype(np.int64, copy=False)
        bc = self.block_cells
        carry_x: torch.Tensor | None = None
        carry_y: torch.Tensor | None = None
        for blocks, s0, s1 in buffers:
            if s0 >= stop:
                break
            s1 = min(s1, stop)
            buf, first_row = self._load_buffer(blocks)
            cells = order[s0:s1]
            local = first_row[np.searchsorted(blocks, cells // bc)] + cells % bc

            def take(a: int, b: int, buf=buf, local=local, s0=s0):
                x = torch.from_numpy(buf[local[a - s0 : b - s0]].toarray()).to(device)
                yy = None if y_arr is None else torch.from_numpy(y_arr[order[a:b]]).to(device)
                return x, yy

            q = s0
            if carry_x is not None:  # complete the batch begun in the previous buffer
                b = min(q + batch_size - carry_x.shape[0], s1)
                x, yy = take(q, b)
                carry_x = torch.cat([carry_x, x])
                carry_y = None if yy is None else torch.cat([carry_y, yy])
                q = b
                if carry_x.shape[0] == batch_size:
                    yield carry_x, carry_y
                    carry_x = carry_y = None
            while q < s1:
                c1 = min(q + chunk, s1)
                x, yy = take(q, c1)
                full = (c1 - q) // batch_size * batch_size
                for b0 in range(0, full, batch_size):
                    yield (
                        x[b0 : b0 + batch_size],
                        (None if yy is None else yy[b0 : b0 + batch_size]),
                    )
                if full < c1 - q:
                    carry_x = x[full:]
                    carry_y = None if yy is None else yy[full:]
                q = c1
            del buf, local, cells, take
        if carry_x is not None and carry_x.shape[0] >= min_batch:
            yield carry_x, carry_y


def open_ondisk(path: str | os.PathLike, group: str = "X", **loader: Any) -> OnDiskCSR:
    """Open the CSR matrix ``group`` of an HDF5 / h5ad file or zarr store (see OnDiskCSR)."""
    return OnDiskCSR(path, group, **loader)


# ---------------------------------------------------------------------------- AnnData-like
class OnDiskAnnData:
    """What ``Method.fit`` / ``predict_proba`` read from an AnnData, with ``X`` on disk.

    ``X`` is an :class:`OnDiskCSR`; ``obs`` and ``var`` are in memory. ``adata[rows]`` is a
    row subset (increasing rows: positions, a mask, or obs names); ``close()`` closes the file.
    """

    def __init__(self, X: OnDiskCSR, obs: pd.DataFrame, var: pd.DataFrame) -> None:
        if X.shape != (len(obs), len(var)):
            raise InputError(
                f"X has shape {X.shape} but obs / var have {len(obs)} / {len(var)} rows",
                file=str(X.path),
                fix=_fix_for(X.path),
            )
        self.X = X
        self.obs = obs
        self.var = var

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_vars(self) -> int:
        return len(self.var)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_obs, self.n_vars)

    @property
    def obs_names(self) -> pd.Index:
        return self.obs.index

    @property
    def var_names(self) -> pd.Index:
        return self.var.index

    def __len__(self) -> int:
        return self.n_obs

    def __repr__(self) -> str:
        return f"OnDiskAnnData(n_obs={self.n_obs}, n_vars={self.n_vars}, X={self.X!r})"

    def __getitem__(self, rows: Any) -> OnDiskAnnData:
        if isinstance(rows, tuple):
            raise InputError("on-disk AnnData is indexed by rows only (cells)")
        arr = np.asarray(rows) if not isinstance(rows, slice) else rows
        if isinstance(arr, np.ndarray) and arr.dtype.kind in "OUS":
            pos = self.obs.index.get_indexer(arr)
            if (pos < 0).any():
                missing = arr[pos < 0][:3].tolist()
                raise InputError(f"{int((pos < 0).sum())} cell ids not found, e.g. {missing}")
            arr = pos
        pos = self.X._positions(arr)
        return OnDiskAnnData(self.X[pos], self.obs.iloc[pos], self.var)

    def to_memory(self):
        """An in-memory ``anndata.AnnData`` (only for data that fit in memory)."""
        import anndata as ad

        return ad.AnnData(self.X.to_memory(), obs=self.obs.copy(), var=self.var.copy())

    def close(self) -> None:
        self.X.close()


def read_ondisk_anndata(path: str | os.PathLike, **loader: Any) -> OnDiskAnnData:
    """``obs`` / ``var`` of an h5ad (or a file written here) in memory, ``X`` on disk."""
    from anndata.io import read_elem

    X = OnDiskCSR(path, "X", **loader)
    try:
        obs = read_elem(X._store.handle["obs"])
        var = read_elem(X._store.handle["var"])
    except (KeyError, OSError, ValueError, TypeError) as exc:
        X.close()
        raise InputError(
            f"cannot read obs / var ({type(exc).__name__}: {exc})",
            file=str(path),
            fix=_fix_for(Path(path)),
        ) from exc
    return OnDiskAnnData(X, obs, var)


# ---------------------------------------------------------------------------- memory budget
def in_memory_mb(path: str | os.PathLike) -> float:
    """MiB that reading the h5ad into memory takes for ``X`` and its layers (as stored).

    A sparse matrix counts its values, indices and indptr, a dense one its cells; obs, var
    and the copies made by subsetting come on top.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise InputError("file does not exist", file=str(path), fix="check the path")

    def size(obj: Any) -> int:
        if isinstance(obj, h5py.Dataset):
            return int(obj.size) * obj.dtype.itemsize
        return sum(size(obj[k]) for k in ("data", "indices", "indptr") if k in obj)

    with h5py.File(path, "r") as f:
        total = size(f["X"]) if "X" in f else 0
        if "layers" in f:
            total += sum(size(f["layers"][k]) for k in f["layers"])
    return total / 2**20


def _loader_for_budget(budget_mb: float) -> dict[str, Any]:
    """Loader settings within a budget: the shuffle buffer gets a quarter, 32-512 MiB."""
    return {"buffer_mb": float(min(512.0, max(32.0, budget_mb / 4)))}


def open_training_matrix(
    h5ad_path: str | os.PathLike, budget_mb: float | None, **loader: Any
) -> OnDiskCSR | None:
    """``X`` of an h5ad on disk when loading the file would exceed ``budget_mb``, else None.

    None (or a budget <= 0) means "no budget": the caller loads the data into memory as
    before. The returned matrix reads ``X`` in place (it must be CSR, as the preprocess step
    writes it); its shuffle buffer takes a quarter of the budget unless ``loader`` says
    otherwise.
    """
    if budget_mb is None or budget_mb <= 0:
        return None
    need = in_memory_mb(h5ad_path)
    if need <= budget_mb:
        return None
    return OnDiskCSR(h5ad_path, "X", **{**_loader_for_budget(budget_mb), **loader})


def open_run_data(
    data: str | os.PathLike,
    split: str | os.PathLike,
    replicate: str,
    budget_mb: float | None,
    *,
    method: str | None = None,
    strategy: str = "none",
    **loader: Any,
) -> dict[str, OnDiskAnnData | None] | None:
    """The train / valid / test parts of one replicate with ``X`` on disk, or None.

    None means "load in memory as usual": no budget, the data fit in it, or the run cannot
    train from disk (a data-level balancing strategy, or a method without
    ``supports_ondisk``; then a warning says the data exceed the budget). The parts are row
    subsets of the processed h5ad's ``X`` (cells in file order) with their obs rows.
    """
    log = logging.getLogger(LOGGER_NAME)
    if budget_mb is None or budget_mb <= 0:
        return None
    need = in_memory_mb(data)
    if need <= budget_mb:
        return None
    reason = None
    if method is not None:
        from ..methods import get

        if not getattr(get(method), "supports_ondisk", False):
            reason = f"method '{method}' trains from memory only"
    from ..balancing import is_resampler

    if is_resampler(strategy):
        reason = f"balancing strategy '{strategy}' resamples the data in memory"
    if reason is not None:
        log.warning(
            "%s: loading it takes about %.0f MiB, more than memory_budget_mb %.0f, but %s; "
            "loading it into memory",
            data,
            need,
            budget_mb,
            reason,
        )
        return None
    full = read_ondisk_anndata(data, **{**_loader_for_budget(budget_mb), **loader})
    table = pd.read_parquet(split)
    table = table[table["replicate"] == replicate]
    if table.empty:
        full.close()
        raise InputError(
            f"no rows for replicate '{replicate}'",
            file=str(split),
            field="replicate",
            fix="rerun the split rule",
        )
    parts: dict[str, OnDiskAnnData | None] = {}
    for role in ("train", "valid", "test"):
        ids = table.loc[table["role"] == role, "cell_id"].astype(str).to_numpy()
        if not len(ids):
            parts[role] = None
            continue
        pos = full.obs.index.get_indexer(ids)
        if (pos < 0).any():
            full.close()
            raise InputError(
                f"{int((pos < 0).sum())} {role} cells of the split are not in the data, "
                f"e.g. {ids[pos < 0][:3].tolist()}",
                file=str(split),
                field="cell_id",
                fix="rerun the split rule for this dataset",
            )
        parts[role] = full[np.sort(pos)]
    if parts["train"] is None or parts["test"] is None:
        full.close()
        raise InputError(
            f"replicate '{replicate}' has no training or no test cells",
            file=str(split),
            field="role",
            fix="check the split settings of the task (fractions, number of folds)",
        )
    log.info(
        "%s: loading it takes about %.0f MiB, more than memory_budget_mb %.0f: training from "
        "disk (%s)",
        data,
        need,
        budget_mb,
        parts["train"].X,
    )
    return parts
