"""The napari plugin's reader and layer data without napari or Qt: which files it claims, what the layers hold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from decode_accel.errors import DecodeAccelError
from decode_accel.io import read_table, write_table
from decode_accel.napari import movie_transform, points_layer_data, probability_layer_data, render_layer_data
from decode_accel.napari._reader import get_reader, read_localizations
from decode_accel.napari.layers import COLOR_BY, DYE_COLORS, UNASSIGNED_COLOR, resolve_color_by


def table(n=5, two_colour=False):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"frame": np.arange(n) % 3, "x": rng.uniform(100, 3000, n), "y": rng.uniform(100, 2000, n),
                       "z": np.zeros(n), "photons": rng.uniform(500, 3000, n), "id": np.arange(n),
                       "bg": np.full(n, 20.0), "prob": rng.uniform(0.5, 1.0, n), "x_sigma": np.full(n, 10.0),
                       "y_sigma": np.full(n, 20.0)})
    if two_colour:
        df["color"] = np.array([0, 1, -1, 1, 0][:n])
    return df


@pytest.mark.parametrize("suffix", [".csv", ".hdf5"])
def test_both_output_formats_open_as_points_in_nm_with_their_features(tmp_path, suffix):
    path = tmp_path / f"locs{suffix}"
    write_table(table(), path, px_size_nm=100.0, width=32, height=24, n_frames=3)
    reader = get_reader(str(path))
    assert reader is read_localizations
    [(data, kwargs, kind)] = reader(str(path))
    back = read_table(path)  # the library's reader is the one used
    assert kind == "points" and data.shape == (5, 3)
    np.testing.assert_allclose(data, back[["frame", "y", "x"]].to_numpy())
    np.testing.assert_allclose(data[:, 1:], table()[["y", "x"]].to_numpy(), atol=0.01)
    features = kwargs["features"]
    for col in ("prob", "photons", "x_sigma", "y_sigma", "uncertainty"):
        assert col in features.columns
    np.testing.assert_allclose(features["uncertainty"], np.sqrt((10.0 ** 2 + 20.0 ** 2) / 2), rtol=1e-4)
    assert kwargs["face_color"] == "prob" and kwargs["units"] == ("pixel", "nm", "nm")
    assert kwargs["metadata"]["px_size_nm"] == (100.0 if suffix == ".hdf5" else None)


def test_files_that_are_not_ours_are_left_to_other_readers(tmp_path):
    other = tmp_path / "points.csv"
    other.write_text("axis-0,axis-1\n1,2\n")
    assert get_reader(str(other)) is None
    assert get_reader(str(tmp_path / "missing.csv")) is None
    assert get_reader(str(tmp_path)) is None
    empty_h5 = tmp_path / "x.h5"
    import h5py
    with h5py.File(empty_h5, "w") as f:
        f["data"] = np.zeros(3)
    assert get_reader(str(empty_h5)) is None


def test_a_broken_file_is_the_librarys_one_line_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text('"frame","x [nm]","y [nm]","intensity [photon]"\n1,abc,2,3\n')
    with pytest.raises(DecodeAccelError, match="x \\[nm\\]") as err:
        get_reader(str(bad))(str(bad))
    assert "\n" not in str(err.value)


def test_colour_by_dye_and_the_nm_placement_of_images():
    data, kwargs, _ = points_layer_data(table(two_colour=True), px_size_nm=100.0, color_by="dye",
                                        dye_table=[{"name": "A"}, {"name": "B"}])
    assert list(kwargs["features"]["dye"]) == ["A", "B", "unassigned", "B", "A"]
    colors = kwargs["face_color"]
    assert colors[0] == colors[4] != colors[1] == colors[3] != colors[2]
    # a camera pixel (row i, col j) has its centre at ((i + .5) px, (j + .5) px): index * scale + translate
    t = movie_transform(100.0, ndim=3)
    assert np.allclose(np.array([0, 2, 3]) * t["scale"] + t["translate"], (0, 250, 350))
    _, r, _ = render_layer_data(np.ones((4, 4)), render_px_nm=10.0)
    assert np.allclose(np.array([0, 0]) * r["scale"] + r["translate"], (5, 5))
    p, pk, _ = probability_layer_data(np.zeros((2, 6, 8)), px_size_nm=100.0, frame=3)
    assert p.shape == (6, 8) and pk["metadata"]["frame"] == 3
    empty, ek, _ = points_layer_data(table().iloc[:0], px_size_nm=100.0)
    assert empty.shape == (0, 3) and isinstance(ek["face_color"], str)


@pytest.mark.parametrize("suffix", [".csv", ".hdf5"])
def test_a_two_colour_file_opens_coloured_by_dye(tmp_path, suffix):
    path = tmp_path / f"two{suffix}"
    write_table(table(two_colour=True), path, px_size_nm=100.0, width=32, height=24, n_frames=3)
    [(_, kwargs, _)] = read_localizations(str(path))  # colour by 'auto': the file has a dye column
    assert kwargs["metadata"]["color_by"] == "dye"
    assert list(kwargs["features"]["dye"]) == ["dye0", "dye1", "unassigned", "dye1", "dye0"]
    legend = kwargs["metadata"]["dye_colors"]
    assert [legend[d] for d in ("dye0", "dye1", "unassigned")] == [DYE_COLORS[0], DYE_COLORS[1], UNASSIGNED_COLOR]
    assert kwargs["face_color"] == [legend[d] for d in kwargs["features"]["dye"]]
    [(_, by_prob, _)] = read_localizations(str(path), color_by="probability")
    assert by_prob["face_color"] == "prob" and by_prob["metadata"]["color_by"] == "probability"


def test_colour_by_auto_dye_and_probability():
    two, one = table(two_colour=True), table()
    assert [resolve_color_by(c, two) for c in COLOR_BY] == ["dye", "probability", "dye"]
    assert [resolve_color_by(c, one) for c in COLOR_BY] == ["probability", "probability", "probability"]
    with pytest.raises(ValueError, match="color_by"):
        resolve_color_by("photons", one)
