"""Losses: model output dict + batch -> dict of named scalar terms and the weighted total ``"loss"``.

- ``GaussianMMLoss``: DECODE's count + Gaussian-mixture localization + background loss (single channel).
- ``RatioGaussianNLLLoss``: GaussianMM plus the ratio NLL when the output has a ratio map (falls back to
  plain GaussianMM for single-channel models).
- ``UnifiedLoss``: two-channel ratiometric loss (per-channel mixtures, ratio, photon conservation,
  uncertainty consistency, per-channel background).
- ``DistillationLoss`` (``decode_accel.loss.distillation``): teacher -> student on the output maps.

Every loss has ``update_weights(**weights)`` (unknown names raise ``DecodeAccelError``) and ``weights``.
"""

from __future__ import annotations

import inspect
from typing import Any

from decode_accel.errors import DecodeAccelError
from decode_accel.loss.base import LossScales, WeightedLoss, resolve_scales
from decode_accel.loss.distillation import DistillationLoss
from decode_accel.loss.gaussian_mm import GaussianMMLoss
from decode_accel.loss.ratio import RatioGaussianNLLLoss
from decode_accel.loss.unified import UnifiedLoss

#: names accepted by ``build_loss`` (config ``loss.type``) -> class
LOSSES: dict[str, type[WeightedLoss]] = {
    "GaussianMM": GaussianMMLoss,
    "RatioGaussianNLL": RatioGaussianNLLLoss,
    "Unified": UnifiedLoss,
}


def _init_parameters(cls: type) -> set[str]:
    """Keyword names the constructors along ``cls``'s MRO accept by name."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and klass is not WeightedLoss:
            names |= {name for name, p in inspect.signature(init).parameters.items()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"}
    return names


def build_loss(loss_type: str, scaling: Any = None, **kwargs: Any) -> WeightedLoss:
    """Build a loss by config name ("GaussianMM", "RatioGaussianNLL", "Unified"; the class names work too)
    with the model's ``scaling`` and keyword arguments: options (z_enabled, window, ...) and weights, by
    the weight's name (``count_weight``) or the term's (``count``, ``count_loss``)."""
    aliases = {**LOSSES, **{cls.__name__: cls for cls in LOSSES.values()}}
    if loss_type not in aliases:
        raise DecodeAccelError(f"unknown loss type {loss_type!r}", field="loss.type",
                               fix=f"use one of {', '.join(LOSSES)}")
    cls = aliases[loss_type]
    accepted = _init_parameters(cls)
    options = {name: value for name, value in kwargs.items() if name in accepted}
    weights = {name: value for name, value in kwargs.items() if name not in accepted}
    loss = cls(scaling=scaling, **options)
    loss.update_weights(**weights)  # short names resolved here; unknown names -> DecodeAccelError
    return loss


__all__ = ["GaussianMMLoss", "RatioGaussianNLLLoss", "UnifiedLoss", "DistillationLoss", "LossScales",
           "WeightedLoss", "resolve_scales", "build_loss", "LOSSES"]
