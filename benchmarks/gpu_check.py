"""One-shot GPU check (issue 15.3), driven by ``benchmarks/gpu_check.sh``; ``--dry-run`` runs the same code
paths on the CPU in tiny sizes (the default test suite runs that).

Measures, each step timed and kept short, results appended to ``<out>/gpu_check.json`` after every step
(so a run cut short still leaves what it measured), log lines to stdout:

1. training samples/s of the DECODE-size SigmaMUNet (bf16 autocast on a GPU) at 40² and 64², plain,
   channels-last and ``torch.compile``, on pre-made batches (the ceiling) and with the simulator on the
   device feeding whole batches (``create_dataloader(sim_device=..., whole_batches=True)``): the share
   of step time spent waiting for data;
2. ``predict`` frames/s at 256² and 2048² (feature caching, bf16), with the batch size halved on
   out-of-memory until it fits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from decode_accel.io import to_json_data, write_json  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Results:
    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {"meta": meta, "steps": []}
        self.write()

    def add(self, entry: dict) -> None:
        self.data["steps"].append(entry)
        self.write()
        log(json.dumps(to_json_data(entry)))

    def write(self) -> None:
        write_json(self.data, self.path, indent=1)


def sim_config(size: int):
    from decode_accel.simulation import SimulationConfig

    return SimulationConfig(frame=dict(height=size, width=size, px_size=100.0),
                            emitters=dict(density=1.0, photons_mean=4000.0, photons_sd=1000.0, z_range=(0.0, 0.0)),
                            psf=dict(kind="gaussian", sigma=1.0), background=dict(uniform=(20.0, 50.0)),
                            camera=dict(preset="challenge2016"))


def make_net(preset: str, device, channels_last: bool):
    from decode_accel.models import Scaling, SigmaMUNet

    net = SigmaMUNet.from_preset(preset, scaling=Scaling.auto(4000.0, 1000.0, 0.0, (20.0, 50.0)), z_enabled=False)
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def train_speed(size: int, batch: int, steps: int, *, preset: str, device, dtype, compile_: bool, channels_last: bool,
                on_device_data: bool) -> dict:
    """Samples/s of forward + backward + AdamW on pre-made batches and with the simulator feeding the steps."""
    from decode_accel.data import create_dataloader
    from decode_accel.loss.gaussian_mm import GaussianMMLoss

    net = make_net(preset, device, channels_last)
    loss_fn = GaussianMMLoss(scaling=net.scaling, z_enabled=False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    model = torch.compile(net) if compile_ else net
    sim_dev = str(device) if on_device_data else "cpu"
    loader = create_dataloader(None, {"batch_size": batch, "seed": 1, "sim_device": sim_dev, "whole_batches": True},
                               "train", simulation_config=sim_config(size))
    it = iter(loader)

    def to_dev(b):
        return {k: v.to(device, non_blocking=True) for k, v in b.items()}

    def step(b):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(b["frames"])
            loss = loss_fn(out, b)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fixed = to_dev(next(it))
    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (compilation, cuDNN autotuning)
        step(fixed)
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step(fixed)
    sync(device)
    ceiling = steps * batch / (time.perf_counter() - t0)
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        tw = time.perf_counter()
        b = to_dev(next(it))
        sync(device)
        wait += time.perf_counter() - tw
        step(b)
    sync(device)
    total = time.perf_counter() - t0
    return {"step": "train", "size": size, "batch": batch, "preset": preset, "precision": str(dtype),
            "compile": compile_, "channels_last": channels_last, "sim_device": sim_dev,
            "ceiling_samples_s": ceiling, "with_simulator_samples_s": steps * batch / total,
            "data_wait_share": wait / total, "warmup_s": warm}


def predict_speed(size: int, frames: int, *, preset: str, device, precision: str, batch: int | None) -> dict:
    """predict frames/s on a movie in memory; the batch is halved on out-of-memory until it fits."""
    from decode_accel.inference.predict import predict
    from decode_accel.simulation import Camera, CameraConfig

    net = make_net(preset, device, False).eval()
    movie = np.random.default_rng(0).integers(100, 160, (frames, size, size)).astype(np.uint16)
    cam = Camera(CameraConfig(preset="challenge2016"))
    kw = dict(camera=cam, px_size_nm=100.0, device=device, mixed_precision=precision, progress=False,
              tile_size=None if size <= 2048 else 512)
    while True:
        try:
            predict(net, movie[:min(frames, 4)], batch_size=batch, **kw)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            table = predict(net, movie, batch_size=batch, **kw)
            sync(device)
            sec = time.perf_counter() - t0
            break
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            batch = max(1, (batch or 64) // 2)
            log(f"out of memory at {size}²: batch -> {batch}")
    return {"step": "predict", "size": size, "frames": frames, "precision": precision, "batch": batch,
            "fps": frames / sec, "mpx_s": frames * size * size / sec / 1e6, "n_locs": len(table)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json")
    ap.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU, tiny sizes")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new steps after this (s)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = None if device.type == "cpu" else torch.bfloat16
    meta = {"device": str(device), "torch": torch.__version__, "dry_run": dry,
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
    res = Results(out / "gpu_check.json", meta)
    log(f"gpu_check on {device} ({'dry run' if dry else 'full'}), torch {torch.__version__}")
    start = time.perf_counter()
    preset = "tiny" if dry else "decode"
    train_plan = ([(16, 4, 2, False, False)] if dry else
                  [(40, 256, 30, False, False), (40, 256, 30, False, True), (40, 256, 30, True, True),
                   (64, 128, 30, False, True), (64, 128, 30, True, True)])
    for size, batch, steps, comp, cl in train_plan:
        if time.perf_counter() - start > args.budget_s:
            res.add({"step": "skipped", "reason": "time budget", "size": size})
            continue
        try:
            res.add(train_speed(size, batch, steps, preset=preset, device=device, dtype=dtype, compile_=comp,
                                channels_last=cl, on_device_data=True))
        except Exception as exc:  # one failing step must not lose the others
            res.add({"step": "train", "size": size, "compile": comp, "error": f"{type(exc).__name__}: {exc}"[:500]})
    predict_plan = [(32, 6, 4), (64, 6, None)] if dry else [(256, 2000, None), (2048, 100, 16)]
    for size, frames, batch in predict_plan:
        if time.perf_counter() - start > args.budget_s:
            res.add({"step": "skipped", "reason": "time budget", "size": size})
            continue
        try:
            res.add(predict_speed(size, frames, preset=preset, device=device,
                                  precision="no" if device.type == "cpu" else "bf16", batch=batch))
        except Exception as exc:
            res.add({"step": "predict", "size": size, "error": f"{type(exc).__name__}: {exc}"[:500]})
    res.data["meta"]["wall_s"] = time.perf_counter() - start
    res.write()
    log(f"done in {time.perf_counter() - start:.0f} s -> {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
