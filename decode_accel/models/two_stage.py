"""Machinery shared by SigmaMUNet and DoubleMUNet: the two-stage U-Net, heads, caching, checks.

Stage 1 ("frame analysis") runs on each of the three frames t-1, t, t+1 on its own, with shared
weights; stage 2 ("temporal context") runs on the concatenation of the three frames' stage-1
features; small heads (conv3x3 + activation, then 1x1) turn stage-2 features into output maps.
Because stage 1 sees one frame at a time, a movie's frames can be encoded once and each encoding
reused by the three windows that contain the frame (:meth:`TwoStageNet.encode_frames` +
:meth:`TwoStageNet.decode_windows`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from decode_accel.errors import DecodeAccelError
from decode_accel.models.scaling import Scaling
from decode_accel.models.unet import UNet2d, check_norm, make_activation, run_layers

#: additive floor of every predicted sigma (in the sigma's own unit before scaling), as in DECODE.
SIGMA_EPS = 1e-3
#: detection logits are confined to (-8, 8) before the sigmoid (p in (3.4e-4, 0.99966)), see clamp_logits.
LOGIT_CLAMP = 8.0
#: initial detection logit: p = sigmoid(-6) ~ 0.0025 per pixel, a few emitters per 40x40 frame.
P_LOGIT_INIT = -6.0

#: named architecture presets (width and depth of both U-Nets; the rest keeps the class defaults).
PRESETS: dict[str, dict[str, Any]] = {
    # DECODE's published network: 48/96/192 features, ELU, no normalisation (~2.2 M parameters).
    "decode": dict(features=48, depth=2, activation="elu", norm=None),
    # fits CPU training: ~1/9 of the compute of 'decode'.
    "cpu_small": dict(features=16, depth=2, activation="elu", norm=None),
    # CPU inference (issue 15.1): 8 features, ~62 k parameters, about a third of cpu_small's CPU time per
    # frame; meant to be trained (or distilled from a larger model) for movies where speed matters.
    "fast": dict(features=8, depth=2, activation="elu", norm=None),
    # for tests and smoke runs only.
    "tiny": dict(features=8, depth=2, activation="elu", norm=None),
}


#: dx, dy range (px) of networks whose stored scaling predates ``Scaling.offset_max``: DECODE's tanh in (-1, 1)
LEGACY_OFFSET_MAX = 1.0


def scaling_from_any(scaling: Scaling | dict | None) -> Scaling:
    """A :class:`Scaling` from an instance, a plain dict (as stored in config.json) or None (defaults).

    A dict without ``offset_max`` is a scaling stored before that field existed, and the weights that
    came with it were trained for dx, dy in (-1, 1) px: it gets :data:`LEGACY_OFFSET_MAX`, not the
    default, so that old exports read back the positions they were trained to give."""
    if scaling is None:
        return Scaling()
    if isinstance(scaling, Scaling):
        return scaling.model_copy()
    if isinstance(scaling, dict):
        try:
            return Scaling(**{"offset_max": LEGACY_OFFSET_MAX, **scaling})
        except Exception as error:  # pydantic's message lists every bad field
            raise DecodeAccelError(" ".join(str(error).split()), field="scaling") from None
    raise DecodeAccelError(f"expected a Scaling or a dict, got {type(scaling).__name__}", field="scaling")


def _scaling_coder() -> dict:
    """Hub-mixin coder so that a Scaling init argument is written to config.json as a plain dict."""
    return {Scaling: (lambda s: s.model_dump(), scaling_from_any)}


class Head(nn.Sequential):
    """conv3x3 -> activation -> conv1x1: one group of output channels."""

    def __init__(self, features: int, out_channels: int, activation: str):
        super().__init__(nn.Conv2d(features, features, 3, padding=1), make_activation(activation),
                         nn.Conv2d(features, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_layers(self, x)  # the CPU's faster ELU at inference


class TwoStageNet(nn.Module):
    """Base class of SigmaMUNet and DoubleMUNet (not used on its own).

    Subclasses set the stage-1 input layout and the heads, and turn raw head outputs into the
    output dict of docs/architecture.md with :meth:`_outputs`.

    Args:
        in_channels: camera channels C of the input frames (B, C, 3, H, W).
        stage1_groups: into how many groups the C channels are split for stage 1 (1: stage 1 sees
            all C channels at once; C: each channel on its own).
        share_stage1: with several groups, whether the groups share stage-1 weights.
        head_channels: name -> output channels of each head; 'p' must be among them.

        variance_input: the input carries, after the C camera channels, C more: the per-pixel sCMOS
            read-noise variance (photons²) of the same pixels (:func:`decode_accel.models.variance.with_variance`).
            Stage 1 sees each frame beside its variance map (channel g's frame with channel g's map), so
            the per-frame spot detector can tell a noisy pixel's flicker from a molecule.

    Attributes useful to callers: ``in_channels`` (camera channels C the frames must have: 1 for
    SigmaMUNet, 2 for DoubleMUNet), ``input_channels`` (channels of the input tensor: C, or 2C with the
    variance input), ``frame_features`` (channels of one frame's cached features), ``size_multiple``
    (H and W must be multiples of it), ``scaling``.
    """

    def __init__(self, *, in_channels: int, stage1_groups: int, share_stage1: bool, head_channels: dict[str, int],
                 features: int, depth: int, activation: str, norm: str | None, dropout: float,
                 scaling: Scaling | dict | None, gradient_checkpointing: bool, variance_input: bool = False):
        super().__init__()
        if in_channels < 1 or in_channels % stage1_groups:
            raise DecodeAccelError(f"{in_channels} channels cannot be split into {stage1_groups} groups",
                                   field="in_channels")
        if depth < 1:
            raise DecodeAccelError(f"must be >= 1, got {depth}", field="depth")
        self.in_channels = in_channels
        self.variance_input = bool(variance_input)
        #: channels of the input tensor: the C camera channels, then (variance_input) their C variance maps
        self.input_channels = in_channels * (2 if self.variance_input else 1)
        self.features = features
        self.depth = depth
        self.activation = activation
        self.norm = check_norm(norm)
        self.dropout = dropout
        self.gradient_checkpointing = gradient_checkpointing
        self._scaling = scaling_from_any(scaling)
        self.stage1_groups = stage1_groups
        group_in = in_channels // stage1_groups * (2 if self.variance_input else 1)
        unet = dict(features=features, depth=depth, activation=activation, norm=norm, dropout=dropout)
        n_stage1 = 1 if share_stage1 else stage1_groups
        self.stage1 = nn.ModuleList([UNet2d(group_in, features, **unet) for _ in range(n_stage1)])
        #: channels of one frame's cached stage-1 features (what :meth:`encode_frames` returns).
        self.frame_features = features * stage1_groups
        self.stage2 = UNet2d(3 * self.frame_features, features, **unet)
        self.heads = nn.ModuleDict({name: Head(features, n, activation) for name, n in head_channels.items()})
        self._init_weights()

    # ----------------------------------------------------------------------------------- set-up
    def _init_weights(self) -> None:
        """Kaiming-normal (fan-in) convolutions with zero biases; the p head starts at logit -6 (p ~ 0.0025)
        and the output layers of the other heads at zero (no initial offset of dx, dy, z).

        The 3x3 convolutions are followed by an activation and get the ReLU gain sqrt(2); the 2x2
        down-sampling and 1x1 convolutions are linear and get gain 1. (DECODE uses the ReLU gain
        everywhere; with ELU and no normalisation that grows the feature sd ~40x through the two
        U-Nets, so every sigmoid/tanh head starts saturated. With the matched gains the raw head
        outputs start with sd ~ 1.)
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                gain = "relu" if module.kernel_size == (3, 3) else "linear"
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity=gain)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # the bias that the soft clamp (clamp_logits) maps to a logit of -6
        bias = LOGIT_CLAMP * math.atanh(P_LOGIT_INIT / LOGIT_CLAMP)
        nn.init.constant_(self.heads["p"][-1].bias, bias)
        # Every other head starts at exactly raw = 0 (dx = dy = z = 0, sigmas and photons mid-range):
        # with random output weights the dx, dy maps start with a constant part of up to +-0.5 px
        # (50 nm) that differs between the axes and that training has to unlearn; a short training
        # kept it as a constant offset on one axis (+13 nm after 200 updates). The zero output layer
        # still learns from the first update (its gradient is features x output error).
        for name, head in self.heads.items():
            if name != "p":
                nn.init.zeros_(head[-1].weight)
                nn.init.zeros_(head[-1].bias)

    @property
    def scaling(self) -> Scaling:
        """Input normalisation and output ranges (see :class:`Scaling`); part of the saved config."""
        return self._scaling

    @scaling.setter
    def scaling(self, value: Scaling | dict) -> None:
        self._scaling = scaling_from_any(value)
        if isinstance(getattr(self, "_hub_mixin_config", None), dict):
            self._hub_mixin_config["scaling"] = self._scaling.model_dump()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        """A network with the preset's width and depth ('decode', 'cpu_small', 'fast', 'tiny'); ``overrides``
        are further constructor arguments (e.g. ``scaling=...``, ``dropout=0.1``)."""
        if name not in PRESETS:
            raise DecodeAccelError(f"unknown preset {name!r}", field="preset", fix=f"use one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def size_multiple(self) -> int:
        """Frame height and width must be multiples of this (``2**depth``); pad or tile to it."""
        return 2 ** self.depth

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (all, or only those with requires_grad)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _finish_config(self, config: dict[str, Any]) -> None:
        """Record every constructor argument (with the resolved scaling) as the hub config, so that a
        saved model is self-contained even if a default changes later."""
        config = dict(config)
        config["scaling"] = self._scaling.model_dump()
        # not a constructor argument (the mixin ignores it when loading): tells loaders which class to build
        config["architecture"] = type(self).__name__
        self._hub_mixin_config = config

    # ------------------------------------------------------------------------------- checks
    def _check_size(self, height: int, width: int, name: str) -> None:
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise DecodeAccelError(
                f"height {height} and width {width} must be multiples of {multiple} (2**depth, depth={self.depth})",
                field=name, fix="pad or tile the frames to a multiple (decode_accel.inference does this)")

    def _check_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """The windows as (B, C, 3, H, W). A single-channel model also takes DECODE's (B, 3, H, W), the three
        frames t-1, t, t+1 stacked on axis 1, and reads it as (B, 1, 3, H, W)."""
        if frames.ndim == 4 and self.input_channels == 1 and frames.shape[1] == 3:
            frames = frames.unsqueeze(1)
        if frames.ndim != 5 or frames.shape[1] != self.input_channels or frames.shape[2] != 3:
            also = " or (B, 3, H, W)" if self.input_channels == 1 else ""
            raise DecodeAccelError(
                f"expected shape (B, {self.input_channels}, 3, H, W){also} {self._input_text()}, got "
                f"{tuple(frames.shape)}", field="frames",
                fix="stack frames t-1, t, t+1 on axis 2 and the camera channels on axis 1"
                    + (" (decode_accel.models.variance.with_variance appends the variance maps)"
                       if self.variance_input else ""))
        self._check_size(frames.shape[-2], frames.shape[-1], "frames")
        return frames

    def _input_text(self) -> str:
        if not self.variance_input:
            return "in photons"
        return (f"({self.in_channels} camera channel(s) in photons, then their read-noise variance in photons², "
                "model.variance_input)")

    # ------------------------------------------------------------------------------ compute
    def _maybe_checkpoint(self, function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # recompute activations in the backward pass instead of storing them (less memory, ~30 % more
        # compute); RNG state is preserved, so dropout masks match. BatchNorm running statistics are
        # updated twice per step under checkpointing (the recomputation is a second forward).
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(function, x, use_reentrant=False)
        return function(x)

    def _stage1(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled frames (N, C, H, W) -> stage-1 features (N, frame_features, H, W)."""
        n, c, h, w = x.shape
        groups = self.stage1_groups
        if len(self.stage1) == 1:
            # one call over all groups: the groups are just more images for the shared U-Net
            x = x.reshape(n * groups, c // groups, h, w)
            return self.stage1[0](x).reshape(n, self.frame_features, h, w)
        parts = x.chunk(groups, dim=1)
        return torch.cat([unet(part) for unet, part in zip(self.stage1, parts)], dim=1)

    def _scale_input(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, input_channels, H, W) -> the scaled stage-1 input; with the variance input the channels are
        reordered so that each stage-1 group holds its frames' channels followed by their variance maps."""
        weight = self.stage2.output.weight
        if frames.dtype != weight.dtype:
            frames = frames.to(weight.dtype)
        if not self.variance_input:
            return (frames - self._scaling.input_offset) / self._scaling.input_scale
        c = self.in_channels
        x = (frames[:, :c] - self._scaling.input_offset) / self._scaling.input_scale
        v = variance_feature(frames[:, c:], self._scaling.variance_reference())
        n, _, h, w = x.shape
        g = self.stage1_groups
        return torch.cat([x.reshape(n, g, c // g, h, w), v.reshape(n, g, c // g, h, w)], dim=2).reshape(n, 2 * c, h, w)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Stage-1 features of single frames, for reuse by the three windows that contain each frame.

        Args:
            frames: (N, C, H, W) camera frames in photons; H and W multiples of ``2**depth``.
        Returns:
            (N, frame_features, H, W) features; pass three of them to :meth:`decode_windows`.
        """
        if frames.ndim != 4 or frames.shape[1] != self.input_channels:
            raise DecodeAccelError(f"expected shape (N, {self.input_channels}, H, W) {self._input_text()}, got "
                                   f"{tuple(frames.shape)}", field="frames")
        self._check_size(frames.shape[-2], frames.shape[-1], "frames")
        return self._maybe_checkpoint(self._stage1, self._scale_input(frames))

    def decode_windows(self, f_prev: torch.Tensor, f_cur: torch.Tensor, f_next: torch.Tensor) -> dict[str, torch.Tensor]:
        """Output maps of windows from cached stage-1 features of frames t-1, t and t+1.

        Each argument is (B, frame_features, H, W) from :meth:`encode_frames`. Returns the same dict
        as ``forward`` for the windows (t-1, t, t+1).
        """
        if not (f_prev.shape == f_cur.shape == f_next.shape) or f_cur.ndim != 4 or f_cur.shape[1] != self.frame_features:
            raise DecodeAccelError(f"expected three (B, {self.frame_features}, H, W) feature maps, got "
                                   f"{tuple(f_prev.shape)}, {tuple(f_cur.shape)}, {tuple(f_next.shape)}",
                                   field="features", fix="pass the output of encode_frames for frames t-1, t, t+1")
        return self._decode(torch.cat([f_prev, f_cur, f_next], dim=1))

    def _decode(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self._maybe_checkpoint(self.stage2, features)
        # the heads and their activations in fp32 whatever the autocast: tanh of a bf16 logit would quantise
        # dx / dy to steps of ~2^-9 px (0.2 nm at 100 nm pixels), sigmoid of p and photons likewise
        with torch.autocast(device_type=x.device.type, enabled=False):
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()  # a float64 model (tests, numerics) stays float64
            raw = {name: head(x) for name, head in self.heads.items()}
            return self._outputs(raw)

    def _outputs(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # subclasses map raw head outputs to physical units

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """Output maps of a batch of 3-frame windows.

        Args:
            frames: (B, C, 3, H, W) in photons (frames t-1, t, t+1); H, W multiples of ``2**depth``.
                Single-channel models also take (B, 3, H, W), as DECODE's SigmaMUNet does.
        Returns:
            dict of (B, H, W) maps in physical units (see docs/architecture.md) plus 'logits'.
        """
        frames = self._check_frames(frames)
        b, c, _, h, w = frames.shape
        # (B, C, 3, H, W) -> (B*3, C, H, W): stage 1 sees each frame of each window on its own
        single = frames.transpose(1, 2).reshape(b * 3, c, h, w)
        features = self._maybe_checkpoint(self._stage1, self._scale_input(single))
        # (B*3, F, H, W) -> (B, 3F, H, W) = cat(f_{t-1}, f_t, f_{t+1}) along channels
        return self._decode(features.reshape(b, 3 * self.frame_features, h, w))

    # ------------------------------------------------------------------------- hub saving
    def _save_pretrained(self, save_directory: Path) -> None:
        """Weights as model.safetensors (contiguous copies, so channels_last models save too)."""
        state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(Path(save_directory) / "model.safetensors"),
                  metadata={"format": "pt", "decode_accel_config": json.dumps(self._hub_mixin_config, sort_keys=True)})

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        # the mixin defaults to strict=False, which would silently keep random weights for missing keys
        return super()._from_pretrained(strict=strict, **kwargs)


def variance_feature(variance: torch.Tensor, reference: float) -> torch.Tensor:
    """What the network sees of a read-noise variance map (photons²): ``log1p(variance / reference)``.

    ``reference`` is :meth:`Scaling.variance_reference`, by default the mean background (photons/px),
    i.e. the shot-noise variance of a typical background pixel: the ratio says how much a pixel's read
    noise adds to the noise it would have anyway (0.03 for a typical sCMOS pixel of ~2 photons² on a
    60-photon background, ~1-4 for a hot pixel). The logarithm because the maps are heavy-tailed: hot
    pixels have 10-1000x the median variance, and a linear input of several hundred would swamp the
    first convolution (whose initialisation assumes inputs of order 1, like the scaled frames), while
    scaling by the largest value would squash every ordinary pixel to zero. log1p keeps 0 at 0 and is
    monotone, so no two variances look alike.
    """
    return torch.log1p(variance.clamp_min(0.0) / reference)


def clamp_logits(raw: torch.Tensor) -> torch.Tensor:
    """Detection logits softly confined to (-8, 8): ``8 tanh(raw / 8)``.

    DECODE clamps hard, which has zero gradient outside the range: once a pixel's raw logit drops
    below -8 nothing can pull it back, and a network whose logits all drift below -8 (seen within a
    few hundred Adam steps at lr 3e-3) stops learning detection for good. The tanh form has the same
    range, is close to the identity for |raw| < 3 and keeps a gradient everywhere. (A straight-through
    clamp was tried and diverged: losses that want p -> 1 at emitters keep pushing logits outward.)
    """
    return LOGIT_CLAMP * torch.tanh(raw / LOGIT_CLAMP)


def sigma_map(raw: torch.Tensor, unit: float | torch.Tensor = 1.0, spread: float = 3.0) -> torch.Tensor:
    """DECODE's sigma activation: (sigmoid(raw) * spread + eps) * unit."""
    return (torch.sigmoid(raw) * spread + SIGMA_EPS) * unit
