"""Tiling: tiles on the stride grid, every pixel kept once, tiled output == whole-frame output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.inference.tiling import (pad_to_canvas, plan_tiles, predict_maps_tiled, receptive_field_radius,
                                           size_multiple)
from decode_accel.models import SigmaMUNet
from tests.numerics import randomize_output_layers


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return randomize_output_layers(SigmaMUNet.from_preset("tiny")).eval()  # every map depends on the frames


@pytest.fixture(scope="module")
def radius(tiny_net):
    return receptive_field_radius(tiny_net, 1)


@pytest.mark.parametrize("height,width,tile,margin,stride", [(37, 53, 24, 5, 4), (100, 64, 40, 10, 8),
                                                             (16, 16, 64, 20, 4), (65, 130, 50, 12, 2)])
def test_kept_regions_cover_every_pixel_exactly_once_and_stay_away_from_cuts(height, width, tile, margin, stride):
    plan = plan_tiles(height, width, tile_size=tile, margin=margin, stride=stride)
    assert plan.canvas_h % stride == 0 and plan.canvas_w % stride == 0
    assert plan.canvas_h >= height and plan.canvas_w >= width
    cover = np.zeros((plan.canvas_h, plan.canvas_w), dtype=int)
    for t in plan.tiles:
        assert t.y0 % stride == 0 and t.x0 % stride == 0
        assert t.y0 + t.h <= plan.canvas_h and t.x0 + t.w <= plan.canvas_w
        cover[t.ky0:t.ky1, t.kx0:t.kx1] += 1
        # a kept pixel is >= margin from every tile edge that is a cut (not the canvas border)
        if t.y0 > 0:
            assert t.ky0 - t.y0 >= margin
        if t.y0 + t.h < plan.canvas_h:
            assert t.y0 + t.h - t.ky1 >= margin
        if t.x0 > 0:
            assert t.kx0 - t.x0 >= margin
        if t.x0 + t.w < plan.canvas_w:
            assert t.x0 + t.w - t.kx1 >= margin
    assert (cover == 1).all()


def test_too_small_tiles_are_refused_with_the_size_to_use():
    with pytest.raises(DecodeAccelError, match="tile_size: .* at least 44 px"):
        plan_tiles(200, 200, tile_size=40, margin=20, stride=4)


def test_size_multiple_is_two_to_the_depth(tiny_net):
    assert size_multiple(tiny_net) == 2 ** tiny_net.depth == 4


def test_outputs_ignore_inputs_beyond_the_measured_receptive_field(tiny_net, radius):
    assert radius is not None and 8 < radius < 96
    size = 2 * radius + 12
    size -= size % 4
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 3, size, size, generator=gen) * 200 + 50
    c = size // 2 // 4 * 4  # a pixel on the stride grid
    with torch.no_grad():
        base = tiny_net(x)["logits"][0, c, c]
        far = x.clone()
        far[..., c, c + radius + 1:] += 500.0  # every input farther than the radius, along the row
        far[..., c + radius + 1:, :] += 500.0
        assert tiny_net(far)["logits"][0, c, c] == pytest.approx(float(base), abs=1e-5)
        near = x.clone()
        near[..., c, c + radius - 4] += 500.0  # one input just inside the measured field
        changed = tiny_net(near)["logits"][0, c:c + 4, c:c + 4]
        assert (changed - tiny_net(x)["logits"][0, c:c + 4, c:c + 4]).abs().max() > 0


def test_group_normalization_makes_the_receptive_field_unbounded():
    torch.manual_seed(0)
    net = SigmaMUNet.from_preset("tiny", norm="group").eval()
    assert receptive_field_radius(net, 1, start_canvas=32, max_canvas=32) is None


def test_tiled_inference_equals_whole_frame_inference_on_an_odd_sized_frame(tiny_net, radius):
    gen = torch.Generator().manual_seed(2)
    windows = torch.rand(1, 1, 3, 61, 97, generator=gen) * 300 + 20  # not multiples of 4
    with torch.no_grad():
        whole = predict_maps_tiled(tiny_net, windows, tile_size=None)
        tiled = predict_maps_tiled(tiny_net, windows, tile_size=2 * radius + 8, margin=radius)
    assert len(plan_tiles(61, 97, tile_size=2 * radius + 8, margin=radius, stride=4).tiles) > 1
    for key, ref in whole.items():
        assert tiled[key].shape == ref.shape
        assert tiled[key].shape[-2:] == (61, 97)  # nothing cropped
        torch.testing.assert_close(tiled[key], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_whole_frame_inference_pads_by_replicating_the_border():
    frames = torch.arange(6.0).reshape(1, 2, 3)
    padded = pad_to_canvas(frames, 4, 4)
    assert padded.shape == (1, 4, 4)
    assert padded[0, 3].tolist() == [3.0, 4.0, 5.0, 5.0]
    assert padded[0, :, 3].tolist() == [2.0, 5.0, 5.0, 5.0]
