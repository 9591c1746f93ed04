"""Predict's CPU speed and memory settings change how it runs, never what it returns (issues 11.3, 15.1)."""

from __future__ import annotations

import importlib

import numpy as np
import torch

from decode_accel.inference.movie import open_movie
from decode_accel.inference.predict import predict
from decode_accel.models import SigmaMUNet
from tests.numerics import MapRecorder, assert_maps_close, identity_camera, randomize_output_layers

predict_module = importlib.import_module("decode_accel.inference.predict")
PX = 100.0


def net_and_frames(n=9, h=24, w=32):
    torch.manual_seed(0)
    net = randomize_output_layers(SigmaMUNet.from_preset("tiny"))
    frames = np.random.default_rng(0).poisson(60.0, size=(n, h, w)).astype(np.float32)
    return net, frames


def test_channels_last_gives_the_same_maps_and_leaves_the_model_as_it_was():
    net, frames = net_and_frames()
    kw = dict(camera=identity_camera(), px_size_nm=PX, batch_size=4, progress=False)
    fast, plain = MapRecorder(), MapRecorder()
    predict(net, frames, postprocessor=fast, channels_last=True, **kw)
    assert all(p.is_contiguous() for p in net.parameters())  # restored after the run
    predict(net, frames, postprocessor=plain, channels_last=False, **kw)
    assert sorted(fast.maps) == sorted(plain.maps) == list(range(len(frames)))
    for t in plain.maps:
        assert_maps_close(fast.maps[t], plain.maps[t])


def test_the_feature_ring_is_allocated_once_and_reused_batch_after_batch():
    net, frames = net_and_frames(n=14)
    net.eval()
    stream = predict_module._FrameStream(net, open_movie(frames), identity_camera(), device=torch.device("cpu"),
                                         tile_size=None, cache_features=True, autocast_dtype=None)
    pointers = set()
    for a in range(0, 14, 3):
        stream.maps(a, min(a + 3, 14))
        pointers.add(stream.ring_buf[0].data_ptr())
    assert len(pointers) == 1
    assert stream.encoded_frames == 14  # each frame encoded once
    stream.reset()  # a jump: the buffer stays, its contents are forgotten
    stream.maps(0, 3)
    assert stream.ring_buf[0].data_ptr() in pointers and stream.encoded_frames == 14 + 4


def test_freed_heap_memory_is_handed_back_every_few_million_pixels(monkeypatch):
    net, frames = net_and_frames(n=40, h=32, w=32)
    calls = []
    monkeypatch.setattr(predict_module, "TRIM_EVERY_PX", 10 * 32 * 32)
    monkeypatch.setattr(predict_module, "_release_freed_memory", lambda: calls.append(1))
    predict(net, frames, camera=identity_camera(), px_size_nm=PX, batch_size=5, progress=False,
            postprocessor=MapRecorder())
    assert len(calls) == 4  # after frames 10, 20, 30 and 40
    predict_module._MALLOC_TRIM and predict_module._MALLOC_TRIM(0)  # the real call is safe (Linux/glibc)


def test_cpu_batches_hold_half_a_megapixel():
    plan = predict_module.plan_tiles(64, 64, tile_size=512, margin=0, stride=4)
    assert predict_module._auto_batch_size(plan, torch.device("cpu")) == 128
    plan = predict_module.plan_tiles(256, 256, tile_size=512, margin=0, stride=4)
    assert predict_module._auto_batch_size(plan, torch.device("cpu")) == 8


def test_the_cli_process_lets_glibc_reuse_large_blocks():
    import sys

    ok = predict_module._reuse_large_blocks()  # process-wide: harmless in a test process
    assert ok or not sys.platform.startswith("linux") or predict_module._MALLOC_TRIM is None
