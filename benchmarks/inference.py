"""Inference benchmark: ``decode-accel predict`` against Picasso, speed and accuracy side by side.

    python benchmarks/inference.py --model runs/b/export [--model runs/fast/export] [--quick]
    python benchmarks/inference.py --quick            # trains a small model here first (cached)

What it measures (the same movies, side by side in one run; these machines are shared and noisy, so
read the ratios, not the absolute figures; the load average before and after is recorded):

1. **End to end** (issue 15.1): ``decode-accel predict`` with each ``--model`` and Picasso
   (``benchmarks/picasso_baseline.py``: identification + threaded MLE Gaussian fit, its Min. Net Gradient
   tuned for JI on a separate tuning movie) each as a whole process (start-up, imports, numba
   compilation included) on the same TIFF, ``--e2e-frames`` frames of 64 x 64 px at each of
   ``--e2e-density`` emitters/µm², in A B A B order (median of ``--repeats``): wall time, frames/s,
   CPU seconds (user + system), the process's own peak RSS (``wait4``), JI and lateral RMSE. The goal
   of issue 15.1: our wall time <= Picasso's at a JI >= Picasso's + 0.10.
2. **Throughput** (``--throughput``) of ``decode_accel.inference.predict`` in-process (model loaded,
   warmed up) for predict's options on 64 x 64 and 256 x 256 movies at low and high density, with
   Picasso's in-process fit time on the same movies: frames/s, megapixels/s, peak anonymous memory.

The movies use the physics the (first) model was trained on (its export's ``decode_accel.json``); without
``--model`` a ``--preset`` SigmaMUNet is trained here for ``--train-steps`` updates on the physics of
scenario (b) of ``benchmarks/accuracy.py`` (32 x 32 px windows, batch 16, AdamW with warm-up and cosine
decay) and cached under ``outputs/bench_inference/``; the output says which.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
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
from decode_accel.io import write_json  # noqa: E402
from decode_accel.simulation import SimulationConfig, Simulator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: where models trained by this benchmark are cached (gitignored)
CACHE = REPO / "outputs" / "bench_inference"
SCENARIO_B = REPO / "recipes" / "configs" / "benchmark" / "b_2d_high_density.yaml"
#: border excluded from the evaluation (nm), as in the challenge's evaluation of 64 x 64 frames
BORDER_NM = 450.0


def _export_api():
    try:  # the export code is moving from hub.py to export.py
        from decode_accel.export import export_model, load_exported
    except ImportError:  # pragma: no cover - older layout
        from decode_accel.hub import export_model, load_exported
    return export_model, load_exported


def loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


# ------------------------------------------------------------------------------------ physics
def model_physics(export_dir: str | Path) -> dict:
    """The simulation config (a plain dict) the exported model was trained on."""
    meta = json.loads((Path(export_dir) / "decode_accel.json").read_text())
    return meta["simulation"]


def scenario_b_physics() -> dict:
    from decode_accel.training.config import load_config
    return load_config(SCENARIO_B).simulation.model_dump(mode="json")


def movie_config(physics: dict, size: int, density: float) -> SimulationConfig:
    d = json.loads(json.dumps(physics))
    d["frame"].update(height=size, width=size)
    d["emitters"].update(density=density, emitters_per_frame=None)
    return SimulationConfig(**d)


def camera_kwargs(cfg: SimulationConfig) -> dict:
    cam = cfg.camera
    return dict(baseline=cam.baseline, e_per_adu=cam.e_per_adu, em_gain=cam.em_gain if cam.kind == "emccd" else 1.0,
                qe=cam.qe, px_size_nm=float(cfg.frame.px_size))


def simulate_movie(cfg: SimulationConfig, n_frames: int, seed: int, path: Path):
    movie = Simulator(cfg).sample(n_frames, torch.Generator().manual_seed(seed))
    adu = movie.frames_adu[:, 0].numpy().astype(np.uint16)
    tifffile.imwrite(path, adu, photometric="minisblack")
    return adu, movie.emitters


def score(cfg: SimulationConfig, truth, table) -> dict:
    fov = (cfg.frame.height * cfg.frame.px_size, cfg.frame.width * cfg.frame.px_size)
    m = evaluate(truth, table, border_nm=BORDER_NM, fov_nm=fov)
    return {"jaccard": float(m["jaccard"]), "rmse_lat_nm": float(m["rmse_lat"])}


# ------------------------------------------------------------------------------------ training
def train_model(steps: int, preset: str, physics: dict, folder: Path, log, *, batch: int = 16,
                peak_lr: float = 2e-3, seed: int = 0) -> Path:
    """Train a ``preset`` SigmaMUNet on 32 x 32 px windows of ``physics`` for ``steps`` updates; export it.

    The library's simulator, loss and export; AdamW with a linear warm-up (10 % of the updates, at most
    100) and a cosine decay to 1 % of ``peak_lr``; the scaling follows the physics.
    """
    from decode_accel.loss.gaussian_mm import GaussianMMLoss
    from decode_accel.models import Scaling, SigmaMUNet

    export_model, _ = _export_api()
    cfg = movie_config(physics, 32, physics["emitters"]["density"])
    em, bg = cfg.emitters, cfg.background
    z = max(abs(v) for v in em.z_range)
    scaling = Scaling.auto(em.photons_mean, em.photons_sd, z, tuple(bg.uniform))
    sim = Simulator(cfg)
    torch.manual_seed(seed)
    net = SigmaMUNet.from_preset(preset, scaling=scaling, z_enabled=z > 0)
    loss_fn = GaussianMMLoss(scaling=net.scaling, z_enabled=z > 0)
    opt = torch.optim.AdamW(net.parameters(), lr=peak_lr, weight_decay=1e-4)
    warm = max(1, min(100, steps // 10))

    def lr_factor(step: int) -> float:
        return min(1.0, (step + 1) / warm) * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    for step in range(steps):
        b = sim.sample_windows(batch, gen)
        loss = loss_fn(net(b["frames"]), b)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 3.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  train step {step:5d}  loss {float(loss.detach()):8.3f}  {time.perf_counter() - t0:6.1f} s")
    net.eval()
    return export_model(folder / "export", net, simulation_config=cfg,
                        name=f"inference benchmark '{preset}' model ({steps} updates)")


def cached_model(preset: str, steps: int, physics: dict, log) -> tuple[Path, str]:
    key = hashlib.sha256(json.dumps(physics, sort_keys=True).encode()).hexdigest()[:8]
    folder = CACHE / f"{preset}-{steps}-{key}"
    if (folder / "export" / "config.json").exists():
        return folder / "export", f"SigmaMUNet '{preset}', {steps} updates (cached: {folder / 'export'})"
    log(f"training a '{preset}' SigmaMUNet for {steps} updates (nice it: this takes a while) ...")
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    export = train_model(steps, preset, physics, folder, log)
    return export, f"SigmaMUNet '{preset}', trained here for {steps} updates ({time.perf_counter() - t0:.0f} s)"


def describe(export: Path) -> str:
    cfg = json.loads((Path(export) / "config.json").read_text())
    n = None
    try:
        from safetensors import safe_open
        with safe_open(str(Path(export) / "model.safetensors"), "pt") as f:
            n = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    except Exception:  # noqa: BLE001 - informational
        pass
    return f"{cfg.get('architecture', '?')} features={cfg.get('features')} depth={cfg.get('depth')}" + \
        (f", {n / 1e3:.0f} k parameters" if n else "")


# ------------------------------------------------------------------------------------ processes
def run_process(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` as a whole process: wall time, its own CPU time and peak RSS (``wait4``)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's so far
        wall = time.perf_counter() - t0
        code = proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        message = err.read().decode(errors="replace")
    user, sys_s, rss = usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024.0
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({code}): {message[-2000:]}")
    return {"wall_s": wall, "user_s": user, "sys_s": sys_s, "peak_rss_mb": rss}


def end_to_end(models: list[tuple[str, Path]], physics: dict, density: float, work: Path, args, log) -> dict:
    """Each model's ``decode-accel predict`` and Picasso as whole processes on one movie, A B A B."""
    import pandas as pd

    import picasso_baseline as picasso
    from decode_accel.io import read_table

    n = args.e2e_frames
    cfg = movie_config(physics, 64, density)
    tag = f"{density:g}".replace(".", "p")
    movie = work / f"e2e_{tag}.tif"
    _, truth = simulate_movie(cfg, n, seed=2000 + int(100 * density), path=movie)
    tune_adu, tune_truth = simulate_movie(cfg, args.tune_frames, seed=3000 + int(100 * density),
                                          path=work / f"e2e_{tag}_tune.tif")
    cam = camera_kwargs(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mng = picasso.tune_min_net_gradient(tune_adu, tune_truth, lambda gt, t: score(cfg, gt, t)["jaccard"], **cam)
    threads = str(args.e2e_threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, NUMBA_NUM_THREADS=threads,
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    exe = Path(sys.executable).with_name("decode-accel")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "decode_accel.cli"]
    commands = {}
    for name, export in models:
        for backend in args.backends.split(","):
            label = name if backend == "torch" else f"{name} {backend}"
            out = work / f"e2e_{tag}_{label.replace(' ', '_')}.csv"
            commands[label] = (base + ["predict", "--model", str(export), "--input", str(movie), "--out", str(out),
                                       "--no-progress", "--ignore-px-size", "--backend", backend], out)
    commands["picasso"] = ([sys.executable, str(REPO / "benchmarks" / "picasso_baseline.py"), "--movie", str(movie),
                            "--mng", str(mng), "--out", str(work / f"e2e_{tag}_picasso.csv"), "--threaded",
                            *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in cam.items()), [])],
                           work / f"e2e_{tag}_picasso.csv")
    if "onnx" in args.backends.split(","):
        # the export to ONNX is cached by the weights (inference/onnx_backend.py): warm the cache, so that every
        # timed run is a user's second and later run of the model (the first costs about 3 CPU-seconds more)
        from decode_accel.inference.onnx_backend import OnnxNet
        _, load_exported = _export_api()
        for _, export in models:
            OnnxNet(load_exported(export).model)
    runs = {name: [] for name in commands}
    for _ in range(args.repeats):  # A B A B
        for name, (cmd, _) in commands.items():
            r = run_process(cmd, env)
            r["loadavg"] = loadavg()
            runs[name].append(r)
            log(f"  {density:g}/µm² {name:18s} {r['wall_s']:6.1f} s wall, {r['user_s']:6.1f} user + "
                f"{r['sys_s']:5.1f} sys CPU-s, peak RSS {r['peak_rss_mb']:5.0f} MB, load {r['loadavg'][:1]}")
    rows = []
    for name, (_, out) in commands.items():
        table = read_table(out) if name != "picasso" else pd.read_csv(out)
        wall = statistics.median(r["wall_s"] for r in runs[name])
        rows.append({"method": name, "frames": n, "density_per_um2": density, "threads": args.e2e_threads,
                     "wall_s": wall, "fps": n / wall, "mpx_s": n * 64 * 64 / wall / 1e6,
                     "cpu_s": statistics.median(r["user_s"] + r["sys_s"] for r in runs[name]),
                     "sys_s": statistics.median(r["sys_s"] for r in runs[name]),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[name]),
                     **score(cfg, truth, table), "n_locs": len(table), "n_truth": len(truth), "runs": runs[name]})
    pic = rows[-1]
    pic["method"] = f"picasso (MNG {mng:.0f})"
    for r in rows[:-1]:
        r["wall_vs_picasso"] = r["wall_s"] / pic["wall_s"]
        r["wall_ratios_per_repeat"] = [a["wall_s"] / b["wall_s"] for a, b in zip(r["runs"], pic["runs"])]
        # CPU-seconds: the work done, less sensitive than wall time to what else the machine runs
        r["cpu_vs_picasso"] = r["cpu_s"] / pic["cpu_s"]
        r["cpu_ratios_per_repeat"] = [(a["user_s"] + a["sys_s"]) / (b["user_s"] + b["sys_s"])
                                      for a, b in zip(r["runs"], pic["runs"])]
        r["ji_minus_picasso"] = r["jaccard"] - pic["jaccard"]
        r["goal_met"] = bool(r["wall_s"] <= pic["wall_s"] and r["jaccard"] >= pic["jaccard"] + 0.10)
    return {"density_per_um2": density, "frames": n, "picasso_min_net_gradient": mng, "rows": rows}


# ------------------------------------------------------------------------------------ in-process
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
    "onnx": {"backend": "onnx"},
}


def time_predict(model, path: Path, n_frames: int, *, device, **options):
    from decode_accel.inference.predict import predict

    # warm-up (allocations, receptive-field probe) on a few frames, then the timed run
    predict(model, path, frames=(0, min(n_frames, 8)), device=device, progress=False, check_px_size=False, **options)
    with PeakAnon() as mem:
        t0 = time.perf_counter()
        table = predict(model, path, device=device, progress=False, check_px_size=False, **options)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
    return table, sec, mem.peak - mem.base


def throughput(models: dict, physics: dict, work: Path, args, device, log) -> list[dict]:
    """``models``: name -> loaded export; every option of ``--options`` for every model, then Picasso."""
    import picasso_baseline as picasso

    options = {f"{m} {k}" if len(models) > 1 else k: (m, OPTIONS[k]) for m in models
               for k in args.options.split(",") if k}
    rows = []
    for size, n in ((64, args.frames_64), (256, args.frames_256)):
        for density in (0.1, 1.0):
            cfg = movie_config(physics, size, density)
            path = work / f"movie{size}_{density:g}.tif"
            adu, truth = simulate_movie(cfg, n, seed=10 + size + int(10 * density), path=path)
            times = {k: [] for k in options}
            mem = {k: 0.0 for k in options}
            tables = {}
            for _ in range(args.repeats):
                for name, (m, kw) in options.items():
                    table, sec, peak = time_predict(models[m], path, n, device=device, **kw)
                    times[name].append(sec)
                    mem[name] = max(mem[name], peak)
                    tables[name] = table
            entries = [(name, times[name], mem[name], tables[name]) for name in options]
            if picasso.picasso_available() and not args.no_picasso:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ptimes = []
                    for _ in range(args.repeats):
                        with PeakAnon() as pm:
                            ptable, psec = picasso.picasso_localize(adu, min_net_gradient=args.picasso_mng,
                                                                    threaded=True, **camera_kwargs(cfg))
                        ptimes.append(psec)
                entries.append((f"picasso (MNG {args.picasso_mng:g})", ptimes, pm.peak - pm.base, ptable))
            for name, secs, peak, table in entries:
                sec = float(np.median(secs))
                row = {"size": f"{size}x{size}", "density_per_um2": density, "frames": n, "option": name,
                       "fps": n / sec, "mpx_s": n * size * size / sec / 1e6, "peak_anon_mb": peak,
                       "n_locs": len(table), **score(cfg, truth, table), "seconds": secs}
                row["loadavg"] = loadavg()
                rows.append(row)
                log(f"  {row['size']} {density:g}/µm² {name:22s} {row['fps']:8.1f} fr/s {row['mpx_s']:7.3f} Mpx/s "
                    f"peak +{row['peak_anon_mb']:.0f} MB  JI {row['jaccard']:.3f}")
    return rows


# ------------------------------------------------------------------------------------ report
def report(results: dict, log) -> None:
    log("")
    log(f"load average {results['loadavg_start']} at the start, {results['loadavg_end']} at the end "
        f"({os.cpu_count()} CPUs)")
    for name, desc in results["models"].items():
        log(f"model {name}: {desc}")
    for e in results.get("end_to_end", []):
        log(f"\nend to end: {e['frames']} frames of 64x64 at {e['density_per_um2']:g} emitters/µm², "
            f"{e['rows'][0]['threads']} threads, whole processes, median of {results['repeats']} (A B A B):")
        log(f"{'method':>22} {'wall s':>7} {'fr/s':>6} {'CPU s':>6} {'sys s':>5} {'RSS MB':>6} {'JI':>6} "
            f"{'RMSE nm':>7} {'wall/Picasso':>12} {'JI-Picasso':>10} {'goal':>5}")
        for r in e["rows"]:
            ratio = f"{r['wall_vs_picasso']:.2f}" if "wall_vs_picasso" in r else ""
            dji = f"{r['ji_minus_picasso']:+.3f}" if "ji_minus_picasso" in r else ""
            goal = ("met" if r["goal_met"] else "no") if "goal_met" in r else ""
            log(f"{r['method']:>22} {r['wall_s']:>7.1f} {r['fps']:>6.0f} {r['cpu_s']:>6.1f} {r['sys_s']:>5.1f} "
                f"{r['peak_rss_mb']:>6.0f} {r['jaccard']:>6.3f} {r['rmse_lat_nm']:>7.1f} {ratio:>12} {dji:>10} "
                f"{goal:>5}")
        for r in e["rows"][:-1]:
            log(f"  {r['method']}: wall time / Picasso's per repeat: "
                + ", ".join(f"{x:.2f}" for x in r["wall_ratios_per_repeat"])
                + "; CPU-s / Picasso's: " + ", ".join(f"{x:.2f}" for x in r.get("cpu_ratios_per_repeat", [])))
    if results.get("throughput"):
        log(f"\nin-process throughput (models {results['throughput_model']}, warmed up, {results.get('threads')} "
            f"threads; median of {results['repeats']}):")
        log(f"{'movie':>9} {'/µm²':>5} {'option':>26} {'fr/s':>8} {'Mpx/s':>7} {'peak +MB':>8} {'JI':>6} "
            f"{'RMSE nm':>7} {'locs':>6}")
        for r in results["throughput"]:
            log(f"{r['size']:>9} {r['density_per_um2']:>5g} {r['option']:>26} {r['fps']:>8.1f} {r['mpx_s']:>7.3f} "
                f"{r['peak_anon_mb']:>8.0f} {r['jaccard']:>6.3f} {r['rmse_lat_nm']:>7.1f} {r['n_locs']:>6}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[],
                    help="export folder (repeat for several; name=PATH names it); default: train one here")
    ap.add_argument("--preset", default="cpu_small", help="preset of the model trained here without --model")
    ap.add_argument("--train-steps", type=int, default=1200, help="updates of the model trained here")
    ap.add_argument("--e2e-frames", type=int, default=2000, help="frames of the end-to-end movies (64x64); 0: skip")
    ap.add_argument("--e2e-density", default="1.0", help="comma list of emitters/µm² of the end-to-end movies")
    ap.add_argument("--e2e-threads", type=int, default=2, help="CPU threads of every process end to end "
                    "(and of the in-process table)")
    ap.add_argument("--backends", default="torch", help="comma list of predict --backend values run end to end "
                    "for every model (torch, onnx)")
    ap.add_argument("--tune-frames", type=int, default=100, help="frames of Picasso's tuning movie")
    ap.add_argument("--throughput", action="store_true", help="also the in-process table of predict's options")
    ap.add_argument("--frames-64", type=int, default=200, help="frames of the 64x64 throughput movies")
    ap.add_argument("--frames-256", type=int, default=20, help="frames of the 256x256 throughput movies")
    ap.add_argument("--options", default=",".join(OPTIONS), help="comma list of the throughput table's options")
    ap.add_argument("--picasso-mng", type=float, default=2000.0, help="Picasso's Min. Net Gradient in the throughput table")
    ap.add_argument("--device", default="cpu", help="device of the in-process table")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per setting, interleaved (median)")
    ap.add_argument("--quick", action="store_true", help="a few minutes: 300 end-to-end frames, small movies")
    ap.add_argument("--no-picasso", action="store_true", help="skip Picasso (and so the end-to-end comparison)")
    ap.add_argument("--json", help="write the results here (default: benchmarks/results/inference_cpu.json; "
                                   "with --quick: inference_cpu_quick.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.e2e_frames = min(args.e2e_frames, 300)
        args.frames_64, args.frames_256 = min(args.frames_64, 50), min(args.frames_256, 6)
    log = lambda s: print(s, flush=True)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="decode_accel_bench_"))
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                     "loadavg_start": loadavg(), "cpus": os.cpu_count(), "repeats": args.repeats,
                     "nice": os.nice(0),
                     "torch": torch.__version__, "models": {}}

    models: list[tuple[str, Path]] = []
    for spec in args.model:
        name, _, path = spec.rpartition("=")
        path = Path(path)
        name = name or (path.parent.name if path.name == "export" else path.name)
        models.append((name, path))
        results["models"][name] = f"{describe(path)} (given: {path})"
    if not models:
        export, desc = cached_model(args.preset, args.train_steps, scenario_b_physics(), log)
        models.append((args.preset, export))
        results["models"][args.preset] = f"{describe(export)}; {desc}"
    physics = model_physics(models[0][1])
    for name, path in models[1:]:
        if model_physics(path) != physics:
            warnings.warn(f"model {name} was trained on other physics than {models[0][0]}; the movies follow "
                          f"{models[0][0]}'s", stacklevel=1)
    results["physics"] = physics
    for name, desc in results["models"].items():
        log(f"model {name}: {desc}")

    import picasso_baseline
    if args.e2e_frames and not args.no_picasso and picasso_baseline.picasso_available():
        results["end_to_end"] = []
        for density in (float(d) for d in args.e2e_density.split(",") if d):
            log(f"end to end: {args.e2e_frames} frames of 64x64 at {density:g}/µm², {args.e2e_threads} threads each ...")
            results["end_to_end"].append(end_to_end(models, physics, density, work, args, log))
    if args.throughput:
        _, load_exported = _export_api()
        torch.set_num_threads(args.e2e_threads)
        results["threads"] = torch.get_num_threads()
        results["throughput_model"] = ", ".join(name for name, _ in models)
        results["throughput"] = throughput({name: load_exported(path) for name, path in models}, physics, work, args,
                                           torch.device(args.device), log)
    results["loadavg_end"] = loadavg()
    report(results, log)
    out = Path(args.json or REPO / "benchmarks" / "results" /
               ("inference_cpu_quick.json" if args.quick else "inference_cpu.json"))
    write_json(results, out, indent=1)
    log(f"results -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
