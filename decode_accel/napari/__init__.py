"""napari plugin: look at what a model did on a movie, frame by frame, before trusting a render.

Installed with ``pip install "decode_accel[napari]"``; napari finds it through the ``napari.manifest``
entry point (``napari.yaml`` next to this file). It contributes

* a **reader** for the project's localization files (ThunderSTORM CSV, Picasso HDF5 + YAML), which
  opens them with :func:`decode_accel.io.read_table` as a points layer in nm (``_reader``);
* a **widget** "Predict localizations" that runs :func:`decode_accel.inference.predict.predict` on an
  open movie layer in a worker thread, with a progress bar and a cancel button, and adds the
  localizations, the rendered super-resolution image and optionally the current frame's detection
  probabilities (``_widget``).

World coordinates are the project's nm (DESIGN "Fixed conventions"): the image's top-left corner is
(0, 0) nm, so a camera pixel (row i, column j) has its centre at ((i + 0.5)·px, (j + 0.5)·px). A
movie layer is shown at scale px with a half-pixel translate, points are placed at their nm values,
the render at its own pixel size (``layers``).

This room sits above the library: it imports decode_accel, decode_accel never imports it, and
nothing here is imported by ``import decode_accel``.
"""

from decode_accel.napari.layers import movie_transform, points_layer_data, probability_layer_data, render_layer_data

__all__ = ["movie_transform", "points_layer_data", "probability_layer_data", "render_layer_data"]
