"""Calibration: fit the simulation to a recorded movie (camera, PSF, photons, background, density).

Modules: :mod:`.camera_estimate` (mean–variance gain/offset), :mod:`.spots` (detection and Poisson
MLE fits of isolated spots), :mod:`.astigmatism` (per-axis astigmatic model from a bead z-stack;
DECODE/SMAP and ThunderSTORM imports), :mod:`.calibrate` (the workflow behind ``decode-accel calibrate``, whose command line is
:mod:`decode_accel.cli.calibrate`).
"""

from .calibrate import CalibrationResult, Estimate, calibrate, comparison_figure, write_config

__all__ = ["calibrate", "comparison_figure", "write_config", "CalibrationResult", "Estimate"]
