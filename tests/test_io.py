"""ThunderSTORM CSV and Picasso HDF5 files: exact columns, round trips, Picasso compatibility, bad files."""

import tempfile
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decode_accel.errors import DecodeAccelError
from decode_accel.io import read_table, write_table, yaml_path

DESIGN_COLUMNS = ["id", "frame", "x [nm]", "y [nm]", "z [nm]", "intensity [photon]", "offset [photon]",
                  "uncertainty_xy [nm]", "uncertainty_z [nm]"]
PER_AXIS = ["uncertainty_x [nm]", "uncertainty_y [nm]"]
TWO_CHANNEL = ["intensity_ch1 [photon]", "intensity_ch2 [photon]", "ratio", "ratio_uncertainty", "color"]


def locs(n=25, seed=0, two_channel=False):
    rng = np.random.default_rng(seed)
    s = rng.uniform(3, 30, n)
    df = pd.DataFrame({"frame": rng.integers(0, 9, n), "x": rng.uniform(60, 3100, n), "y": rng.uniform(60, 3100, n),
                       "z": rng.uniform(-500, 500, n), "photons": rng.uniform(100, 9000, n), "id": np.arange(n),
                       "bg": rng.uniform(0, 100, n), "prob": rng.uniform(0.3, 1, n), "x_sigma": s, "y_sigma": s,
                       "z_sigma": rng.uniform(10, 80, n), "photons_sigma": rng.uniform(5, 90, n)})
    if two_channel:
        r = rng.uniform(0.05, 0.95, n)
        df["ratio"], df["ratio_sigma"] = r, rng.uniform(0.01, 0.1, n)
        df["photons_ch1"], df["photons_ch2"] = r * df["photons"], (1 - r) * df["photons"]
        df["color"], df["color_prob"] = rng.integers(-1, 2, n), rng.uniform(0.5, 1, n)
    return df


def test_csv_has_exactly_the_thunderstorm_columns_and_one_based_frames(tmp_path):
    df = locs()
    write_table(df, tmp_path / "a.csv")
    raw = pd.read_csv(tmp_path / "a.csv")
    assert list(raw.columns) == DESIGN_COLUMNS + PER_AXIS + ["prob"]
    assert (raw["frame"].to_numpy() == df["frame"].to_numpy() + 1).all()
    assert (tmp_path / "a.csv").read_text().splitlines()[0].startswith('"id","frame","x [nm]"')
    write_table(locs(two_channel=True), tmp_path / "b.csv")
    assert list(pd.read_csv(tmp_path / "b.csv").columns) == DESIGN_COLUMNS + PER_AXIS + ["prob"] + TWO_CHANNEL


def test_csv_keeps_each_axis_uncertainty_and_the_thunderstorm_mean_of_both(tmp_path):
    df = locs()
    df["y_sigma"] = 2.0 * df["x_sigma"]
    write_table(df, tmp_path / "a.csv")
    raw = pd.read_csv(tmp_path / "a.csv")
    np.testing.assert_allclose(raw["uncertainty_x [nm]"], df["x_sigma"])
    np.testing.assert_allclose(raw["uncertainty_y [nm]"], df["y_sigma"])
    np.testing.assert_allclose(raw["uncertainty_xy [nm]"], np.sqrt(2.5) * df["x_sigma"])
    back = read_table(tmp_path / "a.csv")
    np.testing.assert_allclose(back["y_sigma"] / back["x_sigma"], 2.0)
    # a file from ThunderSTORM itself has only uncertainty_xy: both axes read it
    raw.drop(columns=PER_AXIS).to_csv(tmp_path / "ts.csv", index=False)
    np.testing.assert_allclose(read_table(tmp_path / "ts.csv")["y_sigma"], raw["uncertainty_xy [nm]"])


@pytest.mark.parametrize("two_channel", [False, True])
def test_csv_round_trip_keeps_every_value(tmp_path, two_channel):
    df = locs(two_channel=two_channel)
    write_table(df, tmp_path / "a.csv")
    back = read_table(tmp_path / "a.csv")
    cols = ["frame", "x", "y", "z", "photons", "id", "bg", "prob", "x_sigma", "y_sigma", "z_sigma"]
    if two_channel:
        cols += ["ratio", "ratio_sigma", "photons_ch1", "photons_ch2", "color"]
    pd.testing.assert_frame_equal(back[cols], df[cols], check_dtype=False)


@pytest.mark.parametrize("two_channel", [False, True])
def test_hdf5_round_trip_keeps_values_within_float32(tmp_path, two_channel):
    df = locs(two_channel=two_channel)
    write_table(df, tmp_path / "a.hdf5", px_size_nm=107.0, width=32, height=32, n_frames=10)
    back = read_table(tmp_path / "a.hdf5")
    for col in df.columns:
        np.testing.assert_allclose(back[col].to_numpy(np.float64), df[col].to_numpy(np.float64), rtol=2e-6,
                                   atol=1e-3 if col in ("x", "y") else 1e-6, err_msg=col)


def test_picasso_opens_the_file_with_pixel_centres_at_integer_coordinates(tmp_path):
    picasso_io = pytest.importorskip("picasso.io")
    df = locs()
    write_table(df, tmp_path / "a.hdf5", px_size_nm=100.0, width=32, height=32, n_frames=10, psf_sigma_nm=130.0)
    loaded, info = picasso_io.load_locs(str(tmp_path / "a.hdf5"))
    assert len(loaded) == len(df)  # Picasso's sanity filter dropped nothing
    np.testing.assert_allclose(loaded["x"], df["x"] / 100 - 0.5, atol=1e-4)
    np.testing.assert_allclose(loaded["y"], df["y"] / 100 - 0.5, atol=1e-4)
    np.testing.assert_allclose(loaded["lpx"], df["x_sigma"] / 100, rtol=1e-6)
    np.testing.assert_allclose(loaded["sx"], 1.3, rtol=1e-6)
    assert loaded["frame"].dtype == np.uint32
    assert (loaded["frame"].to_numpy() == df["frame"].to_numpy()).all()
    meta = info[0]
    assert (meta["Width"], meta["Height"], meta["Frames"], meta["Pixelsize"]) == (32, 32, 10, 100.0)
    assert "decode_accel" in meta["Generated by"]


def test_ground_truth_without_sigmas_gets_finite_precisions_from_the_mortensen_bound(tmp_path):
    df = locs()[["frame", "x", "y", "z", "photons", "id", "bg"]]
    write_table(df, tmp_path / "gt.hdf5", px_size_nm=100.0, width=32, height=32, n_frames=10)
    with h5py.File(tmp_path / "gt.hdf5") as f:
        lpx = f["locs"]["lpx"]
    assert np.all(np.isfinite(lpx)) and np.all(lpx > 0) and np.all(lpx < 1)


def test_picasso_writer_refuses_non_finite_values_and_clips_negative_photons(tmp_path):
    df = locs()
    df.loc[3, "prob"] = np.nan
    with pytest.raises(DecodeAccelError, match="prob"):
        write_table(df, tmp_path / "a.hdf5", px_size_nm=100.0, width=32, height=32, n_frames=10)
    assert not (tmp_path / "a.hdf5").exists()
    df = locs()
    df.loc[0, "photons"] = -3.0
    write_table(df, tmp_path / "a.hdf5", px_size_nm=100.0, width=32, height=32, n_frames=10)
    assert read_table(tmp_path / "a.hdf5")["photons"].iloc[0] == 0.0
    with pytest.raises(DecodeAccelError, match="n_frames"):
        write_table(df, tmp_path / "a.hdf5", px_size_nm=100.0, width=32, height=32, n_frames=3)


def test_picasso_writer_warns_about_localizations_picasso_would_drop(tmp_path):
    df = locs(n=3)
    df.loc[0, "x"] = 20.0  # within half a pixel of the left edge -> negative Picasso x
    with pytest.warns(UserWarning, match="1 localizations"):
        write_table(df, tmp_path / "a.hdf5", px_size_nm=100.0, width=32, height=32, n_frames=10)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    good = locs()
    write_table(good, tmp_path / "a.csv")
    before = (tmp_path / "a.csv").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(OSError):
        write_table(locs(seed=1), tmp_path / "a.csv")
    assert (tmp_path / "a.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]


def test_both_picasso_files_are_replaced_together(tmp_path):
    write_table(locs(), tmp_path / "a.h5", px_size_nm=100.0, width=32, height=32, n_frames=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "a.yaml"]
    assert yaml.safe_load(yaml_path(tmp_path / "a.h5").read_text())["Pixelsize"] == 100.0


@pytest.mark.parametrize("text, column", [
    ('"id","frame","y [nm]","intensity [photon]"\n1,1,5,100\n', "x [nm]"),
    ('"frame","x [nm]","y [nm]","intensity [photon]"\n1,abc,5,100\n', "x [nm]"),
    ('"frame","x [nm]","y [nm]","intensity [photon]"\n0,1,5,100\n', "frame"),
    ('"frame","x [nm]","y [nm]","intensity [photon]"\n1.5,1,5,100\n', "frame"),
    ('"frame","x [nm]","y [nm]","intensity [photon]"\n1,1,,100\n', "y [nm]"),
])
def test_malformed_csv_names_the_file_and_the_column(tmp_path, text, column):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DecodeAccelError) as err:
        read_table(path)
    assert str(path) in str(err.value) and column in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_hdf5_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "bad.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("locs", data=np.zeros(3, dtype=[("frame", "u4"), ("x", "f4"), ("photons", "f4")]))
    yaml_path(path).write_text("Pixelsize: 100\n")
    with pytest.raises(DecodeAccelError, match=r"bad\.hdf5.*\by\b"):
        read_table(path)
    yaml_path(path).unlink()
    with pytest.raises(DecodeAccelError, match="px-size"):
        read_table(path)


def test_unknown_extensions_are_refused(tmp_path):
    with pytest.raises(DecodeAccelError, match=".txt"):
        write_table(locs(), tmp_path / "a.txt")


# ---------------------------------------------------------------- property tests: never crash, only DecodeAccelError
_TOKENS = st.sampled_from(["1", "0", "-3", "2.5", "1e400", "nan", "NaN", "inf", "", "abc", "\"", "'", ";", "1,2",
                           "é", "\x00", " 7 ", "True", "0x10", "9" * 30, "-0", "1e-320"])
_NAMES = st.sampled_from(DESIGN_COLUMNS + TWO_CHANNEL + ["prob", "uncertainty [nm]", "junk", "", "x [nm]"])


@st.composite
def csv_texts(draw):
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(st.binary(max_size=200))
    names = draw(st.lists(_NAMES, min_size=0, max_size=12))
    if draw(st.integers(0, 3)):  # mostly a header with the required columns, so the values get exercised
        names = list(dict.fromkeys(names + ["frame", "x [nm]", "y [nm]", "intensity [photon]"]))
    sep = draw(st.sampled_from([","] * 6 + [";", "\t"]))
    width = st.just(len(names)) if draw(st.integers(0, 3)) else st.integers(0, len(names) + 2)
    rows = draw(st.lists(width.flatmap(lambda k: st.lists(_TOKENS, min_size=k, max_size=k)), max_size=6))
    lines = [sep.join(f'"{n}"' for n in names)] + [sep.join(r) for r in rows]
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(csv_texts())
def test_arbitrary_malformed_csv_files_only_ever_raise_decode_accel_error(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.csv"
        path.write_bytes(content)
        try:
            df = read_table(path)
        except DecodeAccelError as err:
            assert "\n" not in str(err)
            return
        assert {"frame", "x", "y", "z", "photons", "id"} <= set(df.columns)
        assert np.all(np.isfinite(df[["x", "y", "z", "photons"]].to_numpy(np.float64)))


_DTYPES = st.sampled_from(["f4", "f8", "u4", "i2", "u1", "S4", "?", "(2,)f4", "c8"])
_FIELDS = st.sampled_from(["frame", "x", "y", "photons", "bg", "lpx", "lpy", "z", "lpz", "id", "color", "prob",
                           "junk"])
_VALUES = st.sampled_from([0.0, 1.0, 3.0, 2.5, 7.0] * 3 + [-1.0, np.nan, np.inf, -np.inf, 1e30, 4e9])


@st.composite
def hdf5_files(draw):
    kind = draw(st.sampled_from(["bytes", "no-locs", "group", "plain", "scalar"] + ["table"] * 8))
    fields = list(dict.fromkeys(draw(st.lists(_FIELDS, min_size=1, max_size=8))))
    if draw(st.booleans()):
        fields = list(dict.fromkeys(fields + ["frame", "x", "y", "photons"]))
    dtypes = [draw(_DTYPES) if draw(st.integers(0, 2)) == 0 else "f4" for _ in fields]
    n = draw(st.integers(0, 4))
    values = draw(st.lists(_VALUES, min_size=n * len(fields), max_size=n * len(fields)))
    yaml_text = draw(st.sampled_from([None, "Pixelsize: 100\n", "Pixelsize: 100\n", "Pixelsize: 100\n", "Pixelsize: -1\n", "Pixelsize: abc\n",
                                      "Pixelsize: [1, 2]\n", ": : :\n  - [", "Width: 3\n---\nPixelsize: 110.5\n",
                                      "Pixelsize: .nan\n", "Pixelsize: true\n", "!!python/object:os.system {}\n"]))
    return kind, fields, dtypes, n, values, yaml_text, draw(st.binary(max_size=64))


def _write_hdf5(path, spec):
    kind, fields, dtypes, n, values, yaml_text, junk = spec
    if yaml_text is not None:
        yaml_path(path).write_text(yaml_text)
    if kind == "bytes":
        path.write_bytes(junk)
        return
    with h5py.File(path, "w") as f:
        if kind == "no-locs":
            f.create_dataset("other", data=np.zeros(3))
        elif kind == "group":
            f.create_group("locs")
        elif kind == "plain":
            f.create_dataset("locs", data=np.zeros((n, 2)))
        else:
            arr = np.zeros(n if kind == "table" else (), dtype=list(zip(fields, dtypes)))
            it = iter(values)
            for name, dt in zip(fields, dtypes):
                if kind != "table":
                    break
                for row in range(n):
                    v = next(it)
                    try:
                        with warnings.catch_warnings(), np.errstate(all="ignore"):
                            warnings.simplefilter("ignore")
                            arr[name][row] = v if dt not in ("S4",) else str(v)[:4].encode()
                    except (ValueError, OverflowError, TypeError):
                        pass
            f.create_dataset("locs", data=arr)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hdf5_files(), st.sampled_from([None, 100.0]))
def test_arbitrary_malformed_hdf5_files_only_ever_raise_decode_accel_error(spec, px_size):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.hdf5"
        _write_hdf5(path, spec)
        try:
            df = read_table(path, px_size_nm=px_size)
        except DecodeAccelError as err:
            assert "\n" not in str(err)
            return
        assert {"frame", "x", "y", "z", "photons", "id"} <= set(df.columns)
        assert np.all(np.isfinite(df[["x", "y", "z", "photons"]].to_numpy(np.float64)))
