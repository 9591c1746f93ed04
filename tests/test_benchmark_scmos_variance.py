"""benchmarks/scmos_variance_input.py: its chip is the same for the same seed and has the heavy tail it
claims, and the tiny budget runs end to end (training both models, the held-out ROI movie, the table
and JSON); the tiny run's numbers mean nothing and are not asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
sys.path.insert(0, str(ROOT / "benchmarks"))

import scmos_variance_input as bench  # noqa: E402


def test_the_chip_is_built_from_its_seed_with_a_few_percent_of_hot_pixels():
    a, b = bench.make_chip_maps(14), bench.make_chip_maps(14)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["variance_adu2"], bench.make_chip_maps(15)["variance_adu2"])
    var = bench.variance_photons2(a, qe=0.8)
    median = np.median(var)
    hot = var >= bench.HOT_FACTOR * median
    assert 0.025 < hot.mean() < 0.035
    assert 60 < var.max() / median < 130  # the tail reaches ~100x the median (gain spread aside)
    # photons²: ADU² (e-/ADU)² / QE² = e-² / QE²: the body's median is 2 e-² / 0.64
    assert abs(median - 2.0 / 0.64) < 0.1


def test_tiny_budget_runs_end_to_end_and_writes_its_table(tmp_path):
    out_json = tmp_path / "scmos.json"
    proc = subprocess.run([sys.executable, "benchmarks/scmos_variance_input.py", "--budget", "tiny",
                           "--out", str(tmp_path / "runs"), "--json", str(out_json)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "false positives on hot pixels" in proc.stdout
    data = json.loads(out_json.read_text())
    res = data["results"]
    assert res["with"]["variance_input"] is True and res["without"]["variance_input"] is False
    assert res["with"]["train_updates"] == res["without"]["train_updates"] > 0
    assert data["test"]["seed"] >= 7_000_000_000 and data["test"]["size"] == [32, 32]
    for name in ("with", "without"):
        for key in ("jaccard", "precision", "recall", "rmse_x", "rmse_y"):
            assert key in res[name]["all"]
        assert {"fp_on_hot", "fp_per_hot_pixel_frame", "rmse_lat_near_hot"} <= set(res[name]["hot_pixels"])
    meta = json.loads((tmp_path / "runs" / "tiny" / "with" / "export" / "decode_accel.json").read_text())
    assert meta["variance_input"] is True
    meta = json.loads((tmp_path / "runs" / "tiny" / "without" / "export" / "decode_accel.json").read_text())
    assert meta["variance_input"] is False
