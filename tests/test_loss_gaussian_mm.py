import math
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import norm

from decode_accel.errors import DecodeAccelError
from decode_accel.loss import GaussianMMLoss, build_loss
from tests.test_loss_support import (BG_MAX, PHOTONS_MAX, Z_MAX, brute_bg_mse, brute_gmm_terms,
                                     make_single_channel_case)


def make_loss(**kwargs):
    return GaussianMMLoss(photons_max=PHOTONS_MAX, z_max=Z_MAX, bg_max=BG_MAX, **kwargs)


def test_terms_equal_a_brute_force_loop_over_frames_emitters_and_pixels():
    output, batch = make_single_channel_case()
    terms = make_loss()(output, batch)
    count, loc = brute_gmm_terms(output, batch)
    assert terms["count_loss"].item() == pytest.approx(count, rel=1e-4)
    assert terms["loc_loss"].item() == pytest.approx(loc, rel=1e-4)
    assert terms["bg_loss"].item() == pytest.approx(brute_bg_mse(output["bg"], batch["bg"]), rel=1e-4)
    assert terms["loss"].item() == pytest.approx(count + loc + brute_bg_mse(output["bg"], batch["bg"]), rel=1e-4)


def test_a_2d_loss_leaves_z_out_of_the_mixture():
    output, batch = make_single_channel_case(seed=3)
    terms = make_loss(z_enabled=False)(output, batch)
    _, loc = brute_gmm_terms(output, batch, z_enabled=False)
    assert terms["loc_loss"].item() == pytest.approx(loc, rel=1e-4)
    del output["z"], output["z_sigma"]
    assert make_loss(z_enabled=False)(output, batch)["loc_loss"].item() == pytest.approx(loc, rel=1e-4)


def test_an_emitter_at_a_pixel_centre_is_scored_by_that_pixel_along_columns_for_x():
    # All detection mass on pixel (row 1, column 2), whose centre is x = 2.5 px, y = 1.5 px. A target
    # exactly at its predicted mean has NLL = sum_d (log sigma_d + log sqrt(2 pi)) in normalised units.
    height, width = 4, 4
    p = torch.zeros(1, height, width)
    p[0, 1, 2] = 1.0
    sig = {"photons_sigma": 200.0, "dx_sigma": 0.2, "dy_sigma": 0.3, "z_sigma": 60.0}
    output = {"p": p, "photons": torch.full_like(p, 1000.0), "dx": torch.zeros_like(p), "dy": torch.zeros_like(p),
              "z": torch.full_like(p, 100.0), "bg": torch.zeros(1, 1, height, width)}
    output.update({key: torch.full_like(p, value) for key, value in sig.items()})
    batch = {"tgt_xyz": torch.tensor([[[2.5, 1.5, 100.0]]]), "tgt_photons": torch.tensor([[1000.0]]),
             "tgt_mask": torch.tensor([[True]]), "bg": torch.zeros(1, 1, height, width)}
    expected = sum(math.log(s) + 0.5 * math.log(2 * math.pi)
                   for s in (200.0 / PHOTONS_MAX, 0.2, 0.3, 60.0 / Z_MAX))
    loss = make_loss()
    assert loss(output, batch)["loc_loss"].item() == pytest.approx(expected, abs=1e-4)
    # The transposed position (x = 1.5, y = 2.5) is 1 px off in both axes: 0.5/0.2^2 + 0.5/0.3^2 nats worse.
    batch["tgt_xyz"] = torch.tensor([[[1.5, 2.5, 100.0]]])
    worse = expected + 0.5 / 0.2 ** 2 + 0.5 / 0.3 ** 2
    assert loss(output, batch)["loc_loss"].item() == pytest.approx(worse, rel=1e-4)


def test_count_term_is_the_gaussian_approximation_of_the_poisson_binomial_count():
    p = torch.tensor([[[0.9, 0.8], [0.1, 0.3]]])
    mean, var = 2.1, 0.9 * 0.1 + 0.8 * 0.2 + 0.1 * 0.9 + 0.3 * 0.7
    for n in (0, 2, 3):
        mask = torch.zeros(1, 3, dtype=torch.bool)
        mask[0, :n] = True
        output = {"p": p, "photons": torch.ones_like(p), "photons_sigma": torch.ones_like(p),
                  "dx": torch.zeros_like(p), "dy": torch.zeros_like(p), "dx_sigma": torch.ones_like(p),
                  "dy_sigma": torch.ones_like(p), "z": torch.zeros_like(p), "z_sigma": torch.ones_like(p),
                  "bg": torch.zeros(1, 1, 2, 2)}
        batch = {"tgt_xyz": torch.ones(1, 3, 3), "tgt_photons": torch.ones(1, 3), "tgt_mask": mask,
                 "bg": torch.zeros(1, 1, 2, 2)}
        expected = -norm.logpdf(n, mean, math.sqrt(var))
        assert make_loss()(output, batch)["count_loss"].item() == pytest.approx(expected, rel=1e-5)
        decode_style = make_loss(count_times_n=True)(output, batch)["count_loss"].item()
        assert decode_style == pytest.approx(n * expected, rel=1e-5, abs=1e-6)


def empty_frame(p_value: float, size: int = 4):
    logits = torch.full((1, size, size), math.log(p_value / (1 - p_value)), requires_grad=True)
    p = torch.sigmoid(logits)
    ones = torch.ones(1, size, size)
    output = {"p": p, "logits": logits, "photons": 500 * ones, "photons_sigma": 100 * ones, "dx": 0 * ones,
              "dy": 0 * ones, "dx_sigma": ones, "dy_sigma": ones, "z": 0 * ones, "z_sigma": 100 * ones,
              "bg": 10 * torch.ones(1, 1, size, size)}
    batch = {"tgt_xyz": torch.zeros(1, 1, 3), "tgt_photons": torch.zeros(1, 1),
             "tgt_mask": torch.zeros(1, 1, dtype=torch.bool), "bg": 10 * torch.ones(1, 1, size, size)}
    return logits, output, batch


def test_an_empty_frame_with_confident_detections_gives_a_positive_loss_whose_gradient_lowers_p():
    logits, output, batch = empty_frame(0.9)
    terms = make_loss()(output, batch)
    assert terms["loss"].item() > 0
    assert terms["loc_loss"].item() == 0.0  # no emitters: nothing to localize
    terms["loss"].backward()
    assert torch.all(logits.grad > 0), "gradient descent must lower every pixel's p on an empty frame"


def test_decode_style_count_times_n_teaches_nothing_on_an_empty_frame():
    logits, output, batch = empty_frame(0.9)
    terms = make_loss(count_times_n=True)(output, batch)
    assert terms["count_loss"].item() == 0.0
    terms["loss"].backward()
    assert torch.all(logits.grad == 0)


def test_gradients_stay_finite_at_the_clamps():
    output, batch = make_single_channel_case(seed=5)
    leaves = {}
    for key in ("p", "photons_sigma", "dx_sigma", "dy_sigma", "z_sigma", "dx"):
        value = output[key].clone()
        if key == "p":
            value[0, 0, :2] = 0.0  # exact 0 and 1: the extremes a clamp-free head could reach
            value[0, 1, :2] = 1.0
            value[1] = 1.0  # a whole frame at p = 1 (count variance would be 0 without the floor)
        else:
            value[0, :2, :2] = 0.0 if key.endswith("sigma") else value[0, :2, :2]
        leaves[key] = value.requires_grad_(True)
    output.update(leaves)
    terms = make_loss()(output, batch)
    terms["loss"].backward()
    assert all(torch.isfinite(term) for term in terms.values())
    for key, leaf in leaves.items():
        assert torch.all(torch.isfinite(leaf.grad)), key


def test_padded_target_rows_change_nothing_even_when_they_hold_nan():
    output, batch = make_single_channel_case(seed=7)
    clean = {key: value.clone() for key, value in batch.items()}
    clean["tgt_xyz"][~clean["tgt_mask"]] = 123.0
    clean["tgt_photons"][~clean["tgt_mask"]] = -5.0
    dx = output["dx"].clone().requires_grad_(True)
    output["dx"] = dx
    loss = make_loss()
    terms_nan = loss(output, batch)
    terms_nan["loss"].backward()
    grad_nan = dx.grad.clone()
    dx.grad = None
    terms_clean = loss(output, clean)
    terms_clean["loss"].backward()
    assert terms_nan["loss"].item() == pytest.approx(terms_clean["loss"].item(), rel=1e-6)
    assert torch.all(torch.isfinite(grad_nan)) and torch.allclose(grad_nan, dx.grad)


def test_terms_do_not_depend_on_batch_size_or_repetition():
    output, batch = make_single_channel_case(seed=2)
    single = make_loss()({k: v[:1] for k, v in output.items()}, {k: v[:1] for k, v in batch.items()})
    doubled = make_loss()({k: torch.cat([v[:1], v[:1]]) for k, v in output.items()},
                          {k: torch.cat([v[:1], v[:1]]) for k, v in batch.items()})
    for name in ("count_loss", "loc_loss", "bg_loss", "loss"):
        assert doubled[name].item() == pytest.approx(single[name].item(), rel=1e-5)


def test_the_total_is_the_weighted_sum_and_weights_can_be_changed_by_name():
    output, batch = make_single_channel_case()
    loss = make_loss(count_weight=0.5, loc_weight=2.0, bg_weight=3.0)
    terms = loss(output, batch)
    expected = 0.5 * terms["count_loss"] + 2.0 * terms["loc_loss"] + 3.0 * terms["bg_loss"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    loss.update_weights(bg_weight=0.0, loc_weight=torch.tensor(1.0))
    assert loss.weights == {"count_weight": 0.5, "loc_weight": 1.0, "bg_weight": 0.0}
    terms = loss(output, batch)
    assert terms["loss"].item() == pytest.approx((0.5 * terms["count_loss"] + terms["loc_loss"]).item(), rel=1e-6)


def test_unknown_or_negative_weights_are_rejected_with_a_clear_error():
    loss = make_loss()
    with pytest.raises(DecodeAccelError, match="ratio_weight.*use one of bg_weight, count_weight, loc_weight"):
        loss.update_weights(ratio_weight=1.0)
    with pytest.raises(DecodeAccelError, match="loc_weight"):
        loss.update_weights(loc_weight=-1.0)
    with pytest.raises(DecodeAccelError, match="count_weight"):
        make_loss(count_weight=float("nan"))
    assert loss.weights["loc_weight"] == 1.0  # a rejected update changes nothing


def test_scales_come_from_a_scaling_object_and_explicit_values_win():
    scaling = SimpleNamespace(photons_max=PHOTONS_MAX, z_max=Z_MAX, bg_max=1.0, input_scale=3.0)
    loss = GaussianMMLoss(scaling, bg_max=BG_MAX)
    assert (loss.scales.photons_max, loss.scales.z_max, loss.scales.bg_max) == (PHOTONS_MAX, Z_MAX, BG_MAX)
    assert GaussianMMLoss({"photons_max": 1.0, "z_max": 2.0, "bg_max": 3.0}).scales.z_max == 2.0
    with pytest.raises(DecodeAccelError, match="z_max"):
        GaussianMMLoss(SimpleNamespace(photons_max=1.0, bg_max=1.0))
    with pytest.raises(DecodeAccelError, match="photons_max"):
        GaussianMMLoss(photons_max=-3.0)


def test_photon_and_z_scales_shift_the_nll_by_a_constant_only():
    output, batch = make_single_channel_case(seed=4)
    dx = output["dx"].clone().requires_grad_(True)
    output["dx"] = dx
    a = make_loss()(output, batch)["loc_loss"]
    a.backward()
    grad_a = dx.grad.clone()
    dx.grad = None
    b = GaussianMMLoss(photons_max=10 * PHOTONS_MAX, z_max=Z_MAX, bg_max=BG_MAX)(output, batch)["loc_loss"]
    b.backward()
    # photons / photons_max with a 10x larger photons_max makes every photon density 10x larger.
    assert (a - b).item() == pytest.approx(math.log(10), rel=1e-4)
    assert torch.allclose(grad_a, dx.grad, rtol=1e-4, atol=1e-6)


def test_missing_maps_name_the_key_and_the_fix():
    output, batch = make_single_channel_case()
    del output["z_sigma"]
    with pytest.raises(DecodeAccelError, match=r"output\['z_sigma'\].*z_enabled=False"):
        make_loss()(output, batch)
    output, batch = make_single_channel_case()
    with pytest.raises(DecodeAccelError, match="batch sizes disagree"):
        make_loss()(output, {k: v[:1] for k, v in batch.items()})


def test_bf16_maps_are_evaluated_in_float32():
    output, batch = make_single_channel_case()
    reference = make_loss()(output, batch)["loss"]
    low = make_loss()({k: v.to(torch.bfloat16) for k, v in output.items()}, batch)["loss"]
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(reference.item(), rel=0.05)


def test_build_loss_maps_config_names_to_classes():
    assert isinstance(build_loss("GaussianMM", photons_max=1.0, z_max=1.0, bg_max=1.0), GaussianMMLoss)
    assert type(build_loss("GaussianMMLoss", loc_weight=2.0)).__name__ == "GaussianMMLoss"
    with pytest.raises(DecodeAccelError, match="use one of GaussianMM, RatioGaussianNLL, Unified"):
        build_loss("MSE")
    with pytest.raises(DecodeAccelError, match="GaussianMMLoss has no weight.*ratio_weight"):
        build_loss("GaussianMM", ratio_weight=1.0)
    short = build_loss("RatioGaussianNLL", count=0.5, loc_loss=2.0, ratio_weight=0.3, z_enabled=False, window=1)
    assert short.weights == {"count_weight": 0.5, "loc_weight": 2.0, "bg_weight": 1.0, "ratio_weight": 0.3}
    assert (short.z_enabled, short.window) == (False, 1)
    assert build_loss("Unified", ratio=0.8).weights["ratio_weight"] == 0.8


def test_weights_can_be_named_by_their_terms():
    loss = make_loss()
    loss.update_weights(count=0.25, bg_loss=4.0)
    assert loss.weights == {"count_weight": 0.25, "loc_weight": 1.0, "bg_weight": 4.0}
