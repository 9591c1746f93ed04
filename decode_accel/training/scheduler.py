"""Schedules driven by explicit counters: loss-term weights per epoch and the learning rate per update.

``LossScheduler`` maps an epoch (may be fractional) to a dict of loss-term weights, e.g.
``{"ratio_weight": 0.45, "conservation_weight": 0.02}``, which the trainer feeds to
``loss_fn.update_weights(**weights)`` (see ``LossSchedulerHook`` in ``hooks.py``). Each term has its
own schedule, validated by a pydantic model per schedule type::

    constant     {"type": "constant", "value": 1.0}
    linear       {"type": "linear", "start_value": 0.1, "end_value": 0.8, "start_epoch": 10, "end_epoch": 50}
    exponential  {"type": "exponential", "start_value": 0.01, "end_value": 0.2, "decay_rate": 0.1}
                 w(e) = end + (start - end) * exp(-decay_rate * e): approaches end_value with 1/e time 1/decay_rate epochs
    cosine       {"type": "cosine", "min_value": 0.05, "max_value": 0.15, "period": 20}
                 w(e) = min + (max - min) * (1 + cos(2 pi e / period)) / 2: starts at max_value, period in epochs
    step         {"type": "step", "values": [0.1, 0.5, 1.0], "milestones": [10, 30]}
                 values[k] from milestones[k-1] (inclusive) to milestones[k] (exclusive): multi-stage training

``build_lr_scheduler`` returns an ``LRSchedule``: the learning rate as a closed-form function of the
optimizer-update counter, stepped once per optimizer update (never once per accumulation micro-step and
never through ``accelerator.prepare``, which would step it once per process). Epoch-unit parameters
(StepLR ``step_size``, MultiStepLR ``milestones``, CosineAnnealingLR ``T_max``, ExponentialLR ``gamma``
per epoch) are converted with the number of updates per epoch, so ``interval: epoch`` (the default)
keeps DECODE's per-epoch semantics while the warmup ramps per update.
"""

from __future__ import annotations

import bisect
import math
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import Field, TypeAdapter, ValidationError, model_validator

from decode_accel.config_base import StrictModel
from decode_accel.errors import DecodeAccelError


# ----------------------------------------------------------------------------------------------
# loss-weight schedules
# ----------------------------------------------------------------------------------------------

class ConstantSchedule(StrictModel):
    """A weight that never changes."""

    type: Literal["constant"] = "constant"
    value: float = Field(1.0, ge=0, description="weight (dimensionless)")

    def __call__(self, epoch: float) -> float:
        return self.value


class LinearSchedule(StrictModel):
    """Linear ramp from ``start_value`` at ``start_epoch`` to ``end_value`` at ``end_epoch``, flat outside."""

    type: Literal["linear"] = "linear"
    start_value: float = Field(0.0, ge=0, description="weight before start_epoch (dimensionless)")
    end_value: float = Field(1.0, ge=0, description="weight from end_epoch on (dimensionless)")
    start_epoch: float = Field(0.0, ge=0, description="epoch where the ramp starts (epochs)")
    end_epoch: float | None = Field(None, ge=0, description="epoch where the ramp ends (epochs); default: total_epochs")

    @model_validator(mode="after")
    def _order(self):
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch ({self.end_epoch}) must be >= start_epoch ({self.start_epoch})")
        return self

    def __call__(self, epoch: float, total_epochs: float = 1.0) -> float:
        end = self.end_epoch if self.end_epoch is not None else total_epochs
        if epoch <= self.start_epoch or end <= self.start_epoch:
            return self.start_value if epoch < end else self.end_value
        frac = min(1.0, (epoch - self.start_epoch) / (end - self.start_epoch))
        return self.start_value + frac * (self.end_value - self.start_value)


class ExponentialSchedule(StrictModel):
    """Exponential approach from ``start_value`` (epoch 0) towards ``end_value``."""

    type: Literal["exponential"] = "exponential"
    start_value: float = Field(..., ge=0, description="weight at epoch 0 (dimensionless)")
    end_value: float = Field(..., ge=0, description="asymptotic weight (dimensionless)")
    decay_rate: float = Field(0.1, gt=0, description="rate of approach (1/epoch)")

    def __call__(self, epoch: float) -> float:
        return self.end_value + (self.start_value - self.end_value) * math.exp(-self.decay_rate * epoch)


class CosineSchedule(StrictModel):
    """Periodic cosine between ``min_value`` and ``max_value``, starting at ``max_value``."""

    type: Literal["cosine"] = "cosine"
    min_value: float = Field(0.0, ge=0, description="lowest weight (dimensionless)")
    max_value: float = Field(1.0, ge=0, description="highest weight (dimensionless)")
    period: float = Field(..., gt=0, description="period of the oscillation (epochs)")

    @model_validator(mode="after")
    def _order(self):
        if self.min_value > self.max_value:
            raise ValueError(f"min_value ({self.min_value}) must be <= max_value ({self.max_value})")
        return self

    def __call__(self, epoch: float) -> float:
        return self.min_value + (self.max_value - self.min_value) * 0.5 * (1 + math.cos(2 * math.pi * epoch / self.period))


class StepSchedule(StrictModel):
    """Piecewise-constant (multi-stage) weights: ``values[k]`` applies from ``milestones[k-1]`` on."""

    type: Literal["step", "multistage"] = "step"
    values: list[float] = Field(..., min_length=1, description="weight of each stage (dimensionless)")
    milestones: list[float] = Field(default_factory=list, description="epochs where the next stage starts (epochs)")

    @model_validator(mode="before")
    @classmethod
    def _two_stage_form(cls, data):
        # the config's TermSchedule form: start_value until end_epoch, then end_value
        if isinstance(data, dict) and "values" not in data and {"start_value", "end_value", "end_epoch"} <= set(data):
            data = dict(data)
            if data.pop("start_epoch", None) not in (None, 0, 0.0):
                raise ValueError("a step schedule switches once, at end_epoch; start_epoch has no meaning here "
                                 "(remove it, or use type linear for a ramp from start_epoch to end_epoch)")
            data["values"] = [data.pop("start_value"), data.pop("end_value")]
            data["milestones"] = [data.pop("end_epoch")]
        return data

    @model_validator(mode="after")
    def _shape(self):
        if len(self.milestones) != len(self.values) - 1:
            raise ValueError(f"needs len(values) - 1 = {len(self.values) - 1} milestones, got {len(self.milestones)}")
        if any(b < a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError("milestones must be increasing")
        if any(v < 0 for v in self.values):
            raise ValueError("values must be >= 0")
        return self

    def __call__(self, epoch: float) -> float:
        return self.values[bisect.bisect_right(self.milestones, epoch)]


WeightSchedule = Annotated[Union[ConstantSchedule, LinearSchedule, ExponentialSchedule, CosineSchedule, StepSchedule],
                           Field(discriminator="type")]
_SCHEDULE_ADAPTER = TypeAdapter(WeightSchedule)


def _one_line(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in err.errors())


class LossScheduler:
    """Loss-term weights as a function of the epoch.

    Args:
        total_epochs: length of the training (epochs); the default end of ``linear`` ramps.
        schedule_config: ``{term_name: schedule dict}`` (see the module docstring), or a number for a
            constant weight.

    ``get_weights(epoch)`` returns ``{term_name: weight}`` for ``loss_fn.update_weights(**weights)``.
    Fractional epochs are allowed (the hook evaluates at the start of every epoch).
    """

    def __init__(self, total_epochs: int, schedule_config: dict[str, Any]):
        if total_epochs is None or total_epochs <= 0:
            raise DecodeAccelError(f"total_epochs must be > 0, got {total_epochs}", field="total_epochs",
                                   fix="pass the number of training epochs")
        self.total_epochs = total_epochs
        self.schedules: dict[str, Any] = {}
        for name, spec in dict(schedule_config).items():
            if isinstance(spec, (int, float)):
                spec = {"type": "constant", "value": float(spec)}
            if isinstance(spec, dict) and "type" not in spec:
                raise DecodeAccelError("schedule has no 'type'", field=f"schedule_config.{name}",
                                       fix="use one of constant, linear, exponential, cosine, step")
            try:
                self.schedules[name] = _SCHEDULE_ADAPTER.validate_python(spec)
            except ValidationError as err:
                raise DecodeAccelError(_one_line(err), field=f"schedule_config.{name}",
                                       fix="see decode_accel.training.scheduler for the schedule types") from None

    @classmethod
    def from_config(cls, section: Any, total_epochs: int, initial_weights: dict[str, float] | None = None
                    ) -> "LossScheduler | None":
        """Build from the ``loss_scheduling`` config section (a dict or pydantic model); ``None`` when disabled.

        Accepted forms: ``{enable, schedules: {term: schedule}}`` (per-term schedules as in ``__init__``),
        or the seed's shorthand ``{enable, schedule_type, warmup_epochs, final_weights}``: every term in
        ``final_weights`` goes from its ``initial_weights`` value (the loss's weight at the start, 0 if
        unknown) to its final value over ``warmup_epochs`` with ``schedule_type`` linear, exponential
        (rate 3/warmup_epochs: 95 % of the way at warmup_epochs), cosine (half period = warmup) or step
        (switch at warmup_epochs).
        """
        data = section.model_dump() if hasattr(section, "model_dump") else dict(section or {})
        if not data.get("enable", True):
            return None
        schedules = {name: _own_fields(spec) for name, spec in (data.get("schedules") or {}).items()}
        finals = data.get("final_weights") or {}
        kind = data.get("schedule_type", "linear")
        warm = float(data.get("warmup_epochs") or 0)
        initial_weights = initial_weights or {}
        for name, final in finals.items():
            start = float(initial_weights.get(name, 0.0))
            if kind == "linear":
                schedules[name] = {"type": "linear", "start_value": start, "end_value": final, "start_epoch": 0,
                                   "end_epoch": warm}
            elif kind == "exponential":
                schedules[name] = {"type": "exponential", "start_value": start, "end_value": final,
                                   "decay_rate": 3.0 / max(warm, 1e-9)}
            elif kind == "cosine":
                schedules[name] = _HalfCosine(start, final, warm) if warm > 0 else \
                    {"type": "step", "values": [start, final], "milestones": [0.0]}
            elif kind in ("step", "multistage", "constant"):
                schedules[name] = {"type": "step", "values": [start, final], "milestones": [warm]}
            else:
                raise DecodeAccelError(f"unknown schedule_type {kind!r}", field="loss_scheduling.schedule_type",
                                       fix="use linear, exponential, cosine or step")
        if not schedules:
            return None
        obj = cls(total_epochs, {k: v for k, v in schedules.items() if not isinstance(v, _HalfCosine)})
        obj.schedules.update({k: v for k, v in schedules.items() if isinstance(v, _HalfCosine)})
        return obj

    def get_weights(self, epoch: float) -> dict[str, float]:
        """Weights of every scheduled term at ``epoch`` (dimensionless)."""
        out = {}
        for name, sched in self.schedules.items():
            if isinstance(sched, LinearSchedule):
                out[name] = float(sched(epoch, self.total_epochs))
            else:
                out[name] = float(sched(epoch))
        return out


def _own_fields(spec: dict) -> dict:
    """A config ``TermSchedule`` dump (all fields, unused ones None) reduced to its type's own fields."""
    spec = {k: v for k, v in dict(spec).items() if v is not None}
    kind = spec.get("type")
    if kind in ("step", "multistage") and "values" not in spec:
        return spec  # StepSchedule converts the start/end form itself
    cls = {"constant": ConstantSchedule, "linear": LinearSchedule, "exponential": ExponentialSchedule,
           "cosine": CosineSchedule}.get(kind)
    return {k: v for k, v in spec.items() if cls is None or k in cls.model_fields}


class _HalfCosine:
    """Cosine ramp from ``start`` to ``end`` over ``length`` epochs, then flat (the shorthand's 'cosine')."""

    def __init__(self, start: float, end: float, length: float):
        self.start, self.end, self.length = start, end, length

    def __call__(self, epoch: float) -> float:
        frac = min(1.0, max(0.0, epoch / self.length))
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * frac))


# ----------------------------------------------------------------------------------------------
# learning-rate schedules
# ----------------------------------------------------------------------------------------------

#: schedulers whose parameters are given in epochs by default (DECODE steps StepLR once per epoch)
EPOCH_UNIT_SCHEDULERS = ("StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR")


class LRSchedule:
    """The learning rate per optimizer update: warmup x (closed-form schedule | a torch scheduler).

    ``step()`` is called once per optimizer update (the trainer gates it on ``accelerator.sync_gradients``
    and on the update not being skipped). ``updates`` counts the updates done. ``ReduceLROnPlateau`` is
    not handled here but by ``ReduceLROnPlateauHook`` on the validation metric; during a warmup the
    warmup factor still applies to the plateau-reduced rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor_fn=None, torch_scheduler=None,
                 warmup_steps: int = 0, warmup_start_factor: float = 0.0):
        self.optimizer = optimizer
        self.factor_fn = factor_fn
        self.torch_scheduler = torch_scheduler
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_factor = float(warmup_start_factor)
        self.updates = 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self._apply()

    def warmup_factor(self, updates: int) -> float:
        if self.warmup_steps <= 0 or updates >= self.warmup_steps:
            return 1.0
        return self.warmup_start_factor + (1 - self.warmup_start_factor) * updates / self.warmup_steps

    def _apply(self):
        w = self.warmup_factor(self.updates)
        if self.torch_scheduler is not None:
            # the torch scheduler owns group['lr'] after warmup; during warmup we scale its value
            lrs = self.torch_scheduler.get_last_lr()
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr * w
        elif self.factor_fn is not None:
            f = self.factor_fn(self.updates)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * f * w
        elif self.warmup_steps > 0 and self.updates <= self.warmup_steps:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * w

    def step(self):
        """Advance by one optimizer update."""
        self.updates += 1
        if self.torch_scheduler is not None:
            self.torch_scheduler.step()
        self._apply()

    def set_base_lr(self, lr: float):
        """Change the base learning rate (curriculum stages); the schedule factor keeps applying."""
        self.base_lrs = [float(lr)] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = float(lr)
        if self.torch_scheduler is not None:
            self.torch_scheduler.base_lrs = list(self.base_lrs)
            self.torch_scheduler._last_lr = list(self.base_lrs)
            for group in self.optimizer.param_groups:
                group["lr"] = float(lr)
        if self.factor_fn is None and self.torch_scheduler is None:
            for group in self.optimizer.param_groups:
                group["lr"] = float(lr) * self.warmup_factor(self.updates)
        else:
            self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"updates": self.updates, "base_lrs": list(self.base_lrs),
                "torch_scheduler": self.torch_scheduler.state_dict() if self.torch_scheduler is not None else None}

    def load_state_dict(self, state: dict):
        self.updates = int(state["updates"])
        self.base_lrs = list(state["base_lrs"])
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base
        if self.torch_scheduler is not None and state.get("torch_scheduler") is not None:
            self.torch_scheduler.load_state_dict(state["torch_scheduler"])
        self._apply()


def build_lr_scheduler(optimizer: torch.optim.Optimizer, scheduler_config: dict | None, *,
                       updates_per_epoch: int, total_updates: int) -> LRSchedule | None:
    """Build the per-update learning-rate schedule from ``scheduler_config``.

    ``scheduler_config``: ``{"type": name, "interval": "epoch"|"step", "warmup_steps": n,
    "warmup_start_factor": f, **kwargs}``. Types: StepLR (step_size, gamma), MultiStepLR (milestones,
    gamma), ExponentialLR (gamma), CosineAnnealingLR (T_max, eta_min), OneCycleLR (max_lr, pct_start,
    anneal_strategy, ...; total_steps = all updates of the run), ReduceLROnPlateau (returns a warmup-only
    schedule: the plateau logic is ``ReduceLROnPlateauHook``), any other ``torch.optim.lr_scheduler``
    class (kwargs in updates), or none. ``interval`` (default epoch for the first four) says in which unit
    step_size / milestones / T_max / gamma are given; warmup_steps is always in optimizer updates.
    OneCycleLR's ``epochs`` x ``steps_per_epoch`` (optimizer updates per epoch), when given, set the cycle
    length instead of the run's length; a cycle shorter than the run is refused (torch cannot step past it).
    """
    if not scheduler_config:
        return None
    cfg = dict(scheduler_config)
    kind = cfg.pop("type", None) or "none"
    warmup = int(cfg.pop("warmup_steps", 0) or 0)
    warm_start = float(cfg.pop("warmup_start_factor", 0.0))
    interval = cfg.pop("interval", "epoch" if kind in EPOCH_UNIT_SCHEDULERS else "step")
    if interval not in ("epoch", "step"):
        raise DecodeAccelError(f"interval must be 'epoch' or 'step', got {interval!r}", field="scheduler.interval",
                               fix="use interval: epoch (parameters in epochs) or interval: step (in updates)")
    per = max(1, int(updates_per_epoch)) if interval == "epoch" else 1

    def need(key):
        if key not in cfg:
            raise DecodeAccelError(f"{kind} needs {key!r}", field=f"scheduler.{key}", fix=f"add scheduler.{key}")
        return cfg.pop(key)

    def check_empty():
        if cfg:
            raise DecodeAccelError(f"unknown option(s) for {kind}: {sorted(cfg)}", field="scheduler",
                                   fix=f"remove them or check the {kind} parameters")

    if kind.lower() in ("none", "constant"):
        check_empty()
        return LRSchedule(optimizer, warmup_steps=warmup, warmup_start_factor=warm_start) if warmup else None
    if kind == "StepLR":
        step_size, gamma = float(need("step_size")), float(cfg.pop("gamma", 0.1))
        check_empty()
        fn = lambda u: gamma ** math.floor(u / per / step_size)  # noqa: E731
    elif kind == "MultiStepLR":
        milestones, gamma = sorted(float(m) for m in need("milestones")), float(cfg.pop("gamma", 0.1))
        check_empty()
        fn = lambda u: gamma ** bisect.bisect_right(milestones, math.floor(u / per))  # noqa: E731
    elif kind == "ExponentialLR":
        gamma = float(need("gamma"))
        check_empty()
        fn = lambda u: gamma ** math.floor(u / per)  # noqa: E731
    elif kind == "CosineAnnealingLR":
        t_max, eta_min = float(need("T_max")), float(cfg.pop("eta_min", 0.0))
        check_empty()
        base = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])

        def fn(u):
            e = min(u / per, t_max)
            return (eta_min + (base - eta_min) * 0.5 * (1 + math.cos(math.pi * e / t_max))) / base
    elif kind == "ReduceLROnPlateau":
        return LRSchedule(optimizer, warmup_steps=warmup, warmup_start_factor=warm_start) if warmup else None
    else:
        cls = getattr(torch.optim.lr_scheduler, kind, None)
        if cls is None or not isinstance(cls, type):
            raise DecodeAccelError(f"unknown scheduler type {kind!r}", field="scheduler.type",
                                   fix="use StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR, OneCycleLR, "
                                       "ReduceLROnPlateau, none, or a torch.optim.lr_scheduler class name")
        if kind == "OneCycleLR":
            if "total_steps" not in cfg and ("epochs" in cfg or "steps_per_epoch" in cfg):
                if not ("epochs" in cfg and "steps_per_epoch" in cfg):
                    raise DecodeAccelError("OneCycleLR needs both epochs and steps_per_epoch, or neither",
                                           field="scheduler.epochs/steps_per_epoch",
                                           fix="give both, or leave both out to span the run's updates")
                cfg["total_steps"] = int(cfg.pop("epochs")) * int(cfg.pop("steps_per_epoch"))
            cfg.setdefault("total_steps", max(1, int(total_updates)))
            if int(cfg["total_steps"]) < int(total_updates):
                raise DecodeAccelError(f"OneCycleLR spans {cfg['total_steps']} updates but the run has {total_updates}",
                                       field="scheduler.total_steps/epochs/steps_per_epoch",
                                       fix="leave them out (the cycle then spans the run) or make the cycle as long "
                                           "as epochs x optimizer updates per epoch")
            if "max_lr" not in cfg:
                cfg["max_lr"] = [g["lr"] for g in optimizer.param_groups]
        try:
            sched = cls(optimizer, **cfg)
        except (TypeError, ValueError) as err:
            raise DecodeAccelError(f"cannot build {kind}: {err}", field="scheduler",
                                   fix=f"check the {kind} parameters") from None
        return LRSchedule(optimizer, torch_scheduler=sched, warmup_steps=warmup, warmup_start_factor=warm_start)
    return LRSchedule(optimizer, factor_fn=fn, warmup_steps=warmup, warmup_start_factor=warm_start)
