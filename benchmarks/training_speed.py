"""Training speed: the trainer on on-the-fly simulation against a plain PyTorch loop, and the data wait.

For each network preset and precision, one child process (Accelerate allows one precision per process)
runs the two side by side, alternating update by update (these machines are noisy; a pair shares the
load of its moment):

* **trainer**: ``build_trainer`` + ``build_loaders`` of scenario (a)
  (recipes/configs/benchmark/a_2d_low_density.yaml) as a user runs it: the simulated stream renders
  each batch while training (inline with the default ``--workers 0``), with every hook the config implies
  (divergence guard, monitor with its phase timers, loss schedules);
* **plain loop**: the ceiling. The same network (same initial weights), loss, optimizer and precision,
  on batches simulated *before* the clock starts and already on the device; forward -> loss ->
  backward -> (clip) -> step -> zero_grad and nothing else.

Reported per row: samples/s of both, the trainer's share of the ceiling (ratio of total times, and the
median of the per-update ratios), the share of the trainer's time spent waiting for the next batch
(the monitor's ``data`` phase: with 0 workers, the whole simulation), and the other phase shares::

    python benchmarks/training_speed.py --json benchmarks/results/training_speed_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from decode_accel.pipeline import write_json  # noqa: E402
from decode_accel.training.builders import (build_loaders, build_loss_from_config, build_model_from_config,  # noqa: E402
                                            optimizer_dict)
from decode_accel.training.config import load_config  # noqa: E402
from decode_accel.training.hooks import Hook  # noqa: E402
from decode_accel.training.monitor import TrainingMonitor  # noqa: E402
from decode_accel.training.settings import build_optimizer  # noqa: E402
from decode_accel.training.trainer import build_trainer  # noqa: E402


def scenario_config(preset: str, *, frame: int, batch: int, workers: int, micro_batches: int, log_dir: Path):
    return load_config(ROOT / "recipes" / "configs" / "benchmark" / "a_2d_low_density.yaml", [
        f"model.preset={preset}", f"simulation.frame.height={frame}", f"simulation.frame.width={frame}",
        f"data.batch_size={batch}", f"data.num_workers={workers}", "data.val_samples=0",
        f"data.steps_per_epoch={micro_batches}", "training_strategy.epochs=1", "training_strategy.accumulate_grad_batches=1",
        "monitoring.use_tensorboard=false", f"monitoring.log_dir={log_dir}", "simulation.emitters.density=0.5"])


class SideBySide(Hook):
    """Times the trainer and a plain PyTorch loop in alternation, one update each, in the same process.

    After each trainer update (``on_step_end``) it runs one plain-loop update on a pre-made batch and
    times it apart; the trainer's time per update is the time from the end of that plain update to the
    trainer's next update end (data, hooks, forward, backward, step: everything the loop does). The
    first ``warmup`` updates of both are not timed. Pairs share the machine's state of the moment, so
    their ratio is robust to the load of a shared machine.
    """

    def __init__(self, plain_step, warmup: int):
        self.plain_step, self.warmup = plain_step, warmup
        self.trainer_seconds: list[float] = []
        self.plain_seconds: list[float] = []
        self.data_seconds = 0.0
        self._mark = None

    @staticmethod
    def _now(trainer) -> float:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_end(self, trainer, losses):
        now = self._now(trainer)
        if trainer.global_step > self.warmup:
            self.trainer_seconds.append(now - self._mark)
        if trainer.global_step == self.warmup:
            trainer.monitor.reset_performance()  # the data-wait clock starts with the timed updates
        start = self._now(trainer)
        self.plain_step(trainer.global_step)
        end = self._now(trainer)
        if trainer.global_step > self.warmup:
            self.plain_seconds.append(end - start)
        self._mark = end

    def on_fit_end(self, trainer, history):
        phases = trainer.monitor.performance_summary(log=False).get("phases", {})
        self.phase_seconds = {name: p["seconds"] for name, p in phases.items()}


def premade_batches(config, n: int, device: torch.device) -> list[dict]:
    """``n`` batches of the training stream, simulated now and moved to the device (not timed)."""
    loader, _ = build_loaders(config.model_copy(update={"data": config.data.model_copy(update={"num_workers": 0})}))
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
            for b in itertools.islice(iter(loader), n)]


def plain_loop(config, batches: list[dict], precision: str, clip: float):
    """One update of the plain PyTorch loop per call, on the pre-made batches (the ceiling)."""
    from accelerate.utils import set_seed
    set_seed(config.training_strategy.seed)  # the trainer's initial weights
    device = batches[0]["frames"].device
    model = build_model_from_config(config).to(device)
    loss_fn = build_loss_from_config(config, model)
    loss_fn = loss_fn.to(device) if isinstance(loss_fn, torch.nn.Module) else loss_fn
    optimizer = build_optimizer(model.parameters(), optimizer_dict(config))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model.train()

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            outputs = model(batch["frames"])
        losses = loss_fn({k: v.float() for k, v in outputs.items()}, batch)
        losses["loss"].backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(preset: str, precision: str, *, frame: int, batch: int, updates: int, warmup: int, workers: int,
            cpu: bool, log_dir: Path) -> dict:
    config = scenario_config(preset, frame=frame, batch=batch, workers=workers, micro_batches=warmup + updates,
                             log_dir=log_dir / f"{preset}_{precision}")
    trainer = build_trainer(config, cpu=cpu, mixed_precision=precision)
    batches = premade_batches(config, min(warmup + updates, 8), trainer.device)
    pacer = SideBySide(plain_loop(config, batches, trainer.accelerator.mixed_precision, trainer.gradient_clip_val),
                       warmup)
    trainer.add_hook(pacer)
    train_loader, _ = build_loaders(config)
    monitor = TrainingMonitor(Path(config.monitoring.log_dir), use_tensorboard=False)
    try:
        trainer.train(train_loader, None, monitor=monitor, save_dir=None)
    finally:
        monitor.close()
    t_trainer, t_plain = sum(pacer.trainer_seconds), sum(pacer.plain_seconds)
    n = len(pacer.trainer_seconds)
    share = {name: pacer.phase_seconds.get(name, 0.0) / t_trainer for name in ("data", "forward", "backward",
                                                                               "optimizer")}
    pairs = [p / t for p, t in zip(pacer.plain_seconds, pacer.trainer_seconds)]
    return {
        "preset": preset, "precision": trainer.accelerator.mixed_precision, "device": str(trainer.device),
        "frame_px": frame, "batch": batch, "workers": workers, "updates_timed": n,
        "params": sum(p.numel() for p in trainer.unwrapped_model.parameters()),
        "plain_samples_per_s": n * batch / t_plain, "trainer_samples_per_s": n * batch / t_trainer,
        "trainer_over_plain": t_plain / t_trainer, "trainer_over_plain_median_pair": statistics.median(pairs),
        "data_wait_share": share["data"], "forward_share": share["forward"], "backward_share": share["backward"],
        "optimizer_share": share["optimizer"],
        "seconds_per_update": {"trainer": pacer.trainer_seconds, "plain": pacer.plain_seconds},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame", type=int, default=40, help="training frame size (px)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--updates", type=int, default=12, help="timed update pairs per fp32 configuration")
    parser.add_argument("--bf16-updates", type=int, default=4, help="timed update pairs per bf16 configuration")
    parser.add_argument("--warmup", type=int, default=2, help="updates before the clocks start")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader workers simulating in parallel (0, the config default: the trainer "
                             "simulates inline and all of it counts as data wait)")
    parser.add_argument("--presets", default="cpu_small,decode")
    parser.add_argument("--precisions", default="no,bf16")
    parser.add_argument("--json", default=None)
    parser.add_argument("--log-dir", default="/tmp/decode_accel_speed")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpu = not torch.cuda.is_available()
    if args.one:  # child process: one configuration (Accelerate allows one precision per process)
        preset, precision = args.one
        updates = args.updates if precision == "no" else args.bf16_updates
        row = measure(preset, precision, frame=args.frame, batch=args.batch, updates=updates, warmup=args.warmup,
                      workers=args.workers, cpu=cpu, log_dir=Path(args.log_dir))
        print("RESULT " + json.dumps(row))
        return 0
    rows = []
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            cmd = [sys.executable, __file__, "--one", preset, precision, "--frame", str(args.frame), "--batch",
                   str(args.batch), "--updates", str(args.updates), "--bf16-updates", str(args.bf16_updates),
                   "--warmup", str(args.warmup), "--workers", str(args.workers),
                   "--log-dir", args.log_dir]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"  {preset}/{precision} failed (exit {proc.returncode})", flush=True)
                continue
            rows.append(json.loads(lines[-1][len("RESULT "):]))
            r = rows[-1]
            print(f"  {preset}/{r['precision']}: plain {r['plain_samples_per_s']:.2f}, trainer "
                  f"{r['trainer_samples_per_s']:.2f} samples/s ({100 * r['trainer_over_plain']:.1f} %), data wait "
                  f"{100 * r['data_wait_share']:.1f} %", flush=True)
    device = rows[0]["device"] if rows else "?"
    print(f"\ntraining speed on {device}, {args.frame}x{args.frame} px frames, batch {args.batch}, "
          f"{args.workers} simulating data worker(s); trainer and plain loop alternate update by update")
    print(f"{'network':<11}{'precision':>10}{'plain loop':>12}{'trainer':>10}{'trainer/plain':>15}{'data wait':>11}"
          f"{'forward':>9}{'backward':>10}{'optim':>7}")
    for r in rows:
        print(f"{r['preset']:<11}{r['precision']:>10}{r['plain_samples_per_s']:>12.2f}{r['trainer_samples_per_s']:>10.2f}"
              f"{100 * r['trainer_over_plain']:>14.1f}%{100 * r['data_wait_share']:>10.1f}%"
              f"{100 * r['forward_share']:>8.0f}%{100 * r['backward_share']:>9.0f}%{100 * r['optimizer_share']:>6.0f}%")
    print("(samples/s; plain loop = same model, batch and precision on pre-made batches already on the device)")
    if args.json:
        write_json({"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "rows": rows}, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
