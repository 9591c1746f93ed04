"""Challenge metrics of a localization table against ground truth.

Definitions (Sage et al., Nat Methods 16:387, 2019; DECODE's evaluation), for TP matched pairs with
errors dx, dy, dz = localization - truth (nm):

* precision = TP / (TP + FP), recall = TP / (TP + FN), JI = TP / (TP + FP + FN) (0-1), F1.
* RMSE_lat = sqrt(mean(dx^2 + dy^2)) (radial, NOT per axis), RMSE_ax = sqrt(mean(dz^2)),
  RMSE_vol = sqrt(mean(dx^2 + dy^2 + dz^2)); MAD_lat = mean(|dx| + |dy|), MAD_ax, MAD_vol likewise.
* efficiency E = 100 - sqrt((100 - 100 JI)^2 + alpha^2 RMSE^2) (%), alpha_lat = 1 nm^-1 with
  RMSE_lat, alpha_ax = 0.5 nm^-1 with RMSE_ax; E_vol = (E_lat + E_ax) / 2.
* optional photon threshold: ground truth dimmer than it is removed, and localizations matched to
  it count neither as TP nor as FP (the challenge's 25 % quantile variant).
* optional border exclusion: truth and localizations closer than ``border_nm`` to a lateral edge
  of the field of view are removed before matching.
* RMSE/CRLB per axis, pooled: sqrt(mean(dx^2)) / sqrt(mean(CRLB_x^2)) with the CRLB of each
  matched emitter from its true photons and background.
* uncertainty calibration: fraction of matched localizations with |dx| <= x_sigma (per axis);
  well-calibrated Gaussian errors give 0.683.
* two channels: ratio RMSE; colour crosstalk per true dye = fraction of the matched emitters of
  that dye that received a colour (not rejected) and got another dye's; rejection = fraction of
  matched emitters left unassigned (color -1).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from decode_accel.errors import DecodeAccelError
from decode_accel.evaluation.crlb import AstigmaticPSF, GaussianPSF, crlb_for_table
from decode_accel.evaluation.matching import METHODS, match_localizations
from decode_accel.inference.postprocess import as_dyes

ALPHA_LAT = 1.0  # nm^-1
ALPHA_AX = 0.5  # nm^-1


def efficiency(jaccard: float, rmse: float, alpha: float) -> float:
    """Challenge efficiency (%): 100 - sqrt((100 - 100 JI)^2 + alpha^2 RMSE^2), JI in 0-1, RMSE in nm."""
    return 100.0 - math.sqrt((100.0 - 100.0 * jaccard) ** 2 + (alpha * rmse) ** 2)


def _check_table(df: pd.DataFrame, name: str, needs: tuple[str, ...] = ("frame", "x", "y")) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise DecodeAccelError(f"expected a DataFrame, got {type(df).__name__}", field=name)
    for col in needs:
        if col not in df.columns:
            raise DecodeAccelError(f"the {name} table has no column {col!r}", field=f"{name}.{col}",
                                   fix="localization tables need frame, x, y (nm)")
    df = df.reset_index(drop=True)
    if "z" not in df.columns:
        df = df.assign(z=0.0)
    return df


def _inside(df: pd.DataFrame, border_nm: float, fov_nm: tuple[float, float]) -> np.ndarray:
    x, y = df["x"].to_numpy(np.float64), df["y"].to_numpy(np.float64)
    w, h = fov_nm
    return (x >= border_nm) & (x <= w - border_nm) & (y >= border_nm) & (y <= h - border_nm)


def _rms(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(np.sqrt(np.mean(a**2))) if len(a) else float("nan")


def _mean(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(np.mean(a)) if len(a) else float("nan")


def _true_dyes(gt: pd.DataFrame, dyes) -> np.ndarray | None:
    if "color" in gt.columns:
        return gt["color"].to_numpy(np.float64)
    if dyes is not None and "ratio" in gt.columns:
        means = np.array([d.ratio for d in as_dyes(dyes)], dtype=np.float64)
        r = gt["ratio"].to_numpy(np.float64)
        return np.argmin(np.abs(r[:, None] - means[None, :]), axis=1).astype(np.float64)
    return None


def evaluate(gt: pd.DataFrame, pred: pd.DataFrame, *, method: str = "greedy", dist_lat: float = 250.0,
             dist_ax: float = 500.0, use_z: bool | None = None, min_photons: float | None = None,
             min_photons_quantile: float | None = None, border_nm: float | None = None,
             fov_nm: tuple[float, float] | None = None, alpha_lat: float = ALPHA_LAT, alpha_ax: float = ALPHA_AX,
             psf: GaussianPSF | AstigmaticPSF | None = None, px_size_nm: float = 100.0, camera: str = "poisson",
             default_bg: Any = None, dye_table: Any = None) -> dict[str, Any]:
    """Compare localizations with ground truth (both tables in nm, frames 0-based).

    Args:
        gt, pred: localization tables (frame, x, y[, z, photons, bg, ratio, color, sigmas]).
        method: "greedy" (challenge) or "optimal" matching.
        dist_lat, dist_ax: matching gates (nm).
        use_z: match in 3D; default: when either table has a non-zero z.
        min_photons: exclude ground truth below this many photons (see module docstring).
        min_photons_quantile: the same with the threshold at this quantile of the true photons
            (the challenge uses 0.25).
        border_nm: exclude everything within this distance of a lateral border of ``fov_nm``.
        fov_nm: (width, height) of the field of view (nm); needed with ``border_nm``.
        alpha_lat, alpha_ax: efficiency weights (nm^-1).
        psf: PSF model for the CRLB (None: no CRLB ratios); positions of the truth in nm.
        px_size_nm: pixel size for the CRLB (nm).
        camera: "poisson" or "emccd" for the CRLB.
        default_bg: background (photons/px) for the CRLB when the truth has no bg column: one
            value, or one per frame (e.g. the simulator's uniform background of each frame).
        dye_table: dyes (list of Dye/dicts with ratio) to derive the true colour from the true
            ratio when the truth has no color column.

    Returns:
        dict of metrics (counts; precision, recall, jaccard, f1 in 0-1; rmse_*, mad_*, bias_* in nm;
        eff_* in %; calib_* in 0-1; rmse_over_crlb_*; ratio_rmse; crosstalk, rejection; ...).
        Metrics that cannot be computed are NaN.
    """
    if method not in METHODS:
        raise DecodeAccelError(f"unknown matching method {method!r}", field="method", fix=f"use one of {METHODS}")
    if not (dist_lat > 0 and dist_ax > 0):
        raise DecodeAccelError("matching gates must be > 0 nm", field="dist_lat/dist_ax")
    gt = _check_table(gt, "ground truth")
    pred = _check_table(pred, "prediction")
    if border_nm is not None:
        if fov_nm is None:
            raise DecodeAccelError("border exclusion needs the field of view", field="fov_nm",
                                   fix="pass fov_nm=(width_nm, height_nm) (CLI: --fov W H)")
        if border_nm < 0:
            raise DecodeAccelError("border must be >= 0 nm", field="border_nm")
        gt = gt[_inside(gt, border_nm, fov_nm)].reset_index(drop=True)
        pred = pred[_inside(pred, border_nm, fov_nm)].reset_index(drop=True)
    if use_z is None:
        use_z = bool(np.any(gt["z"].to_numpy(np.float64) != 0) or np.any(pred["z"].to_numpy(np.float64) != 0))

    gi, pi = match_localizations(gt, pred, method, dist_lat, dist_ax, use_z)

    # Photon threshold: dim truth leaves the evaluation together with whatever was matched to it.
    threshold = None
    if min_photons is not None or min_photons_quantile is not None:
        if "photons" not in gt.columns:
            raise DecodeAccelError("a photon threshold needs the true photons", field="ground truth.photons")
        photons = gt["photons"].to_numpy(np.float64)
        if min_photons_quantile is not None:
            if not (0 <= min_photons_quantile <= 1):
                raise DecodeAccelError("quantile must lie in [0, 1]", field="min_photons_quantile")
            threshold = float(np.quantile(photons, min_photons_quantile)) if len(photons) else 0.0
        if min_photons is not None:
            threshold = max(threshold or -np.inf, float(min_photons))
        dim = photons < threshold
        keep_pair = ~dim[gi]
        n_gt = int((~dim).sum())
        n_pred = len(pred) - int((~keep_pair).sum())
        gi, pi = gi[keep_pair], pi[keep_pair]
    else:
        n_gt, n_pred = len(gt), len(pred)

    tp = len(gi)
    fp, fn = n_pred - tp, n_gt - tp
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    jaccard = tp / (tp + fp + fn) if tp + fp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else (0.0 if (fp or fn) else float("nan"))

    g, p = gt.iloc[gi], pred.iloc[pi]
    dx = p["x"].to_numpy(np.float64) - g["x"].to_numpy(np.float64)
    dy = p["y"].to_numpy(np.float64) - g["y"].to_numpy(np.float64)
    dz = p["z"].to_numpy(np.float64) - g["z"].to_numpy(np.float64)
    nan = float("nan")
    m: dict[str, Any] = {
        "method": method, "use_z": use_z, "photon_threshold": threshold,
        "n_gt": n_gt, "n_pred": n_pred, "tp": tp, "fp": fp, "fn": fn,
        "precision": precision, "recall": recall, "jaccard": jaccard, "f1": f1,
        "rmse_lat": float(np.sqrt(np.mean(dx**2 + dy**2))) if tp else nan,
        "rmse_x": _rms(dx), "rmse_y": _rms(dy),
        "rmse_ax": _rms(dz) if use_z else nan,
        "rmse_vol": float(np.sqrt(np.mean(dx**2 + dy**2 + dz**2))) if (tp and use_z) else nan,
        "mad_lat": float(np.mean(np.abs(dx) + np.abs(dy))) if tp else nan,
        "mad_ax": float(np.mean(np.abs(dz))) if (tp and use_z) else nan,
        "mad_vol": float(np.mean(np.abs(dx) + np.abs(dy) + np.abs(dz))) if (tp and use_z) else nan,
        "bias_x": _mean(dx), "bias_y": _mean(dy), "bias_z": _mean(dz) if use_z else nan,
    }
    ji = jaccard if math.isfinite(jaccard) else 0.0
    m["eff_lat"] = efficiency(ji, m["rmse_lat"], alpha_lat) if tp else nan
    m["eff_ax"] = efficiency(ji, m["rmse_ax"], alpha_ax) if (tp and use_z) else nan
    m["eff_vol"] = (m["eff_lat"] + m["eff_ax"]) / 2 if (tp and use_z) else nan
    if "photons" in gt.columns and "photons" in pred.columns and tp:
        gp = g["photons"].to_numpy(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            m["photons_rel_bias"] = _mean(p["photons"].to_numpy(np.float64) / gp - 1.0)

    # Uncertainty calibration: how often the error is within the predicted 1-sigma.
    for axis, err in (("x", dx), ("y", dy), ("z", dz)):
        col = f"{axis}_sigma"
        if col in pred.columns and tp and (axis != "z" or use_z):
            s = p[col].to_numpy(np.float64)
            ok = np.isfinite(s) & np.isfinite(err)
            m[f"calib_{axis}"] = float(np.mean(np.abs(err[ok]) <= s[ok])) if ok.any() else nan

    if psf is not None and tp:
        bound = crlb_for_table(g, psf, px_size_nm, camera, default_bg=default_bg)
        for axis, err in (("x", dx), ("y", dy), ("z", dz)):
            if axis in bound and (axis != "z" or use_z):
                ok = np.isfinite(bound[axis]) & np.isfinite(err)
                m[f"crlb_{axis}"] = _rms(bound[axis][ok])
                m[f"rmse_over_crlb_{axis}"] = _rms(err[ok]) / m[f"crlb_{axis}"] if ok.any() else nan

    if "ratio" in gt.columns and "ratio" in pred.columns and tp:
        m["ratio_rmse"] = _rms(p["ratio"].to_numpy(np.float64) - g["ratio"].to_numpy(np.float64))
        m["ratio_bias"] = _mean(p["ratio"].to_numpy(np.float64) - g["ratio"].to_numpy(np.float64))
        if "ratio_sigma" in pred.columns:
            err = p["ratio"].to_numpy(np.float64) - g["ratio"].to_numpy(np.float64)
            s = p["ratio_sigma"].to_numpy(np.float64)
            ok = np.isfinite(s) & np.isfinite(err)
            m["calib_ratio"] = float(np.mean(np.abs(err[ok]) <= s[ok])) if ok.any() else nan
    true_dye = _true_dyes(g, dye_table)
    if true_dye is not None and "color" in pred.columns and tp:
        assigned = p["color"].to_numpy(np.float64)
        ok = np.isfinite(true_dye) & (true_dye >= 0)
        per_dye_x, per_dye_r = {}, {}
        wrong_all = given_all = rej_all = n_all = 0
        for d in np.unique(true_dye[ok]).astype(int):
            sel = ok & (true_dye == d)
            rejected = int(np.sum(sel & (assigned < 0)))
            given = int(np.sum(sel & (assigned >= 0)))
            wrong = int(np.sum(sel & (assigned >= 0) & (assigned != d)))
            per_dye_x[int(d)] = wrong / given if given else nan
            per_dye_r[int(d)] = rejected / int(sel.sum())
            wrong_all += wrong
            given_all += given
            rej_all += rejected
            n_all += int(sel.sum())
        m["crosstalk"] = wrong_all / given_all if given_all else nan
        m["rejection"] = rej_all / n_all if n_all else nan
        m["crosstalk_per_dye"] = per_dye_x
        m["rejection_per_dye"] = per_dye_r
    return m


# --------------------------------------------------------------------------------------------------
_ROWS = [
    ("n_gt", "ground truth", ""), ("n_pred", "localizations", ""), ("tp", "TP", ""), ("fp", "FP", ""),
    ("fn", "FN", ""), ("precision", "precision", "%"), ("recall", "recall", "%"), ("jaccard", "Jaccard (JI)", "%"),
    ("f1", "F1", "%"), ("rmse_lat", "RMSE lateral (radial)", "nm"), ("rmse_x", "RMSE x", "nm"),
    ("rmse_y", "RMSE y", "nm"), ("rmse_ax", "RMSE axial", "nm"), ("rmse_vol", "RMSE volumetric", "nm"),
    ("mad_lat", "MAD lateral", "nm"), ("mad_ax", "MAD axial", "nm"), ("mad_vol", "MAD volumetric", "nm"),
    ("bias_x", "bias x", "nm"), ("bias_y", "bias y", "nm"), ("bias_z", "bias z", "nm"),
    ("eff_lat", "efficiency lateral", "%"), ("eff_ax", "efficiency axial", "%"),
    ("eff_vol", "efficiency volumetric", "%"), ("photons_rel_bias", "photons relative bias", "%"),
    ("calib_x", "|dx| <= sigma_x (ideal 68.3)", "%"), ("calib_y", "|dy| <= sigma_y (ideal 68.3)", "%"),
    ("calib_z", "|dz| <= sigma_z (ideal 68.3)", "%"), ("crlb_x", "CRLB x (rms)", "nm"),
    ("rmse_over_crlb_x", "RMSE/CRLB x", ""), ("crlb_y", "CRLB y (rms)", "nm"), ("rmse_over_crlb_y", "RMSE/CRLB y", ""),
    ("crlb_z", "CRLB z (rms)", "nm"), ("rmse_over_crlb_z", "RMSE/CRLB z", ""), ("ratio_rmse", "ratio RMSE", ""),
    ("ratio_bias", "ratio bias", ""), ("calib_ratio", "within 1 sigma ratio", ""), ("crosstalk", "colour crosstalk", "%"), ("rejection", "colour rejection", "%"),
]


def format_report(metrics: dict[str, Any]) -> str:
    """A two-column text table of the metrics that were computed (percentages shown as %)."""
    lines = [f"matching: {metrics.get('method')}, {'3D' if metrics.get('use_z') else '2D'}"
             + (f", photon threshold {metrics['photon_threshold']:.1f}" if metrics.get("photon_threshold") else "")]
    for key, label, unit in _ROWS:
        if key not in metrics:
            continue
        v = metrics[key]
        if isinstance(v, float) and not math.isfinite(v):
            continue
        if unit == "%":
            text = f"{100 * v:8.2f} %" if not key.startswith("eff") else f"{v:8.2f} %"
        elif isinstance(v, (int, np.integer)):
            text = f"{v:8d}"
        else:
            text = f"{v:8.3f}{(' ' + unit) if unit else ''}"
        lines.append(f"  {label:<32s}{text}")
    for key, label in (("crosstalk_per_dye", "crosstalk"), ("rejection_per_dye", "rejection")):
        for d, v in metrics.get(key, {}).items():
            if isinstance(v, float) and math.isfinite(v):
                lines.append(f"  {label + ' of dye ' + str(d):<32s}{100 * v:8.2f} %")
    return "\n".join(lines)


def print_report(metrics: dict[str, Any]) -> None:
    """Print :func:`format_report`."""
    print(format_report(metrics))
