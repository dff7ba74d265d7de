"""Atomic file writing and safe reading of AnnData files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anndata as ad

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


def read_h5ad(path: str | os.PathLike) -> ad.AnnData:
    """Read an h5ad; a missing, corrupt or truncated file raises InputError naming it."""
    path = Path(path)
    if not path.exists():
        raise InputError(
            "file does not exist",
            file=str(path),
            fix="check the path or rerun the rule that makes it",
        )
    try:
        return ad.read_h5ad(path)
    except Exception as exc:
        raise InputError(
            f"cannot read h5ad ({type(exc).__name__}: {exc}); the file is corrupt or truncated",
            file=str(path),
            fix="delete it and rerun the rule that makes it (or download it again)",
        ) from exc


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_default))
    os.replace(tmp, path)


def _default(o: Any):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_table(df, path: str | os.PathLike) -> None:
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
