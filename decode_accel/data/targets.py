"""Training targets: one frame's emitter rows -> padded tensors, and the collate function.

A *sample* is what a dataset yields for one 3-frame window (no batch axis):

- ``frames``: float32 (C, 3, H, W), photons (frames t-1, t, t+1)
- ``tgt_xyz``: float32 (m, 3): x, y in px (pixel (i, j) has its centre at x = j + 0.5, y = i + 0.5), z in nm
- ``tgt_photons``: float32 (m,): total detected photons of the central frame
- ``tgt_ratio``: float32 (m,): fraction of the photons in channel 1 (0.5 for single-channel data)
- ``bg``: float32 (C, H, W): expected background of the central frame, photons/px
- ``sample_index``: int64 scalar: global index of the sample in its stream (or the central frame index)

:func:`collate_samples` stacks samples into the batch dict of docs/architecture.md, padding the emitter lists
to the batch's largest count M (at least 1, so that tensors never have a zero-sized axis) with ``tgt_mask``
telling real rows from padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

__all__ = ["EmitterIndex", "emitters_to_targets", "collate_samples", "empty_targets", "bg_to_map"]


def empty_targets() -> dict[str, torch.Tensor]:
    """Targets of a frame without emitters."""
    return {
        "tgt_xyz": torch.zeros(0, 3, dtype=torch.float32),
        "tgt_photons": torch.zeros(0, dtype=torch.float32),
        "tgt_ratio": torch.zeros(0, dtype=torch.float32),
    }


def emitters_to_targets(emitters: pd.DataFrame, px_size: float, *, photon_min: float = 0.0,
                        n_channels: int = 1) -> dict[str, torch.Tensor]:
    """Convert the emitter rows of ONE frame (table convention, nm) to target tensors.

    Args:
        emitters: rows with columns x, y, z (nm), photons (photons) and optionally ratio; all rows belong to the
            central frame of the window.
        px_size: pixel size in nm (square pixels).
        photon_min: emitters with fewer photons than this are dropped from the targets only (they stay in the
            image; the network is not asked to find what is too dim to see, DECODE's label filter).
        n_channels: 1 or 2; single-channel targets carry ratio 0.5 whatever the table says (the batch contract).

    Returns:
        dict with ``tgt_xyz`` (m, 3) [x px, y px, z nm], ``tgt_photons`` (m,) photons and ``tgt_ratio`` (m,).
        Because the image origin is the top-left pixel *corner* in both the table and the tensors,
        x_px = x_nm / px_size (no half-pixel shift).
    """
    if len(emitters) == 0:
        return empty_targets()
    photons = emitters["photons"].to_numpy(dtype=np.float64)
    keep = photons >= photon_min
    if not keep.any():
        return empty_targets()
    em = emitters.loc[keep]
    xyz = np.stack(
        [em["x"].to_numpy(np.float64) / px_size, em["y"].to_numpy(np.float64) / px_size, em["z"].to_numpy(np.float64)],
        axis=1,
    )
    if n_channels == 2 and "ratio" in em.columns:
        ratio = em["ratio"].to_numpy(np.float64)
        ratio = np.where(np.isfinite(ratio), ratio, 0.5)
    else:
        ratio = np.full(len(em), 0.5)
    return {
        "tgt_xyz": torch.as_tensor(xyz, dtype=torch.float32),
        "tgt_photons": torch.as_tensor(photons[keep], dtype=torch.float32),
        "tgt_ratio": torch.as_tensor(ratio, dtype=torch.float32),
    }


class EmitterIndex:
    """Per-frame target lookup for a whole movie: the table converted once to px arrays sorted by frame (CSR).

    Args:
        emitters: table with a 0-based ``frame`` column, x, y, z (nm), photons and optionally ratio.
        n_frames: number of frames of the movie (frames without rows give empty targets).
        px_size: pixel size, nm.
        n_channels: 1 or 2 (single-channel targets carry ratio 0.5).
    """

    def __init__(self, emitters: pd.DataFrame, n_frames: int, px_size: float, n_channels: int = 1):
        frames = emitters["frame"].to_numpy().astype(np.int64)
        order = np.argsort(frames, kind="stable")
        em = emitters.iloc[order]
        self.offsets = np.searchsorted(frames[order], np.arange(n_frames + 1), side="left")
        t = emitters_to_targets(em, px_size, n_channels=n_channels) if len(em) else empty_targets()
        self.xyz, self.photons, self.ratio = t["tgt_xyz"], t["tgt_photons"], t["tgt_ratio"]

    def frame(self, t: int, photon_min: float = 0.0) -> dict[str, torch.Tensor]:
        """Targets of frame ``t`` (0-based) without the emitters below ``photon_min`` photons."""
        lo, hi = int(self.offsets[t]), int(self.offsets[t + 1])
        keep = self.photons[lo:hi] >= photon_min
        return {"tgt_xyz": self.xyz[lo:hi][keep], "tgt_photons": self.photons[lo:hi][keep],
                "tgt_ratio": self.ratio[lo:hi][keep]}


def bg_to_map(bg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Background of one frame as a (C, H, W) map; a per-channel constant (C,) is broadcast."""
    bg = torch.as_tensor(bg, dtype=torch.float32)
    if bg.dim() == 1:
        return bg[:, None, None].expand(bg.shape[0], height, width).clone()
    return bg


def collate_samples(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch dict, padding emitter lists to the batch maximum M (M >= 1).

    Padding rows are zeros with ``tgt_mask`` False (``tgt_ratio`` is padded with 0.5, a valid ratio, so that
    a loss that forgets the mask still sees finite numbers). Keys other than the target lists are stacked.
    """
    if len(samples) == 0:
        raise ValueError("collate_samples needs at least one sample")
    m = max(1, max(int(s["tgt_photons"].shape[0]) for s in samples))
    b = len(samples)
    dev = samples[0]["tgt_photons"].device  # a stream simulating on the GPU yields GPU tensors
    xyz = torch.zeros(b, m, 3, dtype=torch.float32, device=dev)
    photons = torch.zeros(b, m, dtype=torch.float32, device=dev)
    ratio = torch.full((b, m), 0.5, dtype=torch.float32, device=dev)
    mask = torch.zeros(b, m, dtype=torch.bool, device=dev)
    for i, s in enumerate(samples):
        n = int(s["tgt_photons"].shape[0])
        xyz[i, :n] = s["tgt_xyz"]
        photons[i, :n] = s["tgt_photons"]
        ratio[i, :n] = s["tgt_ratio"]
        mask[i, :n] = True
    batch = {"tgt_xyz": xyz, "tgt_photons": photons, "tgt_ratio": ratio, "tgt_mask": mask}
    for key in samples[0]:
        if key in batch or key.startswith("tgt_"):
            continue
        batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
    return batch
