"""The localization table: a pandas DataFrame with fixed column names and units.

One row per emitter per frame. x, y, z are in nm with the image origin at the top-left corner of
the image; pixel (row i, column j) has its centre at x = (j + 0.5)·px, y = (i + 0.5)·px.
"""

from __future__ import annotations

import pandas as pd

#: column -> (unit, meaning). The first six are required in every table.
COLUMNS: dict[str, tuple[str, str]] = {
    "frame": ("", "0-based frame index"),
    "x": ("nm", "position along columns"),
    "y": ("nm", "position along rows"),
    "z": ("nm", "axial position (0 for 2D)"),
    "photons": ("photons", "total detected photons in this frame (both channels)"),
    "id": ("", "emitter id; constant while one molecule blinks over several frames"),
    "bg": ("photons/px", "background at the emitter"),
    "prob": ("", "detection probability"),
    "x_sigma": ("nm", "predicted 1-sigma uncertainty of x"),
    "y_sigma": ("nm", "predicted 1-sigma uncertainty of y"),
    "z_sigma": ("nm", "predicted 1-sigma uncertainty of z"),
    "photons_sigma": ("photons", "predicted 1-sigma uncertainty of photons"),
    "ratio": ("", "fraction of the photons in channel 1 (two-channel)"),
    "ratio_sigma": ("", "predicted 1-sigma uncertainty of the ratio"),
    "photons_ch1": ("photons", "photons in channel 1"),
    "photons_ch2": ("photons", "photons in channel 2"),
    "color": ("", "index of the assigned dye in the dye table (-1: unassigned)"),
    "color_prob": ("", "posterior probability of the assigned dye"),
}

REQUIRED = ("frame", "x", "y", "z", "photons", "id")


def empty_table(extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """An empty table with the required columns (and ``extra``), with sensible dtypes."""
    cols = list(REQUIRED) + [c for c in extra if c not in REQUIRED]
    df = pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
    df["frame"] = df["frame"].astype("int64")
    df["id"] = df["id"].astype("int64")
    return df
