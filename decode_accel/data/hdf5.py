"""The decode_accel HDF5 movie format: camera frames + ground truth + the physics that made them.

One file holds one movie (simulated, or recorded with optional ground truth)::

    /frames                 (N, C, H, W) uint16 or float32   camera counts, ADU (C = 1 or 2 channels)
    /bg                     (N, C) or (N, C, H, W) float32    expected background, photons/px per frame
    /emitters/frame         (M,) int64     0-based frame index (rows sorted by frame)
    /emitters/x, y, z       (M,) float64   nm; x along columns, y along rows, origin at the top-left
                                           pixel CORNER (pixel (i, j) has its centre at ((j+0.5)·px, (i+0.5)·px))
    /emitters/photons       (M,) float64   detected photons in that frame, both channels together
    /emitters/ratio         (M,) float64   fraction of the photons in channel 1 (two-channel; not used for C = 1)
    /emitters/id            (M,) int64     molecule id, constant while it blinks over several frames
    /emitters/photons_ch1,  (M,) float64   photons per channel (two-channel; NaN when unknown)
             photons_ch2
    /emitters/color         (M,) int64     index of the molecule's dye in the simulation's dye table (-1: unknown)
    attrs (root):
        format_version      int            1; readers refuse files with a newer version
        px_size             float          pixel size in the sample plane, nm
        n_channels          int            C
        camera              str (JSON)     the camera model (decode_accel.simulation.config.CameraConfig fields);
                                           ADU -> photons uses its inverse, camera.to_photons
        psf                 str (JSON)     the PSF model (PSFConfig fields), or "null" when unknown
        simulation_config   str (JSON)     the full SimulationConfig that produced the movie, or "null" (recorded data)
        created_by          str            "decode_accel <version>"

The emitter table is a group of equal-length 1-D columns (rather than a compound dataset) so that any HDF5
tool, h5py or MATLAB reads one column without knowing the others. Only ``frame, x, y, z, photons`` are required;
a recorded movie without ground truth has an empty ``emitters`` group.

Writes are atomic: the file is written under a temporary name in the same folder and moved into place with
``os.replace``, so an interrupted simulation never leaves a half-written ``train.h5`` that looks valid.
Every problem found when reading (missing dataset, wrong shape or dtype, NaN frames, newer format) raises a
one-line :class:`~decode_accel.errors.DecodeAccelError` naming the file and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import tifffile
import torch

from decode_accel import __version__
from decode_accel.errors import DecodeAccelError
from decode_accel.io import write_thunderstorm_csv
from decode_accel.io._atomic import atomic_path
from decode_accel.io._json import to_json_data
from decode_accel.simulation import Camera, Simulator
from decode_accel.simulation.config import CameraConfig, SimulationConfig

__all__ = [
    "FORMAT_VERSION", "EMITTER_COLUMNS", "MovieFile", "write_hdf5", "read_hdf5", "export_tiff_and_csv",
    "simulate_to_file", "camera_to_photons",
]

#: Version written by this code; files with a larger number are refused.
FORMAT_VERSION = 1

#: emitter column -> numpy dtype in the file. The first five are required.
EMITTER_COLUMNS: dict[str, str] = {
    "frame": "int64", "x": "float64", "y": "float64", "z": "float64", "photons": "float64",
    "ratio": "float64", "id": "int64", "photons_ch1": "float64", "photons_ch2": "float64", "color": "int64",
}
_REQUIRED_EMITTER_COLUMNS = ("frame", "x", "y", "z", "photons")
_FRAME_DTYPES = (np.dtype("uint16"), np.dtype("float32"))


@dataclass
class MovieFile:
    """A movie read from a decode_accel HDF5 file (everything in memory).

    Attributes:
        path: the file it came from.
        frames: (N, C, H, W) camera counts in ADU, in the stored dtype (uint16 or float32).
        bg: (N, C) or (N, C, H, W) float32 expected background, photons/px.
        emitters: ground-truth table (table convention: 0-based frame, x/y/z nm, photons, ...); may be empty.
        px_size: pixel size, nm.
        camera: camera model as a dict of CameraConfig fields.
        psf: PSF model as a dict of PSFConfig fields, or None.
        simulation_config: the SimulationConfig as a dict, or None for recorded data.
        format_version: the file's format version.
    """

    path: Path
    frames: np.ndarray
    bg: np.ndarray
    emitters: pd.DataFrame
    px_size: float
    camera: dict[str, Any]
    psf: dict[str, Any] | None = None
    simulation_config: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.frames.shape[1])

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(H, W) in px."""
        return int(self.frames.shape[2]), int(self.frames.shape[3])

    @property
    def label_min_photons(self) -> float:
        """The label filter of the simulation that wrote the file (photons); 0 for recorded data."""
        try:
            return float(self.simulation_config["emitters"]["label_min_photons"])
        except (TypeError, KeyError, ValueError):
            return 0.0

    def frames_photons(self) -> torch.Tensor:
        """The frames converted from ADU to photons with the file's camera model, float32 (N, C, H, W)."""
        return camera_to_photons(self.camera, torch.from_numpy(self.frames.astype(np.float32)), path=self.path)


# ----------------------------------------------------------------------------------------------------------------
# writing


def _config_dict(config: Any) -> dict[str, Any] | None:
    if config is not None and not (hasattr(config, "model_dump") or isinstance(config, dict)):
        raise TypeError(f"config must be a SimulationConfig, a dict or None, got {type(config).__name__}")
    return to_json_data(config)


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _frames_for_file(frames_adu: np.ndarray) -> np.ndarray:
    """uint16 when the counts are whole numbers inside the 16-bit range (a real camera's), float32 otherwise."""
    frames_adu = np.asarray(frames_adu)
    if frames_adu.dtype == np.uint16:
        return frames_adu
    if (np.all(np.isfinite(frames_adu)) and frames_adu.size and frames_adu.min() >= 0 and frames_adu.max() <= 65535
            and np.array_equal(frames_adu, np.round(frames_adu))):
        return frames_adu.astype(np.uint16)
    return frames_adu.astype(np.float32)


def _compact_bg(bg: np.ndarray) -> np.ndarray:
    """(N, C) when every frame's background is flat (uniform background: H·W times smaller), else (N, C, H, W)."""
    bg = np.asarray(bg, dtype=np.float32)
    if bg.ndim == 4 and bg.size and np.all(bg == bg[:, :, :1, :1]):
        return np.ascontiguousarray(bg[:, :, 0, 0])
    return bg


def write_hdf5(path: str | os.PathLike, movie: Any, config: Any = None, *, px_size: float | None = None,
               camera: dict[str, Any] | None = None, psf: dict[str, Any] | None = None) -> Path:
    """Write a movie to ``path`` in the decode_accel HDF5 format (atomic: temp file, then ``os.replace``).

    Args:
        path: destination ``.h5`` file; parent folders are created.
        movie: an object with ``frames_adu`` (N, C, H, W) ADU, ``bg`` (N, C[, H, W]) photons/px and ``emitters``
            (table convention, nm) — e.g. a :class:`decode_accel.simulation.SimulatedMovie`.
        config: the :class:`~decode_accel.simulation.config.SimulationConfig` that produced it (or its dict). It
            supplies ``px_size``, ``camera`` and ``psf`` unless they are given explicitly; None for recorded data.
        px_size: pixel size, nm (overrides the config's).
        camera: camera model as CameraConfig fields (overrides the config's); required without a config.
        psf: PSF model as PSFConfig fields (overrides the config's).

    Returns:
        The path written.
    """
    path = Path(path)
    cfg = _config_dict(config)
    if px_size is None:
        px_size = (cfg or {}).get("frame", {}).get("px_size")
    if camera is None:
        camera = (cfg or {}).get("camera")
    if psf is None and cfg is not None:
        psf = cfg.get("psf")
    if px_size is None or not px_size > 0:
        raise DecodeAccelError("no positive pixel size", path=path, field="px_size",
                               fix="pass a SimulationConfig or px_size=<nm>")
    if camera is None:
        raise DecodeAccelError("no camera model", path=path, field="camera",
                               fix="pass a SimulationConfig or camera=<CameraConfig fields>")

    frames = _frames_for_file(_numpy(movie.frames_adu))
    if frames.ndim != 4:
        raise DecodeAccelError(f"frames has shape {frames.shape}, expected (N, C, H, W)", path=path, field="frames")
    bg = _compact_bg(_numpy(movie.bg))
    emitters = movie.emitters if movie.emitters is not None else pd.DataFrame()
    emitters = emitters.sort_values("frame", kind="stable") if len(emitters) else emitters
    n = len(emitters)

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            n_frames, c, h, w = frames.shape
            f.create_dataset("frames", data=frames, chunks=(1, c, h, w) if n_frames else None,
                             compression="gzip", compression_opts=1, shuffle=True)
            f.create_dataset("bg", data=bg)
            grp = f.create_group("emitters")
            for col, dtype in EMITTER_COLUMNS.items():
                if col in emitters.columns:
                    values = emitters[col].to_numpy()
                elif col == "ratio":
                    values = np.full(n, 0.5)
                elif col == "id":
                    values = np.arange(n)
                elif col == "color":
                    values = np.full(n, -1)
                elif col == "photons_ch1" and c == 1 and "photons" in emitters.columns:
                    values = emitters["photons"].to_numpy()
                elif col in _REQUIRED_EMITTER_COLUMNS and n == 0:
                    values = np.zeros(0)
                elif col in _REQUIRED_EMITTER_COLUMNS:
                    raise DecodeAccelError("emitter table has no such column", path=path, field=f"emitters/{col}")
                else:
                    values = np.full(n, np.nan)
                grp.create_dataset(col, data=np.asarray(values).astype(dtype))
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["px_size"] = float(px_size)
            f.attrs["n_channels"] = int(c)
            f.attrs["camera"] = json.dumps(to_json_data(camera))
            f.attrs["psf"] = json.dumps(to_json_data(psf))
            f.attrs["simulation_config"] = json.dumps(cfg)
            f.attrs["created_by"] = f"decode_accel {__version__}"
    return path


# ----------------------------------------------------------------------------------------------------------------
# reading


def _json_attr(f: h5py.File, key: str, path: Path, *, required: bool) -> Any:
    if key not in f.attrs:
        if required:
            raise DecodeAccelError("missing attribute", path=path, field=key,
                                   fix="write the file with decode_accel.data.write_hdf5")
        return None
    raw = f.attrs[key]
    if isinstance(raw, bytes):
        raw = raw.decode()
    try:
        return json.loads(raw)
    except (TypeError, ValueError) as err:
        raise DecodeAccelError(f"attribute is not valid JSON ({err})", path=path, field=key) from None


def read_hdf5(path: str | os.PathLike) -> MovieFile:
    """Read and validate a decode_accel HDF5 movie (format in the module docstring).

    Raises:
        DecodeAccelError: one line naming the file and the problem: file missing or not HDF5, a newer
            ``format_version``, a missing dataset or attribute, a wrong shape or dtype, NaN/inf frames,
            negative or non-finite background, emitter columns of different lengths or frames out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise DecodeAccelError("no such file", path=path, fix="check the data path")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise DecodeAccelError("not an HDF5 file", path=path, fix="give a .h5 written by decode-accel simulate") from None
    try:
        with f:
            return _read_open_hdf5(f, path)
    except DecodeAccelError:
        raise
    except Exception as err:  # noqa: BLE001 - h5py raises OSError/RuntimeError/KeyError/... on damaged files
        first = str(err).splitlines()[0] if str(err) else ""
        raise DecodeAccelError(f"damaged or malformed HDF5 file ({type(err).__name__}: {first})", path=path,
                               fix="re-create it with decode-accel simulate or decode_accel.data.write_hdf5") from None


def _read_open_hdf5(f: h5py.File, path: Path) -> MovieFile:
    """The checks of :func:`read_hdf5` on an open file."""
    version = f.attrs.get("format_version")
    if version is None:
        raise DecodeAccelError("missing attribute", path=path, field="format_version",
                               fix="write the file with decode_accel.data.write_hdf5")
    if int(version) > FORMAT_VERSION:
        raise DecodeAccelError(f"format_version {int(version)} is newer than this decode_accel reads "
                               f"({FORMAT_VERSION})", path=path, field="format_version", fix="upgrade decode_accel")
    px_size = f.attrs.get("px_size")
    if px_size is None or not np.isfinite(px_size) or float(px_size) <= 0:
        raise DecodeAccelError(f"pixel size {px_size!r} is missing or not positive", path=path, field="px_size",
                               fix="store the pixel size in nm")
    camera = _json_attr(f, "camera", path, required=True)
    if not isinstance(camera, dict):
        raise DecodeAccelError("camera attribute is not a JSON object", path=path, field="camera")
    psf = _json_attr(f, "psf", path, required=False)
    sim_cfg = _json_attr(f, "simulation_config", path, required=False)

    for key in ("frames", "bg", "emitters"):
        if key not in f:
            raise DecodeAccelError("missing dataset" if key != "emitters" else "missing group", path=path, field=key,
                                   fix="write the file with decode_accel.data.write_hdf5")
    dset = f["frames"]
    if not isinstance(dset, h5py.Dataset) or dset.ndim != 4:
        shape = getattr(dset, "shape", None)
        raise DecodeAccelError(f"shape {shape}, expected (N, C, H, W)", path=path, field="frames")
    if dset.dtype not in _FRAME_DTYPES:
        raise DecodeAccelError(f"dtype {dset.dtype}, expected uint16 or float32 (ADU)", path=path, field="frames")
    n_frames, c, h, w = dset.shape
    if c not in (1, 2) or n_frames < 1 or h < 1 or w < 1:
        raise DecodeAccelError(f"shape {dset.shape}: need N >= 1 frames, C = 1 or 2 channels, H, W >= 1",
                               path=path, field="frames")
    frames = dset[()]
    if frames.dtype.kind == "f":
        bad = ~np.isfinite(frames).reshape(n_frames, -1).all(axis=1)
        if bad.any():
            raise DecodeAccelError(f"NaN or inf in {int(bad.sum())} frame(s), first at frame {int(np.argmax(bad))}",
                                   path=path, field="frames", fix="re-simulate or drop those frames")

    bg = f["bg"][()] if isinstance(f["bg"], h5py.Dataset) else None
    if bg is None or bg.shape not in ((n_frames, c), (n_frames, c, h, w)):
        raise DecodeAccelError(f"shape {getattr(bg, 'shape', None)}, expected ({n_frames}, {c}) or "
                               f"({n_frames}, {c}, {h}, {w})", path=path, field="bg")
    if bg.dtype.kind not in "fiu":
        raise DecodeAccelError(f"dtype {bg.dtype}, expected float32 photons/px", path=path, field="bg")
    bg = bg.astype(np.float32)
    if not np.all(np.isfinite(bg)) or (bg < 0).any():
        raise DecodeAccelError("negative, NaN or inf background", path=path, field="bg")

    grp = f["emitters"]
    if not isinstance(grp, h5py.Group):
        raise DecodeAccelError("is not a group of columns", path=path, field="emitters")
    columns: dict[str, np.ndarray] = {}
    for col in grp:
        d = grp[col]
        if not isinstance(d, h5py.Dataset) or d.ndim != 1 or d.dtype.kind not in "fiu":
            raise DecodeAccelError(f"expected a 1-D numeric column, got {getattr(d, 'shape', None)} "
                                   f"{getattr(d, 'dtype', None)}", path=path, field=f"emitters/{col}")
        columns[col] = d[()]
    lengths = {len(v) for v in columns.values()}
    n_rows = lengths.pop() if len(lengths) == 1 else (0 if not lengths else None)
    if n_rows is None:
        detail = ", ".join(f"{k}={len(v)}" for k, v in columns.items())
        raise DecodeAccelError(f"emitter columns have different lengths ({detail})", path=path, field="emitters")
    for col in _REQUIRED_EMITTER_COLUMNS:
        if col not in columns:
            if n_rows == 0:
                columns[col] = np.zeros(0)
            else:
                raise DecodeAccelError("missing emitter column", path=path, field=f"emitters/{col}")
    table = pd.DataFrame({k: columns[k].astype(EMITTER_COLUMNS.get(k, columns[k].dtype)) for k in columns})
    ordered = [k for k in EMITTER_COLUMNS if k in table.columns] + [k for k in table.columns if k not in EMITTER_COLUMNS]
    table = table[ordered]
    if n_rows:
        fr = table["frame"].to_numpy()
        if fr.min() < 0 or fr.max() >= n_frames:
            raise DecodeAccelError(f"frame index outside [0, {n_frames - 1}] (min {fr.min()}, max {fr.max()})",
                                   path=path, field="emitters/frame")
        for col in ("x", "y", "z", "photons"):
            if not np.all(np.isfinite(table[col].to_numpy())):
                raise DecodeAccelError("NaN or inf values", path=path, field=f"emitters/{col}")
    return MovieFile(path=path, frames=frames, bg=bg, emitters=table, px_size=float(px_size), camera=camera, psf=psf,
                     simulation_config=sim_cfg, format_version=int(version))


def camera_to_photons(camera: dict[str, Any] | Any, adu: torch.Tensor, *, path: str | os.PathLike | None = None
                      ) -> torch.Tensor:
    """Convert ADU (..., H, W) to photons with a file's camera model (a dict of CameraConfig fields, or a CameraConfig).

    Uses the simulator's own :class:`~decode_accel.simulation.Camera` so training and inference share one inverse:
    EMCCD ((adu - baseline) · e_per_adu / em_gain - spurious charge) / qe (DESIGN.md).
    """
    try:
        cam_cfg = camera if isinstance(camera, CameraConfig) else CameraConfig.model_validate(camera)
    except Exception as err:  # pydantic ValidationError: report the first problem on one line
        lines = str(err).splitlines()
        raise DecodeAccelError(f"invalid camera model ({'; '.join(lines[1:3])})", path=path, field="camera") from None
    return Camera(cam_cfg, tuple(adu.shape[-2:])).to_photons(adu)


# ----------------------------------------------------------------------------------------------------------------
# export and simulation to file


def export_tiff_and_csv(source: str | os.PathLike | MovieFile, tiff_path: str | os.PathLike,
                        csv_path: str | os.PathLike) -> tuple[Path, Path]:
    """Export a movie as a uint16 ADU TIFF stack and its ground truth as a ThunderSTORM CSV.

    The TIFF is an ImageJ hyperstack (axes TYX, or TCYX for two channels) of camera counts clipped to
    [0, 65535]; the CSV has the DESIGN.md columns, frame 1-based, x/y/z in nm, "offset [photon]" = the
    background (photons/px) of the emitter's frame at its pixel. The CSV is written by
    ``decode_accel.io.write_thunderstorm_csv``.

    Args:
        source: a decode_accel HDF5 file or a :class:`MovieFile` from :func:`read_hdf5`.
        tiff_path: destination of the movie (.tif).
        csv_path: destination of the ground truth (.csv).
    """
    movie = source if isinstance(source, MovieFile) else read_hdf5(source)
    tiff_path, csv_path = Path(tiff_path), Path(csv_path)
    frames = movie.frames
    if frames.dtype != np.uint16:
        frames = np.clip(np.round(frames), 0, 65535).astype(np.uint16)
    data, axes = (frames[:, 0], "TYX") if movie.n_channels == 1 else (frames, "TCYX")
    with atomic_path(tiff_path) as tmp:
        tifffile.imwrite(tmp, data, imagej=True, metadata={"axes": axes, "unit": "nm", "spacing": 1.0},
                         resolution=(1.0 / movie.px_size, 1.0 / movie.px_size))

    table = movie.emitters.copy()
    if len(table):
        h, w = movie.frame_shape
        fr = table["frame"].to_numpy().astype(np.int64)
        if movie.bg.ndim == 2:
            table["bg"] = movie.bg[fr].sum(axis=1)
        else:  # background at the emitter's pixel, summed over channels like the photons
            col = np.clip((table["x"].to_numpy() / movie.px_size).astype(np.int64), 0, w - 1)
            row = np.clip((table["y"].to_numpy() / movie.px_size).astype(np.int64), 0, h - 1)
            table["bg"] = movie.bg[fr, :, row, col].sum(axis=1)
    else:
        table["bg"] = pd.Series(dtype="float64")
    if movie.n_channels == 1:  # per-channel columns mean nothing for one channel
        table = table.drop(columns=[k for k in ("ratio", "photons_ch1", "photons_ch2", "color") if k in table.columns])
    write_thunderstorm_csv(table, csv_path)
    return tiff_path, csv_path


def simulate_to_file(config: Any, n_frames: int, out_path: str | os.PathLike, seed: int | None = None) -> Path:
    """Simulate ``n_frames`` frames and write them with their ground truth to an HDF5 file (atomic).

    This is what ``decode-accel simulate --config X.yaml --out data/train.h5`` runs.

    Args:
        config: a :class:`~decode_accel.simulation.config.SimulationConfig` or a dict of its fields.
        n_frames: number of consecutive frames (blinking is correlated across them).
        out_path: destination ``.h5``.
        seed: seed of the torch.Generator; None uses ``config.seed``.
    """
    if isinstance(config, dict):
        config = SimulationConfig.model_validate(config)
    if int(n_frames) < 1:
        raise DecodeAccelError(f"n_frames {n_frames} < 1", field="n_frames", fix="simulate at least one frame")
    seed = int(config.seed if seed is None else seed)
    movie = Simulator(config).sample(int(n_frames), torch.Generator().manual_seed(seed))
    return write_hdf5(out_path, movie, config)
