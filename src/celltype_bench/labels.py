"""Checks on label-like obs columns shared by sources, preprocessing, splits and methods."""

from __future__ import annotations

import numpy as np
import pandas as pd


def empty_values(values: pd.Series) -> np.ndarray:
    """Boolean mask of entries that are missing (NaN/None) or blank strings."""
    return values.isna().to_numpy() | values.astype(str).str.strip().eq("").to_numpy()
