"""Does the sCMOS variance map help as a network input? (issue 14.2, ``model.variance_input``)

Two networks are trained side by side on the same simulated sCMOS physics: a full-chip camera whose
read-noise variance map has a heavy tail (a few % of "hot" pixels with 10-100x the median variance,
built deterministically from ``--chip-seed``), each training sample a random crop of the chip. They
differ only in ``model.variance_input``: the same config, the same stream of training samples (the
variance channel draws no random numbers), the same number of updates; only the initial weights
differ (the first convolution has one more input channel, so the seeded initialisation draws other
numbers). Each model's operating threshold is chosen as for any user (``pipeline.train_model``).

Both are then run by ``predict`` on one held-out test movie: a bigger region of the chip than the
training crops (``--test-size``, at ``--test-roi``), simulated with a seed no training, validation or
tuning stream uses (``pipeline.held_out_seed``), and scored with ``pipeline.evaluate_table``. The table
shows JI, precision, recall, RMSE x / y (all emitter-frames), the false positives that lie on a hot
pixel against those elsewhere (per pixel and frame), the lateral RMSE of emitters within 1.5 px of a
hot pixel, and paired bootstrap intervals (over test frames) of the differences.

    nice -n 19 python benchmarks/scmos_variance_input.py --json benchmarks/results/scmos_variance_input_cpu.json

On a shared machine the two trainings can run side by side, then the evaluation reuses them:

    nice -n 19 python benchmarks/scmos_variance_input.py --only without & \
    nice -n 19 python benchmarks/scmos_variance_input.py --only with; wait
    nice -n 19 python benchmarks/scmos_variance_input.py --reuse-models --json benchmarks/results/scmos_variance_input_cpu.json

``--budget tiny`` is a smoke test (tests/test_benchmark_scmos_variance.py); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from decode_accel import pipeline
from decode_accel.evaluation.matching import match_localizations
from decode_accel.inference.predict import predict
from decode_accel.training.config import load_config_data

ROOT = Path(__file__).resolve().parents[1]

#: hot pixels: at least this many times the chip's median read-noise variance
HOT_FACTOR = 10.0

#: the physics both models train on (and the test movie is simulated with): 2D, Gaussian PSF, dim
#: molecules on a low background, where a hot pixel's noise (sd 6-18 photons) is as large as the
#: background's shot noise (2-4 photons) many times over and a single-pixel spike looks like a dim spot
PHYSICS = {
    "model": {"architecture": "SigmaMUNet", "z_enabled": False},
    "simulation": {
        "frame": {"height": 32, "width": 32, "px_size": 100.0},
        "emitters": {"density": 0.5, "photons_mean": 1200.0, "photons_sd": 600.0,
                     "photons_distribution": "lognormal", "z_range": [0.0, 0.0], "on_time_mean": 1.0},
        "psf": {"kind": "gaussian", "sigma": 1.1},
        "background": {"uniform": [5.0, 15.0]},
        "camera": {"kind": "scmos", "qe": 0.8, "scmos_training_crop": "random"},
    },
    "loss": {"type": "GaussianMM"},
    "optimizer": {"type": "AdamW", "weight_decay": 0.1},
    "training_strategy": {"gradient_clipping": 0.03},
}

BUDGETS = {
    # pipeline's CPU budget (cpu_small network, 32 x 32 px crops, batch 16) for a fixed number of updates
    "cpu": dict(overrides=pipeline.CPU_TRAINING_OVERRIDES, updates=1200, chip=(256, 256), test_size=(128, 128),
                test_roi=(64, 96), test_frames=200, operating_point=True),
    # smoke test only
    "tiny": dict(overrides=["model.preset=tiny", "simulation.frame.height=16", "simulation.frame.width=16",
                            "data.batch_size=4", "data.steps_per_epoch=3", "data.val_samples=8",
                            "training_strategy.epochs=1", "monitoring.validate_every=1000",
                            "monitoring.use_tensorboard=false"],
                 updates=None, chip=(64, 64), test_size=(32, 32), test_roi=(16, 24), test_frames=6,
                 operating_point=False),
}


def make_chip_maps(seed: int, shape: tuple[int, int] = (256, 256), hot_share: float = 0.03,
                   hot_range: tuple[float, float] = (10.0, 100.0), median_e2: float = 2.0,
                   e_per_adu: float = 0.47) -> dict[str, np.ndarray]:
    """Full-chip sCMOS maps with a heavy-tailed read-noise variance, the same for the same ``seed``.

    Body: lognormal variance with median ``median_e2`` e-² (read noise ~1.4 e- rms) and a log-sd of
    0.3; ``hot_share`` of the pixels get ``hot_range`` times that median (log-uniform). Conversion
    ``e_per_adu`` with 3 % pixel-to-pixel spread, offset 100 ADU with 2 ADU spread. Returns
    ``offset_adu`` (ADU), ``variance_adu2`` (ADU²), ``e_per_adu`` (e-/ADU), float32 (H, W).
    """
    rng = np.random.default_rng(int(seed))
    h, w = shape
    var_e2 = median_e2 * np.exp(0.3 * rng.standard_normal((h, w)))
    hot = rng.random((h, w)) < hot_share
    lo, hi = np.log(hot_range[0]), np.log(hot_range[1])
    var_e2[hot] = median_e2 * np.exp(rng.uniform(lo, hi, int(hot.sum())))
    gain = e_per_adu * (1.0 + 0.03 * rng.standard_normal((h, w)))
    offset = 100.0 + 2.0 * rng.standard_normal((h, w))
    return {"offset_adu": offset.astype(np.float32), "variance_adu2": (var_e2 / gain ** 2).astype(np.float32),
            "e_per_adu": gain.astype(np.float32)}


def variance_photons2(maps: dict[str, np.ndarray], qe: float) -> np.ndarray:
    """The read-noise variance in photons² (what the network reads): ADU² · (e-/ADU / QE)²."""
    return maps["variance_adu2"].astype(np.float64) * (maps["e_per_adu"].astype(np.float64) / qe) ** 2


def hot_pixel_figures(truth, table, hot: np.ndarray, px: float, n_frames: int) -> dict:
    """False positives on hot pixels against elsewhere, and the lateral error near hot pixels.

    A localization that no true emitter-frame claims (the evaluation's matching: greedy, 250 nm) is a
    false positive; it lies on the pixel that contains it. ``hot``: (H, W) bool of the movie's pixels.
    """
    gi, pi = match_localizations(truth, table, dist_lat=250.0, use_z=False)
    fp = np.ones(len(table), bool)
    fp[pi] = False
    h, w = hot.shape

    def pixels(df):
        rows = np.clip((df["y"].to_numpy() / px).astype(int), 0, h - 1)
        cols = np.clip((df["x"].to_numpy() / px).astype(int), 0, w - 1)
        return rows, cols

    r, c = pixels(table[fp])
    on_hot = hot[r, c]
    n_hot, n_other = int(hot.sum()), int(hot.size - hot.sum())
    # emitters within 1.5 px (centre to centre) of a hot pixel: a 5 x 5 neighbourhood test on the true pixel
    near = np.zeros_like(hot)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near |= np.roll(np.roll(hot, dy, 0), dx, 1)
    tr, tc = pixels(truth.iloc[gi])
    err = np.hypot(table["x"].to_numpy()[pi] - truth["x"].to_numpy()[gi],
                   table["y"].to_numpy()[pi] - truth["y"].to_numpy()[gi])
    is_near = near[tr, tc]

    def rms(a):
        return float(np.sqrt(np.mean(a ** 2))) if len(a) else float("nan")

    return {"fp": int(fp.sum()), "fp_on_hot": int(on_hot.sum()), "hot_pixel_share": n_hot / hot.size,
            "fp_per_hot_pixel_frame": float(on_hot.sum()) / max(n_hot * n_frames, 1),
            "fp_per_other_pixel_frame": float((~on_hot).sum()) / max(n_other * n_frames, 1),
            "rmse_lat_near_hot": rms(err[is_near]), "rmse_lat_elsewhere": rms(err[~is_near]),
            "tp_near_hot": int(is_near.sum())}


def per_frame_counts(truth, table, n: int) -> dict[str, np.ndarray]:
    """Per test frame: true positives, false positives, false negatives, and the sums of squared x and y
    errors of the matches (nm²), for the paired bootstrap."""
    gi, pi = match_localizations(truth, table, dist_lat=250.0, use_z=False)
    frame = truth["frame"].to_numpy()[gi]
    tp = np.bincount(frame, minlength=n)
    dx2 = np.bincount(frame, (table["x"].to_numpy()[pi] - truth["x"].to_numpy()[gi]) ** 2, minlength=n)
    dy2 = np.bincount(frame, (table["y"].to_numpy()[pi] - truth["y"].to_numpy()[gi]) ** 2, minlength=n)
    n_pred = np.bincount(table["frame"].to_numpy(), minlength=n)
    n_true = np.bincount(truth["frame"].to_numpy(), minlength=n)
    return {"tp": tp, "fp": n_pred - tp, "fn": n_true - tp, "dx2": dx2, "dy2": dy2}


def paired_bootstrap(a: dict, b: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """95 % intervals of (b - a) for JI, RMSE x and RMSE y, resampling test frames (the same frames for both)."""
    rng = np.random.default_rng(seed)
    n = len(a["tp"])
    idx = rng.integers(0, n, (n_boot, n))

    def figures(c):
        tp, fp, fn = c["tp"][idx].sum(1), c["fp"][idx].sum(1), c["fn"][idx].sum(1)
        return {"jaccard": tp / np.maximum(tp + fp + fn, 1),
                "rmse_x": np.sqrt(c["dx2"][idx].sum(1) / np.maximum(tp, 1)),
                "rmse_y": np.sqrt(c["dy2"][idx].sum(1) / np.maximum(tp, 1))}

    fa, fb = figures(a), figures(b)
    return {k: [float(np.percentile(fb[k] - fa[k], 2.5)), float(np.percentile(fb[k] - fa[k], 97.5))] for k in fa}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=list(BUDGETS), default="cpu")
    parser.add_argument("--updates", type=int, default=None, help="optimizer updates per model (a multiple of 100)")
    parser.add_argument("--chip-seed", type=int, default=14, help="seed of the full-chip maps")
    parser.add_argument("--test-frames", type=int, default=None, help="frames of the held-out test movie")
    parser.add_argument("--out", default="outputs/scmos_variance_input", help="run folders")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--reuse-models", action="store_true",
                        help="reuse the models an earlier run with the same configs trained under --out")
    parser.add_argument("--only", choices=("without", "with"), default=None,
                        help="train this model only (two such runs can train side by side), then stop")
    args = parser.parse_args(argv)
    budget = BUDGETS[args.budget]
    updates = args.updates if args.updates is not None else budget["updates"]
    out = Path(args.out) / args.budget
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")

    maps = make_chip_maps(args.chip_seed, budget["chip"])
    chip_file = out / "chip_maps.npz"
    tmp = out / f".chip_maps.{os.getpid()}.npz"  # two --only runs may write it at once: the same bytes, atomically
    np.savez(tmp, **maps)
    os.replace(tmp, chip_file)
    qe = PHYSICS["simulation"]["camera"]["qe"]
    var = variance_photons2(maps, qe)
    median = float(np.median(var))
    base = copy.deepcopy(PHYSICS)
    base["simulation"]["camera"]["scmos_maps"] = str(chip_file.resolve())
    overrides = list(budget["overrides"]) + (pipeline.update_budget(updates) if updates else [])

    models = (("without", False), ("with", True))
    histories = {}
    for name, flag in models:
        if args.only and name != args.only:
            continue
        config = load_config_data(base, overrides + [f"model.variance_input={str(flag).lower()}"])
        total = config.training_strategy.epochs * config.data.steps_per_epoch
        print(f"\n=== {name} the variance input: {config.model.architecture}/{config.model.preset} on "
              f"{config.simulation.frame.height}x{config.simulation.frame.width} px crops, {total} updates", flush=True)
        summary = out / name / "training_summary.json"
        if args.reuse_models and summary.is_file() and (out / name / "export").is_dir():
            # the model an earlier run trained with the same config (its operating point is in the export)
            history = json.loads(summary.read_text())
            changes = pipeline.config_changes(history.get("config"), config)
            if changes:
                raise SystemExit(f"{summary}: --reuse-models found a model trained with another config "
                                 f"({', '.join(changes[:5])}); drop --reuse-models or use another --out")
            history["export_dir"] = out / name / "export"
            print(f"reusing the model trained earlier in {out / name} ({history['global_step']} updates)", flush=True)
        else:
            history = pipeline.train_model(config, out / name, cpu=True, progress=True,
                                           operating_point=budget["operating_point"])
            keep = ("global_step", "train_seconds", "learning_curve", "operating_point")
            pipeline.write_json({"config": config.model_dump(mode="json"), **{k: history[k] for k in keep}}, summary)
        pipeline.plot_learning_curve(history["learning_curve"], out / name / "learning_curve.png",
                                     f"{name} the variance input")
        histories[name] = history
    if args.only:
        print(f"trained '{args.only}' only; run again with --reuse-models to evaluate both")
        return 0

    # the test movie: a bigger region of the chip than the training crops, at a fixed place, on a held-out seed
    th, tw = budget["test_size"]
    roi = tuple(budget["test_roi"])
    plain_config = load_config_data(base, overrides)
    data = plain_config.simulation.model_dump()
    data["frame"].update(height=th, width=tw)
    data["camera"].update(roi_origin=list(roi), scmos_training_crop="roi")
    test_sim = type(plain_config.simulation).model_validate(data)
    n_test = args.test_frames or budget["test_frames"]
    test = pipeline.simulate_held_out_movie(test_sim, n_test, pipeline.held_out_seed(14), out, name="test")
    hot = var[roi[0]:roi[0] + th, roi[1]:roi[1] + tw] >= HOT_FACTOR * median
    px = float(test_sim.frame.px_size)
    print(f"\nchip {budget['chip'][0]}x{budget['chip'][1]} px (seed {args.chip_seed}): read-noise variance median "
          f"{median:.2f} photons², {100 * float(np.mean(var >= HOT_FACTOR * median)):.1f} % hot pixels "
          f"(>= {HOT_FACTOR:g}x), largest {float(var.max()) / median:.0f}x; test movie {n_test} frames of {th}x{tw} px "
          f"at (row {roi[0]}, col {roi[1]}), seed {test.seed}, {len(test.truth)} true emitter-frames", flush=True)

    results, counts = {}, {}
    for name, flag in models:
        history = histories[name]
        t0 = time.perf_counter()
        table = predict(history["export_dir"], test.tiff, camera_roi=roi, progress=False,
                        out=out / name / "test_locs.csv")
        seconds = time.perf_counter() - t0
        scores = pipeline.evaluate_table(table, test, test_sim)
        point = history.get("operating_point") or {}
        results[name] = {"variance_input": flag, "train_updates": history["global_step"],
                         "train_seconds": history["train_seconds"], "threshold": point.get("threshold"),
                         "predict_seconds": seconds, "n_locs": len(table), "all": scores["all"],
                         "bright": scores["bright"], "hot_pixels": hot_pixel_figures(test.truth, table, hot, px, n_test)}
        counts[name] = per_frame_counts(test.truth, table, n_test)

    interval = paired_bootstrap(counts["without"], counts["with"])
    rows = [("JI", "jaccard", "all", "{:.3f}"), ("precision", "precision", "all", "{:.3f}"),
            ("recall", "recall", "all", "{:.3f}"), ("RMSE x (nm)", "rmse_x", "all", "{:.1f}"),
            ("RMSE y (nm)", "rmse_y", "all", "{:.1f}"), ("JI (bright)", "jaccard", "bright", "{:.3f}"),
            ("RMSE lat, bright", "rmse_lat", "bright", "{:.1f}")]
    lines = [f"{'metric':<34}{'without':>12}{'with':>12}{'with - without (95 % CI)':>30}"]
    for label, key, cond, fmt in rows:
        a, b = results["without"][cond][key], results["with"][cond][key]
        ci = interval.get(key) if cond == "all" else None
        ci_text = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci and key == "jaccard" else \
            (f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
        lines.append(f"{label:<34}{fmt.format(a):>12}{fmt.format(b):>12}{(f'{b - a:+.3f} ' + ci_text):>30}")
    hp = [("false positives", "fp", "{:d}"), ("false positives on hot pixels", "fp_on_hot", "{:d}"),
          ("FP per hot pixel and frame", "fp_per_hot_pixel_frame", "{:.2e}"),
          ("FP per other pixel and frame", "fp_per_other_pixel_frame", "{:.2e}"),
          ("RMSE lat within 1.5 px of hot (nm)", "rmse_lat_near_hot", "{:.1f}"),
          ("RMSE lat elsewhere (nm)", "rmse_lat_elsewhere", "{:.1f}")]
    for label, key, fmt in hp:
        a, b = results["without"]["hot_pixels"][key], results["with"]["hot_pixels"][key]
        lines.append(f"{label:<34}{fmt.format(a):>12}{fmt.format(b):>12}")
    lines.append(f"{'operating threshold':<34}{str(results['without']['threshold']):>12}"
                 f"{str(results['with']['threshold']):>12}")
    title = (f"sCMOS variance input, {updates or 'tiny'} updates each; held-out movie seed {test.seed}, {n_test} frames "
             f"of {th}x{tw} px, {len(test.truth)} emitter-frames; hot = >= {HOT_FACTOR:g}x the median variance "
             f"({100 * float(hot.mean()):.1f} % of the movie's pixels)")
    print("\n" + title + "\n" + "\n".join(lines))
    if args.json:
        pipeline.write_json({"date": started, "budget": args.budget, "command": " ".join(sys.argv),
                             "chip": {"seed": args.chip_seed, "shape": list(budget["chip"]), "median_photons2": median,
                                      "hot_factor": HOT_FACTOR, "hot_share": float(np.mean(var >= HOT_FACTOR * median)),
                                      "max_over_median": float(var.max()) / median},
                             "physics": PHYSICS, "updates": updates,
                             "test": {"seed": test.seed, "frames": n_test, "size": [th, tw], "roi": list(roi),
                                      "true_emitter_frames": len(test.truth)},
                             "results": results, "with_minus_without_95ci": interval, "table": [title, *lines]},
                            args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
