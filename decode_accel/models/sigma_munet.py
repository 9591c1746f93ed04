"""SigmaMUNet: DECODE's two-stage U-Net with per-pixel Gaussian uncertainties (single channel)."""

from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin

from decode_accel.errors import DecodeAccelError
from decode_accel.models.scaling import Scaling
from decode_accel.models.two_stage import TwoStageNet, clamp_logits, _scaling_coder, sigma_map

#: default constant z sigma of a 2D model (z_enabled=False), as a fraction of z_max (DECODE's 0.1).
Z_SIGMA_2D = 0.1


class SigmaMUNet(TwoStageNet, PyTorchModelHubMixin, library_name="decode_accel", tags=["smlm", "microscopy", "decode"],
                 license="mit", coders=_scaling_coder()):
    """Two-stage U-Net for single-molecule localization (DECODE's SigmaMUNet).

    Stage 1 (shared weights) analyses each of the frames t-1, t, t+1; stage 2 combines the three
    feature maps; four heads (conv3x3 + activation, 1x1) give the 10 raw channels p; photons, dx,
    dy, z; their 4 sigmas; bg (one per camera channel).

    Args:
        in_channels: camera channels C of the input (B, C, 3, H, W); 1 for ordinary SMLM data.
        out_channels: informational (the seed's count of estimated quantities x, y, z, photons, bg = 5);
            also accepted: the raw channel count (10 with uncertainty, 6 without) or None.
        uncertainty: predict the sigmas (needed by the Gaussian-mixture loss).
        dropout: spatial dropout after every U-Net block, in [0, 1).
        features: width of the first U-Net level (48 in DECODE); levels double it.
        depth: down-sampling steps of each U-Net; H and W must be multiples of ``2**depth``.
        activation: 'elu' (DECODE), 'relu' or 'gelu'.
        norm: None, 'group' or 'batch' normalisation in the U-Nets (DECODE: None).
        scaling: :class:`Scaling` (or a dict of its fields); the input offset/scale and output ranges.
        z_enabled: False for 2D data: z is 0 and z_sigma a constant ``0.1 * z_max`` nm.
        gradient_checkpointing: recompute U-Net activations in the backward pass (saves memory).
        variance_input: the input has C more channels after the camera channels: the per-pixel sCMOS
            read-noise variance in photons² (``model.variance_input``, see ``TwoStageNet``).

    Input: frames (B, C, 3, H, W) in photons; the model applies ``(x - input_offset) / input_scale``.
    Output: dict of maps in physical units (docs/architecture.md): p, logits, photons, dx, dy, z
    and, with ``uncertainty``, photons_sigma, dx_sigma, dy_sigma, z_sigma, all (B, H, W); bg (B, C, H, W).
    dx, dy are offsets of the emitter from the pixel centre in px (x along columns, y along rows),
    within (-offset_max, offset_max) (1.5 px by default); photons in (0, photons_max); z in (-z_max, z_max) nm; bg in (0, bg_max) photons/px.
    logits = 8 tanh(raw / 8), a soft form of DECODE's [-8, 8] clamp that keeps a gradient
    (see ``two_stage.clamp_logits``); p = sigmoid(logits).
    Sigmas: photons_sigma in photons, dx/dy_sigma in px, z_sigma in nm, each ``(3 sigmoid + 0.001) x unit``.
    """

    #: keys of the output dict (with uncertainty=True).
    OUTPUT_KEYS = ("p", "logits", "photons", "dx", "dy", "z", "photons_sigma", "dx_sigma", "dy_sigma", "z_sigma", "bg")

    def __init__(self, in_channels: int = 1, out_channels: int | None = 5, uncertainty: bool = True,
                 dropout: float = 0.0, features: int = 48, depth: int = 2, activation: str = "elu",
                 norm: str | None = None, scaling: Scaling | dict | None = None, z_enabled: bool = True,
                 gradient_checkpointing: bool = False, variance_input: bool = False):
        raw_channels = 10 if uncertainty else 6
        if out_channels is not None and out_channels not in (5, raw_channels):
            raise DecodeAccelError(
                f"got {out_channels}, but SigmaMUNet estimates 5 quantities (x, y, z, photons, bg) in "
                f"{raw_channels} raw channels", field="out_channels", fix="pass 5, or leave it out")
        heads = {"p": 1, "mean": 4, "bg": in_channels}
        if uncertainty:
            heads["sigma"] = 4
        super().__init__(in_channels=in_channels, stage1_groups=1, share_stage1=True, head_channels=heads,
                         features=features, depth=depth, activation=activation, norm=norm, dropout=dropout,
                         scaling=scaling, gradient_checkpointing=gradient_checkpointing,
                         variance_input=variance_input)
        self.uncertainty = uncertainty
        self.z_enabled = z_enabled
        self._finish_config(dict(in_channels=in_channels, out_channels=out_channels, uncertainty=uncertainty,
                                 dropout=dropout, features=features, depth=depth, activation=activation,
                                 norm=norm, z_enabled=z_enabled, gradient_checkpointing=gradient_checkpointing,
                                 variance_input=variance_input))

    def _outputs(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s = self.scaling
        logits = clamp_logits(raw["p"][:, 0])
        mean = raw["mean"]
        out = {
            "p": torch.sigmoid(logits),
            "logits": logits,
            "photons": torch.sigmoid(mean[:, 0]) * s.photons_max,
            "dx": torch.tanh(mean[:, 1]) * s.offset_max,
            "dy": torch.tanh(mean[:, 2]) * s.offset_max,
            "z": torch.tanh(mean[:, 3]) * s.z_max if self.z_enabled else torch.zeros_like(logits),
        }
        if self.uncertainty:
            sigma = raw["sigma"]
            out["photons_sigma"] = sigma_map(sigma[:, 0], s.photons_max)
            out["dx_sigma"] = sigma_map(sigma[:, 1])
            out["dy_sigma"] = sigma_map(sigma[:, 2])
            out["z_sigma"] = (sigma_map(sigma[:, 3], s.z_max) if self.z_enabled
                              else torch.full_like(logits, Z_SIGMA_2D * s.z_max))
        out["bg"] = torch.sigmoid(raw["bg"]) * s.bg_max
        return out
