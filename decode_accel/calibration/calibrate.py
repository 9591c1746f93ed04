"""``decode-accel calibrate``: fit the simulation to a recorded movie and write a training config.

    decode-accel calibrate --input movie.tif --out sim.yaml --px-size 160 [--scmos-maps calib.npz]

Steps (each estimate carries an uncertainty and says whether it was given, estimated or assumed):

1. camera: given values and maps are used as they are; what is missing comes from the movie's
   mean–variance relation (:mod:`decode_accel.calibration.camera_estimate`);
2. ADU -> photoelectrons with that camera; spots are detected (difference of Gaussians), isolated
   ones fitted by Poisson MLE with the sCMOS read-noise correction (:mod:`decode_accel.calibration.spots`);
3. PSF: σ (px) = median width of the bright isolated fits (2D Gaussian), or the astigmatic model
   fitted to a bead z-stack (:mod:`decode_accel.calibration.astigmatism`);
4. photons (fixed-σ refits), background (per-frame level and local fits), density (detections per
   frame and µm², a lower bound: overlapping and dim molecules are missed);
5. the config (``simulation:`` section, usable with ``--config`` by every recipe) and a PNG of real
   beside simulated frames with pixel histograms and their Kolmogorov–Smirnov distance.

Nothing here is tuned to one movie: thresholds are in units of the movie's own noise.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml

from decode_accel.errors import DecodeAccelError
from decode_accel.inference.movie import open_movie
from decode_accel.io._atomic import atomic_path
from decode_accel.simulation import Camera, Simulator
from decode_accel.simulation.camera import roi_origin_from_metadata  # noqa: F401 - lives with the camera's ROI code
from decode_accel.simulation.config import CameraConfig, SimulationConfig
from .astigmatism import fit_bead_stack, load_psf_calibration
from .camera_estimate import mean_variance
from .spots import detect_spots, find_and_fit

__all__ = ["Estimate", "CalibrationResult", "calibrate", "write_config", "comparison_figure"]


@dataclass
class Estimate:
    """One row of the calibration table."""

    name: str
    value: float
    sd: float | None
    unit: str
    source: str  # 'given', 'estimated', 'assumed'
    note: str = ""

    def row(self) -> str:
        sd = "" if self.sd is None or not np.isfinite(self.sd) else f" ± {self.sd:.3g}"
        value = "" if not np.isfinite(self.value) else f"{self.value:.4g}"
        return f"| {self.name} | {value}{sd} | {self.unit} | {self.source} | {self.note} |"


def _given_or_assumed(est: list, name: str, value, assumed: float, unit: str, note: str):
    """``value`` when the user gave it, else ``assumed`` (with ``note`` saying why); recorded in ``est``."""
    if value is None:
        est.append(Estimate(name, assumed, None, unit, "assumed", note))
        return assumed
    est.append(Estimate(name, value, None, unit, "given"))
    return value


@dataclass
class CalibrationResult:
    """What :func:`calibrate` found: the simulation config, the table, the fits and the data."""

    simulation: Any  # SimulationConfig
    estimates: list[Estimate]
    fits: Any  # SpotFits (fixed-sigma refits of the isolated spots)
    movie_adu: np.ndarray  # (T, H, W)
    movie_path: str
    roi_origin: tuple[int, int] | None
    counts_per_frame: np.ndarray
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        """The estimates as a Markdown table."""
        head = "| quantity | value | unit | source | note |\n|---|---|---|---|---|"
        return "\n".join([head] + [e.row() for e in self.estimates])


def _camera_section(args: dict, movie: np.ndarray, est: list[Estimate]) -> dict:
    """The camera config from what the user gave, completing the rest from the movie."""

    kind = args.get("camera")
    maps = {k: args.get(k) for k in ("scmos_maps", "scmos_offset_map", "scmos_variance_map", "scmos_e_per_adu_map")}
    have_maps = any(v is not None for v in maps.values())
    qe = _given_or_assumed(est, "quantum efficiency", args.get("qe"), 1.0, "e-/photon",
                           "photons are photoelectrons (detected photons); give --qe to count incident photons")
    cam: dict[str, Any] = {"qe": float(qe)}
    if have_maps:
        if kind not in (None, "scmos"):
            raise DecodeAccelError(f"sCMOS maps given with --camera {kind}", field="--camera",
                                   fix="use --camera scmos with per-pixel maps")
        cam.update(kind="scmos", **{k: os.path.abspath(v) for k, v in maps.items() if v is not None})
        if args.get("read_noise") is not None:
            cam["read_noise"] = float(args["read_noise"])
        if args.get("baseline") is not None:
            cam["baseline"] = float(args["baseline"])
        if args.get("e_per_adu") is not None:
            cam["e_per_adu"] = float(args["e_per_adu"])
        return _complete_maps(cam, args, movie, est)

    kind = kind or "scmos"
    if kind == "perfect":
        cam["kind"] = "perfect"
        return cam
    cam["kind"] = kind
    baseline, e_per_adu, em_gain, rn = (args.get(k) for k in ("baseline", "e_per_adu", "em_gain", "read_noise"))
    need_gain = (kind == "scmos" and e_per_adu is None) or (kind == "emccd" and (e_per_adu is None or em_gain is None))
    fit = None
    if baseline is None or need_gain:
        read_var = None
        if rn is not None and e_per_adu is not None and kind == "scmos":
            read_var = (rn / e_per_adu) ** 2
        fit = mean_variance(movie, offset=baseline, read_var=read_var)
        if not (fit.slope > 0):
            raise DecodeAccelError("the movie's variance does not grow with its mean (no usable background pixels)",
                                   path=args.get("input"), field="--e-per-adu",
                                   fix="give the camera's --baseline and --e-per-adu (and --em-gain for an EMCCD)")
        for note in fit.notes:
            est.append(Estimate("mean-variance note", float("nan"), None, "", "note", note))
        est.append(Estimate("mean-variance slope", fit.slope, fit.slope_sd, "ADU²/ADU", "estimated",
                            f"{fit.n_pixels} background pixels over {movie.shape[0]} frames"))
    if baseline is None:
        baseline = fit.offset
        est.append(Estimate("offset (baseline)", baseline, fit.offset_sd, "ADU", "estimated",
                            "intercept of the mean-variance line"))
    else:
        est.append(Estimate("offset (baseline)", baseline, None, "ADU", "given"))
    if kind == "scmos":
        if e_per_adu is None:
            e_per_adu = 1.0 / fit.slope
            est.append(Estimate("conversion", e_per_adu, fit.slope_sd / fit.slope ** 2, "e-/ADU", "estimated", "1 / slope"))
        else:
            est.append(Estimate("conversion", e_per_adu, None, "e-/ADU", "given"))
        rn = _given_or_assumed(est, "read noise", rn, 0.0, "e- rms",
                               "folded into the offset by the mean-variance fit; give --read-noise")
    else:  # emccd: the movie fixes EM gain / (e-/ADU) = slope / 2
        ratio, ratio_sd = (fit.slope / 2.0, fit.slope_sd / 2.0) if fit is not None else (em_gain / e_per_adu, None)
        if e_per_adu is None and em_gain is None:

            e_per_adu = CameraConfig().e_per_adu
            est.append(Estimate("conversion", e_per_adu, None, "e-/ADU", "assumed",
                                "only EM gain / conversion is identifiable; give --e-per-adu or --em-gain"))
        if em_gain is None:
            em_gain = ratio * e_per_adu
            est.append(Estimate("EM gain", em_gain, None if ratio_sd is None else ratio_sd * e_per_adu, "-", "estimated",
                                "slope / 2 x conversion"))
        elif e_per_adu is None:
            e_per_adu = em_gain / ratio
            est.append(Estimate("conversion", e_per_adu, None if ratio_sd is None else e_per_adu * ratio_sd / ratio,
                                "e-/ADU", "estimated", "2 x EM gain / slope"))
        if rn is not None:
            cam["read_noise"] = float(rn)
        cam["em_gain"] = float(em_gain)
    cam.update(baseline=float(baseline), e_per_adu=float(e_per_adu))
    if kind == "scmos":
        cam["read_noise"] = float(rn)
    return cam


def _complete_maps(cam: dict, args: dict, movie: np.ndarray, est: list[Estimate]) -> dict:
    """sCMOS maps given: estimate from the movie what the maps and options leave open (conversion, read noise)."""


    have = Camera(CameraConfig(**cam))._maps
    need_gain = "e_per_adu" not in have and args.get("e_per_adu") is None
    need_read = "variance" not in have and args.get("read_noise") is None
    if "offset" not in have:
        est.append(Estimate("offset", float(cam.get("baseline", 100.0)), None, "ADU",
                            "given" if args.get("baseline") is not None else "assumed", "no offset map"))
    if not (need_gain or need_read):
        return cam
    offset = have["offset"].numpy() if "offset" in have else float(cam.get("baseline", 100.0))
    fit = mean_variance(movie, offset=offset)
    if need_gain:
        cam["e_per_adu"] = float(1.0 / fit.slope)
        est.append(Estimate("conversion", cam["e_per_adu"], fit.slope_sd / fit.slope ** 2, "e-/ADU", "estimated",
                            "no conversion map: 1 / mean-variance slope"))
    if need_read:
        gain = have["e_per_adu"].median().item() if "e_per_adu" in have else cam.get("e_per_adu", 1.0)
        r = max(fit.read_var or 0.0, 0.0)
        cam["read_noise"] = float(np.sqrt(r) * gain)
        est.append(Estimate("read noise", cam["read_noise"], None, "e- rms", "estimated",
                            f"no variance map: intercept of the mean-variance line, {r:.3g} ADU²"))
    return cam


def _robust_sd_of_median(x: np.ndarray) -> float:
    return float(1.2533 * np.std(x) / math.sqrt(max(len(x), 1)))


def calibrate(movie_path: str | os.PathLike, *, px_size: float | None = None, camera: str | None = None,
              baseline: float | None = None, e_per_adu: float | None = None, em_gain: float | None = None,
              qe: float | None = None, read_noise: float | None = None, scmos_maps: str | None = None,
              scmos_offset_map: str | None = None, scmos_variance_map: str | None = None,
              scmos_e_per_adu_map: str | None = None, roi_origin: tuple[int, int] | None = None,
              psf: str = "gaussian", bead_stack: str | None = None, z_step: float | None = None,
              psf_calibration: str | None = None, z_range: tuple[float, float] | None = None, frame_size: int = 40,
              threshold: float = 5.0,
              sigma_init: float = 1.0, match_density: bool = True) -> CalibrationResult:
    """Estimate a :class:`~decode_accel.simulation.config.SimulationConfig` that matches a recorded movie.

    Args:
        movie_path: TIFF movie in ADU (one channel).
        px_size: pixel size in the sample (nm); default the file's metadata.
        camera: 'scmos', 'emccd' or 'perfect'; default scmos with maps, else a linear (sCMOS/CCD) camera.
        baseline (ADU), e_per_adu (e-/ADU), em_gain (-), qe (e-/photon), read_noise (e- rms): known
            camera values; unknown ones are estimated or assumed (the table says which).
        scmos_maps: .npz of per-pixel maps (offset_adu, variance_adu2, e_per_adu); or the single-map files.
        roi_origin: (row, col) of the movie on full-chip maps (px).
        psf: 'gaussian' (σ from the movie) or 'astigmatic' (needs ``bead_stack`` and ``z_step`` nm, or
            ``psf_calibration``: SMAP's ``*_3dcal.mat`` or ThunderSTORM's calibration ``.yaml``).
        z_range: emitter z range for an astigmatic PSF (nm); default the bead stack's fitted range.
        frame_size: side of the training frames written to the config (px).
        threshold: spot detection threshold (robust sd of the filtered frame).
        sigma_init: PSF sd to start from (px).
        match_density: scale the density so that simulated frames give the movie's detection count.
    """


    movie_path = os.fspath(movie_path)
    mv = open_movie(movie_path)
    if mv.n_channels != 1:
        raise DecodeAccelError(f"the movie has {mv.n_channels} channels; calibrate reads one", path=movie_path,
                               field="--input", fix="calibrate each channel's movie on its own")
    adu = np.asarray(mv.read(slice(0, mv.n_frames)), dtype=np.float64)[:, 0]
    px = px_size if px_size is not None else mv.px_size_nm
    if px is None:
        raise DecodeAccelError("the pixel size is not in the file's metadata", path=movie_path, field="--px-size",
                               fix="give --px-size NM (the camera pixel in the sample plane)")
    if adu.shape[0] < 3:
        raise DecodeAccelError(f"the movie has {adu.shape[0]} frames, calibrate needs >= 3", path=movie_path,
                               field="--input", fix="give a longer movie")
    T, H, W = adu.shape
    args = dict(camera=camera, baseline=baseline, e_per_adu=e_per_adu, em_gain=em_gain, qe=qe, read_noise=read_noise,
                scmos_maps=scmos_maps, scmos_offset_map=scmos_offset_map, scmos_variance_map=scmos_variance_map,
                scmos_e_per_adu_map=scmos_e_per_adu_map, input=movie_path)
    est: list[Estimate] = [Estimate("pixel size", float(px), None, "nm", "given" if px_size is not None else "file metadata")]
    cam_cfg = _camera_section(args, adu, est)
    if roi_origin is not None:
        cam_cfg["roi_origin"] = [int(roi_origin[0]), int(roi_origin[1])]
    try:
        camera_cfg = CameraConfig(**cam_cfg)
    except Exception as err:  # noqa: BLE001 - pydantic names the field
        raise DecodeAccelError(f"camera settings are invalid ({' '.join(str(err).split())[:300]})", field="camera") from None
    cam = Camera(camera_cfg, (H, W))
    if roi_origin is None and cam.map_shape is not None and tuple(cam.map_shape) != (H, W):
        roi_origin = roi_origin_from_metadata(movie_path)
        if roi_origin is not None:  # the movie is a region of the chip and its file says which
            est.append(Estimate("ROI origin (row, col)", float(roi_origin[0]), None, "px", "file metadata",
                                f"column {roi_origin[1]}; the movie's place on the sCMOS maps"))
            camera_cfg = camera_cfg.model_copy(update={"roi_origin": tuple(roi_origin)})
            cam = Camera(camera_cfg, (H, W))
    adu_t = torch.from_numpy(adu.astype(np.float32))[:, None]
    electrons = (cam.to_photons(adu_t) * camera_cfg.qe)[:, 0].double().numpy()
    # per-pixel read-noise variance in e-² (sCMOS correction of the fit)
    if "variance" in cam._maps:
        var_e = (cam._param("variance", adu_t[:1]) * torch.as_tensor(cam._param("e_per_adu", adu_t[:1])) ** 2)
        var_e = torch.as_tensor(var_e).expand(1, 1, H, W)[0, 0].double().numpy()
        hot = int((var_e > 25 * np.median(var_e)).sum())
        est.append(Estimate("read noise (map median)", float(np.sqrt(np.median(var_e))), None, "e- rms", "given",
                            f"{hot} hot pixels (variance > 25 x median)"))
    elif camera_cfg.kind == "scmos":
        var_e = np.full((H, W), camera_cfg.read_noise ** 2)
    else:
        var_e = None
    excess = 2.0 if camera_cfg.kind == "emccd" else 1.0

    # -- PSF
    psf_section: dict[str, Any]
    if psf == "astigmatic":
        if psf_calibration is not None:

            cal = load_psf_calibration(psf_calibration)
            how, source = f"from {os.path.basename(os.fspath(psf_calibration))}", "given"
        elif bead_stack is None or z_step is None:
            raise DecodeAccelError("an astigmatic PSF needs a bead z-stack or a calibration file", field="--bead-stack",
                                   fix="give --bead-stack STACK.tif --z-step NM, or --psf-calibration FILE "
                                       "(SMAP *_3dcal.mat or ThunderSTORM .yaml)")
        else:

            stack = _read_stack(bead_stack)
            bead_e = stack  # beads are bright: the fit is insensitive to the exact offset; subtract a low percentile
            bead_e = (bead_e - np.percentile(bead_e, 5)).clip(0)
            cal = fit_bead_stack(bead_e, z_step=float(z_step), sigma_init=sigma_init)
            how, source = f"bead stack, {cal.n_points} plane fits", "estimated"
        psf_section = dict(kind="astigmatic", **cal.psf_fields())
        for name, (v, s) in cal.summary().items():
            unit = "px" if name.startswith("sigma0") else ("nm" if name.startswith(("focal", "depth")) else "-")
            est.append(Estimate(f"PSF {name}", v, s, unit, source, how))
        zr = tuple(z_range) if z_range is not None else cal.z_span
        fits_mode, sig0 = "sigma_xy", float(min(cal.sigma0_x, cal.sigma0_y))
    else:
        free = find_and_fit(electrons, sigma=sigma_init, threshold=threshold, read_var=var_e, excess_noise=excess,
                            mode="sigma")
        good = free.converged & (free.loglik_ratio < 3.0)
        if good.sum() < 5:
            raise DecodeAccelError(f"only {int(good.sum())} isolated spots could be fitted", path=movie_path,
                                   field="--threshold", fix="lower --threshold, or check the camera offset and gain")
        ph = free.photons[good]
        bright = good.copy()
        bright[good] = ph >= np.median(ph)
        sig = free.sigma_x[bright]
        sigma = float(np.median(sig))
        est.append(Estimate("PSF sigma", sigma, _robust_sd_of_median(sig), "px", "estimated",
                            f"median of {int(bright.sum())} bright isolated spots (spread {np.std(sig):.2f} px); "
                            f"{sigma * px:.0f} nm"))
        psf_section = dict(kind="gaussian", sigma=sigma)
        zr = (0.0, 0.0)
        fits_mode, sig0 = "fixed", sigma

    # -- photons, background, density from fixed-PSF refits
    fits = find_and_fit(electrons, sigma=sig0, threshold=threshold, read_var=var_e, excess_noise=excess, mode=fits_mode)
    ok = fits.converged & (fits.loglik_ratio < 3.0)
    fits = fits.select(ok)
    if len(fits) < 5:
        raise DecodeAccelError(f"only {len(fits)} spots could be fitted", path=movie_path, field="--threshold",
                               fix="lower --threshold, or check the camera")
    qe_ = camera_cfg.qe
    photons = fits.photons / qe_

    cands = detect_spots(electrons, sigma=sig0, threshold=threshold, noise_var=var_e)
    counts = np.bincount(cands[:, 0], minlength=T)
    area_um2 = H * W * (px / 1000.0) ** 2
    density = float(counts.mean() / area_um2)
    est.append(Estimate("detections per frame", float(counts.mean()), float(counts.std(ddof=1) / math.sqrt(T)), "count",
                        "estimated", f"threshold {threshold:g} sd; frames: {', '.join(str(int(c)) for c in counts[:12])}"))
    est.append(Estimate("density", density, float(counts.std(ddof=1) / math.sqrt(T) / area_um2), "1/µm²", "estimated",
                        "visible emitters per frame; a lower bound (dim and overlapping molecules are missed)"))
    p_mean, p_sd = float(np.mean(photons)), float(np.std(photons))
    skew = float(np.mean(((photons - p_mean) / max(p_sd, 1e-9)) ** 3))
    dist = "lognormal" if skew > 0.5 else "normal"
    est.append(Estimate("photons mean", p_mean, p_sd / math.sqrt(len(photons)), "photons", "estimated",
                        f"MLE of {len(photons)} isolated spots (median {np.median(photons):.0f}); brighter than "
                        "all molecules: detection misses the dim ones"))
    est.append(Estimate("photons sd", p_sd, p_sd / math.sqrt(2 * len(photons)), "photons", "estimated",
                        f"skewness {skew:.2f} -> {dist}"))
    from scipy import ndimage  # heavy: scipy.ndimage is slow to import, only this step needs it

    frame_bg = np.median(electrons.reshape(T, -1), axis=1) / qe_
    bg_fit = fits.bg / qe_
    # the background map: a median filter wider than a spot, per frame; its spread over the field and frames
    size = 2 * int(math.ceil(4 * sig0)) + 1
    bg_map = np.stack([ndimage.median_filter(f, size=size) for f in electrons]) / qe_
    lo, hi = (float(v) for v in np.percentile(bg_map, [2, 98]))
    lo = max(lo, 0.0)
    est.append(Estimate("background (frame medians)", float(frame_bg.mean()), float(frame_bg.std(ddof=1)),
                        "photons/px", "estimated", f"range {frame_bg.min():.2f} - {frame_bg.max():.2f} over frames"))
    est.append(Estimate("background range (2-98 % of the map)", float(np.median(bg_map)), float((hi - lo) / 4),
                        "photons/px", "estimated", f"{lo:.2f} - {hi:.2f} over the field and frames -> background.uniform"))
    est.append(Estimate("background (local, spot fits)", float(np.median(bg_fit)), float(np.std(bg_fit)), "photons/px",
                        "estimated", f"5-95 %: {np.percentile(bg_fit, 5):.2f} - {np.percentile(bg_fit, 95):.2f}"))
    sim = SimulationConfig(
        frame=dict(height=int(frame_size), width=int(frame_size), px_size=float(px)),
        emitters=dict(density=density, photons_mean=p_mean, photons_sd=max(p_sd, 1e-3), photons_distribution=dist,
                      z_range=tuple(zr), label_min_photons=float(min(100.0, 0.2 * p_mean))),
        psf=psf_section, background=dict(uniform=(lo, max(hi, lo))), camera=camera_cfg.model_dump(mode="json"))
    res = CalibrationResult(simulation=sim, estimates=est, fits=fits, movie_adu=adu, movie_path=movie_path,
                            roi_origin=roi_origin, counts_per_frame=counts,
                            extra=dict(electrons=electrons, var_e=var_e, excess=excess, sigma=sig0, mode=fits_mode,
                                       threshold=threshold, photons=photons))
    if match_density and counts.mean() > 0:
        _match_density(res, cam)
    return res


def _sim_counts(res: CalibrationResult, cam, seed: int, n_rep: int = 3) -> float:
    """Mean detections per frame in frames simulated from ``res.simulation`` at the movie's size."""

    ex = res.extra
    qe = res.simulation.camera.qe
    total, frames = 0, 0
    for rep in range(n_rep):
        sim_adu, movie = simulate_like(res, seed=seed + rep)
        e = (cam.to_photons(torch.from_numpy(sim_adu.astype(np.float32))[:, None], origin=_origin(res, cam))
             * qe)[:, 0].double().numpy()
        total += len(detect_spots(e, sigma=ex["sigma"], threshold=ex["threshold"], noise_var=ex["var_e"]))
        frames += e.shape[0]
    return total / frames


def _origin(res: CalibrationResult, cam):
    if cam.map_shape is None or tuple(cam.map_shape) == tuple(res.movie_adu.shape[1:]):
        return None
    return res.roi_origin or cam.roi_origin


def _match_density(res: CalibrationResult, cam, iterations: int = 2, seed: int = 1) -> None:
    """Scale the density until frames simulated from the config give as many detections as the movie.

    Detections undercount molecules (overlaps, dim ones, partial on-frames); the same detector run on
    simulated frames undercounts the same way, so matching the counts estimates the true density.
    """
    T = res.movie_adu.shape[0]
    target = float(res.counts_per_frame.mean())
    rel_sd = float(res.counts_per_frame.std(ddof=1) / math.sqrt(T) / max(target, 1e-9))
    density = res.simulation.emitters.density
    first = density
    for _ in range(iterations):
        got = _sim_counts(res, cam, seed)
        if got <= 0:
            break
        density = density * target / got
        data = res.simulation.model_dump()
        data["emitters"]["density"] = density
        res.simulation = type(res.simulation).model_validate(data)
    res.estimates.append(Estimate("density (matched)", density, density * rel_sd, "1/µm²", "estimated",
                                  f"simulated frames give the movie's detections per frame ({first:.3g} counted); "
                                  "written to the config"))


def _read_stack(path: str) -> np.ndarray:

    st = open_movie(path)
    return np.asarray(st.read(slice(0, st.n_frames)), dtype=np.float64)[:, 0]


def write_config(result: CalibrationResult, out: str | os.PathLike) -> None:
    """Write the ``simulation:`` section (YAML, loadable with ``--config``) with the table as a comment."""
    data = {"simulation": result.simulation.model_dump(mode="json")}
    head = [f"# written by decode-accel calibrate from {result.movie_path} on "
            f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            "# estimates (value ± 1 sd, unit, how it was obtained):"]
    head += ["# " + line for line in result.table().splitlines()]
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None),
                       encoding="utf-8")


def simulate_like(result: CalibrationResult, seed: int = 0):
    """Frames simulated with the written config at the movie's size and place on the chip: (adu (T, H, W), movie)."""

    T, H, W = result.movie_adu.shape
    data = result.simulation.model_dump()
    data["frame"].update(height=H, width=W)
    if result.roi_origin is not None:
        data["camera"]["roi_origin"] = tuple(result.roi_origin)
        data["camera"]["scmos_training_crop"] = "roi"
    sim = Simulator(type(result.simulation).model_validate(data))
    movie = sim.sample(T, sim.generator(seed))
    return movie.frames_adu[:, 0].double().numpy(), movie


def comparison_figure(result: CalibrationResult, path: str | os.PathLike, seed: int = 0) -> dict[str, float]:
    """PNG of real beside simulated frames, their pixel histograms and the KS distance; returns the figures.

    Returns a dict: ``ks_pixels`` (two-sample KS statistic of all pixel values, ADU), ``ks_photons``
    (KS of the spot photons fitted the same way in both), ``counts_real``, ``counts_sim`` (mean
    detections per frame).
    """
    import matplotlib  # heavy: matplotlib only for the report figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: pyplot is slow to import, only for the report figure
    from scipy.stats import ks_2samp  # heavy: scipy.stats is slow to import, only the figure needs it



    sim_adu, movie = simulate_like(result, seed)
    real = result.movie_adu
    rng = np.random.default_rng(seed)
    a = real.ravel()[rng.choice(real.size, min(real.size, 200_000), replace=False)]
    b = sim_adu.ravel()[rng.choice(sim_adu.size, min(sim_adu.size, 200_000), replace=False)]
    ks_pix = float(ks_2samp(a, b).statistic)
    # the same spot pipeline on the simulated frames
    cfg = result.simulation
    cam = Camera(cfg.camera, real.shape[1:])
    e_sim = (cam.to_photons(torch.from_numpy(sim_adu.astype(np.float32))[:, None], origin=_origin(result, cam))
             * cfg.camera.qe)[:, 0].double().numpy()
    ex = result.extra
    fs = find_and_fit(e_sim, sigma=ex["sigma"], threshold=ex["threshold"], read_var=ex["var_e"],
                      excess_noise=ex["excess"], mode=ex["mode"])
    fs = fs.select(fs.converged & (fs.loglik_ratio < 3.0))
    sim_ph = fs.photons / cfg.camera.qe
    ks_ph = float(ks_2samp(ex["photons"], sim_ph).statistic) if len(sim_ph) > 1 else float("nan")
    counts_sim = np.bincount(detect_spots(e_sim, sigma=ex["sigma"], threshold=ex["threshold"], noise_var=ex["var_e"])[:, 0],
                             minlength=real.shape[0])
    T, H, W = real.shape
    s = min(64, H, W)
    r0, c0 = (H - s) // 2, (W - s) // 2
    lo, hi = np.percentile(real[0], [1, 99.8])
    fig, ax = plt.subplots(2, 3, figsize=(13, 8))
    for k, (img, title) in enumerate([(real, "recorded"), (sim_adu, "simulated from the config")]):
        ax[k, 0].imshow(img[0], cmap="gray", vmin=lo, vmax=hi)
        ax[k, 0].set_title(f"{title}: frame 0 (ADU)")
        ax[k, 1].imshow(img[min(1, T - 1), r0:r0 + s, c0:c0 + s], cmap="gray", vmin=lo, vmax=hi)
        ax[k, 1].set_title(f"{title}: frame 1, central {s}x{s} px")
    bins = np.linspace(min(a.min(), b.min()), np.percentile(np.concatenate([a, b]), 99.99), 120)
    ax[0, 2].hist(a, bins=bins, histtype="step", label="recorded", density=True)
    ax[0, 2].hist(b, bins=bins, histtype="step", label="simulated", density=True)
    ax[0, 2].set_yscale("log")
    ax[0, 2].set_xlabel("pixel value (ADU)")
    ax[0, 2].set_title(f"pixel values: KS = {ks_pix:.3f}")
    ax[0, 2].legend()
    pb = np.linspace(0, np.percentile(np.concatenate([ex["photons"], sim_ph]) if len(sim_ph) else ex["photons"], 99), 40)
    ax[1, 2].hist(ex["photons"], bins=pb, histtype="step", label=f"recorded ({len(ex['photons'])})", density=True)
    ax[1, 2].hist(sim_ph, bins=pb, histtype="step", label=f"simulated ({len(sim_ph)})", density=True)
    ax[1, 2].set_xlabel("photons of isolated spots (MLE)")
    ax[1, 2].set_title(f"spot photons: KS = {ks_ph:.3f}; detections/frame {result.counts_per_frame.mean():.1f} "
                       f"vs {counts_sim.mean():.1f}", fontsize=9)
    ax[1, 2].legend()
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=90)
    plt.close(fig)
    return dict(ks_pixels=ks_pix, ks_photons=ks_ph, counts_real=float(result.counts_per_frame.mean()),
                counts_sim=float(counts_sim.mean()))
