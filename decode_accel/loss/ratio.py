"""The ratiometric colour term: how well the predicted channel-1 fraction r explains each true emitter.

Where the ratio is read: the predicted ratio of an emitter is wherever the network puts its detection,
and with the mixture loss that is often split between the pixel containing the emitter and a neighbour
(emitters near a pixel edge). Post-processing reads r at whichever pixel wins. So the term is the
p-weighted *expected* Gaussian NLL over the 3x3 neighbourhood of the pixel containing the emitter:
every pixel that carries the emitter's detection learns its ratio, in proportion to how much it
carries. The weights are detached: the ratio term must not move detections towards pixels that happen
to predict a good ratio. ``window=1`` reads only the pixel containing the emitter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.loss.base import as_float32, check_weight, require_keys
from decode_accel.loss.gaussian_mm import GaussianMMLoss, gaussian_nll, mean_over_emitters


def neighbourhood_index(xy: torch.Tensor, height: int, width: int, window: int):
    """Flat pixel indices of the window x window neighbourhood of the pixel containing each point.

    Args:
        xy: (B, M, 2) x, y in px (pixel (i, j) covers [j, j+1) x [i, i+1)).
    Returns:
        index (B, M, window^2) into a flattened (H*W) map (clamped into the frame) and valid (same shape,
        bool): False for neighbours outside the frame. Points outside the frame use the nearest pixel.
    """
    col = torch.floor(xy[..., 0]).long().clamp(0, width - 1)
    row = torch.floor(xy[..., 1]).long().clamp(0, height - 1)
    half = window // 2
    offsets = torch.arange(-half, half + 1, device=xy.device)
    d_row = offsets.repeat_interleave(window)
    d_col = offsets.repeat(window)
    rows = row[..., None] + d_row
    cols = col[..., None] + d_col
    valid = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    index = rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)
    return index, valid


def gather_maps(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Values of (B, H, W) maps at (B, M, N) flat indices -> (B, M, N)."""
    batch, m, n = index.shape
    return torch.gather(maps.flatten(1), 1, index.reshape(batch, m * n)).reshape(batch, m, n)


def ratio_nll_at_emitters(p: torch.Tensor, ratio: torch.Tensor, ratio_sigma: torch.Tensor, tgt_xy: torch.Tensor,
                          tgt_ratio: torch.Tensor, mask: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Expected Gaussian NLL of each true ratio under the predicted ratio maps, p-weighted over the
    ``window`` x ``window`` pixels around the emitter (weights detached, out-of-frame pixels excluded).

    Args:
        p, ratio, ratio_sigma: (B, H, W) maps (ratio and sigma are unit-free fractions).
        tgt_xy: (B, M, 2) true x, y in px; tgt_ratio: (B, M); mask: (B, M) bool.
    Returns:
        (B, M) NLL per emitter, zero for padded rows.
    """
    _, height, width = p.shape
    # padded rows may hold NaN: give them a harmless position before turning positions into indices
    tgt_xy = torch.where(mask[..., None], tgt_xy.detach(), torch.zeros_like(tgt_xy))
    index, valid = neighbourhood_index(tgt_xy, height, width, window)
    weights = gather_maps(p.detach(), index) * valid
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    target = torch.where(mask, tgt_ratio, torch.full_like(tgt_ratio, 0.5))[..., None]
    nll = gaussian_nll(target, gather_maps(ratio, index), gather_maps(ratio_sigma, index))
    per_emitter = (weights * nll).sum(dim=-1)
    return torch.where(mask, per_emitter, torch.zeros_like(per_emitter))


class RatioGaussianNLLLoss(GaussianMMLoss):
    """GaussianMM loss plus the Gaussian NLL of each emitter's true channel-1 fraction.

    Terms: those of ``GaussianMMLoss`` (count_loss, loc_loss, bg_loss; ``loc_loss`` uses the total
    ``photons``) and, when the model output has a ``ratio`` map, ``ratio_loss``: the mean over true
    emitters of the p-weighted expected -log N(r_true; r_k, ratio_sigma_k) over the 3x3 pixels around
    the emitter (see the module docstring). ``loss`` = the weighted sum.

    Single-channel models (``SigmaMUNet``, as in the seed's ``RatioGaussianNLLLoss()``) have no ratio
    map: then the loss is exactly ``GaussianMMLoss`` (no ``ratio_loss`` term). A two-channel output
    that has ``ratio`` but no ``ratio_sigma`` is an error.

    Args:
        scaling, photons_max, z_max, bg_max, count_weight, loc_weight, bg_weight, z_enabled,
            count_times_n: as ``GaussianMMLoss``.
        ratio_weight: weight of ``ratio_loss`` (>= 0).
        window: odd neighbourhood size in px over which the ratio is read (1 = the emitter's pixel only).
    """

    term_weights = {**GaussianMMLoss.term_weights, "ratio_loss": "ratio_weight"}

    def __init__(self, scaling: Any = None, *, ratio_weight: float = 1.0, window: int = 3, **kwargs: Any):
        super().__init__(scaling, **kwargs)
        self._weights["ratio_weight"] = check_weight(type(self).__name__, "ratio_weight", ratio_weight)
        if not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise DecodeAccelError(f"RatioGaussianNLLLoss: window={window!r} must be a positive odd integer",
                                   field="window", fix="use 1 or 3")
        self.window = window

    def forward(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        terms = super().forward(output, batch)
        if "ratio" not in output:
            return terms
        owner = type(self).__name__
        require_keys(owner, output, ["ratio_sigma"], "output", fix="use a model with uncertainty=True")
        require_keys(owner, batch, ["tgt_ratio"], "batch", fix="collate the emitters' ratio as tgt_ratio")
        mask = batch["tgt_mask"].bool()
        per_emitter = ratio_nll_at_emitters(
            as_float32(output["p"]), as_float32(output["ratio"]), as_float32(output["ratio_sigma"]),
            as_float32(batch["tgt_xyz"])[..., :2], as_float32(batch["tgt_ratio"]), mask, self.window)
        terms.pop("loss")
        terms["ratio_loss"] = mean_over_emitters(per_emitter, mask)
        terms["loss"] = self.weighted_total(terms)
        return terms
