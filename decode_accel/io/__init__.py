"""Localization-table files: ThunderSTORM CSV and Picasso HDF5 (+ YAML).

``write_table(df, path, px_size_nm, width, height, n_frames)`` and ``read_table(path)`` choose the
format by extension (.csv; .hdf5 or .h5). Tables are DataFrames in the convention of
:mod:`decode_accel.table` (x, y, z in nm, frames 0-based). Every write is atomic. JSON files:
``to_json_data`` (the one sanitiser: NaN -> null, numpy/torch -> Python, paths -> text) and ``write_json``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from decode_accel.errors import DecodeAccelError
from decode_accel.io._json import to_json_data, write_json
from decode_accel.io.picasso import read_picasso_hdf5, write_picasso_hdf5, yaml_path
from decode_accel.io.thunderstorm import read_thunderstorm_csv, write_thunderstorm_csv

CSV_SUFFIXES = (".csv",)
HDF5_SUFFIXES = (".hdf5", ".h5")

__all__ = ["write_table", "read_table", "write_thunderstorm_csv", "read_thunderstorm_csv", "write_picasso_hdf5",
           "read_picasso_hdf5", "yaml_path", "to_json_data", "write_json"]


def _kind(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    raise DecodeAccelError(f"unknown localization file type {suffix or '(none)'!r}", path=path,
                           fix="use .csv (ThunderSTORM) or .hdf5/.h5 (Picasso)")


def write_table(df: pd.DataFrame, path: str | os.PathLike, px_size_nm: float = 100.0, width: int | None = None,
                height: int | None = None, n_frames: int | None = None, psf_sigma_nm: float | None = None) -> None:
    """Write a localization table; .csv -> ThunderSTORM, .hdf5/.h5 -> Picasso (+ .yaml).

    Args:
        df: localization table (nm, 0-based frames).
        path: target file.
        px_size_nm: camera pixel size (nm); Picasso only.
        width, height: image size (px); Picasso only; default: just large enough for the table.
        n_frames: movie length; Picasso only; default: largest frame + 1.
        psf_sigma_nm: PSF sigma written as Picasso's sx/sy (nm); default one pixel.
    """
    if _kind(path) == "csv":
        write_thunderstorm_csv(df, path)
        return
    if not isinstance(df, pd.DataFrame):
        raise DecodeAccelError(f"expected a pandas DataFrame, got {type(df).__name__}", path=path)

    def extent(col: str) -> int:
        if col not in df.columns or len(df) == 0:
            return 1
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
        v = v[np.isfinite(v)]
        return max(1, int(math.ceil(v.max() / px_size_nm))) if len(v) else 1

    if width is None:
        width = extent("x")
    if height is None:
        height = extent("y")
    if n_frames is None:
        frames = pd.to_numeric(df["frame"], errors="coerce") if "frame" in df.columns else pd.Series([], dtype=float)
        n_frames = int(frames.max()) + 1 if len(frames) and np.isfinite(frames.max()) else 1
    write_picasso_hdf5(df, path, px_size_nm, width, height, n_frames, psf_sigma_nm=psf_sigma_nm)


def read_table(path: str | os.PathLike, px_size_nm: float | None = None) -> pd.DataFrame:
    """Read a localization table from .csv (ThunderSTORM) or .hdf5/.h5 (Picasso; pixel size from the
    YAML sidecar unless ``px_size_nm`` is given)."""
    if _kind(path) == "csv":
        return read_thunderstorm_csv(path)
    return read_picasso_hdf5(path, px_size_nm=px_size_nm)
