"""CRLB: the worked numbers of smlm_benchmarks.md §2, an independent closed form and finite differences."""

import numpy as np
import pytest
from scipy.stats import norm

from decode_accel.errors import DecodeAccelError
from decode_accel.evaluation.crlb import (AstigmaticPSF, GaussianPSF, crlb_astigmatic, crlb_for_table,
                                          crlb_gaussian_2d, crlb_ratio, mortensen_mle_sigma)


def test_poisson_crlb_of_a_one_pixel_gaussian_with_1000_photons_on_10_background_is_4_09_nm():
    bound = crlb_gaussian_2d(1000, 10, sigma_nm=100, px_size_nm=100)
    assert bound["x"] == pytest.approx(4.09, abs=0.01)
    assert bound["y"] == pytest.approx(4.09, abs=0.01)


def test_emccd_excess_noise_raises_the_bound_to_5_79_nm():
    assert crlb_gaussian_2d(1000, 10, 100, 100, camera="emccd")["x"] == pytest.approx(5.79, abs=0.01)


@pytest.mark.parametrize("photons", [100, 300, 1000, 3000, 10000])
@pytest.mark.parametrize("bg", [0.1, 1, 10, 100, 200])
def test_fisher_bound_agrees_with_mortensens_mle_closed_form(photons, bg):
    fisher = crlb_gaussian_2d(photons, bg, 100, 100)["x"]
    assert fisher == pytest.approx(mortensen_mle_sigma(photons, bg, 100, 100), rel=0.01)


def test_bounds_reproduce_the_reference_table_corners():
    photons = np.array([[100], [1000], [10000]])
    bg = np.array([0.1, 10, 200])
    got = crlb_gaussian_2d(photons, bg, 100, 100)["x"]
    want = np.array([[10.95, 21.64, 78.16], [3.32, 4.09, 8.78], [1.04, 1.09, 1.44]])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=0.01)  # the table is rounded to 0.01 nm


def test_bound_barely_depends_on_the_sub_pixel_position():
    xs = np.array([50.0, 75.0, 100.0])  # pixel centre, a quarter, the pixel edge
    got = crlb_gaussian_2d(1000, 10, 100, 100, x_nm=xs, y_nm=50.0)["x"]
    assert got[0] == pytest.approx(4.09, abs=0.01)
    assert got[2] == pytest.approx(4.10, abs=0.015)


def test_fisher_matrix_matches_finite_differences_of_an_independent_pixel_model():
    # mu_k from normal CDF differences; derivatives by central differences; then invert.
    n_ph, b, s, x0, y0 = 800.0, 5.0, 1.3, 7.3, 6.8
    u = np.arange(15.0)

    def mu(theta):
        x, y, n, bb = theta
        ex = norm.cdf(u + 0.5, x, s) - norm.cdf(u - 0.5, x, s)
        ey = norm.cdf(u + 0.5, y, s) - norm.cdf(u - 0.5, y, s)
        return n * np.outer(ey, ex) + bb

    theta = np.array([x0, y0, n_ph, b])
    steps = np.array([1e-5, 1e-5, 1e-3, 1e-5])
    d = [(mu(theta + h * e) - mu(theta - h * e)) / (2 * h) for h, e in zip(steps, np.eye(4))]
    m = mu(theta)
    fisher = np.array([[np.sum(a * c / m) for c in d] for a in d])
    want = np.sqrt(np.diag(np.linalg.inv(fisher)))
    got = crlb_gaussian_2d(n_ph, b, s * 100, 100, x_nm=(x0 + 0.5) * 100, y_nm=(y0 + 0.5) * 100, roi_size=15)
    assert got["x"] == pytest.approx(want[0] * 100, rel=1e-4)
    assert got["photons"] == pytest.approx(want[2], rel=1e-4)
    assert got["bg"] == pytest.approx(want[3], rel=1e-4)


def test_astigmatic_bounds_match_the_reference_table():
    psf = AstigmaticPSF(sigma0_nm=100, gamma_nm=250, d_nm=400)
    z = np.array([-500.0, -250.0, 0.0, 250.0, 500.0])
    got = crlb_astigmatic(1000, 10, z, psf, px_size_nm=100)
    np.testing.assert_allclose(got["x"], [9.70, 6.82, 4.98, 4.37, 5.49], atol=0.02)
    np.testing.assert_allclose(got["y"], [5.49, 4.37, 4.98, 6.82, 9.70], atol=0.02)
    np.testing.assert_allclose(got["z"], [28.5, 30.9, 23.0, 30.9, 28.5], atol=0.1)
    emccd = crlb_astigmatic(1000, 10, 0.0, psf, px_size_nm=100, camera="emccd")
    assert emccd["x"] == pytest.approx(7.05, abs=0.02)
    assert emccd["z"] == pytest.approx(32.5, abs=0.1)


def test_ratio_bound_is_0_019_at_1000_photons_and_tends_to_the_binomial_limit_without_background():
    got = crlb_ratio(1000, 0.5, 10, 10, sigma_nm=100, px_size_nm=100)
    assert got["ratio"] == pytest.approx(0.019, abs=0.0005)
    assert got["x"] == pytest.approx(4.55, abs=0.02)
    for r in (0.1, 0.3, 0.5):
        tiny_bg = crlb_ratio(1000, r, 1e-6, 1e-6, 100, 100)["ratio"]
        assert tiny_bg == pytest.approx(np.sqrt(r * (1 - r) / 1000), rel=0.01)


def test_vectorized_bounds_equal_one_at_a_time_bounds():
    rng = np.random.default_rng(0)
    n, b, x = rng.uniform(200, 5000, 6), rng.uniform(1, 50, 6), rng.uniform(0, 1000, 6)
    many = crlb_gaussian_2d(n, b, 120, 100, x_nm=x)["x"]
    one = [float(crlb_gaussian_2d(n[i], b[i], 120, 100, x_nm=x[i])["x"]) for i in range(6)]
    np.testing.assert_allclose(many, one, rtol=1e-12)


def test_table_bounds_use_each_rows_photons_and_background():
    import pandas as pd

    df = pd.DataFrame({"frame": [0, 0], "x": [50.0, 350.0], "y": [50.0, 50.0], "z": [0.0, 0.0],
                       "photons": [1000.0, -5.0], "bg": [10.0, 10.0]})
    got = crlb_for_table(df, GaussianPSF(100), 100)
    assert got["x"][0] == pytest.approx(4.09, abs=0.01)
    assert np.isnan(got["x"][1])  # no photons, no bound


def test_impossible_inputs_raise_a_user_error():
    with pytest.raises(DecodeAccelError, match="photons"):
        crlb_gaussian_2d(0, 10, 100)
    with pytest.raises(DecodeAccelError, match="camera"):
        crlb_gaussian_2d(1000, 10, 100, camera="film")
    with pytest.raises(DecodeAccelError, match="ratio"):
        crlb_ratio(1000, 1.0, 10, 10, 100)


def test_table_bounds_take_a_per_frame_background_when_the_truth_has_none():
    import pandas as pd

    df = pd.DataFrame({"frame": [0, 1], "x": [50.0, 50.0], "y": [50.0, 50.0], "photons": [1000.0, 1000.0]})
    got = crlb_for_table(df, GaussianPSF(100), 100, default_bg=[10.0, 200.0])
    assert got["x"][0] == pytest.approx(4.09, abs=0.01)
    assert got["x"][1] == pytest.approx(crlb_gaussian_2d(1000, 200, 100)["x"])
    with pytest.raises(DecodeAccelError, match="per-frame"):
        crlb_for_table(df, GaussianPSF(100), 100, default_bg=[10.0])
    with pytest.raises(DecodeAccelError, match="bg"):
        crlb_for_table(df, GaussianPSF(100), 100)


def test_without_background_the_closed_form_is_the_photon_limited_sigma_a_over_sqrt_n():
    sigma_a = np.sqrt(100.0**2 + 100.0**2 / 12)
    assert mortensen_mle_sigma(1000, 0.0, 100, 100) == pytest.approx(sigma_a / np.sqrt(1000))
    assert mortensen_mle_sigma(1000, 1e-4, 100, 100) == pytest.approx(sigma_a / np.sqrt(1000), rel=1e-3)


def test_the_benchmarks_bound_follows_a_per_axis_astigmatic_psf_as_the_simulator_renders_it():
    """Per-axis parameters (ThunderSTORM's form) must reach the bound: an evaluation that kept the
    shorthand would put the focal planes at -/+gamma and mirror or stretch z."""
    import torch

    from decode_accel.pipeline import crlb_psf
    from decode_accel.simulation.config import SimulationConfig
    from decode_accel.simulation.psf import make_psf

    sim = SimulationConfig(frame={"height": 16, "width": 16, "px_size": 110.0},
                           psf={"kind": "astigmatic", "sigma0": 1.2, "gamma": 250.0, "depth": 400.0,
                                "focal_x": 120.0, "focal_y": -310.0, "depth_x": 350.0, "depth_y": 520.0,
                                "sigma0_y": 1.4, "A_y": 0.1})
    z = np.linspace(-600.0, 600.0, 25)
    sx_px, sy_px = make_psf(sim.psf).sigma_xy(torch.as_tensor(z, dtype=torch.float64))
    sx, sy, _, _ = crlb_psf(sim).sigmas_nm(z)
    np.testing.assert_allclose(sx, sx_px.numpy() * 110.0, rtol=1e-9)
    np.testing.assert_allclose(sy, sy_px.numpy() * 110.0, rtol=1e-9)
    assert z[np.argmin(sx)] == pytest.approx(100.0, abs=50) and z[np.argmin(sy)] == pytest.approx(-300.0, abs=50)
    # the shorthand: the simulator puts x in focus at z = -gamma
    plain = SimulationConfig(psf={"kind": "astigmatic", "sigma0": 1.0, "gamma": 250.0, "depth": 400.0})
    sx, sy, _, _ = crlb_psf(plain).sigmas_nm(z)
    assert z[np.argmin(sx)] == pytest.approx(-250.0, abs=50) and z[np.argmin(sy)] == pytest.approx(250.0, abs=50)
