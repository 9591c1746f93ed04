"""``decode-accel postprocess``: drift correction and linking of a Picasso HDF5 file, through Picasso
(:func:`decode_accel.analysis.postprocess`)."""

from __future__ import annotations

import argparse

from decode_accel.analysis.drift_link import postprocess


def postprocess_main(argv: list[str]) -> int:
    """``decode-accel postprocess``."""
    p = argparse.ArgumentParser(prog="decode-accel postprocess",
                                description="Drift correction (Picasso RCC/AIM) and linking (Picasso link).")
    p.add_argument("--input", required=True, help="Picasso HDF5 from decode-accel predict (with its .yaml)")
    p.add_argument("--out", required=True, help="output .hdf5 (undrifted); linked events go to <out>_link.hdf5")
    p.add_argument("--undrift", choices=("rcc", "aim", "none"), default="rcc", help="drift correction method")
    p.add_argument("--segmentation", type=int, default=1000, help="frames per undrift segment")
    p.add_argument("--link", action="store_true", help="link blinks of one molecule into events")
    p.add_argument("--link-radius", type=float, help="link radius (nm); default 5 x median precision")
    p.add_argument("--max-dark-time", type=int, default=1, help="frames a molecule may be missing inside an event")
    p.add_argument("--no-drift-error", action="store_true", help="skip the split-half drift error (faster)")
    a = p.parse_args(argv)
    s = postprocess(a.input, a.out, undrift_method=None if a.undrift == "none" else a.undrift,
                    segmentation=a.segmentation, link=a.link, radius_nm=a.link_radius, max_dark_time=a.max_dark_time,
                    drift_error=not a.no_drift_error)
    if "drift_range_nm" in s:
        print(f"drift ({s['undrifted']}): range x {s['drift_range_nm'][0]:.1f} nm, y {s['drift_range_nm'][1]:.1f} nm; "
              f"stated error x {s['drift_error_nm'][0]:.1f} nm, y {s['drift_error_nm'][1]:.1f} nm")
    if "n_events" in s:
        print(f"linked {s['n_locs']} localizations into {s['n_events']} events ({s['linked']}), radius "
              f"{s['link_radius_nm']:.1f} nm, mean length {s['mean_event_length']:.2f} frames")
    return 0
