"""Cramér-Rao lower bounds (CRLB) of single-molecule localization, vectorized over many emitters.

Model: a pixel-integrated Gaussian PSF on a square pixel grid, Poisson noise (an ideal sCMOS or
CCD without read noise). Pixel k has the expected count

    mu_k = N * E_x(u_k) * E_y(v_k) + b,
    E_x(u) = 1/2 [erf((u + 1/2 - x0) / (sqrt(2) sigma_x)) - erf((u - 1/2 - x0) / (sqrt(2) sigma_x))]

(u, v: pixel centres in px, N: detected photons, b: background photons/px). The Fisher information
is I_ij = sum_k (d mu_k / d theta_i)(d mu_k / d theta_j) / mu_k and the CRLB is diag(I^-1). An
EMCCD at high gain doubles the variance of every pixel (excess-noise factor F^2 = 2), i.e. I / 2.

Three parameter sets are supported:

* 2D: theta = (x, y, N, b) — :func:`crlb_gaussian_2d`;
* astigmatic 3D (Huang et al. 2008): sigma_x(z), sigma_y(z) — theta = (x, y, z, N, b) —
  :func:`crlb_astigmatic`;
* two-channel ratiometric: channel 1 gets r*N, channel 2 (1-r)*N, shared position, one background
  per channel — theta = (x, y, N, r, b1, b2) — :func:`crlb_ratio`.

All functions take numpy-broadcastable arrays and return arrays of 1-sigma bounds (square roots of
the CRLB), positions in nm. :func:`mortensen_mle_sigma` is the independent closed form of
Mortensen et al. (Nat Methods 7:377, 2010) for the 2D case, used to cross-check the Fisher matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from decode_accel.errors import DecodeAccelError
from decode_accel.precision import EXCESS_NOISE, excess_noise, mortensen_mle_sigma  # noqa: F401 (API here too)

_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


_excess = excess_noise


@dataclass(frozen=True)
class GaussianPSF:
    """A symmetric 2D Gaussian PSF.

    Attributes:
        sigma_nm: PSF standard deviation (nm).
    """

    sigma_nm: float

    def sigmas_px(self, z_nm: np.ndarray, px_size_nm: float) -> tuple[np.ndarray, np.ndarray]:
        s = np.broadcast_to(np.float64(self.sigma_nm / px_size_nm), np.shape(z_nm))
        return s, s


@dataclass(frozen=True)
class AstigmaticPSF:
    """An astigmatic Gaussian PSF (Huang et al., Science 319:810, 2008).

    sigma_x(z) = sigma0 * sqrt(1 + u^2 + A u^3 + B u^4) with u = (z - gamma) / d, and sigma_y(z)
    the same with u = (z + gamma) / d (the two focal planes sit at z = +gamma and z = -gamma).
    Per-axis fields, where given, replace that shorthand for one axis (x = columns, y = rows), as the
    simulator's per-axis parameters and ThunderSTORM's calibration give them.

    Attributes:
        sigma0_nm: in-focus PSF standard deviation (nm).
        gamma_nm: half the distance between the x and y focal planes (nm).
        d_nm: depth of focus (nm).
        a, b: higher-order coefficients (dimensionless).
        focal_x_nm, focal_y_nm: z where sigma_x / sigma_y is narrowest (nm); default +gamma / -gamma.
        sigma0_x_nm, sigma0_y_nm, d_x_nm, d_y_nm (nm), a_x, b_x, a_y, b_y (-): per-axis widths, depths
            and coefficients; default the shared ones.
    """

    sigma0_nm: float
    gamma_nm: float = 250.0
    d_nm: float = 400.0
    a: float = 0.0
    b: float = 0.0
    focal_x_nm: float | None = None
    focal_y_nm: float | None = None
    sigma0_x_nm: float | None = None
    sigma0_y_nm: float | None = None
    d_x_nm: float | None = None
    d_y_nm: float | None = None
    a_x: float | None = None
    b_x: float | None = None
    a_y: float | None = None
    b_y: float | None = None

    def axis(self, name: str) -> tuple[float, float, float, float, float]:
        """(sigma0 nm, focal plane nm, depth nm, A, B) of axis ``name`` ("x" or "y")."""
        def pick(value, default):
            return float(default if value is None else value)
        sign = 1.0 if name == "x" else -1.0
        own = {k: getattr(self, f"{k}_{name}" if k in ("a", "b") else f"{k}_{name}_nm")
               for k in ("sigma0", "focal", "d", "a", "b")}
        return (pick(own["sigma0"], self.sigma0_nm), pick(own["focal"], sign * self.gamma_nm),
                pick(own["d"], self.d_nm), pick(own["a"], self.a), pick(own["b"], self.b))

    def _one(self, z_nm, axis):
        sigma0, focal, depth, a, b = self.axis(axis)
        u = (np.asarray(z_nm, dtype=np.float64) - focal) / depth
        q = 1.0 + u**2 + a * u**3 + b * u**4
        if np.any(q <= 0):
            raise DecodeAccelError("astigmatic PSF width is undefined at some z (1 + u^2 + A u^3 + B u^4 <= 0)",
                                   field="AstigmaticPSF.a/b", fix="choose A, B that keep the width positive")
        s = sigma0 * np.sqrt(q)
        ds_dz = sigma0 * (2 * u + 3 * a * u**2 + 4 * b * u**3) / (2 * np.sqrt(q) * depth)
        return s, ds_dz

    def sigmas_nm(self, z_nm):
        """(sigma_x, sigma_y, dsigma_x/dz, dsigma_y/dz), all in nm or nm/nm."""
        sx, dsx = self._one(z_nm, "x")
        sy, dsy = self._one(z_nm, "y")
        return sx, sy, dsx, dsy

    def sigmas_px(self, z_nm, px_size_nm: float):
        sx, sy, _, _ = self.sigmas_nm(z_nm)
        return sx / px_size_nm, sy / px_size_nm


def _axis_terms(centres: np.ndarray, x0: np.ndarray, sigma: np.ndarray):
    """Pixel-integrated 1D Gaussian E(u) and its derivatives w.r.t. x0 and sigma.

    centres: (R,) pixel centres in px; x0, sigma: (n,) -> arrays (n, R).
    """
    x0 = x0[:, None]
    s = sigma[:, None]
    lo = centres[None, :] - 0.5 - x0
    hi = centres[None, :] + 0.5 - x0
    e = 0.5 * (erf(hi / (_SQRT2 * s)) - erf(lo / (_SQRT2 * s)))
    g_lo = np.exp(-lo**2 / (2 * s**2))
    g_hi = np.exp(-hi**2 / (2 * s**2))
    de_dx0 = (g_lo - g_hi) / (_SQRT2PI * s)
    de_ds = (lo * g_lo - hi * g_hi) / (_SQRT2PI * s**2)
    return e, de_dx0, de_ds


def _roi(x_px, y_px, sigma_max_px, roi_size):
    """An ROI of pixel centres around each emitter (shared size, per-emitter origin)."""
    if roi_size is None:
        roi_size = 2 * int(math.ceil(5.0 * float(np.max(sigma_max_px)))) + 3
    centres = np.arange(roi_size, dtype=np.float64)
    # Put each emitter at the same sub-pixel offset from the ROI's central pixel centre.
    cx = roi_size // 2 + (x_px - np.round(x_px))
    cy = roi_size // 2 + (y_px - np.round(y_px))
    return centres, cx, cy


def _fisher(derivs: list[np.ndarray], mu: np.ndarray) -> np.ndarray:
    """Fisher matrix (n, P, P) from P derivative arrays (n, ...) and expected counts mu (n, ...)."""
    d = np.stack([dd.reshape(mu.shape[0], -1) for dd in derivs], axis=1)  # (n, P, K)
    w = 1.0 / mu.reshape(mu.shape[0], -1)
    return np.einsum("npk,nqk,nk->npq", d, d, w)


def _crlb_from_fisher(fisher: np.ndarray) -> np.ndarray:
    try:
        cov = np.linalg.inv(fisher)
    except np.linalg.LinAlgError:
        cov = np.linalg.pinv(fisher)
    return np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0, None))


def _prep(*arrays):
    arrs = np.broadcast_arrays(*[np.asarray(a, dtype=np.float64) for a in arrays])
    shape = arrs[0].shape
    return shape, [a.reshape(-1) for a in arrs]


def _centre(pos_nm, px_size_nm):
    """Default position: the centre of a pixel (nm)."""
    return 0.5 * px_size_nm if pos_nm is None else pos_nm


def _check_positive(photons, bg):
    if np.any(~np.isfinite(photons)) or np.any(photons <= 0):
        raise DecodeAccelError("photons must be finite and > 0 for a CRLB", field="photons")
    if np.any(~np.isfinite(bg)) or np.any(bg < 0):
        raise DecodeAccelError("background must be finite and >= 0 for a CRLB", field="bg")


def crlb_gaussian_2d(photons, bg, sigma_nm, px_size_nm: float = 100.0, x_nm=None, y_nm=None,
                     camera: str = "poisson", roi_size: int | None = None) -> dict[str, np.ndarray]:
    """Square root of the CRLB of theta = (x, y, N, b) for a 2D pixel-integrated Gaussian PSF.

    Args:
        photons: detected photons N per emitter (photons).
        bg: background per pixel b (photons/px).
        sigma_nm: PSF standard deviation (nm).
        px_size_nm: pixel size (nm).
        x_nm, y_nm: emitter positions (nm); only their sub-pixel part matters; default: a pixel centre.
        camera: "poisson" (sCMOS/CCD) or "emccd" (excess-noise factor 2).
        roi_size: side of the square ROI (px); default covers +-5 sigma.

    Returns:
        dict with "x", "y" (nm), "photons" (photons), "bg" (photons/px), arrays of the broadcast shape.
    """
    x_nm, y_nm = _centre(x_nm, px_size_nm), _centre(y_nm, px_size_nm)
    shape, (n, b, s, x, y) = _prep(photons, bg, sigma_nm, x_nm, y_nm)
    _check_positive(n, b)
    s_px = s / px_size_nm
    x_px, y_px = x / px_size_nm - 0.5, y / px_size_nm - 0.5  # pixel centres at integers
    centres, cx, cy = _roi(x_px, y_px, s_px, roi_size)
    ex, dex, _ = _axis_terms(centres, cx, s_px)
    ey, dey, _ = _axis_terms(centres, cy, s_px)
    psf = ey[:, :, None] * ex[:, None, :]  # (n, R(y), R(x))
    mu = n[:, None, None] * psf + b[:, None, None]
    derivs = [n[:, None, None] * ey[:, :, None] * dex[:, None, :],
              n[:, None, None] * dey[:, :, None] * ex[:, None, :],
              psf, np.ones_like(mu)]
    fisher = _fisher(derivs, mu) / _excess(camera)
    sd = _crlb_from_fisher(fisher)
    return {"x": (sd[:, 0] * px_size_nm).reshape(shape), "y": (sd[:, 1] * px_size_nm).reshape(shape),
            "photons": sd[:, 2].reshape(shape), "bg": sd[:, 3].reshape(shape)}


def crlb_astigmatic(photons, bg, z_nm, psf: AstigmaticPSF, px_size_nm: float = 100.0, x_nm=None, y_nm=None,
                    camera: str = "poisson", roi_size: int | None = None) -> dict[str, np.ndarray]:
    """Square root of the CRLB of theta = (x, y, z, N, b) for an astigmatic Gaussian PSF.

    d mu / d z = N [dE_x/dsigma_x * dsigma_x/dz * E_y + E_x * dE_y/dsigma_y * dsigma_y/dz].

    Returns:
        dict with "x", "y", "z" (nm), "photons", "bg".
    """
    x_nm, y_nm = _centre(x_nm, px_size_nm), _centre(y_nm, px_size_nm)
    shape, (n, b, z, x, y) = _prep(photons, bg, z_nm, x_nm, y_nm)
    _check_positive(n, b)
    sx, sy, dsx, dsy = psf.sigmas_nm(z)
    sx_px, sy_px = sx / px_size_nm, sy / px_size_nm
    dsx_px, dsy_px = dsx / px_size_nm, dsy / px_size_nm  # px per nm of z
    x_px, y_px = x / px_size_nm - 0.5, y / px_size_nm - 0.5
    centres, cx, cy = _roi(x_px, y_px, np.maximum(sx_px, sy_px), roi_size)
    ex, dex, desx = _axis_terms(centres, cx, sx_px)
    ey, dey, desy = _axis_terms(centres, cy, sy_px)
    nn = n[:, None, None]
    psf_img = ey[:, :, None] * ex[:, None, :]
    mu = nn * psf_img + b[:, None, None]
    d_z = nn * (ey[:, :, None] * (desx * dsx_px[:, None])[:, None, :]
                + (desy * dsy_px[:, None])[:, :, None] * ex[:, None, :])
    derivs = [nn * ey[:, :, None] * dex[:, None, :], nn * dey[:, :, None] * ex[:, None, :], d_z,
              psf_img, np.ones_like(mu)]
    sd = _crlb_from_fisher(_fisher(derivs, mu) / _excess(camera))
    return {"x": (sd[:, 0] * px_size_nm).reshape(shape), "y": (sd[:, 1] * px_size_nm).reshape(shape),
            "z": sd[:, 2].reshape(shape), "photons": sd[:, 3].reshape(shape), "bg": sd[:, 4].reshape(shape)}


def crlb_ratio(photons, ratio, bg_ch1, bg_ch2, sigma_nm, px_size_nm: float = 100.0, x_nm=None, y_nm=None,
               camera: str = "poisson", roi_size: int | None = None) -> dict[str, np.ndarray]:
    """Square root of the CRLB of theta = (x, y, N, r, b1, b2) for two perfectly registered channels.

    Channel 1 gets r*N photons, channel 2 (1-r)*N, both with the same Gaussian PSF; b1, b2 are the
    per-channel backgrounds (photons/px).

    Returns:
        dict with "x", "y" (nm), "photons", "ratio", "bg_ch1", "bg_ch2".
    """
    x_nm, y_nm = _centre(x_nm, px_size_nm), _centre(y_nm, px_size_nm)
    shape, (n, r, b1, b2, s, x, y) = _prep(photons, ratio, bg_ch1, bg_ch2, sigma_nm, x_nm, y_nm)
    _check_positive(n, b1)
    _check_positive(n, b2)
    if np.any((r <= 0) | (r >= 1)):
        raise DecodeAccelError("ratio must lie strictly between 0 and 1 for a CRLB", field="ratio")
    s_px = s / px_size_nm
    x_px, y_px = x / px_size_nm - 0.5, y / px_size_nm - 0.5
    centres, cx, cy = _roi(x_px, y_px, s_px, roi_size)
    ex, dex, _ = _axis_terms(centres, cx, s_px)
    ey, dey, _ = _axis_terms(centres, cy, s_px)
    psf = ey[:, :, None] * ex[:, None, :]
    dpx = ey[:, :, None] * dex[:, None, :]
    dpy = dey[:, :, None] * ex[:, None, :]
    nn, rr = n[:, None, None], r[:, None, None]
    one, zero = np.ones_like(psf), np.zeros_like(psf)
    # Stack the two channels along the pixel axis: (n, 2, R, R).
    mu = np.stack([rr * nn * psf + b1[:, None, None], (1 - rr) * nn * psf + b2[:, None, None]], axis=1)
    derivs = [np.stack([rr * nn * dpx, (1 - rr) * nn * dpx], 1), np.stack([rr * nn * dpy, (1 - rr) * nn * dpy], 1),
              np.stack([rr * psf, (1 - rr) * psf], 1), np.stack([nn * psf, -nn * psf], 1),
              np.stack([one, zero], 1), np.stack([zero, one], 1)]
    sd = _crlb_from_fisher(_fisher(derivs, mu) / _excess(camera))
    names = ["x", "y", "photons", "ratio", "bg_ch1", "bg_ch2"]
    out = {k: sd[:, i].reshape(shape) for i, k in enumerate(names)}
    out["x"] = out["x"] * px_size_nm
    out["y"] = out["y"] * px_size_nm
    return out


def crlb_for_table(df, psf: GaussianPSF | AstigmaticPSF, px_size_nm: float, camera: str = "poisson",
                   default_bg=None) -> dict[str, np.ndarray]:
    """CRLB of every row of a localization table (true photons, bg, x, y, z), positions in nm.

    Rows with photons <= 0 get NaN. bg comes from the "bg" column, else ``default_bg``: one value
    for all rows, or one per frame (indexed by the frame column), in photons/px.
    """
    n = df["photons"].to_numpy(np.float64)
    if "bg" in df.columns:
        b = df["bg"].to_numpy(np.float64)
    elif default_bg is not None and np.ndim(default_bg) == 0:
        b = np.full(len(df), float(default_bg))
    elif default_bg is not None:
        per_frame = np.asarray(default_bg, dtype=np.float64).reshape(-1)
        frames = df["frame"].to_numpy(np.int64)
        if len(frames) and (frames.min() < 0 or frames.max() >= len(per_frame)):
            raise DecodeAccelError(f"per-frame background has {len(per_frame)} entries but the table has frame "
                                   f"{int(frames.max())}", field="bg", fix="give one background per frame")
        b = per_frame[frames]
    else:
        raise DecodeAccelError("the ground truth has no 'bg' column", field="bg",
                               fix="add a bg column (photons/px) or pass a background value")
    ok = (n > 0) & np.isfinite(n) & np.isfinite(b) & (b >= 0)
    keys = ("x", "y", "z") if isinstance(psf, AstigmaticPSF) else ("x", "y")
    out = {k: np.full(len(df), np.nan) for k in keys}
    idx = np.flatnonzero(ok)
    x_all = df["x"].to_numpy(np.float64)
    y_all = df["y"].to_numpy(np.float64)
    z_all = df["z"].to_numpy(np.float64) if "z" in df.columns else np.zeros(len(df))
    # Chunks bound the memory of the (n, P, ROI pixels) derivative stack.
    for start in range(0, len(idx), _CHUNK):
        sel = idx[start:start + _CHUNK]
        if isinstance(psf, AstigmaticPSF):
            res = crlb_astigmatic(n[sel], b[sel], z_all[sel], psf, px_size_nm, x_all[sel], y_all[sel], camera)
        else:
            res = crlb_gaussian_2d(n[sel], b[sel], psf.sigma_nm, px_size_nm, x_all[sel], y_all[sel], camera)
        for k in keys:
            out[k][sel] = res[k]
    return out


_CHUNK = 20000
