"""Bad input: every file or value a user hands us fails with one clear message, never a traceback.

Two kinds of checks:

* hand-made bad inputs through the ``decode-accel`` command line (``cli.main``): non-zero exit code,
  stderr names the file and the field, no traceback without ``--debug``;
* hypothesis property tests that feed hundreds of malformed files (random byte damage of a valid file,
  truncation, random structure) to each reader and assert that only ``DecodeAccelError`` escapes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from decode_accel.cli import main
from decode_accel.errors import DecodeAccelError
from tests.test_trainer_helpers import tiny_sigma_munet, tiny_simulation

# 200 files per reader; derandomized (the same files on every run, so a failure reproduces) and without
# shrinking (a failure reports the first bad file at once); no example database written into the repository
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err.strip()


def assert_clean_error(rc: int, err: str, *must_contain: str) -> None:
    assert rc != 0, err
    assert "Traceback" not in err and err, err
    for text in must_contain:
        assert str(text) in err, f"{text!r} not in {err!r}"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from decode_accel.hub import export_model

    torch.manual_seed(0)
    return export_model(tmp_path_factory.mktemp("export") / "model", tiny_sigma_munet(),
                        simulation_config=tiny_simulation())


@pytest.fixture(scope="module")
def valid_tiff(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("tiff") / "movie.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(90, 200, (6, 8, 8), dtype=np.uint16))
    return path.read_bytes()


@pytest.fixture(scope="module")
def valid_h5(tmp_path_factory) -> bytes:
    from decode_accel.data.hdf5 import simulate_to_file

    path = tmp_path_factory.mktemp("h5") / "data.h5"
    simulate_to_file(tiny_simulation(size=8), 3, path, seed=0)
    return path.read_bytes()


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory) -> Path:
    from decode_accel.training.checkpoint import CheckpointManager

    torch.manual_seed(0)
    model = tiny_sigma_munet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(1, 1, 3, 8, 8)).get("p").sum().backward()
    opt.step()
    save_dir = tmp_path_factory.mktemp("ckpt")
    return CheckpointManager(save_dir).save_checkpoint(0, model, opt, metrics={"val_loss": 1.0}, step=1,
                                                       trainer_state={"epoch": 0})


# ---------------------------------------------------------------------------------------------- configs
def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("data, field", [
    ({"training_strategy": {"epochs": "many"}}, "training_strategy.epochs"),
    ({"optimizer": {"lr": 1e-3, "learning_rat": 2}}, "learning_rat"),
    ({"simulation": {"emitters": {"photons_mean": -10.0}}}, "photons_mean"),
    ({"simulation": {"emitters": {"z_range": [500.0, -500.0]}}}, "z_range"),
    ({"data": {"batch_size": 0}}, "data.batch_size"),
    ("model: [unclosed", "line"),
    ("- just\n- a list\n", "mapping"),
])
def test_a_bad_training_config_is_refused_with_the_file_and_the_field(tmp_path, capsys, data, field):
    config = write_yaml(tmp_path / "bad.yaml", data)
    rc, err = run_cli(capsys, "train", "--config", str(config), "--cpu")
    assert_clean_error(rc, err, config, field)
    assert rc == 2


def test_a_missing_config_file_is_named(tmp_path, capsys):
    rc, err = run_cli(capsys, "train", "--config", str(tmp_path / "nope.yaml"))
    assert_clean_error(rc, err, tmp_path / "nope.yaml", "not found")


def test_a_bad_override_names_the_key(capsys):
    rc, err = run_cli(capsys, "train", "training_strategy.epochs=-3", "--cpu")
    assert_clean_error(rc, err, "training_strategy.epochs")


def test_with_debug_the_traceback_is_shown(tmp_path):
    config = write_yaml(tmp_path / "bad.yaml", {"data": {"batch_size": 0}})
    with pytest.raises(DecodeAccelError):
        main(["train", "--config", str(config), "--cpu", "--debug"])


def test_a_frame_size_the_network_cannot_halve_is_refused_when_the_config_is_loaded(tmp_path, capsys):
    rc, err = run_cli(capsys, "train", "--cpu", "--output_dir", str(tmp_path / "run"), "simulation.frame.height=30",
                      "model.preset=tiny")
    assert_clean_error(rc, err, "simulation.frame.height=30", "multiple of 4", "use 28 or 32")
    assert "simulation.frame.width" not in err  # the default width 40 is fine
    assert not (tmp_path / "run").exists()  # refused before anything was written
    rc, err = run_cli(capsys, "train", "--cpu", "simulation.frame.width=36", "model.depth=3")
    assert_clean_error(rc, err, "simulation.frame.width=36", "multiple of 8", "model.depth=3", "use 32 or 40")


def test_a_curriculum_stage_with_a_frame_size_the_network_cannot_halve_is_named(capsys):
    from decode_accel.training.config import load_config

    with pytest.raises(DecodeAccelError, match=r"curriculum\.0\.simulation\.frame\.width=42 is not a multiple of 4"):
        load_config(None, ["curriculum=[{until_epoch: 1, simulation: {frame.width: 42}}]"])


# ---------------------------------------------------------------------------------------------- output folders
TINY_RUN = ["model.preset=tiny", "simulation.frame.height=16", "simulation.frame.width=16", "data.batch_size=2",
            "data.steps_per_epoch=1", "data.val_samples=2", "training_strategy.epochs=1",
            "monitoring.use_tensorboard=false"]


def test_an_output_dir_that_cannot_be_created_is_named_with_the_flag_and_a_fix(tmp_path, capsys):
    blocker = tmp_path / "results.txt"  # a file where the folder should go (works even as root)
    blocker.write_text("keep me")
    rc, err = run_cli(capsys, "train", "--cpu", "--output_dir", str(blocker / "run"), *TINY_RUN)
    assert_clean_error(rc, err, blocker / "run", "--output_dir", "cannot create this folder", "choose a folder")
    assert rc == 2 and "\n" not in err
    assert blocker.read_text() == "keep me"


def test_the_recipe_scripts_report_an_unwritable_output_dir_in_one_line(tmp_path):
    import subprocess
    import sys

    blocker = tmp_path / "results.txt"
    blocker.write_text("keep me")
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "recipes" / "single_channel.py"),
                           "--cpu", "--output_dir", str(blocker / "run"), *TINY_RUN],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and "--output_dir" in err and str(blocker / "run") in err


def test_a_log_dir_that_cannot_be_created_is_named_by_the_monitor(tmp_path):
    from decode_accel.training.monitor import TrainingMonitor

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DecodeAccelError, match=r"monitoring\.log_dir: cannot create this folder.*--output_dir"):
        TrainingMonitor(blocker / "logs", use_tensorboard=False)


# ---------------------------------------------------------------------------------------------- HDF5
def test_a_damaged_hdf5_training_set_is_refused_with_the_file_and_the_dataset(tmp_path, capsys, valid_h5):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(valid_h5)
    with h5py.File(bad, "a") as f:
        del f["frames"]
        f["frames"] = np.zeros((3, 8, 8), dtype=np.uint16)  # the channel axis is missing
    rc, err = run_cli(capsys, "train", "--cpu", f"data.data_path={bad}", "model.preset=tiny", "data.batch_size=2",
                      "data.steps_per_epoch=1", "data.val_samples=2", "training_strategy.epochs=1",
                      f"checkpointing.save_dir={tmp_path / 'ck'}", f"monitoring.log_dir={tmp_path / 'logs'}",
                      "monitoring.use_tensorboard=false")
    assert_clean_error(rc, err, bad, "frames")


def test_a_text_file_given_as_hdf5_is_not_an_hdf5_file(tmp_path):
    from decode_accel.data.hdf5 import read_hdf5

    bad = tmp_path / "notes.h5"
    bad.write_text("not hdf5")
    with pytest.raises(DecodeAccelError, match="not an HDF5 file"):
        read_hdf5(bad)


def _damage(data: bytes, edits, truncate: int | None) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    if truncate is not None:
        buf = buf[: truncate % max(len(buf), 1)]
    return bytes(buf)


EDITS = st.lists(st.tuples(st.integers(0, 10 ** 7), st.integers(0, 255)), max_size=24)
TRUNCATE = st.none() | st.integers(0, 10 ** 7)


def _read_h5_fully(path):
    from decode_accel.data.hdf5 import read_hdf5

    movie = read_hdf5(path)
    movie.frames_photons()
    _ = movie.emitters, movie.label_min_photons


@FUZZ
@given(edits=EDITS, truncate=TRUNCATE)
def test_only_decode_accel_errors_escape_the_hdf5_reader_on_damaged_bytes(tmp_path_factory, valid_h5, edits,
                                                                         truncate):
    path = tmp_path_factory.mktemp("fz") / "d.h5"
    path.write_bytes(_damage(valid_h5, edits, truncate))
    try:
        _read_h5_fully(path)
    except DecodeAccelError as err:
        assert "\n" not in str(err)


H5_VALUES = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                      st.just("{}"), st.just("[1, 2]"), st.just('{"preset": 1}'))
SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple)
DTYPES = st.sampled_from(["uint16", "float32", "float64", "int8", "bool"])


@FUZZ
@given(attrs=st.dictionaries(st.sampled_from(["format_version", "px_size", "camera", "simulation_config",
                                              "label_min_photons"]), H5_VALUES),
       frames=st.none() | st.tuples(SHAPES, DTYPES), bg=st.none() | st.tuples(SHAPES, DTYPES),
       emitters=st.none() | st.dictionaries(st.sampled_from(["frame", "x", "y", "z", "photons", "id"]),
                                            st.tuples(SHAPES, DTYPES), max_size=6))
def test_only_decode_accel_errors_escape_the_hdf5_reader_on_random_structure(tmp_path_factory, attrs, frames, bg,
                                                                            emitters):
    path = tmp_path_factory.mktemp("fz") / "s.h5"
    with h5py.File(path, "w") as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        for name, spec in (("frames", frames), ("bg", bg)):
            if spec is not None:
                f.create_dataset(name, data=np.ones(spec[0], dtype=spec[1]))
        if emitters is not None:
            g = f.create_group("emitters")
            for name, (shape, dtype) in emitters.items():
                g.create_dataset(name, data=np.ones(shape, dtype=dtype))
    try:
        _read_h5_fully(path)
    except DecodeAccelError as err:
        assert "\n" not in str(err)


# ---------------------------------------------------------------------------------------------- TIFF movies
@pytest.mark.parametrize("kind", ["missing", "folder", "text", "truncated", "truncated_uncompressed", "two_channels"])
def test_a_bad_movie_is_refused_with_the_file_name(tmp_path, capsys, export_dir, valid_tiff, kind):
    movie = tmp_path / "movie.tif"
    if kind == "folder":
        movie.mkdir()
    elif kind == "text":
        movie.write_text("this is not a TIFF")
    elif kind == "truncated":
        big = tmp_path / "big.tif"
        tifffile.imwrite(big, np.ones((20, 16, 16), dtype=np.uint16), compression="zlib")
        movie.write_bytes(big.read_bytes()[: big.stat().st_size * 2 // 3])
    elif kind == "truncated_uncompressed":  # cut inside the pixel data: the last frames are gone
        big = tmp_path / "big.tif"
        tifffile.imwrite(big, np.ones((20, 16, 16), dtype=np.uint16), photometric="minisblack")
        movie.write_bytes(big.read_bytes()[: big.stat().st_size * 6 // 10])
    elif kind == "two_channels":
        tifffile.imwrite(movie, np.ones((4, 2, 16, 16), dtype=np.uint16), imagej=True, metadata={"axes": "TCYX"})
    rc, err = run_cli(capsys, "predict", "--model", str(export_dir), "--input", str(movie), "--out",
                      str(tmp_path / "locs.csv"), "--no-progress")
    assert_clean_error(rc, err, movie)
    if kind == "two_channels":
        assert "channel" in err
    if kind == "truncated_uncompressed":
        assert "truncated" in err and "--frames" in err


def _write_movie(path: Path, frames: np.ndarray) -> Path:
    tifffile.imwrite(path, frames, photometric="minisblack")
    return path


def _predict_cli(capsys, export_dir, movie: Path, out: Path) -> tuple[int, str]:
    return run_cli(capsys, "predict", "--model", str(export_dir), "--input", str(movie), "--out", str(out),
                   "--no-progress")


COUNTS = np.random.default_rng(3).integers(90, 200, (6, 16, 16))


@pytest.mark.parametrize("dtype, what", [("float64", "floating-point"), ("float32", "floating-point"),
                                         ("int8", "8-bit signed"), ("int64", "not a camera-count type")])
def test_a_movie_whose_pixel_type_cannot_hold_camera_counts_is_refused_and_the_old_table_kept(
        tmp_path, capsys, export_dir, dtype, what):
    movie = _write_movie(tmp_path / "movie.tif", COUNTS.astype(dtype))
    out = tmp_path / "locs.csv"
    out.write_text("the table of an earlier run\n")
    rc, err = _predict_cli(capsys, export_dir, movie, out)
    assert_clean_error(rc, err, movie, "pixel type", dtype, what, "uint16")
    assert "\n" not in err and rc == 2
    assert out.read_text() == "the table of an earlier run\n"


def test_a_float_movie_with_nan_pixels_is_refused_before_any_frame_is_analysed(tmp_path, capsys, export_dir):
    frames = COUNTS.astype(np.float32)
    frames[2, 0, 0] = np.nan
    movie = _write_movie(tmp_path / "movie.tif", frames)
    rc, err = _predict_cli(capsys, export_dir, movie, tmp_path / "locs.csv")
    assert_clean_error(rc, err, movie, "float32", "not camera counts")
    assert not (tmp_path / "locs.csv").exists()


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int16", "int32"])
def test_movies_of_every_camera_count_type_are_analysed(tmp_path, capsys, export_dir, dtype):
    movie = _write_movie(tmp_path / "movie.tif", COUNTS.astype(dtype))
    rc, err = _predict_cli(capsys, export_dir, movie, tmp_path / "locs.csv")
    assert rc == 0, err
    assert (tmp_path / "locs.csv").read_text().startswith('"id","frame","x [nm]"')


def test_negative_pixels_in_a_signed_movie_are_refused_naming_the_frames_and_the_old_table_kept(
        tmp_path, capsys, export_dir):
    frames = COUNTS.astype(np.int16)
    frames[4, 3, 3] = -7
    frames[5, 0, 5] = -2
    movie = _write_movie(tmp_path / "movie.tif", frames)
    out = tmp_path / "locs.csv"
    out.write_text("the table of an earlier run\n")
    rc, err = _predict_cli(capsys, export_dir, movie, out)
    assert_clean_error(rc, err, movie, "pixel values", "frame(s) 4, 5 (0-based)", "negative", "-7", "--frames")
    assert out.read_text() == "the table of an earlier run\n"
    # the fix works: frames 0-2 (whose windows read frames 0-3) are analysed
    rc, err = run_cli(capsys, "predict", "--model", str(export_dir), "--input", str(movie), "--out", str(out),
                      "--frames", "0:3", "--no-progress")
    assert rc == 0, err


def test_nan_or_infinite_pixels_in_an_array_are_refused_naming_the_frames(export_dir):
    from decode_accel.inference.predict import predict

    frames = COUNTS.astype(np.float32)
    frames[0, 1, 1], frames[3, 2, 2], frames[5, 0, 0] = np.nan, np.inf, -np.inf
    with pytest.raises(DecodeAccelError, match=r"frame\(s\) 0, 3, 5 \(0-based\) hold NaN or infinite") as err:
        predict(export_dir, frames, progress=False)
    assert "\n" not in str(err.value) and "--frames" in str(err.value)
    assert len(predict(export_dir, frames[1:3], progress=False).attrs) > 0  # finite frames are analysed


def test_a_movie_without_frames_gets_a_fix_that_is_possible(tmp_path, capsys, export_dir):
    movie = tmp_path / "empty.tif"
    tifffile.imwrite(movie, np.zeros((0, 16, 16), np.uint16))
    rc, err = _predict_cli(capsys, export_dir, movie, tmp_path / "locs.csv")
    assert_clean_error(rc, err, movie, "no image data", "at least one frame")
    assert "<= 0" not in err
    from decode_accel.inference.predict import predict

    with pytest.raises(DecodeAccelError, match="no frames.*at least one frame") as err:
        predict(export_dir, np.zeros((0, 16, 16), np.uint16), progress=False)
    assert "<= 0" not in str(err.value)


def _read_movie_fully(path):
    from decode_accel.inference.movie import open_movie

    with open_movie(path) as movie:
        movie.check(n_channels=1, px_size_nm=100.0)
        if movie.n_frames:
            movie.read(slice(0, movie.n_frames))


@FUZZ
@given(edits=EDITS, truncate=TRUNCATE)
def test_only_decode_accel_errors_escape_the_tiff_reader(tmp_path_factory, valid_tiff, edits, truncate):
    path = tmp_path_factory.mktemp("fz") / "m.tif"
    path.write_bytes(_damage(valid_tiff, edits, truncate))
    try:
        _read_movie_fully(path)
    except DecodeAccelError as err:
        assert "\n" not in str(err)


# ---------------------------------------------------------------------------------------------- tables
@pytest.mark.parametrize("content", ["frame,x,y\n1,2\n", "", "\x00\x01\x02garbage", "a,b,c\n1,2,3\n"])
def test_a_bad_localization_table_is_refused_with_the_file_name(tmp_path, capsys, content):
    good = tmp_path / "good.csv"
    good.write_text('"frame","x [nm]","y [nm]","intensity [photon]"\n1,100.0,200.0,1000.0\n')
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    rc, err = run_cli(capsys, "evaluate", "--gt", str(good), "--pred", str(bad))
    assert_clean_error(rc, err, bad)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_resuming_from_a_checkpoint_of_another_architecture_names_the_checkpoint_and_the_fix(tmp_path, capsys):
    common = ["--cpu", "--output_dir", str(tmp_path), "simulation.frame.height=16", "simulation.frame.width=16",
              "data.batch_size=2", "data.steps_per_epoch=1", "data.val_samples=2", "training_strategy.epochs=1",
              "monitoring.use_tensorboard=false"]
    assert main(["train", *common, "model.preset=tiny"]) == 0
    capsys.readouterr()
    rc, err = run_cli(capsys, "train", *common, "model.preset=cpu_small", "training_strategy.epochs=2", "--resume")
    assert_clean_error(rc, err, tmp_path / "checkpoints", "another architecture")
    # the same run, but its checkpoint claims a format from a newer decode_accel
    (newest,) = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-")]
    manifest = json.loads((newest / "complete.json").read_text())
    manifest["format_version"] = 99
    (newest / "complete.json").write_text(json.dumps(manifest))
    rc, err = run_cli(capsys, "train", *common, "model.preset=tiny", "training_strategy.epochs=2", "--resume")
    assert_clean_error(rc, err, newest, "newer", "upgrade decode_accel")


def test_a_checkpoint_of_a_newer_format_version_asks_for_an_upgrade(tmp_path, valid_checkpoint):
    from decode_accel.training.checkpoint import load_checkpoint

    folder = tmp_path / "step-1"
    shutil.copytree(valid_checkpoint, folder)
    manifest = json.loads((folder / "complete.json").read_text())
    manifest["format_version"] = 99
    (folder / "complete.json").write_text(json.dumps(manifest))
    with pytest.raises(DecodeAccelError, match="newer.*upgrade decode_accel") as err:
        load_checkpoint(folder)
    assert str(folder) in str(err.value)


CKPT_FILES = ["model.safetensors", "optimizer.pt", "rng_rank0.pt", "trainer_state.json", "metrics.json",
              "complete.json"]


def _reseal(folder: Path) -> None:
    """Recompute the manifest so the damage reaches the parsers behind the sha256 check."""
    import hashlib

    manifest = json.loads((folder / "complete.json").read_text())
    for name in manifest["files"]:
        f = folder / name
        if f.is_file():
            manifest["files"][name] = {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (folder / "complete.json").write_text(json.dumps(manifest))


def _load_ckpt_fully(folder: Path):
    from decode_accel.training.checkpoint import load_checkpoint, restore_checkpoint

    ckpt = load_checkpoint(folder)
    model = tiny_sigma_munet()
    restore_checkpoint(ckpt, model, torch.optim.Adam(model.parameters()), restore_rng=False)


@FUZZ
@given(victim=st.sampled_from(CKPT_FILES), edits=EDITS, truncate=TRUNCATE, reseal=st.booleans())
def test_only_decode_accel_errors_escape_the_checkpoint_loader(tmp_path_factory, valid_checkpoint, victim, edits,
                                                               truncate, reseal):
    folder = tmp_path_factory.mktemp("fz") / "step-1"
    shutil.copytree(valid_checkpoint, folder)
    f = folder / victim
    f.write_bytes(_damage(f.read_bytes(), edits, truncate))
    if reseal and victim != "complete.json":
        _reseal(folder)
    try:
        _load_ckpt_fully(folder)
    except DecodeAccelError as err:
        assert "\n" not in str(err)


# ---------------------------------------------------------------------------------------------- config fuzz
YAML_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 6, 10 ** 6), st.floats(allow_nan=True),
                        st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3))
SECTIONS = ["model", "simulation", "data", "loss", "optimizer", "scheduler", "training_strategy", "monitoring",
            "checkpointing", "curriculum", "base", "regularization", "loss_scheduling", "distillation", "epochs"]
KEYS = st.sampled_from(["preset", "lr", "epochs", "batch_size", "type", "frame", "emitters", "z_range", "height",
                        "photons_mean", "weights", "seed", "mixed_precision", "steps_per_epoch", "x", ""])
TREES = st.recursive(YAML_LEAVES, lambda inner: st.dictionaries(KEYS, inner, max_size=4) | st.lists(inner, max_size=3),
                     max_leaves=12)


@FUZZ
@given(tree=st.dictionaries(st.sampled_from(SECTIONS), TREES, max_size=5) | TREES,
       raw=st.none() | st.binary(max_size=64))
def test_only_decode_accel_errors_escape_the_config_loader(tmp_path_factory, tree, raw):
    from decode_accel.training.config import load_config

    path = tmp_path_factory.mktemp("fz") / "c.yaml"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(yaml.safe_dump(tree))
    try:
        load_config(path)
    except DecodeAccelError as err:
        assert str(path) in str(err).splitlines()[0]


# ---------------------------------------------------------------------------------------------- export folders
@pytest.mark.parametrize("remove", ["model.safetensors", "config.json", "decode_accel.json"])
def test_an_export_folder_with_a_missing_file_is_refused_with_its_name(tmp_path, capsys, export_dir, valid_tiff,
                                                                      remove):
    broken = tmp_path / "export"
    shutil.copytree(export_dir, broken)
    os.remove(broken / remove)
    movie = tmp_path / "m.tif"
    movie.write_bytes(valid_tiff)
    rc, err = run_cli(capsys, "predict", "--model", str(broken), "--input", str(movie), "--out",
                      str(tmp_path / "locs.csv"), "--no-progress")
    assert_clean_error(rc, err, broken)


def test_an_export_folder_that_does_not_exist_is_named(tmp_path, capsys, valid_tiff):
    movie = tmp_path / "m.tif"
    movie.write_bytes(valid_tiff)
    rc, err = run_cli(capsys, "predict", "--model", str(tmp_path / "nowhere"), "--input", str(movie), "--out",
                      str(tmp_path / "locs.csv"), "--no-progress")
    assert_clean_error(rc, err, tmp_path / "nowhere", "not found")
