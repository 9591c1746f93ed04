"""What every loss shares: named weights that hooks can change, the normalisation scales, input checks.

A loss is an ``nn.Module`` (so ``.to(device)`` and ``accelerator`` idioms work; it holds no parameters)
called as ``loss_fn(output, batch) -> dict[str, Tensor]``: every named term is a scalar, unweighted,
and ``"loss"`` is the weighted total that training back-propagates. Each term enters the total with
exactly one named weight (see ``WeightedLoss.term_weights``), so a logged term times its weight is
its share of the total.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from decode_accel.errors import DecodeAccelError
from decode_accel.models.scaling import Scaling

# Normalised (unit-free) sigmas below this are lifted to it. It sits below the floor the models put on
# their sigma heads (eps = 1e-3 before scaling), so it only guards against exact zeros from other models.
SIGMA_FLOOR = 1e-4
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# Used only when no Scaling is given and decode_accel.models.Scaling cannot supply defaults. The
# photon and z scales shift the mixture NLL by a constant (log photons_max + log z_max per emitter) and
# do not change its gradients; bg_max sets the size of the background MSE.
FALLBACK_PHOTONS_MAX = 10_000.0
FALLBACK_Z_MAX = 1_000.0
FALLBACK_BG_MAX = 200.0


@dataclass(frozen=True)
class LossScales:
    """Normalisation constants of the losses (the model's output ranges).

    Attributes:
        photons_max: photons; photon means, sigmas and targets are divided by it.
        z_max: nm; z means, sigmas and targets are divided by it.
        bg_max: photons/px; the background MSE is computed on bg / bg_max.
    """

    photons_max: float
    z_max: float
    bg_max: float


def _scaling_value(scaling: Any, name: str) -> float | None:
    if scaling is None:
        return None
    if isinstance(scaling, Mapping):
        return scaling.get(name)
    return getattr(scaling, name, None)


def _default_scaling() -> Any:
    """The model package's default Scaling, so that a loss built with no arguments (the seed's
    ``RatioGaussianNLLLoss()``) normalises like a model built with no arguments."""
    try:
        return Scaling()
    except Exception:  # a Scaling without defaults for every field: fall back to the constants
        return None


def resolve_scales(scaling: Any = None, *, photons_max: float | None = None, z_max: float | None = None,
                   bg_max: float | None = None, owner: str = "loss") -> LossScales:
    """Pick the normalisation scales: explicit numbers win over ``scaling`` (a ``Scaling`` or any object or
    mapping with ``photons_max``, ``z_max``, ``bg_max``), which wins over the models' default ``Scaling()``."""
    default = _default_scaling() if scaling is None else None
    values = {}
    for name, explicit, fallback in (("photons_max", photons_max, FALLBACK_PHOTONS_MAX),
                                     ("z_max", z_max, FALLBACK_Z_MAX), ("bg_max", bg_max, FALLBACK_BG_MAX)):
        value = explicit
        if value is None:
            value = _scaling_value(scaling, name)
        if value is None:
            value = _scaling_value(default, name)
        if value is None:
            if scaling is not None:
                raise DecodeAccelError(f"{owner}: the scaling object has no '{name}'", field=f"scaling.{name}",
                                       fix=f"pass a Scaling with {name} or give {name}= explicitly")
            value = fallback
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise DecodeAccelError(f"{owner}: {name}={value!r} is not a number", field=name,
                                   fix="give a positive number") from None
        if not math.isfinite(value) or value <= 0:
            raise DecodeAccelError(f"{owner}: {name}={value} must be a positive finite number", field=name,
                                   fix="give the model's output range, e.g. Scaling.auto(...)")
        values[name] = value
    return LossScales(**values)


def check_weight(owner: str, name: str, value: Any) -> float:
    """A loss weight as a float; negative or non-finite weights raise ``DecodeAccelError``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise DecodeAccelError(f"{owner}: weight {name} must be a scalar, got shape {tuple(value.shape)}",
                                   field=name, fix="pass one number")
        value = value.item()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DecodeAccelError(f"{owner}: weight {name}={value!r} is not a number", field=name,
                               fix="pass a non-negative number") from None
    if not math.isfinite(number) or number < 0:
        raise DecodeAccelError(f"{owner}: weight {name}={number} must be finite and >= 0", field=name,
                               fix="pass a non-negative number (0 switches the term off)")
    return number


class WeightedLoss(nn.Module):
    """Base class: a loss whose total is a weighted sum of named terms.

    Subclasses set ``term_weights`` (term name -> weight name) and call ``super().__init__(**weights)``.
    """

    #: term name (as returned by forward) -> name of the weight that multiplies it in "loss"
    term_weights: dict[str, str] = {}

    def __init__(self, **weights: float):
        super().__init__()
        self._weights: dict[str, float] = {name: check_weight(type(self).__name__, name, value)
                                           for name, value in weights.items()}

    @property
    def weights(self) -> dict[str, float]:
        """The current weights by name (a copy)."""
        return dict(self._weights)

    def weight_name(self, name: str) -> str | None:
        """The weight a name refers to: the weight's own name (``count_weight``), the term's short name
        (``count``) or the term's name (``count_loss``); None if none matches."""
        if name in self._weights:
            return name
        for candidate in (f"{name}_weight", f"{name[:-len('_loss')]}_weight" if name.endswith("_loss") else None):
            if candidate in self._weights:
                return candidate
        return None

    def update_weights(self, **weights: float) -> None:
        """Change some weights by name, e.g. ``loss_fn.update_weights(ratio_weight=0.8)`` (used by the
        loss scheduler and curriculum hooks); ``ratio=0.8`` and ``ratio_loss=0.8`` mean the same.
        Unknown names raise ``DecodeAccelError`` listing the valid ones; nothing is changed unless every
        name and value is valid."""
        owner = type(self).__name__
        unknown = sorted(name for name in weights if self.weight_name(name) is None)
        if unknown:
            raise DecodeAccelError(f"{owner} has no weight(s) {', '.join(unknown)}", field="loss_weights",
                                   fix=f"use one of {', '.join(sorted(self._weights))}")
        checked = {self.weight_name(name): check_weight(owner, name, value) for name, value in weights.items()}
        self._weights.update(checked)

    def weighted_total(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum of weight x term over the terms present (terms a model cannot produce are simply absent)."""
        total = None
        for term, weight_name in self.term_weights.items():
            if term not in terms:
                continue
            part = self._weights[weight_name] * terms[term]
            total = part if total is None else total + part
        if total is None:  # pragma: no cover - every loss has at least one term
            raise RuntimeError(f"{type(self).__name__} produced no terms")
        return total

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value:g}" for name, value in self._weights.items())


def require_keys(owner: str, mapping: Mapping[str, Any], keys: tuple[str, ...] | list[str], what: str,
                 fix: str) -> None:
    """Raise one clear error naming every missing key of the model output or the batch."""
    missing = [key for key in keys if key not in mapping]
    if missing:
        listed = ", ".join(f"{what}['{key}']" for key in missing)
        raise DecodeAccelError(f"{owner}: missing {listed}", field=what, fix=fix)


def as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Losses are evaluated in float32 even under bf16/fp16 autocast: logsumexp over thousands of pixels
    and squared normalised residuals lose too much in 8 mantissa bits."""
    return tensor.float() if tensor.dtype != torch.float32 and tensor.is_floating_point() else tensor


def check_batch_shapes(owner: str, p: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
    """The target list must match the maps' batch size and be (B, M, 3) / (B, M)."""
    batch_size = p.shape[0]
    xyz = batch["tgt_xyz"]
    mask = batch["tgt_mask"]
    if xyz.dim() != 3 or xyz.shape[-1] != 3:
        raise DecodeAccelError(f"{owner}: batch['tgt_xyz'] has shape {tuple(xyz.shape)}, expected (B, M, 3)",
                               field="tgt_xyz", fix="collate targets as (B, M, 3): x px, y px, z nm")
    if xyz.shape[0] != batch_size or mask.shape != xyz.shape[:2]:
        raise DecodeAccelError(
            f"{owner}: batch sizes disagree: output['p'] {tuple(p.shape)}, tgt_xyz {tuple(xyz.shape)}, "
            f"tgt_mask {tuple(mask.shape)}", field="tgt_mask", fix="pass the batch that produced this output")
