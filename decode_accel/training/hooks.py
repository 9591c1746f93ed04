"""Hooks: everything optional in training, attached to a small set of named events.

Where each event fires in ``BaseTrainer.train`` (composer-style map; ``B`` = micro-batch,
an optimizer update ("step") spans ``accumulate_grad_batches`` micro-batches)::

    on_fit_start(trainer)                          after set-up and resume, before the first epoch
    for epoch in epochs:
        on_epoch_start(trainer, epoch)
        for B in loader:
            on_step_start(trainer)                 first micro-batch of an optimizer update
            batch = on_batch(trainer, batch)       every micro-batch, on the device; may transform it
            trainer.train_step(batch):             (overridable; the default is:)
                outputs = model(batch); losses = loss_fn(outputs, batch)
                losses = on_loss(trainer, losses, outputs, batch)
                                                   every micro-batch; may change terms and 'loss', or
                                                   vote to drop this update: trainer.veto_update(flag)
                backward(losses['loss'])
                on_after_backward(trainer)         every micro-batch with a backward
                if last micro-batch of the update: votes read, clip, optimizer.step
            if an update happened: lr schedule step
                on_step_end(trainer, losses)       after each real optimizer update
        metrics = validate(val_loader)
        on_eval_end(trainer, metrics)              inside validate(), same metrics on every process
        on_epoch_end(trainer, epoch, logs)         logs = {'train_loss', ..., val metrics}
        checkpoint
    on_fit_end(trainer, history)

Registration (``trainer.add_hook``, also for the ``hooks=`` argument) checks every ``on_*`` method
against ``EVENTS``: a misspelt event is an error, not a hook that silently never runs. Adding a hook
is one step: subclass ``Hook``, override the events you need, pass it in ``hooks=``.

Every hook has ``state_dict()`` / ``load_state_dict()``; the trainer stores them in the checkpoint's
``trainer_state['hooks']`` (JSON) under the hook's stable name (``name`` attribute, default the class
name; ``#2``, ``#3`` for repeats), so a resumed run continues with the same patience counters,
curriculum stage and divergence budget, whatever the order of the hooks.

Hooks never run collectives: they set flags and the trainer agrees on them across processes.
``trainer.request_stop(reason, immediate=False, exit_code=None)`` asks to stop (at the epoch end, or
after this update); ``trainer.veto_update(flag, on_veto)`` votes to drop the update now accumulating.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections import deque
from typing import Any, Iterable

import torch
from pydantic import ValidationError

from decode_accel.errors import DecodeAccelError
from decode_accel.loss.distillation import DistillationLoss
from decode_accel.models.variance import network_input
from decode_accel.training.config.dicts import flatten_dict
from decode_accel.training.config.sections import CurriculumStage
from decode_accel.training.monitor import robust_location_scale

logger = logging.getLogger("decode_accel.training")

EVENTS = ("on_fit_start", "on_epoch_start", "on_step_start", "on_batch", "on_loss", "on_after_backward",
          "on_step_end", "on_eval_end", "on_epoch_end", "on_fit_end")


class Hook:
    """Base class: override the events you need. Transforming events return their (possibly new) value.

    ``name`` (optional class or instance attribute) is the key of the hook's state in checkpoints.
    """

    name: str | None = None

    def on_fit_start(self, trainer) -> None:
        pass

    def on_epoch_start(self, trainer, epoch: int) -> None:
        pass

    def on_step_start(self, trainer) -> None:
        pass

    def on_batch(self, trainer, batch: dict) -> dict:
        return batch

    def on_loss(self, trainer, losses: dict, outputs: dict, batch: dict) -> dict:
        return losses

    def on_after_backward(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, losses: dict) -> None:
        pass

    def on_eval_end(self, trainer, metrics: dict) -> None:
        pass

    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None:
        pass

    def on_fit_end(self, trainer, history: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """JSON-able state saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def check_hook(hook) -> None:
    """One-line error unless ``hook`` is a ``Hook`` whose ``on_*`` methods are all events of ``EVENTS``."""
    if not isinstance(hook, Hook):
        raise DecodeAccelError(f"{type(hook).__name__} is not a Hook", field="hooks",
                               fix="subclass decode_accel.training.Hook and override its on_* events")
    # the class's methods and callables set on the instance (the loop calls both the same way)
    for attr in sorted(set(dir(type(hook))) | set(getattr(hook, "__dict__", {}))):
        if attr.startswith("on_") and attr not in EVENTS and callable(getattr(hook, attr, None)):
            close = difflib.get_close_matches(attr, EVENTS, n=1)
            raise DecodeAccelError(f"{type(hook).__name__}.{attr} is not a training event", field="hooks",
                                   fix=f"rename it to {close[0]}" if close else f"events: {', '.join(EVENTS)}")


def _metric(metrics: dict, name: str) -> float | None:
    value = metrics.get(name)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` improves on ``best`` by more than ``min_delta`` (``mode`` min or max): the one rule
    of early stopping, plateau LR and ``CheckpointManager.should_stop_early``."""
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


# ----------------------------------------------------------------------------------------------
class LossSchedulerHook(Hook):
    """Feeds ``LossScheduler.get_weights(epoch)`` to ``loss_fn.update_weights`` at every epoch start."""

    def __init__(self, loss_scheduler):
        self.loss_scheduler = loss_scheduler
        self.current: dict[str, float] = {}

    def on_epoch_start(self, trainer, epoch):
        self.current = self.loss_scheduler.get_weights(epoch)
        trainer.loss_fn.update_weights(**self.current)


# ----------------------------------------------------------------------------------------------
class CurriculumHook(Hook):
    """Curriculum stages: simulation difficulty, learning rate and loss weights change stage by stage.

    ``stages``: the config's ``CurriculumStage`` models (the one stage type), or dicts of their fields
    (the seed's ``end_epoch`` and ``learning_rate`` are read as ``until_epoch`` and ``lr``): each ends at
    ``until_epoch`` or ``until_step`` (the stage lasts while epoch < until_epoch / update < until_step; the
    last stage lasts to the end) and holds ``simulation`` (overrides such as ``{"emitters.density": 0.5}``),
    ``lr``, ``loss_weights``, ``description``. The simulation overrides do not travel by messages: at fit start the hook hands
    the training stream a deterministic *difficulty schedule* (sample index -> overrides, see
    ``decode_accel.data``), so every DataLoader worker and every process computes the same stage for
    the same sample. Epoch and step ends are converted to per-process sample indices with the
    trainer's batch size and updates per epoch.
    """

    def __init__(self, stages: Iterable[Any]):
        self.stages = [_curriculum_stage(s, i) for i, s in enumerate(stages)]
        if not self.stages:
            raise DecodeAccelError("no stages", field="curriculum", fix="give at least one stage")
        self.stage = -1

    def stage_at(self, epoch: int, step: int) -> int:
        for i, s in enumerate(self.stages):
            if s.until_epoch is not None and epoch < s.until_epoch:
                return i
            if s.until_step is not None and step < s.until_step:
                return i
        return len(self.stages) - 1

    def difficulty_schedule(self, trainer) -> list[dict]:
        """Stages as ``[{"start_sample": g, "overrides": {...}}]`` in GLOBAL sample indices (all processes)."""
        world = trainer.accelerator.num_processes
        per_batch = trainer.batch_size * world
        out, start = [], 0
        for s in self.stages:
            out.append({"start_sample": int(start), "overrides": flatten_dict(s.simulation)})
            if s.until_epoch is not None:
                start = s.until_epoch * trainer.batches_per_epoch * per_batch
            else:
                start = s.until_step * trainer.accumulate_grad_batches * per_batch
        return out

    def on_fit_start(self, trainer):
        if any(s.simulation for s in self.stages):
            trainer.set_difficulty_schedule(self.difficulty_schedule(trainer))

    def _maybe_switch(self, trainer):
        stage = self.stage_at(trainer.epoch, trainer.global_step)
        if stage == self.stage:
            return
        self.stage = stage
        s = self.stages[stage]
        logger.info("curriculum stage %d begins at epoch %d, update %d: %s", stage, trainer.epoch,
                    trainer.global_step, s.description or s.simulation)
        if s.lr is not None:
            trainer.set_lr(s.lr)
        if s.loss_weights:
            trainer.loss_fn.update_weights(**s.loss_weights)

    def on_epoch_start(self, trainer, epoch):
        self._maybe_switch(trainer)

    def on_step_start(self, trainer):
        self._maybe_switch(trainer)

    def state_dict(self):
        return {"stage": self.stage}

    def load_state_dict(self, state):
        # re-apply the stage's lr and weights after a resume: set stage to -1 and let the next event switch
        self.stage = -1


def _curriculum_stage(stage: Any, index: int) -> CurriculumStage:
    """A stage (the config's ``CurriculumStage``, or a dict with our names or the seed's) as a ``CurriculumStage``."""
    if isinstance(stage, CurriculumStage):
        return stage
    try:
        return CurriculumStage.model_validate(stage.model_dump() if hasattr(stage, "model_dump") else dict(stage))
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        raise DecodeAccelError(e["msg"].removeprefix("Value error, "),
                               field=f"curriculum.{index}" + (f".{where}" if where else ""),
                               fix="a stage has until_epoch or until_step (the seed's end_epoch), and lr "
                                   "(learning_rate), loss_weights, simulation, description") from None


# ----------------------------------------------------------------------------------------------
class DistillationHook(Hook):
    """Knowledge distillation from a frozen teacher network.

    The teacher stays in eval mode with ``requires_grad=False``; it is NOT passed to
    ``accelerator.prepare`` (it has no optimizer and must not be wrapped in DDP) but moved to the
    trainer's device. At every micro-batch its output maps on the same frames guide the student
    through ``decode_accel.loss.distillation`` (detection BCE on logits + p-weighted Gaussian terms);
    the total becomes ``alpha * distillation + (1 - alpha) * ground truth``. The ground-truth total is
    kept as ``gt_loss`` and the distillation terms as ``distill_*`` for logging.
    """

    def __init__(self, teacher: torch.nn.Module, alpha: float = 0.5, temperature: float = 1.0, loss=None):
        if not 0.0 <= alpha <= 1.0:
            raise DecodeAccelError(f"alpha must be in [0, 1], got {alpha}", field="distillation.alpha",
                                   fix="0 ignores the teacher, 1 ignores the ground truth")
        if loss is None:
            loss = DistillationLoss(alpha=alpha, temperature=temperature)
        self.teacher = teacher
        self.loss = loss

    def on_fit_start(self, trainer):
        self.teacher.to(trainer.device)
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    def on_loss(self, trainer, losses, outputs, batch):
        with torch.no_grad(), trainer.accelerator.autocast():
            teacher_out = self.teacher(network_input(batch, self.teacher))
        teacher_out = {k: v.float() for k, v in teacher_out.items()}
        return self.loss.distill(outputs, teacher_out, gt_terms=losses)


# ----------------------------------------------------------------------------------------------
class EarlyStopping(Hook):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` validations.

    Validation metrics are the same on every process, and the trainer agrees on stop requests at
    every epoch end, so every rank leaves the loop at the same epoch (no collective here).
    """

    def __init__(self, patience: int, monitor: str = "val_loss", mode: str = "min", min_delta: float = 0.0):
        if patience < 1:
            raise DecodeAccelError(f"patience must be >= 1, got {patience}", field="early_stopping_patience",
                                   fix="give the number of validations without improvement")
        if mode not in ("min", "max"):
            raise DecodeAccelError(f"mode must be 'min' or 'max', got {mode!r}", field="mode", fix="use min or max")
        self.patience, self.monitor, self.mode, self.min_delta = patience, monitor, mode, min_delta
        self.best: float | None = None
        self.wait = 0

    def on_eval_end(self, trainer, metrics):
        value = _metric(metrics, self.monitor)
        if value is not None and improved(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        if self.wait >= self.patience:
            trainer.request_stop(f"early stopping: {self.monitor} did not improve for {self.patience} validations "
                                 f"(best {self.best})")

    def state_dict(self):
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.best, self.wait = state.get("best"), int(state.get("wait", 0))


# ----------------------------------------------------------------------------------------------
class ReduceLROnPlateauHook(Hook):
    """Multiply the learning rate by ``factor`` when ``monitor`` stalls for ``patience`` validations.

    Works with any per-update schedule: the reduction is applied to the schedule's base learning
    rate, so a warmup or a step schedule keeps shaping the reduced rate.
    """

    #: the scheduler_config keys of ``{'type': 'ReduceLROnPlateau', ...}`` that configure this hook
    OPTIONS = ("mode", "factor", "patience", "min_lr", "threshold", "cooldown")

    def __init__(self, monitor: str = "val_loss", mode: str = "min", factor: float = 0.5, patience: int = 10,
                 min_lr: float = 1e-7, threshold: float = 1e-4, cooldown: int = 0):
        if not 0.0 < factor < 1.0:
            raise DecodeAccelError(f"factor must be in (0, 1), got {factor}", field="scheduler.factor",
                                   fix="e.g. 0.5 halves the learning rate")
        self.monitor, self.mode, self.factor, self.patience = monitor, mode, factor, patience
        self.min_lr, self.threshold, self.cooldown = min_lr, threshold, cooldown
        self.best: float | None = None
        self.wait = 0
        self.cooldown_left = 0
        self.reductions = 0

    def on_eval_end(self, trainer, metrics):
        value = _metric(metrics, self.monitor)
        if value is None:
            return
        rel = abs(self.best) * self.threshold if self.best is not None else 0.0
        if improved(value, self.best, self.mode, rel):
            self.best, self.wait = value, 0
            return
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            return
        self.wait += 1
        if self.wait >= self.patience:
            old = trainer.get_lr()
            new = max(old * self.factor, self.min_lr)
            if new < old:
                trainer.set_lr(new)
                self.reductions += 1
                logger.info("ReduceLROnPlateau: %s stalled for %d validations, learning rate %.3g -> %.3g",
                            self.monitor, self.patience, old, new)
            self.wait, self.cooldown_left = 0, self.cooldown

    def state_dict(self):
        return {"best": self.best, "wait": self.wait, "cooldown_left": self.cooldown_left,
                "reductions": self.reductions}

    def load_state_dict(self, state):
        self.best = state.get("best")
        self.wait = int(state.get("wait", 0))
        self.cooldown_left = int(state.get("cooldown_left", 0))
        self.reductions = int(state.get("reductions", 0))


# ----------------------------------------------------------------------------------------------
class DivergenceGuard(Hook):
    """Catch non-finite or exploding losses before they reach the weights.

    A loss is *bad* when it is NaN/inf, or larger than ``spike_factor`` x the robust scale above the
    median of the last ``window`` good losses (once ``min_history`` are known). The check runs on the
    device at every micro-batch and votes through ``trainer.veto_update``; the trainer reads the votes
    once per optimizer update (no host sync per micro-batch) and every process takes the same branch.
    The history behind the spike threshold is read from the device every ``refresh_every`` updates.
    ``action='skip'`` drops the whole optimizer update (gradients cleared, optimizer untouched);
    ``action='rollback'`` also reloads the last complete checkpoint (weights and optimizer) and multiplies
    the learning rate by ``lr_factor`` (DECODE's advice after a pathological loss), falling back to skip
    when no checkpoint exists. Every event is logged; after ``max_events`` events the run stops with a
    message saying what to change.
    """

    def __init__(self, action: str = "skip", max_events: int = 3, spike_factor: float = 20.0, window: int = 50,
                 min_history: int = 10, lr_factor: float = 0.5, refresh_every: int = 10):
        if action not in ("skip", "rollback"):
            raise DecodeAccelError(f"action must be 'skip' or 'rollback', got {action!r}", field="action",
                                   fix="use skip or rollback")
        self.action, self.max_events, self.spike_factor = action, int(max_events), float(spike_factor)
        self.min_history, self.lr_factor, self.refresh_every = int(min_history), float(lr_factor), int(refresh_every)
        self.history: deque[float] = deque(maxlen=int(window))
        self.events = 0
        self.log: list[dict] = []
        self.threshold: float | None = None  # losses above it are spikes (from the history at the last refresh)
        self._pending: list = []             # good losses not yet in the history (device tensors / floats)
        self._group: list = []               # the losses of the update now accumulating

    def _is_bad(self, loss) -> tuple[bool, str]:
        """The host-side verdict on one loss value with the current history (and the reason)."""
        value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        if not math.isfinite(value):
            return True, f"non-finite loss {value}"
        if len(self.history) >= self.min_history:
            med, scale = robust_location_scale(self.history)
            if value - med > self.spike_factor * scale:
                return True, (f"loss {value:.4g} is more than {self.spike_factor:g} x {scale:.3g} above the "
                              f"running median {med:.4g}")
        return False, ""

    def on_loss(self, trainer, losses, outputs, batch):
        loss = losses["loss"].detach()
        bad = ~torch.isfinite(loss)
        if self.threshold is not None:
            bad = bad | (loss > self.threshold)
        self._group.append(loss)
        trainer.veto_update(bad, on_veto=self._vetoed)
        return losses

    def on_step_start(self, trainer):
        self._group = []

    def on_step_end(self, trainer, losses):
        self._pending += self._group
        self._group = []
        if trainer.global_step % self.refresh_every == 0:
            self._refresh()

    def _refresh(self) -> None:
        """Move the pending losses into the history (one host sync) and update the spike threshold."""
        values = [float(v) for v in self._pending if not torch.is_tensor(v)]
        tensors = [v for v in self._pending if torch.is_tensor(v)]
        if tensors:
            values += torch.stack(tensors).float().tolist()
        self._pending = []
        self.history.extend(v for v in values if math.isfinite(v))
        if len(self.history) >= self.min_history:
            med, scale = robust_location_scale(self.history)
            self.threshold = med + self.spike_factor * scale

    def _vetoed(self, trainer) -> None:
        """Called by the trainer (on every process) when an update was dropped."""
        this_update, self._group = self._group, []
        why = next((w for bad, w in map(self._is_bad, this_update) if bad), "") or "a bad loss on another process"
        self.events += 1
        action = self.action
        if action == "rollback" and not trainer.rollback_to_last_checkpoint(self.lr_factor):
            action = "skip (no checkpoint to roll back to)"
        event = {"epoch": trainer.epoch, "step": trainer.global_step, "reason": why, "action": action}
        self.log.append(event)
        logger.warning("DivergenceGuard (%d/%d) at epoch %d, update %d: %s -> %s", self.events, self.max_events,
                       trainer.epoch, trainer.global_step, why, action)
        monitor = getattr(trainer, "monitor", None)
        if monitor is not None and hasattr(monitor, "log_event"):  # into metrics.jsonl next to the metrics
            monitor.log_event("divergence", **event)
        if self.events >= self.max_events:
            trainer.request_stop(immediate=True, reason=f"training diverged {self.events} times (last: {why}); lower "
                                 f"the learning rate (optimizer.lr), enable gradient clipping "
                                 f"(training_strategy.gradient_clipping) or check the simulation/labels")

    def state_dict(self):
        pending = [float(v) for v in self._pending]
        return {"events": self.events, "history": list(self.history), "pending": pending,
                "threshold": self.threshold, "log": self.log[-20:]}

    def load_state_dict(self, state):
        self.events = int(state.get("events", 0))
        self.history.clear()
        self.history.extend(float(v) for v in state.get("history", []))
        self._pending = [float(v) for v in state.get("pending", [])]
        self.threshold = state.get("threshold")
        self.log = list(state.get("log", []))


# ----------------------------------------------------------------------------------------------
class MonitorHook(Hook):
    """Sends metrics to a ``TrainingMonitor`` and to the python log.

    Batch metrics (loss terms, learning rate, gradient norm) every ``log_every`` optimizer updates;
    epoch metrics (train and validation) at every epoch end; training-curve and prediction plots every
    ``plot_every`` epochs (main process only: the monitor itself writes only there).
    """

    def __init__(self, monitor=None, log_every: int = 50, plot_every: int | None = None, plot_loader=None):
        self.monitor, self.log_every, self.plot_every, self.plot_loader = monitor, max(1, int(log_every)), \
            plot_every, plot_loader

    def on_step_end(self, trainer, losses):
        if trainer.global_step % self.log_every:
            return
        # read from the device here, every log_every updates only
        names = list(losses)
        values = torch.stack([torch.as_tensor(losses[k], dtype=torch.float32).detach().cpu() for k in names]).tolist() \
            if names else []
        metrics = {f"train_{k}" if k != "loss" else "train_loss": v for k, v in zip(names, values)}
        metrics["learning_rate"] = trainer.get_lr()
        if trainer.grad_norm is not None:
            metrics["grad_norm"] = float(trainer.grad_norm)
        if trainer.accelerator.is_main_process:
            logger.info("epoch %d update %d: %s", trainer.epoch, trainer.global_step,
                        ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if self.monitor is not None:  # the monitor also checks these for anomalies (NaN, spikes)
            self.monitor.log_batch_metrics(epoch=trainer.epoch, batch_idx=trainer.batch_idx, metrics=metrics,
                                           step=trainer.global_step)

    def on_batch(self, trainer, batch):
        if self.monitor is not None and hasattr(self.monitor, "add_samples"):
            self.monitor.add_samples(int(batch["frames"].shape[0]))
        return batch

    def on_fit_end(self, trainer, history):
        if self.monitor is not None and hasattr(self.monitor, "performance_summary"):
            history["performance"] = self.monitor.performance_summary(log=trainer.accelerator.is_main_process)

    def on_epoch_end(self, trainer, epoch, logs):
        if self.monitor is None:
            return
        train = {k: v for k, v in logs.items() if k.startswith("train_")}
        val = {k: v for k, v in logs.items() if not k.startswith("train_") and k != "epoch"}
        self.monitor.log_epoch_metrics(epoch=epoch, train_metrics=train, val_metrics=val,
                                       model=trainer.unwrapped_model)
        if self.plot_every and (epoch + 1) % self.plot_every == 0 and trainer.accelerator.is_main_process:
            self.monitor.plot_training_curves()
            if self.plot_loader is not None:
                self.monitor.plot_model_predictions(trainer.unwrapped_model, self.plot_loader)
