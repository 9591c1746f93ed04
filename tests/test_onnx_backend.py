"""predict's ONNX Runtime backend gives PyTorch's maps and table (issue 15.1); the 'fast' preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.inference.predict import predict
from decode_accel.models import SigmaMUNet, build_model
from tests.numerics import MapRecorder, assert_maps_close, assert_maps_differ, identity_camera, randomize_output_layers

PX = 100.0


def net_and_frames(n=9, h=24, w=32, **kw):
    torch.manual_seed(0)
    net = randomize_output_layers(SigmaMUNet.from_preset("tiny", **kw))
    frames = np.random.default_rng(0).poisson(60.0, size=(n, h, w)).astype(np.float32)
    return net.eval(), frames


def test_fast_preset_is_the_small_cpu_network():
    fast = build_model({"preset": "fast", "z_enabled": False})
    small = build_model({"preset": "cpu_small", "z_enabled": False})
    assert (fast.features, fast.depth, fast.activation) == (8, 2, "elu")
    assert fast.num_parameters() < small.num_parameters() / 3


@pytest.fixture
def ort(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    monkeypatch.setenv("DECODE_ACCEL_CACHE", str(tmp_path / "cache"))  # predict's exports go here, not to ~/.cache
    return pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("z_enabled", [False, True])
def test_onnx_net_gives_the_networks_maps(ort, z_enabled):
    from decode_accel.inference.onnx_backend import OnnxNet

    net, frames = net_and_frames(z_enabled=z_enabled)
    x = torch.from_numpy(frames[:, None])
    onnx = OnnxNet(net, threads=1)
    with torch.no_grad():
        feats = net.encode_frames(x)
        expected = net.decode_windows(feats[:-2], feats[1:-1], feats[2:])
        windows = torch.stack([x[:-2], x[1:-1], x[2:]], dim=2)
        forward = net(windows)
    got_feats = onnx.encode_frames(x)
    assert got_feats.shape == feats.shape
    got = onnx.decode_windows(got_feats[:-2], got_feats[1:-1], got_feats[2:])
    assert_maps_close(got, expected)
    assert_maps_close(onnx(windows), forward)
    # the check would catch frames t-1 and t+1 swapped (a plausible wiring bug)
    assert_maps_differ(onnx.decode_windows(got_feats[2:], got_feats[1:-1], got_feats[:-2]),
                       {k: v for k, v in expected.items() if k not in ("z", "z_sigma") or z_enabled})
    # other frame sizes and batch sizes than the export's example (dynamic axes)
    y = torch.from_numpy(np.random.default_rng(1).poisson(60.0, size=(3, 1, 16, 40)).astype(np.float32))
    with torch.no_grad():
        assert_maps_close({"f": onnx.encode_frames(y)}, {"f": net.encode_frames(y)})


def test_predict_with_the_onnx_backend_gives_pytorchs_maps_and_table(ort):
    net, frames = net_and_frames(n=11)
    kw = dict(camera=identity_camera(), px_size_nm=PX, batch_size=4, progress=False)
    a, b = MapRecorder(), MapRecorder()
    predict(net, frames, postprocessor=a, backend="onnx", **kw)
    predict(net, frames, postprocessor=b, backend="torch", **kw)
    assert sorted(a.maps) == sorted(b.maps) == list(range(len(frames)))
    for t in b.maps:
        assert_maps_close(a.maps[t], b.maps[t])
    # the table end to end (default post-processing at a low threshold, so that there are rows)
    t_onnx = predict(net, frames, backend="onnx", threshold=0.05, **kw)
    t_torch = predict(net, frames, backend="torch", threshold=0.05, **kw)
    assert len(t_torch) > 0
    assert len(t_onnx) == len(t_torch)
    np.testing.assert_array_equal(t_onnx["frame"], t_torch["frame"])
    np.testing.assert_allclose(t_onnx[["x", "y"]].to_numpy(), t_torch[["x", "y"]].to_numpy(), atol=1e-2)
    assert all(p.is_contiguous() for p in net.parameters()) and not net.training


def test_predict_with_the_onnx_backend_tiles_like_pytorch(ort):
    net, frames = net_and_frames(n=3, h=40, w=200)
    kw = dict(camera=identity_camera(), px_size_nm=PX, batch_size=4, progress=False, tile_size=96)
    a, b = MapRecorder(), MapRecorder()
    predict(net, frames, postprocessor=a, backend="onnx", **kw)
    predict(net, frames, postprocessor=b, backend="torch", **kw)
    for t in b.maps:
        assert_maps_close(a.maps[t], b.maps[t])


def test_unknown_backend_is_a_one_line_error():
    net, frames = net_and_frames(n=3)
    with pytest.raises(DecodeAccelError, match="backend"):
        predict(net, frames, camera=identity_camera(), px_size_nm=PX, progress=False, backend="tensorrt")


def test_exported_graphs_are_cached_by_weights(ort, tmp_path):
    from decode_accel.inference.onnx_backend import OnnxNet

    net, frames = net_and_frames(n=4)
    x = torch.from_numpy(frames[:, None])
    first = OnnxNet(net, threads=1, cache_dir=tmp_path / "c")
    again = OnnxNet(net, threads=1, cache_dir=tmp_path / "c")
    assert not first.from_cache and again.from_cache
    assert_maps_close({"f": again.encode_frames(x)}, {"f": first.encode_frames(x)})
    with torch.no_grad():
        net.heads["p"][-1].bias.add_(1.0)  # other weights: another graph, not the cached one
        expected = net.encode_frames(x)
        feats = net.decode_windows(expected[:-2], expected[1:-1], expected[2:])
    changed = OnnxNet(net, threads=1, cache_dir=tmp_path / "c")
    assert not changed.from_cache
    got = changed.encode_frames(x)
    assert_maps_close(changed.decode_windows(got[:-2], got[1:-1], got[2:]), feats)
