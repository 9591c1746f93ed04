"""Can the positions be trusted? Gridding, detection calibration and uncertainty calibration.

Three checks a microscopist makes before believing a super-resolution image, each per axis:

* **Gridding** (:func:`subpixel_uniformity`): the sub-pixel fraction ``(x / px) mod 1`` of the
  localizations (pixel j spans [j, j + 1) px, its centre at 0.5). Emitters land anywhere on a pixel,
  so the truth's fractions are uniform; a network that pulls positions towards pixel centres or
  edges (DECODE issue #132) gives a histogram with peaks. A chi-squared statistic against the
  uniform histogram tells how far from flat it is, with the truth's own statistic beside it.
* **Detection reliability** (:func:`detection_reliability`): of the localizations reported with
  probability near p, the share that are real (matched to a true emitter). Calibrated
  probabilities lie on the diagonal.
* **Uncertainty reliability** (:func:`uncertainty_reliability`): for localizations grouped by their
  predicted sigma, the RMS of the actual error and the share of errors within 1 sigma (0.683 for
  honest Gaussian uncertainties).

:func:`plot_trust` draws all three as one PNG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from decode_accel.errors import DecodeAccelError
from decode_accel.evaluation.matching import match_localizations

#: share of a Gaussian's mass within one sigma
WITHIN_ONE_SIGMA = math.erf(1 / math.sqrt(2))


def subpixel_uniformity(positions_nm: np.ndarray, px_size_nm: float, bins: int = 10) -> dict[str, Any]:
    """Histogram of the sub-pixel fraction of positions and its chi-squared distance from uniform.

    Args:
        positions_nm: x (or y) positions (nm), image origin at the top-left corner.
        px_size_nm: pixel size (nm).
        bins: histogram bins over [0, 1).

    Returns:
        {"counts": per-bin counts, "chi2": sum (n - E)^2 / E, "dof": bins - 1, "p_value": of chi2
        under uniformity, "chi2_per_dof": chi2 / dof (about 1 when flat), "n"}. With fewer than
        ``5 * bins`` positions the statistics are NaN.
    """
    if not px_size_nm > 0:
        raise DecodeAccelError(f"pixel size must be > 0 nm, got {px_size_nm}", field="px_size_nm")
    values = np.asarray(positions_nm, dtype=np.float64)
    values = values[np.isfinite(values)]
    fraction = np.mod(values / px_size_nm, 1.0)
    counts, _ = np.histogram(fraction, bins=bins, range=(0.0, 1.0))
    n = int(counts.sum())
    out: dict[str, Any] = {"counts": counts.tolist(), "n": n, "dof": bins - 1}
    if n < 5 * bins:
        return out | {"chi2": float("nan"), "p_value": float("nan"), "chi2_per_dof": float("nan")}
    expected = n / bins
    chi2 = float(np.sum((counts - expected) ** 2) / expected)
    return out | {"chi2": chi2, "p_value": float(stats.chi2.sf(chi2, bins - 1)), "chi2_per_dof": chi2 / (bins - 1)}


def subpixel_two_sample(pred_nm: np.ndarray, truth_nm: np.ndarray, px_size_nm: float, bins: int = 10) -> dict[str, Any]:
    """Are the sub-pixel fractions of the predictions distributed as the truth's? The chi-squared test of
    homogeneity of the two histograms (a 2 x ``bins`` contingency table).

    Why beside :func:`subpixel_uniformity`: the truth's own fractions are not flat on a finite movie (an
    emitter stays on for several frames at one position, so its chi2/dof is 2-5 on a 3000-frame movie), and
    comparing two noisy chi2 values says nothing when they are close. The test compares the predictions
    with the positions they estimate.

    Returns {"chi2", "dof": non-empty bins - 1, "p_value", "chi2_per_dof"} (NaN with fewer than ``5 * bins`` of
    either, or with every position in one bin).
    """
    counts = [np.asarray(subpixel_uniformity(v, px_size_nm, bins)["counts"], dtype=np.float64)
              for v in (pred_nm, truth_nm)]
    n_pred, n_truth = (float(c.sum()) for c in counts)
    both = counts[0] + counts[1]
    keep = both > 0
    dof = int(keep.sum()) - 1
    if min(n_pred, n_truth) < 5 * bins or dof < 1:  # too few positions, or all in one bin: nothing to compare
        return {"chi2": float("nan"), "dof": dof, "p_value": float("nan"), "chi2_per_dof": float("nan")}
    a, b = np.sqrt(n_truth / n_pred), np.sqrt(n_pred / n_truth)
    chi2 = float(np.sum((a * counts[0][keep] - b * counts[1][keep]) ** 2 / both[keep]))
    return {"chi2": chi2, "dof": dof, "p_value": float(stats.chi2.sf(chi2, dof)), "chi2_per_dof": chi2 / dof}


def gridding_report(gt: pd.DataFrame, pred: pd.DataFrame, px_size_nm: float, bins: int = 10) -> dict[str, Any]:
    """:func:`subpixel_uniformity` of x and y for the predictions and for the truth, and
    :func:`subpixel_two_sample` of the predictions against the truth ("pred_vs_truth_x", "_y")."""
    out = {f"{who}_{axis}": subpixel_uniformity(table[axis].to_numpy(), px_size_nm, bins)
           for who, table in (("pred", pred), ("truth", gt)) for axis in ("x", "y")}
    for axis in ("x", "y"):
        out[f"pred_vs_truth_{axis}"] = subpixel_two_sample(pred[axis].to_numpy(), gt[axis].to_numpy(), px_size_nm, bins)
    return out


def _matches(gt: pd.DataFrame, pred: pd.DataFrame, use_z: bool, dist_lat: float, dist_ax: float):
    for name, table in (("ground truth", gt), ("prediction", pred)):
        missing = [c for c in ("frame", "x", "y") if c not in table.columns]
        if missing:
            raise DecodeAccelError(f"the {name} table has no column {missing[0]!r}", field=f"{name}.{missing[0]}",
                                   fix="localization tables need frame, x, y (nm)")
    gt = gt.reset_index(drop=True)
    pred = pred.reset_index(drop=True)
    if "z" not in gt.columns:
        gt = gt.assign(z=0.0)
    if "z" not in pred.columns:
        pred = pred.assign(z=0.0)
    gi, pi = match_localizations(gt, pred, "greedy", dist_lat, dist_ax, use_z)
    return gt, pred, gi, pi


def real_detections(gt: pd.DataFrame, pred: pd.DataFrame, *, use_z: bool = False, dist_lat: float = 250.0,
                    dist_ax: float = 500.0) -> np.ndarray:
    """Which localizations of ``pred`` (in its row order) match a true emitter: bool (n_pred,), with the
    greedy matching of :func:`decode_accel.evaluation.evaluate` (nm)."""
    _, pred, _, pi = _matches(gt, pred, use_z, dist_lat, dist_ax)
    real = np.zeros(len(pred), dtype=bool)
    real[pi] = True
    return real


def detection_reliability(gt: pd.DataFrame, pred: pd.DataFrame, bins: int = 10, *, use_z: bool = False,
                          dist_lat: float = 250.0, dist_ax: float = 500.0) -> dict[str, Any]:
    """Share of real detections per bin of reported probability (a reliability diagram).

    Args:
        gt, pred: truth and localizations (nm, 0-based frames); ``pred`` needs a ``prob`` column.
        bins: equal-width probability bins over [0, 1].
        use_z, dist_lat, dist_ax: matching as in :func:`decode_accel.evaluation.evaluate` (greedy).

    Returns:
        {"bin_edges", "mean_prob" (per bin), "real_share" (matched / reported, per bin), "count",
        "ece": expected calibration error sum_b (n_b / n) |real_share_b - mean_prob_b|}.
    """
    if "prob" not in pred.columns:
        raise DecodeAccelError("the prediction table has no column 'prob'", field="prediction.prob",
                               fix="use a table written by decode-accel predict")
    real = real_detections(gt, pred, use_z=use_z, dist_lat=dist_lat, dist_ax=dist_ax)
    prob = pred["prob"].to_numpy(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(which, weights=prob, minlength=bins) / count
        share = np.bincount(which, weights=real.astype(np.float64), minlength=bins) / count
    used = count > 0
    ece = float(np.sum(count[used] * np.abs(share[used] - mean_prob[used])) / max(count.sum(), 1))
    return {"bin_edges": edges.tolist(), "mean_prob": mean_prob.tolist(), "real_share": share.tolist(),
            "count": count.tolist(), "ece": ece}


def uncertainty_reliability(gt: pd.DataFrame, pred: pd.DataFrame, axes: tuple[str, ...] = ("x", "y"),
                            bins: int = 8, *, use_z: bool = False, dist_lat: float = 250.0,
                            dist_ax: float = 500.0) -> dict[str, Any]:
    """Actual errors against predicted sigmas, per axis, in quantile bins of the predicted sigma.

    Returns, per axis with a ``{axis}_sigma`` column: {"sigma_rms" (predicted, nm), "error_rms"
    (actual, nm), "within_1sigma" (share of |error| <= sigma), "count"} per bin, and overall
    "within_1sigma" (ideal 0.683) and "z_score_sd" (sd of error / sigma, ideal 1).
    """
    gt, pred, gi, pi = _matches(gt, pred, use_z, dist_lat, dist_ax)
    out: dict[str, Any] = {}
    for axis in axes:
        col = f"{axis}_sigma"
        if col not in pred.columns or not len(gi):
            continue
        err = pred[axis].to_numpy(np.float64)[pi] - gt[axis].to_numpy(np.float64)[gi]
        sig = pred[col].to_numpy(np.float64)[pi]
        ok = np.isfinite(err) & np.isfinite(sig) & (sig > 0)
        err, sig = err[ok], sig[ok]
        if not len(err):
            continue
        edges = np.unique(np.quantile(sig, np.linspace(0, 1, bins + 1)))
        which = np.clip(np.digitize(sig, edges[1:-1]), 0, max(len(edges) - 2, 0))
        per = {"sigma_rms": [], "error_rms": [], "within_1sigma": [], "count": []}
        for b in range(max(len(edges) - 1, 1)):
            sel = which == b
            if not sel.any():
                continue
            per["sigma_rms"].append(float(np.sqrt(np.mean(sig[sel] ** 2))))
            per["error_rms"].append(float(np.sqrt(np.mean(err[sel] ** 2))))
            per["within_1sigma"].append(float(np.mean(np.abs(err[sel]) <= sig[sel])))
            per["count"].append(int(sel.sum()))
        out[axis] = per | {"overall_within_1sigma": float(np.mean(np.abs(err) <= sig)),
                           "z_score_sd": float(np.std(err / sig))}
    return out


def bias_by_true_value(gt: pd.DataFrame, pred: pd.DataFrame, column: str = "z", edges=None, *,
                       error_of: str | None = None, use_z: bool = True, dist_lat: float = 250.0,
                       dist_ax: float = 500.0) -> dict[str, Any]:
    """Mean error of ``error_of`` (default: ``column``) in bins of the true ``column``.

    For 3D data, the mean z error in bins of true z shows a depth-dependent offset (a compressed or
    stretched z axis) that the overall bias hides.

    Returns {"edges", "bias" (nm per bin), "rmse", "count"}.
    """
    gt, pred, gi, pi = _matches(gt, pred, use_z, dist_lat, dist_ax)
    error_of = error_of or column
    true = gt[column].to_numpy(np.float64)[gi]
    err = pred[error_of].to_numpy(np.float64)[pi] - gt[error_of].to_numpy(np.float64)[gi]
    if edges is None:
        edges = np.linspace(np.min(true), np.max(true) + 1e-9, 9) if len(true) else np.array([0.0, 1.0])
    edges = np.asarray(edges, dtype=np.float64)
    which = np.digitize(true, edges) - 1
    bias, rmse, count = [], [], []
    for b in range(len(edges) - 1):
        sel = which == b
        count.append(int(sel.sum()))
        bias.append(float(np.mean(err[sel])) if sel.any() else float("nan"))
        rmse.append(float(np.sqrt(np.mean(err[sel] ** 2))) if sel.any() else float("nan"))
    return {"edges": edges.tolist(), "bias": bias, "rmse": rmse, "count": count}


def plot_trust(path: str | Path, gridding: dict, detection: dict | None, uncertainty: dict | None,
               title: str = "") -> Path:
    """One PNG: sub-pixel histograms (x, y; prediction and truth), detection and uncertainty reliability."""
    import matplotlib  # heavy: matplotlib only for the trust figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: pyplot is slow to import, only for the trust figure

    path = Path(path)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, axis in zip(axes[:2], ("x", "y")):
        for who, style in (("truth", dict(color="0.5", lw=2)), ("pred", dict(color="C0", lw=1.5))):
            rep = gridding.get(f"{who}_{axis}")
            if not rep or not rep["n"]:
                continue
            counts = np.asarray(rep["counts"], dtype=float)
            centres = (np.arange(len(counts)) + 0.5) / len(counts)
            chi = rep.get("chi2_per_dof", float("nan"))
            ax.step(centres, counts / counts.mean(), where="mid", label=f"{who} (chi2/dof {chi:.2f})", **style)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_ylim(0, 2)
        ax.set_xlabel(f"sub-pixel fraction of {axis} (pixel centre at 0.5)")
        ax.set_ylabel("density / uniform")
        ax.legend(fontsize=8)
    ax = axes[2]
    if detection:
        ax.plot([0, 1], [0, 1], color="k", lw=0.5)
        mp, rs = np.asarray(detection["mean_prob"], float), np.asarray(detection["real_share"], float)
        ax.plot(mp, rs, "o-", label=f"ECE {detection['ece']:.3f}")
        ax.set_xlabel("reported detection probability")
        ax.set_ylabel("share that is real")
        ax.legend(fontsize=8)
    ax = axes[3]
    if uncertainty:
        top = 0.0
        for axis, colour in (("x", "C0"), ("y", "C1"), ("z", "C2")):
            rep = uncertainty.get(axis)
            if not rep:
                continue
            ax.plot(rep["sigma_rms"], rep["error_rms"], "o-", color=colour,
                    label=f"{axis}: {100 * rep['overall_within_1sigma']:.0f} % within 1 sigma")
            top = max(top, max(rep["sigma_rms"]), max(rep["error_rms"]))
        ax.plot([0, top], [0, top], color="k", lw=0.5)
        ax.set_xlabel("predicted sigma (nm, rms in bin)")
        ax.set_ylabel("actual error (nm, rms in bin)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


__all__ = ["subpixel_uniformity", "gridding_report", "detection_reliability", "uncertainty_reliability",
           "bias_by_true_value", "plot_trust", "WITHIN_ONE_SIGMA"]
