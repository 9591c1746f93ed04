"""Inference benchmark: throughput with and without feature caching, and accuracy next to Picasso.

    python benchmarks/inference.py [--model EXPORT_DIR] [--train-steps 300] [--json out.json]

What it measures (same process, same movies):

1. **Throughput** of ``decode_accel.inference.predict`` on simulated 64x64 and 256x256 EMCCD movies
   (TIFF files read from disk), with stage-1 feature caching on and off: frames/s, megapixels/s, the
   speed-up of caching, and the process's peak RSS after each run (``ru_maxrss``, monotone). On CUDA
   the network runs in bf16 (predict's default there), on CPU in fp32.
2. **Accuracy** at low (0.05 /µm², ~2 emitters per 64x64 frame, the challenge's LD) and high
   (0.5 /µm², ~20 per frame, HD) density on 64x64 movies: Jaccard index, lateral RMSE and efficiency
   (``decode_accel.evaluation.evaluate``, challenge rules) of decode_accel and of Picasso's MLE
   Gaussian fit (``picasso.localize.localize_frames(..., fitting_method="gaussmle")``), whose
   Min. Net Gradient is tuned for JI on a separate tuning movie of the same density.

The model is ``--model`` (an export folder) or, without it, a tiny SigmaMUNet trained here for
``--train-steps`` steps on the same simulated physics; the output says which. A tiny, briefly
trained network is a throughput probe, not an accuracy claim: train a real one with the recipes.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_accel.evaluation import evaluate  # noqa: E402
from decode_accel.inference.predict import predict  # noqa: E402
from decode_accel.simulation import SimulationConfig, Simulator  # noqa: E402

PX = 100.0
CAMERA = dict(preset="challenge2016")
DENSITY = {"low": 0.05, "high": 0.5}  # visible emitters per µm² per frame


def sim_config(size: int, density: float) -> SimulationConfig:
    return SimulationConfig(
        frame=dict(height=size, width=size, px_size=PX),
        emitters=dict(density=density, photons_mean=4000.0, photons_sd=1000.0, z_range=(0.0, 0.0),
                      on_time_mean=1.5, label_min_photons=100.0),
        psf=dict(kind="gaussian", sigma=1.0), background=dict(uniform=(20.0, 50.0)), camera=CAMERA)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_tiny(steps: int, preset: str, device: torch.device, folder: Path, log) -> Path:
    """Train a small SigmaMUNet on 32x32 windows of the benchmark physics; export it."""
    from decode_accel.hub import export_model
    from decode_accel.loss.gaussian_mm import GaussianMMLoss
    from decode_accel.models import Scaling, SigmaMUNet

    cfg = sim_config(32, 0.3)
    sim = Simulator(cfg)
    torch.manual_seed(0)
    net = SigmaMUNet.from_preset(preset, scaling=Scaling.auto(4000.0, 1000.0, 0.0, (20.0, 50.0)),
                                 z_enabled=False).to(device)
    loss_fn = GaussianMMLoss(scaling=net.scaling, z_enabled=False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator(device=device).manual_seed(1)
    t0 = time.perf_counter()
    for step in range(steps):
        batch = sim.sample_windows(32, gen)
        loss = loss_fn(net(batch["frames"]), batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.03 * 100)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  train step {step:5d}  loss {float(loss):8.3f}  {time.perf_counter() - t0:6.1f} s")
    net.eval().cpu()
    return export_model(folder / "export", net, simulation_config=cfg, name="benchmark tiny model")


def simulate_movie(size: int, density: float, n_frames: int, seed: int, path: Path):
    movie = Simulator(sim_config(size, density)).sample(n_frames, torch.Generator().manual_seed(seed))
    adu = movie.frames_adu[:, 0].numpy().astype(np.uint16)
    tifffile.imwrite(path, adu, photometric="minisblack")
    return adu, movie.emitters


def time_predict(model, path: Path, n_frames: int, *, cache: bool, device, batch_size, threshold):
    # warm-up (allocations, cuDNN autotuning, receptive-field probe) on a few frames, then the timed run
    predict(model, path, frames=(0, min(n_frames, 8)), cache_features=cache, device=device,
            batch_size=batch_size, threshold=threshold, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    table = predict(model, path, cache_features=cache, device=device, batch_size=batch_size, threshold=threshold,
                    progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return table, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="export folder or Hub id (default: train a tiny model here)")
    ap.add_argument("--train-steps", type=int, default=300, help="steps for the tiny model (batch 32, 32x32 px)")
    ap.add_argument("--preset", default="tiny", help="architecture preset of the trained model")
    ap.add_argument("--frames-64", type=int, default=200, help="frames of the 64x64 movies")
    ap.add_argument("--frames-256", type=int, default=40, help="frames of the 256x256 movie")
    ap.add_argument("--batch-size", type=int, default=None, help="frames per network call (default: auto)")
    ap.add_argument("--threshold", type=float, default=None, help="detection threshold (default: post-processor's)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting (the best counts)")
    ap.add_argument("--skip-accuracy", action="store_true", help="throughput only")
    ap.add_argument("--no-picasso", action="store_true", help="skip the Picasso baseline")
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    log = lambda s: print(s, flush=True)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="decode_accel_bench_"))
    results: dict = {"device": str(device), "precision": precision, "torch_threads": torch.get_num_threads()}

    from decode_accel.hub import load_exported
    if args.model:
        export, results["model"] = args.model, f"given: {args.model}"
    else:
        log(f"training a '{args.preset}' SigmaMUNet for {args.train_steps} steps on {device} ...")
        t0 = time.perf_counter()
        export = train_tiny(args.train_steps, args.preset, device, work, log)
        results["model"] = (f"tiny SigmaMUNet preset '{args.preset}', trained here for {args.train_steps} steps "
                            f"({time.perf_counter() - t0:.0f} s)")
    model = load_exported(export)  # loaded once, reused by every run
    log(f"model: {results['model']}")

    # 1. throughput, caching on/off
    rows = []
    for size, n in ((64, args.frames_64), (256, args.frames_256)):
        path = work / f"movie{size}.tif"
        simulate_movie(size, DENSITY["low"], n, seed=10 + size, path=path)
        row = {"size": f"{size}x{size}", "frames": n, "file_mb": path.stat().st_size / 2 ** 20}
        best = {True: np.inf, False: np.inf}
        for _ in range(args.repeats):  # interleaved repeats, best time: robust to a busy machine
            for cache in (True, False):
                table, sec = time_predict(model, path, n, cache=cache, device=device, batch_size=args.batch_size,
                                          threshold=args.threshold)
                best[cache] = min(best[cache], sec)
                key = "cached" if cache else "uncached"
                row[f"{key}_locs"] = len(table)
                row[f"peak_rss_mb_after_{key}"] = peak_rss_mb()
        for cache in (True, False):
            key, sec = ("cached" if cache else "uncached"), best[cache]
            row[f"{key}_fps"] = n / sec
            row[f"{key}_mpx_s"] = n * size * size / sec / 1e6
        row["cache_speedup"] = row["cached_fps"] / row["uncached_fps"]
        rows.append(row)
        log(f"  {row['size']}: cached {row['cached_fps']:.1f} fr/s ({row['cached_mpx_s']:.3f} Mpx/s), "
            f"uncached {row['uncached_fps']:.1f} fr/s, speed-up x{row['cache_speedup']:.2f}, "
            f"peak RSS {row['peak_rss_mb_after_uncached']:.0f} MB")
    results["throughput"] = rows

    # 2. accuracy next to Picasso
    picasso = None
    if not args.no_picasso:
        try:
            import picasso_baseline as picasso
            if not picasso.picasso_available():
                picasso = None
        except Exception:  # pragma: no cover - optional
            picasso = None
    acc = []
    densities = {} if args.skip_accuracy else DENSITY
    cam = dict(baseline=100.0, e_per_adu=45.0, em_gain=300.0, qe=0.9, px_size_nm=PX)
    fov = (64 * PX, 64 * PX)
    for name, density in densities.items():
        path = work / f"acc_{name}.tif"
        adu, truth = simulate_movie(64, density, args.frames_64, seed=100 + int(density * 100), path=path)
        t0 = time.perf_counter()
        table = predict(model, path, device=device, batch_size=args.batch_size, threshold=args.threshold,
                        progress=False)
        sec = time.perf_counter() - t0
        m = evaluate(truth, table, border_nm=450.0, fov_nm=fov)
        entry = {"density_per_um2": density, "method": "decode_accel", "jaccard": m["jaccard"],
                 "rmse_lat_nm": m["rmse_lat"], "eff_lat": m.get("eff_lat"), "fps": args.frames_64 / sec,
                 "n_locs": len(table), "n_truth": len(truth)}
        acc.append(entry)
        log(f"  {name} density: decode_accel JI {entry['jaccard']:.3f}  RMSE_lat {entry['rmse_lat_nm']:.1f} nm  "
            f"{entry['fps']:.0f} fr/s")
        if picasso is not None:
            tune_adu, tune_truth = simulate_movie(64, density, min(args.frames_64, 100), seed=500 + int(density * 100),
                                                  path=work / f"tune_{name}.tif")
            score = lambda gt, t: evaluate(gt, t, border_nm=450.0, fov_nm=fov)["jaccard"]  # noqa: E731
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mng = picasso.tune_min_net_gradient(tune_adu, tune_truth, score, **cam)
                ptable, psec = picasso.picasso_localize(adu, min_net_gradient=mng, **cam)
            pm = evaluate(truth, ptable, border_nm=450.0, fov_nm=fov)
            pentry = {"density_per_um2": density, "method": f"picasso gaussmle (MNG {mng:.0f})",
                      "jaccard": pm["jaccard"], "rmse_lat_nm": pm["rmse_lat"], "eff_lat": pm.get("eff_lat"),
                      "fps": args.frames_64 / psec, "n_locs": len(ptable), "n_truth": len(truth)}
            acc.append(pentry)
            log(f"  {name} density: Picasso      JI {pentry['jaccard']:.3f}  RMSE_lat {pentry['rmse_lat_nm']:.1f} nm  "
                f"{pentry['fps']:.0f} fr/s")
    results["accuracy_64x64"] = acc

    # report
    log("")
    log(f"device {results['device']} ({precision}, {results['torch_threads']} threads); model: {results['model']}")
    log(f"{'movie':>9} {'frames':>6} {'cached fr/s':>11} {'Mpx/s':>7} {'uncached fr/s':>13} {'Mpx/s':>7} "
        f"{'speed-up':>8} {'peak RSS MB':>11}")
    for r in rows:
        log(f"{r['size']:>9} {r['frames']:>6} {r['cached_fps']:>11.1f} {r['cached_mpx_s']:>7.3f} "
            f"{r['uncached_fps']:>13.1f} {r['uncached_mpx_s']:>7.3f} {r['cache_speedup']:>8.2f} "
            f"{r['peak_rss_mb_after_uncached']:>11.0f}")
    log(f"{'density':>8} {'method':>28} {'JI':>6} {'RMSE_lat nm':>11} {'E_lat':>6} {'fr/s':>7} {'locs/truth':>11}")
    for a in acc:
        log(f"{a['density_per_um2']:>8} {a['method']:>28} {a['jaccard']:>6.3f} {a['rmse_lat_nm']:>11.1f} "
            f"{(a['eff_lat'] if a['eff_lat'] is not None else float('nan')):>6.1f} {a['fps']:>7.0f} "
            f"{a['n_locs']:>5}/{a['n_truth']:<5}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
        log(f"results -> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
