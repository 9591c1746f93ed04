"""The ``model`` section of the training config and the builder that turns it into a network."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from torch import nn

from decode_accel.config_base import StrictModel
from decode_accel.errors import DecodeAccelError
from decode_accel.models.double_munet import DoubleMUNet
from decode_accel.models.scaling import Scaling
from decode_accel.models.sigma_munet import SigmaMUNet
from decode_accel.models.two_stage import PRESETS

ARCHITECTURES = {"SigmaMUNet": SigmaMUNet, "DoubleMUNet": DoubleMUNet}


class ModelConfig(StrictModel):
    """Network choice and shape. Unset fields (None) come from the preset, else the class defaults
    (which are DECODE's: 48 features, depth 2, ELU, no normalisation, no dropout)."""

    architecture: Literal["SigmaMUNet", "DoubleMUNet"] = Field(
        "SigmaMUNet", description="SigmaMUNet (single channel) or DoubleMUNet (two-channel ratiometric) (-)")
    preset: Literal["decode", "cpu_small", "fast", "tiny"] | None = Field(
        None, description="named size: decode (48 features, ~2.2 M parameters), cpu_small (16), fast (8, for CPU "
                          "inference), tiny (8, tests) (-)")
    features: int | None = Field(None, ge=1, le=512,
                                 description="width of the first U-Net level; deeper levels double it (channels)")
    depth: int | None = Field(None, ge=1, le=6,
                              description="down-sampling steps per U-Net; frame height/width must be multiples of 2**depth (-)")
    activation: Literal["elu", "relu", "gelu"] | None = Field(None, description="activation function (-)")
    norm: Literal["none", "group", "batch"] | None = Field(None, description="normalisation inside the U-Nets (-)")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="spatial dropout after each U-Net block (probability)")
    channels: int | None = Field(None, ge=1, le=2,
                                 description="camera channels of the input: 1 for SigmaMUNet, 2 for DoubleMUNet (channels)")
    z_enabled: bool = Field(True, description="predict z; False for 2D data (z = 0) (-)")
    uncertainty: bool = Field(True, description="predict per-pixel sigmas, required by the Gaussian-mixture loss (-)")
    share_stage1: bool = Field(True, description="DoubleMUNet: both channels share the stage-1 U-Net weights (-)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory (-)")
    variance_input: bool = Field(
        False, description="feed each frame's crop of the sCMOS read-noise variance map (photons², seen as "
                           "log1p(variance / scaling.variance_scale)) beside it to stage 1, in training and in predict; "
                           "needs simulation.camera.kind scmos with a per-pixel variance map (-)")
    scaling: Scaling = Field(default_factory=Scaling,
                             description="input offset/scale (photons) and output ranges (photons, nm, photons/px); in a "
                                         "TrainingConfig every field not given is derived from the simulation "
                                         "(DECODE's auto-scaling), the defaults shown are DECODE's")

    @model_validator(mode="after")
    def _channels_match_architecture(self) -> "ModelConfig":
        if self.architecture == "DoubleMUNet" and self.channels not in (None, 2):
            raise ValueError("DoubleMUNet needs channels=2 (two camera channels)")
        return self

    def model_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the chosen architecture."""
        kwargs: dict[str, Any] = dict(PRESETS[self.preset]) if self.preset else {}
        for name in ("features", "depth", "activation", "norm", "dropout"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        kwargs.update(z_enabled=self.z_enabled, uncertainty=self.uncertainty,
                      gradient_checkpointing=self.gradient_checkpointing, scaling=self.scaling.model_copy(),
                      variance_input=self.variance_input)
        if self.architecture == "DoubleMUNet":
            kwargs["share_stage1"] = self.share_stage1
        else:
            kwargs["in_channels"] = self.channels or 1
        return kwargs


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        where = ".".join(str(part) for part in item["loc"])
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def build_model(config: ModelConfig | dict[str, Any] | None = None) -> nn.Module:
    """The network described by a ``model`` config section (a :class:`ModelConfig` or a plain dict).

    Example: ``build_model({"architecture": "SigmaMUNet", "preset": "cpu_small", "z_enabled": False})``.
    Raises :class:`DecodeAccelError` naming every bad field.
    """
    if config is None:
        config = ModelConfig()
    elif isinstance(config, dict):
        try:
            config = ModelConfig(**config)
        except ValidationError as error:
            raise DecodeAccelError(_validation_message(error), field="model") from None
    elif not isinstance(config, ModelConfig):
        raise DecodeAccelError(f"expected a ModelConfig or a dict, got {type(config).__name__}", field="model")
    return ARCHITECTURES[config.architecture](**config.model_kwargs())


def load_pretrained(path_or_repo: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """A network saved with ``save_pretrained`` (a local folder or a Hub repo id), of the class named by
    ``architecture`` in its config.json. ``kwargs`` go to ``from_pretrained`` (e.g. ``map_location``)."""
    folder = Path(path_or_repo)
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise DecodeAccelError("no config.json in the model folder", path=folder,
                                   fix="point to a folder written by save_pretrained")
    else:
        from huggingface_hub import hf_hub_download  # only for a Hub id: huggingface_hub costs ~0.3 s at start-up

        config_file = Path(hf_hub_download(str(path_or_repo), "config.json"))
    try:
        architecture = json.loads(config_file.read_text()).get("architecture", "SigmaMUNet")
    except (json.JSONDecodeError, AttributeError):
        raise DecodeAccelError("config.json is not a JSON object", path=config_file,
                               fix="re-export the model with save_pretrained") from None
    if architecture not in ARCHITECTURES:
        raise DecodeAccelError(f"unknown architecture {architecture!r}", path=config_file, field="architecture",
                               fix=f"use one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture].from_pretrained(path_or_repo, **kwargs)
