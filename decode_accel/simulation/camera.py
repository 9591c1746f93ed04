"""Camera forward model (expected photons -> noisy ADU) and its inverse (ADU -> photons).

``x`` below is the expected number of photons reaching each pixel in one frame. The inverse
:meth:`Camera.to_photons` maps ADU back to the same photon scale (in expectation), which is what
the network sees at training and at inference.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import tifffile
import torch

from decode_accel.errors import DecodeAccelError

from .config import CameraConfig

ADU_MAX = 65535.0


#: keys looked up in a .npz of sCMOS maps, per map (first present wins)
NPZ_KEYS: dict[str, tuple[str, ...]] = {
    "offset": ("offset_adu", "offset", "dark", "mean_adu"),
    "variance": ("variance_adu2", "variance", "var", "read_noise_variance_adu2"),
    "e_per_adu": ("e_per_adu", "gain_e_per_adu", "conversion"),
}


def _read_array(path: str, field: str, npz_key: str | None = None) -> np.ndarray:
    if not os.path.exists(path):
        raise DecodeAccelError("map file not found", path=path, field=f"camera.{field}",
                               fix="give an existing .npy, .npz or .tif file")
    try:
        low = path.lower()
        if low.endswith(".npz"):
            with np.load(path) as z:
                keys = list(z.keys())
                cands = NPZ_KEYS.get(npz_key or "", ())
                key = next((k for k in cands if k in keys), None)
                if key is None and len(keys) == 1:
                    key = keys[0]
                if key is None:
                    raise DecodeAccelError(f"no {npz_key} map among the arrays {keys}", path=path, field=f"camera.{field}",
                                           fix=f"name the array one of {', '.join(cands)}")
                arr = z[key]
        elif low.endswith(".npy"):
            arr = np.load(path)
        else:
            arr = tifffile.imread(path)
    except DecodeAccelError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad user file
        raise DecodeAccelError(f"cannot read the map ({type(err).__name__})", path=path, field=f"camera.{field}",
                               fix="save it as a 2D .npy, .npz or .tif array") from None
    return np.asarray(arr, dtype=np.float32)


def _load_map(path: str, field: str, shape: tuple[int, int] | None, npz_key: str | None = None) -> torch.Tensor:
    """A per-pixel map (H_chip, W_chip) or (C, H_chip, W_chip); it may be larger than the frames (full chip)."""
    arr = _read_array(path, field, npz_key)
    if arr.ndim not in (2, 3):
        raise DecodeAccelError(f"map has shape {arr.shape}, expected (H, W) or (channels, H, W)", path=path,
                               field=f"camera.{field}", fix="save a 2D per-pixel map")
    if shape is not None and (arr.shape[-2] < shape[0] or arr.shape[-1] < shape[1]):
        raise DecodeAccelError(f"map has shape {arr.shape}, smaller than the {shape[0]}x{shape[1]} px frames",
                               path=path, field=f"camera.{field}",
                               fix="give the full-chip map (frames are cropped from it), or frames no larger than the map")
    if not np.all(np.isfinite(arr)):
        raise DecodeAccelError("map has non-finite values", path=path, field=f"camera.{field}",
                               fix="replace NaN/inf pixels (e.g. by the median)")
    if npz_key == "e_per_adu" and not np.all(arr > 0):
        raise DecodeAccelError("conversion map has values <= 0", path=path, field=f"camera.{field}",
                               fix="give electrons per ADU, all positive")
    if npz_key == "variance" and not np.all(arr >= 0):
        raise DecodeAccelError("variance map has negative values", path=path, field=f"camera.{field}",
                               fix="give the read-noise variance in ADU², all >= 0")
    return torch.from_numpy(arr)


def _npz_has(path: str, key: str) -> bool:
    try:
        with np.load(path) as z:
            return any(k in z.keys() for k in NPZ_KEYS[key])
    except Exception:  # noqa: BLE001 - unreadable files are reported by the caller
        return False


class Camera:
    """Camera noise model and photon conversion.

    Build it from a :class:`~decode_accel.simulation.config.CameraConfig`; ``frame_shape`` (H, W)
    is needed only for sCMOS per-pixel maps (to check they cover the frames).

    * emccd: Poisson(qe·x + spur) -> Gamma(shape=counts, scale=em_gain) -> + N(0, read_noise) e-
      -> / e_per_adu -> floor -> + baseline -> clip [0, 65535].
    * scmos: Poisson(qe·x) -> + N(0, read noise) -> / e_per_adu -> floor -> + offset -> clip; each
      of offset (ADU), read-noise variance (ADU²) and e_per_adu may be a per-pixel map.
    * perfect: Poisson(x); ADU = photons.

    sCMOS maps may cover the whole chip (larger than the frames). Then every call says which region
    of the chip the frames are: ``origin`` = (row, col) of the frames' top-left pixel on the maps,
    either one pair for all frames or an int64 tensor (N, 2), one pair per frame (the simulator draws
    a random crop per training sample). Without ``origin``, ``camera.roi_origin`` is used; with
    neither and maps larger than the frames, :meth:`to_photons` refuses (the result would depend on a
    guess).
    """

    def __init__(self, cfg: CameraConfig, frame_shape: tuple[int, int] | None = None):
        self.cfg = cfg
        self.kind = cfg.kind
        self._maps: dict[str, torch.Tensor] = {}
        npz = getattr(cfg, "scmos_maps", None)
        from_npz: list[str] = []
        for field, key in (("scmos_offset_map", "offset"), ("scmos_variance_map", "variance"),
                           ("scmos_e_per_adu_map", "e_per_adu")):
            path = getattr(cfg, field)
            if path is None and npz is not None:
                if not _npz_has(npz, key):
                    continue  # a .npz without this map: the scalar of the config stays
                path, field = npz, "scmos_maps"
                from_npz.append(key)
            if path is not None:
                if cfg.kind != "scmos":
                    raise DecodeAccelError(f"per-pixel maps need kind 'scmos', not '{cfg.kind}'", field=f"camera.{field}",
                                           fix="set camera.kind: scmos or remove the map")
                self._maps[key] = _load_map(path, field, frame_shape, key)
        if npz is not None and not from_npz and len(self._maps) < 3:
            if cfg.kind != "scmos":
                raise DecodeAccelError(f"per-pixel maps need kind 'scmos', not '{cfg.kind}'", field="camera.scmos_maps",
                                       fix="set camera.kind: scmos or remove the maps")
            _read_array(npz, "scmos_maps", "offset")  # a missing or unreadable file says so
            raise DecodeAccelError("no sCMOS map found in the .npz", path=npz, field="camera.scmos_maps",
                                   fix="name the arrays offset_adu (ADU), variance_adu2 (ADU²), e_per_adu (e-/ADU)")
        shapes = {tuple(m.shape[-2:]) for m in self._maps.values()}
        if len(shapes) > 1:
            raise DecodeAccelError(f"the sCMOS maps have different sizes {sorted(shapes)}", field="camera.scmos_maps",
                                   fix="give maps of the same chip region")
        #: (H, W) of the per-pixel maps (the chip), None without maps.
        self.map_shape: tuple[int, int] | None = next(iter(shapes)) if shapes else None
        #: default (row, col) of the frames on the maps (``camera.roi_origin`` of the config).
        self.roi_origin: tuple[int, int] | None = tuple(cfg.roi_origin) if getattr(cfg, "roi_origin", None) else None
        self._dev_maps: dict[tuple[str, str], torch.Tensor] = {}

    # ------------------------------------------------------------------ maps
    def crop_origins(self, n: int, frame_shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor | None:
        """Random (row, col) crop origins on the maps for ``n`` samples, int64 (n, 2), or None.

        None when there are no maps larger than ``frame_shape`` (nothing to choose, no random numbers
        used) or when ``scmos_training_crop`` is 'roi' (the fixed ``roi_origin`` is used).
        """
        if self.map_shape is None or tuple(self.map_shape) == tuple(frame_shape):
            return None
        if getattr(self.cfg, "scmos_training_crop", "random") == "roi":
            return None
        H, W = frame_shape
        hi = torch.tensor([self.map_shape[0] - H + 1, self.map_shape[1] - W + 1], device=generator.device)
        u = torch.rand(n, 2, generator=generator, device=generator.device)
        return torch.minimum((u * hi).long(), hi - 1)

    def _resolve_origin(self, origin, H: int, W: int):
        if origin is None:
            if self.map_shape is None or tuple(self.map_shape) == (H, W):
                return None
            if self.roi_origin is None:
                mh, mw = self.map_shape
                raise DecodeAccelError(f"the frames are {H}x{W} px but the sCMOS maps are {mh}x{mw} px and the frames' "
                                       "place on the chip is unknown", field="camera.roi_origin",
                                       fix="set camera.roi_origin: [row, col] of the movie's top-left pixel on the maps")
            origin = self.roi_origin
        if isinstance(origin, torch.Tensor) and origin.ndim == 2:
            return origin
        r, c = (int(v) for v in origin)
        mh, mw = self.map_shape
        if r < 0 or c < 0 or r + H > mh or c + W > mw:
            raise DecodeAccelError(f"frames of {H}x{W} px at (row {r}, col {c}) fall outside the {mh}x{mw} px sCMOS maps",
                                   field="camera.roi_origin", fix="give the movie's true ROI origin on the chip")
        return (r, c)

    def _map(self, key: str, like: torch.Tensor, origin) -> torch.Tensor:
        k = (key, str(like.device))
        if k not in self._dev_maps:
            self._dev_maps[k] = self._maps[key].to(like.device)
        m = self._dev_maps[k]
        H, W = like.shape[-2:]
        o = self._resolve_origin(origin, H, W)
        if o is None:
            return m
        if isinstance(o, tuple):
            return m[..., o[0]:o[0] + H, o[1]:o[1] + W]
        # one origin per leading frame: gather (N, [C,] H, W) so it broadcasts against (N, C, H, W)
        o = o.to(like.device)
        rows = o[:, 0, None] + torch.arange(H, device=like.device)
        cols = o[:, 1, None] + torch.arange(W, device=like.device)
        if m.ndim == 2:
            out = m[rows[:, :, None], cols[:, None, :]]  # (N, H, W)
        else:
            out = m[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1)  # (N, C, H, W)
        extra = like.ndim - out.ndim
        if m.ndim == 2 and like.ndim >= 4:
            out = out.reshape(out.shape[0], *([1] * (like.ndim - 3)), H, W)
        elif extra > 0 and m.ndim == 3:
            out = out.reshape(out.shape[0], *([1] * extra), *out.shape[1:])
        return out

    def _param(self, key: str, like: torch.Tensor, origin=None) -> torch.Tensor | float:
        """A scalar or per-pixel parameter, broadcastable to ``like`` (..., H, W)."""
        if key in self._maps:
            return self._map(key, like, origin)
        c = self.cfg
        if key == "variance":  # read noise in e- seen through the (possibly per-pixel) conversion
            return (c.read_noise / self._param("e_per_adu", like, origin)) ** 2
        return {"offset": c.baseline, "e_per_adu": c.e_per_adu}[key]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, generator: torch.Generator, origin=None) -> torch.Tensor:
        """Noisy camera frames in ADU (float32, same shape as ``x``) from expected photons ``x``.

        ``origin``: where the frames lie on full-chip sCMOS maps (see the class docstring).
        """
        g = generator
        x = x.clamp_min(0.0).float()
        c = self.cfg
        if self.kind == "perfect":
            return torch.poisson(x, generator=g)
        if self.kind == "emccd":
            electrons = torch.poisson(c.qe * x + c.spurious_charge, generator=g)
            # Gamma(shape=n, scale=gain) is the sum of n exponential gain stages; n = 0 stays 0
            gained = torch._standard_gamma(electrons.clamp_min(1e-6), generator=g) * c.em_gain
            gained = torch.where(electrons > 0, gained, torch.zeros_like(gained))
            if c.read_noise > 0:
                gained = gained + c.read_noise * torch.randn(x.shape, generator=g, device=x.device)
            adu = torch.floor(gained / c.e_per_adu) + c.baseline
        else:  # scmos
            electrons = torch.poisson(c.qe * x, generator=g)
            e_per_adu = self._param("e_per_adu", x, origin)
            sd_adu = torch.sqrt(torch.as_tensor(self._param("variance", x, origin), device=x.device, dtype=x.dtype))
            adu = electrons / e_per_adu + sd_adu * torch.randn(x.shape, generator=g, device=x.device)
            adu = torch.floor(adu) + self._param("offset", x, origin)
        if c.clip_16bit:
            adu = adu.clamp(0.0, ADU_MAX)
        return adu

    __call__ = forward

    # ------------------------------------------------------------------ inverse
    def to_photons(self, adu: torch.Tensor, origin=None) -> torch.Tensor:
        """ADU -> photons: the inverse of the mean of :meth:`forward`.

        ``origin``: (row, col) of the frames' top-left pixel on full-chip sCMOS maps (or (N, 2) per
        frame); default ``roi_origin`` of the config.

        emccd: ((adu - baseline)·e_per_adu/em_gain - spurious_charge)/qe; scmos:
        (adu - offset)·e_per_adu/qe; perfect: unchanged. The floor of the forward model biases the
        mean by -0.5 ADU; it is not corrected (DECODE does not either), which is small against the
        e_per_adu/em_gain scale.
        """
        adu = adu.float() if not torch.is_floating_point(adu) else adu
        c = self.cfg
        if self.kind == "perfect":
            return adu
        if self.kind == "emccd":
            return ((adu - c.baseline) * (c.e_per_adu / c.em_gain) - c.spurious_charge) / c.qe
        return (adu - self._param("offset", adu, origin)) * self._param("e_per_adu", adu, origin) / c.qe

    @property
    def has_variance_map(self) -> bool:
        """Whether the read-noise variance is a per-pixel map (sCMOS), not one number for the chip."""
        return "variance" in self._maps

    def read_variance_photons(self, shape: tuple[int, ...], origin=None, device=None) -> torch.Tensor:
        """The per-pixel read-noise variance in photons² of frames of ``shape`` (..., C, H, W), broadcast to it.

        photons² = variance_adu2 · (e_per_adu / qe)²: the read noise seen on the photon scale of
        :meth:`to_photons` (each map per pixel where it is a map). ``origin`` as in :meth:`forward`:
        one (row, col) for all frames or an int64 (N, 2) tensor, one per leading frame. What the
        network's variance input (``model.variance_input``) reads; a camera without a per-pixel
        variance map is refused (the input would be one constant). ``device``: where the result lives
        (default: that of a tensor ``origin``, else the CPU).
        """
        if not self.has_variance_map:
            raise DecodeAccelError(f"the network reads the sCMOS read-noise variance map but the camera "
                                   f"({self.kind}) has no per-pixel variance map", field="model.variance_input",
                                   fix="give camera.kind scmos with scmos_variance_map (or variance_adu2 in "
                                       "scmos_maps), or set model.variance_input false")
        if device is None:
            device = origin.device if isinstance(origin, torch.Tensor) else "cpu"
        like = torch.empty(shape, device=device)
        var = self._map("variance", like, origin) * (self._param("e_per_adu", like, origin) / self.cfg.qe) ** 2
        return var.expand(shape).contiguous()

    def with_roi(self, origin: tuple[int, int]) -> "Camera":
        """The same camera (maps shared, not re-read) whose default frames' place on the maps is ``origin`` (row, col)."""
        other = copy.copy(self)
        other.roi_origin = (int(origin[0]), int(origin[1]))
        other.cfg = self.cfg.model_copy(update={"roi_origin": other.roi_origin})
        return other

    def for_movie(self, height: int, width: int, roi_origin=None, *, path=None,
                  flag: str = "--camera-roi") -> "Camera":
        """The camera that converts a movie of ``height`` x ``width`` px, with its region of the maps checked.

        ``roi_origin``: (row, col) of the movie's top-left pixel on the sCMOS maps, as the user gave
        it (``flag`` names where, in errors). Without it: the config's ``roi_origin``, else the ROI in
        the movie file's Micro-Manager metadata (``path``), else the maps must have the movie's size.
        Without per-pixel maps the camera is the same everywhere and is returned as it is. Raises a
        one-line :class:`DecodeAccelError` when the region does not fit the maps or is unknown.
        """
        H, W = int(height), int(width)
        if self.map_shape is None:
            return self
        mh, mw = self.map_shape
        given = roi_origin is not None
        where = flag
        if roi_origin is None and self.roi_origin is not None:
            roi_origin, where = self.roi_origin, "camera.roi_origin"
        if roi_origin is None and (mh, mw) != (H, W) and path is not None:
            roi_origin, where = roi_origin_from_metadata(path), "the movie's ROI metadata"
        if roi_origin is None:
            if (mh, mw) == (H, W):
                return self
            raise DecodeAccelError(f"the movie is {H}x{W} px but the sCMOS maps are {mh}x{mw} px and the movie's "
                                   "place on the chip is unknown", path=path, field=flag,
                                   fix=f"give {flag} ROW,COL of the movie's top-left pixel on the maps, or set "
                                       "camera.roi_origin: [row, col]" if (H <= mh and W <= mw)
                                   else "give maps that cover the movie (the full chip)")
        try:
            r, c = (int(v) for v in roi_origin)
        except (TypeError, ValueError):
            raise DecodeAccelError(f"ROI origin {roi_origin!r} is not two integers", field=where,
                                   fix="give ROW,COL in px, e.g. 128,0") from None
        if r < 0 or c < 0 or r + H > mh or c + W > mw:
            fix = (f"give the movie's top-left pixel on the chip: row 0..{mh - H}, col 0..{mw - W}" if H <= mh and W <= mw
                   else "give maps that cover the movie (the full chip)")
            raise DecodeAccelError(f"a {H}x{W} px movie at (row {r}, col {c}) does not fit the {mh}x{mw} px sCMOS maps",
                                   path=path if not given else None, field=where, fix=fix)
        if self.roi_origin == (r, c):
            return self
        return self.with_roi((r, c))

    def excess_noise_factor(self) -> float:
        """Noise factor F² of the gain register: 2 for an EMCCD, 1 otherwise (divides the Fisher information)."""
        return 2.0 if self.kind == "emccd" else 1.0


def parse_roi(text: str | None, flag: str = "--camera-roi") -> tuple[int, int] | None:
    """``"ROW,COL"`` (px) -> (row, col); None stays None. A bad value is a one-line error naming ``flag``."""
    if text is None:
        return None
    parts = str(text).replace(" ", "").split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        r, c = int(parts[0]), int(parts[1])
    except ValueError:
        raise DecodeAccelError(f"{text!r} is not ROW,COL", field=flag,
                               fix="give the movie's top-left pixel on the sCMOS maps as two integers, e.g. 128,0") from None
    if r < 0 or c < 0:
        raise DecodeAccelError(f"ROI origin ({r}, {c}) is negative", field=flag, fix="give ROW,COL >= 0 (px)")
    return (r, c)


def roi_origin_from_metadata(path: str | os.PathLike) -> tuple[int, int] | None:
    """(row, col) of the movie's top-left pixel on the chip from Micro-Manager metadata, or None.

    Reads the ``ROI`` entry ("x-y-width-height" or [x, y, width, height], camera px) of the
    Micro-Manager summary or of the first frame's ``MicroManagerMetadata`` tag.
    """
    def parse(roi):
        if isinstance(roi, str):
            parts = roi.replace(",", "-").split("-")
        else:
            parts = list(roi)
        x, y = int(float(parts[0])), int(float(parts[1]))
        return (y, x)

    try:
        with tifffile.TiffFile(os.fspath(path)) as tif:
            mm = getattr(tif, "micromanager_metadata", None) or {}
            summary = mm.get("Summary", {}) if isinstance(mm, dict) else {}
            if isinstance(summary, dict) and summary.get("ROI") is not None:
                return parse(summary["ROI"])
            tag = tif.pages[0].tags.get(51123)  # MicroManagerMetadata (JSON) of the first frame
            if tag is not None:
                value = tag.value if isinstance(tag.value, dict) else json.loads(tag.value)
                if value.get("ROI") is not None:
                    return parse(value["ROI"])
    except (ValueError, TypeError, KeyError, IndexError, OSError):
        return None
    return None
