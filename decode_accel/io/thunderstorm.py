"""ThunderSTORM CSV: the localization-table format most SMLM tools read.

Columns (DESIGN.md), frames 1-based, positions in nm:
"id","frame","x [nm]","y [nm]","z [nm]","intensity [photon]","offset [photon]","uncertainty_xy [nm]",
"uncertainty_z [nm]", then "uncertainty_x [nm]","uncertainty_y [nm]" and "prob" when known, and for
two-channel tables
"intensity_ch1 [photon]","intensity_ch2 [photon]","ratio","ratio_uncertainty","color".

Mapping to the table (decode_accel.table): intensity = photons, offset = bg (photons/px),
uncertainty_xy = sqrt((x_sigma^2 + y_sigma^2) / 2) (one number per localization, as in ThunderSTORM;
ThunderSTORM's own reader uses it), plus the per-axis uncertainty_x = x_sigma, uncertainty_y = y_sigma
so that each axis can be checked on its own (they read back as x_sigma, y_sigma; a file without them
reads uncertainty_xy into both), uncertainty_z = z_sigma, ratio_uncertainty = ratio_sigma.
photons_sigma and color_prob have no ThunderSTORM column and are not written (the Picasso HDF5
writer keeps them).
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pandas as pd

from decode_accel.errors import DecodeAccelError
from decode_accel.io._atomic import atomic_path
from decode_accel.io._common import check_table_for_writing, integer_column, require_finite

BASE_COLUMNS = ["id", "frame", "x [nm]", "y [nm]", "z [nm]", "intensity [photon]", "offset [photon]",
                "uncertainty_xy [nm]", "uncertainty_z [nm]"]
TWO_CHANNEL_COLUMNS = ["intensity_ch1 [photon]", "intensity_ch2 [photon]", "ratio", "ratio_uncertainty", "color"]

#: CSV column -> table column for the one-to-one columns.
_DIRECT = {"x [nm]": "x", "y [nm]": "y", "z [nm]": "z", "intensity [photon]": "photons", "offset [photon]": "bg",
           "uncertainty_z [nm]": "z_sigma", "prob": "prob", "intensity_ch1 [photon]": "photons_ch1",
           "intensity_ch2 [photon]": "photons_ch2", "ratio": "ratio", "ratio_uncertainty": "ratio_sigma"}
READ_REQUIRED = ("frame", "x [nm]", "y [nm]", "intensity [photon]")


def _col(df: pd.DataFrame, name: str) -> np.ndarray:
    if name in df.columns:
        return pd.to_numeric(df[name], errors="coerce").to_numpy(np.float64)
    return np.full(len(df), np.nan)


def write_thunderstorm_csv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a localization table (nm, 0-based frames) as a ThunderSTORM CSV (1-based frames), atomically."""
    check_table_for_writing(df, path)
    n = len(df)
    out = pd.DataFrame(index=range(n))
    out["id"] = df["id"].to_numpy(np.int64) if "id" in df.columns else np.arange(1, n + 1, dtype=np.int64)
    out["frame"] = df["frame"].to_numpy(np.float64).astype(np.int64) + 1
    out["x [nm]"] = _col(df, "x")
    out["y [nm]"] = _col(df, "y")
    out["z [nm]"] = _col(df, "z") if "z" in df.columns else np.zeros(n)
    out["intensity [photon]"] = _col(df, "photons")
    out["offset [photon]"] = _col(df, "bg")
    sx, sy = _col(df, "x_sigma"), _col(df, "y_sigma")
    both = np.isfinite(sx) & np.isfinite(sy)
    out["uncertainty_xy [nm]"] = np.where(both, np.sqrt((sx**2 + sy**2) / 2), np.where(np.isfinite(sx), sx, sy))
    out["uncertainty_z [nm]"] = _col(df, "z_sigma")
    if "x_sigma" in df.columns or "y_sigma" in df.columns:
        out["uncertainty_x [nm]"] = sx
        out["uncertainty_y [nm]"] = sy
    if "prob" in df.columns:
        out["prob"] = _col(df, "prob")
    if any(c in df.columns for c in ("ratio", "photons_ch1", "photons_ch2", "color")):
        out["intensity_ch1 [photon]"] = _col(df, "photons_ch1")
        out["intensity_ch2 [photon]"] = _col(df, "photons_ch2")
        out["ratio"] = _col(df, "ratio")
        out["ratio_uncertainty"] = _col(df, "ratio_sigma")
        color = _col(df, "color")
        out["color"] = np.where(np.isfinite(color), color, -1).astype(np.int64)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            # Quoted header as ThunderSTORM writes it; repr-precision numbers (pandas default) so that a round
            # trip keeps every value exactly; unknown values as NaN (Java's Double.parseDouble reads it).
            fh.write(",".join(f'"{c}"' for c in out.columns) + "\n")
            out.to_csv(fh, index=False, header=False, na_rep="NaN", lineterminator="\n")


def read_thunderstorm_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ThunderSTORM CSV into a localization table (nm, 0-based frames).

    Required columns: "frame", "x [nm]", "y [nm]", "intensity [photon]"; the others are optional
    (missing z reads as 0, missing id as -1). Columns this package does not know are ignored.
    Raises DecodeAccelError naming the file and column on any malformed content.
    """
    if not os.path.isfile(path):
        raise DecodeAccelError("file not found", path=path, fix="check the path")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DecodeAccelError("the file is empty", path=path, fix="expected a ThunderSTORM CSV with a header") \
            from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        msg = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DecodeAccelError(f"not a readable CSV ({msg})", path=path, fix="expected a ThunderSTORM CSV") \
            from None
    raw.columns = [str(c).strip() for c in raw.columns]
    if "uncertainty_xy [nm]" not in raw.columns and "uncertainty [nm]" in raw.columns:
        raw = raw.rename(columns={"uncertainty [nm]": "uncertainty_xy [nm]"})  # ThunderSTORM < 1.3 name
    for col in READ_REQUIRED:
        if col not in raw.columns:
            raise DecodeAccelError("missing column", path=path, field=col,
                                   fix=f"a ThunderSTORM CSV needs the columns {', '.join(READ_REQUIRED)}")

    def values(col: str) -> np.ndarray:
        """The column as float64; empty cells and "NaN" read as NaN, anything else non-numeric is an error."""
        text = raw[col].astype(str).str.strip().to_numpy()
        missing = (text == "") | (np.char.lower(text.astype(str)) == "nan")
        converted = pd.to_numeric(pd.Series(np.where(missing, "nan", text)), errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(np.isnan(converted) & ~missing)
        if len(bad):
            shown = text[bad[0]][:40]
            raise DecodeAccelError(f"non-numeric value {shown!r} in data row {int(bad[0]) + 1}", path=path,
                                   field=col, fix="the column must hold numbers")
        return converted

    out: dict[str, np.ndarray] = {}
    out["frame"] = integer_column(values("frame"), path, "frame", minimum=1) - 1
    for csv_col, col in _DIRECT.items():
        if csv_col in raw.columns:
            out[col] = values(csv_col)
    for col in ("x", "y", "photons"):
        require_finite(out[col], path, {"x": "x [nm]", "y": "y [nm]", "photons": "intensity [photon]"}[col])
    if "z" not in out:
        out["z"] = np.zeros(len(raw))
    elif not np.all(np.isfinite(out["z"])):
        require_finite(out["z"], path, "z [nm]")
    if "id" in raw.columns:
        ids = values("id")
        ids = np.where(np.isfinite(ids), ids, -1.0)
        out["id"] = integer_column(ids, path, "id", minimum=-1)
    else:
        out["id"] = np.full(len(raw), -1, dtype=np.int64)
    if "uncertainty_xy [nm]" in raw.columns:
        u = values("uncertainty_xy [nm]")
        out["x_sigma"] = u
        out["y_sigma"] = u.copy()
    for axis in ("x", "y"):
        if f"uncertainty_{axis} [nm]" in raw.columns:
            out[f"{axis}_sigma"] = values(f"uncertainty_{axis} [nm]")
    if "color" in raw.columns:
        c = values("color")
        out["color"] = integer_column(np.where(np.isfinite(c), c, -1.0), path, "color", minimum=-1)
    order = ["frame", "x", "y", "z", "photons", "id", "bg", "prob", "x_sigma", "y_sigma", "z_sigma",
             "photons_ch1", "photons_ch2", "ratio", "ratio_sigma", "color"]
    return pd.DataFrame({k: out[k] for k in order if k in out})
