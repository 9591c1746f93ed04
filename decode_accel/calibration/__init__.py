"""Calibration: fit the simulation to a recorded movie (camera, PSF, photons, background, density).

Modules: :mod:`.camera_estimate` (mean–variance gain/offset), :mod:`.spots` (detection and Poisson
MLE fits of isolated spots), :mod:`.astigmatism` (per-axis astigmatic model from a bead z-stack;
DECODE/SMAP and ThunderSTORM imports), :mod:`.calibrate` (``decode-accel calibrate``).
"""

from .calibrate import CalibrationResult, Estimate, calibrate, calibrate_main, comparison_figure, write_config

__all__ = ["calibrate", "calibrate_main", "comparison_figure", "write_config", "CalibrationResult", "Estimate"]
