"""predict(): simulated movie -> table that matches the truth; caching, tiling, resume, files, errors."""

from __future__ import annotations

import importlib

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import torch.nn.functional as F
import yaml

from decode_accel.errors import DecodeAccelError
from decode_accel.inference.predict import predict
from decode_accel.models import SigmaMUNet
from decode_accel.simulation import SimulationConfig, Simulator
from tests.numerics import MapRecorder, assert_maps_close, identity_camera, randomize_output_layers

PX = 100.0
# the module, not the function of the same name that decode_accel.inference re-exports
predict_module = importlib.import_module("decode_accel.inference.predict")


class CentroidOracle(torch.nn.Module):
    """A localizer that is right by construction: background-subtracted 5x5 centroids at local maxima.

    It speaks the model contract (3-frame windows in photons -> maps in physical units), so it
    exercises everything predict() does around a network: ADU -> photons, windows, post-processing,
    pixel -> nm conversion. It has no stage-1 cache, so predict falls back to plain windows.
    """

    size_multiple = 1
    in_channels = 1

    def __init__(self, min_photons: float = 800.0):
        super().__init__()
        self.min_photons = min_photons
        self.calls = 0

    def forward(self, frames):
        self.calls += frames.shape[0]
        x = frames[:, 0, 1]
        bg = x.flatten(1).median(1).values[:, None, None]
        s = (x - bg)[:, None]
        box = torch.ones(1, 1, 5, 5, dtype=s.dtype)
        grid = torch.arange(-2.0, 3.0, dtype=s.dtype)
        total = F.conv2d(s, box, padding=2)
        dx = (F.conv2d(s, box * grid[None, :], padding=2) / total.clamp_min(1.0))[:, 0]
        dy = (F.conv2d(s, box * grid[:, None], padding=2) / total.clamp_min(1.0))[:, 0]
        det = (total == F.max_pool2d(total, 5, 1, 2)) & (total > self.min_photons)
        p = torch.where(det[:, 0], 0.99, 1e-4)
        const = torch.ones_like(p)
        return dict(p=p, logits=torch.logit(p), photons=total[:, 0], dx=dx.clamp(-0.99, 0.99),
                    dy=dy.clamp(-0.99, 0.99), z=0 * const, photons_sigma=50 * const, dx_sigma=0.1 * const,
                    dy_sigma=0.1 * const, z_sigma=100 * const, bg=bg[:, None].expand(-1, 1, *p.shape[-2:]))


def simulate(tmp_path, n_frames=12, height=32, width=40, name="movie.tif"):
    cfg = SimulationConfig(
        frame=dict(height=height, width=width, px_size=PX),
        emitters=dict(emitters_per_frame=2.0, photons_mean=4000.0, photons_sd=300.0, z_range=(0.0, 0.0),
                      on_time_mean=2.0),
        psf=dict(kind="gaussian", sigma=1.0), background=dict(uniform=(20.0, 20.0)),
        camera=dict(preset="challenge2016"))
    sim = Simulator(cfg)
    movie = sim.sample(n_frames, torch.Generator().manual_seed(0))
    path = tmp_path / name
    tifffile.imwrite(path, movie.frames_adu[:, 0].numpy().astype(np.uint16), photometric="minisblack")
    return path, movie, sim.camera


def greedy_match(truth: pd.DataFrame, found: pd.DataFrame, gate_nm=250.0):
    """Closest-first matching per frame (brute force): list of (dx, dy) of matched pairs, counts."""
    pairs, n_found = [], 0
    for f in sorted(set(truth["frame"]) | set(found["frame"])):
        t = truth[truth["frame"] == f][["x", "y"]].to_numpy()
        o = found[found["frame"] == f][["x", "y"]].to_numpy()
        n_found += len(o)
        if not len(t) or not len(o):
            continue
        d = np.hypot(t[:, None, 0] - o[None, :, 0], t[:, None, 1] - o[None, :, 1])
        while np.isfinite(d).any() and d.min() <= gate_nm:
            i, j = np.unravel_index(np.argmin(d), d.shape)
            pairs.append(o[j] - t[i])
            d[i, :] = np.inf
            d[:, j] = np.inf
    return np.array(pairs).reshape(-1, 2), n_found


def isolated_inside(em: pd.DataFrame, height_nm: float, width_nm: float, border_nm=300.0, gap_nm=600.0):
    """Emitters >= border_nm from the frame edges with no other emitter within gap_nm in their frame."""
    keep = ((em["x"] > border_nm) & (em["x"] < width_nm - border_nm) & (em["y"] > border_nm)
            & (em["y"] < height_nm - border_nm)).to_numpy()
    for f, group in em.groupby("frame"):
        xy = group[["x", "y"]].to_numpy()
        d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
        np.fill_diagonal(d, np.inf)
        crowded = (d < gap_nm).any(axis=1)
        keep[np.flatnonzero(em["frame"].to_numpy() == f)[crowded]] = False
    return keep


def test_table_of_a_simulated_emccd_movie_matches_the_true_emitters(tmp_path):
    path, movie, camera = simulate(tmp_path)
    table = predict(CentroidOracle(), path, camera=camera, px_size_nm=PX, threshold=0.5, progress=False)
    assert list(table.columns[:6]) == ["frame", "x", "y", "z", "photons", "id"]
    assert table["frame"].is_monotonic_increasing and table["id"].is_unique
    em = movie.emitters
    bright = em[(em["photons"] > 1500) & isolated_inside(em, 32 * PX, 40 * PX)]  # where a 5x5 centroid is fair
    d, _ = greedy_match(bright, table)
    recall = len(d) / len(bright)
    all_d, n_found = greedy_match(movie.emitters, table)  # a detection of a dim emitter is not false
    precision = len(all_d) / n_found
    assert recall > 0.9 and precision > 0.9, (recall, precision)
    # A half-pixel or x/y mix-up would show as a 50-100 nm bias; a 5x5 centroid is good to ~20 nm.
    assert np.abs(d.mean(axis=0)).max() < 15.0
    assert np.sqrt((d ** 2).sum(axis=1).mean()) < 40.0


def test_cached_features_give_the_same_maps_and_encode_each_frame_once():
    torch.manual_seed(0)
    net = randomize_output_layers(SigmaMUNet.from_preset("tiny"))  # every map depends on the frames
    frames = np.random.default_rng(0).poisson(60.0, size=(11, 24, 28)).astype(np.float32)
    encoded = []
    original = net.encode_frames
    net.encode_frames = lambda x: (encoded.append(x.shape[0]), original(x))[1]
    cached, plain = MapRecorder(), MapRecorder()
    kw = dict(camera=identity_camera(), px_size_nm=PX, batch_size=3, chunk_frames=5, progress=False)
    predict(net, frames, postprocessor=cached, cache_features=True, **kw)
    predict(net, frames, postprocessor=plain, cache_features=False, **kw)
    assert sum(encoded) == 11  # every frame's stage-1 features computed exactly once
    assert sorted(cached.maps) == sorted(plain.maps) == list(range(11))
    for t in range(11):
        assert_maps_close(cached.maps[t], plain.maps[t])


def test_edge_frames_replicate_themselves_and_a_frame_range_uses_true_neighbours():
    torch.manual_seed(0)
    net = randomize_output_layers(SigmaMUNet.from_preset("tiny")).eval()
    frames = np.random.default_rng(1).poisson(60.0, size=(6, 16, 16)).astype(np.float32)
    rec = MapRecorder()
    predict(net, frames, frames="2:4", camera=identity_camera(), px_size_nm=PX, postprocessor=rec, progress=False)
    full = MapRecorder()
    predict(net, frames, camera=identity_camera(), px_size_nm=PX, postprocessor=full, progress=False)
    x = torch.from_numpy(frames)[:, None]
    with torch.no_grad():
        first = net(torch.stack([x[0], x[0], x[1]], dim=1)[None])
        middle = net(torch.stack([x[1], x[2], x[3]], dim=1)[None])
    assert_maps_close(full.maps[0], {key: value[0] for key, value in first.items()})
    assert_maps_close(rec.maps[2], {key: value[0] for key, value in middle.items()})
    assert sorted(rec.maps) == [2, 3]


def test_tiled_cached_prediction_equals_untiled_uncached_prediction():
    torch.manual_seed(0)
    net = randomize_output_layers(SigmaMUNet.from_preset("tiny"))
    frames = np.random.default_rng(2).poisson(60.0, size=(4, 110, 20)).astype(np.float32)
    tiled, whole = MapRecorder(), MapRecorder()
    kw = dict(camera=identity_camera(), px_size_nm=PX, batch_size=2, progress=False)
    predict(net, frames, postprocessor=tiled, tile_size=100, cache_features=True, **kw)
    predict(net, frames, postprocessor=whole, tile_size=None, cache_features=False, **kw)
    for t in range(4):
        for key, ref in whole.maps[t].items():
            assert tiled.maps[t][key].shape[-2:] == (110, 20)
        assert_maps_close(tiled.maps[t], whole.maps[t])


def test_a_stopped_run_resumes_without_losing_or_repeating_rows(tmp_path, monkeypatch):
    path, movie, camera = simulate(tmp_path, n_frames=12)
    kw = dict(camera=camera, px_size_nm=PX, threshold=0.5, chunk_frames=3, batch_size=2, progress=False)
    reference = predict(CentroidOracle(), path, **kw)
    out = tmp_path / "locs.csv"
    real_write = predict_module._write_part
    calls = []

    def write_then_crash(df, part):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C while chunk 3 was being written
        calls.append(part)
        real_write(df, part)

    monkeypatch.setattr(predict_module, "_write_part", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        predict(CentroidOracle(), path, out=out, **kw)
    assert not out.exists() and len(list((tmp_path / "locs.csv.parts").glob("part-*.parquet"))) == 2
    monkeypatch.setattr(predict_module, "_write_part", real_write)
    oracle = CentroidOracle()
    resumed = predict(oracle, path, out=out, resume=True, **kw)
    assert oracle.calls == 6  # only the 6 frames of the 2 missing chunks were analysed again
    cols = ["frame", "x", "y", "photons"]
    pd.testing.assert_frame_equal(resumed[cols], reference[cols])
    from decode_accel.io import read_table
    back = read_table(out)
    assert len(back) == len(reference)
    np.testing.assert_allclose(back["x"], reference["x"], atol=1e-3)
    assert not (tmp_path / "locs.csv.parts").exists()


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    path, _, camera = simulate(tmp_path, n_frames=6)
    out = tmp_path / "locs.csv"
    monkeypatch.setattr(predict_module, "_write_part", lambda df, part: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        predict(CentroidOracle(), path, out=out, camera=camera, px_size_nm=PX, chunk_frames=3, progress=False)
    with pytest.raises(DecodeAccelError, match="progress.json: --resume: .*other settings"):
        predict(CentroidOracle(), path, out=out, camera=camera, px_size_nm=PX, chunk_frames=3, threshold=0.9,
                resume=True, progress=False)


def test_picasso_file_reopens_with_geometry_and_pixel_units(tmp_path):
    path, _, camera = simulate(tmp_path, n_frames=6, height=24, width=36)
    out = tmp_path / "locs.hdf5"
    table = predict(CentroidOracle(), path, out=[out, tmp_path / "locs.csv"], camera=camera, px_size_nm=PX,
                    threshold=0.5, progress=False)
    assert len(table) > 0
    info = list(yaml.safe_load_all((tmp_path / "locs.yaml").read_text()))
    merged = {k: v for doc in info if isinstance(doc, dict) for k, v in doc.items()}
    assert (merged["Width"], merged["Height"], merged["Frames"]) == (36, 24, 6)
    with h5py.File(out, "r") as f:
        locs = f["locs"][...]
    # Picasso: px with pixel centres at integers, frames 0-based
    np.testing.assert_allclose(locs["x"], table["x"] / PX - 0.5, atol=1e-4)
    np.testing.assert_allclose(locs["y"], table["y"] / PX - 0.5, atol=1e-4)
    np.testing.assert_array_equal(locs["frame"], table["frame"])
    csv = pd.read_csv(tmp_path / "locs.csv")
    np.testing.assert_array_equal(csv["frame"], table["frame"] + 1)  # ThunderSTORM frames are 1-based


def test_bad_inputs_give_one_line_errors(tmp_path):
    path, _, camera = simulate(tmp_path, n_frames=3, height=16, width=16)
    two = tmp_path / "two.tif"
    tifffile.imwrite(two, np.zeros((3, 2, 16, 16), np.uint16), imagej=True, metadata={"axes": "TCYX"})
    cases = [
        (dict(inputs=tmp_path / "missing.tif"), "missing.tif: file not found"),
        (dict(inputs=two), "channels: movie has 2 channel"),
        (dict(out=tmp_path / "locs.txt"), "--out: unknown output format"),
        (dict(resume=True), "resume: resume needs an output path"),
        (dict(frames="5:9"), "--frames: .*selects no frame"),
        (dict(camera=tmp_path / "nocam.yaml"), "nocam.yaml: --camera: camera file not found"),
    ]
    for override, message in cases:
        kw = dict(inputs=path, camera=camera, px_size_nm=PX, progress=False)
        kw.update(override)
        inputs = kw.pop("inputs")
        with pytest.raises(DecodeAccelError, match=message) as err:
            predict(CentroidOracle(), inputs, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(DecodeAccelError, match="px_size_nm: the model's pixel size is unknown"):
        predict(CentroidOracle(), path, camera=camera, progress=False)


def test_camera_yaml_overrides_the_conversion_to_photons(tmp_path):
    frames = np.full((3, 16, 16), 1100, np.uint16)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, frames, photometric="minisblack")
    cam = tmp_path / "camera.yaml"
    cam.write_text(yaml.safe_dump({"kind": "scmos", "baseline": 100.0, "e_per_adu": 2.0, "qe": 0.5}))
    rec = MapRecorder()

    class Echo(torch.nn.Module):  # returns the central frame's photons as the bg map
        size_multiple = 1
        in_channels = 1

        def forward(self, x):
            zero = torch.zeros_like(x[:, 0, 1])
            return dict(p=zero, dx=zero, dy=zero, bg=x[:, :, 1])

    predict(Echo(), path, camera=cam, px_size_nm=PX, postprocessor=rec, progress=False)
    # (1100 - 100 ADU) * 2 e-/ADU / 0.5 e-/photon = 4000 photons
    assert torch.allclose(rec.maps[1]["bg"], torch.full((1, 16, 16), 4000.0))


def test_command_line_predicts_from_an_export_folder_and_renders(tmp_path, capsys):
    from decode_accel.hub import export_model
    from decode_accel.cli.predict import predict_main
    path, _, _ = simulate(tmp_path, n_frames=4, height=16, width=16)
    torch.manual_seed(0)
    cfg = SimulationConfig(frame=dict(height=16, width=16, px_size=PX), camera=dict(preset="challenge2016"))
    export = export_model(tmp_path / "export", SigmaMUNet.from_preset("tiny"), simulation_config=cfg)
    code = predict_main(["--model", str(export), "--input", str(path), "--out", str(tmp_path / "locs.hdf5"),
                         "--threshold", "0.001", "--batch-size", "2", "--frames", "1:4", "--no-progress",
                         "--render", str(tmp_path / "sr.png")])
    assert code == 0
    assert (tmp_path / "locs.hdf5").exists() and (tmp_path / "locs.yaml").exists()
    assert (tmp_path / "sr.png").read_bytes()[:4] == b"\x89PNG"
    from decode_accel.io import read_table
    back = read_table(tmp_path / "locs.hdf5")
    assert back["frame"].between(1, 3).all() and len(back) > 0
    assert "localizations" in capsys.readouterr().out


def test_command_line_reports_bad_input_in_one_line(tmp_path, capsys):
    from decode_accel.cli.predict import predict_main
    code = predict_main(["--model", str(tmp_path / "no_export"), "--input", str(tmp_path / "m.tif"),
                         "--out", str(tmp_path / "l.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


class OutOfMemoryAbove(torch.nn.Module):
    """A network that runs out of (accelerator) memory on batches of more than ``limit`` frames, as a GPU would."""

    def __init__(self, net, limit: int):
        super().__init__()
        self.net, self.limit, self.refused = net, limit, []

    def _check(self, n):
        if n > self.limit:
            self.refused.append(n)
            raise torch.OutOfMemoryError(f"CUDA out of memory: {n} frames")

    def encode_frames(self, frames):
        self._check(len(frames))
        return self.net.encode_frames(frames)

    def decode_windows(self, prev, cur, nxt):
        return self.net.decode_windows(prev, cur, nxt)

    def forward(self, windows):
        self._check(len(windows))
        return self.net(windows)


def test_out_of_memory_is_met_by_smaller_batches_and_gives_the_same_table(tmp_path, caplog):
    path, _, camera = simulate(tmp_path, n_frames=12)
    torch.manual_seed(0)
    net = randomize_output_layers(SigmaMUNet.from_preset("tiny"))
    settings = dict(camera=camera, px_size_nm=PX, threshold=0.3, progress=False)
    expected = predict(net, path, batch_size=3, **settings)
    assert len(expected)
    for cache in (True, False):
        limited = OutOfMemoryAbove(net, limit=3)
        with caplog.at_level("WARNING", logger="decode_accel.inference.predict"):
            table = predict(limited, path, batch_size=12, cache_features=cache, **settings)
        # halved until it fits (a cached batch also encodes its next neighbour), then kept for the rest
        assert limited.refused[0] >= 12 and limited.refused == sorted(set(limited.refused), reverse=True)
        # float32 results depend slightly on the batch size (oneDNN), hence the tolerance (nm, photons)
        pd.testing.assert_frame_equal(table, expected, rtol=1e-4, atol=0.02)
    assert "out of accelerator memory with 12 frames per batch: going on with 6" in caplog.text
    with pytest.raises(DecodeAccelError, match="does not fit in the accelerator's memory.*tile-size"):
        predict(OutOfMemoryAbove(net, limit=0), path, batch_size=4, **settings)
