"""Augmentations that keep frames and targets consistent.

Every transform takes a sample dict (``frames`` (C, 3, H, W)) or a batch dict (``frames`` (B, C, 3, H, W)) as
described in docs/architecture.md and returns a new dict; random choices are drawn per sample, from the optional
CPU ``generator`` (else torch's global RNG, which DataLoader seeds per worker), and work on data on any device.

Geometry follows the pixel-centre convention (pixel (i, j) has its centre at x = j + 0.5, y = i + 0.5 px):
a left-right flip maps x -> W - x, an up-down flip y -> H - y, and a 90° counter-clockwise turn (as displayed
with row 0 at the top, ``torch.rot90(frames, 1, dims=(-2, -1))``) maps (x, y) -> (y, W - x). Rotations are
restricted to multiples of 90°: any other angle would interpolate between pixels, which correlates and smooths
the camera's shot/EM noise, so the network would train on noise statistics no camera produces. Only 0° and 180°
are used for non-square frames (a quarter turn would change H and W).

Photometric transforms act on photon units and carry the targets along: a brightness factor f scales the
frames, the background and the emitter photons; a contrast factor scales deviations from each window's
per-channel mean (emitter photons are deviations above the background, so they scale by f too); ``Normalize``
maps frames and background through (v - mean) / std and divides photons by std. The decode_accel models apply
their own input scaling, so the default pipelines use no ``Normalize``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Compose", "RandomRotation", "RandomFlip", "GaussianNoise", "RandomBrightness", "RandomContrast",
           "Normalize", "flip_x", "flip_y", "rot90"]

Batch = dict[str, torch.Tensor]


def _batched(data: Batch) -> tuple[Batch, bool]:
    """A shallow copy of ``data`` with a batch axis (adding one to a single sample)."""
    out = dict(data)
    single = out["frames"].dim() == 4
    if single:
        for k in ("frames", "bg", "variance", "tgt_xyz", "tgt_photons", "tgt_ratio", "tgt_mask"):
            if k in out:
                out[k] = out[k].unsqueeze(0)
    return out, single


def _unbatched(data: Batch, single: bool) -> Batch:
    if single:
        for k in ("frames", "bg", "variance", "tgt_xyz", "tgt_photons", "tgt_ratio", "tgt_mask"):
            if k in data:
                data[k] = data[k].squeeze(0)
    return data


def flip_x(frames: torch.Tensor, bg: torch.Tensor | None, xyz: torch.Tensor) -> tuple:
    """Mirror left-right: columns reversed, x -> W - x (px)."""
    w = frames.shape[-1]
    xyz = xyz.clone()
    xyz[..., 0] = w - xyz[..., 0]
    return frames.flip(-1), None if bg is None else bg.flip(-1), xyz


def flip_y(frames: torch.Tensor, bg: torch.Tensor | None, xyz: torch.Tensor) -> tuple:
    """Mirror up-down: rows reversed, y -> H - y (px)."""
    h = frames.shape[-2]
    xyz = xyz.clone()
    xyz[..., 1] = h - xyz[..., 1]
    return frames.flip(-2), None if bg is None else bg.flip(-2), xyz


def rot90(frames: torch.Tensor, bg: torch.Tensor | None, xyz: torch.Tensor, k: int) -> tuple:
    """Turn by k·90° counter-clockwise as displayed: each quarter turn maps (x, y) -> (y, W - x) (px)."""
    k = int(k) % 4
    xyz = xyz.clone()
    for _ in range(k):
        w = frames.shape[-1]
        x, y = xyz[..., 0].clone(), xyz[..., 1].clone()
        xyz[..., 0], xyz[..., 1] = y, w - x
        frames = torch.rot90(frames, 1, dims=(-2, -1))
        bg = None if bg is None else torch.rot90(bg, 1, dims=(-2, -1))
    return frames, bg, xyz


def _per_sample_geometry(data: Batch, fn) -> Batch:
    out, single = _batched(data)
    # the background and the sCMOS variance maps (C, H, W) of a sample move with its frames: one stack of maps
    maps = [k for k in ("bg", "variance") if k in out]
    frames, moved, xyz = [], [], []
    for b in range(out["frames"].shape[0]):
        f, g, p = fn(b, out["frames"][b], torch.cat([out[k][b] for k in maps]) if maps else None,
                     out["tgt_xyz"][b] if "tgt_xyz" in out else torch.zeros(0, 3))
        frames.append(f), moved.append(g), xyz.append(p)
    out["frames"] = torch.stack(frames)
    if maps:
        parts = torch.stack(moved).split([out[k].shape[1] for k in maps], dim=1)
        out.update(zip(maps, parts))
    if "tgt_xyz" in out:
        out["tgt_xyz"] = torch.stack(xyz)
    return _unbatched(out, single)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, data: Batch, generator: torch.Generator | None = None) -> Batch:
        for t in self.transforms:
            data = t(data, generator=generator)
        return data

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomRotation:
    """Rotate each sample by a random multiple of 90° lying inside ``angle_range`` (degrees, inclusive).

    ``angle_range=(-180, 180)`` draws uniformly from {-180, -90, 0, 90, 180} (-180 and 180 are the same turn,
    so 180° is drawn twice as often as the others, as it would be for a continuous angle). Positive angles turn
    counter-clockwise as displayed. Arbitrary angles are not offered: see the module docstring.
    """

    def __init__(self, angle_range: tuple[float, float] = (-180.0, 180.0)):
        lo, hi = float(angle_range[0]), float(angle_range[1])
        if lo > hi:
            raise ValueError(f"angle_range min {lo} > max {hi}")
        self.angle_range = (lo, hi)
        first = -(-lo // 90)  # ceil(lo / 90)
        self.angles = [90 * int(k) for k in range(int(first), int(hi // 90) + 1)]
        if not self.angles:
            raise ValueError(f"angle_range {angle_range} contains no multiple of 90°; rotations are by k·90° only")

    def __call__(self, data: Batch, generator: torch.Generator | None = None) -> Batch:
        h, w = data["frames"].shape[-2:]
        angles = self.angles if h == w else [a for a in self.angles if a % 180 == 0]
        if not angles:
            raise ValueError(f"frames are {h}x{w}: a quarter turn would change their shape; use a range containing 0 or 180")
        n = data["frames"].shape[0] if data["frames"].dim() == 5 else 1
        pick = torch.randint(len(angles), (n,), generator=generator)
        return _per_sample_geometry(data, lambda b, f, g, p: rot90(f, g, p, angles[int(pick[b])] // 90))

    def __repr__(self) -> str:
        return f"RandomRotation(angle_range={self.angle_range})"


class RandomFlip:
    """Mirror each sample left-right with probability ``p`` and, independently, up-down with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p = {p} is not a probability")
        self.p = float(p)

    def __call__(self, data: Batch, generator: torch.Generator | None = None) -> Batch:
        n = data["frames"].shape[0] if data["frames"].dim() == 5 else 1
        draw = torch.rand(n, 2, generator=generator) < self.p

        def fn(b, f, g, p):
            if draw[b, 0]:
                f, g, p = flip_x(f, g, p)
            if draw[b, 1]:
                f, g, p = flip_y(f, g, p)
            return f, g, p

        return _per_sample_geometry(data, fn)

    def __repr__(self) -> str:
        return f"RandomFlip(p={self.p})"


def _per_sample_factor(data: Batch, lo: float, hi: float, generator) -> tuple[Batch, bool, torch.Tensor]:
    out, single = _batched(data)
    n = out["frames"].shape[0]
    f = lo + (hi - lo) * torch.rand(n, generator=generator)  # drawn on the CPU generator, used where the data is
    return out, single, f.to(out["frames"].device)


def _check_range(name: str, r: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(r[0]), float(r[1])
    if lo > hi or lo < 0:
        raise ValueError(f"{name} must be (min, max) with 0 <= min <= max, got {r}")
    return lo, hi


class GaussianNoise:
    """Add zero-mean Gaussian noise of standard deviation ``noise_std`` (photons) to the frames; targets unchanged."""

    def __init__(self, noise_std: float = 0.1):
        if noise_std < 0:
            raise ValueError(f"noise_std {noise_std} < 0")
        self.noise_std = float(noise_std)

    def __call__(self, data: Batch, generator: torch.Generator | None = None) -> Batch:
        out = dict(data)
        noise = torch.randn(out["frames"].shape, generator=generator, dtype=out["frames"].dtype)
        noise = noise.to(out["frames"].device)
        out["frames"] = out["frames"] + self.noise_std * noise
        return out

    def __repr__(self) -> str:
        return f"GaussianNoise(noise_std={self.noise_std})"


class RandomBrightness:
    """Scale each sample's photons by f ~ U(factor_range): frames, background and emitter photons alike."""

    def __init__(self, factor_range: tuple[float, float] = (0.8, 1.2)):
        self.factor_range = _check_range("factor_range", factor_range)

    def __call__(self, data: Batch, generator: torch.Generator | None = None) -> Batch:
        out, single, f = _per_sample_factor(data, *self.factor_range, generator)
        out["frames"] = out["frames"] * f.view(-1, 1, 1, 1, 1)
        if "bg" in out:
            out["bg"] = out["bg"] * f.view(-1, 1, 1, 1)
        if "tgt_photons" in out:
            out["tgt_photons"] = out["tgt_photons"] * f.view(-1, 1)
        return _unbatched(out, single)

    def __repr__(self) -> str:
        return f"RandomBrightness(factor_range={self.factor_range})"


class RandomContrast:
    """Scale deviations from each window's per-channel mean m by f ~ U(factor_range): v -> m + f·(v - m).

    Applied to frames and background; emitter photons (signal above the background) scale by f.
    """

    def __init__(self, factor_range: tuple[float, float] = (0.8, 1.2)):
        self.factor_range = _check_range("factor_range", factor_range)

    def __call__(self, data: Batch, generator: torch.Generator | None = None) -> Batch:
        out, single, f = _per_sample_factor(data, *self.factor_range, generator)
        frames = out["frames"]
        m = frames.mean(dim=(2, 3, 4), keepdim=True)  # (B, C, 1, 1, 1)
        out["frames"] = m + f.view(-1, 1, 1, 1, 1) * (frames - m)
        if "bg" in out:
            m2 = m[:, :, 0]
            out["bg"] = m2 + f.view(-1, 1, 1, 1) * (out["bg"] - m2)
        if "tgt_photons" in out:
            out["tgt_photons"] = out["tgt_photons"] * f.view(-1, 1)
        return _unbatched(out, single)

    def __repr__(self) -> str:
        return f"RandomContrast(factor_range={self.factor_range})"


class Normalize:
    """Map frames and background through (v - mean) / std (photons -> normalized units); photons are divided by std."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if not std > 0:
            raise ValueError(f"std {std} must be positive")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, data: Batch, generator: torch.Generator | None = None) -> Batch:
        out = dict(data)
        out["frames"] = (out["frames"] - self.mean) / self.std
        if "bg" in out:
            out["bg"] = (out["bg"] - self.mean) / self.std
        if "tgt_photons" in out:
            out["tgt_photons"] = out["tgt_photons"] / self.std
        return out

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"
