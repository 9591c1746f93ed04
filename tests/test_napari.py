"""The napari plugin, headless: the widget predicts on a simulated movie in a worker thread and its layers agree
with ``decode-accel predict``; the reader opens both output formats; errors and Cancel behave.

Runs under napari's own ``make_napari_viewer`` fixture, headless: napari draws with OpenGL, so the module
runs Qt's xcb platform on ``DISPLAY`` or on an ``Xvfb`` of its own (apt install xvfb) and skips when it
gets no OpenGL context (see ``_x_display``). Needs the ``napari`` extra (``pip install -e ".[napari]"``);
skipped without napari.

``DECODE_ACCEL_WRITE_DOCS=1`` also writes the screenshot of the oracle test to docs/napari_plugin.png
(the README's picture).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from decode_accel.hub import ExportedModel, export_model  # noqa: E402
from decode_accel.inference.predict import predict, predict_main  # noqa: E402
from decode_accel.inference.render import render  # noqa: E402
from decode_accel.io import read_table  # noqa: E402
from decode_accel.models import SigmaMUNet  # noqa: E402
from decode_accel.napari import _widget, run  # noqa: E402
from decode_accel.napari._reader import get_reader  # noqa: E402
from decode_accel.napari._widget import PredictWidget  # noqa: E402
from decode_accel.simulation.config import SimulationConfig  # noqa: E402
from tests.numerics import randomize_output_layers  # noqa: E402
from tests.test_predict import CentroidOracle, greedy_match, isolated_inside, simulate  # noqa: E402

DOCS_PNG = Path(__file__).resolve().parents[1] / "docs" / "napari_plugin.png"
WAIT_MS = 120_000

_GL_PROBE = """
from qtpy import API_NAME
from qtpy.QtWidgets import QApplication
app = QApplication([])
from vispy import app as vispy_app
vispy_app.use_app(API_NAME.lower())  # the binding napari and pytest-qt will use (QT_API)
from vispy.gloo import gl
canvas = vispy_app.Canvas(show=False, size=(8, 8))
canvas.set_current()
assert gl.glGetParameter(gl.GL_EXTENSIONS), "no OpenGL (napari's canvas would fail)"
"""


def _gl_problem(env, tries: int = 3) -> str | None:
    """Why napari's canvas cannot get OpenGL (None: it can); retried, as a just-started Xvfb may refuse a client."""
    why = None
    for _ in range(tries):
        probe = subprocess.run([sys.executable, "-c", _GL_PROBE], env=env, capture_output=True, timeout=120, text=True)
        if probe.returncode == 0:
            return None
        why = (probe.stderr.strip().splitlines() or ["?"])[-1]
        time.sleep(2.0)
    return why


def _x_display_answers(display: str) -> bool:
    """Whether an X client can open ``display`` (libX11's XOpenDisplay; no Qt involved)."""
    try:
        import ctypes
        x11 = ctypes.CDLL("libX11.so.6")
    except OSError:
        return os.path.exists(f"/tmp/.X11-unix/X{display.lstrip(':')}")
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    handle = x11.XOpenDisplay(display.encode())
    if handle:
        x11.XCloseDisplay(handle)
    return bool(handle)


def _start_xvfb():
    """Start Xvfb on a display of its own; returns (its watchdog process, ':N') or (None, None).

    The display number is chosen here (not with -displayfd, which handed out a display that other
    X servers on this machine were starting and stopping too) and the server is used once a client
    can open it."""
    if not shutil.which("Xvfb"):
        return None, None
    rng = np.random.default_rng()
    for _ in range(5):
        number = int(rng.integers(200, 60000))
        if os.path.exists(f"/tmp/.X11-unix/X{number}") or os.path.exists(f"/tmp/.X{number}-lock"):
            continue
        display = f":{number}"
        # Xvfb outlives the tests until this process has exited: Qt keeps its X connection to the end, and
        # libX11 ends a process whose server goes away with exit status 1
        watch = (f'Xvfb {display} -screen 0 1600x1000x24 -nolisten tcp >/dev/null 2>&1 & x=$!; '
                 f'while kill -0 {os.getpid()} 2>/dev/null && kill -0 $x 2>/dev/null; do sleep 1; done; kill $x')
        proc = subprocess.Popen(["sh", "-c", watch], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if _x_display_answers(display):
                return proc, display
            time.sleep(0.2)
        proc.kill()
        proc.wait()
    return None, None


@pytest.fixture(scope="session", autouse=True)
def _x_display():
    """An X display with OpenGL for napari's canvas (session-scoped and autouse: before pytest-qt's QApplication).

    Qt's ``offscreen`` platform makes an OpenGL context through GLX but napari's canvas draws black in it
    (Mesa llvmpipe, Qt 5.15 and 6.11), so the tests run Qt's ``xcb`` platform on an X server: ``DISPLAY``
    if set, else an Xvfb of their own. Without either they skip."""
    xvfb, saved = None, os.environ.get("DISPLAY")
    if not saved:
        xvfb, display = _start_xvfb()
        if display:
            os.environ["DISPLAY"] = display
    platform = os.environ.get("QT_QPA_PLATFORM")
    os.environ["QT_QPA_PLATFORM"] = "xcb" if os.environ.get("DISPLAY") else "offscreen"
    try:
        why = _gl_problem(dict(os.environ), tries=3 if xvfb is not None else 1)
        if why:
            pytest.skip(f"no X display with OpenGL for napari's canvas (install Xvfb): {why}")
        yield
    finally:
        if platform is None:
            os.environ.pop("QT_QPA_PLATFORM", None)
        else:
            os.environ["QT_QPA_PLATFORM"] = platform
        if xvfb is not None and saved is None:
            os.environ.pop("DISPLAY", None)  # the server itself stops when this process has exited


# ------------------------------------------------------------------------------------ models
def noisy_export(tmp_path, threshold=0.6):
    """A tiny network with random output layers (many candidates), exported with an operating point."""
    torch.manual_seed(0)
    net = randomize_output_layers(SigmaMUNet.from_preset("tiny", z_enabled=False), seed=1)
    with torch.no_grad():
        net.heads["p"][-1].bias.fill_(-1.0)
    sim = SimulationConfig(frame={"height": 32, "width": 40, "px_size": 100.0}, camera={"preset": "challenge2016"},
                           psf={"kind": "gaussian", "sigma": 1.0}, emitters={"z_range": [0.0, 0.0]})
    return export_model(tmp_path / "export", net.eval(), simulation_config=sim,
                        operating_point={"threshold": threshold, "chosen_on": "a test"})


def oracle_model(camera, threshold=0.5):
    """A localizer that is right by construction (tests.test_predict.CentroidOracle) as an ExportedModel."""
    return ExportedModel(model=CentroidOracle(), metadata={}, camera=camera, px_size_nm=100.0, n_channels=1,
                         dye_table=None, operating_point={"threshold": threshold})


def open_widget(viewer, tif):
    """Open the movie with napari's own reader and the widget as a user does (Plugins menu, via napari.yaml)."""
    layer = viewer.open(str(tif), plugin="napari")[0]
    _, widget = viewer.window.add_plugin_dock_widget("decode_accel", "Predict localizations")
    assert isinstance(widget, PredictWidget)
    widget.image.value = layer
    return widget, layer


def wait_done(qtbot, widget):
    qtbot.waitUntil(lambda: widget.worker is None and widget.p_worker is None, timeout=WAIT_MS)


def points_of(table: pd.DataFrame) -> np.ndarray:
    return table[["frame", "y", "x"]].to_numpy(np.float64)


# ------------------------------------------------------------------------------------ tests
def test_widget_agrees_with_the_cli_and_the_reader_opens_both_of_its_files(make_napari_viewer, qtbot, tmp_path,
                                                                            monkeypatch, capsys):
    export = noisy_export(tmp_path)
    tif, _, _ = simulate(tmp_path, n_frames=40)
    csv, h5 = tmp_path / "cli.csv", tmp_path / "cli.hdf5"
    assert predict_main(["--model", str(export), "--input", str(tif), "--out", str(csv), "--out", str(h5),
                         "--no-progress"]) == 0
    api = predict(export, tif, progress=False)  # what the CLI wrote, before rounding in the CSV
    monkeypatch.setattr(run, "CHUNK_PX", 16 * 32 * 40)  # 16-frame chunks: 3 predict calls meet at two seams

    viewer = make_napari_viewer(show=True)  # a hidden canvas draws nothing
    widget, movie = open_widget(viewer, tif)
    widget.model.value = export
    seen = []
    widget.progress.changed.connect(lambda v: seen.append(v))
    assert widget.run() is not None
    wait_done(qtbot, widget)
    assert widget.error is None, widget.error
    assert widget.threshold.value == pytest.approx(0.6)  # the model's own threshold, shown after loading
    assert seen[-1] == 40 and {16, 32} <= set(seen)  # the bar moved chunk by chunk

    points = viewer.layers[f"{movie.name} localizations"]
    assert len(points.data) == len(api) == len(read_table(csv)) > 20
    np.testing.assert_allclose(points.data, points_of(api), atol=1e-6)
    np.testing.assert_allclose(points.features["prob"], api["prob"], atol=1e-6)
    assert points.features["prob"].min() >= 0.6
    for col in ("photons", "x_sigma", "y_sigma", "uncertainty"):
        assert col in points.features.columns
    # the movie is placed in nm: pixel (i, j) centre at ((i + .5) px, (j + .5) px)
    np.testing.assert_allclose(movie.data_to_world((0, 2, 3))[1:], (250.0, 350.0))
    rendered = viewer.layers[f"{movie.name} render"]
    np.testing.assert_allclose(rendered.data, render(api, px_size_nm=10.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rendered.data_to_world((0, 0)), (5.0, 5.0))

    for path in (csv, h5):
        assert get_reader(str(path)) is not None
        layer = viewer.open(str(path), plugin="decode_accel")[0]
        assert layer._type_string == "points" and len(layer.data) == len(api)
        np.testing.assert_allclose(layer.data, points_of(api), atol=0.01)  # nm; the files round a little
        np.testing.assert_allclose(layer.features["prob"], api["prob"], atol=1e-4)
    assert viewer.layers["cli"].metadata["px_size_nm"] in (None, 100.0)


def test_localizations_line_up_with_the_emitters_and_a_screenshot_is_taken(make_napari_viewer, qtbot, tmp_path):
    tif, sim_movie, camera = simulate(tmp_path, n_frames=60)
    viewer = make_napari_viewer(show=True)  # a hidden canvas draws nothing
    widget, movie = open_widget(viewer, tif)
    widget.show_p.value = True
    viewer.dims.set_current_step(0, 7)
    widget.run(model=oracle_model(camera))
    wait_done(qtbot, widget)
    assert widget.error is None, widget.error
    table = widget.table
    points = viewer.layers[f"{movie.name} localizations"]
    np.testing.assert_allclose(points.data, points_of(table))

    # as tests/test_predict.py judges the oracle: recall on bright isolated emitters, precision on all
    em = sim_movie.emitters
    bright = em[(em["photons"] > 1500) & isolated_inside(em, 32 * 100.0, 40 * 100.0)]
    d, _ = greedy_match(bright, table)
    all_d, n_found = greedy_match(em, table)
    assert len(d) > 0.9 * len(bright) and len(all_d) > 0.9 * n_found, (len(d), len(bright), len(all_d), n_found)
    # a half-pixel shift or an x/y swap between the layers and the movie would be a 50-100 nm bias
    assert np.abs(d.mean(axis=0)).max() < 15.0 and np.sqrt((d ** 2).sum(axis=1).mean()) < 40.0

    # the probability map of frame 7 peaks on the emitters of frame 7, in the same nm coordinates
    p_layer = viewer.layers[f"{movie.name} p"]
    assert p_layer.metadata["frame"] == 7
    i, j = np.unravel_index(np.argmax(p_layer.data), p_layer.data.shape)
    y, x = p_layer.data_to_world((i, j))
    here = table[table["frame"] == 7]
    assert np.hypot(here["x"] - x, here["y"] - y).min() < 100.0

    wait_done(qtbot, widget)  # a slider move may have asked for another probability map
    shot = screenshot(viewer, widget, movie.name, tmp_path / "napari.png")
    assert shot.shape[0] >= 400 and shot[..., :3].std() > 0.05
    if os.environ.get("DECODE_ACCEL_WRITE_DOCS"):
        DOCS_PNG.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "napari.png", DOCS_PNG)


def screenshot(viewer, widget, name, path):
    """One picture: the frame under the slider with its localizations and probability map | the render | the widget.

    The canvas panels come from ``viewer.screenshot(canvas_only=True)`` (OpenGL); the widget from Qt's grab."""
    from matplotlib import image as mpl_image

    layers = {k: viewer.layers[f"{name}{k}"] for k in ("", " localizations", " p", " render")}

    def canvas(visible):
        for key, layer in layers.items():
            layer.visible = key in visible
        viewer.reset_view()
        return viewer.screenshot(canvas_only=True, size=(560, 700), flash=False)[..., :3] / 255.0

    frame_view = canvas(("", " localizations", " p"))
    render_view = canvas((" render",))
    for layer in layers.values():
        layer.visible = True
    grab = path.with_name("widget.png")
    widget.native.grab().save(str(grab))
    panel = mpl_image.imread(grab)[..., :3]
    h = max(frame_view.shape[0], panel.shape[0])

    def pad(img):
        out = np.full((h, img.shape[1], 3), 0.15)
        out[:img.shape[0]] = img
        return out

    gap = np.full((h, 8, 3), 0.15)
    picture = np.concatenate([pad(frame_view), gap, pad(render_view), gap, pad(panel)], axis=1)
    mpl_image.imsave(path, np.clip(picture, 0, 1))
    return picture


def test_errors_are_the_clis_one_line_and_cancel_adds_nothing(make_napari_viewer, qtbot, tmp_path, monkeypatch,
                                                             capsys):
    tif, _, camera = simulate(tmp_path, n_frames=48)
    viewer = make_napari_viewer(show=True)  # a hidden canvas draws nothing
    widget, movie = open_widget(viewer, tif)

    missing = tmp_path / "no_such_export"
    assert predict_main(["--model", str(missing), "--input", str(tif), "--out", str(tmp_path / "x.csv")]) == 2
    cli_line = capsys.readouterr().err.strip()
    widget.model.value = missing
    widget.run()
    wait_done(qtbot, widget)
    assert widget.error == cli_line and widget.status.value == cli_line
    assert cli_line.startswith("error: ") and "\n" not in cli_line

    monkeypatch.setattr(run, "CHUNK_PX", 16 * 32 * 40)  # 3 chunks
    worker = widget.run(model=oracle_model(camera))
    worker.yielded.connect(lambda p: p.done > 0 and widget.cancel())  # cancel after the first chunk
    wait_done(qtbot, widget)
    assert widget.status.value == "cancelled"
    assert f"{movie.name} localizations" not in viewer.layers and widget.table is None
    assert widget.run_button.enabled and not widget.cancel_button.enabled
