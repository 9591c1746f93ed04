"""The CPU's inference ELU (issue 15.1) is F.elu within float rounding, and the networks give the plain path's outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decode_accel.models import DoubleMUNet, SigmaMUNet
from decode_accel.models import unet


def test_elu_inference_is_elu_within_one_rounding_including_the_edge_values():
    x = torch.cat([torch.randn(10000) * 4, torch.tensor([0.0, -0.0, 1e-30, -1e-30, -1e-8, 1e-8, -20.0, -100.0,
                                                         float("inf"), float("-inf"), float("nan")])])
    expected = F.elu(x)
    got = unet.elu_inference_(x.clone())
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-7, equal_nan=True)
    y = x.clone()
    assert unet.elu_inference_(y).data_ptr() == y.data_ptr()  # in place: no new activation buffer


def _net(make):
    net = make()
    torch.manual_seed(3)
    with torch.no_grad():  # non-zero output layers, so that every map depends on the features
        for head in net.heads.values():
            head[-1].weight.copy_(0.1 * torch.randn_like(head[-1].weight))
            head[-1].bias.copy_(0.1 * torch.randn_like(head[-1].bias))
    return net.eval()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("make", [lambda: SigmaMUNet.from_preset("tiny"),
                                  lambda: SigmaMUNet.from_preset("tiny", norm="group"),
                                  lambda: DoubleMUNet.from_preset("tiny")], ids=["sigma", "sigma-groupnorm", "double"])
def test_inference_outputs_equal_the_plain_forward(make, channels_last, monkeypatch):
    net = _net(make)
    frames = 20 + 20 * torch.rand(3, net.in_channels, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    if channels_last:
        net.to(memory_format=torch.channels_last)
    calls = []
    original = unet.elu_inference_
    monkeypatch.setattr(unet, "elu_inference_", lambda x: calls.append(1) or original(x))
    plain = net(frames)  # autograd on: the ELU modules
    assert not calls
    with torch.inference_mode():
        fast = net(frames)
    assert len(calls) > 10  # every U-Net block and head took the fast ELU
    for key in plain:
        assert plain[key].std() > 0 or key in ("z", "z_sigma"), key
        scale = float(plain[key].detach().abs().max())  # maps are in their units (nm, photons)
        torch.testing.assert_close(fast[key], plain[key].detach(), rtol=1e-5, atol=1e-5 * scale)
    with torch.no_grad():  # cached features (predict's path) take it too
        f = net.encode_frames(frames[:, :, 1])
        out = net.decode_windows(f, f, f)
    assert out["p"].shape == plain["p"].shape


def test_training_still_runs_the_elu_modules_and_gets_gradients():
    net = _net(lambda: SigmaMUNet.from_preset("tiny")).train()
    out = net(20 + 20 * torch.rand(2, 1, 3, 16, 16))
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in net.parameters())
