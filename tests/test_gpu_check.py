"""benchmarks/gpu_check.sh --dry-run: the GPU check's code paths on the CPU in tiny sizes (issue 15.3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_measures_every_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["meta"]["dry_run"] and result["meta"]["device"] == "cpu"
    steps = result["steps"]
    assert not [s for s in steps if "error" in s or s["step"] == "skipped"], steps
    train = [s for s in steps if s["step"] == "train"]
    assert train and all(s["ceiling_samples_s"] > 0 and 0 <= s["data_wait_share"] <= 1 for s in train)
    pred = [s for s in steps if s["step"] == "predict"]
    assert [s["size"] for s in pred] == [32, 64] and all(s["fps"] > 0 for s in pred)
    assert (tmp_path / "gpu_check.log").read_text().strip()
