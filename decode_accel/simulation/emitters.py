"""Blinking emitters over a range of frames, vectorised in torch.

Time is continuous and measured in frames: frame k covers [k, k+1). A blink is an interval
[t0, t0 + L) with L ~ Exp(mean tau). Blinks start as a Poisson process of rate lam per frame.
Instead of padding the time range (DECODE pads by 3 tau and keeps a small edge bias), the state at
t = 0 is drawn from the stationary distribution: Poisson(lam * tau) blinks are already on at t = 0,
each with a residual on-time ~ Exp(tau) (the exponential is memoryless). The statistics are then
exactly stationary, even for a 3-frame clip.

A blink with continuous start overlaps on average E[L] + 1 = tau + 1 frames, and the on-at-t blinks
add lam * tau to every frame boundary, so the mean number of emitters visible in a frame is
lam * (tau + 1). Setting lam = n_visible / (tau + 1) makes that the requested density (the same
binning correction as DECODE's tau + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ChannelsConfig, EmitterConfig


@dataclass
class EmitterFrames:
    """Emitter-frames that are on, one row per (molecule, frame). All tensors have length n.

    ``xyz`` is (n, 3): x, y in px (pixel-centre convention x_px = j + 0.5), z in nm. ``photons`` is
    the total in that frame (photons), ``ratio`` the fraction in channel 1 (1.0 for one channel).
    ``frame`` and ``id`` are int64.
    """

    frame: torch.Tensor
    xyz: torch.Tensor
    photons: torch.Tensor
    id: torch.Tensor
    ratio: torch.Tensor
    color: torch.Tensor

    def __len__(self) -> int:
        return int(self.frame.numel())

    def select(self, mask: torch.Tensor) -> "EmitterFrames":
        """The rows where ``mask`` is True."""
        return EmitterFrames(self.frame[mask], self.xyz[mask], self.photons[mask], self.id[mask],
                             self.ratio[mask], self.color[mask])


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device, dtype=torch.float64)


def _poisson(mean: float, g: torch.Generator, device) -> int:
    return int(torch.poisson(torch.tensor([float(mean)], device=device, dtype=torch.float64), generator=g).item())


def draw_intensity(cfg: EmitterConfig, n: int, g: torch.Generator, device) -> torch.Tensor:
    """Photons of each molecule when on for a full frame (photons), float64 (n,)."""
    if cfg.photons_distribution == "lognormal":
        # parameters of the underlying normal so the lognormal has the requested mean and sd
        s2 = math.log1p((cfg.photons_sd / cfg.photons_mean) ** 2)
        mu = math.log(cfg.photons_mean) - 0.5 * s2
        z = torch.randn(n, generator=g, device=device, dtype=torch.float64)
        return torch.exp(mu + math.sqrt(s2) * z)
    z = torch.randn(n, generator=g, device=device, dtype=torch.float64)
    # clamped, not redrawn, as DECODE; the floor keeps intensities strictly positive
    return (cfg.photons_mean + cfg.photons_sd * z).clamp_min(1e-8)


def draw_ratio(channels: ChannelsConfig, n: int, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-molecule fraction of photons in channel 1 and dye index, from the dye table.

    One channel: ratio 1 and dye 0 for everyone. Two channels: dye ~ Categorical(probabilities),
    ratio ~ N(ratio_mean, ratio_sd) of that dye, clipped to [0, 1].
    """
    if channels.n_channels == 1:
        return (torch.ones(n, device=device, dtype=torch.float64),
                torch.zeros(n, device=device, dtype=torch.int64))
    probs = torch.tensor([d.probability for d in channels.dyes], device=device, dtype=torch.float64)
    if n == 0:
        return torch.zeros(0, device=device, dtype=torch.float64), torch.zeros(0, device=device, dtype=torch.int64)
    color = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=g)
    mean = torch.tensor([d.ratio_mean for d in channels.dyes], device=device, dtype=torch.float64)[color]
    sd = torch.tensor([d.ratio_sd for d in channels.dyes], device=device, dtype=torch.float64)[color]
    ratio = (mean + sd * torch.randn(n, generator=g, device=device, dtype=torch.float64)).clamp(0.0, 1.0)
    return ratio, color


def sample_blinking(cfg: EmitterConfig, channels: ChannelsConfig, n_visible: float, n_frames: int,
                    height: int, width: int, g: torch.Generator, clip_length: int | None = None,
                    id_offset: int = 0) -> EmitterFrames:
    """Draw blinking molecules over frames 0..n_frames-1 and return their on emitter-frames.

    Args:
        cfg: emitter section (photons, z range, mean on-time in frames).
        channels: channel section (dye table for the ratio).
        n_visible: requested mean number of visible emitters per frame (count).
        n_frames: number of frames (T >= 1).
        height, width: frame size (px); x ~ U[0, width), y ~ U[0, height) px.
        g: random generator; its device is where tensors are made.
        clip_length: split the frames into independent clips of this many frames (n_frames must be
            a multiple): blinks are cut at the clip end and every clip starts from its own
            stationary state. Default: one clip of n_frames.
        id_offset: added to molecule ids (so several clips can share one id space).

    Returns:
        :class:`EmitterFrames`, rows sorted by frame; photons = intensity x on-fraction of the frame.
    """
    device = g.device
    L = int(clip_length or n_frames)
    if L < 1 or n_frames % L:
        raise ValueError(f"n_frames {n_frames} is not a multiple of clip_length {L}")
    n_clips = n_frames // L
    tau = float(cfg.on_time_mean)
    lam = n_visible / (tau + 1.0)  # blink starts per frame
    n_new = _poisson(lam * n_frames, g, device)
    n_init = _poisson(lam * tau * n_clips, g, device)
    n = n_new + n_init
    init_clip = torch.randint(0, n_clips, (n_init,), generator=g, device=device).double()
    t0 = torch.cat([init_clip * L, n_frames * torch.rand(n_new, generator=g, device=device, dtype=torch.float64)])
    dur = torch.empty(n, device=device, dtype=torch.float64).exponential_(1.0 / tau, generator=g)
    t1 = t0 + dur
    clip_end = (torch.floor(t0 / L) + 1.0) * L  # a blink never crosses into the next clip
    x = _uniform(n, 0.0, float(width), g, device)
    y = _uniform(n, 0.0, float(height), g, device)
    z = _uniform(n, cfg.z_range[0], cfg.z_range[1], g, device)
    intensity = draw_intensity(cfg, n, g, device)
    ratio, color = draw_ratio(channels, n, g, device)

    # expand each blink over the frames it touches: floor(t0) .. ceil(t1)-1, cut at the clip end
    f_first = torch.floor(t0).long()
    f_last = torch.minimum(torch.ceil(t1).long() - 1, clip_end.long() - 1)
    f_last = torch.maximum(f_last, f_first)  # a zero-length blink still touches its start frame
    counts = f_last - f_first + 1
    mol = torch.repeat_interleave(torch.arange(n, device=device), counts)
    start_of_mol = torch.cumsum(counts, 0) - counts
    frame = f_first[mol] + (torch.arange(mol.numel(), device=device) - start_of_mol[mol])
    on = (torch.minimum(torch.minimum(t1[mol], clip_end[mol]), frame + 1.0)
          - torch.maximum(t0[mol], frame.double())).clamp_min(0.0)
    keep = on > 0
    mol, frame, on = mol[keep], frame[keep], on[keep]
    order = torch.argsort(frame * (n + 1) + mol)  # by frame, then molecule: a stable, readable order
    mol, frame, on = mol[order], frame[order], on[order]
    xyz = torch.stack([x[mol], y[mol], z[mol]], dim=1)
    return EmitterFrames(frame=frame, xyz=xyz, photons=intensity[mol] * on, id=mol + id_offset,
                         ratio=ratio[mol], color=color[mol])
