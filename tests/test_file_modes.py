"""Files the project writes get the permissions the user's umask asks for, like any other tool's.

Atomic writes go through a temporary file that is renamed onto the target; ``tempfile.mkstemp`` would
create it 0600 and the rename keeps that, so colleagues on a shared server could not read the results.
Each test writes under umask 022 (expect 0644) and under umask 077 (expect 0600: the umask is honoured,
not replaced by a fixed mode).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from decode_accel.io import write_picasso_hdf5, write_thunderstorm_csv
from decode_accel.io._atomic import atomic_path, atomic_write_text, create_temporary_file

UMASKS = {0o022: 0o644, 0o077: 0o600, 0o002: 0o664}


@pytest.fixture(params=sorted(UMASKS), ids=lambda m: f"umask{m:03o}")
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def table(n: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"frame": np.arange(n), "x": rng.uniform(100, 900, n), "y": rng.uniform(100, 900, n),
                         "z": np.zeros(n), "photons": rng.uniform(500, 2000, n), "bg": np.full(n, 10.0)})


def no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_the_temporary_file_of_an_atomic_write_is_created_with_the_umask_applied(tmp_path, umask):
    fd, tmp = create_temporary_file(tmp_path / "sub" / "result.csv")
    os.close(fd)
    assert tmp.parent == tmp_path / "sub" and tmp.name.startswith(".result.csv.")
    assert mode(tmp) == UMASKS[umask]


def test_atomic_path_and_atomic_write_text_leave_files_with_the_umask_mode(tmp_path, umask):
    with atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    atomic_write_text(tmp_path / "b.yaml", "a: 1\n")
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.yaml") == UMASKS[umask]
    no_leftovers(tmp_path)


def test_localization_tables_are_readable_as_the_umask_allows(tmp_path, umask):
    write_thunderstorm_csv(table(), tmp_path / "locs.csv")
    write_picasso_hdf5(table(), tmp_path / "locs.hdf5", px_size_nm=100.0, width=10, height=10, n_frames=5)
    for name in ("locs.csv", "locs.hdf5", "locs.yaml"):
        assert mode(tmp_path / name) == UMASKS[umask], name
    no_leftovers(tmp_path)


def test_a_saved_training_config_is_readable_as_the_umask_allows(tmp_path, umask):
    from decode_accel.training.config import load_config, save_config

    save_config(load_config(None), tmp_path / "config.yaml")
    assert mode(tmp_path / "config.yaml") == UMASKS[umask]
    no_leftovers(tmp_path)


def test_simulated_movies_and_their_tiff_and_ground_truth_are_readable_as_the_umask_allows(tmp_path, umask):
    from decode_accel.data.hdf5 import export_tiff_and_csv, simulate_to_file
    from decode_accel.simulation import SimulationConfig

    config = SimulationConfig.model_validate(dict(frame=dict(height=8, width=8), emitters=dict(density=1.0), seed=1))
    h5 = simulate_to_file(config, 3, tmp_path / "movie.h5")
    export_tiff_and_csv(h5, tmp_path / "movie.tif", tmp_path / "truth.csv")
    for name in ("movie.h5", "movie.tif", "truth.csv"):
        assert mode(tmp_path / name) == UMASKS[umask], name
    no_leftovers(tmp_path)


def test_every_file_of_an_export_and_of_a_checkpoint_is_readable_as_the_umask_allows(tmp_path, umask):
    # safetensors creates its files 0600 whatever the umask: a model a colleague could not load
    import torch

    from decode_accel.export import export_model
    from decode_accel.models import SigmaMUNet
    from decode_accel.simulation import SimulationConfig
    from decode_accel.training.checkpoint import CheckpointManager

    config = SimulationConfig.model_validate(dict(frame=dict(height=8, width=8)))
    export = export_model(tmp_path / "export", SigmaMUNet.from_preset("tiny"), simulation_config=config)
    checkpoint = CheckpointManager(tmp_path / "ckpt").save_checkpoint(0, torch.nn.Conv2d(1, 2, 3), None, metrics={})
    for folder in (Path(export), Path(checkpoint)):
        files = [f for f in folder.rglob("*") if f.is_file()]
        assert any(f.name == "model.safetensors" for f in files), folder
        for f in files:
            assert mode(f) == UMASKS[umask], f
