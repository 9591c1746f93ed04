"""Find and fit single spots: detection, isolation, batched Poisson MLE of pixel-integrated Gaussians.

Frames here are in **photoelectrons** (e-) per pixel, converted from ADU by the camera: the fit
is a maximum-likelihood fit with the sCMOS read-noise correction of Huang et al. (Nat. Methods
10:653, 2013): ``data + γ ~ Poisson(model + γ)`` with γ the per-pixel read-noise variance in e-².
For an EMCCD the excess noise factor F² = 2 is taken into account by fitting ``data/2`` against
``model/2`` (the Poisson approximation of the gain register).

Coordinates: pixel (row i, column j) spans x in [j, j+1), y in [i, i+1) (px); x along columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_SQRT2 = math.sqrt(2.0)


@dataclass
class SpotFits:
    """Results of :func:`fit_spots`, one entry per spot (numpy arrays).

    Attributes:
        frame: frame index of the spot (0-based).
        x, y: position in the frame (px, pixel-centre convention: centre of pixel (i, j) at (j + .5, i + .5)).
        photons: fitted signal (e-), background ``bg`` (e-/px).
        sigma_x, sigma_y: fitted widths (px) (equal when one width was fitted).
        crlb: (n, n_params) standard deviations from the Fisher information at the fit (same units).
        params: names of the fitted parameters, in the order of ``crlb``'s columns.
        converged: whether the iterations settled and the fit stayed inside its bounds.
        loglik_ratio: per-pixel mean deviance (2·(LL_saturated - LL_fit) / pixels), ~1 for a good fit.
    """

    frame: np.ndarray
    x: np.ndarray
    y: np.ndarray
    photons: np.ndarray
    bg: np.ndarray
    sigma_x: np.ndarray
    sigma_y: np.ndarray
    crlb: np.ndarray
    params: tuple[str, ...]
    converged: np.ndarray
    loglik_ratio: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def select(self, mask: np.ndarray) -> "SpotFits":
        """The spots where ``mask`` is true."""
        return SpotFits(**{k: (v[mask] if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()})


def detect_spots(frames: np.ndarray, sigma: float = 1.0, threshold: float = 5.0,
                 noise_var: np.ndarray | None = None) -> np.ndarray:
    """Candidate spots: local maxima of a difference-of-Gaussians image above ``threshold`` noise sd.

    Args:
        frames: (T, H, W) frames (e- or photons per pixel).
        sigma: expected PSF sd (px); the filter is G(sigma) - G(3 sigma).
        threshold: detection threshold in robust standard deviations (MAD) of the filtered image.
        noise_var: optional (H, W) extra per-pixel variance (e.g. sCMOS read noise, e-²); a pixel's
            threshold is raised by it, so hot pixels are not detected as spots.

    Returns:
        int64 array (n, 3): frame, row, column of each candidate.
    """
    from scipy import ndimage  # heavy: scipy.ndimage is slow to import, only this step needs it

    frames = np.asarray(frames, dtype=np.float64)
    out = []
    for t, img in enumerate(frames):
        dog = ndimage.gaussian_filter(img, sigma) - ndimage.gaussian_filter(img, 3.0 * sigma)
        med = np.median(dog)
        mad = 1.4826 * np.median(np.abs(dog - med)) + 1e-12
        level = med + threshold * mad
        if noise_var is not None:
            # the DoG of white noise of variance v has variance ~ v / (4 pi sigma²)
            level = level + threshold * np.sqrt(np.asarray(noise_var, dtype=np.float64) / (4 * np.pi * sigma ** 2))
        peak = (dog == ndimage.maximum_filter(dog, size=3)) & (dog > level)
        rows, cols = np.nonzero(peak)
        out.append(np.stack([np.full_like(rows, t), rows, cols], axis=1))
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 3), np.int64)


def isolated(cands: np.ndarray, min_distance: float, shape: tuple[int, int], margin: int) -> np.ndarray:
    """Boolean mask of candidates with no other candidate of the same frame closer than ``min_distance`` px
    and at least ``margin`` px from the frame edge."""
    from scipy.spatial import cKDTree  # heavy: scipy.spatial, only for pairing spots

    keep = np.ones(len(cands), bool)
    H, W = shape
    keep &= (cands[:, 1] >= margin) & (cands[:, 1] < H - margin) & (cands[:, 2] >= margin) & (cands[:, 2] < W - margin)
    for t in np.unique(cands[:, 0]):
        idx = np.nonzero(cands[:, 0] == t)[0]
        if len(idx) < 2:
            continue
        tree = cKDTree(cands[idx, 1:].astype(float))
        pairs = tree.query_pairs(min_distance)
        for a, b in pairs:
            keep[idx[a]] = keep[idx[b]] = False
    return keep


def cut_rois(frames: np.ndarray, cands: np.ndarray, size: int, extra: np.ndarray | None = None):
    """ROIs of side ``size`` centred on candidates -> (rois (n, R, R), i0 (n,), j0 (n,), extra rois or None)."""
    half = size // 2
    ar = np.arange(size)
    i0 = cands[:, 1] - half
    j0 = cands[:, 2] - half
    rows = i0[:, None] + ar[None, :]
    cols = j0[:, None] + ar[None, :]
    rois = frames[cands[:, 0][:, None, None], rows[:, :, None], cols[:, None, :]]
    ex = None if extra is None else extra[rows[:, :, None], cols[:, None, :]]
    return rois, i0, j0, ex


def _axis(c: torch.Tensor, s: torch.Tensor, R: int):
    """Per-pixel fraction of a 1D Gaussian and its derivatives by centre and sd, each (n, R)."""
    e = torch.arange(R + 1, dtype=c.dtype, device=c.device)[None, :] - c[:, None]  # edge - centre
    s = s[:, None]
    cdf = 0.5 * torch.erf(e / (_SQRT2 * s))
    pdf = torch.exp(-0.5 * (e / s) ** 2) / (math.sqrt(2 * math.pi) * s)
    val = cdf[:, 1:] - cdf[:, :-1]
    d_c = pdf[:, :-1] - pdf[:, 1:]
    ep = e * pdf / s
    d_s = ep[:, :-1] - ep[:, 1:]
    return val, d_c, d_s


def _gauss_model(theta: torch.Tensor, R: int, mode: str, sigma_fixed: float, with_jac: bool = False):
    """Expected counts (n, R, R) of an integrated Gaussian: theta columns x, y, N, b, [sigma | sx, sy];
    with ``with_jac`` also the Jacobian (n, R, R, P)."""
    x, y, N, b = theta[:, 0], theta[:, 1], theta[:, 2], theta[:, 3]
    if mode == "fixed":
        sx = sy = torch.full_like(x, sigma_fixed)
    elif mode == "sigma":
        sx = sy = theta[:, 4]
    else:
        sx, sy = theta[:, 4], theta[:, 5]
    ex, ex_c, ex_s = _axis(x, sx, R)
    ey, ey_c, ey_s = _axis(y, sy, R)
    shape = ey[:, :, None] * ex[:, None, :]
    mu = N[:, None, None] * shape + b[:, None, None]
    if not with_jac:
        return mu
    Nn = N[:, None, None]
    cols = [Nn * ey[:, :, None] * ex_c[:, None, :], Nn * ey_c[:, :, None] * ex[:, None, :], shape, torch.ones_like(mu)]
    if mode == "sigma":
        cols.append(Nn * (ey_s[:, :, None] * ex[:, None, :] + ey[:, :, None] * ex_s[:, None, :]))
    elif mode == "sigma_xy":
        cols += [Nn * ey[:, :, None] * ex_s[:, None, :], Nn * ey_s[:, :, None] * ex[:, None, :]]
    return mu, torch.stack(cols, dim=-1)


def fit_spots(rois: np.ndarray, *, mode: str = "sigma", sigma_init: float = 1.0, read_var: np.ndarray | None = None,
              excess_noise: float = 1.0, iterations: int = 60) -> dict[str, np.ndarray]:
    """Batched Poisson maximum-likelihood fit of pixel-integrated Gaussians to ROIs (Fisher scoring with damping).

    Args:
        rois: (n, R, R) counts in e- (background included).
        mode: 'sigma' (x, y, N, b, one width), 'sigma_xy' (two widths, for astigmatic PSFs) or
            'fixed' (width ``sigma_init`` held).
        sigma_init: starting (or fixed) width (px).
        read_var: optional (n, R, R) per-pixel read-noise variance (e-²), sCMOS correction.
        excess_noise: F² of the camera (2 for an EMCCD, 1 otherwise).
        iterations: scoring iterations.

    Returns:
        dict with ``theta`` (n, P) (x, y in ROI px coordinates, N e-, b e-/px, widths px), ``crlb`` (n, P),
        ``converged`` (n,) bool and ``deviance`` (n,) per-pixel mean deviance.
    """
    d = torch.as_tensor(np.asarray(rois, dtype=np.float64))
    n, R, _ = d.shape
    g = torch.zeros_like(d) if read_var is None else torch.as_tensor(np.asarray(read_var, dtype=np.float64))
    F = float(excess_noise)
    # initial values: background from the ROI border, signal above it, centre of mass
    border = torch.cat([d[:, 0], d[:, -1], d[:, 1:-1, 0], d[:, 1:-1, -1]], dim=1)
    b0 = border.median(dim=1).values.clamp_min(0.1)
    sig = (d - b0[:, None, None]).clamp_min(0)
    N0 = sig.sum((1, 2)).clamp_min(10.0)
    ar = torch.arange(R, dtype=d.dtype) + 0.5
    x0 = (sig.sum(1) * ar).sum(1) / sig.sum((1, 2)).clamp_min(1e-9)
    y0 = (sig.sum(2) * ar).sum(1) / sig.sum((1, 2)).clamp_min(1e-9)
    x0 = torch.where(torch.isfinite(x0), x0, torch.full_like(x0, R / 2)).clamp(1.0, R - 1.0)
    y0 = torch.where(torch.isfinite(y0), y0, torch.full_like(y0, R / 2)).clamp(1.0, R - 1.0)
    cols = [x0, y0, N0, b0]
    if mode == "sigma":
        cols.append(torch.full_like(x0, sigma_init))
    elif mode == "sigma_xy":
        cols += [torch.full_like(x0, sigma_init), torch.full_like(x0, sigma_init)]
    elif mode != "fixed":
        raise ValueError(f"mode must be 'sigma', 'sigma_xy' or 'fixed', got {mode!r}")
    theta = torch.stack(cols, dim=1)
    P = theta.shape[1]
    lo = torch.tensor([0.0, 0.0, 1.0, 1e-3] + [0.3] * (P - 4), dtype=d.dtype)
    hi = torch.tensor([float(R), float(R), 1e9, 1e6] + [R / 2.0] * (P - 4), dtype=d.dtype)
    dd = (d + g).clamp_min(0.0) / F  # observed, shifted (sCMOS) and scaled (EMCCD)
    lam = torch.full((n,), 1e-2, dtype=d.dtype)

    def nll(th):
        mu = (_gauss_model(th, R, mode, sigma_init) + g).clamp_min(1e-9) / F
        return (mu - dd * torch.log(mu)).sum((1, 2))

    cur = nll(theta)
    for _ in range(iterations):
        mu, J = _gauss_model(theta, R, mode, sigma_init, with_jac=True)
        mu = (mu + g).clamp_min(1e-9) / F
        J = J.reshape(n, R * R, P) / F
        w = 1.0 / mu.reshape(n, R * R)
        info = torch.einsum("nkp,nk,nkq->npq", J, w, J)
        grad = torch.einsum("nkp,nk->np", J, (dd.reshape(n, -1) / mu.reshape(n, -1) - 1.0))
        damp = info + lam[:, None, None] * torch.diag_embed(torch.diagonal(info, dim1=1, dim2=2) + 1e-9)
        step = torch.linalg.solve(damp, grad[:, :, None])[:, :, 0]
        trial = torch.maximum(torch.minimum(theta + step, hi), lo)
        new = nll(trial)
        better = new < cur
        theta = torch.where(better[:, None], trial, theta)
        cur = torch.where(better, new, cur)
        lam = torch.where(better, lam * 0.3, lam * 10.0).clamp(1e-7, 1e7)
    mu, J = _gauss_model(theta, R, mode, sigma_init, with_jac=True)
    mu = (mu + g).clamp_min(1e-9) / F
    J = J.reshape(n, R * R, P) / F
    info = torch.einsum("nkp,nk,nkq->npq", J, 1.0 / mu.reshape(n, R * R), J)
    grad = torch.einsum("nkp,nk->np", J, (dd.reshape(n, -1) / mu.reshape(n, -1) - 1.0))
    try:
        cov = torch.linalg.inv(info)
        crlb = torch.sqrt(torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0))
        newton = torch.einsum("npq,nq->np", cov, grad)  # what one more undamped step would still move
        settled = (newton.abs() < 0.05 * crlb + 1e-9).all(1)
    except RuntimeError:
        crlb = torch.full_like(theta, float("nan"))
        settled = torch.zeros(n, dtype=torch.bool)
    # the deviance per pixel tells a single spot (~1) from a blob or a pair (>> 1)
    with torch.no_grad():
        sat = torch.where(dd > 0, dd * torch.log(dd.clamp_min(1e-12)) - dd, torch.zeros_like(dd))
        ll = dd * torch.log(mu) - mu
        dev = 2 * (sat - ll).sum((1, 2)) / (R * R)
    inside = ((theta > lo + 1e-6) & (theta < hi - 1e-6)).all(1) & torch.isfinite(crlb).all(1)
    return dict(theta=theta.numpy(), crlb=crlb.numpy(), converged=(inside & settled).numpy(), deviance=dev.numpy())


def find_and_fit(frames_e: np.ndarray, *, sigma: float = 1.0, threshold: float = 5.0, read_var: np.ndarray | None = None,
                 excess_noise: float = 1.0, mode: str = "sigma", roi_size: int | None = None,
                 isolation: float | None = None) -> SpotFits:
    """Detect spots in frames (e-), keep isolated ones, fit them; positions returned in frame coordinates.

    Args:
        frames_e: (T, H, W) frames in e- (offset removed).
        sigma: expected PSF sd for detection and the fit's start (px).
        threshold: detection threshold (robust sd of the filtered image).
        read_var: (H, W) read-noise variance (e-²) or None.
        excess_noise: 2 for an EMCCD, else 1.
        mode: see :func:`fit_spots`.
        roi_size: fit ROI side (px), default 2·ceil(3·sigma) + 1.
        isolation: minimum distance to another candidate (px), default the ROI side.
    """
    frames_e = np.asarray(frames_e, dtype=np.float64)
    R = int(roi_size) if roi_size else 2 * math.ceil(3 * sigma) + 1
    cands = detect_spots(frames_e, sigma=sigma, threshold=threshold, noise_var=read_var)
    keep = isolated(cands, isolation if isolation is not None else float(R), frames_e.shape[1:], R // 2 + 1)
    cands = cands[keep]
    names = ("x", "y", "photons", "bg") + {"sigma": ("sigma",), "sigma_xy": ("sigma_x", "sigma_y"), "fixed": ()}[mode]
    if len(cands) == 0:
        z = np.zeros(0)
        return SpotFits(np.zeros(0, np.int64), z, z, z, z, z, z, np.zeros((0, len(names))), names, np.zeros(0, bool), z)
    rois, i0, j0, rv = cut_rois(frames_e, cands, R, read_var)
    res = fit_spots(rois, mode=mode, sigma_init=sigma, read_var=rv, excess_noise=excess_noise)
    th = res["theta"]
    sx = th[:, 4] if mode != "fixed" else np.full(len(th), sigma)
    sy = th[:, 5] if mode == "sigma_xy" else sx
    return SpotFits(frame=cands[:, 0], x=th[:, 0] + j0, y=th[:, 1] + i0, photons=th[:, 2], bg=th[:, 3],
                    sigma_x=sx, sigma_y=sy, crlb=res["crlb"], params=names, converged=res["converged"],
                    loglik_ratio=res["deviance"])
