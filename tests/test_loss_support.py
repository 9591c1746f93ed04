"""Shared small cases and brute-force numpy references for the loss tests (no tests here).

The references loop over frames, emitters and pixels in float64 with scipy's normal density, written
from the formulas in the docstrings, independently of the vectorised torch code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import norm

PHOTONS_MAX, Z_MAX, BG_MAX = 2000.0, 600.0, 50.0


def make_single_channel_case(seed: int = 0, batch: int = 2, height: int = 4, width: int = 4, n_max: int = 3):
    """A random output dict (physical units) and a batch with some padded rows (NaN in the padding on purpose)
    and frame 1 holding fewer emitters than frame 0."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    shape = (batch, height, width)
    output = {
        "p": 0.05 + 0.9 * rand(*shape),
        "photons": 200 + 1500 * rand(*shape),
        "photons_sigma": 100 + 400 * rand(*shape),
        "dx": rand(*shape) - 0.5,
        "dy": rand(*shape) - 0.5,
        "dx_sigma": 0.3 + rand(*shape),
        "dy_sigma": 0.3 + rand(*shape),
        "z": (rand(*shape) - 0.5) * 800,
        "z_sigma": 50 + 200 * rand(*shape),
        "bg": 5 + 20 * rand(batch, 1, height, width),
    }
    output["logits"] = torch.logit(output["p"])
    xyz = torch.stack([rand(batch, n_max) * width, rand(batch, n_max) * height, (rand(batch, n_max) - 0.5) * 800], -1)
    mask = torch.zeros(batch, n_max, dtype=torch.bool)
    mask[0, :3] = True
    mask[1:, :1] = True
    xyz[~mask] = float("nan")
    photons = 300 + 1200 * rand(batch, n_max)
    photons[~mask] = float("nan")
    tgt = {"tgt_xyz": xyz, "tgt_photons": photons, "tgt_mask": mask, "tgt_ratio": 0.1 + 0.8 * rand(batch, n_max),
           "bg": 5 + 20 * rand(batch, 1, height, width)}
    return output, tgt


def add_two_channels(output: dict, batch: dict, seed: int = 1, consistent: bool = False):
    """Extend a single-channel case with the two-channel maps and a (B, 2, H, W) background."""
    g = torch.Generator().manual_seed(seed)
    p = output["p"]
    shape = p.shape
    out = dict(output)
    out["ratio"] = 0.05 + 0.9 * torch.rand(*shape, generator=g)
    out["ratio_sigma"] = 0.05 + 0.2 * torch.rand(*shape, generator=g)
    if consistent:
        out["photons_ch1"] = out["ratio"] * out["photons"]
        out["photons_ch2"] = (1 - out["ratio"]) * out["photons"]
    else:
        out["photons_ch1"] = 100 + 800 * torch.rand(*shape, generator=g)
        out["photons_ch2"] = 100 + 800 * torch.rand(*shape, generator=g)
    out["photons_ch1_sigma"] = 50 + 200 * torch.rand(*shape, generator=g)
    out["photons_ch2_sigma"] = 50 + 200 * torch.rand(*shape, generator=g)
    out["bg"] = 5 + 20 * torch.rand(shape[0], 2, *shape[1:], generator=g)
    tgt = dict(batch)
    tgt["bg"] = 5 + 20 * torch.rand(shape[0], 2, *shape[1:], generator=g)
    return out, tgt


def np_(tensor):
    return tensor.detach().double().numpy()


def brute_count_nll(p: np.ndarray, n: int) -> float:
    mean = p.sum()
    var = (p * (1 - p)).sum()
    return -norm.logpdf(n, loc=mean, scale=math.sqrt(var))


def brute_mixture_nll(p, means, sigmas, target) -> float:
    """-log sum over pixels (i, j) of p_ij / sum p * prod_d N(target_d; means[d][i, j], sigmas[d][i, j])."""
    height, width = p.shape
    total = 0.0
    for i in range(height):
        for j in range(width):
            density = 1.0
            for d in range(len(target)):
                density *= norm.pdf(target[d], loc=means[d][i, j], scale=sigmas[d][i, j])
            total += p[i, j] / p.sum() * density
    return -math.log(total)


def brute_gmm_terms(output: dict, batch: dict, photons_key: str = "photons", photons_fraction=None,
                    z_enabled: bool = True):
    """count (per frame, batch mean) and loc (per emitter, pooled over the batch) from the definitions;
    the photon target is tgt_photons times ``photons_fraction(b, m)`` when given (per-channel terms)."""
    mask = batch["tgt_mask"].numpy()
    n_frames = mask.shape[0]
    counts, locs = [], []
    for b in range(n_frames):
        p = np_(output["p"][b])
        height, width = p.shape
        counts.append(brute_count_nll(p, int(mask[b].sum())))
        cols, rows = np.meshgrid(np.arange(width), np.arange(height))
        means = [np_(output[photons_key][b]) / PHOTONS_MAX, cols + 0.5 + np_(output["dx"][b]),
                 rows + 0.5 + np_(output["dy"][b])]
        sigmas = [np_(output[f"{photons_key}_sigma"][b]) / PHOTONS_MAX, np_(output["dx_sigma"][b]),
                  np_(output["dy_sigma"][b])]
        if z_enabled:
            means.append(np_(output["z"][b]) / Z_MAX)
            sigmas.append(np_(output["z_sigma"][b]) / Z_MAX)
        for m in np.flatnonzero(mask[b]):
            photons = float(batch["tgt_photons"][b, m])
            if photons_fraction is not None:
                photons *= photons_fraction(b, m)
            x, y, z = (float(v) for v in batch["tgt_xyz"][b, m])
            target = [photons / PHOTONS_MAX, x, y] + ([z / Z_MAX] if z_enabled else [])
            locs.append(brute_mixture_nll(p, means, sigmas, target))
    return float(np.mean(counts)), float(np.sum(locs) / max(len(locs), 1))


def brute_bg_mse(predicted, target) -> float:
    return float(np.mean(((np_(predicted) - np_(target)) / BG_MAX) ** 2))


def brute_ratio_nll(output: dict, batch: dict, window: int = 3) -> float:
    """Mean over true emitters of sum_k w_k (-log N(r_true; ratio_k, ratio_sigma_k)) over the in-frame pixels k of
    the window around the pixel containing the emitter, w_k = p_k / sum of p over those pixels."""
    mask = batch["tgt_mask"].numpy()
    values = []
    half = window // 2
    for b in range(mask.shape[0]):
        p, ratio, sigma = np_(output["p"][b]), np_(output["ratio"][b]), np_(output["ratio_sigma"][b])
        height, width = p.shape
        for m in np.flatnonzero(mask[b]):
            x, y = float(batch["tgt_xyz"][b, m, 0]), float(batch["tgt_xyz"][b, m, 1])
            col, row = min(int(math.floor(x)), width - 1), min(int(math.floor(y)), height - 1)
            weights, nlls = [], []
            for i in range(row - half, row + half + 1):
                for j in range(col - half, col + half + 1):
                    if 0 <= i < height and 0 <= j < width:
                        weights.append(p[i, j])
                        nlls.append(-norm.logpdf(float(batch["tgt_ratio"][b, m]), ratio[i, j], sigma[i, j]))
            weights = np.array(weights) / np.sum(weights)
            values.append(float(np.dot(weights, nlls)))
    return float(np.mean(values))
