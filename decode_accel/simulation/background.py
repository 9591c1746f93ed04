"""Expected background (photons/px per frame): a uniform level per frame and channel, optionally
modulated by a smooth random spatial pattern."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import BackgroundConfig


def smooth_pattern(n: int, height: int, width: int, length: float, g: torch.Generator) -> torch.Tensor:
    """Smooth random fields in [-1, 1], (n, H, W), with correlation length ``length`` (px).

    White noise on a coarse grid with one node per ``length`` px, bicubically upsampled, squashed
    by tanh so the modulation never exceeds its amplitude.
    """
    device = g.device
    gh = max(2, math.ceil(height / length) + 2)
    gw = max(2, math.ceil(width / length) + 2)
    coarse = torch.randn(n, 1, gh, gw, generator=g, device=device)
    # the coarse grid overhangs the frame by one node each side, so edges look like the inside
    up = F.interpolate(coarse, size=(round(gh * length), round(gw * length)), mode="bicubic", align_corners=False)
    top = (up.shape[2] - height) // 2
    left = (up.shape[3] - width) // 2
    return torch.tanh(up[:, 0, top:top + height, left:left + width])


def sample_background(cfg: BackgroundConfig, ranges: list[tuple[float, float]], n_frames: int, height: int,
                      width: int, g: torch.Generator, pattern_every: int | None = None) -> torch.Tensor:
    """Expected background, float32 (T, C, H, W) in photons/px.

    Args:
        cfg: background section (smooth modulation amplitude and length).
        ranges: per-channel (min, max) of the uniform level (photons/px); C = len(ranges).
        n_frames: T.
        pattern_every: frames that share one smooth pattern (a clip); default all T frames.

    The level is drawn independently per frame and channel (as DECODE). The smooth pattern, if
    any, is fixed within a clip (background structure does not jump between frames):
    bg = level * (1 + amplitude * pattern) with pattern in [-1, 1].
    """
    device = g.device
    C = len(ranges)
    lo = torch.tensor([r[0] for r in ranges], device=device, dtype=torch.float32)
    hi = torch.tensor([r[1] for r in ranges], device=device, dtype=torch.float32)
    level = lo + (hi - lo) * torch.rand(n_frames, C, generator=g, device=device)
    bg = level[:, :, None, None].expand(n_frames, C, height, width)
    if cfg.smooth_amplitude > 0:
        every = pattern_every or n_frames
        n_clips = math.ceil(n_frames / every)
        pat = smooth_pattern(n_clips * C, height, width, cfg.smooth_length, g).reshape(n_clips, C, height, width)
        pat = pat.repeat_interleave(every, dim=0)[:n_frames]
        bg = bg * (1.0 + cfg.smooth_amplitude * pat)
    return bg.contiguous()
