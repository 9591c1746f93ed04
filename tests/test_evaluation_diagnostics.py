"""Gridding, detection reliability and uncertainty reliability, checked on tables with known statistics."""

import math

import numpy as np
import pandas as pd
import pytest

from decode_accel.errors import DecodeAccelError
from decode_accel.evaluation.diagnostics import (bias_by_true_value, detection_reliability, gridding_report, plot_trust,
                                                 subpixel_uniformity, uncertainty_reliability)

PX = 100.0


def test_uniform_positions_pass_the_uniformity_test_and_pixel_centred_ones_fail_it():
    rng = np.random.default_rng(0)
    flat = subpixel_uniformity(rng.uniform(0, 6400, 20000), PX)
    assert 0.5 < flat["chi2_per_dof"] < 2.0 and flat["p_value"] > 1e-3
    assert sum(flat["counts"]) == 20000
    # positions pulled towards pixel centres (x = (j + 0.5) px) by a gridding network
    centred = (rng.integers(0, 64, 20000) + 0.5 + rng.normal(0, 0.15, 20000)) * PX
    gridded = subpixel_uniformity(centred, PX)
    assert gridded["chi2_per_dof"] > 50 and gridded["p_value"] < 1e-6
    counts = gridded["counts"]
    assert counts[4] + counts[5] > 3 * (counts[0] + counts[9])  # the peak is at the pixel centre


def test_the_fraction_is_measured_from_the_pixel_edge():
    # every position 10 nm right of a pixel edge: all in the first tenth of the pixel
    rep = subpixel_uniformity(np.arange(100) * PX + 5.0, PX)
    assert rep["counts"][0] == 100 and sum(rep["counts"][1:]) == 0


def test_few_positions_give_no_statistic_rather_than_a_misleading_one():
    rep = subpixel_uniformity(np.array([10.0, 20.0]), PX)
    assert math.isnan(rep["chi2"])


def test_the_gridding_report_covers_both_axes_of_prediction_and_truth():
    rng = np.random.default_rng(1)
    table = pd.DataFrame({"frame": np.zeros(500, int), "x": rng.uniform(0, 3200, 500), "y": rng.uniform(0, 3200, 500)})
    rep = gridding_report(table, table, PX)
    assert set(rep) == {"pred_x", "pred_y", "truth_x", "truth_y", "pred_vs_truth_x", "pred_vs_truth_y"}
    assert rep["pred_vs_truth_x"]["chi2"] == 0.0 and rep["pred_vs_truth_x"]["p_value"] == 1.0  # the same positions


def _detections(n_real_per_bin, n_fake_per_bin, probs):
    """Truth far apart on one frame; per probability value some localizations on the truth, some far away."""
    truth, pred = [], []
    k = 0
    for p, n_real, n_fake in zip(probs, n_real_per_bin, n_fake_per_bin):
        for _ in range(n_real):
            truth.append((k, 1000.0 * k, 0.0))
            pred.append((k, 1000.0 * k + 3.0, 0.0, p))
            k += 1
        for _ in range(n_fake):
            pred.append((k, 1000.0 * k, 50_000.0, p))  # nowhere near any emitter
            k += 1
    gt = pd.DataFrame(truth, columns=["frame", "x", "y"])
    return gt, pd.DataFrame(pred, columns=["frame", "x", "y", "prob"])


def test_detection_reliability_reports_the_share_of_real_localizations_per_probability_bin():
    gt, pred = _detections([7, 9], [3, 1], [0.75, 0.95])
    rep = detection_reliability(gt, pred, bins=10)
    assert rep["count"][7] == 10 and rep["count"][9] == 10
    assert rep["real_share"][7] == pytest.approx(0.7)
    assert rep["real_share"][9] == pytest.approx(0.9)
    assert rep["mean_prob"][7] == pytest.approx(0.75)
    # |0.7 - 0.75| and |0.9 - 0.95| with equal weight
    assert rep["ece"] == pytest.approx(0.05)


def test_detection_reliability_needs_probabilities():
    gt, pred = _detections([1], [0], [0.5])
    with pytest.raises(DecodeAccelError, match="prob"):
        detection_reliability(gt, pred.drop(columns="prob"))


@pytest.mark.parametrize("reported_scale, expected_within", [(1.0, 0.683), (0.5, 0.383), (2.0, 0.954)])
def test_uncertainty_reliability_counts_errors_within_the_reported_sigma(reported_scale, expected_within):
    rng = np.random.default_rng(2)
    n = 6000
    true_sigma = rng.uniform(5, 30, n)
    gt = pd.DataFrame({"frame": np.arange(n), "x": rng.uniform(0, 3000, n), "y": rng.uniform(0, 3000, n)})
    pred = gt.copy()
    pred["x"] += rng.normal(0, true_sigma)
    pred["y"] += rng.normal(0, true_sigma)
    pred["x_sigma"] = reported_scale * true_sigma
    pred["y_sigma"] = reported_scale * true_sigma
    rep = uncertainty_reliability(gt, pred)
    for axis in ("x", "y"):
        assert rep[axis]["overall_within_1sigma"] == pytest.approx(expected_within, abs=0.02)
        assert rep[axis]["z_score_sd"] == pytest.approx(1 / reported_scale, rel=0.05)
        # the actual error follows the true sigma in every bin
        ratio = np.array(rep[axis]["error_rms"]) / np.array(rep[axis]["sigma_rms"])
        np.testing.assert_allclose(ratio, 1 / reported_scale, rtol=0.15)


def test_the_trust_figure_is_written(tmp_path):
    gt, pred = _detections([20, 30], [5, 2], [0.55, 0.9])
    pred["x_sigma"] = pred["y_sigma"] = 5.0
    path = plot_trust(tmp_path / "trust.png", gridding_report(gt, pred, PX), detection_reliability(gt, pred),
                      uncertainty_reliability(gt, pred), title="test")
    assert path.stat().st_size > 10_000


def test_a_compressed_z_axis_shows_as_opposite_biases_at_the_two_ends():
    rng = np.random.default_rng(4)
    n = 4000
    gt = pd.DataFrame({"frame": np.arange(n), "x": rng.uniform(0, 3000, n), "y": rng.uniform(0, 3000, n),
                       "z": rng.uniform(-500, 500, n)})
    pred = gt.copy()
    pred["z"] = 0.8 * gt["z"] + rng.normal(0, 20, n)  # slope 0.8: z squeezed towards the focal plane
    rep = bias_by_true_value(gt, pred, "z", edges=[-500, -250, 250, 500])
    assert rep["bias"][0] == pytest.approx(+75, abs=5)  # 0.2 x mean |z| of the bin (375 nm)
    assert rep["bias"][1] == pytest.approx(0, abs=3)
    assert rep["bias"][2] == pytest.approx(-75, abs=5)
    assert sum(rep["count"]) == n
