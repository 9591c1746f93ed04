"""The training loop: ``BaseTrainer`` (single channel) and ``MultiChannelTrainer`` (two-channel ratiometric).

An ``accelerate.Accelerator`` owns device placement, mixed precision, gradient accumulation and
distribution; the trainer owns the loop, the schedules, the hooks, the stop/skip decisions and the
checkpoint format. Read it top to bottom: ``train`` (epochs) -> ``train_epoch`` (micro-batches) ->
``train_step`` (one micro-batch: forward, loss, backward, and at the end of an accumulation group the
optimizer update) -> ``validate``. Everything optional (loss schedules, curriculum, distillation, early
stopping, plateau LR, divergence guard, monitoring, pre-emption) is a hook
(``decode_accel.training.hooks``, where a map shows where each event fires).

Extending it the seed's way: subclass and override ``train_step(batch)`` (the unit of the loop; its
return value is the loss, or a dict of loss terms) or ``train_epoch(loader)``, using the seed's
attributes ``self.model``, ``self.optimizer``, ``self.loss_fn``, ``self.current_epoch``,
``self.gradient_clip_val``, ``self.accumulate_grad_batches`` and the helpers ``compute_loss``,
``backward``, ``clip_gradients``, ``optimizer_step``, ``autocast`` and ``epoch_batches``. The
README's section "Extending the trainer" maps each line of the seed's examples to these.

Data: a *map-style* loader (HDF5 / Arrow windows) goes through ``accelerator.prepare`` with a seedable
sampler, so processes see disjoint shards and a resumed run replays the same order
(``set_epoch`` + ``skip_first_batches``); a loader whose sampler is a ``DistributedSampler`` is taken
as already sharded. The *on-the-fly simulated stream* (an ``IterableDataset``) shards itself by
process rank and is NOT prepared; the trainer moves its batches to the device and counts the samples
it consumed so that a resumed run restarts the stream at the right sample index.

Host synchronisation: none per micro-batch. Loss terms are summed on the device and read once per
epoch (and by the monitor every ``log_every`` updates); a veto (``DivergenceGuard``) is read once per
optimizer update, like ``torch.amp.GradScaler``'s inf check; with several processes, stop requests
(early stopping, pre-emption, time budgets) are agreed every ``sync_every`` updates and at every epoch
end (every update on the CPU), in one small all-reduce owned by the trainer (hooks only set flags).

Units: the batch and the model output follow docs/architecture.md (photons, px, nm); the validation
tables are in nm, built with ``px_size_nm``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from decode_accel.data.stream import DifficultySchedule
from decode_accel.errors import DecodeAccelError
from decode_accel.evaluation import evaluate
from decode_accel.export import default_export_dir, export_model
from decode_accel.models.variance import network_input
from decode_accel.training.builders import as_two_channel, trainer_parts
from decode_accel.training.checkpoint import CheckpointManager, restore_checkpoint
from decode_accel.training.config import TrainingConfig
from decode_accel.training.hooks import (EVENTS, CurriculumHook, DistillationHook, EarlyStopping, Hook, MonitorHook,
                                         ReduceLROnPlateauHook, check_hook)
from decode_accel.training.scheduler import build_lr_scheduler
from decode_accel.training.settings import (TrainerSettings, build_optimizer, make_accelerator, make_settings,
                                            resolve_mixed_precision)

logger = logging.getLogger("decode_accel.training")


# ---------------------------------------------------------------------------------------------- helpers
def _is_stream(loader) -> bool:
    return isinstance(getattr(loader, "dataset", None), torch.utils.data.IterableDataset)


def _is_sharded(loader) -> bool:
    return isinstance(getattr(loader, "sampler", None), torch.utils.data.distributed.DistributedSampler)


def _as_terms(result) -> dict:
    """``train_step``'s return value (a dict of terms, a tensor or a float) as ``{term: value}``."""
    if isinstance(result, dict):
        return result
    if result is None:
        return {}
    return {"loss": result}


def _add_terms(sums: dict, terms: dict, weight: float = 1.0) -> dict:
    """Running sums of loss terms, on the device (no host sync)."""
    for k, v in terms.items():
        v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
        v = v if weight == 1.0 else v * weight
        sums[k] = sums[k] + v if k in sums else v
    return sums


def _setting(name: str) -> property:
    """A trainer attribute that reads ``settings.<name>`` and, when set, validates a new ``settings``."""
    return property(lambda self: getattr(self.settings, name),
                    lambda self, value: setattr(self, "settings", self.settings.updated(**{name: value})),
                    doc=f"``settings.{name}`` (assignable, validated)")


def batch_to_table(batch: dict, frame_offset: int, px_size_nm: float):
    """Ground-truth localization table (nm) of a batch's central frames; frame = frame_offset + sample index."""
    mask = batch["tgt_mask"].bool().cpu()
    b_idx, m_idx = torch.nonzero(mask, as_tuple=True)
    xyz = batch["tgt_xyz"].float().cpu()[b_idx, m_idx]
    table = pd.DataFrame({
        "frame": (b_idx + frame_offset).numpy().astype(np.int64),
        # x, y are in px with pixel centres at j + 0.5, the same origin as nm / px_size
        "x": (xyz[:, 0] * px_size_nm).numpy().astype(np.float64),
        "y": (xyz[:, 1] * px_size_nm).numpy().astype(np.float64),
        "z": xyz[:, 2].numpy().astype(np.float64),
        "photons": batch["tgt_photons"].float().cpu()[b_idx, m_idx].numpy().astype(np.float64),
        "id": np.arange(len(b_idx), dtype=np.int64),
    })
    if "tgt_ratio" in batch:
        table["ratio"] = batch["tgt_ratio"].float().cpu()[b_idx, m_idx].numpy().astype(np.float64)
    return table


# ---------------------------------------------------------------------------------------------- the trainer
class BaseTrainer:
    """Trains a localization network with an ``accelerate.Accelerator``.

    Args:
        model: a network taking ``frames`` (B, C, 3, H, W) in photons and returning the output dict of
            docs/architecture.md (e.g. ``SigmaMUNet``).
        loss_fn: ``loss_fn(output, batch) -> {term: scalar, 'loss': total}`` with ``update_weights``.
        optimizer_config: ``{'type': 'AdamW', 'lr': 1e-3, ...}``: any ``torch.optim`` class and its kwargs.
        scheduler_config: ``{'type': 'StepLR', 'step_size': 30, 'gamma': 0.5, 'interval': 'epoch',
            'warmup_steps': 0}`` (see ``decode_accel.training.scheduler.build_lr_scheduler``);
            ``ReduceLROnPlateau`` installs a ``ReduceLROnPlateauHook`` on the validation metric.
        device: None (the launcher's choice), ``'cpu'``, ``'cuda'`` or ``'cuda:N'`` (see ``make_accelerator``).
        mixed_precision: ``'no' | 'bf16' | 'fp16'``, ``True`` (bf16 on GPU, fp32 on CPU where bf16 is
            ~10x slower) or ``None`` (the launcher's setting, else fp32 on CPU and bf16 on GPU).
        settings: a ``TrainerSettings`` (or dict); keyword arguments with its field names (``cpu``,
            ``seed``, ``epochs``, ...) override it.
        hooks: extra ``Hook`` objects (checked: a misspelt ``on_*`` method is an error).
        postprocessor: ``PostProcessor`` turning output maps into a table (nm) for the validation
            metrics (JI, RMSE, efficiency); None -> validation reports losses only.
        accelerator: an existing Accelerator (then ``device``/``mixed_precision``/``cpu`` are its business).
        monitor: a ``TrainingMonitor``, or a callable ``(is_main_process) -> TrainingMonitor`` that each
            ``train()`` calls (and closes the monitor after) when it is given none.
        config: the ``TrainingConfig`` (stored in checkpoints and the export folder).
        simulation_config: the simulation section (needed to write the export folder; default
            ``config.simulation``).
    """

    def __init__(self, model: torch.nn.Module, loss_fn, optimizer_config: dict | None = None,
                 scheduler_config: dict | None = None, device: str | torch.device | None = None,
                 mixed_precision: str | bool | None = None, *, settings: TrainerSettings | dict | None = None,
                 hooks: Iterable[Hook] = (), postprocessor=None, accelerator: Accelerator | None = None,
                 monitor: Any = None, config: Any = None, simulation_config: Any = None, **setting_values):
        self.settings = make_settings(settings, **setting_values)
        s = self.settings
        set_seed(s.seed)
        self.accelerator = accelerator if accelerator is not None else make_accelerator(device, mixed_precision, s.cpu)
        if s.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing"):
                raise DecodeAccelError(f"{type(model).__name__} has no gradient_checkpointing flag",
                                       field="gradient_checkpointing", fix="use SigmaMUNet/DoubleMUNet or set it False")
            model.gradient_checkpointing = True
        self.loss_fn = loss_fn.to(self.accelerator.device) if isinstance(loss_fn, torch.nn.Module) else loss_fn
        self.optimizer_config = dict(optimizer_config or {"type": "AdamW", "lr": 1e-3})
        self.scheduler_config = dict(scheduler_config) if scheduler_config else None
        if self.accelerator.device.type == "cuda":
            # training frames have one fixed size: let cuDNN time its convolution algorithms once and keep the fastest
            torch.backends.cudnn.benchmark = True
        self.model, self.optimizer = self.accelerator.prepare(
            model, build_optimizer(model.parameters(), self.optimizer_config, device=self.accelerator.device))
        if s.compile:
            self.model = torch.compile(self.model)
        # every real optimizer step (ours or an override's) is seen here: it defines an "update"
        self._inner_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        self._inner_optimizer.register_step_post_hook(lambda *_: setattr(self, "_stepped", True))
        self.postprocessor = postprocessor
        self.config = config
        self.simulation_config = simulation_config if simulation_config is not None else getattr(config, "simulation",
                                                                                                  None)
        self._monitor_source = monitor
        self.hooks: list[Hook] = []
        for hook in hooks:
            self.add_hook(hook)
        if self.scheduler_config and self.scheduler_config.get("type") == "ReduceLROnPlateau":
            self.add_hook(ReduceLROnPlateauHook(monitor=s.monitor_metric, **{
                k: v for k, v in self.scheduler_config.items() if k in ReduceLROnPlateauHook.OPTIONS}))
        # loop state (saved in checkpoints)
        self.epoch, self.global_step, self.batch_idx = 0, 0, 0
        self.stream_samples = 0          # samples this process consumed from a simulated stream
        self.history: dict[str, Any] = {"train_loss": [], "val_loss": [], "val_metrics": [], "lr": [],
                                        "best_val_loss": None, "best_epoch": None}
        self.epoch_terms: dict[str, float] = {}   # mean of each loss term over the last training epoch
        # per-fit state
        self.lr_schedule = None
        self.checkpoint_manager = None
        self.monitor = None              # the TrainingMonitor of the current fit (hooks write events to it)
        self.grad_norm = None            # global gradient norm of the last clipped update (device tensor)
        self.last_checkpoint = None      # folder of the last checkpoint written
        self.exit_code: int | None = None
        self.batch_size, self.batches_per_epoch, self.updates_per_epoch = 1, 1, 1
        self.skip_update = False         # a host-side veto of this update (prefer veto_update)
        self.should_stop, self.stop_reason, self._stop_now = False, None, False
        self._pending_stop: tuple | None = None
        self._veto, self._veto_callbacks = None, []
        self._stepped, self._dropped, self._fitting, self._set_up = False, False, False, False
        self._skip_batches = 0           # micro-batches of the current epoch already done (resume)
        self._prepared: dict[int, Any] = {}
        self._stream_iters: dict[int, Any] = {}
        self._stream_base: dict[int, int] = {}
        self._difficulty = None
        self._timer = None
        self._owned_monitor = None

    # ------------------------------------------------------------------ the seed's attributes
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def current_epoch(self) -> int:
        """The epoch being trained (0-based; the seed's name for ``epoch``)."""
        return self.epoch

    gradient_clip_val = _setting("gradient_clip_val")
    accumulate_grad_batches = _setting("accumulate_grad_batches")

    @property
    def fit_kwargs(self) -> dict:
        """The settings' fit arguments as a dict (``train(loader, **trainer.fit_kwargs)`` changes nothing)."""
        keys = ("epochs", "steps_per_epoch", "accumulate_grad_batches", "gradient_clip_val", "validate_every",
                "early_stopping_patience", "log_every", "save_dir", "save_every")
        return {k: getattr(self.settings, k) for k in keys}

    def get_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        """Set the (base) learning rate; a running schedule keeps shaping it."""
        if self.lr_schedule is not None:
            self.lr_schedule.set_base_lr(lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = float(lr)

    # ------------------------------------------------------------------ hooks
    def add_hook(self, hook: Hook) -> Hook:
        """Register a hook; its ``on_*`` methods must be events of ``hooks.EVENTS`` (one-line error if not).

        Its state is saved in checkpoints under ``hook.name`` (default: the class name, ``#2``, ``#3``
        for further hooks of the same name), so a resume with the hooks in another order finds it.
        """
        check_hook(hook)
        base = getattr(hook, "name", None) or type(hook).__name__
        taken = {h.state_key for h in self.hooks}
        key, n = base, 1
        while key in taken:
            n += 1
            key = f"{base}#{n}"
        hook.state_key = key
        self.hooks.append(hook)
        return hook

    def _fire(self, event: str, *args):
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def _chain(self, event: str, value, *args):
        for hook in self.hooks:
            value = getattr(hook, event)(self, value, *args)
        return value

    def _timed(self, name: str):
        return self._timer(name) if self._timer is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ decisions (flags from hooks, agreed here)
    def request_stop(self, reason: str, immediate: bool = False, exit_code: int | None = None) -> None:
        """Ask the loop to stop at the end of this epoch, or after this update when ``immediate``.

        With ``exit_code`` the fit raises ``SystemExit(exit_code)`` once the checkpoint is written
        (pre-emption). One process may ask alone: the trainer agrees with the others before acting.
        """
        old = self._pending_stop
        self._pending_stop = (reason if old is None else old[0], immediate or (old is not None and old[1]),
                              exit_code if old is None or old[2] is None else max(old[2], exit_code or 0))
        if self.accelerator.num_processes == 1:
            self._agree_stop()

    def veto_update(self, flag: bool | torch.Tensor, on_veto: Callable | None = None) -> None:
        """Vote to drop this optimizer update (e.g. a non-finite loss); ``flag`` may stay on the device.

        Votes are read once, when the update closes (one host sync per update, none per micro-batch);
        if any process voted yes, every process drops the update and calls ``on_veto(trainer)``. Call it
        on every process for the same micro-batches (with False when all is well).
        """
        flag = torch.as_tensor(flag, device=self.device).reshape(())
        self._veto = flag if self._veto is None else self._veto | flag
        if on_veto is not None and on_veto not in self._veto_callbacks:
            self._veto_callbacks.append(on_veto)

    def _agree_skip(self) -> bool:
        """Whether every process drops the update now closing (reads the votes; one all-reduce)."""
        if self._veto is None and not self.skip_update:
            return False
        vote = (self._veto.float() if self._veto is not None else torch.zeros((), device=self.device)) \
            + float(self.skip_update)
        if self.accelerator.num_processes > 1:
            vote = self.accelerator.reduce(vote, reduction="sum")
        skip = bool(vote > 0)
        callbacks, self._veto, self._veto_callbacks, self.skip_update = self._veto_callbacks, None, [], False
        if skip:
            self._dropped = True
            for callback in callbacks:
                callback(self)
            self._agree_stop()  # every process is here together: settle a stop a callback asked for
        return skip

    def _agree_stop(self) -> None:
        """Turn stop requests into one decision for all processes (no collective with one process)."""
        reason, now, code = self._pending_stop or ("", False, None)
        if self.accelerator.num_processes > 1:
            flags = torch.tensor([self._pending_stop is not None, now, -1 if code is None else code],
                                 dtype=torch.float64, device=self.device)
            flags = self.accelerator.reduce(flags, reduction="max")
            asked, now, code = bool(flags[0]), bool(flags[1]), int(flags[2])
            code = None if code < 0 else code
            reason = reason or "a stop requested on another process"
        else:
            asked = self._pending_stop is not None
        self._pending_stop = None
        if asked:
            if not self.should_stop:
                logger.warning("stopping: %s", reason)
                self.should_stop, self.stop_reason = True, reason
            self._stop_now = self._stop_now or now
            self.exit_code = code if code is not None else self.exit_code

    # ------------------------------------------------------------------ extension points (the seed's API)
    def autocast(self, enabled: bool = True):
        """The Accelerator's autocast context (the run's mixed precision); a no-op when ``enabled`` is False."""
        return self.accelerator.autocast() if enabled else contextlib.nullcontext()

    def compute_loss(self, batch: dict) -> dict:
        """Forward ``batch['frames']`` (with ``batch['variance']`` for a model with the sCMOS variance input) and
        return the loss terms (``'loss'`` = total), after the on_loss hooks."""
        with self._timed("forward"):
            outputs = self.model(network_input(batch, self.model))
            losses = self.loss_fn(outputs, batch)
        return self._chain("on_loss", losses, outputs, batch)

    def backward(self, loss: torch.Tensor) -> None:
        """``accelerator.backward`` (AMP scaling, 1/accumulation, DDP), then the on_after_backward event."""
        with self._timed("backward"):
            self.accelerator.backward(loss)
        self._fire("on_after_backward")

    def clip_gradients(self):
        """Clip the global gradient norm to ``gradient_clip_val`` at the end of an accumulation group."""
        if self.gradient_clip_val > 0 and self.accelerator.sync_gradients:
            self.grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.gradient_clip_val)
        return self.grad_norm

    def optimizer_step(self) -> bool:
        """Close an accumulation group: agree on vetoes, clip, step, zero the gradients; False if no update."""
        if not self.accelerator.sync_gradients:
            return False
        # without a loss scaler, step the torch optimizer itself: Accelerate's wrapper looks up an optional
        # package on disk at every step and zero_grad (milliseconds, a GPU step's worth); the gate on
        # sync_gradients it adds is the one above
        optimizer = self.optimizer if self.accelerator.scaler is not None else self._inner_optimizer
        if self._agree_skip():
            optimizer.zero_grad(set_to_none=True)
            return False
        with self._timed("optimizer"):
            self.clip_gradients()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return True

    def train_step(self, batch: dict):
        """One micro-batch on the device: loss terms, backward and, at the end of a group, the update.

        Override it to change what a step does (the seed's MixedPrecisionTrainer, DistillationTrainer);
        return the loss tensor or a dict of terms (floats work too, at the price of a host sync). The
        loop around it owns accumulation (``accelerator.accumulate``), the lr schedule, the update
        counter, hooks and checkpoints.
        """
        losses = self.compute_loss(batch)
        self.backward(losses["loss"])
        self.optimizer_step()
        return losses

    def epoch_batches(self, loader) -> Iterable[dict]:
        """This epoch's micro-batches of ``loader``, on the device, with ``self.batch_idx`` kept current."""
        batches = iter(self._epoch_source(loader))
        stream = _is_stream(loader)
        for i in itertools.count(self._skip_batches):
            with self._timed("data"):
                batch = next(batches, None)
            if batch is None:
                return
            self.batch_idx = i
            if stream:
                self.stream_samples += int(batch["frames"].shape[0])
            yield self.to_device(batch)

    def to_device(self, batch: dict) -> dict:
        """The batch's tensors on the training device (asynchronous copies where possible)."""
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ the loop
    def train(self, train_loader, val_loader=None, epochs: int | None = None, *, monitor=None, **settings) -> dict:
        """Train and return the history.

        ``settings`` override the trainer's ``TrainerSettings`` for this fit (``epochs``, ``save_dir``,
        ``save_every``, ``validate_every``, ``early_stopping_patience``, ``gradient_clip_val``,
        ``accumulate_grad_batches``, ``log_every``, ``steps_per_epoch``, ``resume``, ...). History keys:
        train_loss, val_loss, val_metrics (lists per epoch), lr, best_val_loss, best_epoch, total_time (s),
        global_step, stopped_early, stop_reason.
        """
        start = time.time()
        s = self._begin_fit(train_loader, val_loader, monitor, **({} if epochs is None else {"epochs": epochs}),
                            **settings)
        try:
            self._fire("on_fit_start")
            for epoch in range(self.epoch, s.epochs):
                self.epoch = epoch
                self._fire("on_epoch_start", epoch)
                train_loss = self.train_epoch(train_loader)
                if self._stop_now:  # leave mid-epoch: save the position (the resumed run continues there)
                    self.save_checkpoint(epoch_complete=False)
                    break
                logs = {"epoch": epoch, "train_loss": train_loss,
                        **{f"train_{k}": v for k, v in self.epoch_terms.items() if k != "loss"}}
                last = epoch == s.epochs - 1
                if val_loader is not None and ((epoch + 1) % s.validate_every == 0 or last):
                    logs.update(self.validate(val_loader, val_steps=s.val_steps))
                self._record(logs)
                self._fire("on_epoch_end", epoch, logs)
                self._agree_stop()
                if (epoch + 1) % s.save_every == 0 or last or self.should_stop:
                    self.save_checkpoint(metrics=logs, epoch_complete=True)
                if self.should_stop:
                    break
            self.history.update(total_time=time.time() - start, global_step=self.global_step,
                                stopped_early=self.should_stop, stop_reason=self.stop_reason)
            self._fire("on_fit_end", self.history)
        finally:
            self._end_fit()
        if self.exit_code is not None:  # pre-emption: the checkpoint is written, leave without exporting
            self.accelerator.wait_for_everyone()
            logger.warning("exiting with code %d after the checkpoint", self.exit_code)
            raise SystemExit(self.exit_code)
        if s.export_dir is not None or (s.save_dir is not None and self.simulation_config is not None):
            self.export(s.export_dir or default_export_dir(s.save_dir))
        return self.history

    def train_epoch(self, loader) -> float:
        """One epoch of micro-batches through ``train_step``; returns the mean training loss (all processes)."""
        standalone = not self._fitting  # the seed's own loops call train_epoch once per epoch
        if standalone and not self._set_up:
            self._begin_fit(loader, None, None, standalone=True)
            self._fitting = False
        self.model.train()
        self.accelerator.step = 0  # the accumulation counter starts each epoch at a group boundary
        sums, count, group, group_n, opened = {}, 0, {}, 0, False
        for batch in self.epoch_batches(loader):
            if not opened:
                self._stepped = self._dropped = False
                self._fire("on_step_start")
                opened = True
            batch = self._chain("on_batch", batch)
            if self.batch_idx == self.batches_per_epoch - 1:  # the epoch's last micro-batch closes its group
                self.accelerator.step = self.accelerator.gradient_accumulation_steps - 1
            with self.accelerator.accumulate(self.model):
                terms = _as_terms(self.train_step(batch))
            group, group_n = _add_terms(group, terms), group_n + 1
            if self.accelerator.sync_gradients:
                if self._end_update(terms):  # a dropped (e.g. NaN) update stays out of the epoch means
                    sums, count = _add_terms(sums, group), count + group_n
                group, group_n, opened = {}, 0, False
            if self._stop_now:
                break
        if self._stop_now and self.batch_idx >= self.batches_per_epoch - 1:
            self._stop_now = False  # asked at the epoch's last update: the epoch is complete, stop after it
        self._skip_batches = 0
        if standalone:
            self.epoch += 1
        self.epoch_terms = self._mean_across_processes(sums, count)
        return self.epoch_terms.get("loss", float("nan"))

    def _end_update(self, terms: dict) -> bool:
        """After a group's last micro-batch: count the update, step the lr schedule, hooks, checkpoints."""
        # votes an override's own optimizer.step() did not read: a veto then comes after the step (a guard's
        # rollback still repairs it), and the update is not counted
        dropped = self._agree_skip() or self._dropped
        stepped = not dropped and (self._stepped or self.accelerator.optimizer_step_was_skipped)
        self._stepped, self._dropped = False, False
        if not stepped:
            return False
        if self.lr_schedule is not None and not self.accelerator.optimizer_step_was_skipped:
            self.lr_schedule.step()
        self.global_step += 1
        self._fire("on_step_end", terms)
        every = self.settings.sync_every or (1 if self.device.type == "cpu" else 16)
        if self.accelerator.num_processes == 1 or self.global_step % every == 0:
            self._agree_stop()
        n = self.settings.save_every_n_steps
        if n and self.global_step % n == 0 and not self._stop_now:
            self.save_checkpoint(epoch_complete=False)
        return True

    @torch.no_grad()
    def validate(self, loader, val_steps: int | None = None) -> dict:
        """Validation loss (+ its terms) and, with a postprocessor, the challenge metrics.

        Each process evaluates every ``num_processes``-th batch with the unwrapped model (no DDP
        collectives in eval), then sums and tables are combined, so every process returns the same
        metrics. Metrics: val_loss, val_<term>, and from ``decode_accel.evaluation.evaluate``: jaccard,
        rmse_lat (nm), efficiency_lat, n_gt, tp, ... ; frames are numbered by validation sample.
        """
        model = self.unwrapped_model
        was_training = model.training
        model.eval()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        sums, n_samples, offset, gt_tables, pred_tables = {}, 0, 0, [], []
        for i, batch in enumerate(loader if val_steps is None else itertools.islice(loader, val_steps)):
            size = int(batch["frames"].shape[0])
            if i % world == rank:
                batch = self.to_device(batch)
                outputs = {k: v.float() for k, v in model(network_input(batch, model)).items()}
                sums = _add_terms(sums, self.loss_fn(outputs, batch), weight=size)
                n_samples += size
                if self.postprocessor is not None:
                    pred_tables.append(self._postprocess(outputs, offset))
                    gt_tables.append(batch_to_table(batch, offset, self._px_size()))
            offset += size
        model.train(was_training)
        metrics = {("val_loss" if k == "loss" else f"val_{k}"): v
                   for k, v in self._mean_across_processes(sums, n_samples).items()}
        if self.postprocessor is not None:
            metrics.update(self._table_metrics(gt_tables, pred_tables))
        self._fire("on_eval_end", metrics)
        return metrics

    # ------------------------------------------------------------------ set-up
    def _begin_fit(self, train_loader, val_loader, monitor, standalone: bool = False, **overrides) -> TrainerSettings:
        s = self.settings = self.settings.updated(**overrides)
        self._fitting = self._set_up = True
        self.should_stop, self.stop_reason, self._stop_now, self.exit_code = False, None, False, None
        self.accelerator.gradient_accumulation_steps = s.accumulate_grad_batches
        # The trainer closes each accumulation group itself (at the epoch's last micro-batch, see
        # train_epoch). Accelerate's GradientState is one object per process: a prepared DataLoader that an
        # earlier fit (or notebook cell) left mid-iteration stays registered as "active" and "at its end",
        # and with sync_with_dataloader every micro-batch of this fit would then close a group.
        self.accelerator.gradient_state.plugin_kwargs["sync_with_dataloader"] = False
        self.batch_size = int(getattr(train_loader, "batch_size", None) or 1)
        if _is_stream(train_loader):
            if s.steps_per_epoch is None:
                raise DecodeAccelError("an endless simulated stream needs steps_per_epoch", field="steps_per_epoch",
                                       fix="pass train(steps_per_epoch=N) or set data.steps_per_epoch")
            n_batches = s.steps_per_epoch
        else:
            prepared = self._loader_for(train_loader)
            n_batches = min(len(prepared), s.steps_per_epoch or len(prepared))
        self.batches_per_epoch = n_batches
        self.updates_per_epoch = math.ceil(n_batches / s.accumulate_grad_batches)
        if self.scheduler_config:
            sched = {k: v for k, v in self.scheduler_config.items()
                     if not (self.scheduler_config.get("type") == "ReduceLROnPlateau"
                             and k in ReduceLROnPlateauHook.OPTIONS)}
            self.lr_schedule = build_lr_scheduler(getattr(self.optimizer, "optimizer", self.optimizer), sched,
                                                  updates_per_epoch=self.updates_per_epoch,
                                                  total_updates=self.updates_per_epoch * s.epochs)
        if s.early_stopping_patience and not any(isinstance(h, EarlyStopping) for h in self.hooks):
            self.add_hook(EarlyStopping(s.early_stopping_patience, monitor=s.monitor_metric, mode=s.mode))
        if monitor is None and not hasattr(self._monitor_source, "log_batch_metrics"):
            # a factory: this fit's own monitor, closed when the fit ends
            if callable(self._monitor_source) and not standalone:
                monitor = self._owned_monitor = self._monitor_source(self.accelerator.is_main_process)
        elif monitor is None:
            monitor = self._monitor_source
        self.hooks = [h for h in self.hooks if not isinstance(h, MonitorHook)]
        self.add_hook(MonitorHook(monitor, log_every=s.log_every, plot_every=s.plot_every, plot_loader=val_loader))
        self.monitor, self._timer = monitor, getattr(monitor, "timer", None)
        self.checkpoint_manager = None
        if s.save_dir is not None:
            self.checkpoint_manager = CheckpointManager(s.save_dir, save_top_k=s.save_top_k,
                                                        monitor_metric=s.monitor_metric, mode=s.mode,
                                                        save_every_n_epochs=1, save_last=s.save_last)
            if s.resume and self.checkpoint_manager.has_checkpoint():
                self._restore(self.checkpoint_manager.load_last_checkpoint(rank=self.accelerator.process_index))
        elif s.resume:
            raise DecodeAccelError("resume=True needs save_dir", field="resume", fix="pass the checkpoint folder as save_dir")
        return s

    def _end_fit(self) -> None:
        self._fitting = False
        if self._owned_monitor is not None:
            self._owned_monitor.close()
            self._owned_monitor = None

    def _loader_for(self, loader):
        """The loader as the loop iterates it: prepared by the Accelerator unless it shards itself."""
        if _is_stream(loader) or _is_sharded(loader):
            return loader
        key = id(loader)
        if key not in self._prepared:
            self._prepared[key] = self.accelerator.prepare(loader)
        return self._prepared[key]

    def _epoch_source(self, loader):
        """The iterable of this epoch's remaining micro-batches (resume skips those already done)."""
        n = self.batches_per_epoch - self._skip_batches
        if _is_stream(loader):
            key = id(loader)
            if key not in self._stream_iters:  # one iterator for the whole fit: workers and position persist
                ds = loader.dataset
                # the DataLoader copies the dataset into its workers when the iterator starts: set first
                if self._difficulty is not None:
                    ds.difficulty_schedule = DifficultySchedule(self._difficulty)
                if self.stream_samples:
                    if not hasattr(ds, "start_index"):
                        raise DecodeAccelError(f"{type(ds).__name__} has no start_index", field="resume",
                                               fix="resume needs a stream that can start at a sample index")
                    # start_index counts the samples of all processes together
                    base = self._stream_base.setdefault(key, int(ds.start_index))
                    ds.start_index = base + self.stream_samples * self.accelerator.num_processes
                self._stream_iters[key] = iter(loader)
            return itertools.islice(self._stream_iters[key], n)
        prepared = self._loader_for(loader)
        target = getattr(prepared, "sampler", None) if _is_sharded(prepared) else prepared
        if hasattr(target, "set_epoch"):
            target.set_epoch(self.epoch)
        if self._skip_batches:
            prepared = (itertools.islice(prepared, self._skip_batches, None) if _is_sharded(prepared)
                        else self.accelerator.skip_first_batches(prepared, self._skip_batches))
        return itertools.islice(prepared, n)

    def set_difficulty_schedule(self, schedule: list[dict]) -> None:
        """Install a curriculum difficulty schedule on the training stream (applied when it is iterated)."""
        self._difficulty = schedule

    # ------------------------------------------------------------------ metrics and bookkeeping
    def _px_size(self) -> float:
        px = self.settings.px_size_nm if self.settings.px_size_nm is not None else getattr(self.postprocessor,
                                                                                           "px_size_nm", None)
        if px is None:
            raise DecodeAccelError("validation metrics need the pixel size", field="px_size_nm",
                                   fix="pass px_size_nm to the trainer or the PostProcessor")
        return float(px)

    def _postprocess(self, outputs: dict, frame_offset: int):
        try:
            return self.postprocessor(outputs, frame_offset=frame_offset)
        except TypeError:
            return self.postprocessor(outputs, frame_offset, self._px_size())

    def _table_metrics(self, gt_tables: list, pred_tables: list) -> dict:
        if self.accelerator.num_processes > 1:
            gt_tables, pred_tables = gather_object(gt_tables), gather_object(pred_tables)
        gt = pd.concat(gt_tables, ignore_index=True) if gt_tables else None
        pred = pd.concat(pred_tables, ignore_index=True) if pred_tables else None
        if gt is None or pred is None:
            return {}
        result = evaluate(gt, pred, px_size_nm=self._px_size(), **self._evaluate_kwargs())
        # metrics that cannot be computed here (e.g. axial ones for 2D data) come back NaN: leave them out
        return {k: float(v) for k, v in result.items() if isinstance(v, (int, float, np.floating, np.integer))
                and not isinstance(v, bool) and math.isfinite(float(v))}

    def _evaluate_kwargs(self) -> dict:
        return {}

    def _mean_across_processes(self, sums: dict, count: float) -> dict[str, float]:
        """Means of device-side sums over every process, read with one host sync."""
        keys = sorted(sums)
        values = torch.stack([sums[k].to(self.device) for k in keys] + [torch.tensor(float(count), device=self.device)])
        values = values.double()
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        *totals, n = values.tolist()
        return {k: v / max(n, 1.0) for k, v in zip(keys, totals)}

    def _record(self, logs: dict) -> None:
        h = self.history
        h["train_loss"].append(logs["train_loss"])
        h["lr"].append(self.get_lr())
        val = {k: v for k, v in logs.items() if k not in ("epoch",) and not k.startswith("train_")}
        if val:
            h["val_loss"].append(val.get("val_loss"))
            h["val_metrics"].append({"epoch": logs["epoch"], **val})
            if val.get("val_loss") is not None and math.isfinite(val["val_loss"]) and (
                    h["best_val_loss"] is None or val["val_loss"] < h["best_val_loss"]):
                h["best_val_loss"], h["best_epoch"] = float(val["val_loss"]), int(logs["epoch"])

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self, epoch_complete: bool) -> dict:
        """JSON-able loop state: position, hook states (by the hooks' stable names) and history."""
        return {
            "epoch": self.epoch, "global_step": self.global_step, "epoch_complete": bool(epoch_complete),
            "batches_done": 0 if epoch_complete else self.batch_idx + 1,
            "stream_samples": self.stream_samples,
            "hooks": {h.state_key: h.state_dict() for h in self.hooks},
            "history": self.history,
        }

    def save_checkpoint(self, metrics: dict | None = None, epoch_complete: bool = True):
        """Write a checkpoint through the CheckpointManager (all processes wait for it); None without one."""
        if self.checkpoint_manager is None:
            return None
        self.accelerator.wait_for_everyone()
        path = self.checkpoint_manager.save_checkpoint(
            self.epoch, self.model, self.optimizer, scheduler=self.lr_schedule,
            metrics={k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
            config=self.config, step=self.global_step,
            trainer_state=self.trainer_state(epoch_complete), accelerator=self.accelerator)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = path if path is not None else self.last_checkpoint
        return path

    def _restore(self, ckpt: dict) -> None:
        restore_checkpoint(ckpt, self.unwrapped_model, self.optimizer, self.lr_schedule,
                           accelerator=self.accelerator, restore_rng=True)
        state = ckpt.get("trainer_state") or {}
        self.global_step = int(state.get("global_step", ckpt.get("step") or 0))
        done = bool(state.get("epoch_complete", True))
        self.epoch = int(state.get("epoch", ckpt.get("epoch", 0))) + (1 if done else 0)
        self._skip_batches = 0 if done else int(state.get("batches_done", 0))
        self.stream_samples = int(state.get("stream_samples", 0))
        if state.get("history"):
            self.history.update(state["history"])
        saved = _hook_states(state.get("hooks") or {})
        for h in self.hooks:
            if h.state_key in saved:
                h.load_state_dict(saved.pop(h.state_key))
        if any(saved.values()):
            logger.warning("the checkpoint holds state of hooks this trainer does not have: %s", ", ".join(saved))
        logger.info("resumed at epoch %d, update %d (%d micro-batches into the epoch)", self.epoch,
                    self.global_step, self._skip_batches)

    def rollback_to_last_checkpoint(self, lr_factor: float = 0.5) -> bool:
        """Reload weights and optimizer from the last complete checkpoint and scale the lr; False if none."""
        if self.checkpoint_manager is None or not self.checkpoint_manager.has_checkpoint():
            return False
        ckpt = self.checkpoint_manager.load_last_checkpoint(rank=self.accelerator.process_index)
        restore_checkpoint(ckpt, self.unwrapped_model, self.optimizer, accelerator=self.accelerator, restore_rng=False)
        self.set_lr(self.get_lr() * lr_factor)
        return True

    def export(self, out_dir: str | os.PathLike):
        """Write the self-contained export folder (weights + metadata + model card) on the main process."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.accelerator.is_main_process:
            if self.simulation_config is None:
                raise DecodeAccelError("the export folder needs the simulation config", field="simulation_config",
                                       fix="pass simulation_config to the trainer (from_config does)")
            last = self.history["val_metrics"][-1] if self.history["val_metrics"] else None
            path = export_model(out_dir, self.unwrapped_model, simulation_config=self.simulation_config,
                                metrics=last, training_config=self.config)
        self.accelerator.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ construction from a config
    @classmethod
    def from_config(cls, config, **overrides) -> "BaseTrainer":
        """Build model, loss, trainer, hooks and the monitor from a ``TrainingConfig`` (:func:`build_trainer`)."""
        return build_trainer(config, trainer_cls=cls, **overrides)


class MultiChannelTrainer(BaseTrainer):
    """Two-channel ratiometric training (``DoubleMUNet`` + ``UnifiedLoss``).

    The loop is ``BaseTrainer``'s; the loss terms (ch1, ch2, ratio, conservation, uncertainty, bg) are
    logged by name, and ``validate`` adds ratio metrics: with a dye table (``dye_table``: list of
    ``{ratio, ratio_sd, prob}``; default the postprocessor's) the evaluation reports the colour crosstalk.
    """

    def __init__(self, *args, dye_table: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dye_table = dye_table if dye_table is not None else getattr(self.postprocessor, "dye_table", None)

    def _evaluate_kwargs(self) -> dict:
        return {"dye_table": self.dye_table} if self.dye_table is not None else {}


# ---------------------------------------------------------------------------------------------- from a config
def build_trainer(config, trainer_cls: type[BaseTrainer] | None = None, *, cpu: bool | None = None,
                  mixed_precision: str | bool | None = None, accelerator=None, teacher=None, hooks: tuple = (),
                  **trainer_kwargs) -> BaseTrainer:
    """The trainer of a ``TrainingConfig`` (or dict): ``builders.trainer_parts`` builds accelerator, model,
    loss, optimizer and schedule configs, postprocessor, hooks, monitor and settings; this picks the class.

    The class defaults to ``MultiChannelTrainer`` for two-channel configs (a ``MultiChannelTrainer``
    subclass fills in the two-channel defaults, see ``builders.as_two_channel``). Its ``settings`` hold
    every run setting the config implies, and its monitor is built from the ``monitoring`` section at each
    ``train()`` that gets none: ``trainer.train(train_loader, val_loader)`` runs the configured training.
    ``trainer_kwargs`` go to the trainer class (e.g. a subclass's own arguments).
    """
    if isinstance(config, dict):
        config = TrainingConfig.model_validate(config)
    if trainer_cls is not None and issubclass(trainer_cls, MultiChannelTrainer):
        config = as_two_channel(config)
    two = config.simulation.channels.n_channels == 2 or config.model.architecture == "DoubleMUNet"
    if trainer_cls is None or (trainer_cls is BaseTrainer and two):
        trainer_cls = MultiChannelTrainer if two else BaseTrainer
    parts = trainer_parts(config, cpu=cpu, mixed_precision=mixed_precision, accelerator=accelerator,
                          teacher=teacher, hooks=hooks)
    return trainer_cls(**parts, **trainer_kwargs)


# ---------------------------------------------------------------------------------------------- seed names
def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DecodeAccelError(f"{name} must be a number, got {type(value).__name__}", field=name,
                               fix="the seed's order is (teacher_model, temperature, alpha, ...): pass model= and "
                                   "loss_fn= by keyword")
    return float(value)


class DistillationTrainer(BaseTrainer):
    """``BaseTrainer`` + ``DistillationHook``, with the seed's arguments ``(teacher_model, temperature=4.0, alpha=0.7,
    *args, **kwargs)``: the frozen teacher's output maps guide the student through
    ``decode_accel.loss.distillation`` (total = alpha * distillation + (1 - alpha) * ground truth; the
    detection term is softened by ``temperature``)."""

    def __init__(self, teacher_model: torch.nn.Module, temperature: float = 4.0, alpha: float = 0.7, *args, **kwargs):
        self.teacher_model = teacher_model
        self.temperature, self.alpha = _number("temperature", temperature), _number("alpha", alpha)
        hooks = list(kwargs.pop("hooks", ())) + [DistillationHook(teacher_model, alpha=self.alpha,
                                                                  temperature=self.temperature)]
        super().__init__(*args, hooks=hooks, **kwargs)


class CurriculumTrainer(BaseTrainer):
    """``BaseTrainer`` + ``CurriculumHook``, with the seed's arguments ``(curriculum_config, *args, **kwargs)``:
    a list of ``CurriculumStage`` models or dicts (``end_epoch`` / ``until_epoch`` / ``until_step``,
    ``learning_rate`` / ``lr``, ``loss_weights``, ``simulation``, ``description``)."""

    def __init__(self, curriculum_config: list, *args, **kwargs):
        self.curriculum_config = curriculum_config
        self._curriculum = CurriculumHook(curriculum_config)
        super().__init__(*args, hooks=list(kwargs.pop("hooks", ())) + [self._curriculum], **kwargs)

    @property
    def current_stage(self) -> int:
        """The curriculum stage in force (-1 before the first epoch)."""
        return self._curriculum.stage


class AdaptiveLRTrainer(BaseTrainer):
    """``BaseTrainer`` + ``ReduceLROnPlateauHook`` on the validation loss, with the seed's arguments
    ``(patience=10, factor=0.5, min_lr=1e-7, *args, **kwargs)``: the learning rate is multiplied by
    ``factor`` (not below ``min_lr``) after ``patience`` validations without improvement."""

    def __init__(self, patience: int = 10, factor: float = 0.5, min_lr: float = 1e-7, *args, **kwargs):
        self.patience, self.factor, self.min_lr = int(_number("patience", patience)), _number("factor", factor), \
            _number("min_lr", min_lr)
        self._plateau = ReduceLROnPlateauHook(factor=self.factor, patience=self.patience, min_lr=self.min_lr)
        super().__init__(*args, hooks=list(kwargs.pop("hooks", ())) + [self._plateau], **kwargs)

    def adjust_learning_rate(self, val_loss: float) -> None:
        """The seed's method: one plateau check with ``val_loss`` (the loop already does it after each validation)."""
        self._plateau.on_eval_end(self, {self._plateau.monitor: val_loss})


# ---------------------------------------------------------------------------------------------- utilities
def _hook_states(saved: dict) -> dict:
    """Saved hook states by stable name; older checkpoints keyed them ``"<position>:<class>"``."""
    out: dict[str, Any] = {}
    for key, state in saved.items():
        if ":" in key and key.split(":", 1)[0].isdigit():
            key = key.split(":", 1)[1]
            base, n = key, 1
            while key in out:
                n += 1
                key = f"{base}#{n}"
        out[key] = state
    return out


__all__ = ["BaseTrainer", "MultiChannelTrainer", "DistillationTrainer", "CurriculumTrainer", "AdaptiveLRTrainer",
           "build_trainer", "TrainerSettings", "make_settings", "make_accelerator", "build_optimizer", "resolve_mixed_precision",
           "batch_to_table", "EVENTS"]
