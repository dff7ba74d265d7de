"""Scores of one predictions table: plain and Cell Ontology-corrected F1, calibration.

Choices:

- Macro and weighted F1 average over the classes present among the test set's TRUE labels
  (``sklearn.metrics.f1_score(labels=those classes, zero_division=0)``). Classes a method
  knows but that do not occur in the test fold (common with donor splits) are not averaged in
  as zeros; predicting them still counts as a miss for the true class (lower recall).
- True labels the method never saw in training (no ``proba:`` column) simply count as wrong.
- Ontology-corrected scores follow scTab (Fischer et al. 2024): a prediction whose CL id
  equals the true label's CL id or is a descendant of it (a more specific cell type) is
  counted as the true label; predicting an ancestor (coarser type) stays wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, precision_recall_fscore_support

from .contract import classes_of, proba_columns, validate_predictions
from .errors import InputError
from .labels import empty_values
from .ontology import CellOntology


def ontology_corrected(
    y_true: Sequence[str] | np.ndarray | pd.Series,
    y_pred: Sequence[str] | np.ndarray | pd.Series,
    label_to_cl: Mapping[str, str],
    ontology: CellOntology,
) -> np.ndarray:
    """Replace predictions that are the true CL term or a descendant of it by the true label.

    Labels absent from ``label_to_cl`` (or whose CL id is unknown) are left unchanged.
    """
    true = np.asarray(y_true, dtype=object).astype(str)
    pred = np.asarray(y_pred, dtype=object).astype(str)
    if true.shape != pred.shape:
        raise ValueError(f"y_true has shape {true.shape}, y_pred {pred.shape}")
    out = pred.copy()
    pairs = pd.DataFrame({"t": true, "p": pred}).drop_duplicates()
    for t, p in zip(pairs["t"], pairs["p"], strict=True):
        if t == p:
            continue
        t_id, p_id = label_to_cl.get(t), label_to_cl.get(p)
        if not t_id or not p_id or t_id not in ontology or p_id not in ontology:
            continue
        if ontology.is_same_or_descendant(p_id, t_id):
            out[(true == t) & (pred == p)] = t
    return out


def expected_calibration_error(
    proba: np.ndarray, y_true_idx: np.ndarray, n_bins: int = 15
) -> float:
    """Expected calibration error with equal-width confidence bins.

    Confidence is the row maximum of ``proba`` and a cell is correct when its arg-max equals
    ``y_true_idx`` (use -1 for a true class without a probability column: always wrong).
    ECE = sum over bins of (bin size / n) * |accuracy(bin) - mean confidence(bin)|.
    """
    proba = np.asarray(proba, dtype=float)
    y_true_idx = np.asarray(y_true_idx)
    if proba.ndim != 2 or proba.shape[0] != y_true_idx.shape[0]:
        raise ValueError(f"proba has shape {proba.shape}, y_true_idx {y_true_idx.shape}")
    n = proba.shape[0]
    if n == 0:
        raise ValueError("expected_calibration_error needs at least one cell")
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true_idx).astype(float)
    # bins (0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    # (n_b / n) * |acc_b - conf_b| == |sum_b(correct) - sum_b(conf)| / n
    return float(np.abs(acc_sum - conf_sum).sum() / n)


def _not_real(col: pd.Series) -> str | None:
    """What makes a column not hold real numbers (None when it does)."""
    if pd.api.types.is_complex_dtype(col.dtype):
        return f"has complex dtype {col.dtype}"
    if pd.api.types.is_numeric_dtype(col.dtype):
        return None
    coerced = pd.to_numeric(col, errors="coerce")
    n_bad = int((col.notna() & coerced.isna()).sum())
    return f"has {n_bad} non-numeric values" if n_bad else None


def check_scorable(pred: Any, source: str | None = None) -> pd.DataFrame:
    """Check a predictions table before scoring; raise InputError naming the bad field.

    On top of :func:`contract.validate_predictions`: a DataFrame with unique column names,
    numeric probability columns, at least one row, and no missing ``cell_id``/``true_label``.
    """
    fix_rerun = "fix the method's output and rerun the training rule that writes the file"
    if not isinstance(pred, pd.DataFrame):
        raise InputError(
            f"predictions must be a table (pandas DataFrame), got {type(pred).__name__}",
            file=source,
            field="predictions",
            fix="read the file with celltype_bench.contract.read_predictions",
        )
    dup_cols = pred.columns[pred.columns.duplicated()].unique().tolist()
    if dup_cols:
        raise InputError(
            f"columns {[str(c) for c in dup_cols[:5]]} appear more than once",
            file=source,
            field=str(dup_cols[0]),
            fix="write each column once; " + fix_rerun,
        )
    for col in proba_columns(pred):
        problem = _not_real(pred[col])
        if problem:
            raise InputError(
                f"probability column '{col}' {problem}",
                file=source,
                field=str(col),
                fix="write real numbers (softmax outputs) in every 'proba:<class>' column; "
                + fix_rerun,
            )
    validate_predictions(pred, source)
    if len(pred) == 0:
        raise InputError(
            "predictions table has no rows",
            file=source,
            field="cell_id",
            fix="check that the split has test cells and rerun the training rule",
        )
    for col in ("cell_id", "true_label"):
        missing = empty_values(pred[col])
        if missing.any():
            raise InputError(
                f"{int(missing.sum())} rows have a missing or empty {col} "
                f"(e.g. row {int(np.flatnonzero(missing)[0])})",
                file=source,
                field=col,
                fix="write the processed dataset's obs names and author labels of the test "
                "cells; " + fix_rerun,
            )
    return pred


def score_predictions(
    pred: pd.DataFrame,
    label_to_cl: Mapping[str, str],
    train_counts: Mapping[str, int],
    ontology: CellOntology,
    source: str | None = None,
) -> dict[str, Any]:
    """Score a contract predictions table; returns a JSON-serialisable dict.

    ``source`` names the predictions file in errors (see :func:`check_scorable`).
    Keys: n_test, accuracy, macro_f1, macro_f1_ontology, weighted_f1, ece and ``per_class``
    (one entry per true test class: label, cl_id, f1, f1_ontology, precision, recall,
    support_test, n_train).
    """
    check_scorable(pred, source)
    y_true = pred["true_label"].astype(str).to_numpy()
    y_pred = pred["predicted_label"].astype(str).to_numpy()
    y_onto = ontology_corrected(y_true, y_pred, label_to_cl, ontology)
    classes = sorted(set(y_true))

    prec, rec, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, average=None, zero_division=0
    )
    f1_onto = f1_score(y_true, y_onto, labels=classes, average=None, zero_division=0)

    known = classes_of(pred)
    index = {c: i for i, c in enumerate(known)}
    true_idx = np.array([index.get(t, -1) for t in y_true])
    ece = expected_calibration_error(pred[proba_columns(pred)].to_numpy(float), true_idx)

    per_class = [
        {
            "label": c,
            "cl_id": label_to_cl.get(c),
            "f1": float(f1[i]),
            "f1_ontology": float(f1_onto[i]),
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "support_test": int(support[i]),
            "n_train": int(train_counts.get(c, 0)),
        }
        for i, c in enumerate(classes)
    ]
    return {
        "n_test": int(len(y_true)),
        "accuracy": float(np.mean(y_true == y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)
        ),
        "macro_f1_ontology": float(
            f1_score(y_true, y_onto, labels=classes, average="macro", zero_division=0)
        ),
        "weighted_f1": float(
            f1_score(y_true, y_pred, labels=classes, average="weighted", zero_division=0)
        ),
        "ece": ece,
        "per_class": per_class,
    }


def uncertainty_summary(
    correct: np.ndarray, uncertainty: np.ndarray, n_bins: int = 10
) -> dict[str, Any]:
    """How well per-cell uncertainty flags wrong predictions (scTab's ensemble check).

    ``error_auroc``: probability that a wrong prediction carries a higher uncertainty than a
    right one (0.5 = uninformative; None when all predictions are right or all wrong).
    ``uncertainty_bins``: accuracy per equal-width uncertainty bin in [0, 1] (empty bins left
    out).
    """
    correct = np.asarray(correct, dtype=bool)
    u = np.clip(np.asarray(uncertainty, dtype=float), 0.0, 1.0)
    auroc = None
    if 0 < correct.sum() < len(correct):
        from sklearn.metrics import roc_auc_score

        auroc = float(roc_auc_score(~correct, u))
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(u, edges[1:-1]), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        mask = which == b
        if mask.any():
            bins.append(
                {
                    "lo": float(edges[b]),
                    "hi": float(edges[b + 1]),
                    "n": int(mask.sum()),
                    "accuracy": float(correct[mask].mean()),
                }
            )
    return {
        "error_auroc": auroc,
        "mean_uncertainty": float(u.mean()) if len(u) else None,
        "uncertainty_bins": bins,
    }
