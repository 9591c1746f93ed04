"""Frame-by-frame matching of localizations to ground truth (SMLM Challenge 2016 rules).

A pair (ground truth g, localization l) of the same frame is *admissible* when the lateral distance
is <= ``dist_lat`` (nm) and, in 3D, |dz| <= ``dist_ax`` (nm). Two matchers:

* ``"greedy"`` (the challenge's and DECODE's): repeatedly take the globally closest admissible pair
  of the frame (3D distance when z is used, else lateral), accept it and remove both; ties go to
  the lower ground-truth, then localization, row.
* ``"optimal"``: the assignment with the most pairs and, among those, the smallest total distance
  (``scipy.optimize.linear_sum_assignment`` on gated costs). It never pairs fewer emitters than
  greedy, and can pair more when the closest pair blocks two others.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from decode_accel.errors import DecodeAccelError

METHODS = ("greedy", "optimal")


def _pair_costs(gt: np.ndarray, pred: np.ndarray, dist_lat: float, dist_ax: float, use_z: bool):
    dxy = np.hypot(gt[:, None, 0] - pred[None, :, 0], gt[:, None, 1] - pred[None, :, 1])
    dz = np.abs(gt[:, None, 2] - pred[None, :, 2])
    admissible = dxy <= dist_lat
    if use_z:
        admissible &= dz <= dist_ax
        cost = np.hypot(dxy, dz)
    else:
        cost = dxy
    return cost, admissible


def match_frame(gt_xyz: np.ndarray, pred_xyz: np.ndarray, method: str = "greedy", dist_lat: float = 250.0,
                dist_ax: float = 500.0, use_z: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Match the emitters of one frame.

    Args:
        gt_xyz: (n, 3) true positions (nm).
        pred_xyz: (m, 3) localizations (nm).
        method: "greedy" or "optimal".
        dist_lat, dist_ax: gates (nm).
        use_z: gate on |dz| and use the 3D distance as cost.

    Returns:
        (gt rows, pred rows) of the matched pairs, int arrays of equal length.
    """
    gt_xyz = np.asarray(gt_xyz, dtype=np.float64).reshape(-1, 3)
    pred_xyz = np.asarray(pred_xyz, dtype=np.float64).reshape(-1, 3)
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    if len(gt_xyz) == 0 or len(pred_xyz) == 0:
        return empty
    cost, ok = _pair_costs(gt_xyz, pred_xyz, dist_lat, dist_ax, use_z)
    rows, cols = np.nonzero(ok)
    if len(rows) == 0:
        return empty
    if method == "greedy":
        order = np.lexsort((cols, rows, cost[rows, cols]))
        used_g = np.zeros(len(gt_xyz), dtype=bool)
        used_p = np.zeros(len(pred_xyz), dtype=bool)
        gi, pi = [], []
        for k in order:
            r, c = rows[k], cols[k]
            if not used_g[r] and not used_p[c]:
                used_g[r] = used_p[c] = True
                gi.append(r)
                pi.append(c)
        return np.asarray(gi, dtype=np.int64), np.asarray(pi, dtype=np.int64)
    if method == "optimal":
        # Any inadmissible pair costs more than all admissible ones together, so the optimum first
        # maximizes the number of admissible pairs, then minimizes their total distance.
        big = float(cost[ok].sum()) + 1.0
        gated = np.where(ok, cost, big)
        r, c = linear_sum_assignment(gated)
        keep = ok[r, c]
        return r[keep].astype(np.int64), c[keep].astype(np.int64)
    raise DecodeAccelError(f"unknown matching method {method!r}", field="method", fix=f"use one of {METHODS}")


def _xyz(df: pd.DataFrame) -> np.ndarray:
    z = df["z"].to_numpy(np.float64) if "z" in df.columns else np.zeros(len(df))
    return np.column_stack([df["x"].to_numpy(np.float64), df["y"].to_numpy(np.float64), z])


def match_localizations(gt: pd.DataFrame, pred: pd.DataFrame, method: str = "greedy", dist_lat: float = 250.0,
                        dist_ax: float = 500.0, use_z: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Match two localization tables frame by frame.

    Returns:
        (gt positions, pred positions): row *positions* (0..len-1, not index labels) of the matched pairs.
    """
    if method not in METHODS:
        raise DecodeAccelError(f"unknown matching method {method!r}", field="method", fix=f"use one of {METHODS}")
    gxyz, pxyz = _xyz(gt), _xyz(pred)
    gf = gt["frame"].to_numpy(np.int64)
    pf = pred["frame"].to_numpy(np.int64)
    g_order = np.argsort(gf, kind="stable")
    p_order = np.argsort(pf, kind="stable")
    g_sorted, p_sorted = gf[g_order], pf[p_order]
    frames = np.intersect1d(g_sorted, p_sorted)
    g_lo, g_hi = np.searchsorted(g_sorted, frames, "left"), np.searchsorted(g_sorted, frames, "right")
    p_lo, p_hi = np.searchsorted(p_sorted, frames, "left"), np.searchsorted(p_sorted, frames, "right")
    out_g, out_p = [], []
    for a, b, c, d in zip(g_lo, g_hi, p_lo, p_hi):
        gi = g_order[a:b]
        pi = p_order[c:d]
        mg, mp = match_frame(gxyz[gi], pxyz[pi], method, dist_lat, dist_ax, use_z)
        out_g.append(gi[mg])
        out_p.append(pi[mp])
    if not out_g:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(out_g).astype(np.int64), np.concatenate(out_p).astype(np.int64)
