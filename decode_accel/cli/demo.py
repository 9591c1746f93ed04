"""``decode-accel demo``: the README's main job (train -> predict -> metrics on simulated data), CPU-friendly."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from decode_accel.io._json import write_json
from decode_accel.pipeline import (CPU_TRAINING_OVERRIDES, DEMO_UPDATES, assess, format_table, held_out_seed,
                                   plot_learning_curve, refresh_model_card, simulate_held_out_movie, test_simulation,
                                   train_model, training_physics_overrides, update_budget)
from decode_accel.training.config import load_config


def demo_main(argv: list[str]) -> int:
    """``decode-accel demo``: the README's main job (train -> predict -> metrics), CPU-friendly."""

    parser = argparse.ArgumentParser(prog="decode-accel demo", description=demo_main.__doc__)
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--config", default="recipes/configs/benchmark/a_2d_low_density.yaml",
                        help="training config (scenario); default: 2D low density, challenge camera")
    parser.add_argument("--updates", type=int, default=DEMO_UPDATES,
                        help="optimizer updates (a multiple of 100); the same model on any machine, only slower")
    parser.add_argument("--test-frames", type=int, default=300,
                        help="frames of the held-out movie (300: the mean error is known to about 0.5 nm)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    try:
        budget = update_budget(args.updates)
    except ValueError as err:
        parser.error(str(err))
    overrides = CPU_TRAINING_OVERRIDES + budget + list(args.overrides)
    test_config = load_config(args.config, overrides)
    config = load_config(args.config, overrides + training_physics_overrides(test_config))
    print(f"[1/3] training {config.model.architecture} ({config.model.preset}) on simulated "
          f"{config.simulation.frame.height}x{config.simulation.frame.width} px frames at "
          f"{config.simulation.emitters.density:g} emitters/µm² for {args.updates} updates (CPU)", flush=True)
    history = train_model(config, out / "run", cpu=True, progress=True,
                          target_simulation=test_config.simulation)
    point = history["operating_point"]
    print(f"      {history['global_step']} updates in {history['train_seconds']:.0f} s, "
          f"{history['samples_per_s']:.1f} samples/s; model exported to {history['export_dir']}; "
          f"operating threshold {point['threshold']:g} (chosen on tuning movie seed {point['tuning_seed']}: "
          f"precision {point['precision']:.3f}, recall {point['recall']:.3f} on emitter-frames >= 25 % of the mean photons)")
    test_sim = test_simulation(test_config.simulation)
    movie = simulate_held_out_movie(test_sim, args.test_frames, held_out_seed(0), out, name="held_out")
    print(f"[2/3] predicting the held-out movie {movie.tiff} ({movie.n_frames} frames, "
          f"{len(movie.truth)} true emitter-frames, seed {movie.seed}) with predict's defaults")
    result = assess(history["export_dir"], movie, test_sim, out_table=out / "held_out_locs.csv",
                    trust_png=out / "trust.png")
    print(f"      {result['n_locs']} localizations, {result['frames_per_s']:.1f} frames/s -> {out / 'held_out_locs.csv'}")
    print("[3/3] metrics against the truth (challenge-2016 matching, CRLB from each emitter's photons and background)")
    print(format_table({"all emitters": result["all"], "photons >= 25% of mean": result["bright"]}))
    grid = result["trust"]["gridding"]
    print("gridding (chi2/dof of the sub-pixel fractions, 1 = flat): "
          + ", ".join(f"{w} {a} {grid[f'{w}_{a}']['chi2_per_dof']:.2f}" for w in ("pred", "truth") for a in ("x", "y")))
    print("largest mean error in a tenth of a pixel (nm): " + ", ".join(
        f"{a} {np.nanmax(np.abs(r['bias'])):.2f} ({r['largest_z']:.1f} standard errors)"
        for a, r in grid["bias_by_subpixel"].items()))
    print("mean error at the frame border (nm): " + ", ".join(
        f"{a} {side} {r['bias']:+.1f} ± {r['standard_error']:.1f}" for a, sides in grid["bias_at_border"].items()
        for side, r in sides.items() if side != "inside"))
    refresh_model_card(history["export_dir"], result, movie, config)
    write_json({"history": {k: v for k, v in history.items() if k != "learning_curve"}, "assess": result},
               out / "metrics.json")
    plot_learning_curve(history["learning_curve"], out / "learning_curve.png", "demo training loss")
    print(f"metrics: {out / 'metrics.json'}; learning curve: {out / 'learning_curve.png'}; trust figure: {out / 'trust.png'}")
    return 0
