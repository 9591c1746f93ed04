"""Post-processing: per-pixel model output maps -> localization table (nm).

The network predicts, for every pixel, a detection probability p and the features of the emitter
that pixel would stand for (sub-pixel offsets dx, dy from the pixel centre, z, photons, sigmas,
...). One emitter usually lights up a small blob of pixels, whose p add up to about 1, and each
pixel of the blob predicts (nearly) the same absolute position. Post-processing turns the blobs
into one row each:

1. **Candidates.** Local maxima of p in their 3x3 neighbourhood (exact ties go to the first pixel
   in raster order, so a blob split evenly over two pixels gives one candidate), plus *split*
   candidates: pixels that are not local maxima but have p > ``split_threshold`` (a second emitter
   in an adjacent pixel, as in DECODE's spatial integration). A split candidate whose predicted
   position lies within ``merge_radius_px`` of the prediction of an adjacent local maximum (or of
   a more probable adjacent split candidate) is the same emitter and is demoted to a blob pixel.
2. **Aggregation.** Every other pixel is assigned to the most probable candidate among its 8
   neighbours *whose predicted position agrees with its own* (distance < ``merge_radius_px``).
   A candidate's probability is the sum of its own p and the p of its pixels (clamped to 1), and its
   features are the **p-weighted average** over those pixels.
   Why this rather than DECODE's plus-shaped sum plus look-up at the maximum: (a) an emitter at a
   pixel corner spreads over a 2x2 block, and the plus shape misses the diagonal pixel; the
   position check makes the full 3x3 neighbourhood safe, because pixels that predict a different
   emitter are never merged; (b) each blob pixel makes its own estimate of the same emitter; the
   p-weighted mean uses them all instead of trusting the maximum alone, and for an emitter on a
   pixel border (two pixels of similar p) it does not jump with whichever pixel wins by a hair;
   (c) a pixel next to two detections gives its p to one of them only, so probability is not
   counted twice.
3. **Threshold.** Keep candidates whose aggregated p >= ``threshold``.
4. **Units.** x = (j + 0.5 + dx) * px, y = (i + 0.5 + dy) * px (pixel centres, image origin at the
   top-left corner), plus ``roi_offset`` (row, col) in px for tiles; sigmas in nm; bg summed over
   channels (photons/px). With a :class:`SubpixelEqualisation` (from the export's operating point)
   x and y are then remapped within their pixel so that their sub-pixel fractions are uniform, and
   with a :class:`ZResponseCalibration` z is mapped so that its mean error is ~0 at every depth.
5. **Colour** (two-channel, with a dye table): posterior of each dye d given the predicted ratio r,
   P(d | r) ∝ prior_d * N(r; ratio_d, ratio_sigma^2 + ratio_sd_d^2); ``color`` = argmax,
   ``color_prob`` = its posterior; ``color`` = -1 when the posterior is below ``min_color_prob``.

Everything is vectorized in torch and runs on the device of the maps.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from decode_accel.config_base import StrictModel
from decode_accel.errors import DecodeAccelError

# The 3x3 neighbourhood (row, col) offsets, the pixel itself first; and the 4 neighbours before a pixel in
# raster order (for tie-breaking).
_OFFSETS = [(0, 0)] + [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)]
_EARLIER = [(-1, -1), (-1, 0), (-1, 1), (0, -1)]

# Per-pixel maps averaged over a blob -> output column, and the factor that converts them to table units
# ("px" = multiply by the pixel size). Positions, z, photons and bg are handled separately.
_FEATURES = {
    "dx_sigma": ("x_sigma", "px"),
    "dy_sigma": ("y_sigma", "px"),
    "z_sigma": ("z_sigma", None),
    "photons_sigma": ("photons_sigma", None),
    "photons_ch1": ("photons_ch1", None),
    "photons_ch2": ("photons_ch2", None),
    "ratio": ("ratio", None),
    "ratio_sigma": ("ratio_sigma", None),
}


_REQUIRED = object()


def _knot_pairs(first: Sequence[float], second: Sequence[float]) -> tuple[np.ndarray, np.ndarray, bool]:
    """Two knot sequences of a piecewise-linear map as float64 arrays, and whether they can be one: 1-D, of
    one length >= 2, finite, the first strictly increasing (what each map adds to that, it checks itself)."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    ok = bool(a.ndim == 1 and a.shape == b.shape and len(a) >= 2 and np.all(np.isfinite(a)) and np.all(np.isfinite(b))
              and np.all(np.diff(a) > 0))
    return a, b, ok


class _StoredCorrection:
    """A correction of the operating point that the export stores as lists of numbers: :meth:`to_dict` writes
    the constructor arguments named in ``STORED`` ((name, default) in constructor order; ``_REQUIRED``: no
    default), :meth:`from_any` reads them back; ``WHAT`` names the correction in errors, ``FIELD`` is its key."""

    STORED: tuple[tuple[str, Any], ...] = ()
    WHAT = FIELD = ""

    def to_dict(self) -> dict:
        return {name: [float(v) for v in getattr(self, name)] for name, _ in self.STORED}

    @classmethod
    def from_any(cls, value):
        """None, an instance, or its :meth:`to_dict` form (as stored in an export's operating point)."""
        if value is None or isinstance(value, cls):
            return value
        try:
            return cls(*(value[name] if default is _REQUIRED else value.get(name, default)
                         for name, default in cls.STORED))
        except (KeyError, TypeError, AttributeError):
            shape = ", ".join(f"{name}: [...]" for name, _ in cls.STORED)
            raise DecodeAccelError(f"{cls.WHAT} must be {{{shape}}}", field=cls.FIELD,
                                   fix="refit it with choose_operating_point") from None


class ProbabilityCalibration(_StoredCorrection):
    """A monotone map from the network's aggregated detection probability to the share of detections that
    are real, fitted on a tuning movie (:meth:`fit`) and applied by the post-processor.

    Why: the network's p is trained per pixel and summed over an emitter's pixels; it ranks detections
    well but is not a frequency (a model trained at 0.5 emitters/µm² reports p ~ 0.5 for detections of
    which ~80 % are real at 0.1/µm²). After the map, of the localizations reported at p ~ 0.7 about
    70 % are real, at the density of the tuning movie.

    Args:
        raw: knots of the network's probability, strictly increasing in [0, 1].
        calibrated: the share of real detections at each knot, non-decreasing in [0, 1].
    Between knots the map is linear; outside them it is flat.
    """

    STORED = (("raw", _REQUIRED), ("calibrated", _REQUIRED))
    WHAT, FIELD = "a probability calibration", "probability_calibration"

    def __init__(self, raw: Sequence[float], calibrated: Sequence[float]):
        r, c, ok = _knot_pairs(raw, calibrated)
        ok = ok and np.all(np.diff(c) >= 0) and r[0] >= 0 and r[-1] <= 1 and c[0] >= 0 and c[-1] <= 1
        if not ok:
            raise DecodeAccelError("a probability calibration needs >= 2 knots, raw strictly increasing and calibrated "
                                   "non-decreasing, all in [0, 1]", field="probability_calibration",
                                   fix="refit it with decode_accel.pipeline.choose_operating_point")
        self.raw, self.calibrated = r, c

    @classmethod
    def fit(cls, prob: np.ndarray, real: np.ndarray, knots: int = 20) -> "ProbabilityCalibration":
        """Isotonic regression of ``real`` (bool: matched to a true emitter) on ``prob``, summarised by
        ``knots`` equal-count groups of detections (the mean p and mean fitted share of each)."""
        from scipy.optimize import isotonic_regression  # heavy: scipy.optimize only when a calibration is fitted

        prob, real = np.asarray(prob, dtype=np.float64), np.asarray(real, dtype=np.float64)
        if len(prob) < 2 * knots:
            raise DecodeAccelError(f"{len(prob)} detections are too few to calibrate probabilities "
                                   f"(need >= {2 * knots})", field="probability_calibration",
                                   fix="use a longer tuning movie")
        order = np.argsort(prob, kind="stable")
        prob, fitted = prob[order], isotonic_regression(real[order]).x
        groups = np.array_split(np.arange(len(prob)), knots)
        raw = np.array([prob[g].mean() for g in groups])
        cal = np.maximum.accumulate(np.clip([fitted[g].mean() for g in groups], 0.0, 1.0))
        keep = np.concatenate([[True], np.diff(raw) > 0])  # ties of p (e.g. clamped at 1) share a knot
        raw, cal = raw[keep], cal[keep]
        if raw[0] > 0:
            # below the lowest p seen (the tuning prediction's threshold) the map falls linearly to 0 at p = 0:
            # extended flat, it would raise the countless near-zero candidates of empty background
            raw, cal = np.concatenate([[0.0], raw]), np.concatenate([[0.0], cal])
        return cls(raw, cal)

    def __call__(self, prob):
        """The calibrated probability of ``prob`` (numpy array or torch tensor, same type back)."""
        if torch.is_tensor(prob):
            xp = torch.as_tensor(self.raw, dtype=prob.dtype, device=prob.device)
            fp = torch.as_tensor(self.calibrated, dtype=prob.dtype, device=prob.device)
            k = torch.searchsorted(xp, prob.contiguous()).clamp(1, len(xp) - 1)
            x0, x1, y0, y1 = xp[k - 1], xp[k], fp[k - 1], fp[k]
            out = y0 + (prob.clamp(xp[0], xp[-1]) - x0) * (y1 - y0) / (x1 - x0)
            return out
        return np.interp(np.asarray(prob, dtype=np.float64), self.raw, self.calibrated)

    def raw_threshold(self, threshold: float) -> float:
        """The smallest network probability whose calibrated value reaches ``threshold`` (1.0 + tiny if none does)."""
        grid = np.linspace(0.0, 1.0, 100_001)
        above = np.nonzero(self(grid) >= threshold)[0]
        return float(grid[above[0]]) if len(above) else 1.0 + 1e-9


class SubpixelEqualisation(_StoredCorrection):
    """A monotone per-axis map of the sub-pixel fraction that makes a model's positions as uniform within
    their pixel as the emitters are (the sub-pixel equalisation of FD-DeepLoc), fitted on a movie of the
    training physics (:meth:`fit`) and applied by the post-processor.

    Why: a network sees each emitter from the pixel it falls in, and its offset estimate shrinks a little
    towards that pixel's centre where the evidence is weak. Sub-nanometre offsets that depend on the
    position within the pixel are invisible in an RMSE, but they pile positions up inside pixels and show
    as a grid in a super-resolution image (DECODE users reported it, TuragaLab/DECODE#132). The emitters'
    true sub-pixel fractions are uniform, so the map that makes the reported fractions uniform undoes the
    pile-up; it can be fitted without knowing the truth, and more precisely with it (the model's excess
    over the truth's own fractions, see :meth:`fit`).

    The density of the reported fractions u in [0, 1) is summarised by ``harmonics`` Fourier terms,
    f(u) = 1 + sum_k a_k cos(2 pi k u) + b_k sin(2 pi k u), and u goes to F(u) - c, with F the
    cumulative of f and c its mean shift (so the remap moves no position on average). Then ``offset``,
    the constant error of the network measured against the truth of the same movie, is subtracted: its
    root causes are removed in training (zero-initialised offset heads, a learning rate that decays), but
    each trained network keeps one of a nanometre or two, different per axis and per run. Positions are
    in px with the image origin at the top-left corner; a sigma is multiplied by f(u), the map's slope.

    The outermost pixels of a frame are a case of their own (the network sees zero padding beyond them and
    part of the PSF is cut off): ``border``, a :class:`BorderResponse`, then maps the distance of positions
    near each frame border (px) so that their mean error is ~0 at every true distance.

    Args:
        x, y: the coefficients [a_1, b_1, a_2, b_2, ...] of each axis (dimensionless).
        offset: the network's mean error (x, y) in px, subtracted after the remap.
        border: a :class:`BorderResponse` (or its dict form) applied after the offset; None: none.
    """

    STORED = (("x", _REQUIRED), ("y", _REQUIRED), ("offset", (0.0, 0.0)), ("border", None))
    WHAT, FIELD = "a sub-pixel equalisation", "subpixel_equalisation"

    #: below this many positions the Fourier coefficients are too noisy (about sqrt(2 / n) each)
    MIN_POSITIONS = 2000

    def __init__(self, x: Sequence[float], y: Sequence[float], offset: Sequence[float] = (0.0, 0.0),
                 border: Any = None):
        cx, cy = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        shift = np.asarray(offset, dtype=np.float64)
        if shift.shape != (2,) or not np.all(np.isfinite(shift)) or np.any(np.abs(shift) > 0.5):
            raise DecodeAccelError("a sub-pixel equalisation's offset must be two finite numbers within +-0.5 px",
                                   field="subpixel_equalisation.offset",
                                   fix="refit it with decode_accel.pipeline.choose_operating_point")
        ok = (cx.ndim == 1 and cx.shape == cy.shape and len(cx) >= 2 and len(cx) % 2 == 0
              and np.all(np.isfinite(cx)) and np.all(np.isfinite(cy)))
        if not ok:
            raise DecodeAccelError("a sub-pixel equalisation needs x and y lists of the same even length "
                                   "[a_1, b_1, a_2, b_2, ...] of finite numbers", field="subpixel_equalisation",
                                   fix="refit it with decode_accel.pipeline.choose_operating_point")
        for axis, c in (("x", cx), ("y", cy)):
            if self._density(np.linspace(0.0, 1.0, 1001), c).min() <= 0.25:
                raise DecodeAccelError(f"the {axis} sub-pixel density of this equalisation falls to <= 0.25 of "
                                       "uniform: the positions are too strongly gridded to be remapped",
                                       field="subpixel_equalisation", fix="train the model longer")
        self.x, self.y, self.offset = cx, cy, shift
        self.border = BorderResponse.from_any(border)

    def to_dict(self) -> dict:
        out = {name: [float(v) for v in getattr(self, name)] for name in ("x", "y", "offset")}
        return out | ({"border": self.border.to_dict()} if self.border is not None else {})

    @property
    def harmonics(self) -> int:
        return len(self.x) // 2

    @classmethod
    def fit(cls, x_px: np.ndarray, y_px: np.ndarray, harmonics: int = 4, *, true_x_px: np.ndarray | None = None,
            true_y_px: np.ndarray | None = None) -> "SubpixelEqualisation":
        """The equalisation of the positions ``x_px``, ``y_px`` (px, image origin at the top-left corner): the
        Fourier coefficients of their sub-pixel density, 2 <cos(2 pi k u)> and 2 <sin(2 pi k u)>, k = 1 ..
        ``harmonics``; no offset (see :meth:`with_offset`).

        With ``true_x_px``, ``true_y_px`` (the true positions of the same emitters, one per position) the
        coefficients are those of the positions minus those of their truth: the map then removes what the
        model adds to the emitters' sub-pixel distribution and not the finite movie's own departure from
        uniform. That departure is the larger noise: an emitter stays on for several frames at one position,
        so a movie's true fractions scatter ~2.5 times as much as independent ones would, while the
        difference of a position and its truth (an error of a tenth of a pixel, new in every frame) scatters
        less."""
        x, y = np.asarray(x_px, dtype=np.float64), np.asarray(y_px, dtype=np.float64)
        if len(x) < cls.MIN_POSITIONS:
            raise DecodeAccelError(f"{len(x)} positions are too few to equalise sub-pixel fractions "
                                   f"(need >= {cls.MIN_POSITIONS})", field="subpixel_equalisation",
                                   fix="use a longer or denser equalisation movie")
        if (true_x_px is None) != (true_y_px is None):
            raise DecodeAccelError("true_x_px and true_y_px go together", field="subpixel_equalisation")

        def coefficients(v):
            u = 2 * np.pi * np.mod(np.asarray(v, dtype=np.float64), 1.0)
            return np.ravel([[2 * np.mean(np.cos(k * u)), 2 * np.mean(np.sin(k * u))]
                             for k in range(1, harmonics + 1)])
        cx, cy = coefficients(x), coefficients(y)
        if true_x_px is not None:
            if not (np.shape(true_x_px) == np.shape(true_y_px) == x.shape == y.shape):
                raise DecodeAccelError("a paired sub-pixel equalisation needs one true position per position",
                                       field="subpixel_equalisation", fix="pass the matched pairs only")
            cx, cy = cx - coefficients(true_x_px), cy - coefficients(true_y_px)
        return cls(cx, cy)

    def with_offset(self, offset_px: Sequence[float]) -> "SubpixelEqualisation":
        """The same remap followed by subtracting ``offset_px`` (x, y; px), the mean error of the remapped
        positions against a known truth."""
        return type(self)(self.x, self.y, offset_px, self.border)

    def with_border(self, border: "BorderResponse | None") -> "SubpixelEqualisation":
        """The same remap and offset, followed by ``border`` (see :class:`BorderResponse`)."""
        return type(self)(self.x, self.y, self.offset, border)

    @staticmethod
    def _density(u: np.ndarray, c: np.ndarray) -> np.ndarray:
        out = np.ones_like(u)
        for k in range(1, len(c) // 2 + 1):
            out += c[2 * k - 2] * np.cos(2 * np.pi * k * u) + c[2 * k - 1] * np.sin(2 * np.pi * k * u)
        return out

    @staticmethod
    def _remap(v: np.ndarray, c: np.ndarray) -> np.ndarray:
        whole = np.floor(v)
        u = v - whole
        out = u.copy()
        for k in range(1, len(c) // 2 + 1):
            a, b, w = c[2 * k - 2], c[2 * k - 1], 2 * np.pi * k
            # the integral of f from 0 to u, minus its mean over u (b / w) so that positions keep their mean
            out += (a * np.sin(w * u) - b * np.cos(w * u)) / w
        return whole + out

    def __call__(self, x_px: np.ndarray, y_px: np.ndarray, frame_shape: tuple[int, int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The remapped positions (px) and the map's slopes along x and y (to scale sigmas by).
        ``frame_shape`` (height, width in px) of the frame the positions lie in: needed for the border maps
        (without it they are not applied)."""
        x, y = np.asarray(x_px, dtype=np.float64), np.asarray(y_px, dtype=np.float64)
        out_x, out_y = self._remap(x, self.x) - self.offset[0], self._remap(y, self.y) - self.offset[1]
        slope_x, slope_y = self._density(np.mod(x, 1.0), self.x), self._density(np.mod(y, 1.0), self.y)
        if self.border is not None and frame_shape is not None:
            out_x, out_y, bx, by = self.border(out_x, out_y, *frame_shape)
            slope_x, slope_y = slope_x * bx, slope_y * by
        return out_x, out_y, slope_x, slope_y


class ZResponseCalibration(_StoredCorrection):
    """A monotone map from the network's z to the true z, fitted on a movie of the training physics with
    known truth (:meth:`fit`) and applied by the post-processor, so that the mean z error is ~0 at every
    depth (the calibration curve a classical astigmatic fit reads z from, here for the network).

    Why: the network's z is close to the posterior mean of its training prior. Where the PSF carries less
    z information (far from focus, dim emitters), that mean shrinks towards the middle of the range: z is
    compressed at the ends by tens of nm although the overall RMSE is at the bound (even below it: only a
    biased estimator beats the CRLB). Widening the training range does not remove it, because the
    information falls off with depth. The map takes the mean network z at each true depth back to that
    depth; a z sigma is multiplied by the map's slope, the price of an unbiased depth.

    Args:
        predicted: the mean network z (nm) at each knot, strictly increasing.
        true: the true z (nm) of each knot, strictly increasing.
    Between knots the map is linear; beyond the ends it continues with the slope of the end segments.
    """

    STORED = (("predicted", _REQUIRED), ("true", _REQUIRED))
    WHAT, FIELD = "a z calibration", "z_calibration"

    def __init__(self, predicted: Sequence[float], true: Sequence[float]):
        p, t, ok = _knot_pairs(predicted, true)
        ok = ok and np.all(np.diff(t) > 0)
        if not ok:
            raise DecodeAccelError("a z calibration needs >= 2 knots with predicted and true z (nm) both strictly "
                                   "increasing", field="z_calibration",
                                   fix="refit it with decode_accel.pipeline.choose_operating_point")
        self.predicted, self.true = p, t

    @classmethod
    def fit(cls, true_z: np.ndarray, predicted_z: np.ndarray, z_range: tuple[float, float], bins: int = 24,
            min_per_bin: int = 50) -> "ZResponseCalibration":
        """The map of matched pairs (``true_z``, ``predicted_z``, nm) grouped into ``bins`` equal bins of true z
        over ``z_range`` (nm; bins with fewer than ``min_per_bin`` pairs are left out), as 33 knots over the
        central 99 % of the network's z."""
        t, p = np.asarray(true_z, dtype=np.float64), np.asarray(predicted_z, dtype=np.float64)
        edges = np.linspace(float(z_range[0]), float(z_range[1]), bins + 1)
        which = np.clip(np.digitize(t, edges) - 1, 0, bins - 1)
        groups = [which == k for k in range(bins) if np.sum(which == k) >= min_per_bin]
        if len(groups) < 4:
            raise DecodeAccelError(f"{len(t)} matched emitters fill {len(groups)} z bins with >= {min_per_bin} "
                                   "each (need 4)", field="z_calibration", fix="use a longer calibration movie")
        # The map h is a polynomial in the network's z whose mean over the emitters of each true-z bin is
        # that bin's mean true z: E[h(z_net) | z] = z, a linear least-squares problem in its coefficients.
        # (Inverting the mean response instead would leave the curvature's share of the noise as bias:
        # the mean of a curved map of a noisy z is not the map of its mean.) The highest degree <= 5 whose
        # map rises over the network's z range is kept, and stored as knots.
        z_true = np.array([t[g].mean() for g in groups])
        z_net = np.array([p[g].mean() for g in groups])
        if not (np.corrcoef(z_net, z_true)[0, 1] > 0.9 and np.ptp(z_net) > 0.1 * np.ptp(z_true)):
            raise DecodeAccelError("the network's mean z does not increase with the true z: it cannot be calibrated",
                                   field="z_calibration", fix="train the model longer")
        lo, hi = np.percentile(p, [0.5, 99.5])
        scale = max(abs(lo), abs(hi), 1e-9)
        grid = np.linspace(lo, hi, 33)
        for degree in (5, 4, 3, 2, 1):
            def features(v):
                return np.stack([(v / scale) ** j for j in range(degree + 1)], axis=1)
            moments = np.array([features(p[g]).mean(axis=0) for g in groups])
            coef, *_ = np.linalg.lstsq(moments, z_true, rcond=None)
            knots = features(grid) @ coef
            if np.all(np.diff(knots) > 0):
                return cls(grid, knots)
        raise DecodeAccelError("the network's mean z does not increase with the true z: it cannot be calibrated",
                               field="z_calibration", fix="train the model longer")

    def __call__(self, z_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The calibrated z (nm) of network z values ``z_nm`` and the map's slope there (to scale sigmas by)."""
        z = np.asarray(z_nm, dtype=np.float64)
        p, t = self.predicted, self.true
        slopes = np.diff(t) / np.diff(p)
        seg = np.clip(np.searchsorted(p, z) - 1, 0, len(p) - 2)
        return t[seg] + (z - p[seg]) * slopes[seg], slopes[seg]


class BorderResponse:
    """Maps of the distance from each frame border (px) for positions within :data:`REACH_PX` of it, so that
    their mean error is ~0 at every true distance; fitted on a movie of the training physics with known
    truth (:meth:`fit`), applied by :class:`SubpixelEqualisation`.

    Why: beyond the outermost pixels the network sees zero padding, and part of a border emitter's PSF is
    cut off. Trained networks answer with positions shrunk towards the inside (a mean error of +27 nm for
    emitters within 0.1 px of the border, measured on a benchmark model), as a network's z shrinks at the
    ends of its range, and some fire one pixel inside the frame for them. In a frame of 64 x 64 px that is
    6 % of the positions; the sub-pixel equalisation of the interior cannot see it.

    Each side's map is a :class:`ZResponseCalibration` of the distance d from that border (left: x, right:
    width - x, top: y, bottom: height - y). It acts fully for d <= 1 px and fades out linearly to nothing
    at :data:`REACH_PX`. The bottom and right maps were fitted on frames whose height and width are
    multiples of ``size_multiple`` (predict pads other frames there by edge replication, a border the
    network sees differently), so they act only on such frames. A sigma is multiplied by the map's slope.

    Args:
        sides: {"left" | "right" | "top" | "bottom": a ZResponseCalibration or its dict form} (px); a side
            left out has no map.
        size_multiple: the network's frame-size multiple (``model.size_multiple``).
    """

    SIDES = ("left", "right", "top", "bottom")
    #: the maps act on positions up to this distance from their border (px)
    REACH_PX = 2.0
    #: fewest matched emitters within REACH_PX of a side for its map
    MIN_PAIRS = 400

    def __init__(self, sides: Mapping[str, Any], size_multiple: int):
        unknown = sorted(set(sides) - set(self.SIDES))
        if unknown or not sides:
            raise DecodeAccelError(f"a border response needs maps for some of {', '.join(self.SIDES)}, got "
                                   f"{sorted(sides)}", field="subpixel_equalisation.border",
                                   fix="refit it with decode_accel.pipeline.choose_operating_point")
        if int(size_multiple) < 1:
            raise DecodeAccelError(f"size_multiple must be >= 1, got {size_multiple}",
                                   field="subpixel_equalisation.border.size_multiple")
        self.sides = {side: ZResponseCalibration.from_any(m) for side, m in sides.items()}
        self.size_multiple = int(size_multiple)

    def to_dict(self) -> dict:
        return {"sides": {side: m.to_dict() for side, m in self.sides.items()}, "size_multiple": self.size_multiple}

    @classmethod
    def from_any(cls, value):
        """None, an instance, or its :meth:`to_dict` form."""
        if value is None or isinstance(value, cls):
            return value
        try:
            return cls(value["sides"], value["size_multiple"])
        except (KeyError, TypeError, AttributeError):
            raise DecodeAccelError("a border response must be {sides: {left: {predicted, true}, ...}, "
                                   "size_multiple: N}", field="subpixel_equalisation.border",
                                   fix="refit it with decode_accel.pipeline.choose_operating_point") from None

    @staticmethod
    def distances(x_px: np.ndarray, y_px: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
        """Distance (px) of each position from each frame border."""
        values, sizes = {"x": x_px, "y": y_px}, {"x": width, "y": height}
        return {side: sizes[axis] - values[axis] if from_far_end else values[axis]
                for side, (axis, from_far_end) in _BORDER_GEOMETRY.items()}

    @classmethod
    def fit(cls, true_xy: np.ndarray, predicted_xy: np.ndarray, height: int, width: int,
            size_multiple: int) -> "BorderResponse | None":
        """The maps of matched pairs (``true_xy``, ``predicted_xy``: (n, 2) x, y in px) in frames of ``height``
        x ``width`` px: for each side, the pairs whose true position lies within REACH_PX of it, in 10 bins of
        true distance. None when no side has MIN_PAIRS pairs."""
        t, p = np.asarray(true_xy, dtype=np.float64), np.asarray(predicted_xy, dtype=np.float64)
        true_d = cls.distances(t[:, 0], t[:, 1], height, width)
        pred_d = cls.distances(p[:, 0], p[:, 1], height, width)
        sides = {}
        for side in cls.SIDES:
            near = true_d[side] < cls.REACH_PX
            if near.sum() < cls.MIN_PAIRS:
                continue
            try:
                sides[side] = ZResponseCalibration.fit(true_d[side][near], pred_d[side][near], (0.0, cls.REACH_PX),
                                                       bins=10, min_per_bin=max(10, cls.MIN_PAIRS // 20))
            except DecodeAccelError as err:  # an untrained network: no map for this side
                warnings.warn(f"no border map for the {side} side: {err}", stacklevel=2)
        return cls(sides, size_multiple) if sides else None

    def __call__(self, x_px: np.ndarray, y_px: np.ndarray, height: int, width: int):
        """Positions (px) with the border maps applied, and the slopes along x and y (to scale sigmas by)."""
        x, y = np.array(x_px, dtype=np.float64), np.array(y_px, dtype=np.float64)
        slope = {"x": np.ones_like(x), "y": np.ones_like(y)}
        out = {"x": x.copy(), "y": y.copy()}
        distance = self.distances(x, y, height, width)
        fade = 1.0 / (self.REACH_PX - 1.0)
        for side, m in self.sides.items():
            axis, from_far_end = _BORDER_GEOMETRY[side]
            size = width if axis == "x" else height
            if from_far_end and size % self.size_multiple:
                continue  # predict pads this border by edge replication: not the border the map was fitted on
            d = distance[side]
            near = d < self.REACH_PX
            if not near.any():
                continue
            dn = d[near]
            mapped, map_slope = m(dn)
            weight = np.clip((self.REACH_PX - dn) * fade, 0.0, 1.0)
            d_weight = np.where((dn > 1.0) & (dn < self.REACH_PX), -fade, 0.0)
            new_d = dn + weight * (mapped - dn)
            out[axis][near] = size - new_d if from_far_end else new_d
            slope[axis][near] *= 1.0 + weight * (map_slope - 1.0) + d_weight * (mapped - dn)
        return out["x"], out["y"], slope["x"], slope["y"]


#: side -> (the axis it bounds, whether its distance is measured from the far end: width - x, height - y)
_BORDER_GEOMETRY = {"left": ("x", False), "right": ("x", True), "top": ("y", False), "bottom": ("y", True)}


class Dye(StrictModel):
    """One dye of a two-channel experiment: where its ratio sits and how widely it spreads."""

    name: str = Field("dye", description="dye name (free text)")
    ratio: float = Field(0.5, ge=0.0, le=1.0, description="mean fraction of the dye's photons in channel 1 (0-1)")
    ratio_sd: float = Field(0.05, ge=0.0, allow_inf_nan=False,
                            description="spread of the dye's ratio between molecules (1-sigma, 0-1)")
    prob: float = Field(1.0, ge=0.0, allow_inf_nan=False,
                        description="prior probability (relative abundance, >= 0; normalized over dyes)")


class PostProcessConfig(StrictModel):
    """Settings of :class:`PostProcessor`."""

    threshold: float = Field(0.3, gt=0.0, le=1.0,
                             description="minimum aggregated detection probability of a localization (0-1]")
    split_threshold: float = Field(0.6, gt=0.0, le=1.0,
                                   description="p above which a non-maximum pixel is a second emitter (0-1]")
    merge_radius_px: float = Field(0.75, ge=0.0, le=3.0, description="pixels whose predicted positions are closer "
                                                                     "than this belong to the same emitter (px)")
    min_color_prob: float = Field(0.0, ge=0.0, le=1.0,
                                  description="posterior below which the colour is left unassigned (-1) (0-1)")
    dyes: list[Dye] | None = Field(None, min_length=1,
                                   description="dye table for colour assignment (two-channel only; null: none)")


#: other spellings of the dye fields (the simulation config's names).
_DYE_ALIASES = {"ratio_mean": "ratio", "probability": "prob"}


def as_dyes(dye_table: Any) -> list[Dye] | None:
    """A dye table as a list of :class:`Dye`.

    Accepts a list of Dye / dicts, or a DataFrame with columns ratio, ratio_sd[, prob, name];
    ``ratio_mean`` and ``probability`` are accepted for ratio and prob.
    """
    if dye_table is None:
        return None
    if isinstance(dye_table, pd.DataFrame):
        dye_table = dye_table.to_dict("records")

    def one(d):
        if isinstance(d, Dye):
            return d
        if hasattr(d, "model_dump"):  # another pydantic model, e.g. the simulation's dye config
            d = d.model_dump()
        return Dye(**{_DYE_ALIASES.get(k, k): v for k, v in dict(d).items()})

    try:
        dyes = [one(d) for d in dye_table]
    except Exception as exc:  # pydantic ValidationError or a non-mapping row
        raise DecodeAccelError(f"invalid dye table ({str(exc).splitlines()[0]})", field="dye_table",
                               fix="give rows with ratio (0-1), ratio_sd (>= 0) and optional prob, name") from None
    if not dyes:
        raise DecodeAccelError("the dye table is empty", field="dye_table", fix="list at least one dye")
    if sum(d.prob for d in dyes) <= 0:
        raise DecodeAccelError("dye probabilities sum to 0", field="dye_table", fix="give one dye a prob > 0")
    return dyes


def _shift(t: torch.Tensor, di: int, dj: int) -> torch.Tensor:
    """out[..., i + di, j + dj] = t[..., i, j]; zero where nothing arrives (no wrap-around)."""
    h, w = t.shape[-2:]
    out = torch.zeros_like(t)
    out[..., max(di, 0):h + min(di, 0), max(dj, 0):w + min(dj, 0)] = \
        t[..., max(-di, 0):h + min(-di, 0), max(-dj, 0):w + min(-dj, 0)]
    return out


def _neighbour(t: torch.Tensor, di: int, dj: int) -> torch.Tensor:
    """Value of the neighbour at offset (di, dj) of every pixel (zero outside the image)."""
    return _shift(t, -di, -dj)


def color_posterior(ratio: torch.Tensor, ratio_sigma: torch.Tensor | None, dyes: Sequence[Dye]) -> torch.Tensor:
    """Posterior probability of each dye given predicted ratios: (n,) -> (n, n_dyes).

    P(d | r) ∝ prior_d * N(r; ratio_d, ratio_sigma^2 + ratio_sd_d^2).
    """
    r = ratio.to(torch.float64)
    mu = torch.tensor([d.ratio for d in dyes], dtype=torch.float64, device=r.device)
    sd = torch.tensor([d.ratio_sd for d in dyes], dtype=torch.float64, device=r.device)
    prior = torch.tensor([d.prob for d in dyes], dtype=torch.float64, device=r.device)
    prior = prior / prior.sum()
    rs2 = torch.zeros_like(r) if ratio_sigma is None else ratio_sigma.to(torch.float64) ** 2
    var = (rs2[:, None] + sd[None, :] ** 2).clamp_min(1e-12)  # a zero variance would make the density degenerate
    log_post = -0.5 * (r[:, None] - mu[None, :]) ** 2 / var - 0.5 * torch.log(var) + torch.log(prior)[None, :]
    return torch.softmax(log_post, dim=1)


class PostProcessor:
    """Turn model output maps into a localization table (see the module docstring for the method).

    Args:
        threshold: minimum aggregated detection probability (0-1].
        split_threshold: p above which a pixel next to a local maximum is a second emitter (0-1].
        merge_radius_px: predictions closer than this belong to the same emitter (px).
        px_size_nm: pixel size (nm); can be overridden per call.
        dye_table: dyes for colour assignment (list of :class:`Dye` or dicts, or a DataFrame with
            columns ratio, ratio_sd, prob, name); None: no colour columns.
        min_color_prob: posterior below which ``color`` is -1 (unassigned).
        calibration: a :class:`ProbabilityCalibration` (or its dict form): the reported ``prob`` is the
            calibrated one and ``threshold`` applies to it; None: the network's aggregated p.
        subpixel_equalisation: a :class:`SubpixelEqualisation` (or its dict form) applied to x, y (and
            their sigmas); None: positions as the network reports them.
        z_calibration: a :class:`ZResponseCalibration` (or its dict form) applied to z (and its sigma);
            None: z as the network reports it.
        ratio_sigma_scale: factor (> 0) on the reported ratio sigma, fitted so that 68.3 % of the ratio errors
            fall within it; None: the network's ratio sigma.

    Call: ``post(output, frame_offset=0, px_size=None, roi_offset=(0, 0)) -> DataFrame``.
    """

    def __init__(self, threshold: float = 0.3, split_threshold: float = 0.6, merge_radius_px: float = 0.75,
                 px_size_nm: float = 100.0, dye_table: Any = None, min_color_prob: float = 0.0,
                 calibration: Any = None, subpixel_equalisation: Any = None, z_calibration: Any = None,
                 ratio_sigma_scale: float | None = None):
        try:
            cfg = PostProcessConfig(threshold=threshold, split_threshold=split_threshold,
                                    merge_radius_px=merge_radius_px, min_color_prob=min_color_prob)
        except Exception as exc:
            raise DecodeAccelError(str(exc).replace("\n", " "), field="PostProcessor") from None
        if not (px_size_nm > 0 and math.isfinite(px_size_nm)):
            raise DecodeAccelError("pixel size must be > 0 nm", field="px_size_nm")
        self.threshold = cfg.threshold
        self.split_threshold = cfg.split_threshold
        self.merge_radius_px = cfg.merge_radius_px
        self.min_color_prob = cfg.min_color_prob
        self.px_size_nm = float(px_size_nm)
        self.dyes = as_dyes(dye_table)
        self.calibration = ProbabilityCalibration.from_any(calibration)
        self.subpixel_equalisation = SubpixelEqualisation.from_any(subpixel_equalisation)
        self.z_calibration = ZResponseCalibration.from_any(z_calibration)
        if ratio_sigma_scale is not None and not (math.isfinite(ratio_sigma_scale) and ratio_sigma_scale > 0):
            raise DecodeAccelError(f"ratio_sigma_scale must be a finite number > 0, got {ratio_sigma_scale!r}",
                                   field="ratio_sigma_scale", fix="refit it with choose_operating_point")
        self.ratio_sigma_scale = ratio_sigma_scale
        # the same cut on the network's own p (used to skip hopeless candidates early)
        self._raw_threshold = (self.threshold if self.calibration is None
                               else self.calibration.raw_threshold(self.threshold))

    @property
    def dye_table(self) -> list[Dye] | None:
        """The dyes used for colour assignment (None: single channel)."""
        return self.dyes

    @classmethod
    def from_config(cls, cfg: PostProcessConfig, px_size_nm: float = 100.0) -> "PostProcessor":
        return cls(cfg.threshold, cfg.split_threshold, cfg.merge_radius_px, px_size_nm, cfg.dyes, cfg.min_color_prob)

    # ------------------------------------------------------------------------------------------
    def _candidates(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense boolean maps (is_max, split) from p alone (B, H, W)."""
        # p >= each of its 8 neighbours (outside the image counts as 0); 8 comparisons are much faster
        # than max_pool2d on a CPU.
        raw_max = p > 0
        for di, dj in _OFFSETS[1:]:
            raw_max &= p >= _neighbour(p, di, dj)
        # Exact ties: keep the first pixel in raster order (an equal maximum before us wins).
        suppress = torch.zeros_like(raw_max)
        for di, dj in _EARLIER:
            suppress |= _neighbour(raw_max, di, dj) & (_neighbour(p, di, dj) == p)
        is_max = raw_max & ~suppress
        split = ~is_max & (p > self.split_threshold)
        return is_max, split

    def locate(self, output: dict[str, torch.Tensor]):
        """Find and aggregate the emitters of a batch of maps.

        Returns:
            (b, x, y, p_agg, average): batch index of each localization, its p-weighted position
            (px, image origin at the top-left corner), its aggregated p, and ``average``, a function
            that maps a (B, H, W) feature map to the p-weighted mean over each localization's pixels.
        """
        p = output["p"].detach().float()
        bsz, h, w = p.shape
        dx, dy = output["dx"].detach().float(), output["dy"].detach().float()
        is_max, split = self._candidates(p)
        # A local maximum can gather at most 9 pixels of p <= its own; skip hopeless ones early.
        cand = (is_max & (9 * p >= self._raw_threshold)) | split
        b, i, j = torch.nonzero(cand, as_tuple=True)
        off = torch.tensor(_OFFSETS, device=p.device)
        ii, jj = i[:, None] + off[None, :, 0], j[:, None] + off[None, :, 1]
        inside = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
        ii, jj = ii.clamp(0, h - 1), jj.clamp(0, w - 1)
        bb = b[:, None].expand_as(ii)

        def gather(m: torch.Tensor) -> torch.Tensor:  # (B, H, W) -> (n, 9) over each candidate's 3x3
            return m[bb, ii, jj]

        pn = torch.where(inside, gather(p), torch.zeros((), device=p.device))
        xn = jj + 0.5 + gather(dx)
        yn = ii + 0.5 + gather(dy)
        same = inside & (torch.hypot(xn - xn[:, :1], yn - yn[:, :1]) < self.merge_radius_px)
        same[:, 0] = False
        # A split candidate that predicts the position of a neighbouring maximum (or of a more probable
        # split candidate) is that emitter.
        stronger = gather(is_max) | (gather(split) & (pn > pn[:, :1]))
        demote = split[b, i, j] & (stronger & same).any(1)
        keep = ~demote
        b, i, j, ii, jj, bb, pn, same, xn, yn = (t[keep] for t in (b, i, j, ii, jj, bb, pn, same, xn, yn))
        det = torch.zeros_like(p, dtype=torch.bool)
        det[b, i, j] = True
        # Each other pixel goes to the most probable neighbouring candidate that predicts the same emitter.
        claim = same & ~det[bb, ii, jj] & (pn > 0)
        n = len(b)
        win = torch.zeros_like(claim)
        if bool(claim.any()):
            cid, k = torch.nonzero(claim, as_tuple=True)
            pix = (bb[cid, k] * h + ii[cid, k]) * w + jj[cid, k]
            order = torch.argsort(-pn[cid, 0], stable=True)
            order = order[torch.argsort(pix[order], stable=True)]
            pix_sorted = pix[order]
            first = torch.ones_like(pix_sorted, dtype=torch.bool)
            first[1:] = pix_sorted[1:] != pix_sorted[:-1]
            win[cid[order[first]], k[order[first]]] = True
        weight = torch.where(win, pn, torch.zeros((), device=p.device))
        weight[:, 0] = pn[:, 0]
        p_sum = weight.sum(1)
        p_agg = p_sum.clamp(max=1.0)
        if self.calibration is not None:
            p_agg = self.calibration(p_agg)
        kept = p_agg >= self.threshold
        weight, p_sum, p_agg = weight[kept], p_sum[kept], p_agg[kept]
        b, i, j, ii, jj, bb, xn, yn = (t[kept] for t in (b, i, j, ii, jj, bb, xn, yn))
        norm = p_sum.clamp_min(torch.finfo(torch.float32).tiny)

        def average(m: torch.Tensor) -> torch.Tensor:
            values = m if m.shape == p.shape else m.reshape(bsz, h, w)
            return (weight * values.detach().float()[bb, ii, jj]).sum(1) / norm

        x_mean = (weight * xn).sum(1) / norm
        y_mean = (weight * yn).sum(1) / norm
        return b, x_mean, y_mean, p_agg, average

    def __call__(self, output: dict[str, torch.Tensor], frame_offset: int = 0, px_size: float | None = None,
                 roi_offset: tuple[float, float] = (0, 0)) -> pd.DataFrame:
        """Localizations of a batch of output maps.

        Args:
            output: model output dict (docs/architecture.md): p, dx, dy (B, H, W) required; photons, z,
                sigmas, bg (B, C, H, W) and the two-channel maps used when present.
            frame_offset: frame index of batch element 0 (frames are 0-based).
            px_size: pixel size (nm); default the constructor's.
            roi_offset: (row, col) of this tile's top-left pixel in the full image (whole px). The border maps
                of the sub-pixel equalisation act at the maps' own borders: pass whole frames.

        Returns:
            DataFrame with frame, x, y, z (nm), photons, id (-1: not linked), prob, and the other
            table columns the maps provide; sorted by frame, then y, then x.
        """
        px = self.px_size_nm if px_size is None else float(px_size)
        if not (px > 0 and math.isfinite(px)):
            raise DecodeAccelError("pixel size must be > 0 nm", field="px_size")
        for key in ("p", "dx", "dy"):
            if key not in output:
                raise DecodeAccelError(f"model output lacks the {key!r} map", field=key,
                                       fix="pass the dict returned by the model's forward()")
        p = output["p"]
        if p.dim() != 3:
            raise DecodeAccelError(f"'p' must have shape (B, H, W), got {tuple(p.shape)}", field="p")
        bi, x_px, y_px, p_agg, average = self.locate(output)
        n = len(bi)

        def np64(t: torch.Tensor) -> np.ndarray:
            return t.double().cpu().numpy()

        data: dict[str, np.ndarray] = {"frame": (bi.cpu().numpy() + int(frame_offset)).astype(np.int64)}
        x_img, y_img = np64(x_px), np64(y_px)
        slope_x = slope_y = 1.0
        if self.subpixel_equalisation is not None:
            # in the maps' own pixels, where the frame borders are (tile offsets are whole pixels)
            x_img, y_img, slope_x, slope_y = self.subpixel_equalisation(x_img, y_img, tuple(p.shape[-2:]))
        x_img, y_img = x_img + float(roi_offset[1]), y_img + float(roi_offset[0])
        data["x"], data["y"] = x_img * px, y_img * px
        data["z"] = np64(average(output["z"])) if output.get("z") is not None else np.zeros(n)
        data["photons"] = np64(average(output["photons"])) if output.get("photons") is not None \
            else np.full(n, np.nan)
        data["id"] = np.full(n, -1, dtype=np.int64)
        data["prob"] = np64(p_agg)
        if output.get("bg") is not None:
            bg = output["bg"]
            data["bg"] = np64(average(bg.sum(1) if bg.dim() == 4 else bg))  # all channels, photons/px
        for key, (col, unit) in _FEATURES.items():
            if col not in data and output.get(key) is not None:
                data[col] = np64(average(output[key])) * (px if unit == "px" else 1.0)
        slope_z = 1.0
        if self.z_calibration is not None and output.get("z") is not None:
            data["z"], slope_z = self.z_calibration(data["z"])
        ratio_scale = 1.0 if self.ratio_sigma_scale is None else self.ratio_sigma_scale
        for col, slope in (("x_sigma", slope_x), ("y_sigma", slope_y), ("z_sigma", slope_z),
                           ("ratio_sigma", ratio_scale)):
            if col in data:
                data[col] = data[col] * slope
        if "ratio" not in data and "photons_ch1" in data and "photons_ch2" in data:
            tot = data["photons_ch1"] + data["photons_ch2"]
            data["ratio"] = np.divide(data["photons_ch1"], tot, out=np.full_like(tot, np.nan), where=tot > 0)
        if self.dyes is not None:
            if "ratio" not in data:
                raise DecodeAccelError("a dye table needs two-channel output (ratio or photons_ch1/ch2 maps)",
                                       field="dye_table", fix="drop the dye table for single-channel models")
            r = torch.as_tensor(data["ratio"])
            rs = torch.as_tensor(data["ratio_sigma"]) if "ratio_sigma" in data else None
            post = color_posterior(r, rs, self.dyes) if len(r) else torch.zeros(0, len(self.dyes))
            cp, color = post.max(dim=1) if len(r) else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
            color = torch.where(cp >= self.min_color_prob, color, torch.full_like(color, -1))
            data["color"] = color.numpy().astype(np.int64)
            data["color_prob"] = cp.numpy().astype(np.float64)
        df = pd.DataFrame(data)
        return df.sort_values(["frame", "y", "x"], kind="stable").reset_index(drop=True)
