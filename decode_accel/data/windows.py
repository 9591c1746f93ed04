"""Windows of 3 consecutive frames over a recorded or pre-simulated movie (map-style datasets).

The network sees frames t-1, t, t+1 and predicts the emitters of the central frame t. At the first and last
frame the missing neighbour is replaced by the frame itself (the clamped index is used: window(0) = [0, 0, 1],
window(T-1) = [T-2, T-1, T-1]), as DECODE's inference does, so every frame of a movie gets a prediction.

Frames are converted from camera ADU to photons once, with the camera's inverse (``camera.to_photons``), so the
datasets below always yield photons; see :mod:`decode_accel.data.targets` for the sample layout.
"""

from __future__ import annotations

import os

import pandas as pd
import torch
from torch.utils.data import Dataset

from decode_accel.data.hdf5 import read_hdf5
from decode_accel.data.targets import EmitterIndex, bg_to_map

__all__ = ["window_indices", "MovieWindowDataset"]


def window_indices(t: int, n_frames: int, size: int = 3) -> list[int]:
    """Frame indices of the window centred on frame ``t`` of a movie of ``n_frames`` frames.

    Indices outside the movie are clamped to its first/last frame (edge frames replicate the neighbour index).
    """
    if n_frames < 1:
        raise ValueError("a movie needs at least one frame")
    if not 0 <= t < n_frames:
        raise IndexError(f"frame {t} outside a movie of {n_frames} frames")
    half = size // 2
    return [min(max(t + k, 0), n_frames - 1) for k in range(-half, half + 1)]


class MovieWindowDataset(Dataset):
    """Map-style dataset of 3-frame windows over one movie held in memory; item ``t`` is centred on frame ``t``.

    Args:
        frames: (T, C, H, W) frames in **photons** (already converted from ADU).
        bg: (T, C, H, W) or (T, C) expected background, photons/px.
        emitters: ground-truth table (0-based ``frame``, x, y, z nm, photons, optionally ratio); may be None or empty
            for recorded data without ground truth (the targets are then empty).
        px_size: pixel size, nm.
        photon_min: emitters below this many photons are dropped from the targets (not from the image).
    """

    def __init__(self, frames: torch.Tensor, bg: torch.Tensor | None, emitters: pd.DataFrame | None, px_size: float,
                 *, photon_min: float = 0.0):
        self.frames = torch.as_tensor(frames, dtype=torch.float32)
        if self.frames.dim() != 4:
            raise ValueError(f"frames must be (T, C, H, W), got shape {tuple(self.frames.shape)}")
        t, c, h, w = self.frames.shape
        self.bg = None if bg is None else torch.as_tensor(bg, dtype=torch.float32)
        self.px_size = float(px_size)
        self.photon_min = float(photon_min)
        if emitters is None:
            emitters = pd.DataFrame({k: pd.Series(dtype="float64") for k in ("frame", "x", "y", "z", "photons")})
        self.index = EmitterIndex(emitters, t, self.px_size, n_channels=c)

    @classmethod
    def from_hdf5(cls, path: str | os.PathLike, *, photon_min: float | None = None) -> "MovieWindowDataset":
        """Read a decode_accel HDF5 file (see :mod:`decode_accel.data.hdf5`) and convert its frames to photons.

        ``photon_min`` None takes the label filter of the simulation that wrote the file (0 for recorded data).
        """

        movie = read_hdf5(path)
        if photon_min is None:
            photon_min = movie.label_min_photons
        return cls(movie.frames_photons(), movie.bg, movie.emitters, movie.px_size, photon_min=photon_min)

    @property
    def n_channels(self) -> int:
        return int(self.frames.shape[1])

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def __getitem__(self, t: int) -> dict[str, torch.Tensor]:
        t = int(t)
        if t < 0:
            t += len(self)
        idx = window_indices(t, len(self))
        frames = self.frames[idx].permute(1, 0, 2, 3).contiguous()  # (3, C, H, W) -> (C, 3, H, W)
        _, c, h, w = self.frames.shape
        bg = torch.zeros(c, h, w) if self.bg is None else bg_to_map(self.bg[t], h, w)
        sample = {"frames": frames, "bg": bg, "sample_index": torch.tensor(t, dtype=torch.int64)}
        sample.update(self.index.frame(t, self.photon_min))
        return sample
