"""Localize a whole movie: ADU -> photons -> 3-frame windows -> network -> maps -> table (nm).

:func:`predict` streams over the movie batch by batch, so memory does not grow with the movie:

* frames are read lazily (:mod:`decode_accel.inference.movie`) and converted from ADU to photons
  with the model's camera (overridable);
* frame t is analysed in the window (t-1, t, t+1); at the first and last frame of the *movie* the
  missing neighbour is the frame itself (edge replication). A ``frames`` range or a split over
  processes uses the true neighbours, so results never depend on how the movie was cut up;
* with feature caching, each frame's stage-1 features are computed once
  (``model.encode_frames``) and reused by the three windows containing it (``model.decode_windows``),
  carried from batch to batch in a two-frame ring buffer;
* frames of any size are tiled (:mod:`decode_accel.inference.tiling`), identical to untiled inference;
* each batch is post-processed into table rows (``PostProcessor``);
* with an output path, the table is written in chunks of frames (part files + ``progress.json`` in
  ``<out>.parts/``), so ``resume=True`` continues a stopped run without losing or repeating rows;
  the final files (ThunderSTORM CSV and/or Picasso HDF5 + YAML) are written atomically;
* with an Accelerator, chunks are split between processes and the tables merged in frame order.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
import yaml

from decode_accel.errors import DecodeAccelError
from decode_accel.export import load_exported
from decode_accel.inference.movie import Movie, open_movie, parse_frames
from decode_accel.inference.postprocess import PostProcessor
from decode_accel.inference.tiling import (Stitcher, pad_to_canvas, plan_tiles, receptive_field_radius,
                                           size_multiple)
from decode_accel.io import to_json_data, write_json, write_table
from decode_accel.io._atomic import atomic_path
from decode_accel.models.variance import movie_variance, with_variance
from decode_accel.simulation.camera import Camera
from decode_accel.simulation.config import CameraConfig
from decode_accel.table import empty_table

__all__ = ["predict", "resolve_model"]

logger = logging.getLogger(__name__)

#: frames per resumable chunk (one part file each) when not given.
DEFAULT_CHUNK_FRAMES = 1000
#: default tile edge (px): larger frames are tiled.
DEFAULT_TILE_SIZE = 512


# ------------------------------------------------------------------------------------ model
class _Resolved:
    """The pieces predict needs, whichever form the model came in."""

    def __init__(self, net, px_size_nm, camera, n_channels, dye_table, name, threshold=None, calibration=None,
                 subpixel_equalisation=None, z_calibration=None, ratio_sigma_scale=None):
        self.net, self.px_size_nm, self.camera = net, px_size_nm, camera
        self.n_channels, self.dye_table, self.name = n_channels, dye_table, name
        #: the export's operating threshold (None: the post-processor's default)
        self.threshold = threshold
        #: the export's probability calibration (dict form; None: report the network's p)
        self.calibration = calibration
        #: the export's sub-pixel equalisation (dict form; None: positions as the network reports them)
        self.subpixel_equalisation = subpixel_equalisation
        #: the export's z calibration (dict form; None: z as the network reports it)
        self.z_calibration = z_calibration
        #: the export's factor on the ratio sigma (None: the network's)
        self.ratio_sigma_scale = ratio_sigma_scale


def resolve_model(model: Any, *, px_size_nm: float | None = None, camera: Any = None,
                  frame_shape: tuple[int, int] | None = None) -> _Resolved:
    """Accept an export folder / Hub id (str or Path), an ``ExportedModel`` or a bare ``nn.Module``.

    A bare module needs ``px_size_nm`` (nm) and ``camera`` from the caller; an export carries both.
    """
    name = "model"
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        model = load_exported(model)
    if isinstance(model, torch.nn.Module):
        net = model
        n_channels = getattr(net, "in_channels", None)
        dye_table, own_camera, own_px = None, None, None
    else:
        net = getattr(model, "model", None)
        if not isinstance(net, torch.nn.Module):
            raise DecodeAccelError(f"expected an export folder, an ExportedModel or a torch module, got "
                                   f"{type(model).__name__}", field="model")
        n_channels = getattr(model, "n_channels", None) or getattr(net, "in_channels", None)
        dye_table = getattr(model, "dye_table", None)
        own_camera = getattr(model, "camera", None)
        own_px = getattr(model, "px_size_nm", None)
    px = px_size_nm if px_size_nm is not None else own_px
    if px is None or not px > 0:
        raise DecodeAccelError("the model's pixel size is unknown", field="px_size_nm",
                               fix="pass px_size_nm=... (nm) or use an export folder, which stores it")
    cam = _load_camera(camera, frame_shape) if camera is not None else own_camera
    if cam is None:
        raise DecodeAccelError("no camera to convert ADU to photons", field="camera",
                               fix="pass camera=... (or --camera camera.yaml) or use an export folder, which stores it")
    threshold = None if isinstance(model, torch.nn.Module) else getattr(model, "threshold", None)
    point = None if isinstance(model, torch.nn.Module) else (getattr(model, "operating_point", None) or {})
    calibration = point.get("probability_calibration") if point else None
    subpixel = point.get("subpixel_equalisation") if point else None
    z_calibration = point.get("z_calibration") if point else None
    ratio_sigma_scale = point.get("ratio_sigma_scale") if point else None
    return _Resolved(net, float(px), cam, int(n_channels or 1), dye_table, name, threshold, calibration, subpixel,
                     z_calibration, ratio_sigma_scale)


def _load_camera(camera: Any, frame_shape: tuple[int, int] | None = None):
    """A camera object (with ``to_photons``) from an object, a CameraConfig, a dict or a YAML file.

    ``frame_shape`` (H, W) is needed by sCMOS per-pixel maps only.
    """
    if hasattr(camera, "to_photons"):
        return camera
    if isinstance(camera, (str, os.PathLike)):
        path = Path(camera)
        if not path.exists():
            raise DecodeAccelError("camera file not found", path=path, field="--camera")
        try:
            camera = yaml.safe_load(path.read_text())
        except Exception as exc:
            raise DecodeAccelError(f"not valid YAML ({type(exc).__name__})", path=path, field="--camera") from None
        if isinstance(camera, dict) and isinstance(camera.get("camera"), dict):
            camera = camera["camera"]
    if isinstance(camera, dict):
        try:
            camera = CameraConfig(**camera)
        except Exception as exc:
            raise DecodeAccelError(" ".join(str(exc).split()), field="camera",
                                   fix="see CameraConfig for the fields") from None
    if isinstance(camera, CameraConfig):
        return Camera(camera, frame_shape=frame_shape)
    raise DecodeAccelError(f"cannot use {type(camera).__name__} as a camera", field="camera")


def _to_photons(camera, adu: torch.Tensor) -> torch.Tensor:
    out = camera.to_photons(adu)
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(np.asarray(out), dtype=torch.float32, device=adu.device)
    return out.float()


def _camera_signature(camera, movie: Movie):
    """What the camera does, not where it lives in memory: its config, else its response to a probe."""
    cfg = getattr(camera, "cfg", None)
    if hasattr(cfg, "model_dump"):
        return cfg.model_dump(mode="json")
    probe = torch.linspace(0, 2000, movie.height * movie.width).reshape(1, 1, movie.height, movie.width)
    probe = probe.expand(1, movie.n_channels, movie.height, movie.width).contiguous()
    return hashlib.sha256(_to_photons(camera, probe).numpy().tobytes()).hexdigest()[:16]


def _model_fingerprint(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------ post-processing
def _make_postprocessor(resolved: _Resolved, threshold: float | None, postprocessor=None):
    if postprocessor is not None:
        return postprocessor
    kwargs = dict(px_size_nm=resolved.px_size_nm, dye_table=resolved.dye_table, calibration=resolved.calibration,
                  subpixel_equalisation=resolved.subpixel_equalisation, z_calibration=resolved.z_calibration,
                  ratio_sigma_scale=resolved.ratio_sigma_scale)
    if threshold is None:
        threshold = resolved.threshold  # the operating point the model was validated at
    if threshold is not None:
        kwargs["threshold"] = threshold
    return PostProcessor(**kwargs)


# ------------------------------------------------------------------------------ streaming core
class _FrameStream:
    """Turns frame batches of one movie into output maps, tiling and caching features."""

    def __init__(self, net, movie: Movie, camera, *, device, tile_size, cache_features, autocast_dtype,
                 channels_last=False):
        self.net, self.movie, self.camera, self.device = net, movie, camera, device
        self.autocast_dtype = autocast_dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.cache = cache_features and hasattr(net, "encode_frames") and hasattr(net, "decode_windows")
        if cache_features and not self.cache:
            warnings.warn("the model has no encode_frames/decode_windows: running without feature caching",
                          stacklevel=3)
        stride = size_multiple(net)
        h, w = movie.height, movie.width
        canvas = max(-(-h // stride), -(-w // stride)) * stride
        margin = 0
        if tile_size is not None and canvas > tile_size:
            margin = receptive_field_radius(net, movie.n_channels, stride=stride)
            if margin is None:
                warnings.warn("the model's receptive field covers the whole frame (global normalization?): "
                              "running untiled", stacklevel=3)
                tile_size, margin = None, 0
        self.plan = plan_tiles(h, w, tile_size=tile_size, margin=margin, stride=stride)
        # model.variance_input: the movie's region of the sCMOS variance map rides along as C more channels
        self.variance = movie_variance(net, camera, movie.n_channels, h, w, device)
        if self.variance is not None:
            self.variance = pad_to_canvas(self.variance, self.plan.canvas_h, self.plan.canvas_w)
        # Feature ring: per tile, a buffer of the last two frames' stage-1 features, allocated ONCE and
        # overwritten in place. (A fresh copy per batch is a small long-lived block allocated among
        # each batch's large temporaries; glibc's heap then fragments and peak memory grows with the
        # number of frames — issue 11.3.)
        self.ring_buf: dict[int, torch.Tensor] = {}  # tile -> (2, F, h, w) features
        self.ring: dict[int, tuple[int, int]] = {}  # tile -> (first frame, number of valid frames in ring_buf)
        self.encoded_frames = 0  # how many single-frame stage-1 passes ran (for tests/benchmarks)

    def reset(self):
        """Forget cached features (the next batch is not adjacent to the previous one)."""
        self.ring.clear()  # the buffers stay allocated and are reused

    def _photons(self, lo: int, hi: int) -> torch.Tensor:
        adu = torch.from_numpy(np.ascontiguousarray(self.movie.read(slice(lo, hi + 1)), dtype=np.float32))
        photons = pad_to_canvas(_to_photons(self.camera, adu.to(self.device)), self.plan.canvas_h, self.plan.canvas_w)
        if self.variance is not None:
            photons = with_variance(photons, self.variance)
        return photons.contiguous(memory_format=self.memory_format)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def maps(self, a: int, b: int) -> dict[str, torch.Tensor]:
        """Output maps ``(b - a, [C,] H, W)`` of frames ``[a, b)`` (windows with true neighbours)."""
        last = self.movie.n_frames - 1
        lo, hi = max(a - 1, 0), min(b, last)
        t = np.arange(a, b)
        prev, nxt = _index(np.maximum(t - 1, 0) - lo), _index(np.minimum(t + 1, last) - lo)
        cur = _index(t - lo)
        stitch = Stitcher(self.plan)
        if not self.cache:
            photons = self._photons(lo, hi)
            windows = torch.stack([photons[prev], photons[cur], photons[nxt]], dim=2)  # (n, C, 3, H, W)
            for tile in self.plan.tiles:
                with self._autocast():
                    out = self.net(windows[..., tile.y0:tile.y0 + tile.h, tile.x0:tile.x0 + tile.w])
                stitch.paste(tile, out)
            return stitch.result()
        photons, p_lo = None, None
        for k, tile in enumerate(self.plan.tiles):
            first, n_cached = self.ring.get(k, (None, 0))
            buf = self.ring_buf.get(k)
            if first is None or n_cached == 0 or first > lo or first + n_cached - 1 < lo:
                first, n_cached = lo, 0  # nothing usable cached: encode the whole range
            have_hi = first + n_cached - 1
            cached = buf[lo - first:n_cached] if n_cached else None  # features of frames lo..have_hi
            if have_hi < hi:
                if photons is None:
                    p_lo = have_hi + 1
                    photons = self._photons(p_lo, hi)
                crop = photons[have_hi + 1 - p_lo:, :, tile.y0:tile.y0 + tile.h, tile.x0:tile.x0 + tile.w]
                crop = crop.contiguous(memory_format=self.memory_format)
                with self._autocast():
                    new = self.net.encode_frames(crop)
                self.encoded_frames += len(crop) if k == 0 else 0
                feats = new if cached is None else torch.cat([cached, new], dim=0)
            else:
                feats = cached  # everything needed is cached (a view of the ring buffer)
            with self._autocast():
                out = self.net.decode_windows(feats[prev], feats[cur], feats[nxt])
            stitch.paste(tile, out)
            # the next batch starts at b: it needs frames b-1 and b, the last two of this range
            keep_from = max(b - 1, lo)
            keep = feats[keep_from - lo:]
            if buf is None or buf.shape[1:] != keep.shape[1:] or buf.dtype != keep.dtype:
                buf = self.ring_buf[k] = torch.empty((2, *keep.shape[1:]), dtype=keep.dtype, device=keep.device)
            if keep.data_ptr() != buf.data_ptr() or len(keep) != n_cached:
                if feats is cached:
                    keep = keep.clone()  # overlapping copy within the buffer
                buf[:len(keep)].copy_(keep)
            self.ring[k] = (keep_from, len(keep))
        return stitch.result()


def _index(rows: np.ndarray):
    """Rows of a batch as a slice when they are consecutive (a view, no copy: every window but those at the
    movie's first and last frame), else as an index array (a gathered copy)."""
    if len(rows) and int(rows[-1]) - int(rows[0]) == len(rows) - 1 and bool(np.all(np.diff(rows) == 1)):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))


#: pixels (frames x height x width) to process between two returns of freed heap memory to the system.
TRIM_EVERY_PX = 2 ** 21


def _glibc_function(name: str, argtypes: list, restype):
    """A function of the C library this process runs on, if it is glibc on Linux (None elsewhere:
    macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def _load_malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere)."""
    return _glibc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)


_MALLOC_TRIM = _load_malloc_trim()


def _reuse_large_blocks() -> bool:
    """Let glibc serve large blocks from its heap (no mmap/munmap + page faults per batch tensor).

    By default every block above a dynamic threshold (at most 32 MiB) is a fresh ``mmap``: each batch
    then faults in its activations page by page (about 13 of 56 CPU-seconds were system time on 2000
    frames of 64 x 64, issue 15.1). With a high threshold the freed blocks are reused; the periodic
    :func:`_release_freed_memory` still bounds the memory. Process-wide, so only the CLI (a process of
    its own) calls it. Returns whether glibc accepted it.
    """
    mallopt = _glibc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    big = 1 << 30
    return bool(mallopt(m_mmap_threshold, big)) and bool(mallopt(m_trim_threshold, big))


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Why: each batch allocates and frees tens of large CPU tensors whose sizes and lifetimes differ a
    little from batch to batch; glibc's allocator serves most of them from its heap (its mmap threshold
    rises to the largest block freed so far) and does not hand the freed holes back, so the resident
    memory of a long run crept up by about 0.1 MiB per 256 x 256 frame (+308 MiB over 3000 frames,
    issue 11.3). Trimming every few million pixels keeps it flat for a few milliseconds per call.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _release_after_part() -> None:
    """After a part file: hand back what the part writer (pyarrow's memory pool) and the chunk's freed rows
    hold. Without it a 1200-frame run of 256 x 256 (1000-frame chunks) sat about 50 MiB higher after its
    first part file and peaked 69 MiB above a 300-frame run; in one chunk it peaked 2 MiB below (issue 11.3)."""
    try:
        import pyarrow as pa  # pyarrow is the part writer's (pandas' parquet engine); no pyarrow, no pool to trim
        pa.default_memory_pool().release_unused()
    except Exception:  # noqa: BLE001 - an older pyarrow without release_unused: only the heap trim
        pass
    _release_freed_memory()


def _resolve_device(device, accelerator):
    if accelerator is not None:
        return accelerator.device
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _smaller_batch(failed: int, movie) -> int:
    """The batch after ``failed`` frames ran out of accelerator memory: half of it (one frame that does not fit
    is a one-line error); the rest of the movie keeps the smaller batch."""
    if failed <= 1:
        raise DecodeAccelError(f"one {movie.height}x{movie.width} px frame does not fit in the accelerator's memory",
                               field="tile_size", fix="give a smaller --tile-size (e.g. 256), or predict on the CPU")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the failed batch's blocks back before the retry
    logger.warning("out of accelerator memory with %d frames per batch: going on with %d", failed, failed // 2)
    return failed // 2


def _auto_batch_size(plan, device) -> int:
    tile_px = max(t.h * t.w for t in plan.tiles)
    # CPU: 2**19 px (128 frames of 64 x 64): oneDNN's convolutions with few channels need large batches
    # (64 -> 128 frames: about 15 % less CPU time); activations stay within a few hundred MB
    budget = 2 ** 22 if torch.device(device).type == "cuda" else 2 ** 19
    return int(np.clip(budget // tile_px, 1, 256))


# ------------------------------------------------------------------------------ files
def _write_outputs(df: pd.DataFrame, outs: list[Path], *, px_size_nm, width, height, n_frames) -> None:
    """Write the final table(s) via decode_accel.io (atomic: temporary file + rename)."""
    for o in outs:
        o.parent.mkdir(parents=True, exist_ok=True)
        write_table(df, o, px_size_nm=px_size_nm, width=width, height=height, n_frames=n_frames)


def _write_part(df: pd.DataFrame, path: Path) -> None:
    """One chunk's rows as a parquet part file, written atomically (``io._atomic.atomic_path``)."""
    with atomic_path(path) as tmp:
        df.reset_index(drop=True).to_parquet(tmp, index=False)


def _movie_signature(movie: Movie) -> list:
    sig = []
    for p in movie.paths:
        p = Path(p)
        if p.exists():
            st = p.stat()
            sig.append([str(p.resolve()), st.st_size, int(st.st_mtime)])
        else:
            sig.append([str(p), list(movie.shape)])
    return sig


def _merge(tables: list[pd.DataFrame]) -> pd.DataFrame:
    tables = [t for t in tables if t is not None]
    if not tables:
        return empty_table()
    non_empty = [t for t in tables if len(t)]
    df = pd.concat(non_empty or tables[:1], ignore_index=True)
    df = df.sort_values("frame", kind="stable").reset_index(drop=True)
    if "id" not in df.columns or df["id"].duplicated().any():
        # ids from per-batch post-processing restart in every batch: make them unique per row
        df["id"] = np.arange(len(df), dtype=np.int64)
    return df


# ------------------------------------------------------------------------------ predict
def predict(model, inputs, *, out: str | os.PathLike | Sequence[str | os.PathLike] | None = None, camera=None,
            batch_size: int | None = None, frames: str | slice | tuple | None = None,
            tile_size: int | None = DEFAULT_TILE_SIZE, threshold: float | None = None, resume: bool = False,
            cache_features: bool = True, progress: bool = True, device=None, accelerator=None,
            px_size_nm: float | None = None, check_px_size: bool = True, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
            mixed_precision: str | None = None, postprocessor=None, channels_last: bool | None = None,
            camera_roi: tuple[int, int] | None = None, backend: str = "torch") -> pd.DataFrame:
    """Localize every emitter in a movie and return (and optionally write) the table.

    Args:
        model: export folder or Hub id, an ``ExportedModel`` (:func:`decode_accel.hub.load_exported`)
            or a bare network (then give ``px_size_nm`` and ``camera``).
        inputs: a TIFF / OME-TIFF path, one path per channel, a :class:`Movie`, or an array
            ``(T, [C,] H, W)`` in camera ADU.
        out: output path(s): ``.csv`` (ThunderSTORM, nm, 1-based frames) and/or ``.hdf5``/``.h5``
            (Picasso, px, with the ``.yaml`` sidecar). None: only return the table.
        camera: overrides the model's camera (object with ``to_photons``, CameraConfig, dict or YAML path).
        batch_size: frames per network call (default: from the tile size and the device).
        frames: ``"A:B"`` / ``slice`` / ``(A, B)``: the 0-based frame range to localize (B exclusive).
        tile_size: tile edge (px); larger frames are tiled with exact stitching. None: never tile.
        threshold: detection threshold of the post-processing (default: the export's operating point,
            the threshold the model was validated at; else the post-processor's 0.3).
        resume: continue a stopped run from the part files next to ``out``.
        cache_features: compute each frame's stage-1 features once (about 40 % less compute).
        progress: show a tqdm progress bar (main process only).
        device: torch device (default: the accelerator's, else CUDA if available, else CPU).
        accelerator: an ``accelerate.Accelerator``: chunks are split between its processes.
        px_size_nm: pixel size (nm) for a bare network; an export's own value otherwise.
        check_px_size: compare the pixel size in the movie's metadata with the model's.
        chunk_frames: frames per resumable part file.
        mixed_precision: 'no', 'bf16' or 'fp16'; default bf16 on CUDA, fp32 elsewhere.
        postprocessor: a callable ``(output, frame_offset=...) -> DataFrame`` replacing the default.
        camera_roi: (row, col) of the movie's top-left pixel on full-chip sCMOS maps (px); default the
            camera's ``roi_origin``, else the file's Micro-Manager ROI (see ``Camera.for_movie``).
        channels_last: run the network in channels-last memory format (default: on CPU, where oneDNN's
            convolutions with few channels are about 25 % cheaper that way; the model is restored after).
        backend: 'torch' (PyTorch, any device) or 'onnx': the network exported to ONNX and run by ONNX Runtime
            on the CPU (:mod:`decode_accel.inference.onnx_backend`; needs ``onnxruntime``), the same maps
            within float32 rounding.

    Returns:
        The localization table (docs/architecture.md): frame (0-based), x, y, z (nm), photons, ...,
        sorted by frame; on every process when run with an accelerator.
    """
    movie = open_movie(inputs)
    resolved = resolve_model(model, px_size_nm=px_size_nm, camera=camera, frame_shape=(movie.height, movie.width))
    if hasattr(resolved.camera, "for_movie"):  # the movie's region of per-pixel sCMOS maps (simulation/camera.py)
        resolved.camera = resolved.camera.for_movie(movie.height, movie.width, camera_roi,
                                                    path=(getattr(movie, "paths", None) or [None])[0])
    net = resolved.net
    movie.check(n_channels=resolved.n_channels, px_size_nm=resolved.px_size_nm if check_px_size else None)
    sel = parse_frames(frames, movie.n_frames)
    if chunk_frames < 1:
        raise DecodeAccelError(f"must be >= 1, got {chunk_frames}", field="chunk_frames")
    outs = [] if out is None else [Path(out)] if isinstance(out, (str, os.PathLike)) else [Path(o) for o in out]
    for o in outs:
        if o.suffix.lower() not in (".csv", ".hdf5", ".h5"):
            raise DecodeAccelError(f"unknown output format {o.suffix!r}", path=o, field="--out",
                                   fix="use .csv (ThunderSTORM) or .hdf5 (Picasso)")
    if resume and not outs:
        raise DecodeAccelError("resume needs an output path to keep progress next to", field="resume",
                               fix="pass out=... (--out)")

    device = _resolve_device(device, accelerator)
    if mixed_precision is None:
        mixed_precision = (accelerator.mixed_precision if accelerator is not None
                           else "bf16" if device.type == "cuda" else "no")
    autocast_dtype = {"no": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, "?")
    if autocast_dtype == "?":
        raise DecodeAccelError(f"unknown precision {mixed_precision!r}", field="mixed_precision",
                               fix="use 'no', 'bf16' or 'fp16'")
    was_training = net.training
    if backend not in ("torch", "onnx"):
        raise DecodeAccelError(f"unknown backend {backend!r}", field="backend", fix="use 'torch' or 'onnx'")
    if backend == "onnx" and device.type != "cpu":
        raise DecodeAccelError(f"the ONNX backend runs on the CPU, not {device}", field="backend",
                               fix="pass device='cpu' (--device cpu) or use backend='torch'")
    net.eval().to(device)
    if channels_last is None:
        channels_last = device.type == "cpu" and cache_features and backend == "torch"
    if channels_last:
        net.to(memory_format=torch.channels_last)
    post = _make_postprocessor(resolved, threshold, postprocessor)
    if backend == "onnx":
        from decode_accel.inference.onnx_backend import OnnxNet  # only with --backend onnx: onnx export machinery is heavy
        runner, channels_last = OnnxNet(net), False
    else:
        runner = net
    stream = _FrameStream(runner, movie, resolved.camera, device=device, tile_size=tile_size,
                          cache_features=cache_features, autocast_dtype=autocast_dtype, channels_last=channels_last)
    batch = int(batch_size) if batch_size else _auto_batch_size(stream.plan, device)
    if batch < 1:
        raise DecodeAccelError(f"must be >= 1, got {batch_size}", field="batch_size")

    # Chunks of the selected range: the unit of resumption and of the split between processes.
    starts = list(range(sel.start, sel.stop, chunk_frames))
    chunks = [(s, min(s + chunk_frames, sel.stop)) for s in starts]
    is_main = accelerator.is_main_process if accelerator is not None else True

    parts_dir = None
    done: set[int] = set()
    if outs:
        parts_dir = outs[0].parent / f"{outs[0].name}.parts"
        settings = dict(movie=_movie_signature(movie), frames=[sel.start, sel.stop], chunk_frames=chunk_frames,
                        model=_model_fingerprint(net), threshold=getattr(post, "threshold", threshold),
                        calibration=resolved.calibration, subpixel_equalisation=resolved.subpixel_equalisation,
                        z_calibration=resolved.z_calibration, ratio_sigma_scale=resolved.ratio_sigma_scale,
                        px_size_nm=resolved.px_size_nm,
                        camera=_camera_signature(resolved.camera, movie))
        record = parts_dir / "progress.json"
        if is_main:
            if resume and record.exists():
                old = json.loads(record.read_text())
                if old.get("settings") != to_json_data(settings):  # the record holds them as write_json wrote them
                    raise DecodeAccelError("the saved progress was made with other settings (movie, frames, model, "
                                           "threshold or camera)", path=record, field="--resume",
                                           fix="rerun with the same settings, or without --resume to start over")
            elif parts_dir.exists():
                shutil.rmtree(parts_dir)
            parts_dir.mkdir(parents=True, exist_ok=True)
            if not record.exists():
                write_json(dict(settings=settings, chunks=chunks, done=[]), record, indent=1)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if resume:
            done = {i for i in range(len(chunks)) if (parts_dir / f"part-{i:06d}.parquet").exists()}

    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(list(range(len(chunks)))) as mine:
            my_chunks = list(mine)
    else:
        my_chunks = list(range(len(chunks)))
    todo = [i for i in my_chunks if i not in done]

    bar = tqdm(total=sum(chunks[i][1] - chunks[i][0] for i in todo), unit="frame",
               disable=not (progress and is_main), desc="predict")
    local_tables: list[pd.DataFrame] = []
    previous_end = None
    frame_px = movie.height * movie.width * movie.n_channels
    px_since_trim = 0
    try:
        for i in todo:
            c0, c1 = chunks[i]
            if previous_end != c0:
                stream.reset()
            rows = []
            a = c0
            while a < c1:
                b = min(a + batch, c1)
                try:
                    maps = stream.maps(a, b)
                except torch.OutOfMemoryError:  # the accelerator's memory: the same frames again in smaller batches
                    batch = _smaller_batch(b - a, movie)
                    stream.reset()  # the feature cache may hold a half-written batch
                    continue
                rows.append(post(maps, frame_offset=a))
                del maps
                bar.update(b - a)
                px_since_trim += (b - a) * frame_px
                if px_since_trim >= TRIM_EVERY_PX:
                    _release_freed_memory()
                    px_since_trim = 0
                a = b
            previous_end = c1
            table = _merge_rows(rows)
            if parts_dir is not None:
                _write_part(table, parts_dir / f"part-{i:06d}.parquet")
                del table
                _release_after_part()
                if is_main:
                    rec = json.loads((parts_dir / "progress.json").read_text())
                    rec["done"] = sorted(set(rec["done"]) | {i})
                    write_json(rec, parts_dir / "progress.json", indent=1)
            else:
                local_tables.append(table)
    finally:
        bar.close()
        if channels_last:
            net.to(memory_format=torch.contiguous_format)
        if was_training:
            net.train()

    if parts_dir is None:
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object  # heavy: accelerate, only when several processes predict
            local_tables = gather_object(local_tables)
        return _with_attrs(_merge(local_tables), resolved, movie)

    if accelerator is not None:
        accelerator.wait_for_everyone()
    df = _merge([pd.read_parquet(parts_dir / f"part-{i:06d}.parquet") for i in range(len(chunks))])
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if is_main:
        _write_outputs(df, outs, px_size_nm=resolved.px_size_nm, width=movie.width, height=movie.height,
                       n_frames=movie.n_frames)
        shutil.rmtree(parts_dir, ignore_errors=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return _with_attrs(df, resolved, movie)


def _with_attrs(df: pd.DataFrame, resolved: _Resolved, movie: Movie) -> pd.DataFrame:
    """Record the camera geometry on the table (pandas ``attrs``) for rendering and writing."""
    df.attrs.update(px_size_nm=resolved.px_size_nm, width=movie.width, height=movie.height,
                    n_frames=movie.n_frames)
    return df


def _merge_rows(rows: list[pd.DataFrame]) -> pd.DataFrame:
    rows = [r for r in rows if r is not None]
    non_empty = [r for r in rows if len(r)]
    if non_empty:
        return pd.concat(non_empty, ignore_index=True)
    return rows[0].iloc[:0].copy() if rows else pd.DataFrame()
