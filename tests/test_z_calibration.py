"""z calibration: a network whose z shrinks towards the middle of its range (the posterior mean of its
training prior) is mapped back so that the mean z error is ~0 at every depth, with sigmas widened by the
map's slope."""

import numpy as np
import pandas as pd
import pytest
import torch

from decode_accel import pipeline
from decode_accel.errors import DecodeAccelError
from decode_accel.export import export_model, load_exported
from decode_accel.inference.postprocess import PostProcessor, ZResponseCalibration
from decode_accel.io import read_table
from decode_accel.simulation.config import SimulationConfig
from tests.test_operating_point import noisy_model


def shrunk(true_z: np.ndarray) -> np.ndarray:
    """A network's mean z: faithful in the middle, compressed towards the centre at the ends."""
    return 700.0 * np.tanh(true_z / 700.0)


def test_a_compressed_z_comes_back_to_zero_mean_error_at_every_depth():
    rng = np.random.default_rng(0)
    true_z = rng.uniform(-750, 750, 60_000)
    network_z = shrunk(true_z) + rng.normal(0, 60, true_z.size)
    edges = np.linspace(-500, 500, 9)
    which = np.digitize(true_z, edges) - 1
    inside = (which >= 0) & (which < 8)
    before = [np.mean((network_z - true_z)[inside & (which == k)]) for k in range(8)]
    assert max(abs(b) for b in before) > 40          # the ends are compressed by tens of nm
    z_map = ZResponseCalibration.fit(true_z, network_z, (-750, 750))
    corrected, slope = z_map(network_z)
    after = [np.mean((corrected - true_z)[inside & (which == k)]) for k in range(8)]
    assert max(abs(a) for a in after) < 5           # ~0 in every bin of the test range (noise ~1 nm)
    # the slope is the inverse of the network's response: 1 in the middle, 1 / (1 - tanh^2) at the ends
    mid, end = np.argmin(np.abs(network_z)), np.argmax(network_z)
    assert slope[mid] == pytest.approx(1.0, abs=0.05)
    assert slope[end] > 1.5


def test_the_map_continues_beyond_its_knots_and_survives_its_dict_form():
    z_map = ZResponseCalibration([-400.0, 0.0, 400.0], [-500.0, 0.0, 500.0])
    z, slope = z_map(np.array([-600.0, -200.0, 200.0, 600.0]))
    np.testing.assert_allclose(z, [-750.0, -250.0, 250.0, 750.0])
    np.testing.assert_allclose(slope, 1.25)
    again = ZResponseCalibration.from_any(z_map.to_dict())
    np.testing.assert_array_equal(again.predicted, z_map.predicted)
    for bad in ({"predicted": [0.0, -1.0], "true": [0.0, 1.0]}, {"predicted": [0.0]}, {"true": [1.0, 2.0]}):
        with pytest.raises(DecodeAccelError, match="z calibration"):
            ZResponseCalibration.from_any(bad)


def test_a_network_z_that_does_not_follow_the_truth_is_refused():
    rng = np.random.default_rng(1)
    true_z = rng.uniform(-500, 500, 20_000)
    with pytest.raises(DecodeAccelError, match="does not increase"):
        ZResponseCalibration.fit(true_z, rng.normal(0, 100, true_z.size), (-500, 500))


def test_the_post_processor_maps_z_and_widens_its_sigma():
    p = torch.zeros(1, 8, 8)
    p[0, 3, 3] = 0.9
    maps = {"p": p, "dx": torch.zeros_like(p), "dy": torch.zeros_like(p), "z": torch.full_like(p, 200.0),
            "z_sigma": torch.full_like(p, 40.0)}
    z_map = ZResponseCalibration([-400.0, 0.0, 400.0], [-500.0, 0.0, 500.0])
    table = PostProcessor(threshold=0.5, z_calibration=z_map.to_dict())(maps)
    assert table["z"].iloc[0] == pytest.approx(250.0)
    assert table["z_sigma"].iloc[0] == pytest.approx(50.0)


def test_the_operating_point_of_a_3d_model_stores_a_z_calibration_that_undoes_its_compression(tmp_path, monkeypatch):
    sim = SimulationConfig(frame={"height": 16, "width": 16, "px_size": 100.0}, camera={"preset": "challenge2016"},
                           emitters={"density": 1.0, "photons_mean": 2000.0, "photons_sd": 200.0,
                                     "z_range": [-750.0, 750.0]},
                           psf={"kind": "astigmatic", "sigma0": 1.0, "gamma": 250.0, "depth": 400.0},
                           background={"uniform": [20.0, 30.0]})
    export = export_model(tmp_path / "e", noisy_model(), simulation_config=sim)
    rng = np.random.default_rng(2)

    def compressing_predict(model, tiff, threshold=None, postprocessor=None, **kwargs):
        """Every true emitter found (p 0.9) at its x, y, with a compressed, noisy z."""
        truth = read_table(str(tiff).replace(".tif", "_truth.csv"))
        z = shrunk(truth["z"].to_numpy()) + rng.normal(0, 30, len(truth))
        return truth[["frame", "x", "y"]].assign(z=z, prob=0.9)

    monkeypatch.setattr(pipeline, "predict", compressing_predict)
    monkeypatch.setattr(pipeline, "EQUALISATION_EMITTER_FRAMES", 20_000)
    monkeypatch.setattr(pipeline, "BORDER_PAIRS_PER_SIDE", 100)  # no border maps needed here: a short movie
    point = pipeline.choose_operating_point(export, n_frames=40, height=32, width=32)
    z_map = ZResponseCalibration.from_any(load_exported(export).operating_point["z_calibration"])
    assert point["z_calibration"] == z_map.to_dict()
    true_z = np.array([-500.0, -250.0, 0.0, 250.0, 500.0])
    corrected, _ = z_map(shrunk(true_z))
    np.testing.assert_allclose(corrected, true_z, atol=8.0)
