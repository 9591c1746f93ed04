"""Small shared pieces for the trainer tests: tiny simulations, tiny networks, a map-style dataset."""

from __future__ import annotations

import torch

from decode_accel.data import create_dataloader
from decode_accel.data.targets import collate_samples
from decode_accel.simulation.config import SimulationConfig


def tiny_simulation(n_channels: int = 1, size: int = 16) -> SimulationConfig:
    """16x16 px frames of 100 nm pixels, about 2 emitters per frame."""
    channels = {"n_channels": n_channels}
    if n_channels == 2:
        channels["dyes"] = [{"ratio_mean": 0.3, "ratio_sd": 0.03, "probability": 1.0},
                            {"ratio_mean": 0.7, "ratio_sd": 0.03, "probability": 1.0}]
    return SimulationConfig(frame={"height": size, "width": size, "px_size": 100.0},
                            emitters={"emitters_per_frame": 2.0}, channels=channels)


def stream_loaders(sim, batch_size: int = 4, val_samples: int = 8, rank: int = 0, world_size: int = 1):
    train = create_dataloader(None, {"batch_size": batch_size, "seed": 3}, "train", simulation_config=sim,
                              rank=rank, world_size=world_size)
    val = create_dataloader(None, {"batch_size": batch_size, "val_samples": val_samples, "seed": 3}, "val",
                            simulation_config=sim)
    return train, val


class ListDataset(torch.utils.data.Dataset):
    """A fixed, map-style set of simulated samples (what an HDF5 window dataset looks like to the loop)."""

    def __init__(self, sim, n: int):
        from decode_accel.data.stream import SimulatedWindowStream
        stream = SimulatedWindowStream(sim, base_seed=11, num_samples=n, stream_id="test")
        self.samples = list(stream)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def map_loader(dataset, batch_size: int, shuffle: bool, seed: int = 5):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_samples,
                                       generator=torch.Generator().manual_seed(seed), drop_last=True)


def tiny_sigma_munet():
    from decode_accel.models import SigmaMUNet
    return SigmaMUNet.from_preset("tiny")


def tiny_double_munet():
    from decode_accel.models import DoubleMUNet
    return DoubleMUNet.from_preset("tiny")


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
