"""SigmaMUNet: shapes, ranges and units of the outputs; caching; saving; checkpointing."""

import json
import math

import pytest
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.models import Scaling, SigmaMUNet
from tests.numerics import assert_maps_close, assert_maps_differ, randomize_output_layers

SCALING = Scaling(input_offset=10.0, input_scale=20.0, photons_max=2000.0, z_max=600.0, bg_max=40.0)


def tiny(**kwargs) -> SigmaMUNet:
    torch.manual_seed(0)
    return SigmaMUNet.from_preset("tiny", scaling=SCALING, **kwargs)


def windows(batch=2, channels=1, size=16, seed=1) -> torch.Tensor:
    """Frames in photons: background ~10 photons/px plus one bright spot per frame."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.poisson(torch.full((batch, channels, 3, size, size), 10.0), generator=g)
    frames[..., size // 2, size // 2] += 500.0
    return frames


def test_decode_preset_has_decodes_2_2_million_parameters():
    model = SigmaMUNet.from_preset("decode")
    n = model.num_parameters()
    print(f"SigmaMUNet 'decode' preset: {n:,} parameters")
    # DECODE: 2 199 419, of which one is its non-trainable sigma epsilon (a constant here)
    assert n == 2_199_418
    # the seed's constructor call builds the same network
    assert SigmaMUNet(in_channels=1, out_channels=5, uncertainty=True).num_parameters() == n


def test_smaller_presets_are_smaller():
    sizes = [SigmaMUNet.from_preset(name).num_parameters() for name in ("tiny", "cpu_small", "decode")]
    assert sizes[0] < sizes[1] < sizes[2]


def test_outputs_have_the_documented_shapes_and_ranges():
    model = tiny().eval()
    with torch.no_grad():
        out = model(windows(batch=2, size=16))
    assert set(out) == set(SigmaMUNet.OUTPUT_KEYS)
    for key in SigmaMUNet.OUTPUT_KEYS:
        expected = (2, 1, 16, 16) if key == "bg" else (2, 16, 16)
        assert out[key].shape == expected, key
        assert torch.isfinite(out[key]).all(), key
    lo, hi = 1 / (1 + math.exp(8)), 1 / (1 + math.exp(-8))
    assert ((out["p"] >= lo - 1e-7) & (out["p"] <= hi + 1e-7)).all()
    assert (out["logits"].abs() <= 8).all()
    assert torch.allclose(out["p"], torch.sigmoid(out["logits"]))
    assert ((out["photons"] >= 0) & (out["photons"] <= 2000.0)).all()
    assert (out["dx"].abs() <= model.scaling.offset_max).all() and (out["dy"].abs() <= model.scaling.offset_max).all()
    assert (out["z"].abs() <= 600.0).all()
    assert ((out["bg"] >= 0) & (out["bg"] <= 40.0)).all()
    # sigmas: (3 sigmoid + 0.001) x unit, unit = photons_max (photons), 1 px, z_max (nm)
    for key, unit in (("photons_sigma", 2000.0), ("dx_sigma", 1.0), ("dy_sigma", 1.0), ("z_sigma", 600.0)):
        assert (out[key] >= 0.001 * unit * (1 - 1e-5)).all(), key
        assert (out[key] <= 3.001 * unit * (1 + 1e-5)).all(), key


def test_detection_probability_starts_near_sigmoid_of_minus_six():
    # the p-head bias of -6 means ~0.0025 expected emitters per pixel before training
    model = tiny().eval()
    with torch.no_grad():
        p = model(windows(batch=4, size=32))["p"]
    assert 0.0005 < float(p.mean()) < 0.02


def test_logits_beyond_the_clamp_still_pass_gradient_back():
    # values stay within [-8, 8] as in DECODE, but a pixel pushed far below -8 must be able to come back
    model = tiny()
    with torch.no_grad():
        model.heads["p"][-1].bias.fill_(-30.0)
    out = model(windows())
    assert torch.all((out["logits"] >= -8.0) & (out["logits"] < -7.9))
    (-out["p"].log()).sum().backward()  # any loss that wants more detections
    assert model.heads["p"][-1].bias.grad.item() < 0  # gradient descent raises the bias


def test_the_model_applies_its_input_scaling_itself():
    plain = Scaling(input_offset=0.0, input_scale=1.0, photons_max=2000.0, z_max=600.0, bg_max=40.0)
    model, reference = randomize_output_layers(tiny()).eval(), SigmaMUNet.from_preset("tiny", scaling=plain).eval()
    reference.load_state_dict(model.state_dict())
    frames = windows()
    with torch.no_grad():
        a = model(frames)
        b = reference((frames - 10.0) / 20.0)
        unscaled = reference(frames)
    assert_maps_close(a, b)
    assert_maps_differ(unscaled, b)  # the comparison would notice a model that skips its scaling


def test_outputs_are_in_physical_units_set_by_the_scaling():
    model = randomize_output_layers(tiny()).eval()
    doubled = SigmaMUNet.from_preset("tiny", scaling=SCALING.model_copy(
        update=dict(photons_max=4000.0, z_max=1200.0, bg_max=80.0))).eval()
    doubled.load_state_dict(model.state_dict())
    frames = windows()
    with torch.no_grad():
        a, b = model(frames), doubled(frames)
    scaled = ("photons", "photons_sigma", "z", "z_sigma", "bg")
    assert_maps_close({key: b[key] for key in scaled}, {key: 2 * a[key] for key in scaled})
    for key in ("p", "dx", "dy", "dx_sigma", "dy_sigma"):
        torch.testing.assert_close(b[key], a[key])


def test_a_2d_model_predicts_z_zero_with_a_constant_sigma():
    model = tiny(z_enabled=False).eval()
    with torch.no_grad():
        out = model(windows())
    assert (out["z"] == 0).all()
    assert torch.all(out["z_sigma"] == out["z_sigma"].flatten()[0]) and (out["z_sigma"] > 0).all()


def test_without_uncertainty_there_are_no_sigma_maps():
    out = tiny(uncertainty=False, out_channels=None).eval()(windows())
    assert not any(key.endswith("_sigma") for key in out)
    assert {"p", "photons", "dx", "dy", "z", "bg", "logits"} <= set(out)


def test_cached_frame_features_give_the_same_outputs_as_the_plain_forward():
    model = randomize_output_layers(tiny()).eval()  # every map depends on the frames, not only p
    g = torch.Generator().manual_seed(3)
    movie = torch.poisson(torch.full((6, 1, 16, 16), 12.0), generator=g) + 300.0 * (torch.rand(6, 1, 16, 16, generator=g) > 0.98)
    stacked = torch.stack([movie[t - 1:t + 2] for t in range(1, 5)])  # (4, 3, 1, H, W): windows at t = 1..4
    with torch.no_grad():
        plain = model(stacked.transpose(1, 2))
        features = model.encode_frames(movie)  # each frame through stage 1 once
        assert features.shape == (6, model.frame_features, 16, 16)
        cached = model.decode_windows(features[0:4], features[1:5], features[2:6])
        swapped = model.decode_windows(features[2:6], features[1:5], features[0:4])  # t+1 and t-1 exchanged
    assert_maps_close(cached, plain)
    assert_maps_differ(swapped, plain)  # the tolerance is far below what a wrong frame order changes


@pytest.mark.parametrize("shape", [(1, 1, 3, 18, 16), (1, 1, 3, 16, 14)])
def test_frames_whose_size_is_not_a_multiple_of_four_raise_a_clear_error(shape):
    with pytest.raises(DecodeAccelError, match=r"multiples of 4"):
        tiny()(torch.zeros(shape))
    with pytest.raises(DecodeAccelError, match=r"multiples of 4"):
        tiny().encode_frames(torch.zeros(shape[0], 1, *shape[-2:]))


def test_a_single_channel_model_takes_decodes_four_dimensional_batch_of_three_stacked_frames():
    model = randomize_output_layers(tiny()).eval()
    frames = windows(batch=2)  # (B, 1, 3, H, W)
    with torch.no_grad():
        five_d, four_d = model(frames), model(frames[:, 0])  # (B, 3, H, W): frames t-1, t, t+1 on axis 1
    assert set(four_d) == set(five_d)
    for key in five_d:
        assert torch.equal(four_d[key], five_d[key]), key


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (2, 2, 16, 16), (2, 16, 16), (2, 2, 3, 16, 16), (2, 1, 4, 16, 16)])
def test_batches_of_any_other_shape_raise_an_error_that_names_both_accepted_shapes(shape):
    with pytest.raises(DecodeAccelError, match=r"\(B, 1, 3, H, W\) or \(B, 3, H, W\).*" + str(shape[0])):
        tiny()(torch.zeros(shape))


def test_a_four_dimensional_batch_still_needs_a_frame_size_that_is_a_multiple_of_four():
    with pytest.raises(DecodeAccelError, match=r"multiples of 4"):
        tiny()(torch.zeros(2, 3, 18, 16))


def test_out_channels_other_than_the_seeds_five_are_rejected():
    with pytest.raises(DecodeAccelError, match="out_channels"):
        SigmaMUNet(out_channels=7, features=4)
    assert SigmaMUNet(out_channels=10, features=4) is not None  # DECODE's raw channel count is fine


def test_save_pretrained_and_from_pretrained_round_trip_gives_identical_outputs(tmp_path):
    model = tiny(z_enabled=False, norm="group", activation="gelu").eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["scaling"] == SCALING.model_dump() and config["features"] == 8 and config["z_enabled"] is False
    card = (tmp_path / "README.md").read_text()
    assert "library_name: decode_accel" in card and "smlm" in card and "microscopy" in card
    loaded = SigmaMUNet.from_pretrained(tmp_path).eval()
    assert loaded.scaling == SCALING and loaded.norm == "group" and loaded.activation == "gelu"
    frames = windows()
    with torch.no_grad():
        a, b = model(frames), loaded(frames)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_from_pretrained_refuses_weights_that_do_not_fit_the_config(tmp_path):
    tiny(uncertainty=False).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="Missing key"):
        SigmaMUNet.from_pretrained(tmp_path, uncertainty=True)


def test_a_channels_last_model_saves_and_gives_the_same_outputs(tmp_path):
    model = randomize_output_layers(tiny()).eval()
    frames = windows()
    with torch.no_grad():
        expected = model(frames)
        model = model.to(memory_format=torch.channels_last)
        got = model(frames)
    assert_maps_close(got, expected)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        again = SigmaMUNet.from_pretrained(tmp_path).eval()(frames)
    assert_maps_close(again, expected)


def test_changing_the_scaling_after_construction_is_saved(tmp_path):
    model = tiny()
    model.scaling = dict(SCALING.model_dump(), bg_max=99.0)
    model.save_pretrained(tmp_path)
    assert SigmaMUNet.from_pretrained(tmp_path).scaling.bg_max == 99.0


def test_a_detection_beside_the_frame_border_can_place_its_emitter_anywhere_in_the_border_pixel():
    # Trained networks fire one pixel inside the frame for emitters of the outermost column or row (both
    # benchmark models: p ~ 0 in column 0 and in the bottom row). With DECODE's dx, dy in (-1, 1) that
    # detection reaches no closer than 0.5 px to the border, and border positions piled up there
    # (+14 nm in column 0, -22 nm in the bottom row). The heads must reach the border itself.
    model = tiny().eval()
    with torch.no_grad():
        model.heads["mean"][-1].bias[1] = -20.0   # dx as far left as it goes
        model.heads["mean"][-1].bias[2] = 20.0    # dy as far down as it goes
        out = model(windows(size=16))
    x_from_column_1 = 1 + 0.5 + out["dx"][..., 1]
    y_from_row_14 = 14 + 0.5 + out["dy"][..., 14, :]
    assert (x_from_column_1 < 0.01).all() and (y_from_row_14 > 15.99).all()


def test_an_export_stored_before_offset_max_keeps_the_dx_range_its_weights_were_trained_for(tmp_path):
    model = randomize_output_layers(tiny()).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["scaling"]["offset_max"] == 1.5
    del config["scaling"]["offset_max"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = SigmaMUNet.from_pretrained(tmp_path).eval()
    assert old.scaling.offset_max == 1.0
    with torch.no_grad():
        new_dx, old_dx = model(windows())["dx"], old(windows())["dx"]
    assert torch.allclose(old_dx * 1.5, new_dx, atol=1e-6)


def _gradients(model, frames):
    model.zero_grad()
    torch.manual_seed(5)  # same dropout masks in both runs
    out = model(frames)
    loss = sum(value.float().mean() / (1 + value.detach().abs().mean()) for value in out.values())
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    frames = windows()
    model = randomize_output_layers(tiny(dropout=0.2)).train()
    checkpointed = tiny(dropout=0.2, gradient_checkpointing=True).train()
    checkpointed.load_state_dict(model.state_dict())
    a, b = _gradients(model, frames), _gradients(checkpointed, frames)
    assert a.keys() == b.keys() and len(a) == len(list(model.parameters()))
    assert_maps_close(b, a)  # each parameter's gradient to 1e-3 of its own largest element


def test_every_parameter_receives_a_gradient():
    # at initialisation the zero output layers of the heads learn (the layers before them wait one update) ...
    grads = _gradients(tiny().train(), windows())
    for name, head in tiny().heads.items():
        assert float(grads[f"heads.{name}.{len(head) - 1}.weight"].abs().sum()) > 0, name
    # ... and once those are non-zero, as after the first update, every parameter receives a gradient
    grads = _gradients(randomize_output_layers(tiny()).train(), windows())
    assert all(float(g.abs().sum()) > 0 for g in grads.values())


@pytest.mark.slow
def test_torch_compile_gives_the_same_outputs():
    model = tiny().eval()
    frames = windows()
    compiled = torch.compile(model)
    with torch.no_grad():
        a, b = model(frames), compiled(frames)
    assert_maps_close(b, a)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_new_network_predicts_no_offset_on_either_axis_whatever_its_random_seed(seed):
    # With random output layers the dx map of a new network had a constant part of up to 0.5 px that
    # differed between x and y; a short training kept it as a constant offset of the positions.
    torch.manual_seed(seed)
    model = SigmaMUNet.from_preset("tiny", scaling=SCALING).eval()
    with torch.no_grad():
        out = model(windows(seed=seed))
    for key in ("dx", "dy", "z"):
        assert torch.count_nonzero(out[key]) == 0, key
    # the detection head is the one that starts from the DECODE prior (p ~ 0.0025), not from zero
    assert 0.001 < float(out["p"].mean()) < 0.01


def test_under_bf16_autocast_the_heads_and_their_activations_run_in_fp32():
    # tanh of a bf16 logit has steps of ~2^-9: dx would be quantised to ~0.2 nm; the heads must not be
    torch.manual_seed(0)
    net = SigmaMUNet.from_preset("tiny").eval()
    for head in net.heads.values():
        torch.nn.init.normal_(head[-1].weight if isinstance(head, torch.nn.Sequential) else head.weight, std=0.3)
    windows = torch.rand(2, 1, 3, 16, 16) * 50
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = net(windows)
    for name in ("p", "dx", "dy", "photons", "bg"):
        assert out[name].dtype == torch.float32, name
    dx = out["dx"].flatten()
    # bf16 values near 0.1-0.5 are multiples of 2^-10 or coarser: fp32 outputs are not
    assert (torch.remainder(dx.abs() * 2 ** 10, 1.0) > 1e-3).float().mean() > 0.5
