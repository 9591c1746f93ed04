"""decode-accel calibrate: camera, PSF, photons, background and density from a movie; the astigmatic bead fit."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from decode_accel.calibration import calibrate
from decode_accel.calibration.astigmatism import (fit_bead_stack, from_decode, from_row_column, from_thunderstorm,
                                                  to_thunderstorm)
from decode_accel.calibration.camera_estimate import mean_variance
from decode_accel.calibration.spots import find_and_fit
from decode_accel.cli import main as cli_main
from decode_accel.errors import DecodeAccelError
from decode_accel.simulation import AstigmaticPSF, SimulationConfig, Simulator
from decode_accel.training.config import load_config

TRUE = dict(sigma=1.3, e_per_adu=0.5, baseline=100.0, px=120.0)


def _movie(tmp_path, camera=None, T=12, H=96, W=96, seed=0):
    cam = camera or {"kind": "scmos", "qe": 1.0, "e_per_adu": TRUE["e_per_adu"], "baseline": TRUE["baseline"],
                     "read_noise": 1.0}
    cfg = SimulationConfig(frame={"height": H, "width": W, "px_size": TRUE["px"]},
                           emitters={"emitters_per_frame": 25, "photons_mean": 1500, "photons_sd": 400,
                                     "z_range": (0, 0), "on_time_mean": 3.0},
                           psf={"kind": "gaussian", "sigma": TRUE["sigma"]},
                           background={"uniform": (15.0, 15.0), "smooth_amplitude": 0.5}, camera=cam)
    m = Simulator(cfg).sample(T, torch.Generator().manual_seed(seed))
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, m.frames_adu[:, 0].numpy().astype(np.uint16))
    return path, m


@pytest.fixture(scope="module")
def sim_movie(tmp_path_factory):
    return _movie(tmp_path_factory.mktemp("cal"))


def test_mean_variance_recovers_gain_and_offset_known_read_noise(sim_movie):
    path, m = sim_movie
    adu = m.frames_adu[:, 0].double().numpy()
    fit = mean_variance(adu, n_boot=60)
    # slope = 1 / (e-/ADU); its bootstrap sd is honest to a few sd
    assert abs(1.0 / fit.slope - TRUE["e_per_adu"]) < max(5 * fit.slope_sd / fit.slope ** 2, 0.03)
    # offset from the intercept, read variance assumed 0: biased low by (read var)/slope + the floor's 0.5 ADU
    read_var_adu2 = (1.0 / TRUE["e_per_adu"]) ** 2
    expected = TRUE["baseline"] - 0.5 - read_var_adu2 / fit.slope
    assert abs(fit.offset - expected) < 4 * fit.offset_sd + 0.5
    assert any("read noise assumed 0" in n for n in fit.notes)


def test_spot_fits_recover_sigma(sim_movie):
    _, m = sim_movie
    e = (m.frames_photons[:, 0]).double().numpy()
    f = find_and_fit(e, sigma=1.0, threshold=5.0, read_var=np.full(e.shape[1:], 1.0), mode="sigma")
    ok = f.converged & (f.loglik_ratio < 3)
    assert ok.sum() > 30
    bright = ok & (f.photons > np.median(f.photons[ok]))
    assert np.median(f.sigma_x[bright]) == pytest.approx(TRUE["sigma"], rel=0.05)
    # CRLB of x is about sigma / sqrt(N) for bright spots
    assert np.median(f.crlb[bright, 0]) < 0.1


def test_calibrate_with_no_camera_option_writes_a_config_that_trains(sim_movie, tmp_path):
    path, m = sim_movie
    out = tmp_path / "sim.yaml"
    code = cli_main(["calibrate", "--input", str(path), "--out", str(out), "--px-size", str(TRUE["px"]),
                     "--frame-size", "32"])
    assert code == 0 and out.exists() and out.with_suffix(".png").exists()
    cfg = load_config(out)  # usable with --config by every recipe
    sim = cfg.simulation
    assert sim.camera.kind == "scmos"
    assert sim.camera.e_per_adu == pytest.approx(TRUE["e_per_adu"], rel=0.1)
    assert sim.psf.sigma == pytest.approx(TRUE["sigma"], rel=0.08)
    assert sim.frame.px_size == TRUE["px"] and sim.frame.height == 32
    lo, hi = sim.background.uniform
    assert lo < 15.0 * 1.1 and hi > 15.0 * 0.9
    # matched density: within a factor 1.6 of the truth (25 per 96x96 px frame)
    true_density = 25 / (96 * 96 * (TRUE["px"] / 1000) ** 2)
    assert true_density / 1.6 < sim.emitters.density < true_density * 1.6
    b = Simulator(sim).sample_windows(2, torch.Generator().manual_seed(0))
    assert b["frames"].shape == (2, 1, 3, 32, 32)
    text = out.read_text()
    assert "KS distance, pixel values" in text and "conversion" in text


def test_calibrate_with_full_chip_maps_and_roi(tmp_path):
    H = W = 64
    rng = np.random.default_rng(1)
    chip = dict(offset_adu=(100 + rng.random((128, 160))).astype(np.float32),
                variance_adu2=np.full((128, 160), 3.0, np.float32),
                e_per_adu=(0.45 + 0.1 * rng.random((128, 160))).astype(np.float32))
    np.savez(tmp_path / "chip.npz", **chip)
    r, c = 32, 80
    cam = {"kind": "scmos", "qe": 1.0, "scmos_maps": str(tmp_path / "chip.npz"), "roi_origin": (r, c),
           "scmos_training_crop": "roi"}
    path, m = _movie(tmp_path, camera=cam, H=H, W=W, T=8)
    res = calibrate(path, px_size=TRUE["px"], scmos_maps=str(tmp_path / "chip.npz"), roi_origin=(r, c), frame_size=32,
                    match_density=False)
    assert res.simulation.camera.roi_origin == (r, c)
    assert res.simulation.psf.sigma == pytest.approx(TRUE["sigma"], rel=0.1)
    # the written camera converts the movie with its ROI of the maps
    assert res.simulation.camera.scmos_maps.endswith("chip.npz")
    with pytest.raises(DecodeAccelError, match="roi_origin"):
        calibrate(path, px_size=TRUE["px"], scmos_maps=str(tmp_path / "chip.npz"), frame_size=32)


def test_calibrate_bad_input_is_one_line(tmp_path, capsys, sim_movie):
    path, _ = sim_movie
    code = cli_main(["calibrate", "--input", str(path), "--out", str(tmp_path / "x.yaml")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "--px-size" in err and "\n" not in err
    code = cli_main(["calibrate", "--input", str(tmp_path / "none.tif"), "--out", str(tmp_path / "x.yaml"),
                     "--px-size", "100"])
    assert code == 2
    code = cli_main(["calibrate", "--input", str(path), "--out", str(tmp_path / "x.yaml"), "--px-size", "100",
                     "--psf", "astigmatic"])
    assert code == 2 and "--bead-stack" in capsys.readouterr().err


# ------------------------------------------------------------------------------ astigmatism
KNOWN = dict(sigma0_x=1.15, focal_x=-180.0, depth_x=330.0, sigma0_y=1.35, focal_y=220.0, depth_y=290.0)


def _bead_stack(params, z, photons=20000.0, bg=10.0, size=25, seed=0, xy=(12.3, 12.6)):
    psf = AstigmaticPSF(z_range=(float(z.min()), float(z.max())), roi_size=size, **params)
    out = torch.full((len(z), size, size), bg, dtype=torch.float64)
    xyz = torch.tensor([[xy[0], xy[1], float(zz)] for zz in z], dtype=torch.float64)
    # render centred: ROI origin at 0 for an emitter at the middle
    vals, i0, j0 = psf.roi(xyz)
    from decode_accel.simulation.psf import scatter_rois
    scatter_rois(vals * photons, i0, j0, torch.arange(len(z)), out)
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(out, generator=g).numpy()


def test_bead_stack_fit_recovers_known_per_axis_parameters():
    z = np.arange(-600, 601, 25.0)
    stack = _bead_stack(KNOWN, z)
    cal = fit_bead_stack(stack, z_step=25.0, sigma_init=1.3)
    for k, v in KNOWN.items():
        got, sd = cal.psf_fields()[k], cal.sd[k]
        assert sd > 0 and abs(got - v) < 3.5 * sd + (0.01 if k.startswith("sigma") else 2.0), (k, got, v, sd)
    assert cal.sd["focal_x"] < 20 and cal.sd["depth_y"] < 30


def test_decode_and_thunderstorm_imports_give_the_same_z_for_a_known_bead(tmp_path):
    # one physical PSF: columns (x) in focus at z = +250 nm, rows (y) at -250 nm
    ts_yaml = tmp_path / "cal.yaml"
    ts_yaml.write_text("!!cz.cuni.lf1.lge.ThunderSTORM.calibration.DaostormCalibration\n"
                       "angle: 0.0\nname: Daostorm\nw01: 1.2\na1: 0.0\nb1: 0.0\nc1: 250.0\nd1: 300.0\n"
                       "w02: 1.2\na2: 0.0\nb2: 0.0\nc2: -250.0\nd2: 300.0\n")
    ts = from_thunderstorm(ts_yaml)
    # the same PSF as DECODE describes it (its x = rows): foc_shift 250 puts rows in focus at -250
    dc = from_decode(sigma_0=1.2, foc_shift=250.0, rl_range=300.0)
    assert ts.psf_fields() == pytest.approx(dc.psf_fields())
    assert to_thunderstorm(dc)["c1"] == 250.0
    z_true = 140.0
    stack = _bead_stack(ts.psf_fields(), np.array([z_true] * 5), photons=30000.0, seed=3)
    from decode_accel.calibration.spots import fit_spots
    res = fit_spots(stack[:, 5:20, 5:20], mode="sigma_xy", sigma_init=1.3)
    sx, sy = np.median(res["theta"][:, 4]), np.median(res["theta"][:, 5])
    assert sx < sy  # closer to the column focus (+250): narrower along x
    z_ts, z_dc = ts.z_from_widths(sx, sy), dc.z_from_widths(sx, sy)
    assert z_ts == pytest.approx(z_dc, abs=1.0)
    assert z_ts == pytest.approx(z_true, abs=30.0)
    # reading DECODE's foc_shift as decode_accel's gamma shorthand would mirror z
    mirrored = from_row_column(row=dict(sigma0=1.2, focal=250.0, depth=300.0),
                               column=dict(sigma0=1.2, focal=-250.0, depth=300.0))
    assert mirrored.z_from_widths(sx, sy) == pytest.approx(-z_true, abs=30.0)


def test_thunderstorm_import_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("w01: 1.0\nc1: 0\n")
    with pytest.raises(DecodeAccelError, match="missing"):
        from_thunderstorm(bad)
    rot = tmp_path / "rot.yaml"
    rot.write_text("angle: 10\nw01: 1\nc1: 0\nd1: 300\nw02: 1\nc2: 0\nd2: 300\n")
    with pytest.raises(DecodeAccelError, match="angle"):
        from_thunderstorm(rot)


def test_astigmatic_psf_config_per_axis_and_shorthand_agree():
    from decode_accel.simulation import PSFConfig, make_psf
    a = make_psf(PSFConfig(kind="astigmatic", sigma0=1.1, gamma=200.0, depth=300.0))
    b = make_psf(PSFConfig(kind="astigmatic", sigma0_x=1.1, sigma0_y=1.1, focal_x=-200.0, focal_y=200.0,
                           depth_x=300.0, depth_y=300.0))
    z = torch.linspace(-500, 500, 11)
    for u, v in zip(a.sigma_xy(z), b.sigma_xy(z)):
        assert torch.allclose(u, v)
    sx, sy = b.sigma_xy(torch.tensor([-200.0, 200.0]))
    assert sx[0] == pytest.approx(1.1) and sy[1] == pytest.approx(1.1)  # x narrowest at focal_x
    with pytest.raises(Exception, match="gamma or focal"):
        PSFConfig(kind="astigmatic", gamma=100.0, focal_x=50.0)


def test_roi_origin_read_from_micromanager_metadata(tmp_path):
    import json

    from decode_accel.calibration.calibrate import roi_origin_from_metadata
    H = W = 64
    rng = np.random.default_rng(2)
    chip = dict(offset_adu=(100 + rng.random((128, 160))).astype(np.float32),
                variance_adu2=np.full((128, 160), 3.0, np.float32),
                e_per_adu=np.full((128, 160), 0.5, np.float32))
    np.savez(tmp_path / "chip.npz", **chip)
    r, c = 40, 72
    cam = {"kind": "scmos", "qe": 1.0, "scmos_maps": str(tmp_path / "chip.npz"), "roi_origin": (r, c),
           "scmos_training_crop": "roi"}
    _, m = _movie(tmp_path, camera=cam, H=H, W=W, T=6)
    path = tmp_path / "mm.tif"
    meta = json.dumps({"ROI": f"{c}-{r}-{W}-{H}"})
    tifffile.imwrite(path, m.frames_adu[:, 0].numpy().astype(np.uint16), extratags=[(51123, "s", 0, meta, True)])
    assert roi_origin_from_metadata(path) == (r, c)
    res = calibrate(path, px_size=TRUE["px"], scmos_maps=str(tmp_path / "chip.npz"), frame_size=32, match_density=False)
    assert res.simulation.camera.roi_origin == (r, c)
    assert any(e.source == "file metadata" for e in res.estimates)


def test_calibrate_astigmatic_from_a_bead_stack(tmp_path):
    z = np.arange(-600, 601, 50.0)
    stack = _bead_stack(KNOWN, z, photons=20000.0, bg=10.0, size=25)
    tifffile.imwrite(tmp_path / "beads.tif", stack.astype(np.uint16))
    cfg = SimulationConfig(frame={"height": 64, "width": 64, "px_size": 110.0},
                           emitters={"emitters_per_frame": 8, "photons_mean": 3000, "photons_sd": 500,
                                     "z_range": (-400, 400)},
                           psf={"kind": "astigmatic", **KNOWN}, background={"uniform": (10.0, 10.0)},
                           camera={"kind": "perfect"})
    m = Simulator(cfg).sample(6, torch.Generator().manual_seed(0))
    tifffile.imwrite(tmp_path / "movie.tif", m.frames_adu[:, 0].numpy().astype(np.uint16))
    out = tmp_path / "astig.yaml"
    assert cli_main(["calibrate", "--input", str(tmp_path / "movie.tif"), "--out", str(out), "--px-size", "110",
                     "--camera", "perfect", "--psf", "astigmatic", "--bead-stack", str(tmp_path / "beads.tif"),
                     "--z-step", "50", "--no-match-density"]) == 0
    psf = load_config(out).simulation.psf
    assert psf.kind == "astigmatic"
    assert psf.focal_x == pytest.approx(KNOWN["focal_x"], abs=25) and psf.focal_y == pytest.approx(KNOWN["focal_y"], abs=25)
    assert psf.depth_x == pytest.approx(KNOWN["depth_x"], rel=0.1)
    assert "PSF focal_x" in out.read_text()


def test_per_axis_psf_config_round_trips():
    from decode_accel.simulation import PSFConfig
    cfg = SimulationConfig(psf=PSFConfig(kind="astigmatic", **KNOWN))
    again = SimulationConfig.model_validate(cfg.model_dump())
    assert again.psf.astigmatic_axes() == cfg.psf.astigmatic_axes()


def test_maps_without_variance_get_the_read_noise_from_the_movie(tmp_path):
    rng = np.random.default_rng(4)
    H = W = 64
    np.savez(tmp_path / "partial.npz", offset_adu=(100 + rng.random((H, W))).astype(np.float32),
             e_per_adu=np.full((H, W), 0.5, np.float32))
    cam = {"kind": "scmos", "qe": 1.0, "scmos_maps": str(tmp_path / "partial.npz"), "read_noise": 2.0}
    path, _ = _movie(tmp_path, camera=cam, H=H, W=W, T=12)
    res = calibrate(path, px_size=TRUE["px"], scmos_maps=str(tmp_path / "partial.npz"), frame_size=32,
                    match_density=False)
    # not the EMCCD default of 74 e-: estimated from the movie (2 e- simulated; floor and blinks add a little)
    assert 0.5 < res.simulation.camera.read_noise < 4.0
    assert any(e.name == "read noise" and e.source == "estimated" for e in res.estimates)
