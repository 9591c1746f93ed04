"""Matching and challenge metrics on hand-made cases whose answers are known in advance."""

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decode_accel.cli.evaluate import evaluate_main
from decode_accel.errors import DecodeAccelError
from decode_accel.evaluation import (GaussianPSF, crlb_gaussian_2d, efficiency, evaluate, format_report, match_frame,
                                     match_localizations)
from decode_accel.io import write_table


def table(rows, **extra):
    """rows of (frame, x, y, z) -> a localization table (nm)."""
    df = pd.DataFrame(rows, columns=["frame", "x", "y", "z"])
    df["photons"] = 1000.0
    df["id"] = np.arange(len(df))
    for k, v in extra.items():
        df[k] = v
    return df


def random_truth(n=300, frames=20, seed=0, z=True):
    rng = np.random.default_rng(seed)
    return table(np.column_stack([rng.integers(0, frames, n), rng.uniform(100, 6300, n), rng.uniform(100, 6300, n),
                                  rng.uniform(-400, 400, n) if z else np.zeros(n)]),
                 photons=rng.uniform(200, 5000, n), bg=10.0)


def test_a_shifted_copy_of_the_truth_has_ji_one_and_rmse_equal_to_the_shift():
    gt = random_truth()
    pred = gt.copy()
    pred["x"] += 3.0
    pred["y"] += 4.0
    pred["z"] -= 12.0
    m = evaluate(gt, pred)
    assert (m["tp"], m["fp"], m["fn"]) == (len(gt), 0, 0)
    assert m["jaccard"] == 1.0
    assert m["rmse_lat"] == pytest.approx(5.0)  # radial: sqrt(3^2 + 4^2)
    assert m["rmse_ax"] == pytest.approx(12.0)
    assert m["rmse_vol"] == pytest.approx(13.0)
    assert m["mad_lat"] == pytest.approx(7.0)  # |dx| + |dy|
    assert m["bias_x"] == pytest.approx(3.0) and m["bias_z"] == pytest.approx(-12.0)
    assert m["eff_lat"] == pytest.approx(95.0)
    assert m["eff_ax"] == pytest.approx(94.0)
    assert m["eff_vol"] == pytest.approx(94.5)


def test_dropped_and_added_emitters_give_exact_counts():
    gt = random_truth(n=200, seed=1)
    keep = gt.iloc[20:].copy()  # 20 dropped -> FN
    rng = np.random.default_rng(2)
    # 7 added far away from everything (other frames) -> FP
    extra = table([(100 + i, rng.uniform(0, 6400), rng.uniform(0, 6400), 0.0) for i in range(7)])
    pred = pd.concat([keep, extra], ignore_index=True)
    m = evaluate(gt, pred)
    assert (m["tp"], m["fp"], m["fn"]) == (180, 7, 20)
    assert m["precision"] == pytest.approx(180 / 187)
    assert m["recall"] == pytest.approx(180 / 200)
    assert m["jaccard"] == pytest.approx(180 / 207)


def test_efficiency_reproduces_the_reference_values():
    assert efficiency(0.9, 10, 1.0) == pytest.approx(85.9, abs=0.05)
    assert efficiency(0.9, 25, 0.5) == pytest.approx(84.0, abs=0.05)
    assert efficiency(0.5, 50, 1.0) == pytest.approx(29.3, abs=0.05)
    assert efficiency(0.7, 60, 0.5) == pytest.approx(57.6, abs=0.05)


def test_pairs_just_inside_the_gates_match_and_just_outside_do_not():
    gt = np.array([[0.0, 0.0, 0.0]])
    assert len(match_frame(gt, [[249.9, 0, 0]])[0]) == 1
    assert len(match_frame(gt, [[250.1, 0, 0]])[0]) == 0
    assert len(match_frame(gt, [[0, 0, 499.9]])[0]) == 1
    assert len(match_frame(gt, [[0, 0, 500.1]])[0]) == 0
    assert len(match_frame(gt, [[0, 0, 500.1]], use_z=False)[0]) == 1  # 2D ignores z


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["greedy", "optimal"]), st.booleans())
def test_matching_never_pairs_beyond_the_gates_or_twice(seed, method, use_z):
    rng = np.random.default_rng(seed)
    gt = rng.uniform([0, 0, -800], [1000, 1000, 800], (rng.integers(0, 12), 3))
    pred = rng.uniform([0, 0, -800], [1000, 1000, 800], (rng.integers(0, 12), 3))
    gi, pi = match_frame(gt, pred, method, use_z=use_z)
    assert len(set(gi)) == len(gi) and len(set(pi)) == len(pi)
    lat = np.hypot(*(gt[gi, :2] - pred[pi, :2]).T)
    assert np.all(lat <= 250)
    if use_z:
        assert np.all(np.abs(gt[gi, 2] - pred[pi, 2]) <= 500)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_optimal_matching_pairs_as_many_as_brute_force_and_greedy_never_more(seed):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0, 600, (rng.integers(1, 5), 3)) * [1, 1, 0]
    pred = rng.uniform(0, 600, (rng.integers(1, 5), 3)) * [1, 1, 0]
    d = np.hypot(*(gt[:, None, :2] - pred[None, :, :2]).transpose(2, 0, 1))
    best = 0
    n_small, n_big = sorted((len(gt), len(pred)))
    for perm in itertools.permutations(range(n_big), n_small):  # every injective map of the smaller set
        pairs = zip(range(n_small), perm) if len(gt) <= len(pred) else zip(perm, range(n_small))
        best = max(best, sum(d[r, c] <= 250 for r, c in pairs))
    assert len(match_frame(gt, pred, "optimal")[0]) == best
    assert len(match_frame(gt, pred, "greedy")[0]) <= best


def test_greedy_takes_the_closest_pair_first_and_optimal_finds_the_better_assignment():
    # g1 at 0, g2 at 300; p1 at 140 is closest to g1 (140) and would also fit g2 (160);
    # p2 at -200 only fits g1. Greedy takes g1-p1 and strands g2; optimal pairs g1-p2 and g2-p1.
    gt = table([(0, 0.0, 0.0, 0.0), (0, 300.0, 0.0, 0.0)])
    pred = table([(0, 140.0, 0.0, 0.0), (0, -200.0, 0.0, 0.0)])
    greedy = evaluate(gt, pred, method="greedy")
    optimal = evaluate(gt, pred, method="optimal")
    assert (greedy["tp"], greedy["fp"], greedy["fn"]) == (1, 1, 1)
    assert greedy["rmse_lat"] == pytest.approx(140.0)
    assert (optimal["tp"], optimal["fp"], optimal["fn"]) == (2, 0, 0)
    assert optimal["rmse_lat"] == pytest.approx(math.sqrt((200**2 + 160**2) / 2))


def test_localizations_only_match_truth_of_the_same_frame():
    gt = table([(0, 100.0, 100.0, 0.0), (1, 500.0, 500.0, 0.0)])
    pred = table([(1, 100.0, 100.0, 0.0), (0, 500.0, 500.0, 0.0)])
    gi, pi = match_localizations(gt, pred)
    assert len(gi) == 0


def test_photon_threshold_removes_dim_truth_and_the_localizations_matched_to_it():
    gt = table([(0, 100.0, 100.0, 0.0), (0, 1000.0, 1000.0, 0.0), (0, 2000.0, 2000.0, 0.0)],
               photons=[50.0, 1000.0, 2000.0])
    pred = table([(0, 105.0, 100.0, 0.0), (0, 1000.0, 1010.0, 0.0), (0, 4000.0, 4000.0, 0.0)])
    m = evaluate(gt, pred, min_photons=100)
    # dim emitter and its match leave; bright ones: one TP, one FN; the stray localization stays FP.
    assert (m["n_gt"], m["n_pred"], m["tp"], m["fp"], m["fn"]) == (2, 2, 1, 1, 1)
    assert m["rmse_lat"] == pytest.approx(10.0)
    q = evaluate(gt, pred, min_photons_quantile=0.25)
    assert q["photon_threshold"] == pytest.approx(np.quantile([50, 1000, 2000], 0.25))
    assert q["tp"] == 1


def test_border_exclusion_drops_everything_near_the_edges_before_matching():
    gt = table([(0, 100.0, 3000.0, 0.0), (0, 3000.0, 3000.0, 0.0), (0, 3000.0, 6350.0, 0.0)])
    pred = table([(0, 3010.0, 3000.0, 0.0), (0, 6300.0, 3000.0, 0.0)])
    m = evaluate(gt, pred, border_nm=450, fov_nm=(6400, 6400))
    assert (m["n_gt"], m["n_pred"], m["tp"], m["fp"], m["fn"]) == (1, 1, 1, 0, 0)
    with pytest.raises(DecodeAccelError, match="fov"):
        evaluate(gt, pred, border_nm=450)


def test_gaussian_errors_with_the_predicted_sigma_are_calibrated_at_68_percent():
    gt = random_truth(n=8000, frames=2000, seed=3)
    rng = np.random.default_rng(4)
    sigma = rng.uniform(5, 20, len(gt))
    pred = gt.copy()
    pred["x"] += rng.normal(0, sigma)
    pred["y"] += rng.normal(0, sigma)
    pred["z"] += rng.normal(0, 3 * sigma)
    pred["x_sigma"], pred["y_sigma"], pred["z_sigma"] = sigma, sigma, 3 * sigma
    m = evaluate(gt, pred)
    for axis in "xyz":
        assert m[f"calib_{axis}"] == pytest.approx(0.683, abs=0.02)
    pred["x_sigma"] = sigma / 2  # overconfident -> far fewer within 1 sigma
    assert evaluate(gt, pred)["calib_x"] == pytest.approx(0.383, abs=0.02)


def test_errors_drawn_at_the_crlb_give_rmse_over_crlb_of_one():
    gt = random_truth(n=4000, frames=1000, seed=5, z=False)
    bound = crlb_gaussian_2d(gt["photons"].to_numpy(), 10.0, 100, 100, x_nm=gt["x"].to_numpy())["x"]
    rng = np.random.default_rng(6)
    pred = gt.copy()
    pred["x"] += rng.normal(0, bound)
    pred["y"] += rng.normal(0, bound)
    m = evaluate(gt, pred, psf=GaussianPSF(100), px_size_nm=100)
    assert m["rmse_over_crlb_x"] == pytest.approx(1.0, abs=0.04)
    assert m["rmse_over_crlb_y"] == pytest.approx(1.0, abs=0.04)


def test_colour_crosstalk_and_rejection_count_per_true_dye():
    rows = [(0, 500.0 * i, 100.0, 0.0) for i in range(10)]
    gt = table(rows, color=[0] * 5 + [1] * 5, ratio=[0.2] * 5 + [0.8] * 5)
    # dye 0: 3 right, 1 wrong, 1 rejected; dye 1: 4 right, 1 wrong.
    pred = table(rows, color=[0, 0, 0, 1, -1, 1, 1, 1, 1, 0], ratio=[0.2] * 5 + [0.8] * 4 + [0.9])
    m = evaluate(gt, pred)
    assert m["crosstalk_per_dye"] == {0: pytest.approx(1 / 4), 1: pytest.approx(1 / 5)}
    assert m["rejection_per_dye"] == {0: pytest.approx(1 / 5), 1: 0.0}
    assert m["crosstalk"] == pytest.approx(2 / 9)
    assert m["rejection"] == pytest.approx(1 / 10)
    assert m["ratio_rmse"] == pytest.approx(math.sqrt(0.01 / 10))
    # Without a true colour column, the dye table names the nearest dye of the true ratio.
    m2 = evaluate(gt.drop(columns="color"), pred, dye_table=[{"ratio": 0.25}, {"ratio": 0.75}])
    assert m2["crosstalk"] == pytest.approx(2 / 9)


def test_report_lists_the_headline_numbers():
    gt = random_truth(n=50)
    text = format_report(evaluate(gt, gt))
    assert "Jaccard" in text and "100.00 %" in text and "RMSE lateral" in text


def test_evaluate_command_reads_files_prints_and_writes_json(tmp_path, capsys):
    gt = random_truth(n=100)
    pred = gt.iloc[:90].copy()
    pred["x"] += 6.0
    pred["y"] += 8.0
    write_table(gt, tmp_path / "gt.csv")
    write_table(pred, tmp_path / "pred.hdf5", px_size_nm=100.0, width=64, height=64, n_frames=20)
    code = evaluate_main(["--gt", str(tmp_path / "gt.csv"), "--pred", str(tmp_path / "pred.hdf5"),
                          "--json", str(tmp_path / "m.json"), "--optimal"])
    assert code == 0
    assert "Jaccard" in capsys.readouterr().out
    m = json.loads((tmp_path / "m.json").read_text())
    assert (m["tp"], m["fn"], m["method"]) == (90, 10, "optimal")
    assert m["rmse_lat"] == pytest.approx(10.0, abs=1e-3)  # float32 positions in the Picasso file


def test_evaluate_command_turns_bad_arguments_into_one_line_errors(tmp_path):
    with pytest.raises(DecodeAccelError, match="--gt"):
        evaluate_main(["--pred", "x.csv"])
    with pytest.raises(DecodeAccelError, match="not found"):
        evaluate_main(["--gt", str(tmp_path / "missing.csv"), "--pred", str(tmp_path / "missing.csv")])
