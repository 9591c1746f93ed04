"""After localization: drift correction and linking of blinks, through Picasso (``picassosr``).

Works on the Picasso HDF5 (+ YAML sidecar) that ``decode-accel predict`` writes; see
:mod:`decode_accel.analysis.drift_link` and ``decode-accel postprocess``.
"""

from .drift_link import (DriftResult, link_blinks, load_locs, postprocess, save_locs, undrift)

__all__ = ["undrift", "link_blinks", "load_locs", "save_locs", "postprocess", "DriftResult"]
