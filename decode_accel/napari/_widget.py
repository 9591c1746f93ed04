"""napari widget "Predict localizations": run a model on the open movie layer in a worker thread.

The worker (``napari.qt.threading``) runs :func:`decode_accel.napari.run.predict_chunks`, i.e. the
library's ``predict`` chunk by chunk: the progress bar moves after each chunk and Cancel stops the run
between two chunks. When it is done the widget adds

* ``<movie> localizations``: points (frame, y, x) in nm, coloured by detection probability or by dye
  (``auto``: by dye for a two-channel model, whose second channel is the ``channel 2`` layer);
* ``<movie> render``: the super-resolution image (:func:`decode_accel.inference.render.render`) at its
  own pixel size;
* optionally ``<movie> p``: the network's detection probabilities of the frame under the slider
  (recomputed when the slider moves).

The movie layer itself is placed in nm (scale px, translate px/2) when it is still at napari's default
pixel scale, so all layers line up. Errors show as the CLI's one line (``error: ...``) in the widget
and as a napari notification.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, LineEdit,
                              ProgressBar, PushButton, SpinBox, create_widget)

from decode_accel.errors import DecodeAccelError
from decode_accel.inference.predict import DEFAULT_TILE_SIZE
from decode_accel.inference.render import render
from decode_accel.napari.layers import (COLOR_BY, movie_transform, points_layer_data, probability_layer_data,
                                        render_layer_data)
from decode_accel.napari.run import predict_chunks, probability_map

__all__ = ["PredictWidget", "error_line"]

TIFF_SUFFIXES = (".tif", ".tiff")


def error_line(exc: BaseException) -> str:
    """The one line the CLI prints for an error (``decode-accel predict`` writes ``error: <message>``)."""
    if isinstance(exc, DecodeAccelError):
        return f"error: {exc}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"error: {type(exc).__name__}: {text}"


def movie_input(layer):
    """What predict reads for an image layer: its TIFF file (memory-mapped, with the pixel-size metadata)
    when the layer was opened from one, else the layer's array (ADU)."""
    source = getattr(getattr(layer, "source", None), "path", None)
    if source and Path(source).suffix.lower() in TIFF_SUFFIXES and Path(source).is_file():
        return os.fspath(source)
    return np.asarray(layer.data)


class PredictWidget(Container):
    """Dock widget: movie layer + model -> localizations, render, probability map (see module doc)."""

    def __init__(self, napari_viewer):
        import napari  # optional (the 'napari' extra): imported when a viewer builds the widget

        self.viewer = napari_viewer
        self.image = create_widget(annotation=napari.layers.Image, label="movie")
        self.image2 = create_widget(annotation=napari.layers.Image, label="channel 2",
                                    options=dict(nullable=True, tooltip="second channel (two-channel models only)"))
        self.model = FileEdit(mode="d", label="model", value="",
                              tooltip="export folder, or a Hugging Face Hub id (user/name; offline: from the cache)")
        self.own_threshold = CheckBox(value=True, text="model's own threshold",
                                      tooltip="the detection threshold the model was validated at (its export)")
        self.threshold = FloatSpinBox(value=0.3, min=0.01, max=1.0, step=0.05, label="threshold", enabled=False)
        self.first = SpinBox(value=0, min=0, max=10 ** 9, label="first frame", tooltip="0-based")
        self.last = SpinBox(value=0, min=0, max=10 ** 9, label="stop frame",
                            tooltip="0-based, exclusive; 0: to the end of the movie")
        self.tile = SpinBox(value=DEFAULT_TILE_SIZE or 0, min=0, max=8192, step=64, label="tile size",
                            tooltip="tile edge (px); larger frames are tiled exactly; 0: never tile")
        self.camera = FileEdit(mode="r", label="camera", value="", filter="*.yaml *.yml",
                               tooltip="camera YAML overriding the model's camera (ADU -> photons); empty: the model's")
        self.color_by = ComboBox(choices=list(COLOR_BY), value="auto", label="colour by",
                                 tooltip="auto: by dye for a two-channel model with a dye table, else by probability")
        self.render_px = FloatSpinBox(value=10.0, min=0.5, max=1000.0, step=1.0, label="render px (nm)")
        self.show_p = CheckBox(value=False, text="probability map of the current frame")
        self.run_button = PushButton(text="Predict")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="progress")
        self.status = Label(value="")
        super().__init__(widgets=[self.image, self.image2, self.model, self.own_threshold, self.threshold,
                                  self.first, self.last, self.tile, self.camera, self.color_by, self.render_px,
                                  self.show_p, self.run_button, self.cancel_button, self.progress, self.status])
        self.own_threshold.changed.connect(lambda v: setattr(self.threshold, "enabled", not v))
        self.run_button.changed.connect(lambda *_: self.run())
        self.cancel_button.changed.connect(lambda *_: self.cancel())
        self.viewer.dims.events.current_step.connect(self._frame_changed)
        self.image2.value = None
        self.worker = None
        self.p_worker = None
        self.exported = None  # the model of the last run
        self.table = None  # the last run's table
        self.error = None  # the last error line
        self._inputs = None
        self._settings = {}
        self._p_frame = None
        self._closed = False
        self.native.destroyed.connect(self._on_close)

    # ------------------------------------------------------------------ settings
    def _model_value(self):
        """The model field's text as typed: an export folder or a Hub id (``user/name``).

        The line edit's own text, not ``FileEdit.value``: setting that value makes a path absolute, which
        would turn a Hub id into a folder under the current directory."""
        text = str(self.model.line_edit.value or "").strip()
        return "" if text in ("", ".") else os.path.expanduser(text)

    def settings(self) -> dict:
        """The run's keyword arguments for predict_chunks (threshold None: the model's own)."""
        camera = self.camera.value
        camera = os.fspath(camera) if camera is not None and os.fspath(camera) not in ("", ".") else None
        stop = int(self.last.value) or None
        return dict(threshold=None if self.own_threshold.value else float(self.threshold.value),
                    frames=(int(self.first.value), stop), tile_size=int(self.tile.value) or None, camera=camera)

    # ------------------------------------------------------------------ run
    def run(self, model=None):
        """Start a prediction (``model``: an ExportedModel or folder/Hub id overriding the model field).

        Returns the worker (``napari.qt.threading.GeneratorWorker``), or None when it could not start."""
        from napari.qt.threading import create_worker  # optional: the 'napari' extra, as above

        if self.worker is not None:
            return self.worker
        self.error = None
        layer = self.image.value
        if layer is None:
            self._fail(DecodeAccelError("no movie layer", field="movie", fix="open a TIFF movie first"))
            return None
        inputs = movie_input(layer)
        if self.image2.value is not None:
            second = movie_input(self.image2.value)
            inputs = [inputs, second] if isinstance(inputs, str) and isinstance(second, str) else \
                np.stack([np.asarray(layer.data), np.asarray(self.image2.value.data)], axis=1)
        self._inputs, self._layer = inputs, layer
        self._settings = self.settings()
        model = model if model is not None else self._model_value()
        self.worker = create_worker(predict_chunks, model, inputs, _start_thread=False, _ignore_errors=True,
                                    **self._settings)
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(self._on_done)
        self.worker.errored.connect(self._fail)
        self.worker.aborted.connect(self._on_aborted)
        self.worker.finished.connect(self._on_finished)
        self.progress.value = 0
        self.status.value = "loading the model..."
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.worker.start()
        return self.worker

    def cancel(self):
        """Stop the running prediction after its current chunk (nothing is added to the viewer)."""
        if self.worker is not None:
            self.status.value = "cancelling..."
            self.worker.quit()

    def _on_progress(self, p):
        if p.model is not None:
            self.exported = p.model
            if self.own_threshold.value and getattr(p.model, "threshold", None) is not None:
                self.threshold.value = float(p.model.threshold)  # show the model's own threshold
        self.progress.max = max(1, p.total)
        self.progress.value = p.done
        self.status.value = f"{p.done} / {p.total} frames"

    def _on_done(self, table):
        if self._closed:
            return
        self.table = table
        px = float(table.attrs.get("px_size_nm") or self.exported.px_size_nm)
        layer = self._layer
        self._place_movie(layer, px)
        if self.image2.value is not None:
            self._place_movie(self.image2.value, px)
        color_by = self.color_by.value
        for old in (f"{layer.name} localizations", f"{layer.name} render"):
            if old in self.viewer.layers:
                self.viewer.layers.remove(old)
        rpx = float(self.render_px.value)
        self._add(render_layer_data(render(table, px_size_nm=rpx), render_px_nm=rpx, name=f"{layer.name} render"))
        self._add(points_layer_data(table, px_size_nm=px, color_by=color_by,
                                    dye_table=getattr(self.exported, "dye_table", None),
                                    name=f"{layer.name} localizations",
                                    metadata=dict(threshold=self._settings.get("threshold")
                                                  if self._settings.get("threshold") is not None
                                                  else getattr(self.exported, "threshold", None))))
        overlays = getattr(getattr(self.viewer, "canvas", None), "overlays", None)  # napari >= 0.9
        (getattr(overlays, "scale_bar", None) or self.viewer.scale_bar).visible = True
        self.status.value = f"{len(table)} localizations"
        if self.show_p.value:
            self.update_probability_map()

    def _fail(self, exc):
        self.error = error_line(exc)
        self.status.value = self.error
        try:
            from napari.utils.notifications import show_error  # optional: the 'napari' extra, as above
            show_error(self.error)
        except Exception:  # noqa: BLE001 - a notification must never hide the message in the widget
            pass

    def _on_aborted(self):
        self.status.value = "cancelled"

    def _on_finished(self):
        self.worker = None
        self.run_button.enabled, self.cancel_button.enabled = True, False

    # ------------------------------------------------------------------ layers
    def _add(self, layer_data):
        from napari.layers import Layer  # optional: the 'napari' extra, as above
        layer = Layer.create(*layer_data)
        self.viewer.add_layer(layer)
        return layer

    def _place_movie(self, layer, px):
        """Show the movie in nm (top-left corner at 0 nm) unless the user gave it a scale of their own."""
        if np.allclose(layer.scale[-2:], 1.0) and np.allclose(layer.translate[-2:], 0.0):
            t = movie_transform(px, layer.ndim)
            layer.scale, layer.translate, layer.units = t["scale"], t["translate"], t["units"]
            self.viewer.reset_view()

    def current_frame(self) -> int:
        return int(self.viewer.dims.current_step[0]) if self.viewer.dims.ndim >= 3 else 0

    def update_probability_map(self, frame: int | None = None):
        """(Re)compute the detection-probability layer for ``frame`` (default: the frame under the slider)
        in a worker; returns the worker, or None when there is nothing to do."""
        from napari.qt.threading import create_worker  # optional: the 'napari' extra, as above

        if self._closed or self.exported is None or self._inputs is None or self.p_worker is not None:
            return None
        frame = self.current_frame() if frame is None else int(frame)
        self._p_frame = frame
        kwargs = {k: self._settings[k] for k in ("tile_size", "camera") if k in self._settings}
        self.p_worker = create_worker(probability_map, self.exported, self._inputs, frame, _start_thread=False,
                                      _ignore_errors=True,
                                      **kwargs)
        self.p_worker.returned.connect(lambda p, f=frame: self._show_p(p, f))
        self.p_worker.errored.connect(self._fail)
        self.p_worker.finished.connect(self._p_finished)
        self.p_worker.start()
        return self.p_worker

    def _show_p(self, p, frame):
        if self._closed:
            return
        name = f"{self._layer.name} p"
        data, kwargs, _ = probability_layer_data(p, px_size_nm=self.exported.px_size_nm, frame=frame, name=name)
        if name in self.viewer.layers:
            lay = self.viewer.layers[name]
            lay.data, lay.metadata = data, kwargs["metadata"]
        else:
            self._add((data, kwargs, "image"))

    def _p_finished(self):
        self.p_worker = None
        if not self._closed and self.show_p.value and self._p_frame != self.current_frame():
            self.update_probability_map()  # the slider moved while this one ran

    def _frame_changed(self, event=None):
        if self._closed or self.worker is not None or self.table is None or not self.show_p.value:
            return
        if self.current_frame() != self._p_frame:
            self.update_probability_map()

    def _on_close(self, *_):
        """The dock widget is going (viewer closed): stop reacting, stop the workers."""
        self._closed = True
        try:
            self.viewer.dims.events.current_step.disconnect(self._frame_changed)
        except (TypeError, ValueError, RuntimeError):
            pass
        for worker in (self.worker, self.p_worker):
            if worker is not None:
                worker.quit()
