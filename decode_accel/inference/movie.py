"""Camera movies (TIFF / OME-TIFF / Micro-Manager stacks) opened lazily, never loaded whole.

A :class:`Movie` presents one or two files as a stack of shape ``(T, C, H, W)`` in camera ADU.
Frames are read on demand, either through a numpy memory map (uncompressed, contiguous files,
the common case for camera output) or page by page through ``tifffile`` (compressed files,
multi-file OME series such as Micro-Manager's ``*_MMStack_Pos0.ome.tif`` + ``_1.ome.tif`` ...).
Reading frames ``a:b`` touches only those frames' bytes, so a 50 GB stack costs no more RAM than
the batch being processed.

Two-channel input comes either as two files (one per channel, same T, H, W) or as one file whose
series has a channel axis ``C`` (ImageJ hyperstack, OME-TIFF).
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile

from decode_accel.errors import DecodeAccelError

__all__ = ["Movie", "ArrayMovie", "open_movie", "parse_frames", "COUNT_DTYPES", "check_count_dtype", "check_counts"]

#: TIFF pixel types that can hold camera counts (ADU): what cameras and acquisition software write.
#: Signed 16/32-bit files are read too, but a frame with a negative pixel is refused when it is read.
#: Floating-point files (photon images, background-subtracted or drift-corrected stacks), 8-bit signed
#: and 64-bit files are refused when the file is opened: decode_accel converts ADU to photons itself.
COUNT_DTYPES = tuple(np.dtype(t) for t in ("uint8", "uint16", "uint32", "int16", "int32"))
_COUNT_FIX = ("export the raw camera stack as an unsigned 16-bit (uint16) TIFF; if the values are ADU, convert them "
              "with numpy: frames.round().clip(0, 65535).astype('uint16')")

# Axes tifffile may use for the frame (time-like) dimension; everything that is not Y, X or C
# (T, Z, Q, I, P, ...) is flattened into the frame index in file order.
_PIXEL_AXES = ("Y", "X")
_NM_PER_UNIT = {"nm": 1.0, "nanometer": 1.0, "um": 1e3, "µm": 1e3, "\\u00B5m": 1e3, "micron": 1e3,
                "microns": 1e3, "micrometer": 1e3, "mm": 1e6, "cm": 1e7, "m": 1e9}


def check_count_dtype(dtype, path) -> None:
    """Refuse a file whose pixel type cannot hold camera counts (see :data:`COUNT_DTYPES`)."""
    dtype = np.dtype(dtype)
    if dtype in COUNT_DTYPES:
        return
    if dtype.kind == "f":
        what = (f"{dtype.name} (floating-point) pixels are not camera counts; decode_accel reads the camera's ADU "
                "and converts them to photons itself")
    elif dtype == np.int8:
        what = "int8 (8-bit signed) pixels cannot hold camera counts"
    else:
        what = f"{dtype.name} pixels are not a camera-count type (uint8, uint16, uint32, int16, int32)"
    raise DecodeAccelError(what, path=path, field="pixel type", fix=_COUNT_FIX)


def _frame_list(frames: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(f)) for f in frames[:limit])
    return shown + (f" and {len(frames) - limit} more" if len(frames) > limit else "")


def check_counts(data: np.ndarray, frames: np.ndarray, path) -> None:
    """Refuse frames that cannot be camera counts: NaN or infinite pixels (float data) or negative pixels
    (signed integers). ``data`` is (n, C, H, W) as read, ``frames`` the n 0-based frame indices."""
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data).all(axis=(1, 2, 3))
        if bad.any():
            raise DecodeAccelError(
                f"frame(s) {_frame_list(frames[bad])} (0-based) hold NaN or infinite pixels", path=path,
                field="pixel values", fix="replace them in the source data, e.g. numpy.nan_to_num with the camera "
                                          "baseline, or choose a --frames range at least one frame away from them")
    elif data.dtype.kind == "i":
        low = data.min(axis=(1, 2, 3))
        bad = low < 0
        if bad.any():
            raise DecodeAccelError(
                f"frame(s) {_frame_list(frames[bad])} (0-based) hold negative pixels (down to {int(low.min())}); camera "
                "counts (ADU) are never negative", path=path, field="pixel values",
                fix="give the raw camera stack, not a background- or offset-subtracted one, or choose a --frames "
                    "range at least one frame away from them")


def parse_frames(spec: str | slice | tuple | None, n_frames: int | None = None,
                 *, field: str = "--frames") -> slice:
    """Parse a frame range ``"A:B"`` (0-based, B exclusive; either side may be empty) into a slice.

    Also accepts a ``slice``, a ``(start, stop)`` tuple or ``None`` (all frames). With ``n_frames``
    the result is clipped to the movie and an empty range raises :class:`DecodeAccelError`.
    """
    if spec is None:
        sl = slice(None)
    elif isinstance(spec, slice):
        if spec.step not in (None, 1):
            raise DecodeAccelError("frame ranges take no step", field=field, fix="use A:B")
        sl = spec
    elif isinstance(spec, tuple) and len(spec) == 2:
        sl = slice(spec[0], spec[1])
    elif isinstance(spec, str):
        m = re.fullmatch(r"\s*(-?\d*)\s*:\s*(-?\d*)\s*", spec)
        if m is None:
            raise DecodeAccelError(f"cannot read frame range {spec!r}", field=field,
                                   fix="write A:B with 0-based A and exclusive B, e.g. 0:1000 or 500:")
        a, b = m.groups()
        sl = slice(int(a) if a else None, int(b) if b else None)
    else:
        raise DecodeAccelError(f"cannot read frame range {spec!r}", field=field, fix="write A:B")
    if n_frames is not None:
        if n_frames == 0:
            raise DecodeAccelError("the movie has no frames", field="inputs",
                                   fix="give a movie with at least one frame; export it again if the recording was cut short")
        start, stop, _ = sl.indices(n_frames)
        if stop <= start:
            raise DecodeAccelError(f"frame range {spec!r} selects no frame of a {n_frames}-frame movie",
                                   field=field, fix=f"choose A:B with 0 <= A < B <= {n_frames}")
        sl = slice(start, stop)
    return sl


class _TiffSource:
    """One TIFF file (or multi-file OME series) seen as (T, c, H, W), read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise DecodeAccelError("file not found", path=self.path, fix="check the --input path")
        if self.path.is_dir():
            raise DecodeAccelError("is a folder, not a TIFF file", path=self.path,
                                   fix="give the movie file itself (for Micro-Manager the *_MMStack_Pos0.ome.tif)")
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            self._series = series
            page_shape = tuple(series.keyframe.shape)
            page_axes = series.keyframe.axes
        except DecodeAccelError:
            raise
        except Exception as exc:  # tifffile raises several types for non-TIFF / broken files
            raise DecodeAccelError(f"not a readable TIFF file ({type(exc).__name__}: {exc})".replace("\n", " "),
                                   path=self.path, fix="give a TIFF / OME-TIFF stack") from None
        if page_axes not in ("YX",) or len(page_shape) != 2:
            raise DecodeAccelError(f"each page must be one grey image (axes YX), found {page_axes} {page_shape}",
                                   path=self.path, field="page axes", fix="save the movie as a greyscale stack")
        axes = series.axes
        shape = tuple(series.shape)
        self._check_complete(shape)
        lead_axes, lead_shape = axes[:-2], shape[:-2]
        self.height, self.width = page_shape
        self.dtype = np.dtype(series.dtype)
        if 0 in shape:
            raise DecodeAccelError(f"holds no image data (series shape {shape})", path=self.path, field="frames",
                                   fix="give a movie with at least one frame; export it again if the recording was cut short")
        check_count_dtype(self.dtype, self.path)
        self._channel_pos = lead_axes.find("C") if "C" in lead_axes else None
        if self._channel_pos is not None and len(lead_axes) == 1:
            # A stack with a C axis and nothing else (tifffile's default for ImageJ stacks written
            # without axes) is a movie: its pages are frames.
            self._channel_pos = None
        self.n_channels = lead_shape[self._channel_pos] if self._channel_pos is not None else 1
        self._time_pos = [i for i, a in enumerate(lead_axes) if a != "C"]
        self._time_shape = tuple(lead_shape[i] for i in self._time_pos)
        self.n_frames = int(np.prod(self._time_shape)) if self._time_shape else 1
        self._lead_shape = lead_shape
        self._n_pages = int(np.prod(lead_shape)) if lead_shape else 1
        # Memory map when the file allows it (uncompressed, contiguous): zero-copy, OS-cached.
        self._mm = None
        self._opened: list = []
        try:
            mm = tifffile.memmap(self.path, series=0, mode="r")
            if tuple(mm.shape) == shape:
                self._mm = mm
        except Exception:  # compressed, tiled, non-contiguous or multi-file: read page by page
            self._mm = None
        self.px_size_nm = self._pixel_size_nm()

    def _check_complete(self, shape: tuple) -> None:
        """Refuse a file whose own metadata declares more images than it holds (a truncated copy):
        tifffile then falls back to the readable pages and only logs a warning."""
        tif, declared = self._tif, None
        try:
            if tif.is_shaped and tif.shaped_metadata:
                declared = int(np.prod(tif.shaped_metadata[0].get("shape", ()) or (0,)))
                declared //= max(1, int(np.prod(shape[-2:])))  # images = product of the leading axes
            elif tif.is_imagej and tif.imagej_metadata:
                declared = int(tif.imagej_metadata.get("images", 0)) or None
        except Exception:  # noqa: BLE001 - unusual metadata: nothing to compare with
            declared = None
        found = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        if declared and found < declared:
            raise DecodeAccelError(f"truncated or damaged: the metadata declares {declared} images but only {found} "
                                   "can be read", path=self.path, fix="copy the movie again from its source")

    @property
    def memory_mapped(self) -> bool:
        """True when frames are read through a numpy memory map (else page by page)."""
        return self._mm is not None

    def _pixel_size_nm(self) -> float | None:
        """Pixel size from OME-XML, ImageJ or Micro-Manager metadata, in nm (None if absent)."""
        tif = self._tif
        try:
            if tif.is_ome and tif.ome_metadata:
                root = ET.fromstring(tif.ome_metadata)
                for el in root.iter():
                    if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
                        unit = el.attrib.get("PhysicalSizeXUnit", "µm")
                        return float(el.attrib["PhysicalSizeX"]) * _NM_PER_UNIT.get(unit, 1e3)
            mm = tif.micromanager_metadata if tif.is_micromanager else None
            if mm:
                summary = mm.get("Summary", {}) if isinstance(mm, dict) else {}
                if summary.get("PixelSize_um"):
                    return float(summary["PixelSize_um"]) * 1e3
            if tif.is_imagej:
                meta = tif.imagej_metadata or {}
                unit = str(meta.get("unit", "")).strip()
                tag = tif.pages[0].tags.get("XResolution")
                if unit and unit.lower() in _NM_PER_UNIT and tag is not None:
                    num, den = tag.value
                    if num > 0:
                        return den / num * _NM_PER_UNIT[unit.lower()]
        except Exception:  # metadata is advisory: a broken block must not stop inference
            return None
        return None

    def read(self, frames: np.ndarray) -> np.ndarray:
        """Frames (sorted or not, in [0, n_frames)) as (len(frames), c, H, W), native dtype."""
        frames = np.asarray(frames, dtype=np.int64)
        time_idx = np.unravel_index(frames, self._time_shape) if self._time_shape else ()
        out = np.empty((len(frames), self.n_channels, self.height, self.width), dtype=self.dtype)
        for c in range(self.n_channels):
            lead = [None] * len(self._lead_shape)
            for pos, idx in zip(self._time_pos, time_idx):
                lead[pos] = idx
            if self._channel_pos is not None:
                lead[self._channel_pos] = np.full(len(frames), c, dtype=np.int64)
            if self._mm is not None:
                # Advanced indexing on a memmap reads only the selected frames.
                out[:, c] = self._mm[tuple(lead)] if lead else self._mm[None]
                continue
            pages = np.ravel_multi_index(tuple(lead), self._lead_shape) if lead else np.zeros(1, np.int64)
            for k, p in enumerate(pages):
                try:
                    page = self._series.pages[int(p)]
                    if page is None:
                        raise ValueError("page missing from the series")
                    fh = page.parent.filehandle
                    if fh.closed:  # a page in another file of a multi-file (Micro-Manager) series
                        fh.open()  # keep it open: reopening per page would cost a syscall each
                        self._opened.append(fh)
                    out[k, c] = page.asarray()
                except Exception as exc:
                    raise DecodeAccelError(
                        f"frame {int(frames[k])} (page {int(p)}) cannot be read "
                        f"({type(exc).__name__}: {exc})".replace("\n", " "),
                        path=self.path, fix="the file is truncated or corrupt; choose a --frames range before it "
                                            "or re-export the movie") from None
        check_counts(out, frames, self.path)
        return out

    def close(self):
        self._mm = None
        for fh in self._opened:
            fh.close()
        self._opened.clear()
        self._tif.close()


class Movie:
    """A camera movie of shape ``(T, C, H, W)`` in ADU, read lazily frame range by frame range.

    Build one with :func:`open_movie`. ``movie.read(slice(a, b))`` returns a numpy array
    ``(b - a, C, H, W)`` in the file's dtype (usually uint16 ADU). ``px_size_nm`` is the pixel
    size stored in the file's metadata (nm), or None.
    """

    def __init__(self, sources: Sequence[_TiffSource]):
        self._sources = list(sources)
        first = self._sources[0]
        for s in self._sources[1:]:
            if (s.n_frames, s.height, s.width) != (first.n_frames, first.height, first.width):
                raise DecodeAccelError(
                    f"channel files differ in size: {first.path.name} is {first.n_frames}x{first.height}x{first.width}"
                    f" (T x H x W), this one is {s.n_frames}x{s.height}x{s.width}",
                    path=s.path, field="shape", fix="give channel files recorded together")
        self.n_frames = first.n_frames
        self.n_channels = sum(s.n_channels for s in self._sources)
        self.height, self.width = first.height, first.width
        self.dtype = np.result_type(*[s.dtype for s in self._sources])
        sizes = {s.px_size_nm for s in self._sources if s.px_size_nm is not None}
        self.px_size_nm = min(sizes) if sizes else None
        self.paths = [s.path for s in self._sources]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(T, C, H, W): frames, channels, rows, columns."""
        return (self.n_frames, self.n_channels, self.height, self.width)

    @property
    def memory_mapped(self) -> bool:
        """True when every file is read through a memory map (else some page by page)."""
        return all(s.memory_mapped for s in self._sources)

    def __len__(self) -> int:
        return self.n_frames

    def read(self, frames: slice | int | Sequence[int] | np.ndarray) -> np.ndarray:
        """Read frames (a slice, an index or a list of indices) as ``(n, C, H, W)`` ADU."""
        if isinstance(frames, slice):
            idx = np.arange(*frames.indices(self.n_frames))
        else:
            idx = np.atleast_1d(np.asarray(frames, dtype=np.int64))
            if idx.size and (idx.min() < -self.n_frames or idx.max() >= self.n_frames):
                raise IndexError(f"frame index out of range for a {self.n_frames}-frame movie")
            idx = np.where(idx < 0, idx + self.n_frames, idx)
        parts = [s.read(idx) for s in self._sources]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return out.astype(self.dtype, copy=False)

    def __getitem__(self, frames):
        return self.read(frames)

    def check(self, *, n_channels: int | None = None, px_size_nm: float | None = None,
              rel_tol: float = 0.02) -> None:
        """Raise :class:`DecodeAccelError` if the movie does not fit a model.

        ``n_channels``: channels the model expects. ``px_size_nm``: the model's pixel size (nm),
        compared with the file's metadata when the file has one (relative tolerance ``rel_tol``).
        """
        if n_channels is not None and self.n_channels != n_channels:
            how = ("give one --input per channel or a file with a channel axis C"
                   if n_channels > self.n_channels else "give only the channel(s) the model was trained on")
            raise DecodeAccelError(f"movie has {self.n_channels} channel(s) but the model expects {n_channels}",
                                   path=self.paths[0], field="channels", fix=how)
        if px_size_nm is not None and self.px_size_nm is not None:
            if abs(self.px_size_nm - px_size_nm) > rel_tol * px_size_nm:
                raise DecodeAccelError(
                    f"pixel size in the file metadata is {self.px_size_nm:g} nm but the model was trained at "
                    f"{px_size_nm:g} nm", path=self.paths[0], field="pixel size",
                    fix="use a model trained for this camera pixel size, or pass check_px_size=False "
                        "(--ignore-px-size) if the metadata is wrong")

    def close(self):
        for s in self._sources:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"Movie(shape={self.shape}, dtype={self.dtype}, px_size_nm={self.px_size_nm}, "
                f"memory_mapped={self.memory_mapped}, paths={[str(p) for p in self.paths]})")


class ArrayMovie(Movie):
    """An in-memory stack ``(T, H, W)`` or ``(T, C, H, W)`` in ADU with the :class:`Movie` interface.

    For arrays a caller already holds (a ``numpy.memmap`` stays lazy); ``px_size_nm`` is optional.
    """

    def __init__(self, array, px_size_nm: float | None = None):
        arr = array if isinstance(array, np.ndarray) else np.asarray(array)
        if arr.ndim == 3:
            arr = arr[:, None]
        if arr.ndim != 4:
            raise DecodeAccelError(f"expected frames shaped (T, H, W) or (T, C, H, W), got {arr.shape}",
                                   field="inputs", fix="stack the frames along the first axis")
        self._array = arr
        self.n_frames, self.n_channels, self.height, self.width = arr.shape
        self.dtype = arr.dtype
        self.px_size_nm = px_size_nm
        self.paths = ["<array>"]
        self._sources = []

    @property
    def memory_mapped(self) -> bool:
        return isinstance(self._array, np.memmap)

    def read(self, frames) -> np.ndarray:
        if isinstance(frames, slice):
            idx = np.arange(*frames.indices(self.n_frames))
            out = np.asarray(self._array[frames])
        else:
            idx = np.atleast_1d(np.asarray(frames, dtype=np.int64))
            out = np.asarray(self._array[idx])
        check_counts(out, np.where(idx < 0, idx + self.n_frames, idx), None)
        return out

    def close(self):
        pass


def open_movie(inputs: str | os.PathLike | Sequence[str | os.PathLike] | Movie) -> Movie:
    """Open one movie file, or one file per channel, lazily as a :class:`Movie` ``(T, C, H, W)``.

    ``inputs``: a path (TIFF, OME-TIFF, ImageJ hyperstack with a C axis, first file of a
    Micro-Manager multi-file stack) or a list of paths, one per channel, all with the same
    T, H, W. Bad files raise :class:`DecodeAccelError` with a one-line message.
    """
    if isinstance(inputs, Movie):
        return inputs
    if isinstance(inputs, np.ndarray) or hasattr(inputs, "__array__") and not isinstance(inputs, (str, list, tuple)):
        return ArrayMovie(inputs)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = list(inputs)
    if not paths:
        raise DecodeAccelError("no movie given", field="--input", fix="pass --input movie.tif")
    sources = []
    try:
        for p in paths:
            sources.append(_TiffSource(p))
        return Movie(sources)
    except Exception:
        for s in sources:
            s.close()
        raise
