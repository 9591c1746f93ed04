"""Rendering: histogram counts, Gaussian mass and centre, image files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from decode_accel.errors import DecodeAccelError
from decode_accel.inference.render import render


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    n = 500
    return pd.DataFrame({"frame": np.arange(n) % 7, "x": rng.uniform(0, 3200, n), "y": rng.uniform(0, 2400, n),
                         "z": 0.0, "photons": 1000.0, "id": np.arange(n),
                         "x_sigma": rng.uniform(5, 30, n), "y_sigma": rng.uniform(5, 30, n)})


def test_histogram_counts_equal_numpy_histogram2d(table):
    img = render(table, px_size_nm=20.0, method="histogram", width_nm=3200, height_nm=2400)
    assert img.shape == (120, 160)
    ref, _, _ = np.histogram2d(table["y"], table["x"], bins=[np.arange(121) * 20.0, np.arange(161) * 20.0])
    np.testing.assert_array_equal(img, ref)


def test_each_gaussian_adds_one_localization_centred_on_its_position():
    one = pd.DataFrame({"x": [1234.0], "y": [987.0], "x_sigma": [15.0], "y_sigma": [25.0]})
    img = render(one, px_size_nm=5.0, width_nm=2500, height_nm=2000)
    assert img.sum() == pytest.approx(1.0, abs=1e-3)
    rows, cols = np.indices(img.shape)
    # centre of mass, in nm, with pixel centres at (index + 0.5) * px
    assert ((cols + 0.5) * 5.0 * img).sum() / img.sum() == pytest.approx(1234.0, abs=0.5)
    assert ((rows + 0.5) * 5.0 * img).sum() / img.sum() == pytest.approx(987.0, abs=0.5)
    # second moment = sigma^2 + px^2/12 (the pixel-integration adds a uniform's variance)
    var_y = (((rows + 0.5) * 5.0 - 987.0) ** 2 * img).sum() / img.sum()
    assert np.sqrt(var_y) == pytest.approx(np.sqrt(25.0 ** 2 + 5.0 ** 2 / 12), rel=0.02)


def test_gaussian_rendering_conserves_the_number_of_localizations_away_from_edges(table):
    inside = table[(table["x"].between(200, 3000)) & (table["y"].between(200, 2200))]
    img = render(inside, px_size_nm=20.0, width_nm=3200, height_nm=2400)
    assert img.sum() == pytest.approx(len(inside), rel=1e-4)
    fixed = render(inside, px_size_nm=20.0, sigma_nm=40.0, width_nm=3200, height_nm=2400)
    assert fixed.sum() == pytest.approx(len(inside), rel=1e-3)


def test_extent_defaults_to_the_camera_field_recorded_on_the_table(table):
    table.attrs.update(px_size_nm=100.0, width=32, height=24)
    img = render(table, px_size_nm=10.0, method="histogram")
    assert img.shape == (240, 320)


def test_png_and_tiff_files_are_written(tmp_path, table):
    img = render(table, px_size_nm=20.0, out=tmp_path / "sr.tif", width_nm=3200, height_nm=2400)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "sr.tif"), img)
    render(table, px_size_nm=20.0, out=tmp_path / "sr.png", width_nm=3200, height_nm=2400)
    assert (tmp_path / "sr.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_give_one_line_errors(tmp_path, table):
    with pytest.raises(DecodeAccelError, match="px_size_nm"):
        render(table, px_size_nm=0)
    with pytest.raises(DecodeAccelError, match="method: unknown rendering"):
        render(table, method="voronoi")
    with pytest.raises(DecodeAccelError, match="sigma_nm: .*x_sigma"):
        render(table.drop(columns=["x_sigma"]))
    with pytest.raises(DecodeAccelError, match="--render: unknown image format"):
        render(table, out=tmp_path / "sr.bmp")
