"""predict() over two Accelerate processes: chunks split, tables merged in frame order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from decode_accel.inference.predict import predict
from tests.test_predict import PX, CentroidOracle, simulate


def _two_process_run():
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from decode_accel.simulation import Camera, CameraConfig
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    folder = os.environ["DECODE_ACCEL_TEST_DIR"]
    accelerator = Accelerator(cpu=True)
    oracle = CentroidOracle()
    table = predict(oracle, f"{folder}/movie.tif", out=f"{folder}/two.csv",
                    camera=Camera(CameraConfig(preset="challenge2016")), px_size_nm=PX, threshold=0.5,
                    chunk_frames=2, batch_size=2, accelerator=accelerator, progress=False)
    with open(f"{folder}/rank{accelerator.process_index}.json", "w") as f:
        json.dump({"frames_seen": oracle.calls, "rows": len(table), "processes": accelerator.num_processes}, f)


def test_two_processes_split_the_frames_and_write_the_same_table_as_one(tmp_path):
    path, _, camera = simulate(tmp_path, n_frames=10, height=24, width=24)
    single = predict(CentroidOracle(), path, out=tmp_path / "one.csv", camera=camera, px_size_nm=PX,
                     threshold=0.5, chunk_frames=2, batch_size=2, progress=False)
    # a fresh interpreter: forking ranks from a pytest process whose torch thread pool has run can deadlock
    code = ("from accelerate import debug_launcher; from tests.test_predict_multiprocess import _two_process_run; "
            "debug_launcher(_two_process_run, num_processes=2)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DECODE_ACCEL_TEST_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["processes"] for r in ranks] == [2, 2]
    # 5 chunks of 2 frames: one process gets 3 chunks, the other 2, none is analysed twice
    assert sorted(r["frames_seen"] for r in ranks) == [4, 6]
    assert all(r["rows"] == len(single) for r in ranks)  # every process returns the merged table
    one, two = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv")
    pd.testing.assert_frame_equal(one, two)
    assert np.all(np.diff(two["frame"]) >= 0)
