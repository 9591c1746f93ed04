"""Astigmatic 3D PSF: per-axis calibration from a bead z-stack, and imports from DECODE/SMAP and ThunderSTORM.

The model, per image axis (x = columns, y = rows, as everywhere in decode_accel):

    σ_x(z) = σ0_x·sqrt(1 + u² + A_x·u³ + B_x·u⁴),  u = (z − focal_x)/depth_x,

and the same for y. ``focal_x`` is the z (nm) where the width along x is smallest. These are the
numbers ThunderSTORM's calibration reports (its ``DaostormCalibration``: w0, c, d, a, b per axis,
axis 1 = x = columns, z in nm, widths in px), so its values go in unchanged. DECODE (and SMAP,
whose x is MATLAB's first index) name the image *row* x: DECODE's
``sigma_x = σ0·sqrt(1 + ((z + foc_shift)/d)²)`` is the width along rows, narrowest at
z = −foc_shift; along columns the PSF is narrowest at z = +foc_shift (as in Huang et al. 2008).
:func:`from_decode` and :func:`from_row_column` do that swap, so no sign convention can mirror z.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from decode_accel.errors import DecodeAccelError

AXIS_FIELDS = ("sigma0", "focal", "depth", "A", "B")


@dataclass
class AstigmaticCalibration:
    """Per-axis astigmatic parameters (px, nm, nm, -, -) and, from a fit, their 1-sd uncertainties."""

    sigma0_x: float
    focal_x: float
    depth_x: float
    sigma0_y: float
    focal_y: float
    depth_y: float
    A_x: float = 0.0
    B_x: float = 0.0
    A_y: float = 0.0
    B_y: float = 0.0
    sd: dict | None = None
    n_points: int = 0
    z_span: tuple[float, float] = (-500.0, 500.0)

    def psf_fields(self) -> dict[str, float]:
        """Fields of a ``PSFConfig(kind='astigmatic', ...)``."""
        return dict(sigma0_x=self.sigma0_x, focal_x=self.focal_x, depth_x=self.depth_x, A_x=self.A_x, B_x=self.B_x,
                    sigma0_y=self.sigma0_y, focal_y=self.focal_y, depth_y=self.depth_y, A_y=self.A_y, B_y=self.B_y)

    def summary(self) -> dict[str, tuple[float, float | None]]:
        """name -> (value, sd) of the fitted parameters."""
        sd = self.sd or {}
        return {k: (v, sd.get(k)) for k, v in self.psf_fields().items() if k in sd or not k.startswith(("A_", "B_"))}

    def widths(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(σ_x, σ_y) in px at z (nm)."""
        z = np.asarray(z, dtype=np.float64)
        return (huang_width(z, self.sigma0_x, self.focal_x, self.depth_x, self.A_x, self.B_x),
                huang_width(z, self.sigma0_y, self.focal_y, self.depth_y, self.A_y, self.B_y))

    def z_from_widths(self, sx: float, sy: float, z_grid: np.ndarray | None = None) -> float:
        """z (nm) whose model widths are closest to measured (σ_x, σ_y) (px), as ThunderSTORM's lookup."""
        zg = np.linspace(self.z_span[0], self.z_span[1], 4001) if z_grid is None else z_grid
        mx, my = self.widths(zg)
        d = (np.sqrt(sx) - np.sqrt(mx)) ** 2 + (np.sqrt(sy) - np.sqrt(my)) ** 2
        return float(zg[int(np.argmin(d))])


def huang_width(z, sigma0, focal, depth, A=0.0, B=0.0):
    """Width (px) of the Huang model at z (nm)."""
    u = (np.asarray(z, dtype=np.float64) - focal) / depth
    return sigma0 * np.sqrt(np.clip(1.0 + u ** 2 + A * u ** 3 + B * u ** 4, 1e-2, None))


# ------------------------------------------------------------------------------------------ imports
def from_row_column(row: dict, column: dict, z_span: tuple[float, float] = (-500.0, 500.0)) -> AstigmaticCalibration:
    """Per-axis parameters named by image axis: ``row`` (the width along rows = decode_accel's y) and
    ``column`` (decode_accel's x), each a dict with sigma0 (px), focal (nm), depth (nm), optional A, B."""
    def g(d, k):
        return float(d.get(k, 0.0))
    return AstigmaticCalibration(sigma0_x=g(column, "sigma0"), focal_x=g(column, "focal"), depth_x=g(column, "depth"),
                                 A_x=g(column, "A"), B_x=g(column, "B"), sigma0_y=g(row, "sigma0"),
                                 focal_y=g(row, "focal"), depth_y=g(row, "depth"), A_y=g(row, "A"), B_y=g(row, "B"),
                                 z_span=z_span)


def from_decode(sigma_0: float, foc_shift: float, rl_range: float,
                z_span: tuple[float, float] = (-500.0, 500.0)) -> AstigmaticCalibration:
    """DECODE's astigmatic Gaussian (``astigmatism(z, sigma_0, foc_shift, rl_range)``, x = rows).

    DECODE: σ_rows = σ0·sqrt(1 + ((z + foc_shift)/d)²), σ_columns = σ0·sqrt(1 + ((z − foc_shift)/d)²).
    So decode_accel's x (columns) has focal_x = +foc_shift and y (rows) focal_y = −foc_shift.
    """
    return from_row_column(row=dict(sigma0=sigma_0, focal=-foc_shift, depth=rl_range),
                           column=dict(sigma0=sigma_0, focal=+foc_shift, depth=rl_range), z_span=z_span)


def from_thunderstorm(path_or_mapping, z_span: tuple[float, float] | None = None) -> AstigmaticCalibration:
    """ThunderSTORM's astigmatism calibration (YAML of ``DaostormCalibration``: w01, c1, d1, a1, b1 for
    x = columns, w02, ... for y; angle 0), or a mapping with those keys. Widths in px, z in nm."""
    import yaml

    where = None
    data = path_or_mapping
    if isinstance(data, (str, os.PathLike)):
        where = os.fspath(data)
        if not os.path.exists(where):
            raise DecodeAccelError("calibration file not found", path=where, field="--thunderstorm-calibration")
        text = open(where, encoding="utf-8").read()
        # ThunderSTORM writes a Java class tag on the first line: read past it
        text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("!!"))
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            raise DecodeAccelError("not a YAML calibration", path=where, fix="give ThunderSTORM's calibration .yaml") from None
    if not isinstance(data, dict):
        raise DecodeAccelError("not a ThunderSTORM calibration", path=where, fix="give ThunderSTORM's calibration .yaml")
    missing = [k for k in ("w01", "c1", "d1", "w02", "c2", "d2") if k not in data]
    if missing:
        raise DecodeAccelError(f"missing {', '.join(missing)}", path=where, field="calibration",
                               fix="export a DAOSTORM-model astigmatism calibration from ThunderSTORM")
    if abs(float(data.get("angle", 0.0) or 0.0)) > 1e-6:
        raise DecodeAccelError(f"rotated calibration (angle {data['angle']}) is not supported", path=where, field="angle",
                               fix="calibrate with the cylindrical lens along the camera axes (angle 0)")
    focal = [float(data["c1"]), float(data["c2"])]
    span = z_span or (min(focal) - 2 * float(data["d1"]), max(focal) + 2 * float(data["d2"]))
    return AstigmaticCalibration(sigma0_x=float(data["w01"]), focal_x=focal[0], depth_x=float(data["d1"]),
                                 A_x=float(data.get("a1", 0.0)), B_x=float(data.get("b1", 0.0)),
                                 sigma0_y=float(data["w02"]), focal_y=focal[1], depth_y=float(data["d2"]),
                                 A_y=float(data.get("a2", 0.0)), B_y=float(data.get("b2", 0.0)), z_span=span)


def to_thunderstorm(cal: AstigmaticCalibration) -> dict[str, float]:
    """The calibration as ThunderSTORM's DaostormCalibration fields (1 = x = columns)."""
    return dict(angle=0.0, w01=cal.sigma0_x, c1=cal.focal_x, d1=cal.depth_x, a1=cal.A_x, b1=cal.B_x,
                w02=cal.sigma0_y, c2=cal.focal_y, d2=cal.depth_y, a2=cal.A_y, b2=cal.B_y)


# ------------------------------------------------------------------------------------------ bead fit
def fit_bead_stack(stack: np.ndarray, z_step: float, *, z0_plane: float | None = None, sigma_init: float = 1.3,
                   roi_size: int | None = None, higher_order: bool = False, read_var: np.ndarray | None = None,
                   min_photons: float = 0.0) -> AstigmaticCalibration:
    """Fit the per-axis astigmatic model to a bead z-stack.

    Every plane's beads are fitted with an elliptical integrated Gaussian (Poisson MLE, widths σ_x
    along columns and σ_y along rows, each with its CRLB); then σ_x(z) and σ_y(z) are each fitted
    with the Huang model by weighted least squares, and the parameter uncertainties are the square
    roots of the covariance diagonal (scaled by the reduced χ² when it exceeds 1).

    Args:
        stack: (Z, H, W) bead images (photoelectrons, offset removed), planes in z order.
        z_step: plane spacing (nm).
        z0_plane: plane index of z = 0 (default the middle plane, (Z - 1)/2).
        sigma_init: starting width (px).
        roi_size: fit ROI side (px), default 2·ceil(3·2.5·sigma_init) + 1 (defocused beads are wide).
        higher_order: also fit A and B per axis.
        read_var: (H, W) read-noise variance (e-²) for the sCMOS correction.
        min_photons: drop plane fits below this signal (e-).
    """
    from scipy.optimize import curve_fit

    from .spots import cut_rois, detect_spots, fit_spots

    stack = np.asarray(stack, dtype=np.float64)
    if stack.ndim != 3 or stack.shape[0] < 5:
        raise DecodeAccelError(f"bead stack has shape {stack.shape}; need (planes >= 5, H, W)", field="--bead-stack",
                               fix="record at least 5 z planes")
    Z, H, W = stack.shape
    zc = (Z - 1) / 2.0 if z0_plane is None else float(z0_plane)
    z = (np.arange(Z) - zc) * float(z_step)
    R = int(roi_size) if roi_size else 2 * math.ceil(3 * 2.5 * sigma_init) + 1
    half = R // 2
    # beads: maxima of the stack's mean projection (they stay in place while z changes)
    proj = stack.mean(0)
    cands = detect_spots(proj[None], sigma=2 * sigma_init, threshold=8.0)
    cands = cands[(cands[:, 1] >= half) & (cands[:, 1] < H - half) & (cands[:, 2] >= half) & (cands[:, 2] < W - half)]
    if len(cands) == 0:
        raise DecodeAccelError("no bead found in the stack", field="--bead-stack", fix="check the stack (one bead or more, away from the edge)")
    zs, sx, sy, esx, esy = [], [], [], [], []
    for _, r, c in cands:
        plane_c = np.stack([np.arange(Z), np.full(Z, r), np.full(Z, c)], 1)
        rois, i0, j0, rv = cut_rois(stack, plane_c, R, read_var)
        res = fit_spots(rois, mode="sigma_xy", sigma_init=sigma_init, read_var=rv)
        th, cr, ok = res["theta"], res["crlb"], res["converged"] & (res["theta"][:, 2] > min_photons)
        zs.append(z[ok])
        sx.append(th[ok, 4])
        sy.append(th[ok, 5])
        esx.append(cr[ok, 4])
        esy.append(cr[ok, 5])
    zs, sx, sy, esx, esy = (np.concatenate(v) for v in (zs, sx, sy, esx, esy))
    if len(zs) < 5:
        raise DecodeAccelError(f"only {len(zs)} plane fits converged", field="--bead-stack",
                               fix="check the z step and that the bead is bright and isolated")

    def model(zz, s0, f, d, A=0.0, B=0.0):
        return huang_width(zz, s0, f, d, A, B)

    out, sds = {}, {}
    for axis, s, e in (("x", sx, esx), ("y", sy, esy)):
        f0 = float(zs[np.argmin(s)])
        p0 = [float(np.min(s)), f0, float(np.ptp(zs)) / 3 or 300.0] + ([0.0, 0.0] if higher_order else [])
        try:
            popt, pcov = curve_fit(model, zs, s, p0=p0, sigma=np.maximum(e, 1e-6), absolute_sigma=True, maxfev=20000)
        except (RuntimeError, ValueError) as err:
            raise DecodeAccelError(f"the width curve of {axis} could not be fitted ({err})", field="--bead-stack",
                                   fix="check --z-step and that the stack spans both focal planes") from None
        resid = (s - model(zs, *popt)) / np.maximum(e, 1e-6)
        chi2 = float(np.sum(resid ** 2) / max(len(zs) - len(popt), 1))
        pcov = pcov * max(chi2, 1.0)
        perr = np.sqrt(np.diag(pcov))
        names = ["sigma0", "focal", "depth"] + (["A", "B"] if higher_order else [])
        for k, n in enumerate(names):
            out[f"{n}_{axis}"] = float(popt[k] if n != "depth" else abs(popt[k]))
            sds[f"{n}_{axis}"] = float(perr[k])
    return AstigmaticCalibration(**out, sd=sds, n_points=int(len(zs)), z_span=(float(z.min()), float(z.max())))
