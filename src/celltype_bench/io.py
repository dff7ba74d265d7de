"""Atomic file writing and safe reading of AnnData files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anndata as ad
import pandas as pd

from .errors import InputError


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike) -> None:
    """Write an h5ad under a temporary name, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        adata.write_h5ad(tmp, compression="gzip")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_WRITERS: tuple[tuple[str, str], ...] = (
    ("data/raw/", "fetch"),
    ("data/processed/", "preprocess"),
    ("data/splits/", "split"),
    ("predictions.parquet", "train"),
    ("scores.json", "score"),
)
"""Path fragment -> the workflow rule that writes such files (for error messages)."""


def _rerun_fix(path: Path) -> str:
    """Advice for a damaged file: delete it and rerun the rule that writes it."""
    text = path.as_posix()
    rule = next((r for frag, r in _WRITERS if frag in text), None)
    which = f"the '{rule}' rule" if rule else "the rule that writes it"
    return (
        f"delete it and rerun {which} (e.g. `rm {text}` then `snakemake {text}`), or "
        "download it again if it came from elsewhere"
    )


_READ_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # h5py: truncated file, bad signature, unreadable chunk; pyarrow: bad parquet
    KeyError,  # h5py: a group anndata needs is missing
    TypeError,  # anndata: an HDF5 file that is not an AnnData
    ValueError,  # pyarrow ArrowInvalid, pandas parser errors, bad encodings
    IndexError,
    EOFError,
)
"""What readers raise for damaged files (MemoryError and programming errors pass through)."""


def _missing(path: Path) -> InputError:
    return InputError(
        "file does not exist",
        file=str(path),
        fix="check the path or rerun the rule that writes it",
    )


def read_h5ad(path: str | os.PathLike, backed: str | None = None) -> ad.AnnData:
    """Read an h5ad; a missing, corrupt or truncated file raises InputError naming it.

    ``backed='r'`` opens it read-only without loading ``X`` (``obs`` and ``var`` are read).
    """
    path = Path(path)
    if not path.exists():
        raise _missing(path)
    try:
        return ad.read_h5ad(path, backed=backed)
    except _READ_ERRORS as exc:
        raise InputError(
            f"cannot read h5ad ({type(exc).__name__}: {exc}); the file is corrupt or truncated",
            file=str(path),
            fix=_rerun_fix(path),
        ) from exc


def read_obs(path: str | os.PathLike) -> pd.DataFrame:
    """Only the ``obs`` table of an h5ad (read backed: ``X`` is not loaded)."""
    adata = read_h5ad(path, backed="r")
    try:
        return adata.obs.copy()
    finally:
        adata.file.close()


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a parquet/CSV/TSV table (by extension); unreadable files raise InputError."""
    path = Path(path)
    if not path.exists():
        raise _missing(path)
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="\t" if path.suffix in (".tsv", ".tab") else ",")
    except _READ_ERRORS as exc:
        raise InputError(
            f"cannot read table ({type(exc).__name__}: {exc}); the file is corrupt or truncated",
            file=str(path),
            fix=_rerun_fix(path),
        ) from exc


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_default))
    os.replace(tmp, path)


def _default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a DataFrame atomically as CSV, TSV or parquet, by extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    if path.suffix == ".parquet":
        df.to_parquet(tmp, index=False)
    elif path.suffix in (".tsv", ".tab"):
        df.to_csv(tmp, index=False, sep="\t")
    else:
        df.to_csv(tmp, index=False)
    os.replace(tmp, path)
