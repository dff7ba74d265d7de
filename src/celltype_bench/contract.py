"""The method contract: what every method, Python or external, must write.

``predictions.parquet`` has one row per test cell and the columns

- ``cell_id``: the cell's obs name in the processed dataset,
- ``true_label``: its author label (``cell_type``),
- ``predicted_label``: the method's label,
- ``proba:<class>``: one probability column per class the method knows, rows summing to 1,
- ``uncertainty`` (optional): per-cell uncertainty in [0, 1]; 1 - max probability if absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError

PROBA_PREFIX = "proba:"
REQUIRED_COLUMNS = ("cell_id", "true_label", "predicted_label")
UNCERTAINTY = "uncertainty"
"""Optional column: per-cell uncertainty in [0, 1] (default 1 - max probability)."""


def uncertainty_of(df: pd.DataFrame) -> np.ndarray:
    """The per-cell uncertainty of a predictions table (1 - max probability if not written)."""
    if UNCERTAINTY in df.columns:
        return df[UNCERTAINTY].to_numpy(dtype=float)
    p = df[proba_columns(df)].to_numpy(dtype=float)
    return 1.0 - p.max(axis=1)


def proba_columns(df: pd.DataFrame) -> list[str]:
    """Names of the probability columns of a predictions table."""
    return [c for c in df.columns if str(c).startswith(PROBA_PREFIX)]


def classes_of(df: pd.DataFrame) -> list[str]:
    """Class names of a predictions table, in column order."""
    return [c[len(PROBA_PREFIX) :] for c in proba_columns(df)]


def make_predictions(
    cell_ids, true_labels, proba: pd.DataFrame, predicted_labels=None, uncertainty=None
) -> pd.DataFrame:
    """Build a contract-conforming predictions table from a cells x classes probability frame.

    ``uncertainty`` defaults to 1 - max probability (scTab's measure; an ensemble passes its
    own ensemble probabilities, so this is the ensemble's uncertainty).
    """
    proba = proba.astype("float64")
    if predicted_labels is None:
        predicted_labels = proba.columns.to_numpy()[np.argmax(proba.to_numpy(), axis=1)]
    if uncertainty is None:
        uncertainty = 1.0 - proba.to_numpy().max(axis=1) if proba.shape[1] else []
    out = pd.DataFrame(
        {
            "cell_id": np.asarray(cell_ids).astype(str),
            "true_label": np.asarray(true_labels).astype(str),
            "predicted_label": np.asarray(predicted_labels).astype(str),
            UNCERTAINTY: np.clip(np.asarray(uncertainty, dtype=np.float64), 0.0, 1.0),
        }
    )
    probs = pd.DataFrame(proba.to_numpy(), columns=[PROBA_PREFIX + str(c) for c in proba.columns])
    return pd.concat([out, probs], axis=1)


def _numeric_block(df: pd.DataFrame, cols: list[str], where: str | None) -> np.ndarray:
    """The columns as a float matrix; a non-numeric or complex value is an InputError."""
    out = np.empty((len(df), len(cols)), dtype=float)
    for j, col in enumerate(cols):
        values = df[col]
        if values.dtype.kind == "c" or any(isinstance(v, complex) for v in values):
            raise InputError(
                f"column '{col}' holds complex numbers",
                file=where,
                field=col,
                fix="write real probabilities in [0, 1]",
            )
        num = pd.to_numeric(values, errors="coerce")
        bad = num.isna() & values.notna()
        if bad.any():
            raise InputError(
                f"column '{col}' holds a non-numeric value ({values[bad].iloc[0]!r})",
                file=where,
                field=col,
                fix="write numbers (softmax probabilities), not text",
            )
        out[:, j] = num.to_numpy(dtype=float)
    return out


def validate_predictions(df: pd.DataFrame, path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Check a predictions table against the contract; raise InputError naming the problem."""
    where = None if path is None else str(path)
    dup_cols = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
    if dup_cols:
        raise InputError(
            f"predictions table has the column(s) {dup_cols} more than once",
            file=where,
            field=dup_cols[0],
            fix="write each column once",
        )
    for col in REQUIRED_COLUMNS:
        if col not in df.columns:
            raise InputError(
                f"predictions table lacks the column '{col}'",
                file=where,
                field=col,
                fix="write cell_id, true_label, predicted_label and one 'proba:<class>' column per class (docs/method-contract.md)",
            )
    pcols = proba_columns(df)
    if not pcols:
        raise InputError(
            "predictions table has no probability columns",
            file=where,
            field=PROBA_PREFIX + "<class>",
            fix="add one 'proba:<class>' column per class; a hard classifier writes 1.0 for its label and 0.0 elsewhere",
        )
    for col in ("cell_id", "true_label"):
        missing = df[col].isna()
        if missing.any():
            raise InputError(
                f"{int(missing.sum())} row(s) have no {col}",
                file=where,
                field=col,
                fix=f"write a {col} on every row",
            )
    if df["cell_id"].duplicated().any():
        dup = df.loc[df["cell_id"].duplicated(), "cell_id"].iloc[0]
        raise InputError(
            f"cell id '{dup}' appears more than once",
            file=where,
            field="cell_id",
            fix="write one row per test cell",
        )
    p = _numeric_block(df, pcols, where)
    if not np.all(np.isfinite(p)) or (p < -1e-6).any():
        raise InputError(
            "probabilities must be finite and non-negative",
            file=where,
            field=PROBA_PREFIX + "*",
            fix="write softmax outputs, not logits",
        )
    sums = p.sum(axis=1)
    if len(sums) and not np.allclose(sums, 1.0, atol=1e-3):
        bad = int(np.argmax(np.abs(sums - 1.0)))
        raise InputError(
            f"probabilities of cell '{df['cell_id'].iloc[bad]}' sum to {sums[bad]:.4g}, not 1",
            file=where,
            field=PROBA_PREFIX + "*",
            fix="normalise each row to sum to 1",
        )
    if UNCERTAINTY in df.columns:
        u = pd.to_numeric(df[UNCERTAINTY], errors="coerce").to_numpy(dtype=float)
        if not np.all(np.isfinite(u)) or (u < -1e-9).any() or (u > 1 + 1e-9).any():
            raise InputError(
                "uncertainty values must be finite numbers in [0, 1]",
                file=where,
                field=UNCERTAINTY,
                fix="write 1 - max probability, or leave the optional column out",
            )
    known = set(classes_of(df))
    unknown = sorted(set(df["predicted_label"].astype(str)) - known)
    if unknown:
        raise InputError(
            f"predicted labels {unknown[:5]} have no probability column",
            file=where,
            field="predicted_label",
            fix="predict only classes that have a 'proba:<class>' column",
        )
    return df


def write_predictions(df: pd.DataFrame, path: str | os.PathLike, failed: bool = False) -> None:
    """Validate and write a predictions table atomically (temporary name, then rename).

    ``failed=True`` writes the no-row table of a run recorded as failed (its ``run.json``
    says why); it is not validated as predictions.
    """
    if not failed:
        validate_predictions(df, path)
    elif len(df):
        raise ValueError("a failed run's predictions table must have no rows")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def read_predictions(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a predictions file."""
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise InputError(
            f"cannot read predictions parquet: {exc}",
            file=str(path),
            fix="rerun the training rule that writes it",
        ) from exc
    return validate_predictions(df, path)
