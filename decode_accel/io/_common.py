"""Checks shared by the table readers and writers."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from decode_accel.errors import DecodeAccelError

#: columns a table must have before it can be written.
WRITE_REQUIRED = ("frame", "x", "y", "photons")


def check_table_for_writing(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Raise a one-line error if ``df`` cannot be written as a localization table."""
    if not isinstance(df, pd.DataFrame):
        raise DecodeAccelError(f"expected a pandas DataFrame, got {type(df).__name__}", path=path)
    for col in WRITE_REQUIRED:
        if col not in df.columns:
            raise DecodeAccelError("the table has no such column", path=path, field=col,
                                   fix=f"a localization table needs the columns {', '.join(WRITE_REQUIRED)}")
    for col in ("frame", "x", "y"):
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
        if not np.all(np.isfinite(values)):
            raise DecodeAccelError(f"{int(np.sum(~np.isfinite(values)))} rows are not finite numbers",
                                   path=path, field=col, fix="drop or fill those rows before writing")
    frames = df["frame"].to_numpy(np.float64)
    if len(frames) and (frames.min() < 0 or np.any(frames != np.round(frames))):
        raise DecodeAccelError("frames must be integers >= 0 (0-based)", path=path, field="frame")


def require_finite(values: np.ndarray, path, column: str) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise DecodeAccelError(f"{len(bad)} missing or non-finite values (first in row {int(bad[0]) + 1})",
                               path=path, field=column, fix="every row needs a finite number here")


def integer_column(values: np.ndarray, path, column: str, minimum: int) -> np.ndarray:
    """Finite, integer-valued, >= minimum -> int64."""
    require_finite(values, path, column)
    if np.any(values != np.round(values)):
        raise DecodeAccelError("values must be whole numbers", path=path, field=column)
    if len(values) and values.min() < minimum:
        raise DecodeAccelError(f"values must be >= {minimum}", path=path, field=column)
    if len(values) and values.max() > 2**62:
        raise DecodeAccelError("values are too large", path=path, field=column)
    return values.astype(np.int64)
