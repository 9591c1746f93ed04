"""The sections of the training config: one pydantic model per concern, composed by ``TrainingConfig``.

Every field states its unit in its description (``reference.config_reference_markdown`` turns them into
the README's table). Loading files and overrides is :mod:`.loader`.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from typing import Any, Literal, Optional

import torch
from pydantic import AliasChoices, BaseModel, Field, ValidationError, field_validator, model_validator

from decode_accel.config_base import StrictModel
from decode_accel.data.stream import apply_overrides
from decode_accel.errors import DecodeAccelError
from decode_accel.models.config import ARCHITECTURES, ModelConfig
from decode_accel.models.scaling import Scaling
from decode_accel.simulation.config import SimulationConfig
from decode_accel.training.config.dicts import flatten_dict


def _suggest(word: str, candidates) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or '' when nothing is close."""
    by_lower = {str(c).lower(): str(c) for c in candidates}
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean '{by_lower[close[0]]}'?)" if close else ""


def _first_error(err: Exception) -> str:
    """The first problem of a validation error as ``field: message`` (one line)."""
    if isinstance(err, ValidationError) and err.errors():
        e = err.errors()[0]
        return f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
    return str(err).splitlines()[0]


def _init_params(fn) -> tuple[set[str], set[str]]:
    """(all keyword names, required names) of a constructor, without ``self``/``params``/``optimizer``."""
    sig = inspect.signature(fn)
    names, required = set(), set()
    for name, p in sig.parameters.items():
        if name in ("self", "params", "optimizer") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        names.add(name)
        if p.default is inspect.Parameter.empty:
            required.add(name)
    return names, required



class DataConfig(StrictModel):
    """Where training samples come from and how they are batched."""

    batch_size: int = Field(64, ge=1, description="samples (3-frame windows) per batch per process (count)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per training process (count)")
    samples_per_epoch: Optional[int] = Field(
        10000, ge=1, description="training samples per epoch (count); ignored when steps_per_epoch is set")
    steps_per_epoch: Optional[int] = Field(
        None, ge=1, description="optimizer steps per epoch (count); null derives it from samples_per_epoch")
    val_samples: int = Field(512, ge=0, description="validation samples, simulated once with a fixed seed (count)")
    data_path: Optional[str] = Field(
        None, description="HDF5 training file; null simulates frames on the fly from the simulation section")
    val_data_path: Optional[str] = Field(
        None, description="HDF5 validation file; null simulates the validation set")
    label_photon_min: Optional[float] = Field(
        None, ge=0, description="emitter-frames with fewer photons are left out of the targets (photons); null uses "
                                "simulation.emitters.label_min_photons (also for HDF5 data)")
    sim_device: str = Field(
        "auto", description="device of the on-the-fly simulator: 'auto' (the GPU when one is present and "
                            "num_workers is 0, else the CPU), 'cpu', 'cuda' or 'cuda:N' (-)")

    @model_validator(mode="after")
    def _epoch_length(self) -> "DataConfig":
        if self.samples_per_epoch is None and self.steps_per_epoch is None:
            raise ValueError("give samples_per_epoch or steps_per_epoch")
        if not (self.sim_device in ("auto", "cpu") or self.sim_device.startswith("cuda")):
            raise ValueError(f"data.sim_device {self.sim_device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.sim_device.startswith("cuda") and self.num_workers:
            raise ValueError("data.sim_device 'cuda' simulates in the training process: set data.num_workers 0")
        return self

    def resolved_sim_device(self) -> str:
        """The simulator's device: 'auto' is 'cuda' when a GPU is present and num_workers is 0, else 'cpu'."""
        if self.sim_device != "auto":
            return self.sim_device
        return "cuda" if torch.cuda.is_available() and self.num_workers == 0 and self.data_path is None else "cpu"

    def label_min_photons(self, simulation: Any = None) -> float:
        """The label photon threshold (photons): this section's value, else the simulation's, else 0."""
        if self.label_photon_min is not None:
            return self.label_photon_min
        emitters = getattr(simulation, "emitters", None)
        return float(getattr(emitters, "label_min_photons", 0.0))

    def epoch_steps(self, accumulate_grad_batches: int = 1, num_processes: int = 1) -> int:
        """Optimizer updates per epoch (count), from ``steps_per_epoch`` or ``samples_per_epoch``."""
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        per_update = self.batch_size * accumulate_grad_batches * num_processes
        return max(1, -(-self.samples_per_epoch // per_update))


class LossConfig(StrictModel):
    """Which loss to train with and the initial weight of each of its terms."""

    type: Literal["GaussianMM", "Unified", "RatioGaussianNLL"] = Field(
        "GaussianMM", description="GaussianMM (single channel), Unified or RatioGaussianNLL (two-channel)")
    weights: dict[str, float] = Field(
        default_factory=dict, description="initial weight per loss term name, e.g. {count: 1, bg: 1} (dimensionless)")

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, w in v.items() if not w >= 0]
        if bad:
            raise ValueError(f"loss weights must be >= 0, got {', '.join(f'{k}={v[k]}' for k in bad)}")
        return v


_OPTIMIZER_FIELDS = ("type", "lr", "weight_decay", "betas", "amsgrad", "momentum", "eps", "kwargs")


class OptimizerConfig(StrictModel):
    """A ``torch.optim`` optimizer. Keys other than the named fields go to its constructor (checked by name)."""

    type: str = Field("AdamW", description="name of a torch.optim optimizer, e.g. AdamW, Adam, SGD")
    lr: float = Field(2e-4, gt=0, description="learning rate (dimensionless)")
    weight_decay: float = Field(0.1, ge=0, description="weight decay (dimensionless)")
    betas: Optional[tuple[float, float]] = Field(
        None, description="Adam-family (beta1, beta2) in [0, 1); null keeps torch's default")
    amsgrad: Optional[bool] = Field(None, description="AMSGrad variant (Adam family); null keeps torch's default")
    momentum: Optional[float] = Field(None, ge=0, description="momentum (SGD, RMSprop); null keeps torch's default")
    eps: Optional[float] = Field(None, gt=0, description="numerical epsilon; null keeps torch's default")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="further constructor arguments of the optimizer (checked by name)")

    @model_validator(mode="before")
    @classmethod
    def _gather_extra_kwargs(cls, data: Any) -> Any:
        # The seed's examples write optimizer arguments flat ({'type': 'AdamW', 'amsgrad': True, ...}).
        if isinstance(data, dict):
            extra = {k: v for k, v in data.items() if k not in _OPTIMIZER_FIELDS}
            if extra:
                data = {k: v for k, v in data.items() if k in _OPTIMIZER_FIELDS}
                data["kwargs"] = {**extra, **dict(data.get("kwargs") or {})}
        return data

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v):
        if v is not None and not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {tuple(v)}")
        return v

    @model_validator(mode="after")
    def _check_against_torch(self) -> "OptimizerConfig":
        cls_ = getattr(torch.optim, self.type, None)
        if not (inspect.isclass(cls_) and issubclass(cls_, torch.optim.Optimizer)):
            names = [n for n in dir(torch.optim) if inspect.isclass(getattr(torch.optim, n))
                     and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer"]
            raise ValueError(f"unknown optimizer type '{self.type}'{_suggest(self.type, names)}")
        accepted, _ = _init_params(cls_.__init__)
        problems = []
        for name in ("betas", "amsgrad", "momentum", "eps"):
            if getattr(self, name) is not None and name not in accepted:
                problems.append(f"{self.type} takes no '{name}'")
        for name in self.kwargs:
            if name not in accepted:
                problems.append(f"{self.type} takes no '{name}'{_suggest(name, accepted)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return getattr(torch.optim, self.type)

    def torch_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the optimizer's constructor (None fields left to torch's defaults)."""
        kw: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        for name in ("betas", "amsgrad", "momentum", "eps"):
            if getattr(self, name) is not None:
                kw[name] = tuple(self.betas) if name == "betas" else getattr(self, name)
        kw.update(self.kwargs)
        return kw

    def build(self, params) -> torch.optim.Optimizer:
        """The optimizer over ``params``."""
        return self.optimizer_class()(params, **self.torch_kwargs())


SCHEDULER_TYPES = ("StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "OneCycleLR",
                   "ReduceLROnPlateau", "none")
_SCHEDULER_FIELDS = ("type", "kwargs", "warmup_steps", "interval")
# Arguments the trainer fills in from the run when the user leaves them out (schedule lengths, peak lr).
_DERIVED_SCHEDULER_ARGS = {"CosineAnnealingLR": {"T_max"}, "OneCycleLR": {"max_lr", "total_steps", "epochs",
                                                                           "steps_per_epoch"}}


class SchedulerConfig(StrictModel):
    """A ``torch.optim.lr_scheduler`` schedule. Keys other than the named fields go to its constructor."""

    type: Literal["StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "OneCycleLR",
                  "ReduceLROnPlateau", "none"] = Field("StepLR", description="learning-rate schedule; none keeps lr fixed")
    kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"step_size": 10, "gamma": 0.9},
        description="constructor arguments of the schedule, e.g. step_size (epochs or steps, see interval), gamma")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr over this many optimizer updates (count)")
    interval: Optional[Literal["epoch", "step"]] = Field(
        None, description="step the schedule per epoch or per optimizer update; null: per update for OneCycleLR, "
                          "per validation for ReduceLROnPlateau, else per epoch")

    @model_validator(mode="before")
    @classmethod
    def _gather_extra_kwargs(cls, data: Any) -> Any:
        if isinstance(data, dict):
            extra = {k: v for k, v in data.items() if k not in _SCHEDULER_FIELDS}
            if extra or ("type" in data and "kwargs" not in data):
                # A schedule that names its type brings all its arguments (torch defaults fill the rest);
                # without a type the user tweaks the default StepLR, so its arguments stay.
                start = {} if "type" in data else cls.model_fields["kwargs"].default_factory()
                data = {k: v for k, v in data.items() if k in _SCHEDULER_FIELDS}
                data["kwargs"] = {**start, **extra, **dict(data.get("kwargs") or {})}
        return data

    @model_validator(mode="after")
    def _check_against_torch(self) -> "SchedulerConfig":
        if self.type == "none":
            if self.kwargs:
                raise ValueError(f"scheduler type 'none' takes no arguments, got {sorted(self.kwargs)}")
            return self
        accepted, required = _init_params(getattr(torch.optim.lr_scheduler, self.type).__init__)
        problems = [f"{self.type} takes no '{k}'{_suggest(k, accepted)}" for k in self.kwargs if k not in accepted]
        missing = required - set(self.kwargs) - _DERIVED_SCHEDULER_ARGS.get(self.type, set())
        if missing:
            problems.append(f"{self.type} needs {', '.join(sorted(missing))}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def step_interval(self) -> str:
        """'step' (per optimizer update), 'epoch', or 'validation' (ReduceLROnPlateau on the monitored metric)."""
        if self.interval is not None:
            return self.interval
        if self.type == "OneCycleLR":
            return "step"
        if self.type == "ReduceLROnPlateau":
            return "validation"
        return "epoch"


class RegularizationConfig(StrictModel):
    """Regularisation of the network."""

    dropout: Optional[float] = Field(
        None, ge=0, lt=1, description="dropout probability in the U-Nets; when set it is used as model.dropout")
    weight_decay: Optional[float] = Field(
        None, ge=0, description="weight decay; when set it is used as optimizer.weight_decay (dimensionless)")
    batch_norm: Optional[bool] = Field(
        None, description="batch normalisation in the U-Nets; true sets model.norm to batch, false to none")


class TrainingStrategyConfig(StrictModel):
    """How the optimisation runs: length, precision, accumulation, stopping, speed-ups, seed."""

    epochs: int = Field(100, ge=1, description="training epochs (count)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="autocast precision: auto (bf16 on a GPU, fp32 on the CPU), no (fp32), bf16 or fp16; "
                            "true means bf16. bf16 is ~10x slower on CPUs without bf16 units")
    gradient_clipping: Optional[float] = Field(
        0.03, gt=0, validation_alias=AliasChoices("gradient_clipping", "gradient_clip_val"),
        description="clip the global gradient norm to this value (L2 norm); null disables")
    accumulate_grad_batches: int = Field(1, ge=1, description="micro-batches accumulated per optimizer update (count)")
    early_stopping_patience: Optional[int] = Field(
        None, ge=1, description="stop after this many validations without improvement of the monitored metric; "
                                "null never stops early")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    compile: bool = Field(False, description="torch.compile the model (long first step; pays off on GPUs)")
    channels_last: bool = Field(False, description="channels-last memory layout (faster convolutions on GPUs)")
    seed: int = Field(0, ge=0, description="base random seed; per-process and per-worker seeds derive from it")
    max_divergence_restarts: int = Field(
        5, ge=0, description="restarts from the last good checkpoint after a non-finite or exploding loss (count)")
    cpu: bool = Field(False, description="force CPU even when an accelerator exists (also enables multi-process CPU)")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _bool_precision(cls, v):
        # The seed's example writes mixed_precision: True.
        if v is True:
            return "bf16"
        if v is False or v is None:
            return "no"
        return v


_SCHEDULE_NEEDS = {
    "constant": ("value",),
    "linear": ("start_value", "end_value", "end_epoch"),
    "exponential": ("start_value", "end_value", "decay_rate"),
    "cosine": ("min_value", "max_value", "period"),
    "step": ("start_value", "end_value", "end_epoch"),
}


class TermSchedule(StrictModel):
    """The schedule of one loss-term weight over epochs (the seed's ``LossScheduler`` entries)."""

    type: Literal["constant", "linear", "exponential", "cosine", "step"] = Field(
        description="constant: value; linear/step: start_value -> end_value between start_epoch and end_epoch; "
                    "exponential: start_value -> end_value with decay_rate per epoch; cosine: between min_value and "
                    "max_value with period")
    value: Optional[float] = Field(None, ge=0, description="constant weight (dimensionless)")
    start_value: Optional[float] = Field(None, ge=0, description="weight at start_epoch (dimensionless)")
    end_value: Optional[float] = Field(None, ge=0, description="weight at end_epoch / asymptote (dimensionless)")
    start_epoch: int = Field(0, ge=0, description="epoch where the change begins (epochs)")
    end_epoch: Optional[int] = Field(None, ge=0, description="epoch where the change ends (epochs)")
    decay_rate: Optional[float] = Field(None, gt=0, description="exponential approach rate (1/epoch)")
    min_value: Optional[float] = Field(None, ge=0, description="cosine minimum (dimensionless)")
    max_value: Optional[float] = Field(None, ge=0, description="cosine maximum (dimensionless)")
    period: Optional[int] = Field(None, ge=1, description="cosine period (epochs)")

    @model_validator(mode="after")
    def _complete(self) -> "TermSchedule":
        missing = [n for n in _SCHEDULE_NEEDS[self.type] if getattr(self, n) is None]
        if missing:
            raise ValueError(f"a {self.type} schedule needs {', '.join(missing)}")
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch {self.end_epoch} < start_epoch {self.start_epoch}")
        if self.min_value is not None and self.max_value is not None and self.min_value > self.max_value:
            raise ValueError(f"min_value {self.min_value} > max_value {self.max_value}")
        return self


class LossSchedulingConfig(StrictModel):
    """Loss-weight scheduling: either one warm-up toward ``final_weights`` or per-term ``schedules``."""

    enable: bool = Field(False, description="schedule the loss-term weights")
    schedule_type: Literal["constant", "linear", "cosine", "exponential", "step"] = Field(
        "linear", description="shape of the warm-up from the loss section's weights to final_weights")
    warmup_epochs: int = Field(0, ge=0, description="epochs to reach final_weights (epochs)")
    final_weights: dict[str, float] = Field(
        default_factory=dict, description="weight per loss term at the end of the warm-up (dimensionless)")
    schedules: dict[str, TermSchedule] = Field(
        default_factory=dict, description="per-term schedules keyed by loss-term weight name (overrides final_weights)")

    @field_validator("final_weights")
    @classmethod
    def _non_negative(cls, v):
        bad = [k for k, w in v.items() if not w >= 0]
        if bad:
            raise ValueError(f"weights must be >= 0, got {', '.join(f'{k}={v[k]}' for k in bad)}")
        return v


def _seed_stage_names(stage: dict) -> dict:
    """A curriculum stage with the seed's names (``end_epoch``, ``learning_rate``) as ours (``until_epoch``,
    ``lr``), applied when a ``CurriculumStage`` is validated."""
    stage = dict(stage)
    if "end_epoch" in stage and "until_epoch" not in stage:
        stage["until_epoch"] = stage.pop("end_epoch")
    if "learning_rate" in stage and "lr" not in stage:
        stage["lr"] = stage.pop("learning_rate")
    return stage


class CurriculumStage(StrictModel):
    """One curriculum stage: settings that hold until an epoch or step is reached (the one stage type: the
    config's ``curriculum`` list, ``CurriculumHook`` and ``CurriculumTrainer`` all hold these)."""

    until_epoch: Optional[int] = Field(None, ge=1, description="the stage lasts while epoch < until_epoch (epochs)")
    until_step: Optional[int] = Field(None, ge=1, description="the stage lasts while step < until_step (updates)")
    description: str = Field("", description="shown in the log when the stage begins")
    simulation: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the simulation section, nested or dotted "
                                          "(e.g. emitters.density), same units as there")
    lr: Optional[float] = Field(None, gt=0, description="learning rate set when the stage begins")
    loss_weights: dict[str, float] = Field(
        default_factory=dict, description="loss-term weights set when the stage begins (dimensionless)")

    @model_validator(mode="before")
    @classmethod
    def _seed_names(cls, data):
        # The seed's CurriculumTrainer uses end_epoch and learning_rate.
        return _seed_stage_names(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _one_end(self) -> "CurriculumStage":
        if (self.until_epoch is None) == (self.until_step is None):
            raise ValueError("give exactly one of until_epoch and until_step")
        return self


class DistillationConfig(StrictModel):
    """Knowledge distillation from a trained teacher (an export folder or checkpoint)."""

    teacher: Optional[str] = Field(None, description="teacher model: export folder, Hub id or checkpoint; null disables")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the teacher term; (1 - alpha) weights the true loss")
    temperature: float = Field(1.0, gt=0, description="softening temperature of the detection logits (dimensionless)")


class MonitoringConfig(StrictModel):
    """Logging, validation, plots and trackers."""

    log_dir: str = Field("logs", description="folder for JSONL, TensorBoard and plots")
    log_every: int = Field(50, ge=1, description="log batch metrics every N optimizer updates (updates)")
    validate_every: int = Field(1, ge=1, description="validate every N epochs (epochs)")
    save_every: int = Field(1, ge=1, description="checkpoint every N epochs (epochs)")
    plot_every: int = Field(10, ge=1, description="plot curves and predictions every N epochs (epochs)")
    use_tensorboard: bool = Field(True, description="write TensorBoard event files")
    use_wandb: bool = Field(False, description="log to Weights & Biases (WANDB_MODE=offline works without network)")
    wandb_project: Optional[str] = Field(None, description="W&B project name")


class CheckpointingConfig(StrictModel):
    """Checkpoint folder and which checkpoints to keep."""

    save_dir: str = Field("checkpoints", description="folder of the step-N checkpoint folders")
    save_top_k: int = Field(3, ge=0, description="keep the k best checkpoints by monitor_metric (count)")
    monitor_metric: str = Field("val_loss", description="metric that ranks checkpoints and drives early stopping")
    mode: Literal["min", "max"] = Field("min", description="min: lower monitor_metric is better; max: higher")
    save_last: bool = Field(True, description="always keep the most recent checkpoint (for resuming)")


class OperatingPointConfig(StrictModel):
    """What is chosen after training and stored in the export (``decode_accel.pipeline.choose_operating_point``):
    the detection threshold and the probability calibration, fitted on a simulated tuning movie, and the
    position corrections fitted on a movie of the training physics."""

    enable: bool = Field(True, description="choose the operating point after training; false skips it (for very "
                                           "quick runs): the export then keeps the post-processor's default "
                                           "threshold and the network's own probabilities")
    frames: Optional[int] = Field(None, ge=1, description="frames of the 64 x 64 px tuning movie (count); null: "
                                                          "enough for about 2000 true emitter-frames (100 to 500)")
    equalisation_emitter_frames: Optional[int] = Field(
        None, ge=2000, description="true emitter-frames of the movie of the training physics that the position "
                                   "corrections (sub-pixel equalisation, border maps, z calibration) are fitted "
                                   "on (count); null: 40000, about a minute of inference. A held-out movie with "
                                   "more positions than this resolves the fit's own noise as a ripple: use "
                                   "several times the positions you will judge gridding on")
    simulation: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the simulation section for the tuning movie, nested or "
                                          "dotted (e.g. emitters.density): the physics the model is meant for "
                                          "when it trains on raised physics; empty: the training physics")


_SHORTCUTS = {"epochs": ("training_strategy", "epochs"), "batch_size": ("data", "batch_size"),
              "learning_rate": ("optimizer", "lr")}


def _shortcut(name: str) -> property:
    """The property ``TrainingConfig.<name>``: reads and writes the section field of :data:`_SHORTCUTS`."""
    section, field = _SHORTCUTS[name]
    return property(lambda self: getattr(getattr(self, section), field),
                    lambda self, value: setattr(getattr(self, section), field, value),
                    doc=f"``{section}.{field}`` (a top-level shortcut)")


class TrainingConfig(StrictModel):
    """Everything a training run needs, as one validated tree.

    ``epochs``, ``batch_size`` and ``learning_rate`` are accepted as top-level shortcuts for
    ``training_strategy.epochs``, ``data.batch_size`` and ``optimizer.lr`` (and readable as properties).
    """

    model: ModelConfig = Field(default_factory=ModelConfig, description="network architecture")
    simulation: SimulationConfig = Field(default_factory=SimulationConfig,
                                         description="emitters, PSF, background and camera of the training data")
    data: DataConfig = Field(default_factory=DataConfig, description="data source and batching")
    loss: LossConfig = Field(default_factory=LossConfig, description="loss function and term weights")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="optimizer")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="learning-rate schedule")
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig, description="regularisation")
    training_strategy: TrainingStrategyConfig = Field(default_factory=TrainingStrategyConfig,
                                                      description="length, precision, accumulation, stopping")
    loss_scheduling: LossSchedulingConfig = Field(default_factory=LossSchedulingConfig,
                                                  description="loss-weight schedules")
    curriculum: list[CurriculumStage] = Field(default_factory=list, description="curriculum stages in order")
    distillation: DistillationConfig = Field(default_factory=DistillationConfig, description="teacher distillation")
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig, description="logging and plots")
    checkpointing: CheckpointingConfig = Field(default_factory=CheckpointingConfig, description="checkpoints")
    operating_point: OperatingPointConfig = Field(default_factory=OperatingPointConfig,
                                                  description="threshold, probability calibration and position "
                                                              "corrections chosen after training")

    @model_validator(mode="before")
    @classmethod
    def _shortcuts(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for short, (section, field) in _SHORTCUTS.items():
            if short not in data:
                continue
            value = data.pop(short)
            sec = data.get(section)
            sec = dict(sec) if isinstance(sec, dict) else ({} if sec is None else sec)
            if isinstance(sec, dict):
                if field in sec and sec[field] != value:
                    raise ValueError(f"{short}={value!r} conflicts with {section}.{field}={sec[field]!r}; give one")
                sec[field] = value
                data[section] = sec
            elif hasattr(sec, "model_copy"):  # a section object was passed: set on a copy
                data[section] = sec.model_copy(update={field: value})
            else:
                raise ValueError(f"{section} must be a mapping of settings to hold {short}, got {type(sec).__name__}")
        return data

    @model_validator(mode="after")
    def _cross_section(self) -> "TrainingConfig":
        problems = []
        wd = self.regularization.weight_decay
        if wd is not None:
            if "weight_decay" in self.optimizer.model_fields_set and self.optimizer.weight_decay != wd:
                problems.append(f"regularization.weight_decay={wd} conflicts with optimizer.weight_decay="
                                f"{self.optimizer.weight_decay}; give one")
            elif self.optimizer.weight_decay != wd:
                object.__setattr__(self.optimizer, "weight_decay", wd)
        for key in ("until_epoch", "until_step"):
            ends = [getattr(s, key) for s in self.curriculum if getattr(s, key) is not None]
            if any(b <= a for a, b in zip(ends, ends[1:])):
                problems.append(f"curriculum {key} values must increase from stage to stage, got {ends}")
        n_model = self.model.channels or (2 if self.model.architecture == "DoubleMUNet" else 1)
        n_sim = self.simulation.channels.n_channels
        if n_model != n_sim:
            problems.append(f"model.architecture {self.model.architecture} reads {n_model} channel(s) but "
                            f"simulation.channels.n_channels is {n_sim}; make them equal")
        if self.loss.type == "GaussianMM" and n_model == 2:
            problems.append("loss.type GaussianMM is single-channel but the model reads 2 channels; use Unified or "
                            "RatioGaussianNLL")
        problems += self._frame_size_problems()
        cam = self.simulation.camera
        if self.model.variance_input and (cam.kind != "scmos" or not (cam.scmos_variance_map or cam.scmos_maps)):
            problems.append(f"model.variance_input needs an sCMOS camera with a per-pixel variance map, but "
                            f"simulation.camera is kind {cam.kind} without one; give simulation.camera.kind: scmos "
                            "with scmos_variance_map (or scmos_maps), or set model.variance_input: false")
        if self.model.variance_input and (self.data.data_path or self.data.val_data_path):
            problems.append("model.variance_input needs on-the-fly simulation (a data file does not say where on the "
                            "chip its frames lie); set data.data_path: null or model.variance_input: false")
        # regularization / training_strategy settings that the network implements
        reg = self.regularization
        if reg.dropout is not None:
            if self.model.dropout is None:
                self.model.dropout = reg.dropout
            elif self.model.dropout != reg.dropout:
                problems.append(f"regularization.dropout={reg.dropout} conflicts with model.dropout="
                                f"{self.model.dropout}; give one")
        if reg.batch_norm is not None:
            wanted = "batch" if reg.batch_norm else "none"
            if self.model.norm is None:
                self.model.norm = wanted
            elif (self.model.norm == "batch") != reg.batch_norm:
                problems.append(f"regularization.batch_norm={str(reg.batch_norm).lower()} conflicts with "
                                f"model.norm={self.model.norm!r}; give one")
        # The network's input/output ranges follow the simulated physics (DECODE's auto-scaling) except
        # for the scaling fields given explicitly; with DECODE's 10k-photon defaults a 2k-photon
        # scenario would use a fifth of the photon head.
        given = self.model.scaling.model_fields_set if "scaling" in self.model.model_fields_set else set()
        try:
            auto = self.auto_scaling()
        except (ValidationError, ValueError, KeyError, DecodeAccelError):
            auto = None  # a curriculum problem, reported above; keep the defaults
        if auto is not None and len(given) < len(type(auto).model_fields):
            merged = auto.model_copy(update={k: getattr(self.model.scaling, k) for k in given})
            object.__setattr__(self.model, "scaling", merged)
        if self.training_strategy.gradient_checkpointing and not self.model.gradient_checkpointing:
            self.model.gradient_checkpointing = True
        if self.curriculum:
            for i, stage in enumerate(self.curriculum):
                if stage.simulation:
                    try:
                        self.simulation_for_stage(i)
                    except (ValidationError, ValueError, KeyError, DecodeAccelError) as err:
                        problems.append(f"curriculum.{i}.simulation does not fit the simulation section: "
                                        f"{_first_error(err)}")
        if self.operating_point.simulation:
            try:
                self.tuning_simulation()
            except (ValidationError, ValueError, KeyError, DecodeAccelError) as err:
                problems.append(f"operating_point.simulation does not fit the simulation section: "
                                f"{_first_error(err)}")
        if problems:  # one per line: load_config reports each on its own line
            raise ValueError("\n".join(problems))
        return self

    def _frame_size_problems(self) -> list[str]:
        """The U-Net halves the frames ``depth`` times: simulated frames (of the simulation section and of
        every curriculum stage) must have a height and width that are multiples of 2**depth."""
        depth = self.model.model_kwargs().get("depth")
        if depth is None:  # the class default (DECODE's 2)
            depth = inspect.signature(ARCHITECTURES[self.model.architecture]).parameters["depth"].default
        multiple = 2 ** int(depth)
        origin = f"model.depth={depth}" if self.model.depth is not None else \
            (f"depth {depth} of model.preset={self.model.preset}" if self.model.preset else f"depth {depth}")
        sections = [("simulation", self.simulation.frame)]
        for i, stage in enumerate(self.curriculum):
            if stage.simulation:
                try:
                    sections.append((f"curriculum.{i}.simulation", self.simulation_for_stage(i).frame))
                except (ValidationError, ValueError, KeyError, DecodeAccelError):
                    pass  # reported with the other curriculum problems
        problems = []
        for prefix, frame in sections:
            for name in ("height", "width"):
                value = getattr(frame, name)
                if value % multiple:
                    lower, upper = value - value % multiple, value - value % multiple + multiple
                    choices = f"{lower} or {upper}" if lower > 0 else f"{upper}"
                    problems.append(f"{prefix}.frame.{name}={value} is not a multiple of {multiple} (2**depth, "
                                    f"{origin}: the U-Net halves the frames {depth} times); use {choices}")
        return problems

    def auto_scaling(self):
        """``model.scaling`` derived from the simulation (and every curriculum stage): DECODE's rules."""
        sims = [self.simulation] + [self.simulation_for_stage(i) for i in range(len(self.curriculum))]
        photons_mean = max(s.emitters.photons_mean for s in sims)
        photons_sd = max(s.emitters.photons_sd for s in sims)
        z_extent = max(max(abs(v) for v in s.emitters.z_range) for s in sims)
        ranges = []
        for s in sims:
            ranges += list(s.channels.background or [s.background.uniform])
        bg_low, bg_high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        base = list(self.simulation.channels.background or [self.simulation.background.uniform])
        bg_mean = sum((r[0] + r[1]) / 2 for r in base) / len(base)
        return Scaling.auto(photons_mean, photons_sd, z_extent, (bg_low, bg_high), bg_mean=bg_mean)

    def simulation_with(self, overrides: dict, where: str = "simulation overrides"):
        """The simulation section with ``overrides`` (nested or dotted, or the stream's short names such as
        ``density``) applied, validated: read as the training stream reads a curriculum stage
        (``data.stream.apply_overrides``); ``where`` names them in errors."""
        return apply_overrides(self.simulation, flatten_dict(overrides), where=where)

    def simulation_for_stage(self, index: int):
        """The simulation section with curriculum stage ``index``'s overrides applied (validated)."""
        return self.simulation_with(self.curriculum[index].simulation, where=f"curriculum.{index}.simulation")

    def tuning_simulation(self):
        """The physics of the operating point's tuning movie: the simulation section with
        ``operating_point.simulation`` applied (validated), or None (the training physics) when that is empty."""
        return self.simulation_with(self.operating_point.simulation, where="operating_point.simulation") \
            if self.operating_point.simulation else None

    # top-level shortcuts as properties (the seed's example reads and writes them)
    epochs = _shortcut("epochs")
    batch_size = _shortcut("batch_size")
    learning_rate = _shortcut("learning_rate")

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-able data (what ``save_config`` writes)."""
        return self.model_dump(mode="json")

    def flat_dict(self) -> dict[str, Any]:
        """The config flattened to dotted keys with scalar values (for TensorBoard/W&B hparams)."""
        return flatten_dict(self.to_dict(), scalars=True)


def inner_model(annotation):
    """The BaseModel inside Optional[...] / list[...] / dict[str, ...] annotations, else the annotation."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        inner = inner_model(arg)
        if inspect.isclass(inner) and issubclass(inner, BaseModel):
            return inner
    return annotation
