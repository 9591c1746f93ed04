"""benchmarks/training_speed.py keeps working: the trainer and the plain loop alternate, and every figure is there."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("training_speed", ROOT / "benchmarks" / "training_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_training_speed_benchmark_times_the_trainer_beside_a_plain_loop(tmp_path):
    torch.set_num_threads(1)
    row = _benchmark().measure("tiny", "no", frame=16, batch=2, updates=3, warmup=1, workers=0, cpu=True,
                               log_dir=tmp_path)
    assert row["updates_timed"] == 3 and len(row["seconds_per_update"]["plain"]) == 3
    assert row["plain_samples_per_s"] > 0 and row["trainer_samples_per_s"] > 0
    assert math.isclose(row["trainer_over_plain"], row["trainer_samples_per_s"] / row["plain_samples_per_s"])
    # the shares are parts of the trainer's own time (data includes the inline simulation)
    shares = [row[k] for k in ("data_wait_share", "forward_share", "backward_share", "optimizer_share")]
    assert all(0.0 < s < 1.0 for s in shares) and sum(shares) <= 1.0
