"""``decode-accel predict``: localize a movie with a trained (exported) model
(:func:`decode_accel.inference.predict`)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from decode_accel.errors import DecodeAccelError
# _reuse_large_blocks stays beside the glibc helpers it shares with predict; only a process of its own
# (this CLI) may call it
from decode_accel.inference.predict import DEFAULT_TILE_SIZE, _reuse_large_blocks, predict
from decode_accel.inference.render import render
from decode_accel.simulation.camera import parse_roi


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decode-accel predict",
                                description="Localize emitters in a TIFF movie with a trained (exported) model.")
    p.add_argument("--model", required=True, help="export folder or Hugging Face Hub id")
    p.add_argument("--input", action="append", required=True,
                   help="movie (TIFF/OME-TIFF); give it twice for two channels in two files")
    p.add_argument("--out", action="append", required=True,
                   help="output table: .csv (ThunderSTORM) and/or .hdf5 (Picasso + .yaml); may repeat")
    p.add_argument("--camera", help="camera YAML overriding the model's camera (ADU -> photons)")
    p.add_argument("--camera-roi", default=None, help="ROW,COL of the movie's top-left pixel on full-chip sCMOS maps "
                   "(px); default the camera's roi_origin, else the file's Micro-Manager ROI")
    p.add_argument("--batch-size", type=int, default=None, help="frames per network call")
    p.add_argument("--frames", default=None, help="0-based frame range A:B (B exclusive), e.g. 0:1000")
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE, help="tile edge in px (default 512)")
    p.add_argument("--threshold", type=float, default=None, help="detection threshold (probability); default: the "
                   "threshold the model was validated at (its export's operating point)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run (keeps <out>.parts/)")
    p.add_argument("--no-cache", action="store_true", help="recompute stage-1 features for every window")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="network runtime: torch, or onnx (ONNX Runtime on the CPU; pip install onnxruntime)")
    p.add_argument("--ignore-px-size", action="store_true",
                   help="do not compare the movie's pixel-size metadata with the model's")
    p.add_argument("--render", default=None, help="also render a super-resolution image (.png or .tif)")
    p.add_argument("--render-px", type=float, default=10.0, help="pixel size of the rendered image (nm)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def predict_main(argv: Sequence[str] | None = None) -> int:
    """``decode-accel predict ...``: returns the exit code (0 ok, 2 bad input)."""
    args = _build_parser().parse_args(argv)
    _reuse_large_blocks()  # this process is ours: no page faults per batch (issue 15.1)
    try:
        roi = parse_roi(args.camera_roi, "--camera-roi")
        df = predict(args.model, args.input if len(args.input) > 1 else args.input[0], out=args.out, camera_roi=roi,
                     camera=args.camera, batch_size=args.batch_size, frames=args.frames, tile_size=args.tile_size,
                     threshold=args.threshold, resume=args.resume, cache_features=not args.no_cache,
                     progress=not args.no_progress, device=args.device, check_px_size=not args.ignore_px_size,
                     backend=args.backend)
        if args.render:
            render(df, px_size_nm=args.render_px, out=args.render)
    except DecodeAccelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(df)} localizations -> {', '.join(args.out)}")
    return 0
