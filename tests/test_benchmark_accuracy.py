"""The accuracy benchmark and the demo keep working.

Their tiny budgets train for a handful of updates, so the network's own figures mean nothing there and
are not asserted. What the tiny run can guarantee is checked instead: an oracle (the truth scored against
itself) gets a perfect score through the same evaluation, the figures reported for the network are
those of the table the run wrote, and the Picasso baseline, a classical fitter that does not train,
finds the molecules of the 2D movie as well as it does on every machine.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def test_accuracy_benchmark_runs_end_to_end_in_tiny_mode_and_writes_its_table(tmp_path):
    out_json = tmp_path / "accuracy.json"
    proc = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--budget", "tiny", "--scenarios", "a,d_low",
                           "--out", str(tmp_path / "runs"), "--json", str(out_json)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scenario a: a_2d_low_density" in proc.stdout and "JI" in proc.stdout
    results = json.loads(out_json.read_text())["results"]
    a, d = results["a"], results["d_low"]
    # held-out movies use seeds the training stream never draws, tuning and test movies differ
    assert a["test_seed"] != a["tuning_seed"] and a["test_seed"] >= 7_000_000_000
    for key in ("jaccard", "recall", "precision", "eff_lat"):
        assert key in a["decode_accel"]["all"] and key in a["decode_accel"]["bright"]
    assert isinstance(a["picasso"], dict) and 0 <= a["picasso"]["all"]["jaccard"] <= 1
    assert (tmp_path / "runs" / "tiny" / "a_2d_low_density" / "learning_curve.png").stat().st_size > 0
    check_what_a_tiny_run_guarantees(tmp_path / "runs" / "tiny", results)


def check_what_a_tiny_run_guarantees(runs: Path, results: dict) -> None:
    from decode_accel.evaluation import evaluate
    from decode_accel.io import read_table

    for key, folder in (("a", "a_2d_low_density"), ("d_low", "d_two_channel_low_density")):
        result = results[key]
        truth = read_table(runs / folder / "test_truth.csv")
        ours = read_table(runs / folder / "test_locs.csv")
        assert len(truth) == result["test_true_emitter_frames"] > 10  # the test movie holds molecules
        # oracle: the truth as a localization table is found exactly, one to one
        oracle = evaluate(truth, truth, px_size_nm=100.0)
        assert oracle["jaccard"] == 1.0 and oracle["tp"] == len(truth) and oracle["rmse_lat"] == 0.0
        # the reported figures are those of the table the run wrote (whatever the tiny network found)
        again = evaluate(truth, ours, px_size_nm=100.0)
        reported = result["decode_accel"]["all"]
        assert (reported["n_gt"], reported["n_pred"], reported["tp"]) == (len(truth), len(ours), again["tp"])
        assert reported["jaccard"] == again["jaccard"]
    # two channels: the oracle's colours, assigned with the scenario's dye table, are all right (the tiny
    # network's crosstalk exists only when it matched a molecule, which a handful of updates may not do)
    from decode_accel.training.config import load_config

    truth = read_table(runs / "d_two_channel_low_density" / "test_truth.csv")
    dyes = load_config(runs / "d_two_channel_low_density" / "config.resolved.yaml").simulation.channels.dyes
    dye_table = [{"ratio": d.ratio_mean, "ratio_sd": d.ratio_sd, "prob": d.probability} for d in dyes]
    oracle = evaluate(truth, truth, px_size_nm=100.0, dye_table=dye_table)
    assert oracle["crosstalk"] == 0.0 and set(truth["color"]) <= set(range(len(dyes)))
    picasso = results["a"]["picasso"]
    if isinstance(picasso, dict):  # Picasso is optional; on these fixed seeds it found 26 of 44, none false
        assert picasso["all"]["jaccard"] > 0.4 and picasso["all"]["precision"] > 0.8
        assert picasso["all"]["rmse_lat"] < 50.0  # a half-pixel convention error would add ~70 nm


def test_demo_trains_predicts_and_prints_the_metrics_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "decode_accel.cli", "demo", "--out", str(tmp_path), "--updates",
                           "100", "--test-frames", "4", "model.preset=tiny", "simulation.frame.height=16",
                           "simulation.frame.width=16", "data.val_samples=4", "data.batch_size=2",
                           "data.num_workers=0"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[3/3]" in proc.stdout and "JI" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "jaccard" in metrics["assess"]["all"]
    assert (tmp_path / "held_out_locs.csv").read_text().startswith('"id","frame"')


def test_training_speed_benchmark_reports_samples_per_second_and_the_data_wait(tmp_path):
    out_json = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "benchmarks/training_speed.py", "--presets", "tiny", "--precisions", "no",
                           "--updates", "2", "--frame", "16", "--batch", "2", "--workers", "0", "--json",
                           str(out_json), "--log-dir", str(tmp_path / "logs")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out_json.read_text())["rows"]
    assert row["trainer_samples_per_s"] > 0 and row["plain_samples_per_s"] > 0 and 0 <= row["data_wait_share"] <= 1
    assert row["updates_timed"] == len(row["seconds_per_update"]["trainer"]) == len(row["seconds_per_update"]["plain"])
    assert row["params"] == 61_618  # the tiny preset


def test_a_second_run_with_reuse_models_evaluates_the_same_weights_without_training_again(tmp_path):
    args = [sys.executable, "benchmarks/accuracy.py", "--budget", "tiny", "--scenarios", "a", "--no-picasso",
            "--out", str(tmp_path / "runs")]
    first = subprocess.run(args + ["--json", str(tmp_path / "1.json")], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    from safetensors.torch import load_file

    weights = next((tmp_path / "runs" / "tiny" / "a_2d_low_density" / "export").glob("*.safetensors"))
    before = load_file(weights)
    second = subprocess.run(args + ["--reuse-models", "--json", str(tmp_path / "2.json")], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing the model trained earlier" in second.stdout and "training SigmaMUNet" not in second.stderr
    after = load_file(weights)  # the export is rewritten with the new operating point: same tensors
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    one, two = (json.loads((tmp_path / f"{k}.json").read_text())["results"]["a"] for k in (1, 2))
    assert two["train_updates"] == one["train_updates"]
    assert two["decode_accel"]["all"]["jaccard"] == one["decode_accel"]["all"]["jaccard"]
    # another config under the same folder is refused rather than silently evaluated
    third = subprocess.run(args + ["--reuse-models", "data.batch_size=2"], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=900)
    assert third.returncode != 0 and "another config" in third.stderr


def test_a_model_is_reused_only_if_its_config_differs_in_nothing_but_fields_added_at_their_default():
    from decode_accel.pipeline import config_changes
    from decode_accel.training.config import load_config

    config = load_config(None, ["optimizer.lr=0.002"])
    stored = config.model_dump(mode="json")
    del stored["model"]["variance_input"]  # a run from before these fields existed trained as their defaults do
    del stored["data"]["val_samples"]
    assert config_changes(stored, config) == []
    assert config_changes(stored, load_config(None, ["optimizer.lr=0.002", "data.val_samples=7"])) \
        == ["data.val_samples"]
    assert config_changes(stored, load_config(None, ["optimizer.lr=0.001"])) == ["optimizer.lr"]
    stored["operating_point"]["frames"] = 7
    assert config_changes(stored, config) == ["operating_point.frames"]
    assert config_changes(stored, config, ignore=("operating_point",)) == []


def test_the_standard_error_from_frame_blocks_matches_that_of_gaussian_errors():
    # the RMSE of N Gaussian errors has a relative standard error of 1 / sqrt(2 N): the spread over ten
    # frame blocks must find it (within the factor its own ten-sample estimate allows)
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy
    from decode_accel import pipeline
    from decode_accel.training.config import load_config

    sim = pipeline.test_simulation(load_config(ROOT / "recipes/configs/benchmark/a_2d_low_density.yaml").simulation)
    rng = np.random.default_rng(3)
    n_frames, per_frame = 400, 5
    truth = pd.DataFrame({"frame": np.repeat(np.arange(n_frames), per_frame),
                          "x": rng.uniform(500, 5900, n_frames * per_frame),
                          "y": rng.uniform(500, 5900, n_frames * per_frame), "z": 0.0, "photons": 2000.0})
    found = truth.copy()
    found[["x", "y"]] += rng.normal(0.0, 12.0, (len(found), 2))  # nm
    movie = pipeline.HeldOutMovie(tiff=Path("unused.tif"), truth=truth, bg_per_frame=np.full(n_frames, 30.0),
                                  seed=0, n_frames=n_frames, height=64, width=64)
    whole = pipeline.evaluate_table(found, movie, sim)["bright"]
    spread = accuracy.block_spread(found, movie, sim)
    for ax in "xy":
        blocks = spread[f"rmse_over_crlb_{ax}"]
        assert len(blocks["blocks"]) == accuracy.N_BLOCKS
        expected = whole[f"rmse_over_crlb_{ax}"] / np.sqrt(2 * len(truth))
        assert 0.4 * expected < blocks["standard_error"] < 2.5 * expected, (ax, blocks["standard_error"], expected)
        assert abs(spread[f"bias_{ax}"]["standard_error"] - 12.0 / np.sqrt(len(truth))) < 0.6 * 12.0 / np.sqrt(len(truth))
