"""DECODE's Gaussian-mixture loss: a count term, a mixture NLL of the true emitters, a background MSE.

Every pixel k of a frame is a mixture component with weight p_k / sum(p) and a diagonal Gaussian over
(photons, x, y, z) centred on what the pixel predicts. The true emitters of the frame are scored under
that mixture, so a pixel is never forced to be "the" detection of an emitter: the network learns which
pixels carry which emitter. Pixel (row i, column j) has its centre at x = j + 0.5 px, y = i + 0.5 px, and
predicts the position (j + 0.5 + dx, i + 0.5 + dy).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from decode_accel.loss.base import (LOG_SQRT_2PI, SIGMA_FLOOR, WeightedLoss, as_float32, check_batch_shapes,
                                    require_keys, resolve_scales)

# Lower bound of the count variance sum p(1 - p). With the models' clamped logits (|l| <= 8) a single
# pixel already contributes 3.4e-4, so the floor only matters for hand-made p of exactly 0 or 1.
COUNT_VAR_FLOOR = 1e-3
# Mixture weights use log(max(p, P_FLOOR)) so that a pixel with p == 0 is a component of weight ~0
# instead of -inf, and sum(p) == 0 gives a finite (if useless) loss instead of NaN.
P_FLOOR = 1e-12


def pixel_centres(height: int, width: int, device: torch.device, dtype: torch.dtype = torch.float32):
    """x (W,) and y (H,) of the pixel centres in px: column j -> j + 0.5, row i -> i + 0.5."""
    x = torch.arange(width, device=device, dtype=dtype) + 0.5
    y = torch.arange(height, device=device, dtype=dtype) + 0.5
    return x, y


def count_nll(p: torch.Tensor, n_true: torch.Tensor, var_floor: float = COUNT_VAR_FLOOR) -> torch.Tensor:
    """Negative log-likelihood of the true emitter count under the Gaussian approximation of the
    Poisson-binomial count of the detections: -log N(n; sum p, sum p(1 - p)).

    Args:
        p: (B, H, W) detection probabilities.
        n_true: (B,) true number of emitters per frame.
    Returns:
        (B,) NLL per frame (nats). Unbounded below as the variance shrinks, so it can be negative.
    """
    mean = p.sum(dim=(-2, -1))
    var = (p * (1.0 - p)).sum(dim=(-2, -1)).clamp_min(var_floor)
    n_true = n_true.to(mean.dtype)
    return 0.5 * (n_true - mean) ** 2 / var + 0.5 * torch.log(var) + LOG_SQRT_2PI


def component_log_prob(targets: torch.Tensor, means: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """log prod_d N(t_jd; mu_kd, sigma_kd) for every target j and every pixel component k.

    Args:
        targets: (B, M, D) target values (normalised units).
        means, sigmas: (B, D, K) component means and standard deviations (same units).
    Returns:
        (B, M, K). The dims are accumulated one at a time so that memory peaks at a few (B, M, K)
        tensors rather than one (B, M, K, D).
    """
    total = None
    for d in range(targets.shape[-1]):
        sigma = sigmas[:, d, None, :].clamp_min(SIGMA_FLOOR)
        z = (targets[:, :, d, None] - means[:, d, None, :]) / sigma
        term = -0.5 * z * z - torch.log(sigma) - LOG_SQRT_2PI
        total = term if total is None else total + term
    return total


def mixture_nll(p: torch.Tensor, log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-log sum_k (p_k / sum p) exp(log_prob_jk) per target, 0 for padded targets.

    Args:
        p: (B, H, W) or (B, K) mixture weights before normalisation.
        log_prob: (B, M, K) component log-densities of each target (``component_log_prob``).
        mask: (B, M) bool, which targets are real.
    Returns:
        (B, M) NLL per emitter (nats), zero where ``mask`` is False.
    """
    p = p.flatten(1)
    log_w = torch.log(p.clamp_min(P_FLOOR)) - torch.log(p.sum(dim=1, keepdim=True).clamp_min(P_FLOOR))
    nll = -torch.logsumexp(log_w[:, None, :] + log_prob, dim=-1)
    return torch.where(mask, nll, torch.zeros_like(nll))


def gaussian_nll(target: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Elementwise -log N(target; mean, sigma) with sigma lifted to ``SIGMA_FLOOR``."""
    sigma = sigma.clamp_min(SIGMA_FLOOR)
    z = (target - mean) / sigma
    return 0.5 * z * z + torch.log(sigma) + LOG_SQRT_2PI


def position_maps(output: Mapping[str, torch.Tensor], z_enabled: bool, z_max: float):
    """Component means and sigmas of the position dims (x px, y px[, z / z_max]) as (B, D, H*W)."""
    dx = as_float32(output["dx"])
    _, height, width = dx.shape
    xc, yc = pixel_centres(height, width, dx.device)
    means = [xc + dx, yc[:, None] + as_float32(output["dy"])]
    sigmas = [as_float32(output["dx_sigma"]), as_float32(output["dy_sigma"])]
    if z_enabled:
        means.append(as_float32(output["z"]) / z_max)
        sigmas.append(as_float32(output["z_sigma"]) / z_max)
    return torch.stack(means, 1).flatten(2), torch.stack(sigmas, 1).flatten(2)


def position_targets(batch: Mapping[str, torch.Tensor], z_enabled: bool, z_max: float) -> torch.Tensor:
    """Targets of the position dims (x px, y px[, z / z_max]) as (B, M, D); padded rows set to 0 so that
    garbage (NaN) in them cannot leak NaN gradients through the masked-out branch."""
    xyz = as_float32(batch["tgt_xyz"])
    if z_enabled:
        xyz = torch.cat([xyz[..., :2], xyz[..., 2:] / z_max], dim=-1)
    else:
        xyz = xyz[..., :2]
    return torch.where(batch["tgt_mask"][..., None], xyz, torch.zeros_like(xyz))


def photon_log_prob(output: Mapping[str, torch.Tensor], key: str, target_photons: torch.Tensor,
                    mask: torch.Tensor, photons_max: float) -> torch.Tensor:
    """(B, M, K) log-density of the target photons / photons_max under output[key] and output[key_sigma]."""
    means = as_float32(output[key]).flatten(1)[:, None, :] / photons_max
    sigmas = as_float32(output[f"{key}_sigma"]).flatten(1)[:, None, :] / photons_max
    targets = as_float32(target_photons) / photons_max
    targets = torch.where(mask, targets, torch.zeros_like(targets))
    return component_log_prob(targets[..., None], means, sigmas)


def background_mse(predicted: torch.Tensor, target: torch.Tensor, bg_max: float) -> torch.Tensor:
    """Mean over frames, channels and pixels of ((predicted - target) / bg_max)^2 (unit-free)."""
    predicted = as_float32(predicted)
    target = as_float32(target)
    if predicted.dim() == target.dim() - 1:  # a single-channel model may emit bg as (B, H, W)
        predicted = predicted.unsqueeze(1)
    return (((predicted - target) / bg_max) ** 2).mean()


def mean_over_emitters(per_emitter: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-emitter values over the whole batch divided by the number of true emitters (at least 1),
    so every emitter counts the same whichever frame it is in."""
    return per_emitter.sum() / mask.sum().clamp_min(1).to(per_emitter.dtype)


class GaussianMMLoss(WeightedLoss):
    """DECODE's Gaussian-mixture loss for single-emitter-per-pixel maps (``SigmaMUNet`` output).

    Terms (unweighted, scalars):
        ``count_loss``: -log N(M_b; sum p, sum p(1 - p)), the Gaussian approximation of the
            Poisson-binomial count, **per frame** (mean over the batch). Unlike DECODE it is NOT
            multiplied by M_b: with that factor a frame without emitters contributes nothing, so the
            network is never taught to keep p low on empty frames (false positives). Pass
            ``count_times_n=True`` for DECODE's behaviour.
        ``loc_loss``: -log sum_k (p_k / sum p) prod_d N(t_jd; mu_kd, sigma_kd) over all H*W pixels k
            as components, **per emitter** (summed over every true emitter of the batch, divided by
            their number), with d over (photons / photons_max, x px, y px, z / z_max). The
            normalisation makes the dims comparable; it adds log(photons_max) + log(z_max) to every
            emitter's NLL and does not change gradients.
        ``bg_loss``: mean over pixels of ((bg - bg_true) / bg_max)^2. DECODE sums over pixels, which
            equals ``bg_weight = H * W`` here; the mean keeps the weight independent of the frame size.
        ``loss``: count_weight * count_loss + loc_weight * loc_loss + bg_weight * bg_loss.

    With these normalisations the numbers are comparable across emitter densities and frame sizes.
    Inputs follow docs/architecture.md: ``output`` maps in physical units (p, photons, dx, dy, z and
    their ``_sigma``, bg), ``batch`` with tgt_xyz (px, px, nm), tgt_photons, tgt_mask, bg. Everything
    is evaluated in float32.

    Args:
        scaling: the model's ``Scaling`` (or any object/mapping with photons_max, z_max, bg_max);
            None uses ``decode_accel.models.Scaling()``'s defaults.
        photons_max, z_max, bg_max: override single scales (photons, nm, photons/px).
        count_weight, loc_weight, bg_weight: weights of the terms (>= 0), changeable with
            ``update_weights``.
        z_enabled: False for 2D models: z is left out of the mixture (the model's z map is ignored).
        count_times_n: multiply each frame's count NLL by its number of emitters (DECODE); default off.
    """

    term_weights = {"count_loss": "count_weight", "loc_loss": "loc_weight", "bg_loss": "bg_weight"}

    def __init__(self, scaling: Any = None, *, photons_max: float | None = None, z_max: float | None = None,
                 bg_max: float | None = None, count_weight: float = 1.0, loc_weight: float = 1.0,
                 bg_weight: float = 1.0, z_enabled: bool = True, count_times_n: bool = False):
        super().__init__(count_weight=count_weight, loc_weight=loc_weight, bg_weight=bg_weight)
        self.scales = resolve_scales(scaling, photons_max=photons_max, z_max=z_max, bg_max=bg_max,
                                     owner=type(self).__name__)
        self.z_enabled = bool(z_enabled)
        self.count_times_n = bool(count_times_n)

    def _required_output(self) -> list[str]:
        keys = ["p", "photons", "photons_sigma", "dx", "dy", "dx_sigma", "dy_sigma", "bg"]
        if self.z_enabled:
            keys += ["z", "z_sigma"]
        return keys

    def _check(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> None:
        owner = type(self).__name__
        require_keys(owner, output, self._required_output(), "output",
                     fix="use a model that returns the map dict of docs/architecture.md"
                         + ("; set z_enabled=False for a 2D model" if self.z_enabled else ""))
        require_keys(owner, batch, ["tgt_xyz", "tgt_photons", "tgt_mask", "bg"], "batch",
                     fix="use the data module's collate (targets of the central frame)")
        check_batch_shapes(owner, output["p"], batch)

    def gmm_terms(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                  photons_key: str = "photons", target_photons: torch.Tensor | None = None
                  ) -> dict[str, torch.Tensor]:
        """count_loss and loc_loss (no bg, no total) for the photons map ``photons_key``."""
        mask = batch["tgt_mask"].bool()
        p = as_float32(output["p"])
        n_true = mask.sum(dim=1)
        count = count_nll(p, n_true)
        if self.count_times_n:
            count = count * n_true.to(count.dtype)
        means, sigmas = position_maps(output, self.z_enabled, self.scales.z_max)
        log_prob = component_log_prob(position_targets(batch, self.z_enabled, self.scales.z_max), means, sigmas)
        if target_photons is None:
            target_photons = batch["tgt_photons"]
        log_prob = log_prob + photon_log_prob(output, photons_key, target_photons, mask, self.scales.photons_max)
        loc = mean_over_emitters(mixture_nll(p, log_prob, mask), mask)
        return {"count_loss": count.mean(), "loc_loss": loc}

    def forward(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """Terms by name plus ``"loss"`` (see the class docstring)."""
        self._check(output, batch)
        terms = self.gmm_terms(output, batch)
        terms["bg_loss"] = background_mse(output["bg"], batch["bg"], self.scales.bg_max)
        terms["loss"] = self.weighted_total(terms)
        return terms


__all__ = ["GaussianMMLoss", "count_nll", "component_log_prob", "mixture_nll", "background_mse",
           "gaussian_nll", "pixel_centres"]
