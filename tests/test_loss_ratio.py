import math

import pytest
import torch
from scipy.stats import norm

from decode_accel.errors import DecodeAccelError
from decode_accel.loss import GaussianMMLoss, RatioGaussianNLLLoss
from tests.test_loss_support import (BG_MAX, PHOTONS_MAX, Z_MAX, add_two_channels, brute_gmm_terms, brute_ratio_nll,
                                     make_single_channel_case)

SCALES = {"photons_max": PHOTONS_MAX, "z_max": Z_MAX, "bg_max": BG_MAX}


def test_the_seed_call_with_no_arguments_works_on_single_channel_maps_as_plain_gaussian_mm():
    output, batch = make_single_channel_case()
    del batch["tgt_ratio"]
    terms = RatioGaussianNLLLoss()(output, batch)
    assert set(terms) == {"count_loss", "loc_loss", "bg_loss", "loss"}
    assert all(torch.isfinite(value) for value in terms.values())
    scaled = RatioGaussianNLLLoss(**SCALES)(output, batch)
    count, loc = brute_gmm_terms(output, batch)
    assert scaled["count_loss"].item() == pytest.approx(count, rel=1e-4)
    assert scaled["loc_loss"].item() == pytest.approx(loc, rel=1e-4)
    assert scaled["loss"].item() == pytest.approx(GaussianMMLoss(**SCALES)(output, batch)["loss"].item(), rel=1e-6)


@pytest.mark.parametrize("window", [3, 1])
def test_ratio_term_equals_the_brute_force_p_weighted_neighbourhood_nll(window):
    output, batch = add_two_channels(*make_single_channel_case(seed=11))
    # One emitter in a corner pixel, so that part of its 3x3 window lies outside the frame.
    batch["tgt_xyz"][0, 0, :2] = torch.tensor([0.2, 3.9])
    terms = RatioGaussianNLLLoss(window=window, **SCALES)(output, batch)
    assert terms["ratio_loss"].item() == pytest.approx(brute_ratio_nll(output, batch, window), rel=1e-4)
    count, loc = brute_gmm_terms(output, batch)
    expected = count + loc + terms["bg_loss"].item() + brute_ratio_nll(output, batch, window)
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-4)


def test_a_sharp_detection_reads_the_ratio_of_the_pixel_containing_the_emitter():
    p = torch.full((1, 4, 4), 1e-6)
    p[0, 2, 1] = 1.0  # the emitter at x = 1.7, y = 2.2 lies in row 2, column 1
    ratio = torch.full_like(p, 0.9)
    ratio[0, 2, 1] = 0.3
    output, batch = make_single_channel_case(batch=1)
    output.update(p=p, ratio=ratio, ratio_sigma=torch.full_like(p, 0.05))
    batch.update(tgt_xyz=torch.tensor([[[1.7, 2.2, 0.0]]]), tgt_photons=torch.tensor([[1000.0]]),
                 tgt_mask=torch.tensor([[True]]), tgt_ratio=torch.tensor([[0.35]]))
    terms = RatioGaussianNLLLoss(**SCALES)(output, batch)
    assert terms["ratio_loss"].item() == pytest.approx(-norm.logpdf(0.35, 0.3, 0.05), rel=1e-3)


def test_the_ratio_term_does_not_move_detections():
    output, batch = add_two_channels(*make_single_channel_case(seed=12))
    p = output["p"].clone().requires_grad_(True)
    ratio = output["ratio"].clone().requires_grad_(True)
    output.update(p=p, ratio=ratio)
    loss = RatioGaussianNLLLoss(count_weight=0.0, loc_weight=0.0, bg_weight=0.0, **SCALES)
    loss(output, batch)["loss"].backward()
    assert p.grad is None or torch.all(p.grad == 0)
    assert ratio.grad.abs().sum() > 0


def test_ratio_gradient_pulls_the_prediction_towards_the_true_ratio():
    output, batch = add_two_channels(*make_single_channel_case(seed=13))
    output["ratio"] = torch.full_like(output["p"], 0.5).requires_grad_(True)
    batch["tgt_ratio"] = torch.full_like(batch["tgt_ratio"], 0.8)
    RatioGaussianNLLLoss(**SCALES)(output, batch)["ratio_loss"].backward()
    assert torch.all(output["ratio"].grad <= 0) and output["ratio"].grad.sum() < 0


def test_ratio_weight_is_scheduled_by_name_and_missing_inputs_are_named():
    output, batch = add_two_channels(*make_single_channel_case())
    loss = RatioGaussianNLLLoss(**SCALES)
    loss.update_weights(ratio_weight=0.0)
    without = loss(output, batch)
    assert without["loss"].item() == pytest.approx(
        (without["count_loss"] + without["loc_loss"] + without["bg_loss"]).item(), rel=1e-6)
    del output["ratio_sigma"]
    with pytest.raises(DecodeAccelError, match=r"ratio_sigma"):
        loss(output, batch)
    with pytest.raises(DecodeAccelError, match="window"):
        RatioGaussianNLLLoss(window=2)
    with pytest.raises(DecodeAccelError, match="conservation_weight"):
        loss.update_weights(conservation_weight=1.0)
    assert math.isfinite(loss.weights["ratio_weight"])
