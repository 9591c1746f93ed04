"""``decode-accel calibrate``: fit the simulation to a recorded movie and write a training config
(:func:`decode_accel.calibration.calibrate`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from decode_accel.calibration.calibrate import Estimate, calibrate, comparison_figure, write_config
from decode_accel.errors import DecodeAccelError


def _pair(text: str | None, flag: str) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        r, c = (int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise DecodeAccelError(f"'{text}' is not ROW,COL", field=flag, fix="give two integers, e.g. 0,128") from None
    return r, c


def calibrate_main(argv: list[str]) -> int:
    """``decode-accel calibrate``."""
    p = argparse.ArgumentParser(prog="decode-accel calibrate",
                                description="Fit the simulation to a recorded movie; write a training config.")
    p.add_argument("--input", required=True, help="recorded movie, TIFF in ADU")
    p.add_argument("--out", required=True, help="config to write (YAML, a simulation: section)")
    p.add_argument("--png", help="comparison figure (default: OUT with .png)")
    p.add_argument("--px-size", type=float, help="pixel size in the sample plane (nm); default from the file")
    p.add_argument("--camera", choices=("scmos", "emccd", "perfect"), help="camera kind (default sCMOS/CCD-like)")
    p.add_argument("--baseline", type=float, help="camera offset (ADU); estimated when not given")
    p.add_argument("--e-per-adu", type=float, help="conversion (e-/ADU); estimated when not given")
    p.add_argument("--em-gain", type=float, help="EMCCD EM gain")
    p.add_argument("--qe", type=float, help="quantum efficiency; default 1 (photons = photoelectrons)")
    p.add_argument("--read-noise", type=float, help="read noise (e- rms)")
    p.add_argument("--scmos-maps", help=".npz with offset_adu, variance_adu2, e_per_adu maps (full chip or the movie's)")
    p.add_argument("--scmos-offset-map", help="offset map .npy/.tif (ADU)")
    p.add_argument("--scmos-variance-map", help="read-noise variance map .npy/.tif (ADU²)")
    p.add_argument("--scmos-e-per-adu-map", help="conversion map .npy/.tif (e-/ADU)")
    p.add_argument("--roi-origin", help="ROW,COL of the movie's top-left pixel on full-chip maps (px)")
    p.add_argument("--psf", choices=("gaussian", "astigmatic"), default="gaussian")
    p.add_argument("--bead-stack", help="astigmatic: bead z-stack TIFF (planes in z order)")
    p.add_argument("--z-step", type=float, help="astigmatic: z step of the bead stack (nm)")
    p.add_argument("--psf-calibration", help="astigmatic: another tool's calibration instead of a bead stack: "
                   "SMAP *_3dcal.mat (gauss_zfit) or ThunderSTORM .yaml")
    p.add_argument("--frame-size", type=int, default=40, help="training frame side written to the config (px)")
    p.add_argument("--threshold", type=float, default=5.0, help="detection threshold (robust sd)")
    p.add_argument("--no-match-density", action="store_true",
                   help="write the counted density instead of matching simulated detections to the movie's")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated comparison frames")
    a = p.parse_args(argv)
    res = calibrate(a.input, px_size=a.px_size, camera=a.camera, baseline=a.baseline, e_per_adu=a.e_per_adu,
                    em_gain=a.em_gain, qe=a.qe, read_noise=a.read_noise, scmos_maps=a.scmos_maps,
                    scmos_offset_map=a.scmos_offset_map, scmos_variance_map=a.scmos_variance_map,
                    scmos_e_per_adu_map=a.scmos_e_per_adu_map, roi_origin=_pair(a.roi_origin, "--roi-origin"),
                    psf=a.psf, bead_stack=a.bead_stack, z_step=a.z_step, psf_calibration=a.psf_calibration,
                    frame_size=a.frame_size, threshold=a.threshold,
                    match_density=not a.no_match_density)
    png = a.png or str(Path(a.out).with_suffix(".png"))
    figs = comparison_figure(res, png, seed=a.seed)
    res.estimates.append(Estimate("KS distance, pixel values", figs["ks_pixels"], None, "-", "check",
                                  "recorded vs simulated from this config (0 = same distribution)"))
    res.estimates.append(Estimate("KS distance, spot photons", figs["ks_photons"], None, "-", "check",
                                  f"detections/frame {figs['counts_real']:.1f} recorded vs {figs['counts_sim']:.1f} simulated"))
    write_config(res, a.out)
    print(res.table())
    print(f"wrote {a.out} and {png}")
    return 0
