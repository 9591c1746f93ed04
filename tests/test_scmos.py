"""Full-chip sCMOS maps: training crops a fresh region per sample, inference converts the movie's region."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.simulation import Camera, CameraConfig, SimulationConfig, Simulator


def _chip(tmp_path, H=48, W=64):
    rng = np.random.default_rng(0)
    offset = (100 + 3 * rng.random((H, W))).astype(np.float32)
    var = np.full((H, W), 4.0, np.float32)
    var[5, 7] = var[30, 50] = 2000.0  # hot pixels
    gain = (0.4 + 0.2 * rng.random((H, W))).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, offset_adu=offset, variance_adu2=var, e_per_adu=gain)
    return path, offset, var, gain


def test_npz_maps_load_and_invert_at_a_roi(tmp_path):
    path, offset, var, gain = _chip(tmp_path)
    cam = Camera(CameraConfig(kind="scmos", qe=1.0, scmos_maps=str(path)), (16, 16))
    assert cam.map_shape == (48, 64)
    r, c = 10, 20
    adu = torch.from_numpy(offset[r:r + 16, c:c + 16] + 30.0 / gain[r:r + 16, c:c + 16])[None]
    ph = cam.to_photons(adu, origin=(r, c))
    assert torch.allclose(ph, torch.full_like(ph, 30.0), atol=1e-3)
    # the same through the config's roi_origin, and through with_roi
    cam2 = Camera(CameraConfig(kind="scmos", qe=1.0, scmos_maps=str(path), roi_origin=(r, c)), (16, 16))
    assert torch.allclose(cam2.to_photons(adu), ph) and torch.allclose(cam.with_roi((r, c)).to_photons(adu), ph)


def test_a_movie_smaller_than_the_maps_needs_its_roi(tmp_path):
    path, *_ = _chip(tmp_path)
    cam = Camera(CameraConfig(kind="scmos", scmos_maps=str(path)), (16, 16))
    with pytest.raises(DecodeAccelError, match="roi_origin"):
        cam.to_photons(torch.zeros(1, 16, 16))
    with pytest.raises(DecodeAccelError, match="outside"):
        cam.to_photons(torch.zeros(1, 16, 16), origin=(40, 0))
    # a movie of the maps' size needs nothing
    assert cam.to_photons(torch.zeros(1, 48, 64)).shape == (1, 48, 64)


def test_bad_npz_is_one_line(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros((4, 4)), b=np.zeros((4, 4)))
    with pytest.raises(DecodeAccelError, match="x.npz.*offset_adu"):
        Camera(CameraConfig(kind="scmos", scmos_maps=str(tmp_path / "x.npz")), (4, 4))
    with pytest.raises(DecodeAccelError, match="not found"):
        Camera(CameraConfig(kind="scmos", scmos_maps=str(tmp_path / "missing.npz")), (4, 4))


def test_training_samples_draw_their_own_crop_of_the_chip(tmp_path):
    path, offset, var, gain = _chip(tmp_path)
    cfg = SimulationConfig(frame={"height": 16, "width": 16}, emitters={"emitters_per_frame": 0.0},
                           background={"uniform": (0.0, 0.0)},
                           camera={"kind": "scmos", "qe": 1.0, "scmos_maps": str(path)})
    sim = Simulator(cfg)
    b = sim.sample_windows(24, torch.Generator().manual_seed(0), with_adu=True)
    adu = b["frames_adu"][:, 0]  # (B, 3, 16, 16)
    # no light: ADU = floor(read noise) + offset; a sample's three frames share one crop of the offset map
    dark = adu.mean(1)  # (B, 16, 16)
    origins = []
    for k in range(dark.shape[0]):
        err = [(np.abs(dark[k].numpy() - offset[r:r + 16, c:c + 16]).mean(), r, c)
               for r in range(48 - 15) for c in range(64 - 15)]
        e, r, c = min(err)
        assert e < 2.0
        origins.append((r, c))
    assert len(set(origins)) > 12  # fresh crops, not one region
    # photons the network sees are converted with the same crop: centred on 0 (dark frames)
    assert abs(float(b["frames"].mean())) < 0.5
    # a movie remembers its crop and converts back with it
    movie = sim.sample(3, torch.Generator().manual_seed(1))
    again = sim.camera.to_photons(movie.frames_adu, origin=movie.roi_origin)
    assert torch.allclose(again, movie.frames_photons)


def test_fixed_roi_training_crop(tmp_path):
    path, offset, *_ = _chip(tmp_path)
    cfg = SimulationConfig(frame={"height": 16, "width": 16}, emitters={"emitters_per_frame": 0.0},
                           background={"uniform": (0.0, 0.0)},
                           camera={"kind": "scmos", "qe": 1.0, "scmos_maps": str(path), "roi_origin": (8, 40),
                                   "scmos_training_crop": "roi"})
    b = Simulator(cfg).sample_windows(8, torch.Generator().manual_seed(0), with_adu=True)
    dark = b["frames_adu"][:, 0].mean((0, 1)).numpy()
    assert np.abs(dark - offset[8:24, 40:56]).mean() < 1.0


def test_predict_converts_a_movie_with_its_region_of_the_chip(tmp_path):
    from decode_accel.inference.predict import predict
    from decode_accel.models.config import build_model

    path, offset, var, gain = _chip(tmp_path)
    cam = Camera(CameraConfig(kind="scmos", qe=1.0, scmos_maps=str(path)), (16, 16))
    torch.manual_seed(0)
    net = build_model({"architecture": "SigmaMUNet", "preset": "tiny", "z_enabled": False}).eval()
    r, c = 16, 32
    movie = (offset[r:r + 16, c:c + 16] + 5.0 / gain[r:r + 16, c:c + 16])[None].repeat(3, 0).astype(np.float32)
    with pytest.raises(DecodeAccelError, match="roi_origin"):
        predict(net, movie, camera=cam, px_size_nm=100.0, progress=False)
    seen = {}
    roi_cam = cam.with_roi((r, c))
    original = roi_cam.to_photons

    def spy(adu, origin=None):
        out = original(adu, origin)
        seen["photons"] = out
        return out

    roi_cam.to_photons = spy
    predict(net, movie, camera=roi_cam, px_size_nm=100.0, progress=False, threshold=0.99)
    assert torch.allclose(seen["photons"], torch.full_like(seen["photons"], 5.0), atol=1e-3)
