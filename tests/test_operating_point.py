"""The operating point: the detection threshold is chosen at training on a tuning movie of the training
physics, stored in the export, and used by predict unless the user gives another."""

import importlib
import json

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from decode_accel import pipeline
from decode_accel.errors import DecodeAccelError
from decode_accel.hub import export_model, load_exported
from decode_accel.inference.postprocess import ProbabilityCalibration
from decode_accel.io import read_table
from decode_accel.models import SigmaMUNet
from decode_accel.simulation.config import SimulationConfig
from tests.numerics import randomize_output_layers

# the module (decode_accel.inference re-exports the function under the same name)
predict_module = importlib.import_module("decode_accel.inference.predict")


def sim_config():
    return SimulationConfig(frame={"height": 16, "width": 16, "px_size": 100.0}, camera={"preset": "challenge2016"},
                            emitters={"density": 1.0, "photons_mean": 2000.0, "photons_sd": 200.0,
                                      "z_range": [0.0, 0.0]},
                            psf={"kind": "gaussian", "sigma": 1.0}, background={"uniform": [20.0, 30.0]})


def noisy_model():
    """A network with random output layers and a detection prior high enough to report many candidates."""
    torch.manual_seed(0)
    model = randomize_output_layers(SigmaMUNet.from_preset("tiny", z_enabled=False), seed=1)
    with torch.no_grad():
        model.heads["p"][-1].bias.fill_(-1.0)
    return model.eval()


def movie(tmp_path):
    adu = (100 + 50 * np.random.default_rng(0).random((6, 16, 16))).astype(np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", adu)
    return tmp_path / "m.tif"


def test_predict_uses_the_exports_threshold_unless_told_otherwise(tmp_path):
    export = export_model(tmp_path / "e", noisy_model(), simulation_config=sim_config(),
                          operating_point={"threshold": 0.6, "chosen_on": "a test"})
    assert load_exported(export).threshold == 0.6
    tif = movie(tmp_path)
    by_default = predict_module.predict(export, tif, progress=False)
    at_06 = predict_module.predict(export, tif, threshold=0.6, progress=False)
    at_03 = predict_module.predict(export, tif, threshold=0.3, progress=False)
    assert len(at_03) > len(at_06) > 0  # the threshold matters on this movie
    pd.testing.assert_frame_equal(by_default, at_06)
    assert by_default["prob"].min() >= 0.6
    card = (export / "README.md").read_text()
    assert "detection probability >= 0.6 by default (chosen on a test" in card


def test_an_export_without_an_operating_point_keeps_the_post_processors_default(tmp_path):
    export = export_model(tmp_path / "e", noisy_model(), simulation_config=sim_config())
    assert load_exported(export).threshold is None
    tif = movie(tmp_path)
    pd.testing.assert_frame_equal(predict_module.predict(export, tif, progress=False),
                                  predict_module.predict(export, tif, threshold=0.3, progress=False))


@pytest.mark.parametrize("threshold", [0.0, 1.5, "high", None])
def test_an_impossible_threshold_is_refused_when_exporting(tmp_path, threshold):
    with pytest.raises(DecodeAccelError, match="operating_point.threshold"):
        export_model(tmp_path / "e", noisy_model(), simulation_config=sim_config(),
                     operating_point={"threshold": threshold})


def test_the_threshold_with_the_best_jaccard_index_on_the_tuning_movie_is_chosen_and_stored(tmp_path, monkeypatch):
    export = export_model(tmp_path / "e", noisy_model(), simulation_config=sim_config())
    seen = {}

    def fake_predict(model, tiff, threshold=None, postprocessor=None, **kwargs):
        """Every true emitter found at p = 0.8 and one false detection per frame at p = 0.4."""
        threshold = postprocessor.threshold if threshold is None else threshold
        seen["threshold"], seen["tiff"], seen["calibration"] = threshold, tiff, postprocessor.calibration
        truth = read_table(str(tiff).replace(".tif", "_truth.csv"))
        real = truth[["frame", "x", "y"]].assign(prob=0.8)
        fake = pd.DataFrame({"frame": np.arange(40), "x": 10.0, "y": 10.0, "prob": 0.4})
        table = pd.concat([real, fake], ignore_index=True)
        return table[table["prob"] >= threshold].reset_index(drop=True)

    monkeypatch.setattr(pipeline, "predict", fake_predict)
    point = pipeline.choose_operating_point(export, n_frames=40, height=32, width=32, subpixel=False)
    # one prediction pass at the lowest candidate, of the network's own p; then every candidate is scored
    assert seen["threshold"] == min(pipeline.THRESHOLD_CANDIDATES) and seen["calibration"] is None
    assert "tuning" in str(seen["tiff"])
    # any threshold in (0.4, 0.8] keeps exactly the real ones; the tie goes to the one nearest 0.5
    assert point["threshold"] == pytest.approx(0.5)
    assert point["precision"] == 1.0 and point["recall"] == 1.0 and point["jaccard"] == 1.0
    # calibrated: every detection at p 0.4 was false, every one at 0.8 real
    calibration = ProbabilityCalibration.from_any(point["probability_calibration"])
    assert calibration(np.array([0.4, 0.8])) == pytest.approx([0.0, 1.0])
    # the tuning movie is not one of the reported held-out movies
    assert point["tuning_seed"] >= pipeline.TUNING_SEED_BASE > pipeline.held_out_seed(10**6)
    stored = json.loads((export / "decode_accel.json").read_text())["operating_point"]
    assert stored["threshold"] == pytest.approx(0.5) and load_exported(export).threshold == pytest.approx(0.5)


def test_the_operating_point_is_chosen_at_the_density_the_model_is_meant_for(tmp_path, monkeypatch):
    """False detections scale with the area, true ones with the density: a threshold that pays at high
    density (a dim fifth of the emitters is worth one false detection per frame) does not at low density."""
    export = export_model(tmp_path / "e", noisy_model(), simulation_config=sim_config())  # trained at 1/µm²

    def fake_predict(model, tiff, threshold=None, postprocessor=None, **kwargs):
        threshold = postprocessor.threshold if threshold is None else threshold
        truth = read_table(str(tiff).replace(".tif", "_truth.csv")).reset_index(drop=True)
        prob = np.where(np.arange(len(truth)) % 5 == 0, 0.45, 0.8)   # one emitter in five is dim
        real = truth[["frame", "x", "y"]].assign(prob=prob)
        n_frames = len(tifffile.TiffFile(tiff).pages)
        fake = pd.DataFrame({"frame": np.arange(n_frames), "x": 1.0, "y": 1.0, "prob": 0.45})
        table = pd.concat([real, fake], ignore_index=True)
        return table[table["prob"] >= threshold].reset_index(drop=True)

    monkeypatch.setattr(pipeline, "predict", fake_predict)
    # 32 x 32 px of 100 nm: about 10 emitters per frame at 1/µm², about 1 at 0.1/µm²
    dense = pipeline.choose_operating_point(export, n_frames=60, height=32, width=32, store=False,
                                           subpixel=False)
    meant_for = sim_config().model_copy(update={"emitters": sim_config().emitters.model_copy(update={"density": 0.1})})
    sparse = pipeline.choose_operating_point(export, n_frames=200, height=32, width=32, simulation=meant_for,
                                            subpixel=False)
    # dense: the dim emitters are worth their false detections (kept, recall ~1); sparse: dropped (precision 1)
    assert dense["density"] == pytest.approx(1.0) and dense["all_recall"] > 0.98 and dense["all_precision"] < 0.95
    assert sparse["density"] == pytest.approx(0.1) and sparse["all_precision"] == 1.0
    assert sparse["all_recall"] == pytest.approx(0.8, abs=0.05)
    assert "0.1 emitters/µm²" in sparse["chosen_on"]
    assert load_exported(export).operating_point["density"] == pytest.approx(0.1)


def test_training_physics_raise_a_low_density_and_widen_a_3d_z_range_but_leave_2d_z_alone():
    from decode_accel.training.config import load_config

    low_2d = load_config("recipes/configs/benchmark/a_2d_low_density.yaml")
    assert pipeline.training_physics_overrides(low_2d) == [f"simulation.emitters.density={pipeline.MIN_TRAIN_DENSITY}"]
    astig = load_config("recipes/configs/benchmark/c_3d_astigmatic.yaml")           # z in [-500, 500] nm
    overrides = pipeline.training_physics_overrides(astig, min_density=None, z_margin=0.2)
    assert overrides == ["simulation.emitters.z_range=[-600, 600]"]
    widened = load_config("recipes/configs/benchmark/c_3d_astigmatic.yaml", overrides)
    assert tuple(widened.simulation.emitters.z_range) == (-600.0, 600.0)
    assert pipeline.training_physics_overrides(astig, min_density=None, z_margin=None) == []


def test_a_fitted_calibration_recovers_a_known_share_of_real_detections():
    rng = np.random.default_rng(0)
    prob = rng.random(20_000)
    real = rng.random(20_000) < np.sqrt(prob)          # truly real with probability sqrt(p)
    calibration = ProbabilityCalibration.fit(prob, real)
    grid = np.linspace(0.1, 0.9, 9)
    assert np.abs(calibration(grid) - np.sqrt(grid)).max() < 0.05
    assert np.all(np.diff(calibration(np.linspace(0, 1, 101))) >= 0)  # monotone: it never reorders detections
    # below the lowest p it saw, the map falls to 0 at p = 0 (empty background is not made probable)
    seen_from_03 = ProbabilityCalibration.fit(prob[prob > 0.3], real[prob > 0.3])
    assert seen_from_03(0.0) == 0.0 and seen_from_03(0.15) < 0.5 * seen_from_03(0.31)
    # the threshold of the calibrated p maps back to the network's own p
    assert calibration.raw_threshold(0.7) == pytest.approx(0.49, abs=0.05)
    as_tensor = calibration(torch.tensor(grid, dtype=torch.float32))
    assert torch.is_tensor(as_tensor) and np.allclose(as_tensor.numpy(), calibration(grid), atol=1e-6)


def test_the_post_processor_reports_and_thresholds_the_calibrated_probability():
    """One isolated blob of p 0.35 in total: below a 0.5 threshold of the network's p, above it once
    calibrated to 0.7."""
    p = torch.zeros(1, 8, 8)
    p[0, 4, 4] = 0.35
    maps = {"p": p, "dx": torch.zeros_like(p), "dy": torch.zeros_like(p)}
    doubling = ProbabilityCalibration([0.0, 0.5, 1.0], [0.0, 1.0, 1.0])
    from decode_accel.inference.postprocess import PostProcessor

    assert len(PostProcessor(threshold=0.5)(maps)) == 0
    table = PostProcessor(threshold=0.5, calibration=doubling.to_dict())(maps)
    assert len(table) == 1 and table["prob"].iloc[0] == pytest.approx(0.7)
    assert len(PostProcessor(threshold=0.75, calibration=doubling)(maps)) == 0


@pytest.mark.parametrize("raw, calibrated", [([0.5], [0.5]), ([0.0, 0.5, 0.4], [0.1, 0.2, 0.3]),
                                             ([0.0, 1.0], [0.8, 0.2]), ([0.0, 1.0], [0.0, 1.5])])
def test_an_impossible_calibration_is_refused(raw, calibrated):
    with pytest.raises(DecodeAccelError, match="probability calibration"):
        ProbabilityCalibration(raw, calibrated)


def test_predict_reports_the_probabilities_calibrated_by_the_export(tmp_path):
    halving = {"raw": [0.0, 1.0], "calibrated": [0.0, 0.5]}
    plain = export_model(tmp_path / "plain", noisy_model(), simulation_config=sim_config(),
                         operating_point={"threshold": 0.1})
    calibrated = export_model(tmp_path / "cal", noisy_model(), simulation_config=sim_config(),
                              operating_point={"threshold": 0.1, "probability_calibration": halving})
    tif = movie(tmp_path)
    raw = predict_module.predict(plain, tif, progress=False)
    half = predict_module.predict(calibrated, tif, progress=False)
    # the same detections where the network's p >= 0.2, reported at half the probability
    expected = raw[raw["prob"] >= 0.2].reset_index(drop=True)
    assert len(half) == len(expected) > 0
    np.testing.assert_allclose(half["prob"].to_numpy(), 0.5 * expected["prob"].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(half["x"].to_numpy(), expected["x"].to_numpy())
