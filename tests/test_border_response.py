"""The frame border: positions of emitters in the outermost pixels, which a network sees next to zero padding and
with part of their PSF cut off, are mapped so that their mean error is ~0 at every distance from the border."""

import numpy as np
import pytest

from decode_accel import pipeline
from decode_accel.errors import DecodeAccelError
from decode_accel.export import export_model, load_exported
from decode_accel.inference.postprocess import BorderResponse, SubpixelEqualisation
from decode_accel.io import read_table
from tests.test_operating_point import noisy_model, sim_config

SIZE = 64


def shrunk_at_left_and_bottom(true_xy: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Positions pulled inwards by up to 0.3 px within 1 px of the left and the bottom border (0 beyond),
    as the benchmark models placed them; the other two borders untouched."""
    x, y = true_xy[:, 0].copy(), true_xy[:, 1].copy()
    x = x + 0.3 * np.clip(1.0 - x, 0.0, None)
    d_bottom = size - y
    y = y - 0.3 * np.clip(1.0 - d_bottom, 0.0, None)
    return np.stack([x, y], axis=1)


def pairs(n: int, seed: int, noise_px: float = 0.1):
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0, SIZE, (n, 2))
    found = shrunk_at_left_and_bottom(truth) + rng.normal(0, noise_px, (n, 2))
    return truth, found


def mean_error_by_true_distance(truth, found, side: str, bins=np.linspace(0, 2, 11)):
    true_d = BorderResponse.distances(truth[:, 0], truth[:, 1], SIZE, SIZE)[side]
    found_d = BorderResponse.distances(found[:, 0], found[:, 1], SIZE, SIZE)[side]
    which = np.digitize(true_d, bins) - 1
    return np.array([np.mean(found_d[which == k] - true_d[which == k]) for k in range(len(bins) - 1)])


def test_the_maps_remove_an_inward_pull_at_the_border_at_every_distance_and_leave_the_inside_alone():
    truth, found = pairs(400_000, 0)
    border = BorderResponse.fit(truth, found, SIZE, SIZE, size_multiple=4)
    assert sorted(border.sides) == ["bottom", "left", "right", "top"]
    test_truth, test_found = pairs(400_000, 1)
    x, y, slope_x, slope_y = border(test_found[:, 0], test_found[:, 1], SIZE, SIZE)
    fixed = np.stack([x, y], axis=1)
    for side in ("left", "bottom"):
        before = mean_error_by_true_distance(test_truth, test_found, side)
        after = mean_error_by_true_distance(test_truth, fixed, side)
        assert np.max(np.abs(before)) > 0.2                   # pulled by up to 0.3 px next to the border
        assert np.max(np.abs(after)) < 0.03, (side, after)    # 3 nm at 100 nm pixels
    for side in ("right", "top"):                             # nothing to remove: hardly moved
        assert np.max(np.abs(mean_error_by_true_distance(test_truth, fixed, side))) < 0.03
    far = np.all((test_found > BorderResponse.REACH_PX) & (test_found < SIZE - BorderResponse.REACH_PX), axis=1)
    np.testing.assert_array_equal(fixed[far], test_found[far])
    np.testing.assert_array_equal(slope_x[far], 1.0)
    # the map stretches the squeezed border pixel: its sigmas grow by the slope, never shrink there
    left = test_found[:, 0] < 0.8
    assert np.median(slope_x[left]) > 1.2 and np.all(slope_x > 0) and np.all(slope_y > 0)


def test_bottom_and_right_maps_act_only_on_frames_the_network_sees_with_a_zero_padded_border():
    truth, found = pairs(200_000, 2)
    border = BorderResponse.fit(truth, found, SIZE, SIZE, size_multiple=4)
    point = np.array([[0.5, 62.0 + 1.5]])
    x, y, _, _ = border(point[:, 0], point[:, 1], SIZE, SIZE)
    assert x[0] != 0.5 and y[0] != 63.5
    # a 63-px-high frame is padded to 64 by edge replication at the bottom: a border of another kind
    x, y, _, _ = border(point[:, 0], point[:, 1] - 1.0, SIZE - 1, SIZE)
    assert x[0] != 0.5 and y[0] == 62.5


def test_border_maps_travel_with_the_equalisation_and_older_exports_have_none():
    truth, found = pairs(100_000, 3)
    border = BorderResponse.fit(truth, found, SIZE, SIZE, size_multiple=4)
    eq = SubpixelEqualisation([0.0, 0.0], [0.0, 0.0]).with_offset((0.01, 0.0)).with_border(border)
    again = SubpixelEqualisation.from_any(eq.to_dict())
    point = (np.array([0.4, 30.0]), np.array([63.7, 30.0]))
    np.testing.assert_allclose(again(*point, (SIZE, SIZE))[0], eq(*point, (SIZE, SIZE))[0])
    assert again.offset.tolist() == [0.01, 0.0]
    old = SubpixelEqualisation.from_any({"x": [0.0, 0.0], "y": [0.0, 0.0], "offset": [0.0, 0.0]})
    assert old.border is None and "border" not in old.to_dict()
    with pytest.raises(DecodeAccelError, match="border"):
        SubpixelEqualisation.from_any({"x": [0.0, 0.0], "y": [0.0, 0.0], "border": {"sides": {"middle": {}},
                                                                                   "size_multiple": 4}})


def test_too_few_emitters_near_the_borders_give_no_maps():
    truth, found = pairs(2000, 4)      # ~60 per side
    assert BorderResponse.fit(truth, found, SIZE, SIZE, size_multiple=4) is None


def test_the_operating_point_stores_border_maps_that_undo_a_models_inward_pull(tmp_path, monkeypatch):
    export = export_model(tmp_path / "e", noisy_model(), simulation_config=sim_config())
    rng = np.random.default_rng(5)

    def border_shrinking_predict(model, tiff, threshold=None, postprocessor=None, **kwargs):
        """Every true emitter found (p 0.9), pulled inwards at the left and bottom borders, with 5 nm of noise."""
        truth = read_table(str(tiff).replace(".tif", "_truth.csv"))
        xy = truth[["x", "y"]].to_numpy() / 100.0
        height = int(round(truth.attrs.get("height", 0))) or SIZE
        found = shrunk_at_left_and_bottom(xy, height) + rng.normal(0, 0.05, xy.shape)
        return truth[["frame"]].assign(x=100.0 * found[:, 0], y=100.0 * found[:, 1], prob=0.9)

    monkeypatch.setattr(pipeline, "predict", border_shrinking_predict)
    monkeypatch.setattr(pipeline, "EQUALISATION_EMITTER_FRAMES", 8000)
    monkeypatch.setattr(pipeline, "BORDER_PAIRS_PER_SIDE", 1500)
    pipeline.choose_operating_point(export, n_frames=40, height=32, width=32)
    eq = SubpixelEqualisation.from_any(load_exported(export).operating_point["subpixel_equalisation"])
    assert eq.border is not None
    truth, found = pairs(200_000, 6, noise_px=0.05)
    x, y, _, _ = eq(found[:, 0], found[:, 1], (SIZE, SIZE))
    fixed = np.stack([x, y], axis=1)
    for side in ("left", "bottom"):
        assert np.max(np.abs(mean_error_by_true_distance(truth, fixed, side))) < 0.05, side
    assert "positions within 2 px of the frame border mapped" in (export / "README.md").read_text()
