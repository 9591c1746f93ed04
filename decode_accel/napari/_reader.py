"""napari reader: decode_accel's localization files as a points layer in nm.

The files are read by :func:`decode_accel.io.read_table` (the same readers ``decode-accel evaluate`` uses);
this module only decides whether a file is one of ours and turns the table into layer data.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import yaml

from decode_accel.io import CSV_SUFFIXES, HDF5_SUFFIXES, read_table, yaml_path
from decode_accel.napari.layers import points_layer_data

__all__ = ["get_reader", "read_localizations"]


def _is_thunderstorm_csv(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            header = fh.readline()
    except OSError:
        return False
    return "x [nm]" in header and "y [nm]" in header


def _is_picasso_hdf5(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return "locs" in f
    except (OSError, ValueError):
        return False


def get_reader(path):
    """The reader function for a ThunderSTORM CSV or Picasso HDF5 file, else None (napari asks the next plugin)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = Path(os.fspath(path))
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES and _is_thunderstorm_csv(path):
        return read_localizations
    if suffix in HDF5_SUFFIXES and _is_picasso_hdf5(path):
        return read_localizations
    return None


def _picasso_pixel_size(path: Path) -> float | None:
    """The Pixelsize of the YAML sidecar (for the point size only; read_table already converted to nm)."""
    ypath = yaml_path(path)
    if not ypath.is_file():
        return None
    try:
        for doc in yaml.safe_load_all(ypath.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and isinstance(doc.get("Pixelsize"), (int, float)):
                return float(doc["Pixelsize"])
    except yaml.YAMLError:
        return None
    return None


def read_localizations(path, color_by: str = "auto") -> list[tuple]:
    """Read one file into ``[(points, kwargs, "points")]`` (frame, y, x in nm; see :mod:`.layers`).

    ``color_by`` ``'auto'``: by dye for a two-channel table (it has a ``color`` column), else by probability.

    Raises :class:`decode_accel.errors.DecodeAccelError` (one line naming file and field) on bad content.
    """
    if isinstance(path, (list, tuple)):
        return [layer for p in path for layer in read_localizations(p, color_by=color_by)]
    path = Path(os.fspath(path))
    table = read_table(path)
    px = _picasso_pixel_size(path) if path.suffix.lower() in HDF5_SUFFIXES else None
    return [points_layer_data(table, px_size_nm=px, color_by=color_by, name=path.stem,
                              metadata=dict(source=str(path)))]
