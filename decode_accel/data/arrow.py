"""Recorded or pre-simulated movies as Hugging Face ``datasets`` (Arrow), with 3-frame windows on top.

Layout of the Arrow table (one row per frame), chosen from measurements (accelerate_notes.md §3b): a flat
fixed-length float list reads ~10x faster than ``Array2D`` for random batches, and ragged emitter lists stored as
list columns (CSR offsets, no Python loop at conversion) are padded later by the collate function.

=============== ========================== ==========================================================
column          type                       meaning
=============== ========================== ==========================================================
frame_idx       int64                      0-based frame index
frame           List(float32, C·H·W)       the frame in **photons** (already converted from ADU), C-order (C, H, W)
bg              List(float32, C or C·H·W)  expected background, photons/px (per channel, or per pixel)
em_x, em_y      List(float32)              emitter positions of this frame, **px** (pixel (i, j) centre at j+0.5, i+0.5)
em_z            List(float32)              nm
em_photons      List(float32)              photons (both channels)
em_ratio        List(float32)              fraction in channel 1
=============== ========================== ==========================================================

The frame geometry (n_channels, height, width), px_size (nm) and the source's metadata are kept as JSON in
``dataset.info.description``, so a dataset saved with ``save_to_disk`` (or pushed to the Hub) is self-describing.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from decode_accel.data.hdf5 import MovieFile, read_hdf5
from decode_accel.data.windows import window_indices
from decode_accel.errors import DecodeAccelError

__all__ = ["hdf5_to_arrow", "ArrowWindowDataset"]


def hdf5_to_arrow(source: str | os.PathLike | MovieFile, save_dir: str | os.PathLike | None = None):
    """Convert a decode_accel HDF5 movie into a ``datasets.Dataset`` (layout in the module docstring).

    Args:
        source: an HDF5 file path or a :class:`~decode_accel.data.hdf5.MovieFile`.
        save_dir: when given, ``save_to_disk`` there and return the memory-mapped reloaded dataset.

    Returns:
        ``datasets.Dataset`` with one row per frame, formatted as numpy.
    """
    import datasets  # heavy: datasets is slow to import (seconds), only the Arrow path needs it
    import pyarrow as pa  # with datasets, on the Arrow path only

    movie = source if isinstance(source, MovieFile) else read_hdf5(source)
    n, c, h, w = movie.frames.shape
    photons = movie.frames_photons().numpy().astype(np.float32)
    em = movie.emitters
    fr = em["frame"].to_numpy().astype(np.int64)
    order = np.argsort(fr, kind="stable")
    offsets = pa.array(np.searchsorted(fr[order], np.arange(n + 1)).astype(np.int32))

    def ragged(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(np.asarray(values, dtype=np.float32)[order]))

    # single-channel targets carry ratio 0.5 (batch contract), whatever the file says
    ratio = em["ratio"].to_numpy() if ("ratio" in em.columns and c == 2) else np.full(len(em), 0.5)
    bg = movie.bg.reshape(n, -1).astype(np.float32)
    table = pa.table({
        "frame_idx": pa.array(np.arange(n, dtype=np.int64)),
        "frame": pa.FixedSizeListArray.from_arrays(pa.array(photons.ravel()), c * h * w),
        "bg": pa.FixedSizeListArray.from_arrays(pa.array(bg.ravel()), bg.shape[1]),
        "em_x": ragged(em["x"].to_numpy() / movie.px_size),
        "em_y": ragged(em["y"].to_numpy() / movie.px_size),
        "em_z": ragged(em["z"].to_numpy()),
        "em_photons": ragged(em["photons"].to_numpy()),
        "em_ratio": ragged(np.where(np.isfinite(ratio), ratio, 0.5)),
    })
    meta = {"n_channels": c, "height": h, "width": w, "px_size": movie.px_size, "camera": movie.camera,
            "psf": movie.psf, "source": str(movie.path), "label_min_photons": movie.label_min_photons,
            "decode_accel_arrow_version": 1}
    info = datasets.DatasetInfo(description=json.dumps(meta))
    ds = datasets.Dataset(datasets.table.InMemoryTable(table), info=info)
    if save_dir is not None:
        ds.save_to_disk(str(save_dir))
        ds = datasets.load_from_disk(str(save_dir))
    return ds.with_format("numpy")


class ArrowWindowDataset(Dataset):
    """Map-style dataset of 3-frame windows over an Arrow movie from :func:`hdf5_to_arrow`; item t centres on frame t.

    Yields the sample dicts of :mod:`decode_accel.data.targets` (frames in photons, targets in px/px/nm).

    Args:
        dataset: the ``datasets.Dataset`` (or a path saved with ``save_to_disk``).
        photon_min: emitters below this many photons are dropped from the targets, photons (None: the label
            filter of the simulation that made the source file, 0 for recorded data).
    """

    def __init__(self, dataset: Any, *, photon_min: float | None = None):
        import datasets  # heavy: datasets is slow to import (seconds), only the Arrow path needs it

        if isinstance(dataset, (str, os.PathLike)):
            dataset = datasets.load_from_disk(str(dataset))
        try:
            meta = json.loads(dataset.info.description)
            self.n_channels, self.height, self.width = int(meta["n_channels"]), int(meta["height"]), int(meta["width"])
        except (TypeError, ValueError, KeyError):
            raise DecodeAccelError("dataset has no decode_accel geometry in info.description", field="info.description",
                                   fix="build it with decode_accel.data.hdf5_to_arrow") from None
        self.meta = meta
        if getattr(dataset, "_indices", None) is not None:  # a select/shuffle view: materialise it once
            dataset = dataset.flatten_indices()
        self.dataset = dataset
        # index the underlying pyarrow table directly: the datasets formatting layer costs ~5x per window
        self._table = dataset.data.table
        self.photon_min = float(meta.get("label_min_photons", 0.0) if photon_min is None else photon_min)

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, t: int) -> dict[str, torch.Tensor]:
        t = int(t)
        if t < 0:
            t += len(self)
        idx = window_indices(t, len(self))
        # a zero-copy slice of the (at most 3) distinct rows; Table.take costs ~5 ms on a memory-mapped table
        lo = idx[0]
        rows = self._table.slice(lo, idx[-1] - lo + 1)
        local = [i - lo for i in idx]
        c, h, w = self.n_channels, self.height, self.width

        def flat(name: str) -> np.ndarray:
            return rows.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)

        def central(name: str) -> np.ndarray:
            return rows.column(name)[t - lo].values.to_numpy(zero_copy_only=False).astype(np.float32)

        frames = flat("frame").astype(np.float32).reshape(-1, c, h, w)[local]
        frames = torch.from_numpy(frames).permute(1, 0, 2, 3)
        bg = flat("bg").astype(np.float32).reshape(rows.num_rows, -1)[t - lo]
        bg_t = torch.from_numpy(bg.copy()).view(c, 1, 1).expand(c, h, w).clone() if bg.size == c else \
            torch.from_numpy(bg.reshape(c, h, w).copy())
        photons = central("em_photons")
        keep = photons >= self.photon_min
        xyz = np.stack([central(k)[keep] for k in ("em_x", "em_y", "em_z")], axis=1)
        return {
            "frames": frames.contiguous(),
            "bg": bg_t,
            "sample_index": torch.tensor(t, dtype=torch.int64),
            "tgt_xyz": torch.from_numpy(xyz.reshape(-1, 3)),
            "tgt_photons": torch.from_numpy(photons[keep]),
            "tgt_ratio": torch.from_numpy(central("em_ratio")[keep]),
        }
