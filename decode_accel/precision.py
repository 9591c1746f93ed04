"""Localization precision in closed form: Mortensen et al. (2010) for a pixelated 2D Gaussian PSF.

A base room (numpy only): the table writers use it for Picasso's ``lpx``/``lpy`` when a table has no
predicted sigmas, and the evaluation (``decode_accel.evaluation.crlb``) checks its Fisher-information
CRLB against it.
"""

from __future__ import annotations

import numpy as np

from decode_accel.errors import DecodeAccelError

#: excess-noise factor F^2 of each camera kind (variance multiplier).
EXCESS_NOISE = {"poisson": 1.0, "scmos": 1.0, "ccd": 1.0, "emccd": 2.0}

__all__ = ["EXCESS_NOISE", "excess_noise", "mortensen_mle_sigma"]


def excess_noise(camera: str) -> float:
    """F^2 of ``camera`` (poisson, scmos, ccd: 1; emccd: 2)."""
    try:
        return EXCESS_NOISE[camera.lower()]
    except (KeyError, AttributeError):
        raise DecodeAccelError(f"unknown camera {camera!r}", field="camera",
                               fix=f"use one of {sorted(EXCESS_NOISE)}") from None


# Gauss-Legendre nodes on (0, 1) for the Mortensen integral, after t = s^2 removes the log singularity.
_GL_X, _GL_W = np.polynomial.legendre.leggauss(96)
_GL_S = 0.5 * (_GL_X + 1.0)
_GL_W = 0.5 * _GL_W


def mortensen_mle_sigma(photons, bg, sigma_nm, px_size_nm: float = 100.0, camera: str = "poisson") -> np.ndarray:
    """Mortensen et al. (2010) closed form of the MLE (= CRLB) x precision of a 2D Gaussian PSF (nm).

    var = F^2 (sigma_a^2 / N) / [1 + int_0^1 ln t / (1 + t / tau) dt],
    sigma_a^2 = sigma^2 + a^2 / 12, tau = 2 pi sigma_a^2 b / (N a^2).
    """
    n, b, s = np.broadcast_arrays(*[np.asarray(v, dtype=np.float64) for v in (photons, bg, sigma_nm)])
    a = float(px_size_nm)
    sa2 = s**2 + a**2 / 12.0
    tau = 2 * np.pi * sa2 * b / (n * a**2)
    # int_0^1 ln t/(1+t/tau) dt with t = s^2: int_0^1 4 s ln s / (1 + s^2/tau) ds.
    ss = _GL_S.reshape((1,) * n.ndim + (-1,))
    # Without background (tau -> 0) the integrand vanishes and var -> sigma_a^2 / N.
    safe_tau = np.where(tau > 0, tau, 1.0)[..., None]
    integrand = np.where(tau[..., None] > 0, 4 * ss * np.log(ss) / (1 + ss**2 / safe_tau), 0.0)
    integral = np.sum(integrand * _GL_W, axis=-1)
    var = excess_noise(camera) * sa2 / n / (1 + integral)
    return np.sqrt(var)
