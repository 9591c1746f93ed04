"""The HDF5 movie format: exact round trip, one-line errors for bad files, TIFF/CSV export, simulate_to_file."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from decode_accel.data import export_tiff_and_csv, read_hdf5, simulate_to_file, write_hdf5
from decode_accel.data.hdf5 import FORMAT_VERSION
from decode_accel.errors import DecodeAccelError
from decode_accel.simulation.config import CameraConfig, FrameConfig, SimulationConfig

PX = 100.0
CAMERA = CameraConfig(preset="challenge2016").model_dump(mode="json")


def handmade_movie(n=5, c=1, h=12, w=16, seed=0, flat_bg=True):
    """A movie built by hand (no simulator): integer ADU frames, a known emitter table, a known background."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(90, 3000, size=(n, c, h, w)).astype(np.float32)
    bg = np.repeat(rng.uniform(10, 50, size=(n, c))[:, :, None, None], h, 2).repeat(w, 3).astype(np.float32)
    if not flat_bg:
        bg = bg * rng.uniform(0.5, 1.5, size=bg.shape).astype(np.float32)
    emitters = pd.DataFrame({
        "frame": [3, 0, 0, 4, 2],  # deliberately unsorted
        "x": [150.0, 250.5, 1010.0, 1.0, 1599.0],
        "y": [50.0, 1150.0, 625.25, 0.5, 1199.0],
        "z": [-300.0, 0.0, 120.0, 499.0, -1.5],
        "photons": [1000.0, 2500.0, 80.0, 5000.0, 333.0],
        "id": [7, 1, 2, 9, 4],
        "ratio": [0.3, 0.5, 0.9, 0.1, 0.6],
    })
    emitters["photons_ch1"] = emitters["photons"] * emitters["ratio"]
    emitters["photons_ch2"] = emitters["photons"] - emitters["photons_ch1"]
    return SimpleNamespace(frames_adu=torch.from_numpy(frames), bg=torch.from_numpy(bg), emitters=emitters)


def write_handmade(path, **kw):
    movie = handmade_movie(**kw)
    write_hdf5(path, movie, px_size=PX, camera=CAMERA, psf={"kind": "gaussian", "sigma": 1.0})
    return movie


def test_reading_back_gives_identical_frames_background_and_emitters(tmp_path):
    movie = write_handmade(tmp_path / "m.h5", c=2, flat_bg=False)
    back = read_hdf5(tmp_path / "m.h5")
    assert back.frames.dtype == np.uint16  # whole-number ADU inside 16 bit are stored as a camera would
    np.testing.assert_array_equal(back.frames.astype(np.float32), movie.frames_adu.numpy())
    np.testing.assert_array_equal(back.bg, movie.bg.numpy())
    expected = movie.emitters.sort_values("frame", kind="stable").reset_index(drop=True)
    for col in expected.columns:
        np.testing.assert_array_equal(back.emitters[col].to_numpy(), expected[col].to_numpy(), err_msg=col)
    assert back.px_size == PX and back.camera == CAMERA and back.psf == {"kind": "gaussian", "sigma": 1.0}
    assert back.format_version == FORMAT_VERSION and back.simulation_config is None


def test_flat_background_is_stored_per_frame_and_channel_and_float_frames_stay_float(tmp_path):
    movie = handmade_movie()
    movie.frames_adu = movie.frames_adu + 0.25  # not whole ADU: must not be rounded into uint16
    write_hdf5(tmp_path / "m.h5", movie, px_size=PX, camera=CAMERA)
    with h5py.File(tmp_path / "m.h5") as f:
        assert f["bg"].shape == (5, 1)
        assert f["frames"].dtype == np.float32
    back = read_hdf5(tmp_path / "m.h5")
    np.testing.assert_array_equal(back.frames, movie.frames_adu.numpy())
    np.testing.assert_array_equal(back.bg, movie.bg.numpy()[:, :, 0, 0])


def test_frames_in_photons_follow_the_emccd_inverse_of_design_md(tmp_path):
    write_handmade(tmp_path / "m.h5")
    back = read_hdf5(tmp_path / "m.h5")
    adu = back.frames.astype(np.float64)
    # DESIGN.md: (adu - baseline) * e_per_adu / em_gain / qe; the mean spurious charge (e-) is removed before / qe
    expected = ((adu - 100.0) * 45.0 / 300.0 - 0.002) / 0.9
    np.testing.assert_allclose(back.frames_photons().numpy(), expected, rtol=1e-5, atol=1e-4)


def test_simulation_config_and_its_physics_are_stored(tmp_path):
    cfg = SimulationConfig(frame=FrameConfig(height=16, width=16, px_size=117.0), camera=CameraConfig(kind="perfect"))
    write_hdf5(tmp_path / "m.h5", handmade_movie(h=16, w=16), cfg)
    back = read_hdf5(tmp_path / "m.h5")
    assert back.px_size == 117.0
    assert back.camera["kind"] == "perfect"
    assert SimulationConfig.model_validate(back.simulation_config) == cfg


def test_writing_is_atomic_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.h5"
    write_handmade(path)
    before = path.read_bytes()
    broken = handmade_movie()
    broken.emitters = broken.emitters.drop(columns=["photons"])
    with pytest.raises(DecodeAccelError, match="emitters/photons"):
        write_hdf5(path, broken, px_size=PX, camera=CAMERA)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.h5"]  # no temporary file left behind


def _corrupt(path, edit):
    with h5py.File(path, "r+") as f:
        edit(f)


def _replace(f, key, data):
    del f[key]
    f.create_dataset(key, data=data)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda f: f.__delitem__("frames"), ["frames", "missing dataset"]),
        (lambda f: f.__delitem__("bg"), ["bg", "missing dataset"]),
        (lambda f: f.__delitem__("emitters/x"), ["emitters/x", "missing"]),
        (lambda f: _replace(f, "frames", np.zeros((5, 12, 16), np.uint16)), ["frames", "shape (5, 12, 16)"]),
        (lambda f: _replace(f, "frames", np.zeros((5, 1, 12, 16), np.int8)), ["frames", "dtype int8"]),
        (lambda f: _replace(f, "frames", np.where(np.arange(5)[:, None, None, None] == 3, np.nan,
                                                  np.ones((5, 1, 12, 16))).astype(np.float32)),
         ["frames", "NaN", "frame 3"]),
        (lambda f: _replace(f, "bg", np.ones((4, 1), np.float32)), ["bg", "shape (4, 1)"]),
        (lambda f: _replace(f, "bg", -np.ones((5, 1), np.float32)), ["bg", "negative"]),
        (lambda f: _replace(f, "emitters/frame", np.array([0, 0, 2, 3, 9])), ["emitters/frame", "outside"]),
        (lambda f: _replace(f, "emitters/y", np.ones(3)), ["emitters", "different lengths"]),
        (lambda f: f.attrs.__setitem__("format_version", FORMAT_VERSION + 1), ["format_version", "newer",
                                                                                "upgrade decode_accel"]),
        (lambda f: f.attrs.__delitem__("px_size"), ["px_size"]),
        (lambda f: f.attrs.__setitem__("camera", "{not json"), ["camera", "JSON"]),
    ],
    ids=["no-frames", "no-bg", "no-emitter-column", "frames-3d", "frames-int8", "nan-frame", "bg-wrong-shape",
         "bg-negative", "emitter-frame-out-of-range", "ragged-columns", "newer-format", "no-px-size", "camera-not-json"],
)
def test_a_bad_file_gives_one_line_naming_the_file_and_the_problem(tmp_path, edit, words):
    path = tmp_path / "bad.h5"
    write_handmade(path)
    _corrupt(path, edit)
    with pytest.raises(DecodeAccelError) as info:
        read_hdf5(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message


def test_a_missing_file_or_a_non_hdf5_file_gives_one_line(tmp_path):
    with pytest.raises(DecodeAccelError, match="no such file"):
        read_hdf5(tmp_path / "absent.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DecodeAccelError, match="not an HDF5 file"):
        read_hdf5(tmp_path / "text.h5")


def test_tiff_holds_the_uint16_adu_and_the_csv_the_ground_truth_in_nm_with_1_based_frames(tmp_path):
    movie = write_handmade(tmp_path / "m.h5", c=1)
    tif, csv = export_tiff_and_csv(tmp_path / "m.h5", tmp_path / "m.tif", tmp_path / "gt.csv")
    stack = tifffile.imread(tif)
    assert stack.dtype == np.uint16
    np.testing.assert_array_equal(stack, movie.frames_adu.numpy()[:, 0].astype(np.uint16))
    gt = pd.read_csv(csv)
    assert list(gt.columns[:6]) == ["id", "frame", "x [nm]", "y [nm]", "z [nm]", "intensity [photon]"]
    expected = movie.emitters.sort_values("frame", kind="stable")
    np.testing.assert_array_equal(gt["frame"].to_numpy(), expected["frame"].to_numpy() + 1)
    np.testing.assert_allclose(gt["x [nm]"].to_numpy(), expected["x"].to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(gt["intensity [photon]"].to_numpy(), expected["photons"].to_numpy(), rtol=1e-9)
    # the offset column is the background of the emitter's frame (flat here), photons/px
    bg = movie.bg.numpy()[expected["frame"].to_numpy(), 0, 0, 0]
    np.testing.assert_allclose(gt["offset [photon]"].to_numpy(), bg, rtol=1e-6)


def test_two_channel_tiff_keeps_both_channels(tmp_path):
    movie = write_handmade(tmp_path / "m.h5", c=2)
    tif, _ = export_tiff_and_csv(tmp_path / "m.h5", tmp_path / "m.tif", tmp_path / "gt.csv")
    np.testing.assert_array_equal(tifffile.imread(tif), movie.frames_adu.numpy().astype(np.uint16))


def test_simulate_to_file_writes_a_readable_seeded_movie(tmp_path):
    cfg = SimulationConfig(frame=FrameConfig(height=16, width=16))
    a = read_hdf5(simulate_to_file(cfg, 4, tmp_path / "a.h5", seed=5))
    b = read_hdf5(simulate_to_file(cfg.model_dump(), 4, tmp_path / "b.h5", seed=5))
    assert a.frames.shape == (4, 1, 16, 16) and a.bg.shape == (4, 1)
    np.testing.assert_array_equal(a.frames, b.frames)
    pd.testing.assert_frame_equal(a.emitters, b.emitters)
    assert json.loads(json.dumps(a.simulation_config)) == cfg.model_dump(mode="json")
    with pytest.raises(DecodeAccelError, match="n_frames"):
        simulate_to_file(cfg, 0, tmp_path / "c.h5")
