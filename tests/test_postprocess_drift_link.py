"""decode-accel postprocess: Picasso undrift recovers a known drift within its stated error; Picasso link
recovers known blink events. Movies are simulated as localization tables (fast) and written with the
project's Picasso writer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from decode_accel.analysis import link_blinks, load_locs, postprocess, undrift
from decode_accel.cli import main as cli_main
from decode_accel.errors import DecodeAccelError
from decode_accel.io.picasso import write_picasso_hdf5

PX = 100.0


def _drift(t, T):
    return 60.0 * t / T + 15.0 * np.sin(2 * np.pi * t / T), -40.0 * t / T


def _blinking_table(rng, n_mol=300, T=3000, size=64, prec=8.0, drift=True, on_mean=2.0, off_mean=150.0,
                    grid=False):
    if grid:
        g = np.arange(3, size - 3, 6) + 0.5
        xs, ys = np.meshgrid(g, g)
        mol = np.stack([xs.ravel(), ys.ravel()], 1) * PX
    else:
        mol = rng.uniform(2, size - 2, (n_mol, 2)) * PX
    rows, events = [], []
    for k, (x, y) in enumerate(mol):
        t = int(rng.exponential(off_mean))
        while t < T:
            length = 1 + int(rng.exponential(on_mean - 1)) if on_mean > 1 else 1
            frames = np.arange(t, min(t + length, T))
            events.append((k, len(frames)))
            for f in frames:
                dx, dy = _drift(f, T) if drift else (0.0, 0.0)
                rows.append((f, x + dx + rng.normal(0, prec), y + dy + rng.normal(0, prec), 1000.0, k))
            t += length + 3 + int(rng.exponential(off_mean))  # gaps longer than the max dark time
    df = pd.DataFrame(rows, columns=["frame", "x", "y", "photons", "id"]).sort_values("frame").reset_index(drop=True)
    df["bg"] = 10.0
    df["x_sigma"] = df["y_sigma"] = prec
    return df, events


def _write(tmp_path, df, T=3000, size=64, name="locs.hdf5"):
    path = tmp_path / name
    write_picasso_hdf5(df, path, px_size_nm=PX, width=size, height=size, n_frames=T)
    return path


@pytest.mark.parametrize("method", ["rcc", "aim"])
def test_undrift_recovers_known_drift_within_its_stated_error(tmp_path, method):
    rng = np.random.default_rng(0)
    T = 3000
    df, _ = _blinking_table(rng, T=T)
    locs, info = load_locs(_write(tmp_path, df, T))
    new, res = undrift(locs, info, method=method, segmentation=300)
    t = np.arange(T)
    tx, ty = _drift(t, T)
    est = res.drift_nm
    # drift is defined up to a constant: compare after removing the means
    ex = est["x"].to_numpy() - est["x"].mean() - (tx - tx.mean())
    ey = est["y"].to_numpy() - est["y"].mean() - (ty - ty.mean())
    rms = np.sqrt(np.mean(ex ** 2)), np.sqrt(np.mean(ey ** 2))
    sx, sy = res.error_nm
    assert np.isfinite(sx) and np.isfinite(sy) and sx > 0 and sy > 0
    # within 3 stated errors (+ 2 nm for the interpolation between segment centres), and far below the drift
    assert rms[0] < 3 * sx + 2.0 and rms[1] < 3 * sy + 2.0, (rms, res.error_nm)
    assert rms[0] < 0.2 * np.ptp(tx) and rms[1] < 0.2 * np.ptp(ty)
    # the undrifted localizations of one molecule cluster again
    new = new.assign(id=df["id"].to_numpy()) if len(new) == len(df) else None
    if new is not None:
        spread = new.groupby("id")["x"].std().median() * PX
        assert spread < 3 * 8.0


def test_link_recovers_known_blink_events(tmp_path):
    rng = np.random.default_rng(1)
    T = 1000
    df, events = _blinking_table(rng, T=T, drift=False, grid=True, on_mean=3.0, off_mean=80.0)
    locs, info = load_locs(_write(tmp_path, df, T))
    linked = link_blinks(locs, info, max_dark_time=1)
    assert linked.attrs["link_radius_nm"] == pytest.approx(5 * 8.0, rel=0.01)
    assert len(linked) == pytest.approx(len(events), rel=0.02)
    true_len = np.array([e[1] for e in events])
    assert linked["len"].mean() == pytest.approx(true_len.mean(), rel=0.03)
    # Picasso drops events whose length is ambiguous (two molecules' frames interleaved): only a few
    assert 0.97 * len(df) <= linked["n"].sum() <= len(df)


def test_postprocess_cli_writes_picasso_files(tmp_path, capsys):
    rng = np.random.default_rng(2)
    T = 1200
    df, _ = _blinking_table(rng, T=T, n_mol=200)
    path = _write(tmp_path, df, T)
    out = tmp_path / "out" / "locs_undrift.hdf5"
    code = cli_main(["postprocess", "--input", str(path), "--out", str(out), "--undrift", "rcc", "--segmentation", "200",
                     "--link", "--no-drift-error"])
    assert code == 0
    assert out.exists() and out.with_suffix(".yaml").exists()
    assert (out.parent / "locs_undrift_link.hdf5").exists() and (out.parent / "locs_undrift_drift.csv").exists()
    drift = pd.read_csv(out.parent / "locs_undrift_drift.csv")
    assert list(drift.columns) == ["frame", "x", "y"] and len(drift) == T
    linked, info = load_locs(out.parent / "locs_undrift_link.hdf5")
    assert 0 < len(linked) < len(df)
    assert "linked" in capsys.readouterr().out


def test_postprocess_bad_input_is_one_line(tmp_path, capsys):
    assert cli_main(["postprocess", "--input", str(tmp_path / "none.hdf5"), "--out", str(tmp_path / "o.hdf5")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.hdf5"
    bad.write_bytes(b"not hdf5")
    bad.with_suffix(".yaml").write_text("Width: 8\nHeight: 8\nFrames: 10\nPixelsize: 100\n")
    assert cli_main(["postprocess", "--input", str(bad), "--out", str(tmp_path / "o.hdf5")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.hdf5" in err and "\n" not in err
    rng = np.random.default_rng(3)
    df, _ = _blinking_table(rng, T=400, n_mol=50)
    path = _write(tmp_path, df, 400)
    with pytest.raises(DecodeAccelError, match="segmentation"):
        postprocess(path, tmp_path / "o.hdf5", segmentation=300)
    with pytest.raises(DecodeAccelError, match=".hdf5"):
        postprocess(path, tmp_path / "o.csv")
