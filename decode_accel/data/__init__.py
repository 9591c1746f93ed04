"""Data: the HDF5 movie format, 3-frame windows and targets, the on-the-fly simulated stream, loaders, augmentations.

Data flow: ``hdf5`` (files) or ``stream`` (simulation) -> ``windows``/``arrow`` (3-frame windows, photons)
-> ``targets`` (emitter lists -> padded tensors, collate) -> ``transforms`` (augmentation) -> ``loaders``.
"""

from decode_accel.data.arrow import ArrowWindowDataset, hdf5_to_arrow
from decode_accel.data.hdf5 import (FORMAT_VERSION, MovieFile, export_tiff_and_csv, read_hdf5, simulate_to_file,
                                    write_hdf5)
from decode_accel.data.loaders import BatchCollator, LoaderConfig, create_dataloader, create_multi_channel_dataloader
from decode_accel.data.stream import DifficultySchedule, DifficultyStage, SimulatedWindowStream, sample_seed
from decode_accel.data.targets import collate_samples, emitters_to_targets
from decode_accel.data.transforms import (Compose, GaussianNoise, Normalize, RandomBrightness, RandomContrast,
                                          RandomFlip, RandomRotation)
from decode_accel.data.windows import MovieWindowDataset, window_indices

__all__ = [
    "FORMAT_VERSION", "MovieFile", "write_hdf5", "read_hdf5", "export_tiff_and_csv", "simulate_to_file",
    "hdf5_to_arrow", "ArrowWindowDataset", "MovieWindowDataset", "window_indices",
    "emitters_to_targets", "collate_samples", "SimulatedWindowStream", "DifficultySchedule", "DifficultyStage",
    "sample_seed", "LoaderConfig", "BatchCollator", "create_dataloader", "create_multi_channel_dataloader",
    "Compose", "RandomRotation", "RandomFlip", "GaussianNoise", "RandomBrightness", "RandomContrast", "Normalize",
]
