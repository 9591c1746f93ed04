"""Camera forward model (expected photons -> noisy ADU) and its inverse (ADU -> photons).

``x`` below is the expected number of photons reaching each pixel in one frame. The inverse
:meth:`Camera.to_photons` maps ADU back to the same photon scale (in expectation), which is what
the network sees at training and at inference.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from decode_accel.errors import DecodeAccelError

from .config import CameraConfig

ADU_MAX = 65535.0


def _load_map(path: str, field: str, shape: tuple[int, int]) -> torch.Tensor:
    if not os.path.exists(path):
        raise DecodeAccelError("map file not found", path=path, field=f"camera.{field}", fix="give an existing .npy or .tif file")
    try:
        if path.lower().endswith(".npy"):
            arr = np.load(path)
        else:
            import tifffile

            arr = tifffile.imread(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad user file
        raise DecodeAccelError(f"cannot read the map ({type(err).__name__})", path=path, field=f"camera.{field}",
                               fix="save it as a 2D .npy or .tif array") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.shape[-2:] != tuple(shape) or arr.ndim not in (2, 3):
        raise DecodeAccelError(f"map has shape {arr.shape}, frames are {shape[0]}x{shape[1]} px", path=path,
                               field=f"camera.{field}", fix="crop the map to (H, W) or (channels, H, W) of the frames")
    return torch.from_numpy(arr)


class Camera:
    """Camera noise model and photon conversion.

    Build it from a :class:`~decode_accel.simulation.config.CameraConfig`; ``frame_shape`` (H, W)
    is needed only for sCMOS per-pixel maps.

    * emccd: Poisson(qe·x + spur) -> Gamma(shape=counts, scale=em_gain) -> + N(0, read_noise) e-
      -> / e_per_adu -> floor -> + baseline -> clip [0, 65535].
    * scmos: Poisson(qe·x) -> + N(0, read noise) -> / e_per_adu -> floor -> + offset -> clip; each
      of offset (ADU), read-noise variance (ADU²) and e_per_adu may be a per-pixel map.
    * perfect: Poisson(x); ADU = photons.
    """

    def __init__(self, cfg: CameraConfig, frame_shape: tuple[int, int] | None = None):
        self.cfg = cfg
        self.kind = cfg.kind
        self._maps: dict[str, torch.Tensor] = {}
        for field, key in (("scmos_offset_map", "offset"), ("scmos_variance_map", "variance"),
                           ("scmos_e_per_adu_map", "e_per_adu")):
            path = getattr(cfg, field)
            if path is not None:
                if cfg.kind != "scmos":
                    raise DecodeAccelError(f"per-pixel maps need kind 'scmos', not '{cfg.kind}'", field=f"camera.{field}",
                                           fix="set camera.kind: scmos or remove the map")
                if frame_shape is None:
                    raise DecodeAccelError("a per-pixel map needs the frame size", field=f"camera.{field}")
                self._maps[key] = _load_map(path, field, frame_shape)
        self._dev_maps: dict[tuple[str, str], torch.Tensor] = {}

    def _param(self, key: str, like: torch.Tensor) -> torch.Tensor | float:
        """A scalar or per-pixel parameter, broadcastable to ``like`` (..., H, W)."""
        if key in self._maps:
            k = (key, str(like.device))
            if k not in self._dev_maps:
                self._dev_maps[k] = self._maps[key].to(like.device)
            # an (H, W) or (C, H, W) map broadcasts against (..., C, H, W) frames
            return self._dev_maps[k]
        c = self.cfg
        if key == "variance":  # read noise in e- seen through the (possibly per-pixel) conversion
            return (c.read_noise / self._param("e_per_adu", like)) ** 2
        return {"offset": c.baseline, "e_per_adu": c.e_per_adu}[key]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noisy camera frames in ADU (float32, same shape as ``x``) from expected photons ``x``."""
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
            e_per_adu = self._param("e_per_adu", x)
            sd_adu = torch.sqrt(torch.as_tensor(self._param("variance", x), device=x.device, dtype=x.dtype))
            adu = electrons / e_per_adu + sd_adu * torch.randn(x.shape, generator=g, device=x.device)
            adu = torch.floor(adu) + self._param("offset", x)
        if c.clip_16bit:
            adu = adu.clamp(0.0, ADU_MAX)
        return adu

    __call__ = forward

    # ------------------------------------------------------------------ inverse
    def to_photons(self, adu: torch.Tensor) -> torch.Tensor:
        """ADU -> photons: the inverse of the mean of :meth:`forward`.

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
        return (adu - self._param("offset", adu)) * self._param("e_per_adu", adu) / c.qe

    def excess_noise_factor(self) -> float:
        """Noise factor F² of the gain register: 2 for an EMCCD, 1 otherwise (divides the Fisher information)."""
        return 2.0 if self.kind == "emccd" else 1.0
