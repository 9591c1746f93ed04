"""A movie recorded on a region of the sCMOS chip: predict converts it with the matching crop of the
full-chip maps (``--camera-roi``, the camera's ``roi_origin`` or the file's Micro-Manager ROI), and a
region that does not fit the maps is a one-line error."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.simulation import Camera, CameraConfig, SimulationConfig
from decode_accel.simulation.camera import parse_roi

H_CHIP, W_CHIP = 48, 64


def _chip(tmp_path):
    rng = np.random.default_rng(1)
    offset = (100 + 20 * rng.random((H_CHIP, W_CHIP))).astype(np.float32)
    var = np.full((H_CHIP, W_CHIP), 4.0, np.float32)
    gain = (0.3 + 0.4 * rng.random((H_CHIP, W_CHIP))).astype(np.float32)
    path = tmp_path / "chip.npz"
    np.savez(path, offset_adu=offset, variance_adu2=var, e_per_adu=gain)
    return path, offset, gain


def _region(offset, gain, r, c, h=16, w=16, photons=40.0, frames=3):
    adu = offset[r:r + h, c:c + w] + photons / gain[r:r + h, c:c + w]
    return np.repeat(adu[None], frames, 0)


def test_for_movie_crops_the_maps_and_checks_the_region(tmp_path):
    path, offset, gain = _chip(tmp_path)
    cam = Camera(CameraConfig(kind="scmos", qe=1.0, scmos_maps=str(path)))
    r, c = 16, 32
    adu = torch.from_numpy(_region(offset, gain, r, c))
    roi_cam = cam.for_movie(16, 16, (r, c))
    assert roi_cam.roi_origin == (r, c) and cam.roi_origin is None  # a copy; the maps are shared
    assert torch.allclose(roi_cam.to_photons(adu), torch.full_like(adu, 40.0), atol=1e-3)
    # the wrong region gives other photons: the crop matters
    assert not torch.allclose(cam.for_movie(16, 16, (0, 0)).to_photons(adu), torch.full_like(adu, 40.0), atol=1.0)
    # the config's roi_origin is used when none is given, and a given one wins
    cfg_cam = Camera(CameraConfig(kind="scmos", qe=1.0, scmos_maps=str(path), roi_origin=(r, c)))
    assert cfg_cam.for_movie(16, 16) is cfg_cam
    assert cfg_cam.for_movie(16, 16, (0, 8)).roi_origin == (0, 8)
    # a movie of the maps' size needs nothing; a camera without maps is the same everywhere
    assert cam.for_movie(H_CHIP, W_CHIP) is cam
    flat = Camera(CameraConfig(kind="scmos", baseline=100.0, e_per_adu=0.5))
    assert flat.for_movie(16, 16, (5, 5)) is flat


@pytest.mark.parametrize("roi, match", [
    ((40, 0), r"16x16 px movie at \(row 40, col 0\) does not fit the 48x64 px sCMOS maps.*row 0\.\.32, col 0\.\.48"),
    ((0, 60), r"does not fit the 48x64 px sCMOS maps"),
    (None, r"--camera-roi.*place on the chip is unknown.*give --camera-roi ROW,COL.*camera.roi_origin"),
])
def test_a_region_that_does_not_fit_is_one_line(tmp_path, roi, match):
    path, *_ = _chip(tmp_path)
    cam = Camera(CameraConfig(kind="scmos", qe=1.0, scmos_maps=str(path)))
    with pytest.raises(DecodeAccelError, match=match) as err:
        cam.for_movie(16, 16, roi)
    assert "\n" not in str(err.value)


def test_maps_smaller_than_the_movie_and_bad_roi_text(tmp_path):
    path, *_ = _chip(tmp_path)
    cam = Camera(CameraConfig(kind="scmos", qe=1.0, scmos_maps=str(path)))
    with pytest.raises(DecodeAccelError, match="cover the movie"):
        cam.for_movie(64, 64)
    with pytest.raises(DecodeAccelError, match="cover the movie"):
        cam.for_movie(64, 64, (0, 0))
    assert parse_roi("16,32") == (16, 32) and parse_roi(" 3, 4") == (3, 4) and parse_roi(None) is None
    for bad in ("16", "a,b", "1,2,3"):
        with pytest.raises(DecodeAccelError, match="--camera-roi.*not ROW,COL"):
            parse_roi(bad)
    with pytest.raises(DecodeAccelError, match="negative"):
        parse_roi("-1,4")


def _export(tmp_path, maps):
    try:
        from decode_accel.export import export_model
    except ImportError:  # before the export module existed
        from decode_accel.hub import export_model
    from decode_accel.models import SigmaMUNet

    torch.manual_seed(0)
    cfg = SimulationConfig(frame=dict(height=16, width=16, px_size=100.0),
                           camera=dict(kind="scmos", qe=1.0, scmos_maps=str(maps)))
    return export_model(tmp_path / "export", SigmaMUNet.from_preset("tiny"), simulation_config=cfg)


def test_predict_uses_the_movies_region_of_the_chip(tmp_path, monkeypatch, capsys):
    from decode_accel.cli.predict import predict_main
    from decode_accel.inference.predict import predict

    path, offset, gain = _chip(tmp_path)
    export = _export(tmp_path, path)
    r, c = 16, 32
    movie = tmp_path / "roi.tif"
    tifffile.imwrite(movie, _region(offset, gain, r, c, frames=6).astype(np.uint16))
    seen = []
    original = Camera.to_photons

    def spy(self, adu, origin=None):
        out = original(self, adu, origin)
        seen.append((self.roi_origin, out))
        return out

    monkeypatch.setattr(Camera, "to_photons", spy)
    predict(export, movie, camera_roi=(r, c), progress=False, threshold=0.99)
    assert seen and all(o == (r, c) for o, _ in seen)
    # integer ADU: the photons are 40 up to the rounding of each pixel (< 1 ADU · e-/ADU)
    assert all(float((ph - 40.0).abs().max()) < 0.71 for _, ph in seen)

    out = tmp_path / "locs.csv"
    assert predict_main(["--model", str(export), "--input", str(movie), "--out", str(out), "--camera-roi", f"{r},{c}",
                         "--threshold", "0.99", "--no-progress"]) == 0
    assert out.exists()
    capsys.readouterr()
    for extra, match in ((["--camera-roi", "40,0"], "does not fit the 48x64 px sCMOS maps"),
                         ([], "place on the chip is unknown"),
                         (["--camera-roi", "x"], "not ROW,COL")):
        code = predict_main(["--model", str(export), "--input", str(movie), "--out", str(out), "--no-progress",
                             *extra])
        err = capsys.readouterr().err
        assert code == 2 and match in err and err.count("\n") == 1, (extra, err)


def test_predict_reads_the_region_from_micromanager_metadata(tmp_path, monkeypatch):
    import json

    from decode_accel.inference.predict import predict

    path, offset, gain = _chip(tmp_path)
    export = _export(tmp_path, path)
    r, c = 8, 40
    movie = tmp_path / "mm.tif"
    frames = _region(offset, gain, r, c, frames=6).astype(np.uint16)
    meta = json.dumps({"ROI": f"{c}-{r}-16-16"})
    tifffile.imwrite(movie, frames, extratags=[(51123, "s", 0, meta, True)])  # MicroManagerMetadata tag
    seen = []
    original = Camera.to_photons
    monkeypatch.setattr(Camera, "to_photons", lambda self, adu, origin=None: seen.append(self.roi_origin)
                        or original(self, adu, origin))
    predict(export, movie, progress=False, threshold=0.99)
    assert seen and set(seen) == {(r, c)}
