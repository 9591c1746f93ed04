"""Inference benchmark: throughput with and without feature caching, and accuracy next to Picasso.

    python benchmarks/inference.py [--model EXPORT_DIR] [--train-steps 300] [--json out.json]

What it measures (same movies, side by side in one run):

0. **End to end against Picasso** (issue 15.1): ``decode-accel predict`` and Picasso
   (``benchmarks/picasso_baseline.py``, threaded MLE fit) each as a whole process (start-up, imports
   and numba compilation included) on the same TIFF, ``--e2e-frames`` frames of 64 x 64 px at
   ``--e2e-density`` emitters/µm², in A B A B order (median of ``--repeats``): wall time, frames/s,
   CPU seconds (user + system), peak RSS, JI and RMSE of both.

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
DENSITY = {"low": 0.1, "high": 1.0}  # visible emitters per µm² per frame (issue 15: 0.1 and 1)
REPO = Path(__file__).resolve().parents[1]
#: where a model trained by this benchmark is cached (gitignored), keyed by preset and steps
CACHE = REPO / "outputs" / "bench_inference"


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

    cfg = sim_config(32, 1.0)
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


def run_process(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` as a whole process; its wall time (CPU time: :func:`child_usage` before and after)."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed: {proc.stderr.decode()[-2000:]}")
    return {"wall_s": wall}


def child_usage() -> tuple[float, float, float]:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime, r.ru_stime, r.ru_maxrss / 1024.0


def end_to_end(model_dir: str, work: Path, args, log) -> dict:
    """decode-accel predict vs Picasso, whole processes, same movie, A B A B (issue 15.1)."""
    import os
    import statistics

    import pandas as pd

    import picasso_baseline as picasso

    n, density = args.e2e_frames, args.e2e_density
    movie = work / "e2e.tif"
    _, truth = simulate_movie(64, density, n, seed=2000, path=movie)
    fov = (64 * PX, 64 * PX)
    cam = dict(baseline=100.0, e_per_adu=45.0, em_gain=300.0, qe=0.9, px_size_nm=PX)
    tune_adu, tune_truth = simulate_movie(64, density, 100, seed=2001, path=work / "e2e_tune.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mng = picasso.tune_min_net_gradient(tune_adu, tune_truth,
                                            lambda gt, t: evaluate(gt, t, border_nm=450.0, fov_nm=fov)["jaccard"],
                                            **cam)
    threads = str(args.e2e_threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, NUMBA_NUM_THREADS=threads,
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    exe = str(Path(sys.executable).with_name("decode-accel"))
    ours_cmd = [exe if Path(exe).exists() else sys.executable, *([] if Path(exe).exists() else ["-m", "decode_accel.cli"]),
                "predict", "--model", str(model_dir), "--input", str(movie), "--out", str(work / "e2e_ours.csv"),
                "--no-progress", "--ignore-px-size"]
    theirs_cmd = [sys.executable, str(REPO / "benchmarks" / "picasso_baseline.py"), "--movie", str(movie),
                  "--mng", str(mng), "--out", str(work / "e2e_picasso.csv"), "--threaded"]
    runs = {"decode_accel": [], "picasso": []}
    for _ in range(args.repeats):  # A B A B
        for name, cmd in (("decode_accel", ours_cmd), ("picasso", theirs_cmd)):
            u0, s0, _ = child_usage()
            r = run_process(cmd, env)
            u1, s1, rss = child_usage()
            r.update(user_s=u1 - u0, sys_s=s1 - s0, peak_rss_mb_max_so_far=rss)
            runs[name].append(r)
            log(f"  e2e {name:12s} {r['wall_s']:6.1f} s wall, {r['user_s']:6.1f} user + {r['sys_s']:5.1f} sys CPU-s")
    rows = []
    for name, out in (("decode_accel", work / "e2e_ours.csv"), ("picasso", work / "e2e_picasso.csv")):
        table = pd.read_csv(out)
        if name == "decode_accel":  # ThunderSTORM CSV -> table convention
            from decode_accel.io import read_table
            table = read_table(out)
        m = evaluate(truth, table, border_nm=450.0, fov_nm=fov)
        wall = statistics.median(r["wall_s"] for r in runs[name])
        rows.append({"method": name if name == "decode_accel" else f"picasso gaussmle threaded (MNG {mng:.0f})",
                     "frames": n, "density_per_um2": density, "threads": args.e2e_threads,
                     "wall_s": wall, "fps": n / wall, "mpx_s": n * 64 * 64 / wall / 1e6,
                     "cpu_s": statistics.median(r["user_s"] + r["sys_s"] for r in runs[name]),
                     "sys_s": statistics.median(r["sys_s"] for r in runs[name]),
                     "jaccard": m["jaccard"], "rmse_lat_nm": m["rmse_lat"], "n_locs": len(table),
                     "n_truth": len(truth), "runs": runs[name]})
    rows[0]["wall_ratio_vs_picasso"] = rows[0]["wall_s"] / rows[1]["wall_s"]
    rows[0]["ji_minus_picasso"] = rows[0]["jaccard"] - rows[1]["jaccard"]
    return {"rows": rows, "goal_met": bool(rows[0]["wall_s"] <= rows[1]["wall_s"] and
                                           rows[0]["jaccard"] >= rows[1]["jaccard"] + 0.10)}


class PeakAnon:
    """Peak anonymous resident memory (RssAnon, Linux) during a block, sampled every 5 ms."""

    def __init__(self):
        import threading
        self.threading = threading

    @staticmethod
    def now() -> float:
        try:
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return float("nan")

    def __enter__(self):
        self.base = self.peak = self.now()
        self.running = True
        self.thread = self.threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while self.running:
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.now())


#: the options compared in the throughput table (predict keyword arguments); "default" is predict's default
OPTIONS = {
    "default": {},
    "no channels-last": {"channels_last": False},
    "no feature cache": {"cache_features": False},
    "batch 32": {"batch_size": 32},
}


def time_predict(model, path: Path, n_frames: int, *, device, threshold, **options):
    # warm-up (allocations, cuDNN autotuning, receptive-field probe) on a few frames, then the timed run
    predict(model, path, frames=(0, min(n_frames, 8)), device=device, threshold=threshold, progress=False, **options)
    if device.type == "cuda":
        torch.cuda.synchronize()
    with PeakAnon() as mem:
        t0 = time.perf_counter()
        table = predict(model, path, device=device, threshold=threshold, progress=False, **options)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
    return table, sec, mem.peak - mem.base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="export folder or Hub id (default: train a tiny model here)")
    ap.add_argument("--train-steps", type=int, default=300, help="steps for the tiny model (batch 32, 32x32 px)")
    ap.add_argument("--preset", default="tiny", help="architecture preset of the trained model")
    ap.add_argument("--frames-64", type=int, default=200, help="frames of the 64x64 movies")
    ap.add_argument("--frames-256", type=int, default=40, help="frames of the 256x256 movies")
    ap.add_argument("--e2e-frames", type=int, default=2000, help="frames of the end-to-end movie (64x64); 0: skip")
    ap.add_argument("--e2e-density", type=float, default=1.0, help="emitters per µm² of the end-to-end movie")
    ap.add_argument("--e2e-threads", type=int, default=2, help="CPU threads of both processes end to end")
    ap.add_argument("--options", default=",".join(OPTIONS), help="comma-separated options of the throughput table")
    ap.add_argument("--batch-size", type=int, default=None, help="frames per network call (default: auto)")
    ap.add_argument("--threshold", type=float, default=None, help="detection threshold (default: post-processor's)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per setting, interleaved (median)")
    ap.add_argument("--skip-accuracy", action="store_true", help="throughput only")
    ap.add_argument("--no-picasso", action="store_true", help="skip the Picasso baseline")
    ap.add_argument("--json", help="write the results as JSON here (default: benchmarks/results/inference_<device>.json)")
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
        cached = CACHE / f"{args.preset}-{args.train_steps}"
        if (cached / "export" / "config.json").exists():
            export = cached / "export"
            results["model"] = f"SigmaMUNet preset '{args.preset}', {args.train_steps} steps (cached: {export})"
        else:
            log(f"training a '{args.preset}' SigmaMUNet for {args.train_steps} steps on {device} ...")
            t0 = time.perf_counter()
            cached.mkdir(parents=True, exist_ok=True)
            export = train_tiny(args.train_steps, args.preset, device, cached, log)
            results["model"] = (f"SigmaMUNet preset '{args.preset}', trained here for {args.train_steps} steps "
                                f"({time.perf_counter() - t0:.0f} s), cached in {cached}")
    model = load_exported(export)  # loaded once, reused by every run
    log(f"model: {results['model']}")

    # 0. end to end against Picasso (whole processes)
    if args.e2e_frames and not args.no_picasso:
        import picasso_baseline
        if picasso_baseline.picasso_available():
            log(f"end to end: {args.e2e_frames} frames of 64x64 at {args.e2e_density}/µm², "
                f"{args.e2e_threads} threads each ...")
            results["end_to_end"] = end_to_end(str(export), work, args, log)

    # 1. throughput of each option, 64x64 and 256x256, low and high density (interleaved repeats, median)
    options = {k: OPTIONS[k] for k in args.options.split(",") if k}
    rows = []
    for size, n in ((64, args.frames_64), (256, args.frames_256)):
        for dname, density in DENSITY.items():
            path = work / f"movie{size}_{dname}.tif"
            simulate_movie(size, density, n, seed=10 + size + int(10 * density), path=path)
            times = {k: [] for k in options}
            mem = {k: 0.0 for k in options}
            locs = {}
            for _ in range(args.repeats):
                for name, kw in options.items():
                    table, sec, peak = time_predict(model, path, n, device=device, threshold=args.threshold, **kw)
                    times[name].append(sec)
                    mem[name] = max(mem[name], peak)
                    locs[name] = len(table)
            for name in options:
                sec = float(np.median(times[name]))
                row = {"size": f"{size}x{size}", "density_per_um2": density, "frames": n, "option": name,
                       "fps": n / sec, "mpx_s": n * size * size / sec / 1e6, "peak_anon_mb": mem[name],
                       "n_locs": locs[name], "seconds": times[name]}
                rows.append(row)
                log(f"  {row['size']} {density}/µm² {name:18s} {row['fps']:8.1f} fr/s {row['mpx_s']:7.3f} Mpx/s "
                    f"peak +{row['peak_anon_mb']:.0f} MB")
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
    if "end_to_end" in results:
        e = results["end_to_end"]
        log(f"end to end, {args.e2e_frames} frames 64x64, {args.e2e_density}/µm², {args.e2e_threads} threads "
            f"(whole processes, median of {args.repeats}, A B A B):")
        log(f"{'method':>36} {'wall s':>7} {'fr/s':>7} {'CPU s':>7} {'sys s':>6} {'JI':>6} {'RMSE nm':>8} {'locs/truth':>12}")
        for r in e["rows"]:
            log(f"{r['method']:>36} {r['wall_s']:>7.1f} {r['fps']:>7.0f} {r['cpu_s']:>7.1f} {r['sys_s']:>6.1f} "
                f"{r['jaccard']:>6.3f} {r['rmse_lat_nm']:>8.1f} {r['n_locs']:>6}/{r['n_truth']:<6}")
        r0 = e["rows"][0]
        log(f"  wall time ours/Picasso x{r0['wall_ratio_vs_picasso']:.2f}, JI {r0['ji_minus_picasso']:+.3f}: "
            f"goal (<= Picasso's wall time at JI >= Picasso's + 0.10) {'MET' if e['goal_met'] else 'NOT met'}")
    log(f"{'movie':>9} {'/µm²':>5} {'option':>18} {'fr/s':>8} {'Mpx/s':>7} {'peak +MB':>8} {'locs':>6}")
    for r in rows:
        log(f"{r['size']:>9} {r['density_per_um2']:>5} {r['option']:>18} {r['fps']:>8.1f} {r['mpx_s']:>7.3f} "
            f"{r['peak_anon_mb']:>8.0f} {r['n_locs']:>6}")
    log(f"{'density':>8} {'method':>28} {'JI':>6} {'RMSE_lat nm':>11} {'E_lat':>6} {'fr/s':>7} {'locs/truth':>11}")
    for a in acc:
        log(f"{a['density_per_um2']:>8} {a['method']:>28} {a['jaccard']:>6.3f} {a['rmse_lat_nm']:>11.1f} "
            f"{(a['eff_lat'] if a['eff_lat'] is not None else float('nan')):>6.1f} {a['fps']:>7.0f} "
            f"{a['n_locs']:>5}/{a['n_truth']:<5}")
    args.json = args.json or str(REPO / "benchmarks" / "results" / f"inference_{device.type}.json")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
        log(f"results -> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
