"""Simulation: blinking emitters -> PSF render -> background -> camera (ADU); two-channel split.

Public API: :class:`Simulator` (``sample``, ``sample_windows``, ``with_overrides``, ``camera``),
:class:`SimulatedMovie`, the config sections, the PSFs and :class:`Camera`.
"""

from .camera import Camera
from .config import (BackgroundConfig, CameraConfig, ChannelsConfig, DyeConfig, EmitterConfig, FrameConfig,
                     PSFConfig, SimulationConfig)
from .psf import (PSF, AstigmaticPSF, GaussianPSF, SplinePSF, load_smap_calibration, make_psf, save_smap_calibration,
                  spline_coefficients)
from .simulator import SimulatedMovie, Simulator

__all__ = [
    "Simulator", "SimulatedMovie", "SimulationConfig", "FrameConfig", "EmitterConfig", "PSFConfig",
    "BackgroundConfig", "CameraConfig", "ChannelsConfig", "DyeConfig", "Camera", "PSF", "GaussianPSF",
    "AstigmaticPSF", "SplinePSF", "make_psf", "spline_coefficients", "save_smap_calibration",
    "load_smap_calibration",
]
