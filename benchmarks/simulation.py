"""Simulator throughput: frames per second for frame sizes, densities, channel counts and PSFs.

    python benchmarks/simulation.py                       # CPU (and CUDA if available), printed table
    python benchmarks/simulation.py --json sim.json       # also write the results
    python benchmarks/simulation.py --psf gaussian spline --threads 2

Each case simulates for about ``--seconds`` of wall time (after one warm-up call) with the challenge
EMCCD camera and uniform background, and reports frames/s of ``Simulator.sample`` (one correlated
movie of ``--movie-frames`` frames per call) and of ``Simulator.sample_windows`` (independent 3-frame
clips, 3 frames per clip counted). The spline PSF uses a synthetic 26 x 26 px calibration fitted to an
astigmatic Gaussian (the size of a typical SMAP calibration ROI).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import erf

from decode_accel.simulation import SimulationConfig, Simulator, save_smap_calibration, spline_coefficients


def synthetic_calibration(path: Path) -> None:
    """A SMAP-layout calibration of an astigmatic Gaussian: 27 x 27 px samples, 20 nm planes over ±750 nm."""
    n, ref, dz, nz = 27, 13, 20.0, 76
    z0 = (nz - 1) / 2
    off = np.arange(n) - ref
    stack = np.zeros((n, n, nz))

    def frac(d, s):
        return 0.5 * (erf((d + 0.5) / (np.sqrt(2) * s)) - erf((d - 0.5) / (np.sqrt(2) * s)))

    for k in range(nz):
        z = (k - z0) * dz
        sx = 1.2 * np.sqrt(1 + ((z + 250) / 400) ** 2)
        sy = 1.2 * np.sqrt(1 + ((z - 250) / 400) ** 2)
        stack[:, :, k] = frac(off[:, None], sy) * frac(off[None, :], sx)
    save_smap_calibration(path, spline_coefficients(stack), x0=ref + 1, z0=z0, dz=dz)


def make_config(size: int, density: float, channels: int, psf: str, spline_path: str | None) -> SimulationConfig:
    psf_cfg = {"kind": psf}
    if psf == "spline":
        psf_cfg["spline_path"] = spline_path
    ch = {"n_channels": channels}
    if channels == 2:
        ch["dyes"] = [{"ratio_mean": 0.3, "ratio_sd": 0.05, "probability": 1.0},
                      {"ratio_mean": 0.7, "ratio_sd": 0.05, "probability": 1.0}]
    return SimulationConfig.model_validate({
        "frame": {"height": size, "width": size, "px_size": 100.0},
        "emitters": {"density": density, "z_range": (-500.0, 500.0), "photons_mean": 5000.0, "photons_sd": 1500.0},
        "psf": psf_cfg, "background": {"uniform": (20.0, 100.0)}, "camera": {"preset": "challenge2016"},
        "channels": ch,
    })


def _rate(fn, frames_per_call: int, seconds: float, device: str) -> float:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn(0)  # warm-up (allocations, lazy inits, CUDA context)
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn(n + 1)
        n += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n * frames_per_call / elapsed


def run(devices: list[str], psfs: list[str], seconds: float, movie_frames: int, windows: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spline_path = str(Path(tmp) / "synthetic_3dcal.mat")
        if "spline" in psfs:
            synthetic_calibration(Path(spline_path))
        for device in devices:
            for psf in psfs:
                for size in (64, 256):
                    for density in (0.5, 2.0):
                        for channels in (1, 2):
                            sim = Simulator(make_config(size, density, channels, psf, spline_path))

                            def movie(seed):
                                sim.sample(movie_frames, torch.Generator(device).manual_seed(seed))

                            def clips(seed):
                                sim.sample_windows(windows, torch.Generator(device).manual_seed(seed))

                            row = {
                                "device": device, "psf": psf, "size": size, "density_per_um2": density,
                                "channels": channels, "emitters_per_frame": density * (size * 0.1) ** 2,
                                "roi_px": sim.psf.roi_size,
                                "sample_fps": _rate(movie, movie_frames, seconds, device),
                                "windows_fps": _rate(clips, 3 * windows, seconds, device),
                            }
                            rows.append(row)
                            print(f"{device:6s} {psf:10s} {size:4d}² {density:4.1f}/µm² {channels}ch "
                                  f"{row['emitters_per_frame']:7.0f} em/frame  roi {row['roi_px']:2d}  "
                                  f"sample {row['sample_fps']:9.1f} frames/s  windows {row['windows_fps']:9.1f} frames/s",
                                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--psf", nargs="+", default=["astigmatic"], choices=["gaussian", "astigmatic", "spline"])
    ap.add_argument("--seconds", type=float, default=1.0, help="wall time per measurement (s)")
    ap.add_argument("--movie-frames", type=int, default=64, help="frames per sample() call")
    ap.add_argument("--windows", type=int, default=32, help="clips per sample_windows() call")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    rows = run(devices, args.psf, args.seconds, args.movie_frames, args.windows)
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                "cuda": torch.cuda.get_device_name(0) if "cuda" in devices else None}
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
