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
SMAP's ``*_3dcal.mat`` stores its Gaussian model as ``gauss_zfit`` = [σx0, Ax, Ay, Bx, By, γ, d, σy0]
(γ, d in µm; σx along rows narrowest at z = +γ, σy along columns at z = −γ): :func:`from_smap` reads
it (MATLAB v5/v7 through scipy, v7.3 through h5py) with the same swap.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import h5py
import numpy as np
import yaml

from decode_accel.errors import DecodeAccelError
from .spots import cut_rois, detect_spots, fit_spots

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
    where = None
    data = path_or_mapping
    if isinstance(data, (str, os.PathLike)):
        where = os.fspath(data)
        if not os.path.exists(where):
            raise DecodeAccelError("calibration file not found", path=where, field="--psf-calibration")
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


#: SMAP's ``gauss_zfit`` vector, in this order (the z-fit parameters of its Gaussian MLE fitter, fittype 3):
#: widths in px, ``gamma`` and ``d`` in µm, SMAP's x = MATLAB's first image index = rows.
SMAP_ZFIT_FIELDS = ("sigmax0", "Ax", "Ay", "Bx", "By", "gamma", "d", "sigmay0")


def from_smap_zfit(zfit, z_span: tuple[float, float] | None = None, *, path=None) -> AstigmaticCalibration:
    """SMAP's Gaussian astigmatism (``gauss_zfit`` = [σx0, Ax, Ay, Bx, By, γ, d, σy0], γ and d in µm).

    SMAP's model: σx = σx0·sqrt(1 + u² + Ax·u³ + Bx·u⁴) with u = (z − γ)/d, and σy the same with
    σy0, Ay, By and u = (z + γ)/d. SMAP's x is the image row (MATLAB's first index), so its σx is
    decode_accel's width along y: focal_y = +γ, focal_x = −γ (nm), and the A, B of x and y swap too.
    (That SMAP's x is the row follows from its fitter indexing MATLAB arrays first index first, as
    DECODE reads SMAP's spline calibrations; a calibration of a real asymmetric bead would settle it.)
    ``path`` only names the file in errors.
    """
    field = "gauss_zfit" if path is None else "SXY.gauss_zfit"
    v = np.asarray(zfit, dtype=np.float64).reshape(-1)
    if v.size != len(SMAP_ZFIT_FIELDS) or not np.all(np.isfinite(v)):
        raise DecodeAccelError(f"gauss_zfit has {v.size} values{'' if np.all(np.isfinite(v)) else ' (not all finite)'}, "
                               f"expected {len(SMAP_ZFIT_FIELDS)} ({', '.join(SMAP_ZFIT_FIELDS)})", path=path, field=field,
                               fix="export an astigmatic Gaussian calibration from SMAP's calibrate3D")
    s0_rows, a_rows, a_cols, b_rows, b_cols, gamma, d, s0_cols = v
    if not (s0_rows > 0 and s0_cols > 0 and d != 0):
        raise DecodeAccelError(f"gauss_zfit has impossible widths or depth ({v.tolist()})", path=path, field=field,
                               fix="check the calibration (σx0, σy0 > 0 px, d != 0 µm)")
    g_nm, d_nm = 1000.0 * gamma, 1000.0 * abs(d)
    span = z_span or (-abs(g_nm) - 2 * d_nm, abs(g_nm) + 2 * d_nm)
    return from_row_column(row=dict(sigma0=s0_rows, focal=+g_nm, depth=d_nm, A=a_rows, B=b_rows),
                           column=dict(sigma0=s0_cols, focal=-g_nm, depth=d_nm, A=a_cols, B=b_cols), z_span=span)


def to_smap_zfit(cal: AstigmaticCalibration) -> np.ndarray:
    """The calibration as SMAP's ``gauss_zfit`` vector (float32, γ and d in µm); needs the symmetric
    form SMAP fits: focal_y = −focal_x and one depth for both axes."""
    if abs(cal.focal_x + cal.focal_y) > 1e-6 * max(1.0, abs(cal.focal_x)) or abs(cal.depth_x - cal.depth_y) > 1e-6 * cal.depth_x:
        raise DecodeAccelError(f"SMAP's Gaussian model needs focal_y = -focal_x and one depth (got focal {cal.focal_x:g}, "
                               f"{cal.focal_y:g} nm, depth {cal.depth_x:g}, {cal.depth_y:g} nm)", field="gauss_zfit",
                               fix="export to ThunderSTORM instead (to_thunderstorm), which has per-axis parameters")
    return np.array([cal.sigma0_y, cal.A_y, cal.A_x, cal.B_y, cal.B_x, cal.focal_y / 1000.0, cal.depth_x / 1000.0,
                     cal.sigma0_x], dtype=np.float32)


def _mat_value(obj):
    """A MATLAB value read by scipy.io.loadmat (squeeze_me, struct_as_record=False) as a plain object."""
    while isinstance(obj, np.ndarray) and obj.dtype == object and obj.size >= 1:
        obj = obj.flat[0]
    return obj


def _mat_get(obj, name):
    obj = _mat_value(obj)
    if isinstance(obj, dict):
        return obj.get(name)
    if isinstance(obj, np.ndarray) and obj.dtype.names:
        return obj[name].flat[0] if name in obj.dtype.names else None
    return getattr(obj, name, None)


def _h5_value(f, node):
    """A MATLAB v7.3 (HDF5) node as numpy: datasets read (MATLAB stores them transposed), the first
    element of a reference array followed; groups are returned as they are."""
    if isinstance(node, h5py.Group):
        return node
    data = node[()]
    if node.dtype == h5py.ref_dtype or (isinstance(data, np.ndarray) and data.dtype == object):
        return _h5_value(f, f[np.asarray(data).flat[0]])
    if node.attrs.get("MATLAB_empty", 0):
        return np.zeros(0)
    return np.asarray(data).T


def _smap_zfit_from_file(where: str, index: int):
    """(gauss_zfit vector or None, number of SXY entries) from a SMAP *_3dcal.mat, v5/v7 or v7.3."""
    if h5py.is_hdf5(where):  # MATLAB -v7.3: HDF5 with a 512-byte header block
        with h5py.File(where, "r") as f:
            if "SXY" in f:
                sxy = f["SXY"]
                if not isinstance(sxy, h5py.Group) or "gauss_zfit" not in sxy:
                    return None, 1
                node = sxy["gauss_zfit"]
                data = node[()]
                if node.dtype == h5py.ref_dtype:  # a struct array: one reference per entry
                    refs = np.asarray(data).T.reshape(-1)  # MATLAB order (column-major)
                    if index >= refs.size:
                        return "index", refs.size
                    target = f[refs[index]]
                    return (None if target.attrs.get("MATLAB_empty", 0) else np.asarray(target[()]).reshape(-1)), refs.size
                return (None if node.attrs.get("MATLAB_empty", 0) else np.asarray(data).reshape(-1)), 1
            if "gauss_zfit" in f:
                node = f["gauss_zfit"]
                return (None if node.attrs.get("MATLAB_empty", 0) else np.asarray(node[()]).reshape(-1)), 1
            return None, 0
    from scipy.io import loadmat  # only for SMAP .mat files

    mat = loadmat(where, squeeze_me=True, struct_as_record=False)
    if "SXY" in mat:
        sxy = mat["SXY"]
        entries = list(np.asarray(sxy, dtype=object).reshape(-1, order="F")) if isinstance(sxy, np.ndarray) else [sxy]
        if index >= len(entries):
            return "index", len(entries)
        z = _mat_get(entries[index], "gauss_zfit")
        return (None if z is None or np.size(z) == 0 else np.asarray(z, dtype=np.float64).reshape(-1)), len(entries)
    if "gauss_zfit" in mat:
        z = mat["gauss_zfit"]
        return (None if np.size(z) == 0 else np.asarray(z, dtype=np.float64).reshape(-1)), 1
    return None, 0


def from_smap(path: str | os.PathLike, *, index: int = 0, z_span: tuple[float, float] | None = None) -> AstigmaticCalibration:
    """SMAP's astigmatic Gaussian calibration from its ``*_3dcal.mat`` (``SXY(index).gauss_zfit``, or a
    top-level ``gauss_zfit`` as the stand-alone calibrate3D writes it), MATLAB v5/v7 or v7.3 (HDF5).

    ``index`` picks the entry of a multi-channel or spatially varying calibration (SXY array, MATLAB's
    column-major order). See :func:`from_smap_zfit` for the axis and sign conventions.
    """
    where = os.fspath(path)
    if not os.path.exists(where):
        raise DecodeAccelError("calibration file not found", path=where, field="--psf-calibration",
                               fix="give SMAP's *_3dcal.mat")
    try:
        zfit, n = _smap_zfit_from_file(where, int(index))
    except DecodeAccelError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad user file
        raise DecodeAccelError(f"cannot read the MATLAB file ({type(err).__name__})", path=where, field="--psf-calibration",
                               fix="give SMAP's *_3dcal.mat (MATLAB v5, v7 or v7.3)") from None
    if isinstance(zfit, str):
        raise DecodeAccelError(f"the calibration has {n} SXY entries, index {index} is out of range", path=where,
                               field="SXY", fix=f"pick an entry 0..{n - 1}")
    if zfit is None:
        raise DecodeAccelError("no Gaussian astigmatism (gauss_zfit) in the calibration" +
                               (" (it is empty: a 2D or cspline-only calibration)" if n else ""), path=where,
                               field="SXY.gauss_zfit",
                               fix="calibrate with SMAP's astigmatic modality, or use psf.kind: spline with spline_path")
    return from_smap_zfit(zfit, z_span=z_span, path=where)


def load_psf_calibration(path: str | os.PathLike, *, index: int = 0) -> AstigmaticCalibration:
    """An astigmatic calibration from another tool's file: SMAP ``.mat`` or ThunderSTORM ``.yaml``."""
    low = os.fspath(path).lower()
    if low.endswith(".mat"):
        return from_smap(path, index=index)
    if low.endswith((".yaml", ".yml", ".txt")):
        return from_thunderstorm(path)
    raise DecodeAccelError("unknown calibration format", path=path, field="--psf-calibration",
                           fix="give SMAP's *_3dcal.mat or ThunderSTORM's calibration .yaml")


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
    from scipy.optimize import curve_fit  # heavy: scipy.optimize is slow to import, only the fit needs it


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
