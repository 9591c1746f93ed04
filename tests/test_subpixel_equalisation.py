"""Sub-pixel equalisation: positions that pile up inside their pixels (gridding) are remapped so that
their sub-pixel fractions are as uniform as the emitters' are, without moving them on average."""

import numpy as np
import pandas as pd
import pytest
import torch

from decode_accel import pipeline
from decode_accel.errors import DecodeAccelError
from decode_accel.evaluation.diagnostics import subpixel_uniformity
from decode_accel.export import export_model, load_exported
from decode_accel.inference.postprocess import PostProcessor, SubpixelEqualisation
from decode_accel.io import read_table
from tests.test_operating_point import movie, noisy_model, predict_module, sim_config


def gridded(true_px: np.ndarray, pull: float = 0.03) -> np.ndarray:
    """Positions pulled towards their pixel's centre by up to ``pull`` px, as a shrinking network places them."""
    return true_px - pull * np.sin(2 * np.pi * true_px)


def test_gridded_positions_come_back_to_the_truth_and_their_fractions_are_flat():
    rng = np.random.default_rng(0)
    truth_x, truth_y = rng.uniform(0, 64, 100_000), rng.uniform(0, 64, 100_000)
    x, y = gridded(truth_x), gridded(truth_y, pull=-0.02)   # y pushed away from the centre instead
    assert subpixel_uniformity(x, 1.0)["chi2_per_dof"] > 100   # clearly gridded
    equalise = SubpixelEqualisation.fit(x, y)
    ex, ey, _, _ = equalise(x, y)
    for before, after, truth in ((x, ex, truth_x), (y, ey, truth_y)):
        assert subpixel_uniformity(after, 1.0)["chi2_per_dof"] < 3
        # back within a few thousandths of a px of where the emitters are (the pull was up to 0.03 px)
        rms_before, rms_after = (np.sqrt(np.mean((v - truth) ** 2)) for v in (before, after))
        assert rms_after < min(0.003, rms_before / 4)


def test_a_fit_against_the_truth_removes_the_models_pull_but_not_the_movies_own_scatter():
    # a finite movie's true fractions are not flat (an emitter stays on for frames at one position): here
    # exaggerated to a density 1 + 0.2 cos(2 pi u). The model adds its pull on top. Fitted on the positions
    # alone, the map flattens both and moves every position off its truth; fitted against the truth it
    # undoes the pull only.
    rng = np.random.default_rng(5)
    n = 100_000
    whole, u = rng.integers(0, 64, n), rng.uniform(0, 1, n)
    u = u - 0.2 / (2 * np.pi) * np.sin(2 * np.pi * u)    # inverse CDF to first order: density 1 + 0.2 cos
    truth_x, truth_y = whole + u, rng.uniform(0, 64, n)
    assert subpixel_uniformity(truth_x, 1.0)["chi2_per_dof"] > 100       # the movie's own scatter, exaggerated
    x, y = gridded(truth_x), gridded(truth_y, pull=-0.02)
    paired = SubpixelEqualisation.fit(x, y, true_x_px=truth_x, true_y_px=truth_y)
    alone = SubpixelEqualisation.fit(x, y)
    for eq, worst in ((paired, 0.003), (alone, None)):
        ex, ey, _, _ = eq(x, y)
        rms_x, rms_y = np.sqrt(np.mean((ex - truth_x) ** 2)), np.sqrt(np.mean((ey - truth_y) ** 2))
        if worst is not None:
            assert rms_x < worst and rms_y < worst      # back where the emitters are (the pull was 0.02-0.03 px)
        else:
            assert rms_x > 0.01 > rms_y                 # flattened the truth's own 0.2 as well: off by 0.02 px
    with pytest.raises(DecodeAccelError, match="one true position per position"):
        SubpixelEqualisation.fit(x, y, true_x_px=truth_x[:10], true_y_px=truth_y[:10])


def test_the_map_moves_no_position_on_average_and_leaves_uniform_positions_nearly_alone():
    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 64, 50_000)
    skewed = truth + 0.02 * np.cos(2 * np.pi * truth)   # a pile-up off the centre: its map has a sine part
    ex, _, slope, _ = SubpixelEqualisation.fit(skewed, truth)(skewed, truth)
    assert abs(np.mean(ex - skewed)) < 1e-3                 # no constant offset added (px)
    _, ey, _, slope_y = SubpixelEqualisation.fit(skewed, truth)(skewed, truth)
    assert np.max(np.abs(ey - truth)) < 0.01                 # uniform: moved by noise only (~sqrt(2/n) / 2 pi)
    assert np.all(slope > 0)                                 # monotone within the pixel: the order of positions kept
    assert np.all(np.diff(ex[np.argsort(skewed)]) >= 0)


def test_an_equalisation_survives_its_dict_form_and_a_broken_one_is_refused():
    rng = np.random.default_rng(2)
    eq = SubpixelEqualisation.fit(gridded(rng.uniform(0, 9, 5000)), rng.uniform(0, 9, 5000))
    again = SubpixelEqualisation.from_any(eq.to_dict())
    np.testing.assert_array_equal(again.x, eq.x)
    np.testing.assert_array_equal(again.y, eq.y)
    for bad in ({"x": [0.1, 0.2, 0.3], "y": [0.1, 0.2, 0.3]}, {"x": [0.1, 0.2]}, {"x": [1.5, 0.0], "y": [0.0, 0.0]}):
        with pytest.raises(DecodeAccelError, match="sub-pixel"):
            SubpixelEqualisation.from_any(bad)
    with pytest.raises(DecodeAccelError, match="too few"):
        SubpixelEqualisation.fit(np.zeros(10), np.zeros(10))


def test_the_post_processor_remaps_positions_and_scales_their_sigmas_by_the_maps_slope():
    p = torch.zeros(1, 8, 8)
    p[0, 2, 2] = p[0, 5, 5] = 0.9
    dx = torch.zeros_like(p)
    dx[0, 2, 2], dx[0, 5, 5] = 0.3, -0.2
    maps = {"p": p, "dx": dx, "dy": torch.zeros_like(p),
            "dx_sigma": torch.full_like(p, 0.1), "dy_sigma": torch.full_like(p, 0.1)}
    eq = SubpixelEqualisation([0.2, 0.1, 0.0, 0.0], [-0.1, 0.0, 0.0, 0.0])
    plain = PostProcessor(threshold=0.5, px_size_nm=100.0)(maps)
    remapped = PostProcessor(threshold=0.5, px_size_nm=100.0, subpixel_equalisation=eq.to_dict())(maps)
    x, y, sx, sy = eq(plain["x"].to_numpy() / 100.0, plain["y"].to_numpy() / 100.0)
    # independent check of the formula for one position: u = 2.8 px -> F(0.8) - b/(2 pi)
    u = 0.8
    f_u = u + (0.2 * np.sin(2 * np.pi * u) - 0.1 * np.cos(2 * np.pi * u)) / (2 * np.pi)
    assert x[0] == pytest.approx(2 + f_u)
    np.testing.assert_allclose(remapped["x"].to_numpy(), 100.0 * x)
    np.testing.assert_allclose(remapped["y"].to_numpy(), 100.0 * y)
    np.testing.assert_allclose(remapped["x_sigma"].to_numpy(), plain["x_sigma"].to_numpy() * sx)
    np.testing.assert_allclose(remapped["y_sigma"].to_numpy(), plain["y_sigma"].to_numpy() * sy)


def test_predict_applies_the_exports_equalisation(tmp_path):
    eq = {"x": [0.2, 0.0, 0.0, 0.0], "y": [0.0, 0.0, 0.0, 0.0]}
    plain = export_model(tmp_path / "plain", noisy_model(), simulation_config=sim_config(),
                         operating_point={"threshold": 0.3})
    equalised = export_model(tmp_path / "eq", noisy_model(), simulation_config=sim_config(),
                             operating_point={"threshold": 0.3, "subpixel_equalisation": eq})
    tif = movie(tmp_path)
    raw = predict_module.predict(plain, tif, progress=False)
    out = predict_module.predict(equalised, tif, progress=False)
    assert len(out) == len(raw) > 0
    x, y, _, _ = SubpixelEqualisation.from_any(eq)(raw["x"].to_numpy() / 100.0, raw["y"].to_numpy() / 100.0)
    np.testing.assert_allclose(np.sort(out["x"].to_numpy()), np.sort(100.0 * x))
    np.testing.assert_allclose(out["y"].to_numpy(), 100.0 * y)


def test_the_operating_point_stores_an_equalisation_that_undoes_a_models_gridding(tmp_path, monkeypatch):
    export = export_model(tmp_path / "e", noisy_model(), simulation_config=sim_config())

    def gridded_predict(model, tiff, threshold=None, postprocessor=None, **kwargs):
        """Every true emitter found (p 0.9), placed with a pull of 0.04 px towards its pixel's centre, and
        2 nm too low in y (a trained network's constant offset)."""
        truth = read_table(str(tiff).replace(".tif", "_truth.csv"))
        return truth[["frame"]].assign(x=100.0 * gridded(truth["x"].to_numpy() / 100.0, 0.04),
                                       y=100.0 * gridded(truth["y"].to_numpy() / 100.0, 0.04) + 2.0, prob=0.9)

    monkeypatch.setattr(pipeline, "predict", gridded_predict)
    # 16 000 emitter-frames of 64 x 64 px frames: the fitted coefficients' noise (~sqrt(2 / n)) stays well
    # below the pull's harmonics
    monkeypatch.setattr(pipeline, "EQUALISATION_EMITTER_FRAMES", 16_000)
    monkeypatch.setattr(pipeline, "BORDER_PAIRS_PER_SIDE", 100)  # no border maps needed here: a short movie
    point = pipeline.choose_operating_point(export, n_frames=40, height=32, width=32)
    eq = load_exported(export).operating_point["subpixel_equalisation"]
    assert eq == point["subpixel_equalisation"]
    rng = np.random.default_rng(3)
    truth = rng.uniform(0, 64, 20_000)
    x, _, _, _ = SubpixelEqualisation.from_any(eq)(gridded(truth, 0.04), truth)
    assert subpixel_uniformity(gridded(truth, 0.04), 1.0)["chi2_per_dof"] > 50
    assert subpixel_uniformity(x, 1.0)["chi2_per_dof"] < 4
    # the constant offset, measured against the movie's truth, is removed as well
    np.testing.assert_allclose(eq["offset"], [0.0, 0.02], atol=0.002)
    _, y, _, _ = SubpixelEqualisation.from_any(eq)(truth, gridded(truth, 0.04) + 0.02)
    assert abs(np.mean(y - truth)) < 0.002
    card = (export / "README.md").read_text()
    assert "sub-pixel fractions equalised and a constant offset of" in card and "nm (x / y) removed" in card


def test_an_offset_is_subtracted_after_the_remap_and_an_impossible_one_is_refused():
    eq = SubpixelEqualisation([0.1, 0.0], [0.0, 0.0])
    x, y, _, _ = eq(np.array([3.3]), np.array([4.6]))
    x2, y2, _, _ = eq.with_offset((0.01, -0.02))(np.array([3.3]), np.array([4.6]))
    assert x2[0] == pytest.approx(x[0] - 0.01) and y2[0] == pytest.approx(y[0] + 0.02)
    assert SubpixelEqualisation.from_any(eq.with_offset((0.01, -0.02)).to_dict()).offset.tolist() == [0.01, -0.02]
    with pytest.raises(DecodeAccelError, match="offset"):
        eq.with_offset((0.7, 0.0))


def test_the_post_processor_scales_the_ratio_sigma_and_refuses_an_impossible_factor():
    p = torch.zeros(1, 8, 8)
    p[0, 3, 3] = 0.9
    maps = {"p": p, "dx": torch.zeros_like(p), "dy": torch.zeros_like(p), "ratio": torch.full_like(p, 0.25),
            "ratio_sigma": torch.full_like(p, 0.04)}
    assert PostProcessor(threshold=0.5, ratio_sigma_scale=0.5)(maps)["ratio_sigma"].iloc[0] == pytest.approx(0.02)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(DecodeAccelError, match="ratio_sigma_scale"):
            PostProcessor(ratio_sigma_scale=bad)


def test_the_operating_point_scales_a_too_wide_ratio_sigma_to_68_percent_coverage(tmp_path, monkeypatch):
    export = export_model(tmp_path / "e", noisy_model(), simulation_config=sim_config())
    rng = np.random.default_rng(4)

    def wide_sigma_predict(model, tiff, threshold=None, postprocessor=None, **kwargs):
        """Every emitter found where it is, its ratio off by N(0, 0.01) but reported with a sigma of 0.04."""
        truth = read_table(str(tiff).replace(".tif", "_truth.csv"))
        return truth[["frame", "x", "y"]].assign(prob=0.9, ratio=truth["ratio"] + rng.normal(0, 0.01, len(truth)),
                                                 ratio_sigma=0.04)

    monkeypatch.setattr(pipeline, "predict", wide_sigma_predict)
    monkeypatch.setattr(pipeline, "EQUALISATION_EMITTER_FRAMES", 8000)
    monkeypatch.setattr(pipeline, "BORDER_PAIRS_PER_SIDE", 100)  # no border maps needed here: a short movie
    point = pipeline.choose_operating_point(export, n_frames=40, height=32, width=32)
    assert point["ratio_sigma_scale"] == pytest.approx(0.25, rel=0.05)      # 0.01 / 0.04
    assert load_exported(export).operating_point["ratio_sigma_scale"] == point["ratio_sigma_scale"]


def test_the_position_dependent_bias_by_tenth_of_a_pixel_is_measured_in_nm():
    # a known pull of 2 nm * sin(2 pi fraction) on x, none on y, plus 5 nm of noise: the benchmark's gridding
    # figure in nm must give back the pull in every tenth of a pixel, and nothing on y
    from decode_accel.pipeline import subpixel_bias

    rng = np.random.default_rng(11)
    n, px = 40000, 100.0
    truth = pd.DataFrame({"frame": np.arange(n) // 4, "x": rng.uniform(200, 6200, n), "y": rng.uniform(200, 6200, n)})
    pull = 2.0 * np.sin(2 * np.pi * np.mod(truth["x"] / px, 1.0))
    found = truth.assign(x=truth["x"] + pull + rng.normal(0, 5.0, n), y=truth["y"] + rng.normal(0, 5.0, n))
    r = subpixel_bias(truth, found, px)
    centres = np.arange(10) / 10 + 0.05
    expected = 2.0 * np.sin(2 * np.pi * centres) * np.sinc(0.1)  # the mean of the sine over each tenth
    assert np.allclose(r["x"]["bias"], expected, atol=4 * 5.0 / np.sqrt(n / 10))
    assert r["x"]["largest_z"] > 10
    assert np.all(np.abs(r["y"]["bias"]) < 4 * 5.0 / np.sqrt(n / 10)) and r["y"]["largest_z"] < 4


def test_the_bias_of_emitters_in_the_outermost_pixels_is_measured_per_side():
    # a 30 nm inward pull on x for true x in the leftmost pixel and -20 nm on y in the bottom row, 5 nm of noise
    # elsewhere: the border figure gives back each pull on its side and nothing inside or on the other sides
    from decode_accel.pipeline import border_bias

    rng = np.random.default_rng(12)
    n, px, size = 32000, 100.0, 64
    truth = pd.DataFrame({"frame": np.arange(n) // 16, "x": rng.uniform(0, size * px, n), "y": rng.uniform(0, size * px, n)})
    pull_x = np.where(truth["x"] < px, 30.0, 0.0)
    pull_y = np.where(truth["y"] >= (size - 1) * px, -20.0, 0.0)
    found = truth.assign(x=truth["x"] + pull_x + rng.normal(0, 5.0, n), y=truth["y"] + pull_y + rng.normal(0, 5.0, n))
    r = border_bias(truth, found, px, height=size, width=size)
    tol = 4 * 5.0 / np.sqrt(n / size)
    assert r["x"]["left"]["bias"] == pytest.approx(30.0, abs=tol) and r["y"]["bottom"]["bias"] == pytest.approx(-20.0, abs=tol)
    for axis, side in (("x", "inside"), ("x", "right"), ("y", "top"), ("y", "inside")):
        assert abs(r[axis][side]["bias"]) < tol, (axis, side)
    assert r["x"]["left"]["count"] == pytest.approx(n / size, rel=0.15)
    assert r["x"]["left"]["standard_error"] == pytest.approx(5.0 / np.sqrt(r["x"]["left"]["count"]), rel=0.5)


def test_the_two_sample_gridding_test_is_the_chi2_test_of_homogeneity_and_tells_a_ripple_from_noise():
    from scipy.stats import chi2_contingency
    from decode_accel.evaluation.diagnostics import subpixel_two_sample

    rng = np.random.default_rng(13)
    px = 100.0
    truth = rng.uniform(0, 6400, 100_000)
    noisy = truth + rng.normal(0, 10.0, truth.size)            # estimates of the same positions, no gridding
    rippled = 100.0 * gridded(truth / 100.0, 0.01) + rng.normal(0, 10.0, truth.size)  # a 1 nm pull to pixel centres
    for pred in (noisy, rippled):
        r = subpixel_two_sample(pred, truth, px)
        table = [np.histogram(np.mod(v / px, 1.0), bins=10, range=(0, 1))[0] for v in (pred, truth)]
        expected = chi2_contingency(np.array(table), correction=False)
        assert r["chi2"] == pytest.approx(expected.statistic, rel=1e-9) and r["dof"] == expected.dof == 9
        assert r["p_value"] == pytest.approx(expected.pvalue, rel=1e-6, abs=1e-300)
    assert subpixel_two_sample(noisy, truth, px)["p_value"] > 0.01
    assert subpixel_two_sample(rippled, truth, px)["p_value"] < 1e-6


def test_the_equalisation_movie_is_as_long_as_the_emitter_frames_asked_for(monkeypatch):
    from decode_accel.training.config import TrainingConfig

    export = type("Export", (), {"camera": None, "simulation_config": sim_config(),
                                                      "px_size_nm": 100.0, "dye_table": None})()
    lengths = []

    class Stop(Exception):
        pass

    def spy(sim, n_frames, seed, out_dir, name="test"):
        lengths.append((n_frames, sim.frame.height, sim.frame.width))
        raise Stop

    monkeypatch.setattr(pipeline, "simulate_held_out_movie", spy)
    for asked in (None, 100_000):
        with pytest.raises(Stop):
            pipeline.fit_position_corrections(export, 0.5, None, seed=1, emitter_frames=asked)
    # 1 emitter/µm² on 64 x 64 px of 100 nm: 40.96 per frame. The default's 40 000 need 977 frames, but the
    # 1500 emitters near each border need 1172; 100 000 need 2442 (under the cap, raised to 4000 * 2.5)
    assert lengths == [(1172, 64, 64), (2442, 64, 64)]
    with pytest.raises(Exception, match="equalisation_emitter_frames"):
        TrainingConfig(operating_point={"equalisation_emitter_frames": 100})


def test_the_position_corrections_are_fitted_over_the_z_range_the_model_is_meant_for(tmp_path, monkeypatch):
    # a model trained on z in [-750, 750] nm but meant for [-500, 500]: its corrections must describe the
    # positions it will report, so their movie spans the target's range (at the training density)
    training = sim_config().model_copy(update={"emitters": sim_config().emitters.model_copy(
        update={"z_range": (-750.0, 750.0), "density": 0.5})})
    target = training.model_copy(update={"emitters": training.emitters.model_copy(
        update={"z_range": (-500.0, 500.0), "density": 0.1})})
    export = export_model(tmp_path / "e", noisy_model(), simulation_config=training)

    def perfect_predict(model, tiff, threshold=None, postprocessor=None, **kwargs):
        truth = read_table(str(tiff).replace(".tif", "_truth.csv"))
        return truth[["frame", "x", "y", "z"]].assign(prob=0.9)

    asked = {}

    def spy(exported, threshold, calibration, seed, **kwargs):
        asked.update(kwargs)
        return {"subpixel_equalisation": None, "z_calibration": None, "ratio_sigma_scale": None}

    monkeypatch.setattr(pipeline, "predict", perfect_predict)
    monkeypatch.setattr(pipeline, "fit_position_corrections", spy)
    pipeline.choose_operating_point(export, n_frames=60, simulation=target, store=False)
    assert tuple(asked["z_range"]) == (-500.0, 500.0)

    simulated = []

    class Stop(Exception):
        pass

    def record(sim, n_frames, seed, out_dir, name="test"):
        simulated.append(sim)
        raise Stop

    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "simulate_held_out_movie", record)
    with pytest.raises(Stop):
        pipeline.fit_position_corrections(load_exported(export), 0.5, None, seed=1, z_range=(-500.0, 500.0))
    assert tuple(simulated[0].emitters.z_range) == (-500.0, 500.0) and simulated[0].emitters.density == 0.5
