import math

import numpy as np
import pytest
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.loss import GaussianMMLoss
from decode_accel.loss.distillation import DistillationLoss, bernoulli_kl_with_logits, gaussian_kl
from tests.test_loss_support import BG_MAX, PHOTONS_MAX, Z_MAX, add_two_channels, make_single_channel_case


def perturbed(output, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in output.items():
        noise = 1 + 0.3 * (torch.rand(value.shape, generator=g) - 0.5)
        out[key] = value * noise if key != "logits" else value + torch.randn(value.shape, generator=g)
    out["p"] = torch.sigmoid(out["logits"])
    return out


def test_distillation_is_zero_when_student_equals_teacher():
    teacher, _ = add_two_channels(*make_single_channel_case(seed=31))
    student = {key: value.clone() for key, value in teacher.items()}
    terms = DistillationLoss()(student, teacher)
    for name in ("distill_p_loss", "distill_gauss_loss", "distill_loss", "loss"):
        assert terms[name].item() == pytest.approx(0.0, abs=1e-6), name


def test_distillation_is_positive_when_they_differ_and_a_gradient_step_brings_the_student_closer():
    teacher, _ = make_single_channel_case(seed=32)
    leaves = {key: value.clone().requires_grad_(True) for key, value in perturbed(teacher).items() if key != "p"}
    student = dict(leaves, p=torch.sigmoid(leaves["logits"]))
    loss = DistillationLoss(temperature=2.0)
    terms = loss(student, teacher)
    assert terms["distill_p_loss"].item() > 0 and terms["distill_gauss_loss"].item() > 0
    terms["loss"].backward()
    with torch.no_grad():
        stepped = {key: value - 1e-3 * value.grad if value.grad is not None else value
                   for key, value in leaves.items()}
        stepped["p"] = torch.sigmoid(stepped["logits"])
        assert loss(stepped, teacher)["loss"].item() < terms["loss"].item()


def test_detection_term_is_the_bernoulli_kl_of_the_probabilities():
    s, t = torch.tensor([-2.0, 0.0, 1.5, 6.0]), torch.tensor([1.0, 0.0, -3.0, 6.5])
    ps, pt = 1 / (1 + np.exp(-s.numpy().astype(float))), 1 / (1 + np.exp(-t.numpy().astype(float)))
    expected = pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))
    assert np.allclose(bernoulli_kl_with_logits(s, t).numpy(), expected, rtol=1e-4, atol=1e-7)
    assert torch.all(bernoulli_kl_with_logits(s, t, temperature=3.0) >= 0)


def test_gaussian_term_matches_a_monte_carlo_kl_estimate():
    rng = np.random.default_rng(1)
    mu_t, sigma_t, mu_s, sigma_s = 0.3, 0.5, -0.2, 0.8
    x = rng.normal(mu_t, sigma_t, 400_000)
    log_t = -0.5 * ((x - mu_t) / sigma_t) ** 2 - math.log(sigma_t)
    log_s = -0.5 * ((x - mu_s) / sigma_s) ** 2 - math.log(sigma_s)
    estimate = float(np.mean(log_t - log_s))
    value = gaussian_kl(torch.tensor(mu_t), torch.tensor(sigma_t), torch.tensor(mu_s), torch.tensor(sigma_s))
    assert value.item() == pytest.approx(estimate, abs=5e-3)


def test_gaussian_term_only_listens_to_pixels_where_the_teacher_detects():
    teacher, _ = make_single_channel_case(seed=33)
    teacher["logits"] = torch.full_like(teacher["logits"], -30.0)
    teacher["logits"][0, 1, 1] = 30.0
    teacher["p"] = torch.sigmoid(teacher["logits"])
    student = {key: value.clone() for key, value in teacher.items()}
    student["dx"] = student["dx"] + 1.0  # wrong everywhere ...
    student["dx"][0, 1, 1] = teacher["dx"][0, 1, 1]  # ... except where the teacher sees an emitter
    assert DistillationLoss()(student, teacher)["distill_gauss_loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_blend_with_the_ground_truth_loss_by_alpha_and_weights_pass_through():
    teacher, batch = make_single_channel_case(seed=34)
    student = perturbed(teacher)
    gt = GaussianMMLoss(photons_max=PHOTONS_MAX, z_max=Z_MAX, bg_max=BG_MAX)
    loss = DistillationLoss(gt, alpha=0.25)
    terms = loss(student, teacher, batch)
    gt_terms = gt(student, batch)
    assert terms["gt_loss"].item() == pytest.approx(gt_terms["loss"].item(), rel=1e-6)
    assert terms["loc_loss"].item() == pytest.approx(gt_terms["loc_loss"].item(), rel=1e-6)
    expected = 0.25 * terms["distill_loss"].item() + 0.75 * gt_terms["loss"].item()
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-6)
    # The hook may already hold the ground-truth terms: the same blend.
    assert loss(student, teacher, gt_terms=gt_terms)["loss"].item() == pytest.approx(expected, rel=1e-6)
    loss.update_weights(alpha=1.0, loc_weight=0.0)
    assert gt.weights["loc_weight"] == 0.0
    assert loss(student, teacher, batch)["loss"].item() == pytest.approx(terms["distill_loss"].item(), rel=1e-6)
    with pytest.raises(DecodeAccelError, match="alpha"):
        loss.update_weights(alpha=1.5)
    with pytest.raises(DecodeAccelError, match="no weight"):
        DistillationLoss().update_weights(loc_weight=1.0)
    with pytest.raises(DecodeAccelError, match="gt_loss"):
        DistillationLoss()(student, teacher, batch)


def test_detection_term_is_the_kl_of_the_whole_detection_map_per_frame():
    teacher, _ = make_single_channel_case(seed=35)
    student = perturbed(teacher)
    q = torch.sigmoid(teacher["logits"]).double().numpy()
    s = torch.sigmoid(student["logits"]).double().numpy()
    kl = q * np.log(q / s) + (1 - q) * np.log((1 - q) / (1 - s))
    expected = kl.reshape(kl.shape[0], -1).sum(1).mean()
    terms = DistillationLoss(detection_weight=2.0, gaussian_weight=0.0)(student, teacher)
    assert terms["distill_p_loss"].item() == pytest.approx(expected, rel=1e-4)
    assert terms["loss"].item() == pytest.approx(2 * expected, rel=1e-4)
