"""TrainingMonitor: JSONL + TensorBoard logs, PNG plots, timers, anomaly detection."""

import json
import logging
import time

import pytest
import torch

from decode_accel.training.monitor import TrainingMonitor


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def tiny_net():
    from decode_accel.models import SigmaMUNet
    torch.manual_seed(0)
    return SigmaMUNet(features=4, depth=1)


def tiny_batch(b=2, h=16, w=16):
    g = torch.Generator().manual_seed(1)
    frames = 100.0 + 10.0 * torch.rand(b, 1, 3, h, w, generator=g)
    xyz = torch.tensor([[[3.5, 4.5, 0.0], [10.2, 12.7, 100.0]]]).repeat(b, 1, 1)
    return {"frames": frames, "tgt_xyz": xyz, "tgt_mask": torch.tensor([[True, False]]).repeat(b, 1),
            "tgt_photons": torch.full((b, 2), 1000.0), "bg": torch.full((b, 1, h, w), 100.0)}


def test_every_log_call_becomes_one_json_line_and_tensorboard_events_are_written(tmp_path):
    with TrainingMonitor(tmp_path, use_tensorboard=True, wandb_config={"model": {"features": 8}, "lr": 1e-3}) as mon:
        for step in range(3):
            mon.log_batch_metrics(epoch=0, batch_idx=step, metrics={"train_loss": torch.tensor(1.0 / (step + 1)),
                                                                      "learning_rate": 1e-3})
        mon.log_epoch_metrics(0, {"loss": 0.5}, {"loss": 0.7, "jaccard": 0.4})
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["kind"] for r in lines] == ["batch", "batch", "batch", "epoch"]
    assert [r["step"] for r in lines[:3]] == [0, 1, 2]
    assert lines[2]["train_loss"] == pytest.approx(1 / 3)
    assert lines[3]["train_loss"] == 0.5 and lines[3]["val_loss"] == 0.7 and lines[3]["val_jaccard"] == 0.4
    events = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with TrainingMonitor(tmp_path) as mon:
        for step, loss in enumerate([3.0, 2.0, 1.5]):
            mon.log_batch_metrics(0, step, {"train_loss": loss}, step=10 * step)
    run_dir = tmp_path / "tensorboard" / "train"
    acc = EventAccumulator(str(run_dir)).Reload()
    scalars = acc.Scalars("train_loss")
    assert [(s.step, s.value) for s in scalars] == [(0, 3.0), (10, 2.0), (20, 1.5)]


def test_epoch_summary_with_a_model_reports_gradient_and_weight_norms(tmp_path):
    model = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))
    model.weight.grad = torch.tensor([[0.0, 0.0, 6.0], [8.0, 0.0, 0.0]])
    with TrainingMonitor(tmp_path, use_tensorboard=False) as mon:
        record = mon.log_epoch_metrics(1, {"loss": 1.0}, None, model=model)
    assert record["weight_norm"] == pytest.approx(5.0)  # sqrt(3² + 4²)
    assert record["grad_norm"] == pytest.approx(10.0)   # sqrt(6² + 8²)


def test_nan_and_spike_are_flagged_in_the_log(tmp_path, caplog):
    with TrainingMonitor(tmp_path, use_tensorboard=False) as mon, caplog.at_level(logging.WARNING):
        for step in range(8):
            mon.log_batch_metrics(0, step, {"train_loss": 1.0 + 0.01 * step})
        spike = mon.log_batch_metrics(0, 8, {"train_loss": 50.0})
        normal = mon.log_batch_metrics(0, 9, {"train_loss": 1.1})
        nan = mon.log_batch_metrics(0, 10, {"train_loss": float("nan")})
    assert [a["type"] for a in spike] == ["spike"] and normal == []
    assert [a["type"] for a in nan] == ["non_finite"]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    anomalies = [r for r in records if r["kind"] == "anomaly"]
    assert [(a["type"], a["step"]) for a in anomalies] == [("spike", 8), ("non_finite", 10)]
    assert [r for r in records if r["kind"] == "batch"][-1]["train_loss"] == "nan"  # strict JSON
    assert sum("anomaly" in m for m in caplog.messages) == 2


def test_constant_output_map_is_flagged_as_dead(tmp_path):
    mon = TrainingMonitor(tmp_path, use_tensorboard=False, use_jsonl=False)
    found = mon.check_anomalies({}, step=3, output={"p": torch.zeros(2, 4, 4), "photons": torch.rand(2, 4, 4),
                                                    "bg": torch.full((2, 1, 4, 4), 7.0)})
    assert sorted(a["metric"] for a in found) == ["bg", "p"]
    mon.close()


def test_plots_are_written_as_png(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    model, batch = tiny_net(), tiny_batch()
    with TrainingMonitor(tmp_path) as mon:
        for step in range(4):
            mon.log_batch_metrics(0, step, {"train_loss": 2.0 - 0.1 * step, "learning_rate": 1e-3})
        mon.log_epoch_metrics(0, {"loss": 1.8}, {"loss": 1.9, "jaccard": 0.1})
        curves = mon.plot_training_curves()
        preds = mon.plot_model_predictions(model, [batch], step=4)
    png = b"\x89PNG\r\n\x1a\n"
    assert curves.read_bytes()[:8] == png and preds.read_bytes()[:8] == png
    assert curves.parent == tmp_path / "plots" and model.training  # the model's mode is restored
    images = EventAccumulator(str(tmp_path / "tensorboard" / "train")).Reload().Images("predictions")
    assert [i.step for i in images] == [4]


def test_prediction_plot_uses_the_given_postprocessing_in_pixel_units(tmp_path):
    import pandas as pd
    calls = []

    def postprocess(output, frame_offset, px_size):
        calls.append((frame_offset, px_size, output["p"].shape))
        return pd.DataFrame({"frame": [0], "x": [4.0], "y": [5.0], "z": [0.0], "photons": [1.0]})

    with TrainingMonitor(tmp_path, use_tensorboard=False) as mon:
        path = mon.plot_model_predictions(tiny_net(), tiny_batch(), postprocess=postprocess,
                                          path=tmp_path / "p.png")
    assert path.exists() and calls == [(0, 1.0, (1, 16, 16))]


def test_timers_report_each_phase_share_and_samples_per_second(tmp_path):
    mon = TrainingMonitor(tmp_path, use_tensorboard=False)
    for _ in range(2):
        with mon.timer("forward"):
            time.sleep(0.05)
        with mon.timer("backward"):
            time.sleep(0.02)
        mon.add_samples(8)
    summary = mon.performance_summary()
    mon.close()
    phases = summary["phases"]
    assert phases["forward"]["calls"] == 2 and phases["forward"]["seconds"] >= 0.1
    assert phases["forward"]["seconds"] > phases["backward"]["seconds"] >= 0.04
    assert 0 < phases["forward"]["share"] + phases["backward"]["share"] <= 1.0 + 1e-9
    assert summary["samples"] == 16
    assert summary["samples_per_second"] == pytest.approx(16 / summary["wall_seconds"])
    assert summary["peak_rss_mib"] > 10  # a python process with torch loaded holds far more than 10 MiB
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["kind"] == "performance"


def test_other_processes_write_nothing_of_what_the_main_process_writes(tmp_path):
    written = {}
    for rank in (0, 1):
        mon = TrainingMonitor(tmp_path / f"rank{rank}", use_tensorboard=True, is_main_process=rank == 0)
        mon.log_batch_metrics(0, 0, {"train_loss": 1.0})
        mon.log_epoch_metrics(0, {"loss": 1.0}, {"loss": 1.0})
        mon.log_event("divergence", step=0)
        mon.close()
        folder = tmp_path / f"rank{rank}"
        written[rank] = sorted(p.relative_to(folder).parts[0] for p in folder.rglob("*")) if folder.exists() else []
    # the same calls on the main process write the JSON lines and the TensorBoard events
    assert {"metrics.jsonl", "tensorboard"} <= set(written[0])
    assert [r["kind"] for r in read_jsonl(tmp_path / "rank0" / "metrics.jsonl")] == ["batch", "epoch", "divergence"]
    assert written[1] == [] and not (tmp_path / "rank1").exists()


def test_wandb_offline_writes_its_run_under_log_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    with TrainingMonitor(tmp_path, use_tensorboard=False, use_wandb=True, wandb_project="unit",
                         wandb_config={"a": {"b": 1}}) as mon:
        mon.log_batch_metrics(0, 0, {"train_loss": 1.0})
    runs = list((tmp_path / "wandb").rglob("*.wandb"))
    assert runs, list((tmp_path / "wandb").rglob("*"))
