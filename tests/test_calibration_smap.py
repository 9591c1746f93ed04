"""SMAP ``*_3dcal.mat`` import (Gaussian astigmatism, ``gauss_zfit``): MATLAB v5 and v7.3 files built
here from the documented layout, and the same z for a known bead in SMAP's, ThunderSTORM's and
decode_accel's conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decode_accel.calibration.astigmatism import (fit_bead_stack, from_smap, from_smap_zfit, from_thunderstorm,
                                                  load_psf_calibration, to_smap_zfit, to_thunderstorm)
from decode_accel.errors import DecodeAccelError
from decode_accel.simulation.psf import AstigmaticPSF, scatter_rois

# One physical PSF, described per image axis: columns (x) narrowest at z = -200 nm, rows (y) at +200 nm.
ROWS = dict(sigma0=1.30, focal=200.0, depth=320.0, A=0.05, B=0.02)
COLS = dict(sigma0=1.15, focal=-200.0, depth=320.0, A=-0.04, B=0.03)
# SMAP's gauss_zfit of that PSF, written from SMAP's own description (x = rows, sx narrowest at +gamma,
# gamma and d in µm): [sigmax0, Ax, Ay, Bx, By, gamma, d, sigmay0]
ZFIT = np.array([ROWS["sigma0"], ROWS["A"], COLS["A"], ROWS["B"], COLS["B"], 0.200, 0.320, COLS["sigma0"]],
                dtype=np.float32)
PARAMS = dict(sigma0_x=COLS["sigma0"], focal_x=COLS["focal"], depth_x=COLS["depth"], A_x=COLS["A"], B_x=COLS["B"],
              sigma0_y=ROWS["sigma0"], focal_y=ROWS["focal"], depth_y=ROWS["depth"], A_y=ROWS["A"], B_y=ROWS["B"])


def _save_v5(path, zfit, smap_layout=True, n_entries=1):
    from scipy.io import savemat

    cspline = {"coeff": np.zeros((2, 2, 2, 64), np.float32), "x0": 1.0, "z0": 1.0, "dz": 10.0}
    if not smap_layout:  # the stand-alone calibrate3D: top-level variables
        savemat(path, {"gauss_zfit": zfit, "gauss_sx2_sy2": np.zeros(0), "cspline": cspline})
        return
    entry = {"gauss_zfit": zfit, "gauss_sx2_sy2": np.zeros(0), "cspline": cspline, "Xrange": np.array([0, 256.0]),
             "EMon": 0.0}
    if n_entries == 1:
        savemat(path, {"SXY": entry})
    else:
        arr = np.empty((1, n_entries), dtype=object)
        for k in range(n_entries):
            arr[0, k] = dict(entry, gauss_zfit=zfit * (1 + 0.1 * k))
        savemat(path, {"SXY": arr})


def _save_v73(path, zfit, n_entries=1):
    """What MATLAB's ``save -v7.3`` writes: HDF5 behind a 512-byte header block, arrays transposed,
    a 1x1 struct as a group of fields, a struct array's fields as arrays of object references."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        g = f.create_group("SXY")
        g.attrs["MATLAB_class"] = np.bytes_("struct")
        if n_entries == 1:
            d = g.create_dataset("gauss_zfit", data=np.asarray(zfit, np.float32).reshape(1, -1).T)
            d.attrs["MATLAB_class"] = np.bytes_("single")
        else:
            refs = f.create_group("#refs#")
            rr = []
            for k in range(n_entries):
                d = refs.create_dataset(f"z{k}", data=(np.asarray(zfit, np.float32) * (1 + 0.1 * k)).reshape(1, -1).T)
                d.attrs["MATLAB_class"] = np.bytes_("single")
                rr.append(d.ref)
            g.create_dataset("gauss_zfit", data=np.array(rr, dtype=h5py.ref_dtype).reshape(n_entries, 1))
        e = g.create_dataset("gauss_sx2_sy2", data=np.zeros(2, np.uint64))
        e.attrs["MATLAB_class"] = np.bytes_("double")
        e.attrs["MATLAB_empty"] = np.uint8(1)
    with open(path, "r+b") as fh:  # MATLAB's text header in the user block
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Tue Dec  1 12:00:00 2026 HDF5 schema 1.00 .")


def _bead(params, z, photons=30000.0, bg=10.0, size=25, seed=0, xy=(12.4, 12.7)):
    psf = AstigmaticPSF(z_range=(float(np.min(z)), float(np.max(z))), roi_size=size, **params)
    out = torch.full((len(z), size, size), bg, dtype=torch.float64)
    xyz = torch.tensor([[xy[0], xy[1], float(zz)] for zz in z], dtype=torch.float64)
    vals, i0, j0 = psf.roi(xyz)
    scatter_rois(vals * photons, i0, j0, torch.arange(len(z)), out)
    return torch.poisson(out, generator=torch.Generator().manual_seed(seed)).numpy()


def _smap_own_z(sx_smap, sy_smap, zfit, zgrid):
    """z as SMAP's convention defines it, written independently: sx = width along SMAP's x (rows)."""
    s0x, ax, ay, bx, by, gamma, d, s0y = (float(v) for v in zfit)
    zu = zgrid / 1000.0
    ux, uy = (zu - gamma) / d, (zu + gamma) / d
    mx = s0x * np.sqrt(1 + ux ** 2 + ax * ux ** 3 + bx * ux ** 4)
    my = s0y * np.sqrt(1 + uy ** 2 + ay * uy ** 3 + by * uy ** 4)
    cost = (np.sqrt(sx_smap) - np.sqrt(mx)) ** 2 + (np.sqrt(sy_smap) - np.sqrt(my)) ** 2
    return float(zgrid[np.argmin(cost)])


@pytest.mark.parametrize("fmt", ["v5_smap", "v5_toplevel", "v73"])
def test_smap_file_imports_to_the_per_axis_parameters(tmp_path, fmt):
    path = tmp_path / "beads_3dcal.mat"
    if fmt == "v73":
        _save_v73(path, ZFIT)
    else:
        _save_v5(path, ZFIT, smap_layout=fmt == "v5_smap")
    cal = from_smap(path)
    assert cal.psf_fields() == pytest.approx(PARAMS, rel=1e-6, abs=1e-5)
    assert load_psf_calibration(path).psf_fields() == pytest.approx(cal.psf_fields())
    # and back: the vector SMAP would write for it
    assert to_smap_zfit(cal) == pytest.approx(ZFIT, rel=1e-6)


def test_known_bead_gives_the_same_z_in_smap_thunderstorm_and_decode_accel_conventions(tmp_path):
    mat = tmp_path / "cal_3dcal.mat"
    _save_v5(mat, ZFIT)
    ts_yaml = tmp_path / "cal.yaml"  # ThunderSTORM: 1 = x = columns, z in nm
    ts_yaml.write_text("!!cz.cuni.lf1.lge.ThunderSTORM.calibration.DaostormCalibration\nangle: 0.0\n"
                       f"w01: {COLS['sigma0']}\na1: {COLS['A']}\nb1: {COLS['B']}\nc1: {COLS['focal']}\nd1: {COLS['depth']}\n"
                       f"w02: {ROWS['sigma0']}\na2: {ROWS['A']}\nb2: {ROWS['B']}\nc2: {ROWS['focal']}\nd2: {ROWS['depth']}\n")
    smap, ts = from_smap(mat), from_thunderstorm(ts_yaml)
    assert smap.psf_fields() == pytest.approx(ts.psf_fields(), rel=1e-6, abs=1e-5)
    assert to_thunderstorm(smap)["c1"] == pytest.approx(-200.0)
    from decode_accel.calibration.spots import fit_spots

    zgrid = np.linspace(-600, 600, 4801)
    for k, z_true in enumerate((-260.0, -90.0, 0.0, 150.0, 310.0)):
        stack = _bead(PARAMS, np.full(4, z_true), seed=k)
        res = fit_spots(stack[:, 5:20, 5:20], mode="sigma_xy", sigma_init=1.3)
        sx, sy = np.median(res["theta"][:, 4]), np.median(res["theta"][:, 5])  # along columns, along rows
        z_ours, z_ts = smap.z_from_widths(sx, sy, zgrid), ts.z_from_widths(sx, sy, zgrid)
        z_smap = _smap_own_z(sx_smap=sy, sy_smap=sx, zfit=ZFIT, zgrid=zgrid)  # SMAP's x is the row
        assert z_ours == pytest.approx(z_smap, abs=0.5) and z_ours == pytest.approx(z_ts, abs=0.5), (z_true, z_ours)
        assert z_ours == pytest.approx(z_true, abs=35.0), (z_true, z_ours)
        if abs(z_true) > 100:  # reading SMAP's sx as the column width would put z on the wrong side
            mirrored = _smap_own_z(sx_smap=sx, sy_smap=sy, zfit=ZFIT, zgrid=zgrid)
            assert abs(mirrored - z_true) > 150 and np.sign(mirrored) != np.sign(z_true), (z_true, mirrored)


def test_bead_stack_fit_round_trips_through_a_smap_file(tmp_path):
    known = dict(sigma0_x=1.2, focal_x=-230.0, depth_x=300.0, sigma0_y=1.25, focal_y=230.0, depth_y=300.0)
    z = np.arange(-600, 601, 30.0)
    cal = fit_bead_stack(_bead(known, z, photons=20000.0), z_step=30.0, sigma_init=1.3)
    for k, v in known.items():
        assert abs(cal.psf_fields()[k] - v) < 3.5 * cal.sd[k] + (0.01 if k.startswith("sigma") else 2.0), k
    # SMAP's model has one gamma and one depth: symmetrise the fit, write it as SMAP does, read it back
    from decode_accel.calibration.astigmatism import from_row_column
    g, d = (cal.focal_y - cal.focal_x) / 2, (cal.depth_x + cal.depth_y) / 2
    sym = from_row_column(row=dict(sigma0=cal.sigma0_y, focal=g, depth=d), column=dict(sigma0=cal.sigma0_x, focal=-g, depth=d))
    path = tmp_path / "fit_3dcal.mat"
    _save_v73(path, to_smap_zfit(sym))
    back = from_smap(path)
    assert back.psf_fields() == pytest.approx(sym.psf_fields(), rel=1e-5, abs=1e-3)
    assert back.z_from_widths(1.3, 1.6) == pytest.approx(sym.z_from_widths(1.3, 1.6), abs=0.5)


def test_smap_entries_and_errors(tmp_path):
    for fmt in ("v5", "v73"):
        path = tmp_path / f"two_{fmt}_3dcal.mat"
        (_save_v73(path, ZFIT, n_entries=2) if fmt == "v73" else _save_v5(path, ZFIT, n_entries=2))
        assert from_smap(path, index=1).sigma0_x == pytest.approx(1.1 * COLS["sigma0"], rel=1e-5)
        assert from_smap(path).sigma0_x == pytest.approx(COLS["sigma0"], rel=1e-5)
        with pytest.raises(DecodeAccelError, match="2 SXY entries"):
            from_smap(path, index=2)
    from scipy.io import savemat

    spline_only = tmp_path / "spline_3dcal.mat"
    savemat(spline_only, {"SXY": {"gauss_zfit": np.zeros(0), "cspline": {"dz": 10.0}}})
    with pytest.raises(DecodeAccelError, match="no Gaussian astigmatism.*spline_path"):
        from_smap(spline_only)
    short = tmp_path / "short_3dcal.mat"
    _save_v5(short, ZFIT[:6])
    with pytest.raises(DecodeAccelError, match="6 values"):
        from_smap(short)
    junk = tmp_path / "junk_3dcal.mat"
    junk.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DecodeAccelError, match="cannot read the MATLAB file"):
        from_smap(junk)
    with pytest.raises(DecodeAccelError, match="not found"):
        from_smap(tmp_path / "missing.mat")
    with pytest.raises(DecodeAccelError, match="unknown calibration format"):
        load_psf_calibration(tmp_path / "cal.json")
    with pytest.raises(DecodeAccelError, match="focal_y = -focal_x"):
        to_smap_zfit(from_thunderstorm({"w01": 1, "c1": -100, "d1": 300, "w02": 1, "c2": 250, "d2": 300}))
    with pytest.raises(DecodeAccelError, match="impossible"):
        from_smap_zfit([0, 0, 0, 0, 0, 0.2, 0.3, 1.0])


def test_calibrate_takes_a_smap_calibration_instead_of_a_bead_stack(tmp_path):
    import tifffile

    from decode_accel.cli import main as cli_main
    from decode_accel.simulation import Simulator
    from decode_accel.simulation.config import SimulationConfig
    from decode_accel.training.config import load_config

    mat = tmp_path / "scope_3dcal.mat"
    _save_v73(mat, ZFIT)
    cfg = SimulationConfig(frame={"height": 48, "width": 48, "px_size": 110.0},
                           emitters={"emitters_per_frame": 6, "photons_mean": 3000, "photons_sd": 500,
                                     "z_range": (-400, 400)},
                           psf={"kind": "astigmatic", **PARAMS}, background={"uniform": (10.0, 10.0)},
                           camera={"kind": "perfect"})
    m = Simulator(cfg).sample(6, torch.Generator().manual_seed(0))
    tifffile.imwrite(tmp_path / "movie.tif", m.frames_adu[:, 0].numpy().astype(np.uint16))
    out = tmp_path / "astig.yaml"
    assert cli_main(["calibrate", "--input", str(tmp_path / "movie.tif"), "--out", str(out), "--px-size", "110",
                     "--camera", "perfect", "--psf", "astigmatic", "--psf-calibration", str(mat),
                     "--no-match-density"]) == 0
    psf = load_config(out).simulation.psf
    assert psf.kind == "astigmatic"
    got = {k: getattr(psf, k) for k in PARAMS}
    assert got == pytest.approx(PARAMS, rel=1e-5, abs=1e-4)
    assert "from scope_3dcal.mat" in out.read_text()
