"""Training speed: samples/s of the DECODE-size and the CPU network, fp32 vs bf16, and the data wait.

Each configuration trains a few optimizer updates on the on-the-fly simulated stream of scenario (a)
(recipes/configs/benchmark/a_2d_low_density.yaml) through the real trainer, after one warm-up update,
and reads the monitor's phase timers: the share of wall time spent waiting for the next batch tells
whether the simulator keeps up with the network. All configurations run in one process, side by side,
because these machines are noisy: compare the ratios.

    python benchmarks/training_speed.py --json benchmarks/results/training_speed.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from decode_accel.pipeline import write_json  # noqa: E402
from decode_accel.training.builders import build_loaders, build_trainer  # noqa: E402
from decode_accel.training.config import load_config  # noqa: E402
from decode_accel.training.monitor import TrainingMonitor  # noqa: E402


def measure(preset: str, precision: str, *, frame: int, batch: int, updates: int, workers: int, cpu: bool,
            log_dir: Path) -> dict:
    config = load_config(ROOT / "recipes" / "configs" / "benchmark" / "a_2d_low_density.yaml", [
        f"model.preset={preset}", f"simulation.frame.height={frame}", f"simulation.frame.width={frame}",
        f"data.batch_size={batch}", f"data.num_workers={workers}", "data.val_samples=0",
        f"data.steps_per_epoch={updates + 1}", "training_strategy.epochs=1", "monitoring.use_tensorboard=false",
        "simulation.emitters.density=0.5"])
    trainer = build_trainer(config, cpu=cpu, mixed_precision=precision)
    train_loader, _ = build_loaders(config)
    iterator_warm = {"done": False}

    class _Monitor(TrainingMonitor):
        """Starts the clock after the first (warm-up) update."""

        def log_batch_metrics(self, epoch, batch_idx, metrics, step=None):
            if not iterator_warm["done"]:
                iterator_warm["done"] = True
                self.reset_performance()
            return super().log_batch_metrics(epoch, batch_idx, metrics, step)

    monitor = _Monitor(log_dir / f"{preset}_{precision}", use_tensorboard=False)
    t0 = time.perf_counter()
    trainer.train(train_loader, None, monitor=monitor, log_every=1, **{k: v for k, v in trainer.fit_kwargs.items()
                                                                      if k not in ("save_dir", "log_every")})
    wall = time.perf_counter() - t0
    perf = monitor.performance_summary(log=False)
    monitor.close()
    phases = perf.get("phases", {})
    timed_updates = max(1, updates)
    return {
        "preset": preset, "precision": trainer.accelerator.mixed_precision, "device": str(trainer.accelerator.device),
        "frame_px": frame, "batch": batch, "workers": workers, "updates_timed": timed_updates,
        "params": sum(p.numel() for p in trainer.unwrapped_model.parameters()),
        "samples_per_s": timed_updates * batch / max(perf["wall_seconds"], 1e-9),
        "data_wait_share": phases.get("data", {}).get("share", float("nan")),
        "forward_share": phases.get("forward", {}).get("share", float("nan")),
        "backward_share": phases.get("backward", {}).get("share", float("nan")),
        "optimizer_share": phases.get("optimizer", {}).get("share", float("nan")),
        "peak_rss_mib": perf.get("peak_rss_mib"), "cuda_max_allocated_mib": perf.get("cuda_max_allocated_mib"),
        "wall_seconds_total": wall,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame", type=int, default=40, help="training frame size (px)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--updates", type=int, default=6, help="timed updates per fp32 configuration")
    parser.add_argument("--bf16-updates", type=int, default=2, help="timed updates per bf16 configuration (slow on CPU)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers simulating in parallel")
    parser.add_argument("--presets", default="decode,cpu_small")
    parser.add_argument("--precisions", default="no,bf16")
    parser.add_argument("--json", default=None)
    parser.add_argument("--log-dir", default="/tmp/decode_accel_speed")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpu = not torch.cuda.is_available()
    if args.one:  # child process: one configuration (Accelerate allows one precision per process)
        preset, precision = args.one
        updates = args.updates if precision == "no" else args.bf16_updates
        row = measure(preset, precision, frame=args.frame, batch=args.batch, updates=updates, workers=args.workers,
                      cpu=cpu, log_dir=Path(args.log_dir))
        print("RESULT " + json.dumps(row))
        return 0
    rows = []
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            cmd = [sys.executable, __file__, "--one", preset, precision, "--frame", str(args.frame), "--batch",
                   str(args.batch), "--updates", str(args.updates), "--bf16-updates", str(args.bf16_updates),
                   "--workers", str(args.workers), "--log-dir", args.log_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"  {preset}/{precision} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            rows.append(json.loads(lines[-1][len("RESULT "):]))
            r = rows[-1]
            print(f"  measured {preset}/{r['precision']}: {r['samples_per_s']:.1f} samples/s", flush=True)
    device = rows[0]["device"] if rows else "?"
    print(f"\ntraining speed on {device}, {args.frame}x{args.frame} px frames, batch {args.batch}, "
          f"{args.workers} data worker(s)")
    print(f"{'network':<11}{'params':>10}{'precision':>11}{'samples/s':>11}{'data wait':>11}{'forward':>9}"
          f"{'backward':>10}{'optim':>7}{'peak RSS MiB':>14}")
    for r in rows:
        print(f"{r['preset']:<11}{r['params']:>10,}{r['precision']:>11}{r['samples_per_s']:>11.1f}"
              f"{100 * r['data_wait_share']:>10.0f}%{100 * r['forward_share']:>8.0f}%{100 * r['backward_share']:>9.0f}%"
              f"{100 * r['optimizer_share']:>6.0f}%{r['peak_rss_mib']:>14.0f}")
    if args.json:
        write_json({"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "rows": rows}, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
