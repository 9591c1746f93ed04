"""Recipes and launch configs: a recipe trains end to end in a subprocess; every accelerate config parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.preset=tiny", "simulation.frame.height=16", "simulation.frame.width=16", "data.batch_size=2",
        "data.steps_per_epoch=2", "data.val_samples=4", "training_strategy.epochs=2", "scheduler.warmup_steps=1",
        "monitoring.use_tensorboard=false"]


def run_recipe(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "recipes" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def operating_point(export: Path) -> dict | None:
    return json.loads((export / "decode_accel.json").read_text())["operating_point"]


def test_single_channel_recipe_trains_checkpoints_exports_chooses_its_operating_point_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = run_recipe("single_channel", "--cpu", "--output_dir", str(out), *TINY, "monitoring.plot_every=2",
                      "operating_point.frames=30")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "best val_loss" in proc.stdout
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step-4" in steps  # 2 epochs x 2 updates
    assert (out / "export" / "model.safetensors").exists()
    assert (out / "config.resolved.yaml").exists() and (out / "logs" / "metrics.jsonl").exists()
    assert list((out / "logs").rglob("*.png"))  # curves and predictions plotted at epoch 2
    # the run ends with the operating point, chosen on a tuning movie of the training physics
    point = operating_point(out / "export")
    assert 0 < point["threshold"] <= 1 and "probability_calibration" in point
    assert "training physics" in point["chosen_on"] and "30 frames" in point["chosen_on"]
    assert f"operating point: threshold {point['threshold']:g}" in proc.stdout

    # --resume with one more epoch continues from update 4 to update 6; operating_point.enable=false skips
    # the operating point (the new export has none)
    proc = run_recipe("single_channel", "--cpu", "--resume", "--output_dir", str(out), *TINY,
                      "training_strategy.epochs=3", "operating_point.enable=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "checkpoints" / "step-6").is_dir()
    assert operating_point(out / "export") is None and "operating point: skipped" in proc.stdout


#: run in each process of `accelerate launch`: the recipes' command line, with choose_operating_point
#: recording the process that runs it
DRIVER = """
import json, os, sys
from decode_accel import pipeline

real = pipeline.choose_operating_point

def recording(*args, **kwargs):
    with open(os.environ["TUNED_BY"], "a") as f:
        f.write(os.environ.get("RANK", "?") + "\\n")
    return real(*args, **kwargs)

pipeline.choose_operating_point = recording
from decode_accel.cli import run_from_cli
history = run_from_cli(sys.argv[1:], default_config="single_channel")
with open(os.path.join(os.environ["RESULTS"], "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({"threshold": history["operating_point"]["threshold"], "step": history["global_step"]}, f)
"""


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_accelerate_launch_with_two_processes_only_the_main_one_chooses_the_operating_point(tmp_path):
    driver, out, tuned_by = tmp_path / "driver.py", tmp_path / "run", tmp_path / "tuned_by.txt"
    driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1",
               TUNED_BY=str(tuned_by), RESULTS=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), str(driver), "--cpu", "--output_dir", str(out),
                           *TINY, "operating_point.frames=30"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tuned_by.read_text().split() == ["0"]  # one tuning movie, on the main process
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # both processes trained the same updates and return the operating point the main process stored
    assert r0 == r1 and r0["step"] == 4  # 2 epochs x 2 updates of the global batch
    assert operating_point(out / "export")["threshold"] == r0["threshold"]
    assert proc.stdout.count("operating point: threshold") == 1  # printed once, by the main process


def test_distill_recipe_without_a_teacher_fails_with_one_line_naming_the_flag():
    proc = run_recipe("distill", "--cpu", *TINY, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "--teacher" in last and "distillation.teacher" in last


def test_a_misspelled_override_is_a_one_line_error_with_a_suggestion():
    proc = run_recipe("curriculum", "--cpu", "training_strategy.epoch=3", timeout=120)
    assert proc.returncode == 2
    assert "epochs" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["single_channel", "multi_channel", "distill", "curriculum"])
def test_every_recipe_config_loads_and_validates(name):
    from decode_accel.training.builders import resolve_default_config
    from decode_accel.training.config import load_config

    config = load_config(resolve_default_config(name))
    assert config.training_strategy.epochs >= 1
    if name == "multi_channel":
        assert config.simulation.channels.n_channels == 2 and config.model.architecture == "DoubleMUNet"
    if name == "curriculum":
        assert len(config.curriculum) == 3


@pytest.mark.parametrize("name", ["cpu", "single_gpu", "multi_gpu", "multi_node", "fsdp", "deepspeed_zero2"])
def test_accelerate_config_files_parse_with_accelerates_own_loader(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "accelerate_configs" / f"{name}.yaml"
    assert path.read_text().lstrip().startswith("#")  # each file explains itself
    cfg = load_config_from_file(str(path))
    expected = {"cpu": "NO", "single_gpu": "NO", "multi_gpu": "MULTI_GPU", "multi_node": "MULTI_GPU",
                "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}[name]
    assert str(cfg.distributed_type).endswith(expected)
    if name == "multi_node":
        assert cfg.num_machines == 2 and cfg.num_processes == 8
