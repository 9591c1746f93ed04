"""Inference on movies: lazy TIFF reading, exact tiling, feature-cached prediction, post-processing, rendering.

* :func:`predict` (``decode-accel predict``): movie (ADU) -> localization table (nm), written as
  ThunderSTORM CSV and/or Picasso HDF5; resumable, multi-process through Accelerate.
* :func:`open_movie` / :class:`Movie`: TIFF, OME-TIFF, Micro-Manager stacks as ``(T, C, H, W)``, read lazily.
* :mod:`~decode_accel.inference.tiling`: tiles on the network's stride grid with receptive-field overlap.
* :class:`~decode_accel.inference.postprocess.PostProcessor`: output maps -> table rows.
* :func:`render`: super-resolution image (histogram or Gaussian) from a table.
"""

from decode_accel.inference.movie import ArrayMovie, Movie, open_movie, parse_frames
from decode_accel.inference.postprocess import PostProcessor
from decode_accel.inference.predict import predict
from decode_accel.inference.render import render
from decode_accel.inference.tiling import plan_tiles, predict_maps_tiled, receptive_field_radius

__all__ = ["ArrayMovie", "Movie", "PostProcessor", "open_movie", "parse_frames", "plan_tiles", "predict",
           "predict_maps_tiled", "receptive_field_radius", "render"]
