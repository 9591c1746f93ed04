"""The two-channel (ratiometric) loss: one molecule, one position, its photons split between two cameras.

The model (``DoubleMUNet``) predicts one detection map p and one position (dx, dy, z) per pixel, the
total photons N, per-channel photons N1, N2 and the channel-1 fraction r, each with a sigma. Physics:
N1 = r N and N2 = (1 - r) N (detected photons split by the dichroic), and the photon noise of the two
channels is independent (different camera pixels).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.loss.base import (SIGMA_FLOOR, WeightedLoss, as_float32, check_batch_shapes, require_keys,
                                    resolve_scales)
from decode_accel.loss.gaussian_mm import (background_mse, component_log_prob, count_nll, mean_over_emitters,
                                           mixture_nll, photon_log_prob, position_maps, position_targets)
from decode_accel.loss.ratio import ratio_nll_at_emitters

# Photon sums below this fraction of photons_max are lifted to it before dividing by them: such pixels
# carry no emitter, and their relative errors would otherwise explode.
RELATIVE_PHOTON_FLOOR = 1e-3


def detection_weighted_mean(values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """sum(p * values) / sum(p) over the whole batch, with p detached: per-pixel consistency only matters
    where the network claims an emitter, and these terms must not move the detections themselves."""
    weights = p.detach()
    return (weights * values).sum() / weights.sum().clamp_min(1e-12)


def conservation_residuals(photons: torch.Tensor, photons_ch1: torch.Tensor, photons_ch2: torch.Tensor,
                           ratio: torch.Tensor, photons_floor: float) -> torch.Tensor:
    """Per-pixel photon-conservation penalty, unit-free and O(1):
    ((N1 + N2 - N) / N_ref)^2 + (r - N1 / (N1 + N2))^2, with N_ref = max(N, N1 + N2, floor) (detached),
    so the first part is at most 1 for non-negative photons and the second is a difference of fractions."""
    total_split = photons_ch1 + photons_ch2
    reference = torch.maximum(photons, total_split).detach().clamp_min(photons_floor)
    relative_mismatch = (total_split - photons) / reference
    implied_ratio = photons_ch1 / total_split.clamp_min(photons_floor)
    return relative_mismatch ** 2 + (ratio - implied_ratio) ** 2


def implied_ratio_sigma(photons_ch1: torch.Tensor, photons_ch2: torch.Tensor, sigma_ch1: torch.Tensor,
                        sigma_ch2: torch.Tensor, photons_floor: float) -> torch.Tensor:
    """sigma of r = N1 / (N1 + N2) propagated from independent per-channel photon errors:
    sigma_r^2 = (N2^2 sigma_1^2 + N1^2 sigma_2^2) / (N1 + N2)^4."""
    total = (photons_ch1 + photons_ch2).clamp_min(photons_floor)
    var = (photons_ch2 ** 2 * sigma_ch1 ** 2 + photons_ch1 ** 2 * sigma_ch2 ** 2) / total ** 4
    return var.clamp_min(SIGMA_FLOOR ** 2).sqrt()


class UnifiedLoss(WeightedLoss):
    """Loss for two-channel ratiometric models (``DoubleMUNet`` output).

    Terms (unweighted scalars) and the weight each enters ``loss`` with:
        ``count_loss`` (count_weight): the count NLL of ``GaussianMMLoss`` on the shared p, per frame
            (not multiplied by the emitter number unless ``count_times_n``; empty frames teach "no
            detections").
        ``ch1_loss`` (ch1_weight): mixture NLL per emitter over (photons_ch1 / photons_max, x, y,
            z / z_max) with the true r N as target; ``ch2_loss`` (ch2_weight): the same with
            photons_ch2 and (1 - r) N. p and the position are shared, so the position is learned from
            both channel terms.
        ``ratio_loss`` (ratio_weight): p-weighted 3x3 Gaussian NLL of the true r (``RatioGaussianNLLLoss``).
        ``conservation_loss`` (conservation_weight): p-weighted mean over pixels of
            ((N1 + N2 - N) / N)^2 + (r - N1 / (N1 + N2))^2 — unit-free, O(1). Zero when the model
            builds N1 = r N, N2 = (1 - r) N by construction; a real constraint when its heads are free.
        ``uncertainty_loss`` (uncertainty_weight): p-weighted mean over pixels of
            (log ratio_sigma - log sigma_r_implied)^2, where sigma_r_implied propagates the per-channel
            photon sigmas through r = N1 / (N1 + N2) assuming independent channels (the photon noise
            of two cameras is). It ties the colour uncertainty users filter on to the per-channel
            photon uncertainties the channel terms calibrate: a factor e of disagreement costs 1.
        ``bg_ch1_loss``, ``bg_ch2_loss`` (bg_weight each): background MSE of each channel / bg_max.
        ``loss``: the weighted sum.
    The p-weighted terms use detached weights pooled over the batch.

    Args:
        ch1_weight, ch2_weight, ratio_weight, conservation_weight, uncertainty_weight, count_weight,
            bg_weight: weights (>= 0), changeable with ``update_weights``.
        scaling, photons_max, z_max, bg_max, z_enabled, count_times_n: as ``GaussianMMLoss``.
        window: neighbourhood (px, odd) over which the ratio is read.
    """

    term_weights = {"count_loss": "count_weight", "ch1_loss": "ch1_weight", "ch2_loss": "ch2_weight",
                    "ratio_loss": "ratio_weight", "conservation_loss": "conservation_weight",
                    "uncertainty_loss": "uncertainty_weight", "bg_ch1_loss": "bg_weight",
                    "bg_ch2_loss": "bg_weight"}

    def __init__(self, ch1_weight: float = 1.0, ch2_weight: float = 1.0, ratio_weight: float = 0.5,
                 conservation_weight: float = 0.1, uncertainty_weight: float = 0.1, *, count_weight: float = 1.0,
                 bg_weight: float = 1.0, scaling: Any = None, photons_max: float | None = None,
                 z_max: float | None = None, bg_max: float | None = None, z_enabled: bool = True,
                 count_times_n: bool = False, window: int = 3):
        super().__init__(ch1_weight=ch1_weight, ch2_weight=ch2_weight, ratio_weight=ratio_weight,
                         conservation_weight=conservation_weight, uncertainty_weight=uncertainty_weight,
                         count_weight=count_weight, bg_weight=bg_weight)
        self.scales = resolve_scales(scaling, photons_max=photons_max, z_max=z_max, bg_max=bg_max,
                                     owner="UnifiedLoss")
        self.z_enabled = bool(z_enabled)
        self.count_times_n = bool(count_times_n)
        if not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise DecodeAccelError(f"UnifiedLoss: window={window!r} must be a positive odd integer", field="window",
                                   fix="use 1 or 3")
        self.window = window

    def _check(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> None:
        keys = ["p", "photons", "photons_ch1", "photons_ch1_sigma", "photons_ch2", "photons_ch2_sigma", "ratio",
                "ratio_sigma", "dx", "dy", "dx_sigma", "dy_sigma", "bg"]
        if self.z_enabled:
            keys += ["z", "z_sigma"]
        require_keys("UnifiedLoss", output, keys, "output",
                     fix="UnifiedLoss needs a two-channel model (DoubleMUNet); use GaussianMMLoss or "
                         "RatioGaussianNLLLoss for single-channel models"
                         + ("; set z_enabled=False for a 2D model" if self.z_enabled else ""))
        require_keys("UnifiedLoss", batch, ["tgt_xyz", "tgt_photons", "tgt_ratio", "tgt_mask", "bg"], "batch",
                     fix="use the two-channel data loader (create_multi_channel_dataloader)")
        check_batch_shapes("UnifiedLoss", output["p"], batch)
        for name, tensor in (("output['bg']", output["bg"]), ("batch['bg']", batch["bg"])):
            if tensor.dim() != 4 or tensor.shape[1] != 2:
                raise DecodeAccelError(f"UnifiedLoss: {name} has shape {tuple(tensor.shape)}, expected (B, 2, H, W)",
                                       field=name, fix="UnifiedLoss is for two-channel data")

    def forward(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """Terms by name plus ``"loss"`` (see the class docstring)."""
        self._check(output, batch)
        scales = self.scales
        mask = batch["tgt_mask"].bool()
        n_true = mask.sum(dim=1)
        p = as_float32(output["p"])
        terms: dict[str, torch.Tensor] = {}

        count = count_nll(p, n_true)
        if self.count_times_n:
            count = count * n_true.to(count.dtype)
        terms["count_loss"] = count.mean()

        # The position part of every component density is shared by both channel mixtures: compute it once.
        means, sigmas = position_maps(output, self.z_enabled, scales.z_max)
        position_log_prob = component_log_prob(position_targets(batch, self.z_enabled, scales.z_max), means, sigmas)
        tgt_photons = as_float32(batch["tgt_photons"])
        tgt_ratio = as_float32(batch["tgt_ratio"])
        for channel, target in (("ch1", tgt_photons * tgt_ratio), ("ch2", tgt_photons * (1.0 - tgt_ratio))):
            log_prob = position_log_prob + photon_log_prob(output, f"photons_{channel}", target, mask,
                                                           scales.photons_max)
            terms[f"{channel}_loss"] = mean_over_emitters(mixture_nll(p, log_prob, mask), mask)

        ratio, ratio_sigma = as_float32(output["ratio"]), as_float32(output["ratio_sigma"])
        per_emitter = ratio_nll_at_emitters(p, ratio, ratio_sigma, as_float32(batch["tgt_xyz"])[..., :2], tgt_ratio,
                                            mask, self.window)
        terms["ratio_loss"] = mean_over_emitters(per_emitter, mask)

        photons_floor = RELATIVE_PHOTON_FLOOR * scales.photons_max
        n1, n2 = as_float32(output["photons_ch1"]), as_float32(output["photons_ch2"])
        terms["conservation_loss"] = detection_weighted_mean(
            conservation_residuals(as_float32(output["photons"]), n1, n2, ratio, photons_floor), p)
        implied = implied_ratio_sigma(n1, n2, as_float32(output["photons_ch1_sigma"]),
                                      as_float32(output["photons_ch2_sigma"]), photons_floor)
        log_mismatch = torch.log(ratio_sigma.clamp_min(SIGMA_FLOOR)) - torch.log(implied)
        terms["uncertainty_loss"] = detection_weighted_mean(log_mismatch ** 2, p)

        for c, channel in enumerate(("ch1", "ch2")):
            terms[f"bg_{channel}_loss"] = background_mse(output["bg"][:, c], batch["bg"][:, c], scales.bg_max)
        terms["loss"] = self.weighted_total(terms)
        return terms
