"""Compare decode_accel with a classical fitter (Picasso) on the same recorded frames, without ground truth.

:func:`picasso_localize` runs Picasso's own pipeline (``picasso.localize.identify`` ->
``get_spots`` with the per-pixel sCMOS calibration -> ``picasso.gaussmle.gaussmle``, an MLE fit of an
integrated Gaussian) on a movie in ADU, converting ADU with the same camera decode_accel uses, and
returns a localization table in decode_accel's convention (nm, pixel centres at (j + 0.5)·px).

:func:`agreement` then says how far two tables agree: localizations per frame, and for the bright
localizations of each (photons above its own median) the share the other finds within a radius
and their mean distance. Agreement is not accuracy: two methods can agree on the same mistake, and
disagreements on dim or overlapping spots do not say which one is right.
"""

from __future__ import annotations


import numpy as np
import pandas as pd

from decode_accel.analysis.drift_link import quiet_picasso
from decode_accel.errors import DecodeAccelError

__all__ = ["picasso_localize", "noise_net_gradient", "agreement", "agreement_table"]




def _picasso_camera(camera, shape: tuple[int, int], roi_origin=None) -> tuple[dict, dict | None]:
    """Picasso's camera_info and sCMOS camera_calibration for a decode_accel Camera.

    Picasso's gain map is ADU per photoelectron (Huang et al. 2013), the reciprocal of
    decode_accel's e_per_adu map; its ``Sensitivity`` is e-/ADU; its photons are photoelectrons.
    """
    import torch  # only for a decode_accel Camera: postprocess on a table never loads torch

    cfg = camera.cfg
    H, W = shape
    if camera.kind == "perfect":
        return {"Baseline": 0.0, "Sensitivity": 1.0, "Gain": 1.0, "Qe": 1.0}, None
    info = {"Baseline": float(cfg.baseline), "Sensitivity": float(cfg.e_per_adu),
            "Gain": float(cfg.em_gain) if camera.kind == "emccd" else 1.0, "Qe": float(cfg.qe)}
    if not getattr(camera, "_maps", None):
        return info, None
    like = torch.zeros(1, 1, H, W)

    def crop(key):
        a = np.asarray(torch.as_tensor(camera._param(key, like, roi_origin), dtype=torch.float32))
        return np.ascontiguousarray(np.broadcast_to(a.reshape(a.shape[-2:]) if a.ndim >= 2 else a, (H, W)),
                                    dtype=np.float32)

    e_per_adu = crop("e_per_adu")
    cal = {"offset": crop("offset"), "gain": (1.0 / e_per_adu).astype(np.float32), "variance": crop("variance")}
    return info, cal


def noise_net_gradient(movie_adu: np.ndarray, box: int = 7, false_per_frame: float = 0.5, seed: int = 0) -> float:
    """Picasso's minimum net gradient from the movie's own noise (no tuning by eye).

    Every frame's pixels are shuffled (spots vanish, the pixel-value distribution and hot pixels
    stay), Picasso's ``identify`` runs on the shuffled copy with a low threshold, and the returned
    value is the net gradient above which the spot-free copy gives ``false_per_frame`` detections
    per frame.
    """
    from picasso import localize  # optional: picassosr (the 'bench' extra)

    rng = np.random.default_rng(seed)
    T = movie_adu.shape[0]
    shuffled = np.stack([rng.permutation(f.ravel()).reshape(f.shape) for f in np.asarray(movie_adu)])
    with quiet_picasso():
        ids = localize.identify(shuffled, 1.0, box, threaded=False, return_info=False)
    ng = np.sort(np.asarray(ids["net_gradient"], dtype=np.float64))[::-1]
    k = int(np.ceil(false_per_frame * T))
    if len(ng) <= k:
        return float(ng[-1]) if len(ng) else 1.0
    return float(ng[k])


def picasso_localize(movie_adu: np.ndarray, camera, px_size_nm: float, *, box: int = 7,
                     min_net_gradient: float | None = None, roi_origin=None) -> pd.DataFrame:
    """Localize a movie (T, H, W) in ADU with Picasso (identify + sCMOS-aware MLE), as a decode_accel table.

    Args:
        movie_adu: the frames (ADU).
        camera: the decode_accel ``Camera`` (its maps are cropped at ``roi_origin``).
        px_size_nm: pixel size (nm).
        box: Picasso's box size (px, odd).
        min_net_gradient: Picasso's identification threshold; default :func:`noise_net_gradient`.

    Returns:
        DataFrame with frame, x, y (nm), photons (photons: Picasso's photoelectrons / QE), bg
        (photons/px), x_sigma, y_sigma (nm, Picasso's CRLB), sigma_psf (nm), net_gradient; attrs hold
        min_net_gradient.
    """
    from picasso import gaussmle, localize  # optional: picassosr (the 'bench' extra)

    movie = np.asarray(movie_adu)
    if movie.ndim != 3:
        raise DecodeAccelError(f"movie has shape {movie.shape}; Picasso needs (frames, H, W)", field="movie")
    T, H, W = movie.shape
    info, cal = _picasso_camera(camera, (H, W), roi_origin)
    if min_net_gradient is None:
        min_net_gradient = noise_net_gradient(movie, box)
    with quiet_picasso():
        ids = localize.identify(movie, float(min_net_gradient), box, threaded=False, return_info=False)
        if len(ids) == 0:
            return pd.DataFrame(columns=["frame", "x", "y", "photons", "bg", "x_sigma", "y_sigma"])
        spots = localize.get_spots(movie, ids, box, info, camera_calibration=cal)
        theta, crlb, ll, it = gaussmle.gaussmle(spots, 1e-3, 100, method="sigma")
        locs = gaussmle.locs_from_fits(ids, theta, crlb, ll, it, box)
    qe = info["Qe"] if camera.kind != "perfect" else 1.0
    px = float(px_size_nm)
    out = pd.DataFrame({
        "frame": locs["frame"].to_numpy(np.int64),
        # Picasso: pixel centres at integers -> decode_accel: centre of pixel j at (j + 0.5) px
        "x": (locs["x"].to_numpy(np.float64) + 0.5) * px,
        "y": (locs["y"].to_numpy(np.float64) + 0.5) * px,
        "z": 0.0,
        "photons": locs["photons"].to_numpy(np.float64) / qe,
        "bg": locs["bg"].to_numpy(np.float64) / qe,
        "x_sigma": locs["lpx"].to_numpy(np.float64) * px,
        "y_sigma": locs["lpy"].to_numpy(np.float64) * px,
        "sigma_psf": locs["sx"].to_numpy(np.float64) * px,
        "net_gradient": locs["net_gradient"].to_numpy(np.float64),
    })
    ok = np.isfinite(out[["x", "y", "photons"]]).all(axis=1) & (out["photons"] > 0)
    out = out[ok].reset_index(drop=True)
    out.attrs.update(min_net_gradient=float(min_net_gradient), px_size_nm=px, width=W, height=H, n_frames=T)
    return out


def _one_way(a: pd.DataFrame, b: pd.DataFrame, radius_nm: float) -> tuple[float, float, int]:
    """Share of a's bright localizations (photons above a's median) with a b-localization within
    ``radius_nm`` in the same frame, the mean distance of those pairs (nm), and the number of bright ones."""
    from scipy.spatial import cKDTree  # heavy: scipy.spatial, only for the comparison

    if len(a) == 0:
        return float("nan"), float("nan"), 0
    bright = a[a["photons"] > a["photons"].median()]
    found, dists = 0, []
    for f, grp in bright.groupby("frame"):
        other = b[b["frame"] == f]
        if len(other) == 0:
            continue
        d, _ = cKDTree(other[["x", "y"]].to_numpy()).query(grp[["x", "y"]].to_numpy(), k=1)
        hit = d <= radius_nm
        found += int(hit.sum())
        dists.extend(d[hit].tolist())
    n = len(bright)
    return found / max(n, 1), float(np.mean(dists)) if dists else float("nan"), n


def agreement(ours: pd.DataFrame, theirs: pd.DataFrame, px_size_nm: float, n_frames: int,
              radius_px: float = 1.0) -> dict:
    """Agreement figures of two localization tables of the same frames (nm).

    Returns a dict: ``per_frame_ours``, ``per_frame_theirs`` (lists of counts), ``bright_theirs_found``
    (share of their bright localizations we also find within ``radius_px``), ``distance_theirs_nm``
    (mean distance of those pairs), ``bright_ours_found`` and ``distance_ours_nm`` (the other way round),
    and the numbers of bright localizations.
    """
    r = radius_px * float(px_size_nm)
    t_found, t_dist, t_n = _one_way(theirs, ours, r)
    o_found, o_dist, o_n = _one_way(ours, theirs, r)
    per = lambda t: np.bincount(t["frame"].to_numpy(np.int64), minlength=n_frames)[:n_frames].tolist()  # noqa: E731
    return dict(per_frame_ours=per(ours), per_frame_theirs=per(theirs), radius_nm=r,
                bright_theirs_found=t_found, distance_theirs_nm=t_dist, n_bright_theirs=t_n,
                bright_ours_found=o_found, distance_ours_nm=o_dist, n_bright_ours=o_n)


def agreement_table(fig: dict, reference_counts: list[int] | None = None, names=("decode_accel", "Picasso")) -> str:
    """The agreement figures as a Markdown table (per-frame counts, then the two one-way comparisons)."""
    ours, theirs = fig["per_frame_ours"], fig["per_frame_theirs"]
    head = "| frame | " + " | ".join(str(i) for i in range(len(ours))) + " | total |"
    sep = "|---" * (len(ours) + 2) + "|"
    rows = [head, sep,
            f"| {names[0]} | " + " | ".join(str(c) for c in ours) + f" | {sum(ours)} |",
            f"| {names[1]} | " + " | ".join(str(c) for c in theirs) + f" | {sum(theirs)} |"]
    if reference_counts is not None:
        ref = list(reference_counts) + [""] * (len(ours) - len(reference_counts))
        rows.append("| source's reference (out.txt) | " + " | ".join(str(c) for c in ref[:len(ours)])
                    + f" | {sum(int(c) for c in reference_counts)} |")
    r = fig["radius_nm"]
    rows += ["", f"| comparison (radius {r:.0f} nm) | share found | mean distance (nm) | bright localizations |",
             "|---|---|---|---|",
             f"| {names[1]}'s bright found by {names[0]} | {100 * fig['bright_theirs_found']:.1f} % | "
             f"{fig['distance_theirs_nm']:.1f} | {fig['n_bright_theirs']} |",
             f"| {names[0]}'s bright found by {names[1]} | {100 * fig['bright_ours_found']:.1f} % | "
             f"{fig['distance_ours_nm']:.1f} | {fig['n_bright_ours']} |"]
    return "\n".join(rows)
