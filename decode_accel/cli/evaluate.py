"""``decode-accel evaluate``: challenge metrics of a localization file against ground truth
(:func:`decode_accel.evaluation.evaluate`)."""

from __future__ import annotations

import argparse

from decode_accel.errors import DecodeAccelError
from decode_accel.evaluation.crlb import GaussianPSF
from decode_accel.evaluation.metrics import evaluate, format_report
from decode_accel.io import read_table
from decode_accel.io._json import write_json


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line user error instead of SystemExit
        raise DecodeAccelError(message, field="decode-accel evaluate", fix="see decode-accel evaluate --help")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="decode-accel evaluate",
                 description="Match localizations to ground truth frame by frame (SMLM Challenge 2016 rules) "
                             "and print JI, RMSE, efficiency and more.")
    ap.add_argument("--gt", required=True, help="ground-truth table (.csv ThunderSTORM or .hdf5 Picasso)")
    ap.add_argument("--pred", required=True, help="localization table (.csv or .hdf5)")
    ap.add_argument("--json", help="also write the metrics to this JSON file")
    ap.add_argument("--px-size", type=float, default=None,
                    help="pixel size (nm): for Picasso files without YAML and for the CRLB (default 100)")
    ap.add_argument("--optimal", action="store_true", help="optimal (Hungarian) instead of greedy matching")
    ap.add_argument("--dist-lat", type=float, default=250.0, help="lateral matching gate (nm, default 250)")
    ap.add_argument("--dist-ax", type=float, default=500.0, help="axial matching gate (nm, default 500)")
    ap.add_argument("--2d", dest="two_d", action="store_true", help="ignore z (default: 3D when any z is non-zero)")
    ap.add_argument("--min-photons", type=float, default=None, help="exclude ground truth below this (photons)")
    ap.add_argument("--min-photons-quantile", type=float, default=None,
                    help="exclude ground truth below this quantile of its photons (challenge: 0.25)")
    ap.add_argument("--border", type=float, default=None, help="exclude this margin at the lateral borders (nm)")
    ap.add_argument("--fov", type=float, nargs=2, metavar=("W_NM", "H_NM"), default=None,
                    help="field of view (nm), needed with --border")
    ap.add_argument("--psf-sigma", type=float, default=None,
                    help="Gaussian PSF sigma (nm): adds RMSE/CRLB from the true photons and bg")
    ap.add_argument("--camera", choices=["poisson", "emccd"], default="poisson", help="noise model of the CRLB")
    ap.add_argument("--bg", type=float, default=None, help="background for the CRLB when the truth has none "
                                                          "(photons/px)")
    return ap


def evaluate_main(argv: list[str]) -> int:
    """Run ``decode-accel evaluate`` with ``argv`` (without the command name); returns the exit code.

    User errors raise DecodeAccelError (the CLI prints it as one line).
    """
    args = _parser().parse_args(argv)
    gt = read_table(args.gt, px_size_nm=args.px_size)
    pred = read_table(args.pred, px_size_nm=args.px_size)
    if args.psf_sigma is not None and not args.psf_sigma > 0:
        raise DecodeAccelError("must be > 0 nm", field="--psf-sigma")
    metrics = evaluate(gt, pred, method="optimal" if args.optimal else "greedy", dist_lat=args.dist_lat,
                       dist_ax=args.dist_ax, use_z=False if args.two_d else None, min_photons=args.min_photons,
                       min_photons_quantile=args.min_photons_quantile, border_nm=args.border,
                       fov_nm=tuple(args.fov) if args.fov else None,
                       psf=GaussianPSF(args.psf_sigma) if args.psf_sigma else None,
                       px_size_nm=args.px_size or 100.0, camera=args.camera, default_bg=args.bg)
    print(format_report(metrics))
    if args.json:
        write_json(metrics, args.json)
    return 0
