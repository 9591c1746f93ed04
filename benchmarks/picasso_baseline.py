"""Classical baseline for the benchmarks: Picasso (``picassosr``) MLE Gaussian fitting.

Picasso reports x, y in camera pixels with pixel centres at integers; we convert to our table
convention (nm, origin at the top-left image corner): x_nm = (x_px + 0.5) * px. Picasso's photons are
detected photons (it does not divide by QE), matching our ``photons`` column.

The identification threshold ("Min. Net Gradient", in ADU-scaled units) must be tuned once per camera
and density: :func:`tune_min_net_gradient` does that on a separate tuning movie, never on the movie
that is reported.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd


def picasso_available() -> bool:
    try:
        import picasso.localize  # noqa: F401
    except Exception:  # pragma: no cover - optional dependency
        return False
    return True


def picasso_localize(frames_adu: np.ndarray, *, baseline: float, e_per_adu: float, em_gain: float, qe: float,
                     px_size_nm: float, min_net_gradient: float, box: int = 7,
                     method: str = "gaussmle", threaded: bool = False) -> tuple[pd.DataFrame, float]:
    """Localize a (T, H, W) ADU movie with Picasso; returns (table in nm, wall seconds of the fit)."""
    from picasso import localize

    movie = np.ascontiguousarray(frames_adu, dtype=np.uint16)
    camera = {"Baseline": float(baseline), "Sensitivity": float(e_per_adu), "Gain": float(em_gain),
              "Qe": float(qe), "Pixelsize": float(px_size_nm)}
    params = {"Min. Net Gradient": float(min_net_gradient), "Box Size": int(box)}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        locs = localize.localize_frames(movie, None, params, camera_info=camera, fitting_method=method,
                                        threaded=threaded)
    seconds = time.perf_counter() - t0
    locs = pd.DataFrame(locs)
    table = pd.DataFrame({
        "frame": locs["frame"].to_numpy(np.int64) if len(locs) else np.zeros(0, np.int64),
        "x": (locs["x"].to_numpy(np.float64) + 0.5) * px_size_nm if len(locs) else np.zeros(0),
        "y": (locs["y"].to_numpy(np.float64) + 0.5) * px_size_nm if len(locs) else np.zeros(0),
        "z": np.zeros(len(locs)),
        "photons": locs["photons"].to_numpy(np.float64) if len(locs) else np.zeros(0),
        "id": np.arange(len(locs), dtype=np.int64),
    })
    if len(locs):
        table["x_sigma"] = locs["lpx"].to_numpy(np.float64) * px_size_nm
        table["y_sigma"] = locs["lpy"].to_numpy(np.float64) * px_size_nm
        table["bg"] = locs["bg"].to_numpy(np.float64)
    return table, seconds


def tune_min_net_gradient(frames_adu: np.ndarray, gt: pd.DataFrame, score, candidates=None, **camera) -> float:
    """Pick the Min. Net Gradient that maximises ``score(gt, table)`` (e.g. the JI) on a TUNING movie."""
    if candidates is None:
        candidates = np.geomspace(200, 20000, 9)
    best, best_score = float(candidates[0]), -np.inf
    for value in candidates:
        table, _ = picasso_localize(frames_adu, min_net_gradient=float(value), **camera)
        s = score(gt, table)
        if s > best_score:
            best, best_score = float(value), s
    return best


def main(argv=None) -> int:
    """``python benchmarks/picasso_baseline.py --movie m.tif --mng 2000 --out locs.csv``: one whole process,
    as a user would run Picasso (start-up and numba compilation included), for end-to-end timings."""
    import argparse

    ap = argparse.ArgumentParser(description="Localize a TIFF movie with Picasso (MLE Gaussian fit)")
    ap.add_argument("--movie", required=True, help="uint16 TIFF (T, H, W) in ADU")
    ap.add_argument("--mng", type=float, required=True, help="Min. Net Gradient (tune it on another movie)")
    ap.add_argument("--out", required=True, help="CSV (nm, 0-based frames)")
    ap.add_argument("--threaded", action="store_true", help="Picasso's threaded identification and fit")
    ap.add_argument("--baseline", type=float, default=100.0)
    ap.add_argument("--e-per-adu", type=float, default=45.0)
    ap.add_argument("--em-gain", type=float, default=300.0)
    ap.add_argument("--qe", type=float, default=0.9)
    ap.add_argument("--px-size-nm", type=float, default=100.0)
    args = ap.parse_args(argv)
    import tifffile

    table, _ = picasso_localize(tifffile.imread(args.movie), baseline=args.baseline, e_per_adu=args.e_per_adu,
                                em_gain=args.em_gain, qe=args.qe, px_size_nm=args.px_size_nm,
                                min_net_gradient=args.mng, threaded=args.threaded)
    table.to_csv(args.out, index=False)
    print(f"{len(table)} localizations -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
