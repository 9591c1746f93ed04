"""Run settings of a trainer and the objects they imply: ``TrainerSettings`` (validated), the
``Accelerator`` (device, mixed precision) and the optimizer.

``builders`` fills the settings from a ``TrainingConfig``; the trainer takes them as one object.
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Literal, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from pydantic import Field, ValidationError, field_validator

from decode_accel.config_base import StrictModel
from decode_accel.errors import DecodeAccelError

logger = logging.getLogger("decode_accel.training")

PRECISIONS = ("no", "bf16", "fp16", "fp8")

__all__ = ["TrainerSettings", "make_settings", "resolve_mixed_precision", "build_optimizer", "make_accelerator",
           "PRECISIONS"]


class TrainerSettings(StrictModel):
    """Every run setting of a trainer, validated (unknown names and impossible values are one-line errors).

    ``BaseTrainer(..., settings=TrainerSettings(...))`` or the same names as keywords
    (``BaseTrainer(..., cpu=True, seed=3)``); ``train(loader, epochs=5, save_dir=...)`` overrides them
    for that fit. ``builders.build_trainer`` fills them from a ``TrainingConfig``.
    """

    # the loop
    epochs: int = Field(1, ge=1, description="epochs to train (count)")
    steps_per_epoch: Optional[int] = Field(
        None, ge=1, description="micro-batches per epoch (count); required for an endless simulated stream; "
                                "default: the whole map-style loader")
    accumulate_grad_batches: int = Field(1, ge=1, description="micro-batches per optimizer update (count)")
    gradient_clip_val: float = Field(0.0, ge=0, description="clip the global gradient L2 norm to this; 0 = off")
    validate_every: int = Field(1, ge=1, description="validate every N epochs, and after the last (epochs)")
    val_steps: Optional[int] = Field(None, ge=1, description="validation batches per validation (count); "
                                                             "default: the whole validation loader")
    early_stopping_patience: Optional[int] = Field(
        None, ge=1, description="stop after N validations without improvement of monitor_metric (count)")
    # logging
    log_every: int = Field(50, ge=1, description="batch metrics to the monitor every N optimizer updates")
    plot_every: Optional[int] = Field(None, ge=1, description="training-curve and prediction plots every N "
                                                              "epochs, with a monitor (epochs)")
    # checkpoints and export
    save_dir: Optional[str] = Field(None, description="folder of the step-N checkpoints; None = no checkpoints")
    save_every: int = Field(1, ge=1, description="checkpoint every N epochs, and after the last (epochs)")
    save_every_n_steps: Optional[int] = Field(None, ge=1, description="also checkpoint every N updates (updates)")
    save_top_k: int = Field(3, ge=0, description="keep the k best checkpoints by monitor_metric (count)")
    save_last: bool = Field(True, description="always keep the most recent checkpoint (the one to resume from)")
    monitor_metric: str = Field("val_loss", description="metric ranking checkpoints and driving early stopping")
    mode: Literal["min", "max"] = Field("min", description="min: lower monitor_metric is better")
    resume: bool = Field(False, description="continue from the last complete checkpoint in save_dir")
    export_dir: Optional[str] = Field(None, description="export folder written after the fit; default "
                                                        "save_dir/export when the simulation config is known")
    # the process
    seed: int = Field(0, ge=0, description="base random seed (per-process streams derive theirs from it)")
    cpu: bool = Field(False, description="force the CPU; needed for multi-process CPU training")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (sets the "
                                                            "model's flag)")
    compile: bool = Field(False, description="torch.compile the prepared model")
    px_size_nm: Optional[float] = Field(None, gt=0, description="pixel size of the validation tables (nm); "
                                                                "default the postprocessor's")
    sync_every: Optional[int] = Field(
        None, ge=1, description="with several processes: optimizer updates between agreements on stop requests "
                                "(updates); default 1 on the CPU (an all-reduce is nothing next to a CPU update, "
                                "and a pre-emption grace period is short), 16 on accelerators")

    @field_validator("save_dir", "export_dir", mode="before")
    @classmethod
    def _path(cls, value):
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    def updated(self, **changes) -> "TrainerSettings":
        """A validated copy with ``changes`` applied (one-line error naming the field)."""
        return make_settings(self, **changes)


def make_settings(base: "TrainerSettings | dict | None" = None, **changes) -> TrainerSettings:
    """``TrainerSettings`` from a base (settings or dict) and keyword changes; one-line error when invalid."""
    data = base.model_dump() if isinstance(base, TrainerSettings) else dict(base or {})
    data.update(changes)
    try:
        return TrainerSettings.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        name = ".".join(str(p) for p in e["loc"]) or "settings"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(name, list(TrainerSettings.model_fields), n=1)
            raise DecodeAccelError(f"unknown trainer argument {name!r}", field=name,
                                   fix=f"did you mean {close[0]!r}?" if close else
                                   "see decode_accel.training.settings.TrainerSettings for the accepted names") from None
        raise DecodeAccelError(f"{e['msg']} (got {e.get('input')!r})", field=name,
                               fix="see decode_accel.training.settings.TrainerSettings") from None


def resolve_mixed_precision(mixed_precision: str | bool | None, cpu: bool) -> str | None:
    """The Accelerator's ``mixed_precision`` argument.

    True -> bf16 on a GPU, "no" on the CPU (bf16 autocast is ~10x slower on CPUs without bf16 units);
    False -> "no"; None -> the launcher's setting (``ACCELERATE_MIXED_PRECISION``) if any, else fp32 on
    the CPU and bf16 on a GPU; a string is passed on.
    """
    gpu = torch.cuda.is_available() and not cpu
    if mixed_precision is None:
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            return None
        return "bf16" if gpu else "no"
    if mixed_precision is True:
        return "bf16" if gpu else "no"
    if mixed_precision is False:
        return "no"
    if mixed_precision not in PRECISIONS:
        raise DecodeAccelError(f"unknown mixed_precision {mixed_precision!r}", field="mixed_precision",
                               fix=f"use one of {', '.join(PRECISIONS)}")
    return mixed_precision


#: optimizers whose fused CUDA kernel (one launch for all parameters instead of several per tensor) the
#: trainer takes by default on a GPU
FUSED_ON_CUDA = ("Adam", "AdamW")


def build_optimizer(params, optimizer_config: dict, device: str | torch.device | None = None) -> torch.optim.Optimizer:
    """``{'type': 'AdamW', 'lr': 1e-3, 'weight_decay': 1e-4, 'amsgrad': True}`` -> a torch optimizer.

    ``type`` is any ``torch.optim`` class name (Adam, AdamW, SGD, RMSprop, ...); the other keys are its
    keyword arguments (``learning_rate`` is accepted for ``lr``). On a CUDA ``device``, Adam and AdamW
    are fused unless the config says ``fused`` or ``foreach`` itself.
    """
    cfg = dict(optimizer_config)
    kind = cfg.pop("type", "AdamW")
    if "learning_rate" in cfg and "lr" not in cfg:
        cfg["lr"] = cfg.pop("learning_rate")
    cfg.update(cfg.pop("kwargs", None) or {})
    if "betas" in cfg and cfg["betas"] is not None:
        cfg["betas"] = tuple(cfg["betas"])
    cfg = {k: v for k, v in cfg.items() if v is not None}
    if (device is not None and torch.device(device).type == "cuda" and kind in FUSED_ON_CUDA
            and "fused" not in cfg and "foreach" not in cfg):
        cfg["fused"] = True
    cls = getattr(torch.optim, str(kind), None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise DecodeAccelError(f"unknown optimizer type {kind!r}", field="optimizer.type",
                               fix="use a torch.optim class name such as Adam, AdamW or SGD")
    try:
        return cls(params, **cfg)
    except (TypeError, ValueError) as err:
        raise DecodeAccelError(f"cannot build {kind}: {err}", field="optimizer", fix=f"check the {kind} arguments") \
            from None


def make_accelerator(device: str | torch.device | None = None, mixed_precision: str | bool | None = None,
                     cpu: bool = False) -> Accelerator:
    """The Accelerator for ``device`` (None, 'cpu', 'cuda' or 'cuda:N') and ``mixed_precision``.

    'cuda:N' selects GPU N for a single-process run; a multi-process run takes its GPUs from the
    launcher (``accelerate launch --gpu_ids``, ``CUDA_VISIBLE_DEVICES``). 'cuda' without a GPU falls
    back to the CPU with a warning; any other device is a one-line error.
    """
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise DecodeAccelError(f"unknown device {device!r}", field="device", fix="use 'cpu', 'cuda' or 'cuda:N'") \
                from None
        if dev.type not in ("cpu", "cuda"):
            raise DecodeAccelError(f"device {device!r} is not supported", field="device",
                                   fix="use 'cpu', 'cuda' or 'cuda:N'")
        if dev.type == "cpu":
            cpu = True
        elif not torch.cuda.is_available():
            logger.warning("device=%r requested but CUDA is not available; training on the CPU", str(device))
            cpu = True
        elif dev.index is not None and not cpu:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise DecodeAccelError(f"device={str(device)!r} names one GPU but this run has several processes",
                                       field="device", fix="pass device='cuda' and choose the GPUs with "
                                                           "accelerate launch --gpu_ids or CUDA_VISIBLE_DEVICES")
            if dev.index >= torch.cuda.device_count():
                raise DecodeAccelError(f"device={str(device)!r} but only {torch.cuda.device_count()} GPU(s) are "
                                       f"visible", field="device", fix="use an index below the GPU count")
            torch.cuda.set_device(dev.index)  # the Accelerator of a single process uses the current GPU
    try:
        return Accelerator(cpu=cpu, mixed_precision=resolve_mixed_precision(mixed_precision, cpu),
                           dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, dispatch_batches=False))
    except ValueError as err:
        raise DecodeAccelError(str(err).splitlines()[0], field="mixed_precision/cpu",
                               fix="one process can hold one Accelerator setting; restart the "
                                   "interpreter or pass the same values") from None
