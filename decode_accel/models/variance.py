"""The sCMOS read-noise variance map as a network input (``model.variance_input``).

A network built with ``variance_input=True`` reads, after the C camera channels of its input, C more
channels: the per-pixel read-noise variance in photons² of the same pixels
(``Camera.read_variance_photons``; the network itself takes ``log1p(variance / reference)``, see
``two_stage.variance_feature``). The map does not change over a movie, so every frame of a window
carries the same copy.

* training: each simulated sample carries ``variance`` (C, H, W), its own crop of the full-chip map
  (``SimulatedWindowStream(with_variance=True)``); :func:`network_input` appends it to the frames;
* inference: ``predict`` appends the movie's region of the map (the export's camera, with the movie's
  ROI) to every batch of frames before tiling, so tiles and cached features see the right pixels
  (:func:`movie_variance`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from decode_accel.errors import DecodeAccelError

__all__ = ["reads_variance", "with_variance", "network_input", "movie_variance"]


def reads_variance(model: Any) -> bool:
    """Whether ``model`` (or the module under DDP / torch.compile wrappers) takes the variance input."""
    for _ in range(8):
        if hasattr(model, "variance_input"):
            return bool(model.variance_input)
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return False
        model = inner
    return False


def with_variance(frames: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """The network input: ``frames`` with the variance maps appended as C more channels.

    ``frames`` (B, C, 3, H, W) windows with ``variance`` (B, C, H, W) -> (B, 2C, 3, H, W) (the same map
    in all three frames); or single frames (N, C, H, W) with ``variance`` (C, H, W) or (N, C, H, W)
    -> (N, 2C, H, W). Photons and photons².
    """
    variance = variance.to(device=frames.device, dtype=frames.dtype)
    if frames.ndim == 5:
        if variance.ndim == 3:
            variance = variance.unsqueeze(0).expand(frames.shape[0], -1, -1, -1)
        variance = variance.unsqueeze(2).expand(-1, -1, frames.shape[2], -1, -1)
    elif frames.ndim == 4 and variance.ndim == 3:
        variance = variance.unsqueeze(0).expand(frames.shape[0], -1, -1, -1)
    if variance.shape[:2] != frames.shape[:2] or variance.shape[-2:] != frames.shape[-2:]:
        raise DecodeAccelError(f"variance maps of shape {tuple(variance.shape)} do not fit frames of shape "
                               f"{tuple(frames.shape)}", field="variance",
                               fix="give one map per camera channel, of the frames' height and width")
    return torch.cat([frames, variance], dim=1)


def network_input(batch: Mapping[str, torch.Tensor], model: Any = None) -> torch.Tensor:
    """What a training batch feeds ``model``: ``batch['frames']``, with ``batch['variance']`` appended
    when the model reads it (a model without the variance input, e.g. a distillation teacher, gets
    the frames alone). A model that reads it but a batch without it is a one-line error."""
    frames = batch["frames"]
    wants = reads_variance(model) if model is not None else "variance" in batch
    if not wants:
        return frames
    if "variance" not in batch:
        raise DecodeAccelError("the network reads the sCMOS variance map (model.variance_input) but the batch has "
                               "no 'variance'", field="model.variance_input",
                               fix="build the loader with with_variance=True (the training builders do this)")
    return with_variance(frames, batch["variance"])


def movie_variance(net: Any, camera: Any, n_channels: int, height: int, width: int,
                   device: Any = None) -> torch.Tensor | None:
    """(C, H, W) read-noise variance (photons²) of a movie's pixels for a network with the variance input
    (None for other networks). ``camera`` is the movie's camera (``Camera.for_movie``: its region of the
    maps); one without a per-pixel variance map is refused in one line."""
    if not reads_variance(net):
        return None
    if not hasattr(camera, "read_variance_photons"):
        raise DecodeAccelError(f"the network reads the sCMOS read-noise variance map but the camera "
                               f"({type(camera).__name__}) has no per-pixel maps", field="model.variance_input",
                               fix="use the export's own camera, or a --camera YAML of kind scmos with its maps")
    return camera.read_variance_photons((int(n_channels), int(height), int(width)), device=device)
