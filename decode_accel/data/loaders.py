"""DataLoaders of batch dicts, from an HDF5 file or from on-the-fly simulation (the seed's API).

.. code-block:: python

    from decode_accel.data import create_multi_channel_dataloader
    train_loader = create_multi_channel_dataloader(
        data_path='data/train_multi_channel.h5',
        config={'batch_size': 16, 'shuffle': True, 'num_workers': 4, 'pin_memory': True},
        mode='train')

Every loader yields the batch dict of docs/architecture.md (``frames`` (B, C, 3, H, W) photons, ``tgt_xyz``,
``tgt_photons``, ``tgt_ratio``, ``tgt_mask``, ``bg``) plus ``sample_index`` (B,) int64.

* ``data_path`` = a ``.h5`` file: a map-style dataset of every 3-frame window of the movie. Shuffling uses a
  dedicated ``torch.Generator`` seeded with ``config['seed']`` (deterministic, and what accelerate's seedable
  sampler needs for exact mid-epoch resume); pass this loader to ``accelerator.prepare`` to shard it.
* ``data_path`` = a folder saved by :func:`~decode_accel.data.arrow.hdf5_to_arrow`: the same over Arrow.
* ``data_path=None``: on-the-fly simulation (:class:`~decode_accel.data.stream.SimulatedWindowStream`),
  endless for 'train' and ``val_samples`` long for 'val'/'test' (independent seeds per mode). This loader shards
  by ``rank``/``world_size`` itself: **do not pass it to accelerator.prepare**; move batches to the device yourself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch.utils.data import DataLoader

from decode_accel.config_base import StrictModel
from decode_accel.data.arrow import ArrowWindowDataset
from decode_accel.data.stream import SimulatedWindowStream
from decode_accel.data.targets import collate_samples
from decode_accel.data.windows import MovieWindowDataset
from decode_accel.errors import DecodeAccelError
from decode_accel.simulation.config import ChannelsConfig, SimulationConfig

__all__ = ["LoaderConfig", "BatchCollator", "create_dataloader", "create_multi_channel_dataloader", "build_dataset"]

Mode = Literal["train", "val", "test"]


class LoaderConfig(StrictModel):
    """The ``config`` dict of :func:`create_dataloader` (unknown keys are rejected)."""

    batch_size: int = Field(16, ge=1, description="samples per batch (samples)")
    shuffle: bool | None = Field(None, description="shuffle file windows each epoch; None = True for 'train' only (-)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (processes)")
    pin_memory: bool = Field(False, description="page-lock batches for faster host-to-GPU copies (-)")
    drop_last: bool | None = Field(None, description="drop a last incomplete batch; None = True for 'train' only (-)")
    seed: int = Field(0, ge=0, description="seed of the shuffle generator and of the simulated stream (-)")
    label_photon_min: float | None = Field(
        None, ge=0, description="emitters below this are left out of the targets; None = the simulation's "
                                "emitters.label_min_photons (for files: the one stored in the file, 0 for recorded data) (photons)")
    val_samples: int = Field(256, ge=1, description="samples of a simulated 'val'/'test' set over all ranks (samples)")
    persistent_workers: bool = Field(False, description="keep worker processes alive between epochs (-)")
    sim_device: str = Field("cpu", description="device that runs the on-the-fly simulator: 'cpu' or 'cuda' "
                                               "('cuda' needs num_workers 0 and pin_memory false) (-)")
    whole_batches: bool | None = Field(
        None, description="a simulated stream yields each batch as one simulator call, not split into samples and "
                          "re-padded; needs clips_per_call = batch_size; None = on when sim_device is not the CPU (-)")
    with_variance: bool = Field(
        False, description="simulated samples also carry 'variance' (C, H, W): their crop of the sCMOS read-noise "
                           "variance map in photons², for networks with model.variance_input (-)")
    clips_per_call: int | None = Field(
        None, ge=1, description="simulated clips per vectorised simulator call; must divide batch_size; None = "
                                "batch_size (fastest); part of the stream's seed (clips)")

    @model_validator(mode="after")
    def _clips_divide_batch(self) -> "LoaderConfig":
        if self.sim_device.startswith("cuda") and (self.num_workers or self.pin_memory):
            raise ValueError("sim_device 'cuda' simulates in the main process: set num_workers 0 and pin_memory false")
        if self.clips_per_call is not None and self.batch_size % self.clips_per_call:
            raise ValueError(f"clips_per_call {self.clips_per_call} does not divide batch_size {self.batch_size}")
        return self


class _BatchTransform:
    """The batch transforms of a loader whose dataset yields whole batches (picklable)."""

    def __init__(self, transforms: Callable[[dict], dict] | None = None):
        self.transforms = transforms

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch if self.transforms is None else self.transforms(batch)


class BatchCollator:
    """Collate samples into a batch dict (padding emitter lists) and then apply batch transforms (picklable)."""

    def __init__(self, transforms: Callable[[dict], dict] | None = None):
        self.transforms = transforms

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = collate_samples(samples)
        return batch if self.transforms is None else self.transforms(batch)


def _default_simulation_config(n_channels: int | None):
    return SimulationConfig(channels=ChannelsConfig(n_channels=n_channels or 1))


def _as_simulation_config(simulation_config: Any):
    if isinstance(simulation_config, Mapping):
        return SimulationConfig.model_validate(dict(simulation_config))
    return simulation_config


def build_dataset(data_path: str | os.PathLike | None, cfg: LoaderConfig, mode: Mode, *,
                  simulation_config: Any = None, n_channels: int | None = None, rank: int = 0, world_size: int = 1,
                  start_index: int = 0, difficulty_schedule: Any = None):
    """The dataset behind :func:`create_dataloader` (a map-style window dataset or a simulated stream)."""
    if data_path is None:

        sim_cfg = _as_simulation_config(simulation_config) if simulation_config is not None else \
            _default_simulation_config(n_channels)
        if n_channels is not None and sim_cfg.channels.n_channels != n_channels:
            raise DecodeAccelError(f"simulation has {sim_cfg.channels.n_channels} channel(s), this loader needs "
                                   f"{n_channels}", field="simulation.channels.n_channels",
                                   fix=f"set channels.n_channels: {n_channels}")
        finite = mode != "train"
        return SimulatedWindowStream(
            sim_cfg, base_seed=cfg.seed, rank=rank, world_size=world_size,
            start_index=0 if finite else start_index,
            num_samples=cfg.val_samples if finite else None,
            photon_min=cfg.label_photon_min, difficulty_schedule=None if finite else difficulty_schedule,
            clips_per_call=cfg.clips_per_call or cfg.batch_size, worker_block_size=cfg.batch_size, stream_id=mode,
            device=cfg.sim_device, with_variance=cfg.with_variance)
    if cfg.with_variance:
        raise DecodeAccelError("the sCMOS variance input needs on-the-fly simulation: a data file does not say where "
                               "on the chip its frames lie", path=data_path, field="model.variance_input",
                               fix="set data.data_path: null (simulate), or model.variance_input: false")

    path = Path(data_path)
    photon_min = cfg.label_photon_min
    if path.is_dir():

        ds = ArrowWindowDataset(path, photon_min=photon_min)
    elif path.suffix.lower() in (".h5", ".hdf5", ".hdf"):

        ds = MovieWindowDataset.from_hdf5(path, photon_min=photon_min)
    elif not path.exists():
        raise DecodeAccelError("no such file", path=path, fix="check data_path (an .h5 file, an Arrow folder, or null)")
    else:
        raise DecodeAccelError(f"unsupported data file type '{path.suffix}'", path=path,
                               fix="give a decode_accel .h5 file or a folder saved by hdf5_to_arrow")
    if n_channels is not None and ds.n_channels != n_channels:
        raise DecodeAccelError(f"file has {ds.n_channels} channel(s), this loader needs {n_channels}", path=path,
                               field="frames", fix="use the matching loader or file")
    return ds


def create_dataloader(data_path: str | os.PathLike | None = None, config: Mapping[str, Any] | LoaderConfig | None = None,
                      mode: Mode = "train", *, simulation_config: Any = None, transforms: Callable | None = None,
                      n_channels: int | None = None, rank: int = 0, world_size: int = 1, start_index: int = 0,
                      difficulty_schedule: Any = None) -> DataLoader:
    """A torch DataLoader of batch dicts (see the module docstring).

    Args:
        data_path: a decode_accel ``.h5`` movie, an Arrow folder from ``hdf5_to_arrow``, or None to simulate.
        config: dict of :class:`LoaderConfig` fields (batch_size, shuffle, num_workers, pin_memory, ...).
        mode: 'train' | 'val' | 'test': 'train' shuffles, drops the last partial batch and applies ``transforms``;
            the others keep order and every window. Simulated 'val'/'test' sets are finite and fixed.
        simulation_config: SimulationConfig (or dict) for ``data_path=None``; default: ``SimulationConfig()``.
        transforms: batch transform (e.g. :class:`~decode_accel.data.transforms.Compose`), 'train' only.
        n_channels: require this many channels (1 or 2); None accepts either.
        rank, world_size: process layout for the simulated stream (ignored for files: use accelerator.prepare).
        start_index: resume position of the simulated training stream: samples consumed by all ranks together.
        difficulty_schedule: curriculum for the simulated training stream (see ``SimulatedWindowStream``).
    """
    if mode not in ("train", "val", "test"):
        raise DecodeAccelError(f"mode '{mode}' is not one of train, val, test", field="mode")
    if config is None:
        cfg = LoaderConfig()
    elif isinstance(config, LoaderConfig):
        cfg = config
    else:
        try:
            cfg = LoaderConfig.model_validate(dict(config))
        except Exception as err:
            lines = str(err).splitlines()
            raise DecodeAccelError(f"invalid loader config ({'; '.join(lines[1:3])})", field="config") from None
    train = mode == "train"
    ds = build_dataset(data_path, cfg, mode, simulation_config=simulation_config, n_channels=n_channels, rank=rank,
                       world_size=world_size, start_index=start_index, difficulty_schedule=difficulty_schedule)
    collate = BatchCollator(transforms if train else None)
    workers = dict(num_workers=cfg.num_workers, pin_memory=cfg.pin_memory,
                   persistent_workers=cfg.persistent_workers and cfg.num_workers > 0)
    whole = cfg.whole_batches if cfg.whole_batches is not None else not cfg.sim_device.startswith("cpu")
    if whole and hasattr(ds, "yield_batches") and (cfg.clips_per_call or cfg.batch_size) == cfg.batch_size:
        ds.yield_batches = True  # the stream yields batch dicts: no automatic batching
        return DataLoader(ds, batch_size=None, collate_fn=_BatchTransform(transforms if train else None),
                          generator=torch.Generator().manual_seed(cfg.seed), **workers)
    if isinstance(ds, torch.utils.data.IterableDataset):
        return DataLoader(ds, batch_size=cfg.batch_size, collate_fn=collate, drop_last=False,
                          generator=torch.Generator().manual_seed(cfg.seed), **workers)
    shuffle = train if cfg.shuffle is None else cfg.shuffle
    drop_last = (train and len(ds) >= cfg.batch_size) if cfg.drop_last is None else cfg.drop_last
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=collate,
                      generator=torch.Generator().manual_seed(cfg.seed), **workers)


def create_multi_channel_dataloader(data_path: str | os.PathLike | None, config: Mapping[str, Any] | None = None,
                                    mode: Mode = "train", **kwargs: Any) -> DataLoader:
    """:func:`create_dataloader` for two-channel (ratiometric) data: the file or simulation must have 2 channels.

    With ``data_path=None`` and no ``simulation_config``, simulates the default two-channel setup.
    """
    return create_dataloader(data_path, config, mode, n_channels=2, **kwargs)
