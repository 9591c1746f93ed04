import math

import numpy as np
import pytest
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.loss import UnifiedLoss
from decode_accel.loss.unified import implied_ratio_sigma
from tests.test_loss_support import (BG_MAX, PHOTONS_MAX, Z_MAX, add_two_channels, brute_bg_mse, brute_gmm_terms,
                                     brute_ratio_nll, make_single_channel_case, np_)

SCALES = {"photons_max": PHOTONS_MAX, "z_max": Z_MAX, "bg_max": BG_MAX}


def brute_pixel_terms(output):
    """p-weighted (over every pixel of the batch) conservation and uncertainty penalties, from their definitions."""
    p, n, n1, n2 = (np_(output[k]) for k in ("p", "photons", "photons_ch1", "photons_ch2"))
    r, r_sigma = np_(output["ratio"]), np_(output["ratio_sigma"])
    s1, s2 = np_(output["photons_ch1_sigma"]), np_(output["photons_ch2_sigma"])
    conservation = ((n1 + n2 - n) / np.maximum(n, n1 + n2)) ** 2 + (r - n1 / (n1 + n2)) ** 2
    implied = np.sqrt((n2 ** 2 * s1 ** 2 + n1 ** 2 * s2 ** 2) / (n1 + n2) ** 4)
    uncertainty = (np.log(r_sigma) - np.log(implied)) ** 2
    return float((p * conservation).sum() / p.sum()), float((p * uncertainty).sum() / p.sum())


def test_every_term_equals_a_brute_force_computation():
    output, batch = add_two_channels(*make_single_channel_case(seed=21))
    terms = UnifiedLoss(**SCALES)(output, batch)
    ratio = batch["tgt_ratio"]
    count, ch1 = brute_gmm_terms(output, batch, "photons_ch1", lambda b, m: float(ratio[b, m]))
    _, ch2 = brute_gmm_terms(output, batch, "photons_ch2", lambda b, m: 1 - float(ratio[b, m]))
    conservation, uncertainty = brute_pixel_terms(output)
    expected = {"count_loss": count, "ch1_loss": ch1, "ch2_loss": ch2,
                "ratio_loss": brute_ratio_nll(output, batch), "conservation_loss": conservation,
                "uncertainty_loss": uncertainty,
                "bg_ch1_loss": brute_bg_mse(output["bg"][:, 0], batch["bg"][:, 0]),
                "bg_ch2_loss": brute_bg_mse(output["bg"][:, 1], batch["bg"][:, 1])}
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-4), name
    weights = {"count_loss": 1.0, "ch1_loss": 1.0, "ch2_loss": 1.0, "ratio_loss": 0.5, "conservation_loss": 0.1,
               "uncertainty_loss": 0.1, "bg_ch1_loss": 1.0, "bg_ch2_loss": 1.0}
    total = sum(weights[name] * value for name, value in expected.items())
    assert terms["loss"].item() == pytest.approx(total, rel=1e-4)


def test_conservation_is_zero_for_maps_consistent_by_construction_and_order_one_otherwise():
    consistent, batch = add_two_channels(*make_single_channel_case(seed=22), consistent=True)
    assert UnifiedLoss(**SCALES)(consistent, batch)["conservation_loss"].item() == pytest.approx(0.0, abs=1e-10)
    inconsistent = dict(consistent, photons_ch1=2 * consistent["photons_ch1"])
    value = UnifiedLoss(**SCALES)(inconsistent, batch)["conservation_loss"].item()
    assert 1e-3 < value < 2.0  # relative units: a factor-2 error in one channel is O(1), whatever the photon scale
    scaled = {k: (1000 * v if k.startswith("photons") else v) for k, v in inconsistent.items()}
    assert UnifiedLoss(**SCALES)(scaled, batch)["conservation_loss"].item() == pytest.approx(value, rel=1e-4)


def test_poisson_channel_sigmas_imply_the_binomial_sigma_of_the_ratio():
    # Independent Poisson counts N1 = rN, N2 = (1-r)N: the fraction N1/(N1+N2) has sd sqrt(r(1-r)/N).
    total = torch.tensor([1000.0, 250.0, 4000.0])
    r = torch.tensor([0.5, 0.2, 0.9])
    n1, n2 = r * total, (1 - r) * total
    sigma = implied_ratio_sigma(n1, n2, n1.sqrt(), n2.sqrt(), photons_floor=1.0)
    assert torch.allclose(sigma, (r * (1 - r) / total).sqrt(), rtol=1e-5)
    # ... and a Monte Carlo check of the propagation itself.
    rng = np.random.default_rng(0)
    draws1 = rng.poisson(500, 200_000)
    draws2 = rng.poisson(500, 200_000)
    assert np.std(draws1 / (draws1 + draws2)) == pytest.approx(sigma[0].item(), rel=0.02)


def test_uncertainty_term_vanishes_when_ratio_sigma_matches_the_propagated_sigma():
    output, batch = add_two_channels(*make_single_channel_case(seed=23))
    output["ratio_sigma"] = implied_ratio_sigma(output["photons_ch1"], output["photons_ch2"],
                                                output["photons_ch1_sigma"], output["photons_ch2_sigma"], 1.0)
    assert UnifiedLoss(**SCALES)(output, batch)["uncertainty_loss"].item() == pytest.approx(0.0, abs=1e-8)
    output["ratio_sigma"] = output["ratio_sigma"] * math.e  # a factor e too wide costs exactly 1
    assert UnifiedLoss(**SCALES)(output, batch)["uncertainty_loss"].item() == pytest.approx(1.0, rel=1e-4)


def test_empty_two_channel_frames_push_p_down_and_gradients_are_finite():
    output, batch = add_two_channels(*make_single_channel_case(seed=24))
    batch["tgt_mask"] = torch.zeros_like(batch["tgt_mask"])
    logits = torch.full_like(output["p"], 3.0).requires_grad_(True)
    output["p"] = torch.sigmoid(logits)
    output["photons_ch1_sigma"] = torch.zeros_like(output["p"])  # at the clamp
    terms = UnifiedLoss(**SCALES)(output, batch)
    assert terms["ch1_loss"].item() == 0.0 and terms["ratio_loss"].item() == 0.0
    terms["loss"].backward()
    assert all(torch.isfinite(value) for value in terms.values())
    assert torch.all(logits.grad > 0)


def test_seed_weights_are_accepted_and_scheduled_by_name():
    loss = UnifiedLoss(ch1_weight=1.0, ch2_weight=1.0, ratio_weight=0.5, conservation_weight=0.1,
                       uncertainty_weight=0.1)
    loss.update_weights(ch1_weight=1.0, ch2_weight=1.0, ratio_weight=0.8, conservation_weight=0.2)
    assert loss.weights["ratio_weight"] == 0.8 and loss.weights["conservation_weight"] == 0.2
    with pytest.raises(DecodeAccelError, match="loc_weight"):
        loss.update_weights(loc_weight=1.0)


def test_single_channel_output_is_rejected_with_a_pointer_to_the_right_loss():
    output, batch = make_single_channel_case()
    with pytest.raises(DecodeAccelError, match="GaussianMMLoss or RatioGaussianNLLLoss"):
        UnifiedLoss(**SCALES)(output, batch)
