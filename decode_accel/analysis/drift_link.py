"""Drift correction (Picasso RCC or AIM undrift) and linking (Picasso link) of a Picasso HDF5 localization file.

Nothing here re-implements Picasso: the functions load the file with ``picasso.io``, call
``picasso.postprocess.undrift`` (redundant cross-correlation, Wang et al. 2014),
``picasso.aim.aim`` (adaptive intersection maximization, Ma et al. 2024) and
``picasso.postprocess.link``, and write the results back with ``picasso.io.save_locs``.

Units: Picasso files hold x, y in camera px (pixel centres at integers) and frames 0-based; the
drift returned here is in nm (x along columns, y along rows), one row per frame, and is what was
subtracted from the localizations. Its stated error comes from a split-half test: the
localizations are split at random into two halves, each half is undrifted on its own, and the
per-frame error of the full estimate is taken as RMS(d₁ − d₂)/2 (two independent halves each have
twice the variance of the whole).

    decode-accel postprocess --input locs.hdf5 --out locs_undrift_link.hdf5 --undrift rcc --link
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from decode_accel.errors import DecodeAccelError

__all__ = ["DriftResult", "load_locs", "save_locs", "undrift", "link_blinks", "postprocess"]


@dataclass
class DriftResult:
    """Estimated drift.

    Attributes:
        drift_nm: DataFrame with columns frame, x, y (nm), one row per frame (what was subtracted).
        error_nm: (x, y) stated 1-sd error of the drift per frame (nm), from the split-half test;
            NaN when not computed.
        method: 'rcc' or 'aim'.
    """

    drift_nm: pd.DataFrame
    error_nm: tuple[float, float]
    method: str


@contextlib.contextmanager
def quiet_picasso():
    """Picasso prints progress and may warn about fonts or audio; keep the CLI output readable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


def _picasso():
    try:
        with quiet_picasso():
            from picasso import aim, io as pio, postprocess as ppost  # noqa: F401
    except ImportError:  # pragma: no cover - picassosr is a dependency
        raise DecodeAccelError("Picasso is not installed", field="picassosr",
                               fix="pip install picassosr") from None
    return pio, ppost, aim


def load_locs(path: str | os.PathLike) -> tuple[pd.DataFrame, list[dict]]:
    """Read a Picasso HDF5 file and its YAML sidecar (Width, Height, Frames, Pixelsize) with ``picasso.io``."""
    pio, _, _ = _picasso()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DecodeAccelError("localization file not found", path=path, field="--input",
                               fix="give the .hdf5 that decode-accel predict wrote")
    yaml_path = str(Path(path).with_suffix(".yaml"))
    if not os.path.exists(yaml_path):
        raise DecodeAccelError("the YAML sidecar is missing", path=yaml_path, field="--input",
                               fix="keep the .yaml that decode-accel predict wrote next to the .hdf5")
    try:
        with quiet_picasso():
            locs, info = pio.load_locs(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad user file
        raise DecodeAccelError(f"not a readable Picasso HDF5 file ({type(err).__name__})", path=path, field="locs",
                               fix="give a file written by decode-accel predict or Picasso") from None
    if not isinstance(locs, pd.DataFrame):
        locs = pd.DataFrame.from_records(np.asarray(locs))
    for key in ("Width", "Height", "Frames"):
        if not any(isinstance(d, dict) and key in d for d in info):
            raise DecodeAccelError(f"the sidecar has no {key}", path=yaml_path, field=key,
                                   fix="write it with decode-accel predict (Width, Height, Frames, Pixelsize)")
    for col in ("frame", "x", "y"):
        if col not in locs.columns:
            raise DecodeAccelError(f"no '{col}' column", path=path, field="locs", fix="give a localization file")
    return locs, info


def save_locs(path: str | os.PathLike, locs: pd.DataFrame, info: list[dict], step: dict) -> None:
    """Write locs with ``picasso.io.save_locs``, adding ``step`` to the sidecar (Picasso's history)."""
    pio, _, _ = _picasso()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with quiet_picasso():
        pio.save_locs(os.fspath(path), locs, list(info) + [step])


def _pixelsize(info: list[dict]) -> float:
    for d in info:
        if isinstance(d, dict) and "Pixelsize" in d:
            return float(d["Pixelsize"])
    raise DecodeAccelError("the sidecar has no Pixelsize", field="Pixelsize",
                           fix="write the file with decode-accel predict (it stores the pixel size)")


def _frames(info: list[dict]) -> int:
    return int(next(d["Frames"] for d in info if isinstance(d, dict) and "Frames" in d))


def _run_undrift(locs, info, method, segmentation, aim_kwargs):
    _, ppost, aim = _picasso()
    with quiet_picasso():
        if method == "rcc":
            drift, new = ppost.undrift(locs, info, segmentation, display=False)
        else:
            new, _, drift = aim.aim(locs, info, segmentation=segmentation, **aim_kwargs)
    return pd.DataFrame(drift)[["x", "y"]].to_numpy(np.float64), new


def undrift(locs: pd.DataFrame, info: list[dict], *, method: str = "rcc", segmentation: int = 1000,
            error: bool = True, seed: int = 0, intersect_d_nm: float = 20.0, roi_r_nm: float = 60.0
            ) -> tuple[pd.DataFrame, DriftResult]:
    """Undrift localizations with Picasso (RCC or AIM); returns (undrifted locs, :class:`DriftResult`).

    Args:
        locs, info: as from :func:`load_locs` (x, y in px).
        method: 'rcc' (``picasso.postprocess.undrift``) or 'aim' (``picasso.aim.aim``).
        segmentation: frames per segment (RCC: temporal segment length; AIM: interval length).
        error: also run the split-half test for a stated error (about twice the time).
        intersect_d_nm, roi_r_nm: AIM's intersection distance and search radius (nm).
    """
    if method not in ("rcc", "aim"):
        raise DecodeAccelError(f"unknown undrift method '{method}'", field="--undrift", fix="use rcc or aim")
    n_frames = _frames(info)
    if segmentation < 1 or segmentation * 2 > n_frames:
        raise DecodeAccelError(f"segmentation {segmentation} frames leaves fewer than 2 segments in {n_frames} frames",
                               field="--segmentation", fix=f"give at most {max(n_frames // 2, 1)} frames per segment")
    if len(locs) < 10:
        raise DecodeAccelError(f"{len(locs)} localizations are too few to estimate drift", field="--undrift",
                               fix="undrift a longer or denser movie")
    px = _pixelsize(info)
    aim_kwargs = dict(intersect_d=intersect_d_nm / px, roi_r=roi_r_nm / px)
    try:
        drift_px, new = _run_undrift(locs, info, method, segmentation, aim_kwargs)
    except DecodeAccelError:
        raise
    except Exception as err:  # noqa: BLE001 - Picasso fails on too sparse data with assorted errors
        raise DecodeAccelError(f"Picasso's {method} undrift failed ({type(err).__name__}: {str(err)[:120]})",
                               field="--segmentation", fix="use longer segments (more localizations each)") from None
    err_nm = (float("nan"), float("nan"))
    if error:
        rng = np.random.default_rng(seed)
        half = rng.random(len(locs)) < 0.5
        parts = []
        for sel in (half, ~half):
            d, _ = _run_undrift(locs[sel].reset_index(drop=True), info, method, segmentation, aim_kwargs)
            parts.append(d - d.mean(0))
        diff = (parts[0] - parts[1]) * px
        err_nm = tuple(float(v) for v in np.sqrt(np.mean(diff ** 2, axis=0)) / 2.0)
    drift = pd.DataFrame({"frame": np.arange(len(drift_px)), "x": drift_px[:, 0] * px, "y": drift_px[:, 1] * px})
    return new, DriftResult(drift_nm=drift, error_nm=err_nm, method=method)


def link_blinks(locs: pd.DataFrame, info: list[dict], *, radius_nm: float | None = None,
                max_dark_time: int = 1) -> pd.DataFrame:
    """Link localizations of one molecule in consecutive frames into events with ``picasso.postprocess.link``.

    Args:
        radius_nm: largest distance between linked localizations (nm); default 5 x the median
            localization precision (lpx, lpy) of the file (two localizations of one molecule are
            further apart than 5 sigma in 0.2 % of cases).
        max_dark_time: frames a molecule may be missing inside one event (Picasso's max_dark_time).

    Returns:
        Picasso's linked table (x, y averaged, photons summed, ``len`` = frames from first to last,
        ``n`` = localizations merged).
    """
    _, ppost, _ = _picasso()
    px = _pixelsize(info)
    if radius_nm is None:
        if "lpx" not in locs.columns or "lpy" not in locs.columns:
            raise DecodeAccelError("no precision columns (lpx, lpy) to set the link radius", field="--link-radius",
                                   fix="give --link-radius NM")
        lp = np.nanmedian(np.concatenate([locs["lpx"].to_numpy(), locs["lpy"].to_numpy()]))
        radius_nm = 5.0 * float(lp) * px  # two localizations of one molecule differ by sqrt(2) sigma per axis: 0.2 % lie further
    if not (radius_nm > 0):
        raise DecodeAccelError(f"link radius must be > 0 nm, got {radius_nm}", field="--link-radius")
    if max_dark_time < 0:
        raise DecodeAccelError(f"max dark time must be >= 0, got {max_dark_time}", field="--max-dark-time")
    with quiet_picasso():
        linked = ppost.link(locs, info, r_max=radius_nm / px, max_dark_time=int(max_dark_time))
    linked.attrs["link_radius_nm"] = float(radius_nm)
    return linked


def postprocess(input_path: str | os.PathLike, out_path: str | os.PathLike, *, undrift_method: str | None = "rcc",
                segmentation: int = 1000, link: bool = True, radius_nm: float | None = None, max_dark_time: int = 1,
                drift_error: bool = True) -> dict:
    """Undrift and/or link a Picasso HDF5 file; write the result (+ YAML) and the drift table.

    Writes ``out_path`` (locs after undrift, before linking, when both are done: Picasso's
    ``_undrift`` file), ``<out>_link.hdf5`` for the linked events and ``<out>_drift.csv`` (frame,
    x, y in nm). Returns a summary dict.
    """
    if undrift_method is None and not link:
        raise DecodeAccelError("nothing to do", field="--undrift", fix="give --undrift rcc|aim and/or --link")
    locs, info = load_locs(input_path)
    out = Path(out_path)
    if out.suffix.lower() not in (".hdf5", ".h5"):
        raise DecodeAccelError("the output must be a Picasso .hdf5 file", path=out, field="--out",
                               fix="name it like locs_undrift.hdf5")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary: dict = {"input": os.fspath(input_path), "n_locs": int(len(locs))}
    if undrift_method is not None:
        locs, drift = undrift(locs, info, method=undrift_method, segmentation=segmentation, error=drift_error)
        d = drift.drift_nm
        d.to_csv(out.with_name(out.stem + "_drift.csv"), index=False)
        save_locs(out, locs, info, {"Generated by": "decode_accel postprocess (Picasso undrift)",
                                    "Method": undrift_method, "Segmentation": int(segmentation),
                                    "Drift error x (nm)": drift.error_nm[0], "Drift error y (nm)": drift.error_nm[1]})
        summary.update(drift_range_nm=(float(np.ptp(d["x"])), float(np.ptp(d["y"]))), drift_error_nm=drift.error_nm,
                       undrifted=os.fspath(out))
    if link:
        linked = link_blinks(locs, info, radius_nm=radius_nm, max_dark_time=max_dark_time)
        target = out if undrift_method is None else out.with_name(out.stem + "_link.hdf5")
        save_locs(target, linked, info, {"Generated by": "decode_accel postprocess (Picasso link)",
                                         "Maximum distance (nm)": linked.attrs["link_radius_nm"],
                                         "Max. transient dark frames": int(max_dark_time)})
        summary.update(n_events=int(len(linked)), link_radius_nm=linked.attrs["link_radius_nm"], linked=os.fspath(target),
                       mean_event_length=float(linked["len"].mean()) if len(linked) else 0.0)
    return summary
