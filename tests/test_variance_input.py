"""The sCMOS read-noise variance map as a network input (``model.variance_input``, issue 14.2).

Every check here compares with the map FILE read by numpy, not with what the library computes: the
variance a training sample carries must be its crop of the full-chip map (found by searching the file
for it, and the same crop whose noise the frames show), and predict must feed a movie recorded on a
region of the chip that region of the map, tile by tile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.models import DoubleMUNet, SigmaMUNet
from decode_accel.models.variance import network_input, with_variance
from decode_accel.simulation import SimulationConfig
from tests.numerics import MapRecorder, assert_maps_close, randomize_output_layers

QE = 0.8
QUIET, HOT = 0.01, 1.0e6  # ADU²


def _chip(tmp_path, height, width, seed=0, hot_share=0.1, with_variance_map=True):
    """A full-chip map file: quiet pixels and a random tenth of hot ones; e-/ADU varies per pixel."""
    rng = np.random.default_rng(seed)
    var = np.where(rng.random((height, width)) < hot_share, HOT, QUIET).astype(np.float32)
    var *= (1.0 + 0.5 * rng.random((height, width))).astype(np.float32)  # no two crops alike
    gain = (0.4 + 0.2 * rng.random((height, width))).astype(np.float32)
    offset = np.full((height, width), 100.0, np.float32)
    path = tmp_path / f"chip{seed}.npz"
    arrays = dict(offset_adu=offset, e_per_adu=gain)
    if with_variance_map:
        arrays["variance_adu2"] = var
    np.savez(path, **arrays)
    return path


def _photons2(path):
    """The file's read-noise variance in photons²: ADU² · (e-/ADU / QE)²."""
    with np.load(path) as z:
        return z["variance_adu2"].astype(np.float64) * (z["e_per_adu"].astype(np.float64) / QE) ** 2


def _sim(path, h=16, w=16, **camera):
    return SimulationConfig(frame=dict(height=h, width=w), emitters=dict(emitters_per_frame=0.0),
                            background=dict(uniform=(2.0, 2.0)),
                            camera=dict(kind="scmos", qe=QE, scmos_maps=str(path), **camera))


@pytest.mark.parametrize("clips_per_call", [1, 4])
def test_each_sample_sees_its_own_crop_of_the_map_file_the_one_its_noise_came_from(tmp_path, clips_per_call):
    from decode_accel.data.stream import SimulatedWindowStream

    path = _chip(tmp_path, 40, 48)
    full = _photons2(path)
    kw = dict(base_seed=3, num_samples=8, clips_per_call=clips_per_call)
    samples = list(SimulatedWindowStream(_sim(path), with_variance=True, **kw))
    plain = list(SimulatedWindowStream(_sim(path), **kw))
    origins = set()
    for s, p in zip(samples, plain):
        assert torch.equal(s["frames"], p["frames"])  # the variance uses no random numbers: same samples
        v = s["variance"].double().numpy()
        assert v.shape == (1, 16, 16)
        # where on the chip: search the file for this crop (every origin); it must be there exactly once
        hits = [(r, c) for r in range(40 - 16 + 1) for c in range(48 - 16 + 1)
                if np.allclose(full[r:r + 16, c:c + 16], v[0], rtol=1e-5)]
        assert len(hits) == 1, hits
        origins.add(hits[0])
        # the frames' noise comes from the same pixels: with a flat background of 2 photons, every hot pixel
        # (sd > 500 photons) is off by > 20 photons in one of the three frames and no quiet one is
        dev = (s["frames"][0] - 2.0).abs().amax(dim=0).numpy()
        assert np.array_equal(dev > 20.0, v[0] > 100.0)
    assert len(origins) > 2  # a fresh crop per sample


def test_a_batch_feeds_the_network_its_frames_then_their_variance():
    frames, variance = torch.rand(2, 1, 3, 8, 8), torch.rand(2, 1, 8, 8)
    x = network_input({"frames": frames, "variance": variance}, SigmaMUNet.from_preset("tiny", variance_input=True))
    assert x.shape == (2, 2, 3, 8, 8)
    assert torch.equal(x[:, :1], frames) and all(torch.equal(x[:, 1, t], variance[:, 0]) for t in range(3))
    # a model without the input (e.g. a distillation teacher) gets the frames alone
    assert network_input({"frames": frames, "variance": variance}, SigmaMUNet.from_preset("tiny")) is frames
    with pytest.raises(DecodeAccelError, match="no 'variance'"):
        network_input({"frames": frames}, SigmaMUNet.from_preset("tiny", variance_input=True))


@pytest.mark.parametrize("cls", [SigmaMUNet, DoubleMUNet])
def test_models_read_the_variance_beside_each_frame_and_cache_features_with_it(cls):
    torch.manual_seed(0)
    net = randomize_output_layers(cls.from_preset("tiny", variance_input=True)).eval()
    c = net.in_channels
    assert net.input_channels == 2 * c
    frames = 50 + 20 * torch.rand(2, c, 3, 16, 16)
    variance = torch.rand(2, c, 16, 16) * 200
    windows = with_variance(frames, variance)
    with torch.no_grad():
        plain = net(windows)
        feats = [net.encode_frames(with_variance(frames[:, :, t], variance)) for t in range(3)]
        cached = net.decode_windows(*feats)
        other = net(with_variance(frames, variance.flip(-1)))
    assert_maps_close(cached, plain)
    assert float((other["p"] - plain["p"]).abs().max()) > 1e-4  # the map is an input that matters
    # stage 1 gets channel g's frame next to channel g's map: [x1, v1, x2, v2] for two channels
    scaled = net._scale_input(with_variance(frames[:, :, 1], variance))
    s = net.scaling
    for g in range(c):
        assert torch.allclose(scaled[:, 2 * g], (frames[:, g, 1] - s.input_offset) / s.input_scale)
        assert torch.allclose(scaled[:, 2 * g + 1], torch.log1p(variance[:, g] / s.variance_reference()))
    with pytest.raises(DecodeAccelError, match=f"expected shape \\(B, {2 * c}, 3, H, W\\).*variance"):
        net(frames)


# ------------------------------------------------------------------------------------------- predict
H_CHIP, W_CHIP, ROI, MOVIE = 200, 220, (24, 36), (150, 162)  # the canvas (152 x 164) pads 2 rows and columns


@pytest.fixture(scope="module")
def chip_and_net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chip")
    path = _chip(tmp, H_CHIP, W_CHIP, seed=5)
    torch.manual_seed(1)
    net = randomize_output_layers(SigmaMUNet.from_preset("tiny", variance_input=True)).eval()
    return path, net


def _movie(path, n=4, seed=2):
    """ADU of a movie on the chip's region ROI: offset + 40 photons, plus noise."""
    rng = np.random.default_rng(seed)
    with np.load(path) as z:
        r, c = ROI
        off = z["offset_adu"][r:r + MOVIE[0], c:c + MOVIE[1]]
        gain = z["e_per_adu"][r:r + MOVIE[0], c:c + MOVIE[1]]
    return (off + 40.0 * QE / gain + rng.normal(0, 3, (n, *MOVIE))).astype(np.float32)


def test_predict_feeds_the_movies_region_of_the_map_to_every_tile(chip_and_net, monkeypatch):
    from decode_accel.inference.predict import predict
    from decode_accel.inference.tiling import plan_tiles, receptive_field_radius

    path, net = chip_and_net
    camera = _sim(path, *MOVIE).camera
    movie = _movie(path)
    margin = receptive_field_radius(net, 1)
    tile = 2 * margin + 40  # 2 x 2 tiles
    # what the network must see: the file's map at the ROI, padded like the frames (edge rows/columns repeated)
    r, c = ROI
    region = _photons2(path)[r:r + MOVIE[0], c:c + MOVIE[1]]
    plan = plan_tiles(*MOVIE, tile_size=tile, margin=margin, stride=4)
    assert len(plan.tiles) == 4
    canvas = np.pad(region, ((0, plan.canvas_h - MOVIE[0]), (0, plan.canvas_w - MOVIE[1])), mode="edge")

    seen = []
    for name in ("encode_frames", "forward"):
        original = getattr(type(net), name)

        def spy(self, x, _original=original):
            seen.append(x.detach().clone())
            return _original(self, x)

        monkeypatch.setattr(type(net), name, spy)
    maps = {}
    for cache in (True, False):
        seen.clear()
        maps[cache] = MapRecorder()
        predict(net, movie, camera=camera, px_size_nm=100.0, camera_roi=ROI, tile_size=tile, batch_size=2,
                cache_features=cache, postprocessor=maps[cache], progress=False)
        assert len(seen) == 2 * len(plan.tiles)  # two batches, every tile of each
        for k, x in enumerate(seen):
            t = plan.tiles[k % len(plan.tiles)]
            got = (x[:, 1] if x.ndim == 4 else x[:, 1, 1]).double().numpy()  # (n, h, w): the variance channel
            expected = canvas[t.y0:t.y0 + t.h, t.x0:t.x0 + t.w]
            assert np.allclose(got, expected[None], rtol=1e-5), (cache, k)
    for frame in maps[True].maps:
        assert_maps_close(maps[True].maps[frame], maps[False].maps[frame])
    # untiled, the same maps (the variance is padded and cut exactly like the frames)
    whole = MapRecorder()
    monkeypatch.undo()
    predict(net, movie, camera=camera, px_size_nm=100.0, camera_roi=ROI, tile_size=None, postprocessor=whole,
            progress=False)
    for frame in whole.maps:
        assert_maps_close(maps[True].maps[frame], whole.maps[frame])


def test_without_a_variance_map_it_is_refused_in_one_line(tmp_path, chip_and_net):
    from decode_accel.export import export_model
    from decode_accel.inference.predict import predict
    from decode_accel.training.builders import build_loaders
    from decode_accel.training.config import TrainingConfig, load_config

    _, net = chip_and_net
    problems = {
        "emccd": {"simulation": {"camera": {"preset": "challenge2016"}}},
        "scmos, no maps": {"simulation": {"camera": {"kind": "scmos"}}},
    }
    for name, data in problems.items():
        cfg = tmp_path / f"{name.replace(' ', '_').replace(',', '')}.yaml"
        import yaml
        cfg.write_text(yaml.safe_dump({"model": {"preset": "tiny", "variance_input": True}, **data}))
        with pytest.raises(DecodeAccelError) as err:
            load_config(cfg)
        assert "model.variance_input needs an sCMOS camera with a per-pixel variance map" in str(err.value), name
    # maps without a variance array: found when the file is read (the training builders read it first)
    no_var = _chip(tmp_path, 40, 48, seed=9, with_variance_map=False)
    config = TrainingConfig.model_validate({"model": {"preset": "tiny", "variance_input": True},
                                            "simulation": _sim(no_var).model_dump()})
    with pytest.raises(DecodeAccelError, match="variance map") as err:
        build_loaders(config)
    assert "\n" not in str(err.value)
    # predict with a camera that has no maps, and an export whose simulation has none
    movie = np.full((3, 16, 16), 200.0, np.float32)
    with pytest.raises(DecodeAccelError, match="no per-pixel variance map") as err:
        predict(net, movie, camera=dict(kind="scmos"), px_size_nm=100.0, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(DecodeAccelError, match="variance map.*has none"):
        export_model(tmp_path / "export", net, simulation_config=SimulationConfig(frame=dict(height=16, width=16)))


def test_export_round_trip_predicts_with_the_variance_without_options(tmp_path, chip_and_net):
    from decode_accel.export import export_model, load_exported
    from decode_accel.inference.predict import predict

    path, net = chip_and_net
    sim = _sim(path, 32, 32)
    folder = export_model(tmp_path / "export", net, simulation_config=sim)
    back = load_exported(folder)
    assert back.metadata["variance_input"] is True and back.model.variance_input and back.model.input_channels == 2
    assert back.model.scaling == net.scaling
    for key, value in net.state_dict().items():
        assert torch.equal(back.model.state_dict()[key], value), key
    maps = Path(back.simulation_config.camera.scmos_maps)
    assert maps.is_file() and maps.resolve().is_relative_to(Path(folder).resolve())  # the maps travel in assets/
    assert "read-noise variance map" in (folder / "README.md").read_text()
    movie = _movie(path, n=3)
    got, expected = MapRecorder(), MapRecorder()
    predict(folder, movie, camera_roi=ROI, postprocessor=got, progress=False)
    predict(net, movie, camera=sim.camera, px_size_nm=100.0, camera_roi=ROI, postprocessor=expected, progress=False)
    for frame in expected.maps:
        assert_maps_close(got.maps[frame], expected.maps[frame])
