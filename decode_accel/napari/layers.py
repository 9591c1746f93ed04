"""Localization tables, renders and probability maps as napari layer data (``(data, kwargs, type)``).

Nothing here imports napari: the tuples are what a napari reader returns and what
``viewer._add_layer_from_data`` / ``napari.layers.Layer.create`` take, so they are testable anywhere.

Coordinates (world = nm, DESIGN "Fixed conventions"): a camera pixel (row i, column j) has its centre at
y = (i + 0.5)·px, x = (j + 0.5)·px. napari puts an image pixel's centre at ``index * scale + translate``,
so a movie is shown with scale px and translate px/2, a render with its own pixel size r and translate
r/2, and points at their table values (frame, y, x).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["movie_transform", "points_layer_data", "render_layer_data", "probability_layer_data",
           "resolve_color_by", "dye_colors", "POINT_FEATURES", "DYE_COLORS", "COLOR_BY"]

#: table columns carried as point features (shown in napari's status bar under the cursor), when present
POINT_FEATURES = ("prob", "photons", "x_sigma", "y_sigma", "z", "z_sigma", "bg", "photons_sigma", "ratio",
                  "ratio_sigma", "photons_ch1", "photons_ch2", "color", "color_prob", "id")
#: face colours of dyes 0, 1, 2, ... (colour by dye); unassigned rows (color = -1) are grey
DYE_COLORS = ("#00d0ff", "#ff3080", "#ffd000", "#60ff60", "#b070ff")
UNASSIGNED_COLOR = "#808080"
#: how points can be coloured (see :func:`resolve_color_by`)
COLOR_BY = ("auto", "probability", "dye")


def movie_transform(px_size_nm: float, ndim: int = 3) -> dict:
    """``scale``/``translate``/``units`` that put a camera movie ``(T, [C,] H, W)`` into nm world coordinates."""
    px = float(px_size_nm)
    lead = ndim - 2
    return dict(scale=(1.0,) * lead + (px, px), translate=(0.0,) * lead + (px / 2, px / 2),
                units=("pixel",) * lead + ("nm", "nm"))


def _uncertainty(table: pd.DataFrame) -> np.ndarray | None:
    """Lateral 1-sigma uncertainty (nm) per row: the RMS of x_sigma and y_sigma (ThunderSTORM's uncertainty_xy)."""
    if "x_sigma" in table.columns and "y_sigma" in table.columns:
        sx = table["x_sigma"].to_numpy(np.float64)
        sy = table["y_sigma"].to_numpy(np.float64)
        return np.sqrt(0.5 * (sx ** 2 + sy ** 2))
    return None


def dye_names(table: pd.DataFrame, dye_table=None) -> np.ndarray:
    """Per row: the dye's name from the dye table (``dye<k>`` without one), ``unassigned`` for colour -1."""
    color = table["color"].to_numpy() if "color" in table.columns else np.full(len(table), -1)
    names = [str(d.get("name", f"dye{k}")) if isinstance(d, dict) else str(getattr(d, "name", f"dye{k}"))
             for k, d in enumerate(dye_table or [])]
    out = []
    for c in color:
        c = int(c) if np.isfinite(c) else -1
        out.append("unassigned" if c < 0 else names[c] if c < len(names) else f"dye{c}")
    return np.asarray(out, dtype=object)


def resolve_color_by(color_by: str, table: pd.DataFrame) -> str:
    """``'auto'``: by dye when the table has a dye column (a two-channel model with a dye table), else by
    probability; ``'dye'`` without a dye column falls back to probability too."""
    if color_by not in COLOR_BY:
        raise ValueError(f"color_by must be one of {', '.join(COLOR_BY)}, got {color_by!r}")
    has_dye = "color" in table.columns
    if color_by == "auto":
        return "dye" if has_dye else "probability"
    return "probability" if color_by == "dye" and not has_dye else color_by


def _dye_index(table: pd.DataFrame) -> np.ndarray:
    color = table["color"].to_numpy(np.float64) if "color" in table.columns else np.full(len(table), -1.0)
    return np.where(np.isfinite(color), color, -1).astype(np.int64)


def dye_colors(table: pd.DataFrame, dye_table=None) -> tuple[list[str], dict[str, str]]:
    """Colour by dye: each row's face colour and the legend (dye name -> colour).

    Dye k is ``DYE_COLORS[k]`` (k: the dye table's order, the table's ``color``), whichever dyes a file
    happens to contain; unassigned rows (color -1) are grey."""
    def color_of(k: int) -> str:
        return UNASSIGNED_COLOR if k < 0 else DYE_COLORS[k % len(DYE_COLORS)]

    index = _dye_index(table)
    known = np.arange(len(dye_table or []))
    legend = {}
    for k in np.concatenate([known, np.unique(index)]):
        name = dye_names(pd.DataFrame({"color": [int(k)]}), dye_table)[0]
        legend.setdefault(name, color_of(int(k)))
    return [color_of(int(k)) for k in index], legend


def points_layer_data(table: pd.DataFrame, *, px_size_nm: float | None = None, color_by: str = "probability",
                      dye_table=None, name: str = "localizations", size_nm: float | None = None,
                      metadata: dict | None = None) -> tuple:
    """A localization table (nm, 0-based frames) as a 3D points layer ``(frame, y, x)`` in nm.

    Args:
        table: localization table (decode_accel.table); ``attrs`` may carry px_size_nm.
        px_size_nm: camera pixel size (nm): sets the default point size (1.5 px) and goes into metadata.
        color_by: ``'probability'`` (viridis over prob 0-1), ``'dye'`` (one colour per assigned dye, grey for
            unassigned rows; :func:`dye_colors`) or ``'auto'`` (dye when the table has a ``color`` column).
        dye_table: dye rows ``{name, ...}`` for the names of colour-by-dye.
        size_nm: ring diameter (nm); default 1.5 camera pixels (150 nm without a pixel size), so the spot
            stays visible inside it.

    Returns:
        ``(data, kwargs, "points")``; the features hold prob, photons, x_sigma, y_sigma, uncertainty
        (lateral, nm), z and whatever else of :data:`POINT_FEATURES` the table has, plus ``dye``.
    """
    color_by = resolve_color_by(color_by, table)
    px = px_size_nm if px_size_nm is not None else (table.attrs or {}).get("px_size_nm")
    n = len(table)
    if n:
        data = np.column_stack([table["frame"].to_numpy(np.float64), table["y"].to_numpy(np.float64),
                                table["x"].to_numpy(np.float64)])
    else:
        data = np.zeros((0, 3))
    features = pd.DataFrame({c: table[c].to_numpy() for c in POINT_FEATURES if c in table.columns})
    unc = _uncertainty(table)
    if unc is not None:
        features["uncertainty"] = unc
    features["dye"] = dye_names(table, dye_table)
    kwargs = dict(name=name, ndim=3, features=features, size=float(size_nm or 1.5 * (px or 100.0)),
                  units=("pixel", "nm", "nm"),
                  border_width=0, opacity=0.9, symbol="ring",
                  metadata=dict(metadata or {}, px_size_nm=px, n_localizations=n, color_by=color_by))
    if n and color_by == "probability" and "prob" in features.columns:
        kwargs.update(face_color="prob", face_colormap="viridis", face_contrast_limits=(0.0, 1.0))
    elif n and color_by == "dye":
        face, legend = dye_colors(table, dye_table)
        kwargs.update(face_color=face)
        kwargs["metadata"]["dye_colors"] = legend  # dye name -> face colour
    else:
        kwargs.update(face_color="#ffd000")
    return data, kwargs, "points"


def render_layer_data(image: np.ndarray, *, render_px_nm: float, name: str = "render",
                      percentile: float = 99.5) -> tuple:
    """A rendered super-resolution image (decode_accel.inference.render) as an image layer in nm.

    The contrast is stretched to the ``percentile`` of the non-zero pixels, as ``render.save_image`` does.
    """
    img = np.asarray(image, dtype=np.float32)
    nz = img[img > 0]
    vmax = float(np.percentile(nz, percentile)) if nz.size else 1.0
    r = float(render_px_nm)
    kwargs = dict(name=name, scale=(r, r), translate=(r / 2, r / 2), units=("nm", "nm"), colormap="hot",
                  blending="additive",
                  contrast_limits=(0.0, vmax if vmax > 0 else 1.0), metadata=dict(render_px_nm=r))
    return img, kwargs, "image"


def probability_layer_data(p: np.ndarray, *, px_size_nm: float, frame: int,
                           name: str = "detection probability") -> tuple:
    """The network's per-pixel detection probability of one frame ``(H, W)`` as an image layer in nm."""
    p = np.asarray(p, dtype=np.float32)
    while p.ndim > 2:  # (C, H, W): the most probable channel per pixel
        p = p.max(axis=0)
    px = float(px_size_nm)
    kwargs = dict(name=name, scale=(px, px), translate=(px / 2, px / 2), units=("nm", "nm"), colormap="magma",
                  blending="additive",
                  contrast_limits=(0.0, 1.0), opacity=0.7, metadata=dict(frame=int(frame), px_size_nm=px))
    return p, kwargs, "image"
