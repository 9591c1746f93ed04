"""DoubleMUNet: the two-stage U-Net for two-channel ratiometric SMLM.

One molecule emits into both camera channels: it has one position (x, y, z) and a total photon
number N that splits into r*N photons in channel 1 and (1 - r)*N in channel 2. The network predicts
exactly these quantities - one p map, one (dx, dy, z), N and r - and derives the per-channel photons
from them, so the two channels cannot disagree about a molecule by construction.
"""

from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin

from decode_accel.errors import DecodeAccelError
from decode_accel.models.scaling import Scaling
from decode_accel.models.sigma_munet import Z_SIGMA_2D
from decode_accel.models.two_stage import SIGMA_EPS, TwoStageNet, clamp_logits, _scaling_coder, sigma_map

#: the ratio sigma is sigmoid * 0.5 + eps: no quantity confined to [0, 1] has a sd above 0.5.
RATIO_SIGMA_MAX = 0.5


class DoubleMUNet(TwoStageNet, PyTorchModelHubMixin, library_name="decode_accel",
                  tags=["smlm", "microscopy", "decode", "ratiometric"], license="mit", coders=_scaling_coder()):
    """Two-stage U-Net for two-channel ratiometric data, input (B, 2, 3, H, W) in photons.

    Stage 1 runs on every single channel-frame (6 per window). By default both channels share the
    stage-1 weights (``share_stage1=True``): stage 1 is a per-frame spot detector and the spots look
    alike in both channels (only brightness and background differ, which the shared weights see in
    both), so sharing halves stage-1's parameters and doubles the data each weight learns from.
    Stage 2 sees the six feature maps in a fixed order (t-1 ch1, t-1 ch2, t ch1, ..., t+1 ch2),
    so it can still treat the channels differently (e.g. a channel offset). ``share_stage1=False``
    gives each channel its own stage 1.

    Args:
        in_channels: camera channels per stage-1 call; 1 (each channel on its own), as in the seed.
        out_channels_ch1, out_channels_ch2: informational, per-channel quantities (x, y, z, photons,
            bg) = 5; position and photons are shared/derived, see the class docstring.
        out_channels_ratio: informational, 1 (the ratio).
        uncertainty: predict sigmas (needed by the Gaussian-mixture and ratio NLL losses).
        share_stage1: both channels use the same stage-1 weights (see above).
        dropout, features, depth, activation, norm, scaling, z_enabled, gradient_checkpointing, variance_input: as in
            :class:`~decode_accel.models.SigmaMUNet`.

    Output (physical units): p, logits, dx, dy (px), z (nm), photons = total N, ratio r in (0, 1),
    photons_ch1 = r N, photons_ch2 = N - r N (photons), all (B, H, W); bg (B, 2, H, W) photons/px.
    With uncertainty: photons_sigma, dx_sigma, dy_sigma, z_sigma, ratio_sigma, and the per-channel
    photon sigmas by first-order error propagation with independent errors of N and r:
    photons_ch1_sigma = sqrt(r^2 sN^2 + N^2 sr^2), photons_ch2_sigma = sqrt((1-r)^2 sN^2 + N^2 sr^2).
    """

    OUTPUT_KEYS = ("p", "logits", "photons", "ratio", "photons_ch1", "photons_ch2", "dx", "dy", "z",
                   "photons_sigma", "ratio_sigma", "photons_ch1_sigma", "photons_ch2_sigma",
                   "dx_sigma", "dy_sigma", "z_sigma", "bg")

    def __init__(self, in_channels: int = 1, out_channels_ch1: int | None = 5, out_channels_ch2: int | None = 5,
                 out_channels_ratio: int | None = 1, uncertainty: bool = True, dropout: float = 0.0,
                 features: int = 48, depth: int = 2, activation: str = "elu", norm: str | None = None,
                 scaling: Scaling | dict | None = None, z_enabled: bool = True, share_stage1: bool = True,
                 gradient_checkpointing: bool = False, variance_input: bool = False):
        if in_channels != 1:
            raise DecodeAccelError(f"got {in_channels}; DoubleMUNet's stage 1 sees one camera channel at a time",
                                   field="in_channels", fix="pass in_channels=1 (the input has 2 channels)")
        for name, value, expected in (("out_channels_ch1", out_channels_ch1, 5),
                                      ("out_channels_ch2", out_channels_ch2, 5),
                                      ("out_channels_ratio", out_channels_ratio, 1)):
            if value is not None and value != expected:
                raise DecodeAccelError(f"got {value}, DoubleMUNet predicts {expected} (x, y, z, photons, bg per "
                                       "channel; 1 ratio)", field=name, fix=f"pass {expected}, or leave it out")
        # mean / sigma heads: total photons N, ratio r, dx, dy, z
        heads = {"p": 1, "mean": 5, "bg": 2}
        if uncertainty:
            heads["sigma"] = 5
        super().__init__(in_channels=2, stage1_groups=2, share_stage1=share_stage1, head_channels=heads,
                         features=features, depth=depth, activation=activation, norm=norm, dropout=dropout,
                         scaling=scaling, gradient_checkpointing=gradient_checkpointing,
                         variance_input=variance_input)
        self.uncertainty = uncertainty
        self.z_enabled = z_enabled
        self.share_stage1 = share_stage1
        self._finish_config(dict(in_channels=in_channels, out_channels_ch1=out_channels_ch1,
                                 out_channels_ch2=out_channels_ch2, out_channels_ratio=out_channels_ratio,
                                 uncertainty=uncertainty, dropout=dropout, features=features, depth=depth,
                                 activation=activation, norm=norm, z_enabled=z_enabled,
                                 share_stage1=share_stage1, gradient_checkpointing=gradient_checkpointing,
                                 variance_input=variance_input))

    def _outputs(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s = self.scaling
        logits = clamp_logits(raw["p"][:, 0])
        mean = raw["mean"]
        total = torch.sigmoid(mean[:, 0]) * s.photons_max
        ratio = torch.sigmoid(mean[:, 1])
        ch1 = ratio * total
        out = {
            "p": torch.sigmoid(logits),
            "logits": logits,
            "photons": total,
            "ratio": ratio,
            "photons_ch1": ch1,
            # N - rN rather than (1-r)N: then ch1 + ch2 == N up to one rounding of the sum
            "photons_ch2": total - ch1,
            "dx": torch.tanh(mean[:, 2]) * s.offset_max,
            "dy": torch.tanh(mean[:, 3]) * s.offset_max,
            "z": torch.tanh(mean[:, 4]) * s.z_max if self.z_enabled else torch.zeros_like(logits),
        }
        if self.uncertainty:
            sigma = raw["sigma"]
            total_sigma = sigma_map(sigma[:, 0], s.photons_max)
            ratio_sigma = torch.sigmoid(sigma[:, 1]) * RATIO_SIGMA_MAX + SIGMA_EPS
            spread = (total * ratio_sigma) ** 2
            out["photons_sigma"] = total_sigma
            out["ratio_sigma"] = ratio_sigma
            out["photons_ch1_sigma"] = torch.sqrt((ratio * total_sigma) ** 2 + spread)
            out["photons_ch2_sigma"] = torch.sqrt(((1 - ratio) * total_sigma) ** 2 + spread)
            out["dx_sigma"] = sigma_map(sigma[:, 2])
            out["dy_sigma"] = sigma_map(sigma[:, 3])
            out["z_sigma"] = (sigma_map(sigma[:, 4], s.z_max) if self.z_enabled
                              else torch.full_like(logits, Z_SIGMA_2D * s.z_max))
        out["bg"] = torch.sigmoid(raw["bg"]) * s.bg_max
        return out
