"""The ``decode-accel`` command line.

Every command line of the package lives in this package: ``simulate``, ``train`` and every recipe through
:func:`run_from_cli`, ``push`` and ``config-reference`` here; ``predict``, ``evaluate``, ``demo``, ``calibrate``
and ``postprocess`` in a module each (:mod:`decode_accel.cli.predict`, ...: its parser and its ``*_main``).
User errors become one line on stderr and a non-zero exit code (a traceback only with ``--debug``).
:func:`run_from_cli` parses a recipe's flags and runs the one run orchestration,
:func:`decode_accel.pipeline.train_model` (build, train, export, operating point). A recipe is::

    from decode_accel.cli import recipe_main
    if __name__ == "__main__":
        recipe_main("single_channel", description=__doc__.splitlines()[0])

and runs as ``python recipes/x.py``, ``accelerate launch [launcher flags] recipes/x.py [flags]`` or
``torchrun --nproc_per_node N recipes/x.py --cpu`` (flags are long and unambiguous because torchrun
abbreviation-matches script flags against its own).

    decode-accel simulate --config sim.yaml --out data/train.h5     write a simulated HDF5 dataset
    decode-accel train    [--config FILE.yaml] [key=value ...]       train (same as recipes/single_channel.py)
    decode-accel predict  --model DIR --input movie.tif --out locs.csv
    decode-accel evaluate --gt gt.csv --pred locs.csv [--json m.json]
    decode-accel push     --model DIR --repo-id user/name [--private]
    decode-accel demo     [--out DIR]                                train -> predict -> metrics on simulated data
    decode-accel config-reference                                   print the config reference (Markdown)
    decode-accel calibrate --input movie.tif --out sim.yaml [--px-size NM --scmos-maps calib.npz ...]
                                                                     fit the simulation to a recorded movie
    decode-accel postprocess --input locs.hdf5 --out out.hdf5 [--undrift rcc --link]
                                                                     drift correction and linking (Picasso)
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from decode_accel.errors import DecodeAccelError

# Each command imports the rooms it needs when it runs (the lines marked "per command"): a command then
# loads only its own rooms, e.g. predict starts without the training code and scipy, --help without torch.

EXIT_USER_ERROR = 2


def simulate_main(argv: list[str]) -> int:
    """``decode-accel simulate --config X.yaml --out data/train.h5 [--frames N] [--seed S] [--tiff M.tif --csv GT.csv]``.

    The config is a training config (any recipe config; its ``simulation`` section is used) or a bare
    simulation config (the keys of :class:`~decode_accel.simulation.config.SimulationConfig`).
    """
    import yaml  # per command

    from decode_accel.data.hdf5 import export_tiff_and_csv, simulate_to_file  # per command
    from decode_accel.simulation.config import SimulationConfig  # per command
    from decode_accel.training.config import load_config, load_config_data  # per command

    parser = argparse.ArgumentParser(prog="decode-accel simulate", description=simulate_main.__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML/JSON config (default: the built-in simulation defaults)")
    parser.add_argument("--out", required=True, help="output HDF5 file (.h5)")
    parser.add_argument("--frames", type=int, default=1000, help="number of consecutive frames")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: simulation.seed of the config)")
    parser.add_argument("--tiff", default=None, help="also write the movie as a uint16 ADU TIFF")
    parser.add_argument("--csv", default=None, help="also write the ground truth as a ThunderSTORM CSV")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. simulation.emitters.density=0.5")
    args = parser.parse_args(argv)
    sim_keys = set(SimulationConfig.model_fields)
    raw = {}
    if args.config is not None:
        path = Path(args.config)
        if not path.exists():
            raise DecodeAccelError("config file not found", path=path, fix="check the path given to --config")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise DecodeAccelError(f"not valid YAML ({str(err).splitlines()[0]})", path=path) from None
    if isinstance(raw, dict) and raw and "simulation" not in raw and "base" not in raw and set(raw) <= sim_keys:
        # a bare simulation config: validated as the `simulation` section, every override prefixed
        overrides = [o if o.startswith("simulation.") else f"simulation.{o}" for o in args.overrides]
        config = load_config_data({"simulation": raw}, overrides, source=args.config).simulation
    else:
        config = load_config(args.config, args.overrides).simulation
    out = simulate_to_file(config, args.frames, args.out, seed=args.seed)
    print(f"wrote {out} ({args.frames} frames of {config.frame.height}x{config.frame.width} px, "
          f"{config.channels.n_channels} channel(s))")
    if args.tiff or args.csv:
        tiff = args.tiff or str(Path(args.out).with_suffix(".tif"))
        csv = args.csv or str(Path(args.out).with_name(Path(args.out).stem + "_truth.csv"))
        export_tiff_and_csv(out, tiff, csv)
        print(f"wrote {tiff} and {csv}")
    return 0


def parse_recipe_args(argv: list[str], description: str = "") -> argparse.Namespace:
    """The recipes' flags (see :func:`run_from_cli`)."""
    from decode_accel.training.settings import PRECISIONS  # per command

    parser = argparse.ArgumentParser(
        description=description or "Train a decode_accel network on on-the-fly simulated data.",
        allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: dotted config keys, e.g. training_strategy.epochs=5 data.batch_size=8\n"
               "multi-process CPU: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 RECIPE "
               "--cpu")
    parser.add_argument("--config", default=None, help="YAML/JSON config; defaults to the recipe's own")
    parser.add_argument("--output_dir", default=None,
                        help="run folder: checkpoints/, logs/ and export/ go inside (overrides those paths)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (needed for multi-process CPU runs)")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--mixed_precision", default=None, choices=list(PRECISIONS),
                        help="override the config and launcher (no = fp32)")
    parser.add_argument("--teacher", default=None, help="teacher export folder (distillation recipes)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides key=value")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise DecodeAccelError(f"override {bad[0]!r} is not key=value", field="overrides",
                               fix="write e.g. training_strategy.epochs=5")
    return args


def run_from_cli(argv: list[str], default_config: str | os.PathLike | None = None, description: str = "",
                 require_teacher: bool = False) -> dict:
    """Parse recipe flags, load the config and run :func:`decode_accel.pipeline.train_model` (build, train,
    export, then the operating point); returns the history.

    Flags: ``--config FILE.yaml``, ``key=value`` overrides, ``--cpu``, ``--resume``, ``--output_dir DIR``,
    ``--mixed_precision {no,bf16,fp16,fp8}``, ``--teacher DIR``. ``operating_point.enable=false`` skips the
    operating point (quick runs).
    """
    from decode_accel.training.builders import resolve_default_config  # per command
    from decode_accel.training.config import load_config  # per command

    args = parse_recipe_args(list(argv), description)
    overrides = list(args.overrides)
    if args.teacher is not None:
        overrides.append(f"distillation.teacher={args.teacher}")
    config = load_config(args.config or resolve_default_config(default_config), overrides)
    if require_teacher and not config.distillation.teacher:
        raise DecodeAccelError("this recipe needs a teacher", field="distillation.teacher",
                               fix="pass --teacher EXPORT_DIR (the export folder of a trained model)")
    # the run's rooms load once the config is known to be valid (a config error is reported without them)
    from accelerate import PartialState  # per command

    from decode_accel.pipeline import train_model  # per command
    from decode_accel.training.preemption import PreemptionHook  # per command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM/SIGINT (cluster pre-emption, Ctrl-C) -> checkpoint at the next update, then exit; rerun with --resume
    history = train_model(config, args.output_dir, cpu=True if args.cpu else None,
                          mixed_precision=args.mixed_precision, resume=args.resume, hooks=(PreemptionHook(),),
                          run_dir_field="--output_dir")
    state = PartialState()
    state.print(f"done: best val_loss {history['best_val_loss']} at epoch {history['best_epoch']}, "
                f"{history['total_time']:.1f} s; export in {history['export_dir']}")
    point = history["operating_point"]
    state.print("operating point: skipped (operating_point.enable=false)" if point is None else
                f"operating point: threshold {point['threshold']:g}, precision {point['precision']:.3f}, recall "
                f"{point['recall']:.3f}, probabilities calibrated: "
                f"{'yes' if point.get('probability_calibration') else 'no (too few detections)'}; chosen on "
                f"{point['chosen_on']}")
    return history


def recipe_main(default_config: str, description: str = "", require_teacher: bool = False) -> None:
    """The ``__main__`` of a recipe: :func:`run_from_cli` on ``sys.argv``; a user error is one line
    (``error: ...``) on stderr and exit code 2."""
    try:
        run_from_cli(sys.argv[1:], default_config=default_config, description=description,
                     require_teacher=require_teacher)
    except DecodeAccelError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def push_main(argv: list[str]) -> int:
    """``decode-accel push --model EXPORT_DIR --repo-id user/name [--private] [--token T]``."""
    from decode_accel.hub import push_to_hub  # per command

    parser = argparse.ArgumentParser(prog="decode-accel push", description=push_main.__doc__)
    parser.add_argument("--model", required=True, help="export folder written by training (export_model)")
    parser.add_argument("--repo-id", required=True, help="Hub model id, user/name")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN)")
    args = parser.parse_args(argv)
    info = push_to_hub(args.model, args.repo_id, private=args.private, token=args.token)
    print(f"pushed {args.model} to {args.repo_id}" + (f" ({getattr(info, 'commit_url', '')})" if info else ""))
    return 0


def _train(argv: list[str]) -> int:
    run_from_cli(argv, default_config="single_channel")
    return 0


def _predict(argv: list[str]) -> int:
    from decode_accel.cli.predict import predict_main  # per command

    return predict_main(argv)


def _evaluate(argv: list[str]) -> int:
    from decode_accel.cli.evaluate import evaluate_main  # per command

    return evaluate_main(argv)


def _demo(argv: list[str]) -> int:
    from decode_accel.cli.demo import demo_main  # per command

    return demo_main(argv)


def _config_reference(argv: list[str]) -> int:
    from decode_accel.training.config import config_reference_markdown  # per command

    print(config_reference_markdown())
    return 0


def _calibrate(argv: list[str]) -> int:
    from decode_accel.cli.calibrate import calibrate_main  # per command

    return calibrate_main(argv)


def _postprocess(argv: list[str]) -> int:
    from decode_accel.cli.postprocess import postprocess_main  # per command

    return postprocess_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "simulate": simulate_main,
    "train": _train,
    "predict": _predict,
    "evaluate": _evaluate,
    "push": push_main,
    "demo": _demo,
    "config-reference": _config_reference,
    "calibrate": _calibrate,
    "postprocess": _postprocess,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``decode-accel`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else EXIT_USER_ERROR
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"decode-accel: error: unknown command '{command}'{hint}; commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        code = COMMANDS[command](rest)
    except DecodeAccelError as err:
        if debug:
            raise
        print(f"decode-accel {command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # missing file, permission, disk full, read-only file system, ...
        if debug:
            raise
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"decode-accel {command}: error: {err.strerror or err}{where} (add --debug for details)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"decode-accel {command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
