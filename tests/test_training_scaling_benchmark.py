"""benchmarks/training_scaling.py keeps working: 1 and 2 processes side by side, on disjoint samples.

Runs the whole scaling mode in a tiny size (tiny preset, 16 x 16 px, batch 2 per process, 2 timed updates):
each configuration in fresh processes, the 2-process one under ``accelerate launch``. The facts checked do
not come from the benchmark's own bookkeeping alone: the stream's documented sharding (data/stream.py: with
clips_per_call K = batch, rank r of W takes chunks r, r + W, ...) fixes which global sample indices each rank
must have trained on, and the first batches' frames must differ between ranks and equal the 1-process run's
first batch on rank 0 (sample g is the same whoever simulates it).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from decode_accel.errors import DecodeAccelError

ROOT = Path(__file__).resolve().parents[1]


def test_the_scaling_benchmark_runs_one_and_two_processes_on_disjoint_samples(tmp_path):
    out = tmp_path / "scaling.json"
    batch, updates, warmup = 2, 2, 1
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training_scaling.py"), "--preset", "tiny",
                           "--frame", "16", "--batch", str(batch), "--updates", str(updates), "--warmup",
                           str(warmup), "--repeats", "1", "--work-dir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scaling efficiency, baseline 2 x (1 process x 1 thread)" in proc.stdout
    data = json.loads(out.read_text())
    runs = {r["configuration"]: r for r in data["runs"]}
    assert sorted(runs) == ["1p x 1t", "1p x 2t", "2p x 1t"]
    for name, processes, threads in (("1p x 1t", 1, 1), ("1p x 2t", 1, 2), ("2p x 1t", 2, 1)):
        r = runs[name]
        assert r["processes"] == processes and r["threads_seen"] == [threads] * processes
        assert r["updates_timed"] == updates and r["samples_timed"] == updates * batch * processes
        assert r["samples_per_s"] > 0 and r["samples_per_cpu_second"] > 0
        assert math.isclose(r["cores_used"], r["cpu_seconds"] / r["timed_seconds"])
        assert all(len(u) == updates for u in r["update_seconds_per_rank"])
    two = runs["2p x 1t"]
    assert two["distributed_type"] == "DistributedType.MULTI_CPU"  # one process group, not two copies
    # the stream's sharding: chunk q = batch samples q*batch .. ; rank r takes chunks r, r + 2, r + 4, ...
    assert two["first_samples_per_rank"] == [list(range(0, batch)), list(range(batch, 2 * batch))]
    assert two["samples_disjoint"] and two["shared_sample_indices"] == 0
    fingerprints = two["first_batch_sha256"]
    assert fingerprints[0] != fingerprints[1]
    assert runs["1p x 1t"]["first_batch_sha256"] == [fingerprints[0]]  # sample g is g whoever simulates it
    s = data["summary"]
    med = s["median_samples_per_s"]
    assert math.isclose(s["efficiency_vs_2x_one_process_one_thread"], med["2p x 1t"] / (2 * med["1p x 1t"]))
    assert math.isclose(s["efficiency_vs_one_process_two_threads"], med["2p x 1t"] / med["1p x 2t"])


def test_two_independent_trainings_are_not_counted_as_two_processes():
    """The check the benchmark makes on each 2-process run fails on two copies of a 1-process training."""
    spec = importlib.util.spec_from_file_location("training_scaling", ROOT / "benchmarks" / "training_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    copy = {"rank": 0, "world_size": 1, "sample_indices": [0, 1, 2, 3], "first_batch_sha256": "ab"}
    with pytest.raises(DecodeAccelError, match="one group of 2"):
        module.check_disjoint([copy, dict(copy)], 2)
    shared = [dict(copy, world_size=2), dict(copy, rank=1, world_size=2, sample_indices=[3, 4],
                                              first_batch_sha256="cd")]
    with pytest.raises(DecodeAccelError, match="1 sample indices in common"):
        module.check_disjoint(shared, 2)
    ok = [dict(copy, world_size=2), dict(copy, rank=1, world_size=2, sample_indices=[4, 5], first_batch_sha256="cd")]
    assert module.check_disjoint(ok, 2)["samples_disjoint"]
