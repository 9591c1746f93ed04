"""The napari plugin, headless: the widget predicts on a simulated movie in a worker thread and its layers agree
with ``decode-accel predict``; the reader opens both output formats; errors and Cancel behave; a two-channel
model colours its points by dye; a Hub id runs offline from the local Hugging Face cache.

Runs under napari's own ``make_napari_viewer`` fixture, headless: napari draws with OpenGL, so the module
runs Qt's xcb platform on ``DISPLAY`` or on an ``Xvfb`` of its own and skips when it gets no OpenGL context
(see ``_x_display``). Needs the ``napari`` extra and, on a machine without a desktop, Xvfb and the xcb
libraries: ``scripts/bootstrap.sh`` (so ``scripts/test.sh``) installs the extra, and as root the Debian
packages (``NAPARI_DEBS``); whatever is missing, the module skips and its reason names it.

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

SETUP_HINT = "scripts/bootstrap.sh installs it (the Debian packages as root)"
if os.environ.get("DECODE_ACCEL_NAPARI_SKIP"):  # scripts/test.sh found that napari cannot load here
    pytest.skip(os.environ["DECODE_ACCEL_NAPARI_SKIP"], allow_module_level=True)
try:
    import napari
    import pytestqt  # noqa: F401
except (ImportError, OSError) as exc:  # OSError: vispy without libGL ("GL ES 2.0 library not found")
    pytest.skip(f"the napari extra cannot be imported ({type(exc).__name__}: {exc}); pip install -e '.[napari]' "
                f"or {SETUP_HINT}", allow_module_level=True)

from decode_accel.hub import ExportedModel, export_model  # noqa: E402
from decode_accel.cli.predict import predict_main  # noqa: E402
from decode_accel.inference.predict import predict  # noqa: E402
from decode_accel.inference.render import render  # noqa: E402
from decode_accel.io import read_table  # noqa: E402
from decode_accel.models import DoubleMUNet, SigmaMUNet  # noqa: E402
from decode_accel.napari import _widget, run  # noqa: E402
from decode_accel.napari._reader import get_reader  # noqa: E402
from decode_accel.napari._widget import PredictWidget  # noqa: E402
from decode_accel.napari.layers import DYE_COLORS, UNASSIGNED_COLOR  # noqa: E402
from decode_accel.simulation import Simulator  # noqa: E402
from decode_accel.simulation.config import SimulationConfig  # noqa: E402
from tests.numerics import randomize_output_layers  # noqa: E402
from tests.test_predict import PX, CentroidOracle, greedy_match, isolated_inside, simulate  # noqa: E402

DOCS_PNG = Path(__file__).resolve().parents[1] / "docs" / "napari_plugin.png"
WAIT_MS = 120_000
#: two computations of one table agree to a few float32 ulps of a position (1 ulp at 4 um: 2.4e-4 nm)
POSITION_ULPS_NM = 1e-3

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


def _missing_qt_libraries() -> list[str]:
    """The shared libraries Qt's xcb platform plugin links against that the system lacks (from ldd)."""
    try:
        import PyQt5
        plugin = Path(PyQt5.__file__).parent / "Qt5" / "plugins" / "platforms" / "libqxcb.so"
        out = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True, timeout=30).stdout
    except (ImportError, OSError, subprocess.SubprocessError):
        return []
    return sorted({line.split()[0] for line in out.splitlines() if "not found" in line})


def _gl_problem(env, tries: int = 3) -> str | None:
    """Why napari's canvas cannot get OpenGL (None: it can); retried, as a just-started Xvfb may refuse a client."""
    why = None
    for _ in range(tries):
        try:
            probe = subprocess.run([sys.executable, "-c", _GL_PROBE], env=env, capture_output=True, timeout=90,
                                   text=True)
        except subprocess.TimeoutExpired:
            return "a Qt + OpenGL test window did not open within 90 s"
        if probe.returncode == 0:
            return None
        why = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        time.sleep(2.0)
    missing = _missing_qt_libraries()
    if missing:
        why += f"; Qt's xcb plugin lacks {', '.join(missing)}"
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
    for _ in range(3):
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
        deadline = time.monotonic() + 20  # a server that does not answer by then is given up: no hanging run
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
        if not shutil.which("Xvfb"):
            pytest.skip(f"no X display for napari's canvas: DISPLAY is unset and Xvfb is not installed (Debian "
                        f"package xvfb; {SETUP_HINT})")
        xvfb, display = _start_xvfb()
        if not display:
            pytest.skip("no X display for napari's canvas: Xvfb did not start (3 tries of 20 s)")
        os.environ["DISPLAY"] = display
    platform = os.environ.get("QT_QPA_PLATFORM")
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    try:
        why = _gl_problem(dict(os.environ), tries=3 if xvfb is not None else 1)
        if why:
            pytest.skip(f"no OpenGL window on the X display {os.environ['DISPLAY']} for napari's canvas: {why} "
                        f"({SETUP_HINT})")
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


class RatioOracle(torch.nn.Module):
    """Two-channel CentroidOracle: detects and localizes on the sum of the channels, counts each channel's
    photons in the same 5x5 box, and reports their fraction as the ratio (right by construction)."""

    size_multiple = 1
    in_channels = 2

    def __init__(self):
        super().__init__()
        self.centroid = CentroidOracle()

    def forward(self, frames):  # (n, 2, 3, H, W) photons
        out = self.centroid(frames.sum(dim=1, keepdim=True))
        x = frames[:, :, 1]
        n, c, h, w = x.shape
        s = (x - x.flatten(2).median(2).values[:, :, None, None]).reshape(n * c, 1, h, w)
        per_channel = torch.nn.functional.conv2d(s, torch.ones(1, 1, 5, 5, dtype=s.dtype), padding=2)
        per_channel = per_channel.reshape(n, c, h, w).clamp_min(0.0)
        total = per_channel.sum(1).clamp_min(1.0)
        const = torch.ones_like(out["p"])
        return dict(out, photons_ch1=per_channel[:, 0], photons_ch2=per_channel[:, 1],
                    ratio=(per_channel[:, 0] / total).clamp(1e-3, 1 - 1e-3), ratio_sigma=0.02 * const,
                    photons_ch1_sigma=50 * const, photons_ch2_sigma=50 * const)


#: the two dyes of the two-channel movie: 20 % and 80 % of their photons in channel 1
DYES = [dict(ratio_mean=0.2, ratio_sd=0.02), dict(ratio_mean=0.8, ratio_sd=0.02)]


def simulate_two_channel(tmp_path, n_frames=24, height=32, width=40):
    """A small ratiometric movie, one TIFF per channel (ch1.tif, ch2.tif), and its simulation config."""
    cfg = SimulationConfig(
        frame=dict(height=height, width=width, px_size=PX),
        emitters=dict(emitters_per_frame=2.0, photons_mean=6000.0, photons_sd=300.0, z_range=(0.0, 0.0),
                      on_time_mean=2.0),
        psf=dict(kind="gaussian", sigma=1.0), background=dict(uniform=(20.0, 20.0)),
        camera=dict(preset="challenge2016"), channels=dict(n_channels=2, dyes=DYES))
    sim = Simulator(cfg)
    movie = sim.sample(n_frames, torch.Generator().manual_seed(0))
    paths = []
    for c in range(2):
        paths.append(tmp_path / f"ch{c + 1}.tif")
        tifffile.imwrite(paths[-1], movie.frames_adu[:, c].numpy().astype(np.uint16), photometric="minisblack")
    return paths, movie, sim.camera, cfg


def two_channel_export(tmp_path, sim_config, threshold=0.6):
    """A tiny two-channel network (DoubleMUNet) with random output layers, exported with the dye table."""
    torch.manual_seed(0)
    net = randomize_output_layers(DoubleMUNet.from_preset("tiny", z_enabled=False), seed=1)
    with torch.no_grad():
        net.heads["p"][-1].bias.fill_(-1.0)
    return export_model(tmp_path / "export2", net.eval(), simulation_config=sim_config,
                        operating_point={"threshold": threshold, "chosen_on": "a test"})


def open_widget(viewer, tif, tif2=None):
    """Open the movie with napari's own reader and the widget as a user does (Plugins menu, via napari.yaml)."""
    layer = viewer.open(str(tif), plugin="napari")[0]
    _, widget = viewer.window.add_plugin_dock_widget("decode_accel", "Predict localizations")
    assert isinstance(widget, PredictWidget)
    widget.image.value = layer
    if tif2 is not None:
        widget.image2.value = viewer.open(str(tif2), plugin="napari")[0]
    return widget, layer


def last_error_line(stderr: str) -> str:
    """The CLI's error line in what it wrote to stderr (Python warnings may come before it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert lines, stderr
    return lines[-1]


def rgba(colors) -> np.ndarray:
    from matplotlib.colors import to_rgba_array
    return to_rgba_array(colors)


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
    # the widget's 16-frame chunks batch the frames differently from one predict call, so the float32 maps may
    # differ in their last bit: 1 ulp of a float32 position near 4 um is 2.4e-4 nm (seen in a full-suite run)
    np.testing.assert_allclose(points.data, points_of(api), atol=POSITION_ULPS_NM)
    np.testing.assert_allclose(points.features["prob"], api["prob"], atol=1e-6)
    assert points.features["prob"].min() >= 0.6
    for col in ("photons", "x_sigma", "y_sigma", "uncertainty"):
        assert col in points.features.columns
    # the movie is placed in nm: pixel (i, j) centre at ((i + .5) px, (j + .5) px)
    np.testing.assert_allclose(movie.data_to_world((0, 2, 3))[1:], (250.0, 350.0))
    rendered = viewer.layers[f"{movie.name} render"]
    np.testing.assert_allclose(rendered.data, render(widget.table, px_size_nm=10.0), rtol=1e-5, atol=1e-6)
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
    cli_line = last_error_line(capsys.readouterr().err)
    widget.model.value = missing
    widget.run()
    wait_done(qtbot, widget)
    assert widget.error == cli_line and widget.status.value == cli_line
    assert cli_line.startswith("error: ") and "\n" not in cli_line

    monkeypatch.setattr(run, "CHUNK_PX", 16 * 32 * 40)  # 3 chunks
    slow = oracle_model(camera)
    fast_forward = slow.model.forward

    def slow_forward(*args, **kwargs):
        # each batch takes a while, so that the cancel sent on the first chunk's progress signal reaches
        # the worker before the last chunk starts, however fast the machine (without it the test raced)
        time.sleep(0.3)
        return fast_forward(*args, **kwargs)

    slow.model.forward = slow_forward
    worker = widget.run(model=slow)
    worker.yielded.connect(lambda p: p.done > 0 and widget.cancel())  # cancel after the first chunk
    wait_done(qtbot, widget)
    assert widget.status.value == "cancelled"
    assert f"{movie.name} localizations" not in viewer.layers and widget.table is None
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_a_two_channel_model_colours_the_points_by_dye(make_napari_viewer, qtbot, tmp_path):
    """Ratiometric: two channel layers in, one points layer out, each point in its dye's colour. A tiny
    DoubleMUNet export agrees with the CLI row for row; the two-channel oracle's colours are the true dyes."""
    (ch1, ch2), sim_movie, camera, cfg = simulate_two_channel(tmp_path)
    export = two_channel_export(tmp_path, cfg)
    csv = tmp_path / "cli.csv"
    assert predict_main(["--model", str(export), "--input", str(ch1), "--input", str(ch2), "--out", str(csv),
                         "--no-progress"]) == 0
    cli = read_table(csv)
    assert "color" in cli.columns and len(cli) > 20

    viewer = make_napari_viewer(show=True)
    widget, movie = open_widget(viewer, ch1, ch2)
    assert widget.color_by.value == "auto"  # by dye for a two-channel model, by probability otherwise
    widget.show_p.value = True
    widget.model.value = export
    widget.run()
    wait_done(qtbot, widget)
    assert widget.error is None, widget.error
    points = viewer.layers[f"{movie.name} localizations"]
    assert len(points.data) == len(cli) == len(widget.table)
    np.testing.assert_allclose(points.data, points_of(cli), atol=0.01)
    np.testing.assert_array_equal(widget.table["color"], cli["color"])
    names = np.array(["unassigned" if c < 0 else f"dye{c}" for c in cli["color"]])  # the export's dye names
    np.testing.assert_array_equal(points.features["dye"], names)
    legend = points.metadata["dye_colors"]
    assert points.metadata["color_by"] == "dye" and legend["dye0"] == DYE_COLORS[0] and legend["dye1"] == DYE_COLORS[1]
    np.testing.assert_allclose(points.face_color, rgba([legend[d] for d in names]), atol=1e-6)
    for col in ("ratio", "photons_ch1", "photons_ch2", "color_prob"):
        assert col in points.features.columns
    # both channel layers are placed in nm; the probability map is one (H, W) image of the pair
    for layer in (movie, widget.image2.value):
        np.testing.assert_allclose(layer.data_to_world((0, 2, 3))[1:], (250.0, 350.0))
    assert viewer.layers[f"{movie.name} p"].data.shape == (32, 40)

    widget.show_p.value = False
    oracle = ExportedModel(model=RatioOracle(), metadata={}, camera=camera, px_size_nm=PX, n_channels=2,
                           dye_table=[{"name": "green", "ratio": 0.2, "ratio_sd": 0.02, "prob": 1.0},
                                      {"name": "red", "ratio": 0.8, "ratio_sd": 0.02, "prob": 1.0}],
                           operating_point={"threshold": 0.5})
    widget.run(model=oracle)
    wait_done(qtbot, widget)
    assert widget.error is None, widget.error
    table = widget.table
    points = viewer.layers[f"{movie.name} localizations"]
    assert len(points.data) == len(table) > 20
    # each bright isolated emitter is found, with the colour of its true dye
    em = sim_movie.emitters
    bright = em[(em["photons"] > 3000) & isolated_inside(em, 32 * PX, 40 * PX)].reset_index(drop=True)
    true_dye, found_dye, colours, expected = [], [], [], []
    for _, e in bright.iterrows():
        here = np.flatnonzero(table["frame"].to_numpy() == e["frame"])
        if not len(here):
            continue
        k = here[np.argmin(np.hypot(table["x"].to_numpy()[here] - e["x"], table["y"].to_numpy()[here] - e["y"]))]
        if np.hypot(table["x"].iloc[k] - e["x"], table["y"].iloc[k] - e["y"]) < 150.0:
            true_dye.append(["green", "red"][int(e["color"])])
            found_dye.append(points.features["dye"].iloc[k])
            colours.append(points.face_color[k])
            expected.append(DYE_COLORS[int(e["color"])])
    assert len(true_dye) > 0.9 * len(bright) and len(bright) > 15, (len(true_dye), len(bright))
    assert {"green", "red"} <= set(true_dye)
    assert np.mean(np.array(found_dye) == np.array(true_dye)) > 0.95, list(zip(true_dye, found_dye))
    agree = np.array(found_dye) == np.array(true_dye)
    np.testing.assert_allclose(np.array(colours)[agree], rgba(np.array(expected)[agree]), atol=1e-6)
    unassigned = (points.features["dye"] == "unassigned").to_numpy()
    np.testing.assert_allclose(points.face_color[unassigned], rgba([UNASSIGNED_COLOR] * int(unassigned.sum())))


def hub_cache(root: Path, export: Path, repo_id: str) -> tuple[Path, Path]:
    """Put an export folder into a Hugging Face cache as ``snapshot_download`` leaves it: content-addressed
    files under ``blobs/``, ``snapshots/<commit>/`` of relative links to them, ``refs/main`` naming the commit.
    Returns (the hub cache folder, the snapshot folder)."""
    import hashlib
    hub = root / "hub"
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for f in sorted(export.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / f.relative_to(export)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return hub, snapshot


def test_a_hub_id_runs_offline_from_the_local_cache(make_napari_viewer, qtbot, tmp_path, monkeypatch, capsys):
    """A Hub id typed into the model field is read from the local Hugging Face cache with HF_HUB_OFFLINE=1:
    the same table as the export folder it came from, and no connection attempted. An id that is not in
    the cache is the CLI's one-line error."""
    import socket

    import huggingface_hub.constants as hf_constants

    export = noisy_export(tmp_path)
    tif, _, _ = simulate(tmp_path, n_frames=20)
    hub, snapshot = hub_cache(tmp_path / "hf", export, "someone/tiny-decode")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment when it is imported: set what it read, too
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    expected = predict(export, tif, progress=False)
    connections = []

    def no_network(sock, address, *args, **kwargs):
        connections.append(address)
        raise OSError(f"test: no network ({address})")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)

    viewer = make_napari_viewer(show=True)
    widget, movie = open_widget(viewer, tif)
    widget.model.line_edit.value = "someone/tiny-decode"  # typed, as a user does
    widget.run()
    wait_done(qtbot, widget)
    assert widget.error is None, widget.error
    assert Path(widget.exported.path).resolve() == snapshot.resolve()
    assert widget.threshold.value == pytest.approx(0.6)  # the export's own threshold came with it
    points = viewer.layers[f"{movie.name} localizations"]
    assert len(points.data) == len(expected) > 10
    np.testing.assert_allclose(points.data, points_of(expected), atol=POSITION_ULPS_NM)

    assert predict_main(["--model", "someone/not-cached", "--input", str(tif), "--out", str(tmp_path / "x.csv")]) == 2
    cli_line = last_error_line(capsys.readouterr().err)
    widget.model.line_edit.value = "someone/not-cached"
    widget.run()
    wait_done(qtbot, widget)
    assert widget.error == cli_line and "someone/not-cached" in cli_line and "\n" not in cli_line
    assert connections == []
