"""Camera gain and offset from a movie itself: the mean–variance (photon-transfer) relation of background pixels.

For a linear camera the temporal variance of a pixel in ADU² is ``v = a·(m − o) + r`` with m its
temporal mean (ADU), o the offset (ADU), r the read-noise variance (ADU²) and the slope
``a`` = ADU per photoelectron × F² (F² = 2 for an EMCCD's gain register, 1 for sCMOS/CCD). So

* sCMOS / CCD: e⁻/ADU = 1/a;
* EMCCD: EM gain / (e⁻/ADU) = a/2 (only that ratio is identifiable from the movie).

Pixels that a molecule lit in any frame are left out (blinking inflates their variance). The
uncertainty of every estimate is the standard deviation over bootstrap resamples of the pixels.
The offset is identifiable only through the intercept ``r − a·o``: with r unknown it is taken as 0
and the estimate of o is then biased by −r/a; the result says so (``assumed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from .spots import detect_spots


@dataclass
class MeanVarianceFit:
    """Result of :func:`mean_variance`.

    Attributes:
        slope, slope_sd: a (ADU²/ADU = ADU per e⁻ times F²) and its bootstrap sd.
        offset, offset_sd: o (ADU), None when it was given.
        read_var, read_var_sd: r (ADU²) from the intercept when the offset is known (a check of a
            given read-noise map), else None.
        n_pixels: background pixels used.
        notes: what was assumed.
        means, variances: the pixels' (m, v), for plots.
    """

    slope: float
    slope_sd: float
    offset: float | None
    offset_sd: float | None
    read_var: float | None
    read_var_sd: float | None
    n_pixels: int
    notes: list[str] = field(default_factory=list)
    means: np.ndarray | None = None
    variances: np.ndarray | None = None


def background_mask(movie_adu: np.ndarray, sigma: float = 1.0, threshold: float = 4.0, grow: int = 3) -> np.ndarray:
    """(H, W) bool: pixels never near a spot in any frame (DoG maxima above ``threshold`` robust sd)."""
    from scipy import ndimage  # heavy: scipy.ndimage is slow to import, only this step needs it


    T, H, W = movie_adu.shape
    cands = detect_spots(movie_adu.astype(np.float64), sigma=sigma, threshold=threshold)
    lit = np.zeros((H, W), bool)
    lit[cands[:, 1], cands[:, 2]] = True
    lit = ndimage.binary_dilation(lit, iterations=grow)
    return ~lit


def mean_variance(movie_adu: np.ndarray, *, offset: float | np.ndarray | None = None, read_var: float | np.ndarray | None = None,
                  mask: np.ndarray | None = None, n_boot: int = 200, seed: int = 0) -> MeanVarianceFit:
    """Fit ``v = a·(m − o) + r`` over background pixels of a movie (T >= 3 frames).

    Args:
        movie_adu: (T, H, W) camera counts (ADU).
        offset: known offset (ADU, scalar or (H, W) map) or None to estimate it.
        read_var: known read-noise variance (ADU², scalar or map) or None.
        mask: (H, W) pixels to use; default :func:`background_mask`.
        n_boot: bootstrap resamples for the uncertainties.

    Returns:
        :class:`MeanVarianceFit`.
    """
    movie = np.asarray(movie_adu, dtype=np.float64)
    T = movie.shape[0]
    if T < 3:
        raise ValueError(f"the mean-variance estimate needs at least 3 frames, got {T}")
    # a global level that changes from frame to frame (lamp, bleaching) is not pixel noise: remove it
    level = np.median(movie.reshape(T, -1), axis=1)
    movie = movie - (level - np.median(level))[:, None, None]
    m = movie.mean(0)
    v = movie.var(0, ddof=1)
    if mask is None:
        mask = background_mask(movie)
    # robustly drop what the mask missed (cosmic rays, a blink just below the threshold)
    sel = mask & np.isfinite(v)
    med, mad = np.median(v[sel]), 1.4826 * np.median(np.abs(v[sel] - np.median(v[sel])))
    sel &= v < med + 8 * mad
    mm, vv = m[sel], v[sel]
    oo = None if offset is None else np.broadcast_to(np.asarray(offset, np.float64), m.shape)[sel]
    rr = None if read_var is None else np.broadcast_to(np.asarray(read_var, np.float64), m.shape)[sel]
    notes: list[str] = []

    def est(idx):
        mi, vi = mm[idx], vv[idx]
        if oo is not None:
            oi = oo[idx]
            A = np.stack([mi - oi, np.ones_like(mi)], 1)
            a, r = np.linalg.lstsq(A, vi, rcond=None)[0]
            return a, None, r
        A = np.stack([mi, np.ones_like(mi)], 1)
        a, c = np.linalg.lstsq(A, vi, rcond=None)[0]
        r = 0.0 if rr is None else float(np.mean(rr[idx]))
        return a, (r - c) / a if a != 0 else np.nan, None

    full = est(np.arange(len(mm)))
    rng = np.random.default_rng(seed)
    boots = np.array([[np.nan if x is None else x for x in est(rng.integers(0, len(mm), len(mm)))]
                      for _ in range(n_boot)], dtype=np.float64)
    sd = np.array([np.std(col[np.isfinite(col)]) if np.isfinite(col).any() else np.nan for col in boots.T])
    if offset is None and read_var is None:
        notes.append("offset from the intercept with read noise assumed 0 (biased low by read variance / slope)")
    if offset is None and np.ptp(mm) < 3 * np.sqrt(np.median(vv) / T):
        notes.append("the background hardly varies between pixels: slope and offset are poorly determined")
    a, o, r = full
    return MeanVarianceFit(slope=float(a), slope_sd=float(sd[0]), offset=None if o is None else float(o),
                           offset_sd=None if o is None else float(sd[1]), read_var=None if r is None else float(r),
                           read_var_sd=None if r is None else float(sd[2]), n_pixels=int(len(mm)), notes=notes,
                           means=mm, variances=vv)
