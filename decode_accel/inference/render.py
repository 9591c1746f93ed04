"""Super-resolution images from a localization table (x, y in nm).

Two renderings:

* ``histogram``: each localization adds 1 to the render pixel that contains it;
* ``gaussian``: each localization adds a normalised 2D Gaussian, integrated exactly over every
  render pixel (differences of error functions), with sigma = the localization's own predicted
  uncertainty (``x_sigma``, ``y_sigma``, nm) or a fixed ``sigma_nm``. Each localization adds a
  total of 1 (less only where its Gaussian leaves the image), so the image is a density of
  localizations per render pixel in both modes.

The render grid's origin is the image's top-left corner (x = y = 0 nm), so a render pixel
(row i, column j) covers x in [j·px, (j+1)·px), y in [i·px, (i+1)·px).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from decode_accel.errors import DecodeAccelError

__all__ = ["render", "save_image"]

#: Gaussians are cut off at this many sigmas (the mass beyond 4 sigma per axis is < 1e-4).
_CUTOFF_SIGMAS = 4.0


def render(table: pd.DataFrame, *, px_size_nm: float = 10.0, method: str = "gaussian",
           sigma_nm: float | None = None, width_nm: float | None = None, height_nm: float | None = None,
           out: str | os.PathLike | None = None, min_sigma_nm: float | None = None) -> np.ndarray:
    """Render a table into an image of shape ``(ceil(height_nm/px), ceil(width_nm/px))`` (float32).

    Args:
        table: localization table with x, y in nm (``x_sigma``, ``y_sigma`` in nm for
            ``gaussian`` without ``sigma_nm``).
        px_size_nm: render pixel size (nm), > 0.
        method: ``'gaussian'`` or ``'histogram'``.
        sigma_nm: fixed Gaussian sigma (nm); default: each row's ``x_sigma``/``y_sigma``.
        width_nm, height_nm: field of view (nm); default: the camera field from ``table.attrs``
            (``width``, ``height`` in camera px times ``px_size_nm``) or else the largest x, y.
        out: also save the image: ``.png`` (contrast-stretched, 'hot' colour map) or
            ``.tif``/``.tiff`` (float32 values).
        min_sigma_nm: lower bound of per-row sigmas (default: half a render pixel), so
            over-confident rows do not render as single bright pixels.

    Returns:
        The image, localizations per render pixel.
    """
    if not (px_size_nm and px_size_nm > 0 and math.isfinite(px_size_nm)):
        raise DecodeAccelError(f"render pixel size must be > 0 nm, got {px_size_nm}", field="px_size_nm")
    if method not in ("gaussian", "histogram"):
        raise DecodeAccelError(f"unknown rendering {method!r}", field="method", fix="use 'gaussian' or 'histogram'")
    for col in ("x", "y"):
        if col not in table.columns:
            raise DecodeAccelError(f"table has no {col!r} column (nm)", field=col)
    x = table["x"].to_numpy(dtype=np.float64)
    y = table["y"].to_numpy(dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    width_nm, height_nm = _extent(table, x[ok], y[ok], width_nm, height_nm)
    w, h = max(1, math.ceil(width_nm / px_size_nm)), max(1, math.ceil(height_nm / px_size_nm))
    if method == "histogram":
        img = _histogram(x[ok], y[ok], h, w, px_size_nm)
    else:
        if sigma_nm is not None:
            if not sigma_nm > 0:
                raise DecodeAccelError(f"must be > 0 nm, got {sigma_nm}", field="sigma_nm")
            sx = np.full(len(x), float(sigma_nm))
            sy = sx
        else:
            if "x_sigma" not in table.columns or "y_sigma" not in table.columns:
                raise DecodeAccelError("table has no x_sigma/y_sigma columns for the Gaussian widths", field="sigma_nm",
                                       fix="pass sigma_nm=... (a fixed width in nm) or use method='histogram'")
            sx = table["x_sigma"].to_numpy(dtype=np.float64)
            sy = table["y_sigma"].to_numpy(dtype=np.float64)
            floor = 0.5 * px_size_nm if min_sigma_nm is None else float(min_sigma_nm)
            sx, sy = np.maximum(np.nan_to_num(sx, nan=floor), floor), np.maximum(np.nan_to_num(sy, nan=floor), floor)
        img = _gaussian(x[ok], y[ok], sx[ok], sy[ok], h, w, px_size_nm)
    if out is not None:
        save_image(img, out)
    return img


def _extent(table, x, y, width_nm, height_nm):
    attrs = getattr(table, "attrs", {}) or {}
    cam_px = attrs.get("px_size_nm")
    if width_nm is None:
        width_nm = attrs["width"] * cam_px if cam_px and attrs.get("width") else (float(x.max()) if len(x) else 1.0)
    if height_nm is None:
        height_nm = attrs["height"] * cam_px if cam_px and attrs.get("height") else (float(y.max()) if len(y) else 1.0)
    if not (width_nm > 0 and height_nm > 0):
        raise DecodeAccelError(f"field of view {width_nm} x {height_nm} nm is empty", field="width_nm/height_nm")
    return float(width_nm), float(height_nm)


def _histogram(x, y, h, w, px):
    j = np.floor(x / px).astype(np.int64)
    i = np.floor(y / px).astype(np.int64)
    inside = (i >= 0) & (i < h) & (j >= 0) & (j < w)
    counts = np.bincount(i[inside] * w + j[inside], minlength=h * w)
    return counts.reshape(h, w).astype(np.float32)


def _axis_weights(c, s, n, px, r):
    """Per-row pixel-integrated 1D Gaussian weights over pixels ``start .. start + 2r`` (clipped)."""
    centre = np.floor(c / px).astype(np.int64)
    start = centre - r
    edges = (start[:, None] + np.arange(2 * r + 2)[None, :]) * px  # pixel edges in nm
    from scipy.special import erf  # here, not at import: predict's start-up does not pay for scipy

    cdf = 0.5 * (1.0 + erf((edges - c[:, None]) / (math.sqrt(2.0) * s[:, None])))
    weights = np.diff(cdf, axis=1)  # (n, 2r + 1)
    idx = start[:, None] + np.arange(2 * r + 1)[None, :]
    weights[(idx < 0) | (idx >= n)] = 0.0
    return weights, np.clip(idx, 0, n - 1)


def _gaussian(x, y, sx, sy, h, w, px, chunk=20000):
    img = np.zeros(h * w, dtype=np.float64)
    if not len(x):
        return img.reshape(h, w).astype(np.float32)
    radius = np.ceil(_CUTOFF_SIGMAS * np.maximum(sx, sy) / px).astype(np.int64) + 1
    # Group rows by patch radius so that wide and narrow Gaussians do not share one patch size.
    for r in np.unique(radius):
        sel = np.nonzero(radius == r)[0]
        step = max(1, chunk // int((2 * r + 1) ** 2))  # bounds the patch memory per call
        for k in range(0, len(sel), step):
            part = sel[k:k + step]
            wx, jx = _axis_weights(x[part], sx[part], w, px, int(r))
            wy, iy = _axis_weights(y[part], sy[part], h, px, int(r))
            patch = wy[:, :, None] * wx[:, None, :]
            flat = iy[:, :, None] * w + jx[:, None, :]
            img += np.bincount(flat.ravel(), weights=patch.ravel(), minlength=h * w)
    return img.reshape(h, w).astype(np.float32)


def save_image(img: np.ndarray, path: str | os.PathLike, *, percentile: float = 99.5, cmap: str = "hot") -> None:
    """Save a rendered image: ``.tif``/``.tiff`` as float32 values, ``.png`` contrast-stretched
    to the ``percentile`` of its non-zero pixels with a matplotlib colour map."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, np.asarray(img, dtype=np.float32))
    elif suffix == ".png":
        from matplotlib import image as mpl_image  # no pyplot: works without a display
        nz = img[img > 0]
        vmax = float(np.percentile(nz, percentile)) if nz.size else 1.0
        mpl_image.imsave(path, img, cmap=cmap, vmin=0.0, vmax=vmax if vmax > 0 else 1.0)
    else:
        raise DecodeAccelError(f"unknown image format {path.suffix!r}", path=path, field="--render",
                               fix="use .png or .tif")
