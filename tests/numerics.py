"""Helpers for tests that compare two ways of computing the same network output.

Two computations that are equal in exact arithmetic (cached vs plain forward, channels-last vs
contiguous, checkpointed vs plain gradients) differ in float32 by rounding, and how much depends on
the convolution kernels the CPU picks (oneDNN's instruction set, the thread count). An element-wise
relative tolerance fails on elements near zero, where any rounding is a large relative change; a
tolerance relative to the scale of the whole map does not, and a real bug (a wrong frame order, a
missing input scaling) changes a map by a sizeable fraction of its scale, far beyond it.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from decode_accel.simulation import Camera, CameraConfig

#: the difference allowed between two float32 computations of one map, as a fraction of the map's
#: largest magnitude. Kernel paths (AVX2, AVX, SSE4.1; 1 or 2 threads) differ by ~2e-6 of it, the bugs
#: these tests look for (frames in the wrong order, a missing scaling) by more than 0.1.
SCALE_TOLERANCE = 1e-3


def scaled_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| divided by max |expected| (or by 1 where the map is all zeros)."""
    scale = float(expected.abs().max())
    return float((got.double() - expected.double()).abs().max()) / (scale if scale > 0 else 1.0)


def assert_maps_close(got: dict, expected: dict, tolerance: float = SCALE_TOLERANCE) -> None:
    """Every map of ``expected`` is in ``got`` and agrees to ``tolerance`` of its own scale."""
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    worst = {key: scaled_difference(got[key], expected[key]) for key in expected}
    bad = {key: f"{value:.2e}" for key, value in worst.items() if not value <= tolerance}
    assert not bad, f"maps differ by more than {tolerance:g} of their scale: {bad}"


def assert_maps_differ(got: dict, expected: dict, tolerance: float = SCALE_TOLERANCE,
                       factor: float = 100.0) -> None:
    """Every map that varies over the pixels differs by more than ``factor`` x ``tolerance``: the check
    that ``assert_maps_close`` would catch the bug that produced ``got``."""
    varying = [key for key in expected if float(expected[key].std()) > 0]
    assert varying, "no map varies: the comparison would be vacuous"
    same = {key: scaled_difference(got[key], expected[key]) for key in varying}
    same = {key: f"{value:.2e}" for key, value in same.items() if value <= factor * tolerance}
    assert not same, f"maps that a wrong computation leaves (almost) unchanged: {same}"


def randomize_output_layers(model: nn.Module, seed: int = 0, std: float = 0.5) -> nn.Module:
    """Random weights and biases in the last layer of every head.

    The models start with the output layers of all heads but p at zero (a constant dx, dy, z, photons
    ... whatever the input), so a comparison of fresh models' outputs would only ever compare p. With
    random output layers every map depends on the input.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.heads.values():
            layer = head[-1]
            fan_in = layer.weight[0].numel()
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std / fan_in ** 0.5)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * std)
    return model


class MapRecorder:
    """A post-processor that keeps every batch's maps (and returns no rows)."""

    def __init__(self):
        self.maps: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, output, frame_offset=0):
        for k in range(output["p"].shape[0]):
            self.maps[frame_offset + k] = {key: v[k].clone() for key, v in output.items()}
        return pd.DataFrame({"frame": pd.Series(dtype="int64"), "x": [], "y": [], "z": [], "photons": [],
                             "id": pd.Series(dtype="int64")})


def identity_camera():
    """A camera whose ADU are photons (no offset, gain 1, no noise model), for comparing maps."""
    return Camera(CameraConfig(kind="perfect"))
