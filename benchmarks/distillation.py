"""Knowledge distillation: does a small student trained with a teacher beat the same student trained alone?

Both students start from the same initial weights, see the same simulated stream (scenario (a) physics,
CPU settings of benchmarks/accuracy.py) for the same number of optimizer updates; the distilled one adds
the SMLM distillation loss (Bernoulli KL on the detection logits + p-weighted Gaussian KLs of photons and
positions, decode_accel.loss.distillation) from a frozen teacher, blended with the ground-truth loss by
``alpha``. Thresholds are tuned per model on a tuning movie; all are scored on one held-out test movie.

    python benchmarks/distillation.py --teacher benchmarks/results/accuracy/cpu/a_2d_low_density/export \
        --updates 600 --json benchmarks/results/distillation.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import BUDGETS, tune_our_threshold  # noqa: E402

from decode_accel import pipeline  # noqa: E402
from decode_accel.training.config import load_config  # noqa: E402

SCENARIO = ROOT / "recipes" / "configs" / "benchmark" / "a_2d_low_density.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="export folder of the teacher (e.g. from accuracy.py)")
    parser.add_argument("--student-preset", default="tiny")
    parser.add_argument("--updates", type=int, default=600, help="optimizer updates of each student")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher term")
    parser.add_argument("--test-frames", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/distillation")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    out = Path(args.out)
    cpu = BUDGETS["cpu"]
    steps = min(100, args.updates)
    epochs = max(1, -(-args.updates // steps))
    common = cpu["overrides"] + [f"model.preset={args.student_preset}", f"data.steps_per_epoch={steps}",
                                 f"training_strategy.epochs={epochs}"]
    test_config = load_config(SCENARIO, common)
    train_common = common + pipeline.training_physics_overrides(test_config, cpu["min_train_density"])
    sim = pipeline.test_simulation(test_config.simulation)
    tune = pipeline.simulate_held_out_movie(sim, 60, pipeline.held_out_seed(1050), out, name="tuning")
    test = pipeline.simulate_held_out_movie(sim, args.test_frames, pipeline.held_out_seed(50), out, name="test")

    rows = {}
    for name, extra in (("student alone", []),
                        ("student distilled", [f"distillation.teacher={Path(args.teacher).resolve()}",
                                               f"distillation.alpha={args.alpha}"])):
        config = load_config(SCENARIO, train_common + extra)
        print(f"training {name}: {config.model.preset}, {epochs * steps} updates", flush=True)
        history = pipeline.train_model(config, out / name.replace(" ", "_"), cpu=True)
        threshold = tune_our_threshold(history["export_dir"], tune, sim)
        result = pipeline.assess(history["export_dir"], test, sim, threshold=threshold)
        rows[name] = {"updates": history["global_step"], "train_seconds": history["train_seconds"],
                      "threshold": threshold, **result}
    threshold = tune_our_threshold(args.teacher, tune, sim)
    rows["teacher"] = {"threshold": threshold, **pipeline.assess(args.teacher, test, sim, threshold=threshold)}
    print(pipeline.format_table({k: v["all"] for k, v in rows.items()},
                                title=f"distillation, scenario (a), test seed {test.seed}, {test.n_frames} frames"))
    for k in ("student alone", "student distilled"):
        print(f"{k}: {rows[k]['updates']} updates in {rows[k]['train_seconds']:.0f} s, threshold {rows[k]['threshold']}")
    gain = rows["student distilled"]["all"]["jaccard"] - rows["student alone"]["all"]["jaccard"]
    print(f"JI gain from distillation: {gain:+.3f}")
    if args.json:
        pipeline.write_json({"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                             "teacher": args.teacher, "rows": rows, "ji_gain": gain}, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
