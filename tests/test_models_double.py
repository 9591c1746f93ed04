"""DoubleMUNet: one molecule, two channels - consistency by construction, shapes, caching, saving."""

import json

import pytest
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.models import DoubleMUNet, Scaling, SigmaMUNet
from tests.numerics import assert_maps_close, assert_maps_differ, randomize_output_layers

SCALING = Scaling(input_offset=10.0, input_scale=20.0, photons_max=2000.0, z_max=600.0, bg_max=40.0)


def tiny(**kwargs) -> DoubleMUNet:
    torch.manual_seed(0)
    return DoubleMUNet.from_preset("tiny", scaling=SCALING, **kwargs)


def windows(batch=2, size=16, seed=1) -> torch.Tensor:
    """Two-channel frames in photons: bg ~10 and ~20 photons/px, one spot split 30 % / 70 %."""
    g = torch.Generator().manual_seed(seed)
    bg = torch.tensor([10.0, 20.0]).view(1, 2, 1, 1, 1).expand(batch, 2, 3, size, size)
    frames = torch.poisson(bg.contiguous(), generator=g)
    frames[:, 0, :, size // 2, size // 2] += 150.0
    frames[:, 1, :, size // 2, size // 2] += 350.0
    return frames


def test_the_seeds_constructor_call_builds_the_network():
    model = DoubleMUNet(in_channels=1, out_channels_ch1=5, out_channels_ch2=5, out_channels_ratio=1, uncertainty=True)
    print(f"DoubleMUNet default: {model.num_parameters():,} parameters")
    # shared stage 1 (1 -> 48) + stage 2 on 6 x 48 channels + heads (1 + 5 + 5 + 2 outputs)
    decode = SigmaMUNet.from_preset("decode")
    stage2_extra = (6 - 3) * 48 * 48 * 9  # wider first conv of stage 2
    heads_extra = 48 * (1 + 1 + 1) + 3   # one more mean, sigma and bg channel
    assert model.num_parameters() == decode.num_parameters() + stage2_extra + heads_extra


def test_outputs_have_one_position_per_molecule_and_per_channel_background():
    model = tiny().eval()
    with torch.no_grad():
        out = model(windows(batch=2, size=16))
    assert set(out) == set(DoubleMUNet.OUTPUT_KEYS)
    for key, value in out.items():
        assert value.shape == ((2, 2, 16, 16) if key == "bg" else (2, 16, 16)), key
        assert torch.isfinite(value).all(), key
    assert not any(key.startswith(("dx_ch", "dy_ch", "z_ch")) for key in out)
    assert ((out["ratio"] > 0) & (out["ratio"] < 1)).all()
    assert ((out["photons"] >= 0) & (out["photons"] <= 2000.0)).all()
    assert ((out["bg"] >= 0) & (out["bg"] <= 40.0)).all()
    assert ((out["ratio_sigma"] > 0) & (out["ratio_sigma"] <= 0.501)).all()


def test_channel_photons_add_up_to_the_total_and_their_fraction_is_the_ratio():
    model = tiny().eval()
    with torch.no_grad():
        out = model(windows(batch=3, size=16, seed=7))
    torch.testing.assert_close(out["photons_ch1"] + out["photons_ch2"], out["photons"], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(out["photons_ch1"] / out["photons"], out["ratio"], rtol=1e-5, atol=1e-6)
    assert (out["photons_ch1"] >= 0).all() and (out["photons_ch2"] >= 0).all()


def test_channel_photon_sigmas_follow_first_order_error_propagation():
    # var(f) = J diag(sN^2, sr^2) J^T for f = r N and f = (1 - r) N, with J from autograd (not the closed form)
    model = tiny().eval()
    with torch.no_grad():
        out = model(windows(batch=1, size=16, seed=2))
    for i, j in ((0, 0), (8, 8), (3, 11)):
        n, r = out["photons"][0, i, j].item(), out["ratio"][0, i, j].item()
        sn, sr = out["photons_sigma"][0, i, j].item(), out["ratio_sigma"][0, i, j].item()
        for key, f in (("photons_ch1_sigma", lambda n, r: r * n), ("photons_ch2_sigma", lambda n, r: (1 - r) * n)):
            jn, jr = torch.autograd.functional.jacobian(f, (torch.tensor(n, dtype=torch.float64),
                                                            torch.tensor(r, dtype=torch.float64)))
            expected = (jn ** 2 * sn ** 2 + jr ** 2 * sr ** 2).sqrt().item()
            assert out[key][0, i, j].item() == pytest.approx(expected, rel=1e-4)


def test_shared_stage1_treats_both_channels_alike_and_separate_stage1_does_not():
    frame = torch.poisson(torch.full((1, 1, 16, 16), 15.0)).expand(1, 2, 16, 16).contiguous()  # ch1 == ch2
    shared, separate = tiny().eval(), tiny(share_stage1=False).eval()
    with torch.no_grad():
        fs, fp = shared.encode_frames(frame), separate.encode_frames(frame)
    f = shared.features
    assert fs.shape == fp.shape == (1, 2 * f, 16, 16)
    assert torch.equal(fs[:, :f], fs[:, f:])
    assert not torch.allclose(fp[:, :f], fp[:, f:])
    extra = sum(p.numel() for p in shared.stage1.parameters())
    assert separate.num_parameters() == shared.num_parameters() + extra


def test_cached_frame_features_give_the_same_outputs_as_the_plain_forward():
    model = randomize_output_layers(tiny()).eval()  # every map depends on the frames, not only p
    g = torch.Generator().manual_seed(4)
    movie = torch.poisson(torch.full((5, 2, 16, 16), 12.0), generator=g)
    movie[2, :, 5, 9] += torch.tensor([100.0, 300.0])
    stacked = torch.stack([movie[t - 1:t + 2] for t in range(1, 4)]).transpose(1, 2)  # (3, 2, 3, H, W)
    with torch.no_grad():
        plain = model(stacked)
        f = model.encode_frames(movie)
        cached = model.decode_windows(f[0:3], f[1:4], f[2:5])
        swapped = model.decode_windows(f[2:5], f[1:4], f[0:3])  # t+1 and t-1 exchanged
    assert_maps_close(cached, plain)
    assert_maps_differ(swapped, plain)  # the tolerance is far below what a wrong frame order changes


def test_save_pretrained_and_from_pretrained_round_trip_gives_identical_outputs(tmp_path):
    model = tiny(share_stage1=False, z_enabled=False).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["share_stage1"] is False and config["scaling"]["photons_max"] == 2000.0
    loaded = DoubleMUNet.from_pretrained(tmp_path).eval()
    frames = windows()
    with torch.no_grad():
        a, b = model(frames), loaded(frames)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_gradient_checkpointing_gives_the_same_gradients():
    frames = windows()
    model = randomize_output_layers(tiny()).train()
    checkpointed = tiny(gradient_checkpointing=True).train()
    checkpointed.load_state_dict(model.state_dict())
    grads = []
    for m in (model, checkpointed):
        out = m(frames)
        sum(v.mean() / (1 + v.detach().abs().mean()) for v in out.values()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert_maps_close(grads[1], grads[0])  # each parameter's gradient to 1e-3 of its own largest element


@pytest.mark.parametrize("kwargs, field", [(dict(in_channels=2), "in_channels"),
                                           (dict(out_channels_ch1=4), "out_channels_ch1"),
                                           (dict(out_channels_ratio=2), "out_channels_ratio")])
def test_impossible_channel_counts_raise_a_clear_error(kwargs, field):
    with pytest.raises(DecodeAccelError, match=field):
        DoubleMUNet(features=4, **kwargs)


@pytest.mark.parametrize("shape", [(1, 1, 3, 16, 16), (1, 3, 16, 16), (1, 6, 16, 16)])
def test_single_channel_or_four_dimensional_input_raises_a_clear_error(shape):
    # (B, 3, H, W) is DECODE's single-channel form; a two-channel model cannot tell its channels apart in it
    with pytest.raises(DecodeAccelError, match=r"expected shape \(B, 2, 3, H, W\) in photons"):
        tiny()(torch.zeros(shape))


def test_stage1_features_of_a_channel_depend_only_on_that_channel_and_that_frame():
    model = tiny().eval()
    g = torch.Generator().manual_seed(9)
    frames = torch.poisson(torch.full((3, 2, 16, 16), 15.0), generator=g)
    changed = frames.clone()
    changed[1, 1] += 200.0  # frame 1, channel 2 only
    f = model.features
    with torch.no_grad():
        a, b = model.encode_frames(frames), model.encode_frames(changed)
        single = model.encode_frames(frames[2:3])
    assert torch.equal(a[:, :f], b[:, :f])           # channel-1 features of every frame unchanged
    assert torch.equal(a[[0, 2]], b[[0, 2]])         # other frames unchanged
    assert not torch.allclose(a[1, f:], b[1, f:])    # the changed channel-frame did change
    assert_maps_close({"features": single[0]}, {"features": a[2]})
