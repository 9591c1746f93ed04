"""PSF models checked against closed forms computed here with numpy/scipy (not with the package)."""

import math

import numpy as np
import pytest
import scipy.io
import torch
from scipy.special import erf

from decode_accel.errors import DecodeAccelError
from decode_accel.simulation import (AstigmaticPSF, GaussianPSF, SplinePSF, load_smap_calibration, save_smap_calibration,
                                     spline_coefficients)


def render_one(psf, x, y, z=0.0, photons=1000.0, size=24):
    out = torch.zeros(1, size, size, dtype=torch.float64)
    psf.render(torch.tensor([[x, y, z]], dtype=torch.float64), torch.tensor([photons], dtype=torch.float64),
               torch.tensor([0]), out)
    return out[0].numpy()


def centroid_and_variance(img):
    """Moments with pixel centres at j + 0.5 (x) and i + 0.5 (y)."""
    H, W = img.shape
    yy, xx = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    s = img.sum()
    cx, cy = (img * xx).sum() / s, (img * yy).sum() / s
    return cx, cy, (img * (xx - cx) ** 2).sum() / s, (img * (yy - cy) ** 2).sum() / s


def pixel_integrated_gaussian(dx, dy, sx, sy):
    """Fraction of a unit Gaussian in the pixel whose centre is (dx, dy) px from the emitter."""
    fx = 0.5 * (erf((dx + 0.5) / (math.sqrt(2) * sx)) - erf((dx - 0.5) / (math.sqrt(2) * sx)))
    fy = 0.5 * (erf((dy + 0.5) / (math.sqrt(2) * sy)) - erf((dy - 0.5) / (math.sqrt(2) * sy)))
    return fx * fy


def huang_width(z, sigma0, c, d, A=0.0, B=0.0):
    u = (z - c) / d
    return sigma0 * math.sqrt(1 + u ** 2 + A * u ** 3 + B * u ** 4)


def test_frame_sum_equals_photons_of_an_isolated_emitter():
    img = render_one(GaussianPSF(sigma=1.3), 11.37, 12.81, photons=2345.0)
    assert img.sum() == pytest.approx(2345.0, rel=1e-4)


def test_gaussian_centroid_is_the_emitter_position_with_pixel_centres_at_j_plus_half():
    for x, y in [(10.0, 10.0), (7.3, 12.8), (12.5, 9.99)]:
        img = render_one(GaussianPSF(sigma=1.0), x, y)
        cx, cy, _, _ = centroid_and_variance(img)
        assert abs(cx - x) < 0.01 and abs(cy - y) < 0.01


def test_brightest_pixel_of_an_emitter_at_a_pixel_centre_is_that_pixel():
    # x = j + 0.5 is the centre of column j: an emitter at (7.5, 3.5) peaks at row 3, column 7
    img = render_one(GaussianPSF(sigma=1.0), 7.5, 3.5, size=16)
    assert np.unravel_index(img.argmax(), img.shape) == (3, 7)
    assert img[3, 6] == pytest.approx(img[3, 8], rel=1e-9)


def test_gaussian_pixel_values_match_erf_differences():
    psf = GaussianPSF(sigma=1.2)
    img = render_one(psf, 9.2, 10.7, photons=1.0)
    H, W = img.shape
    yy, xx = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    expected = pixel_integrated_gaussian(xx - 9.2, yy - 10.7, 1.2, 1.2)
    roi = expected > 1e-4  # inside the rendered ROI (4 sigma); beyond it the PSF is truncated
    np.testing.assert_allclose(img[roi], expected[roi], rtol=1e-6, atol=1e-9)


def test_emitter_cut_by_the_border_keeps_only_the_photons_inside():
    img = render_one(GaussianPSF(sigma=1.0), 0.0, 10.0, photons=1000.0)
    assert img.sum() == pytest.approx(500.0, rel=1e-3)  # half of the Gaussian lies left of x = 0


@pytest.mark.parametrize("z", [-250.0, 0.0, 250.0, 400.0])
def test_astigmatic_second_moments_follow_the_huang_model(z):
    sigma0, gamma, d, A, B = 1.1, 250.0, 280.0, 0.1, 0.05
    psf = AstigmaticPSF(sigma0, gamma, d, A, B, roi_size=41, z_range=(-500, 500))
    img = render_one(psf, 20.3, 20.6, z=z, size=41)
    _, _, vx, vy = centroid_and_variance(img)
    # pixel integration adds the variance of a uniform on one pixel, 1/12 px²
    assert math.sqrt(vx - 1 / 12) == pytest.approx(huang_width(z, sigma0, -gamma, d, A, B), rel=5e-3)
    assert math.sqrt(vy - 1 / 12) == pytest.approx(huang_width(z, sigma0, +gamma, d, A, B), rel=5e-3)


def test_astigmatic_x_is_in_focus_at_minus_gamma():
    sx, sy = AstigmaticPSF(1.0, 300.0, 400.0).sigma_xy(torch.tensor([-300.0, 300.0]))
    assert sx[0].item() == pytest.approx(1.0) and sy[1].item() == pytest.approx(1.0)
    assert sy[0].item() > 1.5 and sx[1].item() > 1.5


def gaussian_stack(n_lat, ref, z_planes, sigma_of_z):
    """Pixel values of a unit astigmatic Gaussian at integer offsets: stack[row, col, plane]."""
    off = np.arange(n_lat) - ref  # pixel centre minus emitter, px
    stack = np.zeros((n_lat, n_lat, len(z_planes)))
    for k, z in enumerate(z_planes):
        sx, sy = sigma_of_z(z)
        stack[:, :, k] = pixel_integrated_gaussian(off[None, :], off[:, None], sx, sy)
    return stack


def test_spline_fitted_to_a_gaussian_reproduces_it(tmp_path):
    # astigmatic Gaussian sampled on 1 px x 50 nm; fit, save as SMAP, load, render off-grid positions
    n_lat, ref, dz, z0 = 21, 10, 50.0, 10
    z_planes = (np.arange(21) - z0) * dz
    sig = lambda z: (huang_width(z, 1.3, -200, 400), huang_width(z, 1.3, 200, 400))  # noqa: E731
    coeff = spline_coefficients(gaussian_stack(n_lat, ref, z_planes, sig))
    path = tmp_path / "gauss_3dcal.mat"
    save_smap_calibration(path, coeff, x0=ref + 1, z0=z0, dz=dz)
    psf = SplinePSF.from_smap(path, roi_size=15)
    size = 24
    for x, y, z in [(11.3, 12.7, 0.0), (10.85, 11.15, -137.0), (12.5, 12.5, 222.0)]:
        img = render_one(psf, x, y, z=z, photons=1.0, size=size)
        yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
        expected = pixel_integrated_gaussian(xx - x, yy - y, *sig(z))
        assert np.abs(img - expected).max() < 0.01 * expected.max()
        cx, cy, _, _ = centroid_and_variance(img)
        assert abs(cx - x) < 0.02 and abs(cy - y) < 0.02


def test_spline_reproduces_its_samples_exactly_at_grid_points():
    rng = np.random.default_rng(0)
    stack = rng.random((6, 7, 5))
    coeff = spline_coefficients(stack)
    # at a cell corner all fractional offsets are 0, so the value is the constant coefficient
    np.testing.assert_allclose(coeff[:, :, :, 0], stack[:-1, :-1, :-1], rtol=1e-5)
    # at the far corner of the last cell the polynomial reaches the last sample: sum of all coefficients
    np.testing.assert_allclose(coeff[-1, -1, -1].sum(), stack[-1, -1, -1], rtol=1e-4)


def test_a_smap_layout_mat_written_by_hand_loads(tmp_path):
    coeff = np.arange(3 * 4 * 5 * 64, dtype=np.float32).reshape(3, 4, 5, 64)
    path = tmp_path / "bead_3dcal.mat"
    # SMAP stores the coefficients in a cell array inside a struct array SXY
    cell = np.empty((1,), dtype=object)
    cell[0] = coeff
    scipy.io.savemat(path, {"SXY": {"cspline": {"coeff": cell, "x0": 2.0, "z0": 3.0, "dz": 10.0},
                                    "Xrangeall": np.array([0, 1])}})
    cal = load_smap_calibration(path)
    np.testing.assert_array_equal(cal["coeff"], coeff)
    assert (cal["x0"], cal["z0"], cal["dz"]) == (2.0, 3.0, 10.0)
    psf = SplinePSF.from_smap(path)
    assert psf.z_range == (-30.0, 20.0)


def test_a_file_that_is_not_a_calibration_is_rejected_naming_the_field(tmp_path):
    path = tmp_path / "wrong.mat"
    scipy.io.savemat(path, {"something": np.zeros(3)})
    with pytest.raises(DecodeAccelError, match="SXY"):
        load_smap_calibration(path)
    with pytest.raises(DecodeAccelError, match="not found"):
        load_smap_calibration(tmp_path / "missing.mat")


@pytest.mark.parametrize("psf", [GaussianPSF(1.2), AstigmaticPSF(1.0, 250, 300, roi_size=13)])
def test_psf_derivatives_match_finite_differences(psf):
    xyz = torch.tensor([[5.3, 6.8, 120.0], [7.9, 4.2, -310.0]], dtype=torch.float64)
    val, dx, dy, dz = psf.derivatives(xyz)
    for k, d, h in ((0, dx, 1e-5), (1, dy, 1e-5), (2, dz, 1e-3)):
        step = torch.zeros_like(xyz)
        step[:, k] = h
        i0, j0 = psf.roi_origin(xyz)
        fd = (psf._values(xyz + step, i0, j0) - psf._values(xyz - step, i0, j0)) / (2 * h)
        torch.testing.assert_close(d, fd, rtol=1e-4, atol=1e-7)
