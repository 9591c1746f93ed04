"""The ``decode-accel`` command line.

Each subcommand lives in the room of the data flow it belongs to; this module only dispatches and
turns user errors into one line on stderr and a non-zero exit code (a traceback only with ``--debug``).

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

import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


def _simulate(argv: list[str]) -> int:
    from decode_accel.data.hdf5 import simulate_main

    return simulate_main(argv)


def _train(argv: list[str]) -> int:
    from decode_accel.training.builders import run_from_cli

    run_from_cli(argv, default_config="single_channel")
    return 0


def _predict(argv: list[str]) -> int:
    from decode_accel.inference.predict import predict_main

    return predict_main(argv)


def _evaluate(argv: list[str]) -> int:
    from decode_accel.evaluation import evaluate_main

    return evaluate_main(argv)


def _push(argv: list[str]) -> int:
    from decode_accel.hub import push_main

    return push_main(argv)


def _demo(argv: list[str]) -> int:
    from decode_accel.pipeline import demo_main

    return demo_main(argv)


def _config_reference(argv: list[str]) -> int:
    from decode_accel.training.config import config_reference_markdown

    print(config_reference_markdown())
    return 0


def _calibrate(argv: list[str]) -> int:
    from decode_accel.calibration import calibrate_main

    return calibrate_main(argv)


def _postprocess(argv: list[str]) -> int:
    from decode_accel.analysis import postprocess_main

    return postprocess_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "simulate": _simulate,
    "train": _train,
    "predict": _predict,
    "evaluate": _evaluate,
    "push": _push,
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
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"decode-accel: error: unknown command '{command}'{hint}; commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return EXIT_USER_ERROR
    from decode_accel.errors import DecodeAccelError

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
