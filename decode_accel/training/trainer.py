"""The training loop: ``BaseTrainer`` (single channel) and ``MultiChannelTrainer`` (two-channel ratiometric).

An ``accelerate.Accelerator`` owns device placement, mixed precision, gradient accumulation and
distribution; the trainer owns the loop, the schedules, the hooks and the checkpoint format. The loop
(``train`` -> ``train_epoch`` -> ``_update`` -> ``validate``) reads top to bottom; everything optional
(loss schedules, curriculum, distillation, early stopping, plateau LR, divergence guard, monitoring) is a
hook (``decode_accel.training.hooks``, where a map shows where each event fires).

Data: a *map-style* loader (HDF5 / Arrow windows) goes through ``accelerator.prepare`` with a seedable
sampler, so processes see disjoint shards and a resumed run replays the same order
(``set_epoch`` + ``skip_first_batches``). The *on-the-fly simulated stream* (an ``IterableDataset``)
shards itself by process rank and is NOT prepared (prepare would make rank 0 simulate everything, or
every rank simulate everything); the trainer moves its batches to the device and counts the samples it
consumed so that a resumed run restarts the stream at the right sample index.

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
from typing import Any, Iterable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

from decode_accel.errors import DecodeAccelError
from decode_accel.training.builders import build_optimizer, resolve_mixed_precision
from decode_accel.training.hooks import (CurriculumHook, DistillationHook, EarlyStopping, Hook,
                                         MonitorHook, ReduceLROnPlateauHook)
from decode_accel.training.scheduler import build_lr_scheduler

logger = logging.getLogger("decode_accel.training")


def _is_stream(loader) -> bool:
    return isinstance(getattr(loader, "dataset", None), torch.utils.data.IterableDataset)


def batch_to_table(batch: dict, frame_offset: int, px_size_nm: float):
    """Ground-truth localization table (nm) of a batch's central frames; frame = frame_offset + sample index."""
    import pandas as pd

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


class BaseTrainer:
    """Trains a localization network with an ``accelerate.Accelerator``.

    Args:
        model: a network taking ``frames`` (B, C, 3, H, W) in photons and returning the output dict of
            docs/architecture.md (e.g. ``SigmaMUNet``).
        loss_fn: ``loss_fn(output, batch) -> {term: scalar, 'loss': total}`` with ``update_weights``.
        optimizer_config: ``{'type': 'AdamW', 'lr': 1e-3, ...}``: any ``torch.optim`` class and its kwargs.
        scheduler_config: ``{'type': 'StepLR', 'step_size': 30, 'gamma': 0.5, 'interval': 'epoch',
            'warmup_steps': 0}`` (see ``decode_accel.training.scheduler.build_lr_scheduler``);
            ``ReduceLROnPlateau`` installs a ``ReduceLROnPlateauHook`` on the validation loss.
        device: ``'cpu'`` forces the CPU (same as ``cpu=True``); otherwise the Accelerator places the
            model (a requested but missing GPU falls back to the CPU with a warning).
        mixed_precision: ``'no' | 'bf16' | 'fp16'``, ``True`` (bf16 on GPU, fp32 on CPU where bf16 is
            ~10x slower) or ``None`` (the launcher's setting, else fp32 on CPU and bf16 on GPU).
        hooks: extra ``Hook`` objects.
        postprocessor: ``PostProcessor`` turning output maps into a table (nm) for the validation
            metrics (JI, RMSE, efficiency); None -> validation reports losses only.
        accelerator: an existing Accelerator (then ``cpu``/``mixed_precision`` are the caller's business).
        cpu: force the CPU; also required for multi-process CPU training (see accelerate_notes.md).
        seed: base seed (``accelerate.utils.set_seed``; per-process streams derive their seeds from it).
        gradient_checkpointing: recompute activations in backward (sets the model's flag).
        px_size_nm: pixel size used for validation tables (nm); default the postprocessor's.
        checkpoint_dir / save_top_k / monitor_metric / mode: CheckpointManager settings for ``train(save_dir=...)``.
        config: the ``TrainingConfig`` (stored in checkpoints and the export folder).
        simulation_config: the simulation section (needed to write the export folder).
    """

    def __init__(self, model: torch.nn.Module, loss_fn, optimizer_config: dict | None = None,
                 scheduler_config: dict | None = None, device: str | torch.device | None = None,
                 mixed_precision: str | bool | None = None, hooks: Iterable[Hook] = (), postprocessor=None,
                 accelerator: Accelerator | None = None, cpu: bool = False, seed: int = 0,
                 gradient_checkpointing: bool = False, px_size_nm: float | None = None, config: Any = None,
                 simulation_config: Any = None, save_top_k: int = 3, monitor_metric: str = "val_loss",
                 mode: str = "min"):
        self.seed = int(seed)
        set_seed(self.seed)
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            logger.warning("device=%r requested but CUDA is not available; training on the CPU", str(device))
        cpu = bool(cpu or (device is not None and str(device) == "cpu"))
        if accelerator is None:
            try:
                accelerator = Accelerator(
                    cpu=cpu, mixed_precision=resolve_mixed_precision(mixed_precision, cpu),
                    dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, dispatch_batches=False))
            except ValueError as err:
                raise DecodeAccelError(str(err).splitlines()[0], field="mixed_precision/cpu",
                                       fix="one process can hold one Accelerator setting; restart the "
                                           "interpreter or pass the same values") from None
        self.accelerator = accelerator
        if gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing"):
                raise DecodeAccelError(f"{type(model).__name__} has no gradient_checkpointing flag",
                                       field="gradient_checkpointing", fix="use SigmaMUNet/DoubleMUNet or set it False")
            model.gradient_checkpointing = True
        self.loss_fn = loss_fn.to(accelerator.device) if isinstance(loss_fn, torch.nn.Module) else loss_fn
        self.optimizer_config = dict(optimizer_config or {"type": "AdamW", "lr": 1e-3})
        self.scheduler_config = dict(scheduler_config) if scheduler_config else None
        optimizer = build_optimizer(model.parameters(), self.optimizer_config)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.hooks: list[Hook] = list(hooks)
        if self.scheduler_config and self.scheduler_config.get("type") == "ReduceLROnPlateau":
            kw = {k: v for k, v in self.scheduler_config.items()
                  if k in ("mode", "factor", "patience", "min_lr", "threshold", "cooldown")}
            self.hooks.append(ReduceLROnPlateauHook(monitor=monitor_metric, **kw))
        self.postprocessor = postprocessor
        self.px_size_nm = px_size_nm if px_size_nm is not None else getattr(postprocessor, "px_size_nm", None)
        self.config, self.simulation_config = config, simulation_config
        self.save_top_k, self.monitor_metric, self.mode = save_top_k, monitor_metric, mode
        # loop state (saved in checkpoints)
        self.epoch, self.global_step, self.batch_idx = 0, 0, 0
        self.stream_samples = 0          # samples this process consumed from a simulated stream
        self._skip_batches = 0           # micro-batches of the current epoch already done (resume)
        self.history: dict[str, Any] = {"train_loss": [], "val_loss": [], "val_metrics": [], "lr": [],
                                        "best_val_loss": None, "best_epoch": None}
        self.lr_schedule = None
        self.checkpoint_manager = None
        self.skip_update, self.should_stop, self.stop_reason, self._stop_now = False, False, None, False
        self.grad_norm = None
        self.batch_size, self.accumulate_grad_batches, self.updates_per_epoch, self.batches_per_epoch = 1, 1, 1, 1
        self.gradient_clip_val, self.steps_per_epoch, self.save_every_n_steps = 0.0, None, None
        self.plot_every: int | None = None  # epochs between training-curve / prediction plots (with a monitor)
        self._prepared: dict[int, Any] = {}
        self._stream_iters: dict[int, Any] = {}
        self._stream_base: dict[int, int] = {}
        self._difficulty = None
        self._timer = None
        self.monitor = None  # the TrainingMonitor of the current fit, if any (hooks write events to it)
        self._epoch_terms: dict[str, float] = {}

    # ------------------------------------------------------------------ small helpers
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _fire(self, event: str, *args):
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def _chain(self, event: str, value, *args):
        for hook in self.hooks:
            value = getattr(hook, event)(self, value, *args)
        return value

    def _timed(self, name: str):
        return self._timer(name) if self._timer is not None else contextlib.nullcontext()

    def _waiting_for_data(self, batches):
        """Yield the batches, timing each wait for the next one as the monitor's 'data' phase."""
        iterator = iter(batches)
        while True:
            with self._timed("data"):
                batch = next(iterator, None)
            if batch is None:
                return
            yield batch

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def get_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        """Set the (base) learning rate; a running schedule keeps shaping it."""
        if self.lr_schedule is not None:
            self.lr_schedule.set_base_lr(lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = float(lr)

    def request_stop(self, reason: str, immediate: bool = False) -> None:
        """Leave the loop at the end of this epoch, or after this micro-batch when ``immediate``.

        Call it with the same decision on every process (hooks synchronise their verdicts)."""
        if not self.should_stop:
            logger.warning("stopping: %s", reason)
            self.should_stop, self.stop_reason = True, reason
        self._stop_now = self._stop_now or immediate

    def set_difficulty_schedule(self, schedule: list[dict]) -> None:
        """Install a curriculum difficulty schedule on the training stream (applied when it is iterated)."""
        self._difficulty = schedule

    # ------------------------------------------------------------------ data
    def _epoch_batches(self, loader):
        """(iterable of this epoch's micro-batches, their number) for ``loader`` at ``self.epoch``."""
        if _is_stream(loader):
            key = id(loader)
            if key not in self._stream_iters:  # one iterator for the whole fit: workers and position persist
                ds = loader.dataset
                # the DataLoader copies the dataset into its workers when the iterator starts: set first
                if self._difficulty is not None:
                    from decode_accel.data.stream import DifficultySchedule
                    ds.difficulty_schedule = DifficultySchedule(self._difficulty)
                if self.stream_samples:
                    if not hasattr(ds, "start_index"):
                        raise DecodeAccelError(f"{type(ds).__name__} has no start_index", field="resume",
                                               fix="resume needs a stream that can start at a sample index")
                    # start_index counts the samples of all processes together
                    base = self._stream_base.setdefault(key, int(ds.start_index))
                    ds.start_index = base + self.stream_samples * self.accelerator.num_processes
                self._stream_iters[key] = iter(loader)
            n = self.steps_per_epoch
            if n is None:
                raise DecodeAccelError("an endless simulated stream needs steps_per_epoch", field="steps_per_epoch",
                                       fix="pass train(steps_per_epoch=N) or set data.steps_per_epoch")
            return itertools.islice(self._stream_iters[key], n - self._skip_batches), n
        key = id(loader)
        if key not in self._prepared:
            self._prepared[key] = self.accelerator.prepare(loader)
        prepared = self._prepared[key]
        n = min(len(prepared), self.steps_per_epoch or len(prepared))
        active = self.accelerator.skip_first_batches(prepared, self._skip_batches) if self._skip_batches else prepared
        if hasattr(active, "set_epoch"):
            active.set_epoch(self.epoch)
        return itertools.islice(active, n - self._skip_batches), n

    # ------------------------------------------------------------------ the loop
    def train(self, train_loader, val_loader=None, epochs: int = 1, save_dir: str | os.PathLike | None = None,
              save_every: int = 1, validate_every: int = 1, early_stopping_patience: int | None = None,
              gradient_clip_val: float = 0.0, accumulate_grad_batches: int = 1, log_every: int = 50,
              steps_per_epoch: int | None = None, resume: bool = False, monitor=None,
              save_every_n_steps: int | None = None, val_steps: int | None = None,
              export_dir: str | os.PathLike | None = None) -> dict:
        """Train for ``epochs`` epochs and return the history.

        ``steps_per_epoch`` counts micro-batches (required for an endless simulated stream);
        ``accumulate_grad_batches`` micro-batches make one optimizer update; ``save_every`` (epochs) and
        ``save_every_n_steps`` (updates) write checkpoints under ``save_dir``; ``resume=True`` continues
        from the last complete checkpoint there. History keys: train_loss, val_loss, val_metrics (lists
        per epoch), lr, best_val_loss, best_epoch, total_time (s), global_step, stopped_early, stop_reason.
        """
        start = time.time()
        self._setup_fit(train_loader, epochs, save_dir, save_every, early_stopping_patience, gradient_clip_val,
                        accumulate_grad_batches, log_every, steps_per_epoch, resume, monitor, save_every_n_steps,
                        val_loader)
        self._fire("on_fit_start")
        for epoch in range(self.epoch, epochs):
            self.epoch = epoch
            self._fire("on_epoch_start", epoch)
            logs = {"epoch": epoch, "train_loss": self.train_epoch(train_loader)}
            logs.update({f"train_{k}": v for k, v in self._epoch_terms.items() if k != "loss"})
            if val_loader is not None and ((epoch + 1) % validate_every == 0 or epoch == epochs - 1):
                logs.update(self.validate(val_loader, val_steps=val_steps))
            self._record(logs)
            self._fire("on_epoch_end", epoch, logs)
            if save_dir is not None and ((epoch + 1) % save_every == 0 or epoch == epochs - 1 or self.should_stop):
                self.save_checkpoint(metrics=logs, epoch_complete=not self._stop_now)
            if self.should_stop:
                break
        self.history.update(total_time=time.time() - start, global_step=self.global_step,
                            stopped_early=self.should_stop, stop_reason=self.stop_reason)
        self._fire("on_fit_end", self.history)
        self._fitting = False
        if export_dir is not None or (save_dir is not None and self.simulation_config is not None):
            self.export(export_dir or Path(save_dir) / "export")
        return self.history

    def train_epoch(self, loader) -> float:
        """One epoch of micro-batches; returns the mean training loss over all processes."""
        standalone = not self._fitting  # the seed's own loop calls train_epoch once per epoch
        if standalone and not self._setup_done:
            self._setup_fit(loader, 1, None, 1, None, self.gradient_clip_val, self.accumulate_grad_batches, 50,
                            self.steps_per_epoch, False, None, None)
            self._fitting = False
        batches, n = self._epoch_batches(loader)
        self.model.train()
        self.accelerator.step = 0  # the accumulation counter starts each epoch at a group boundary
        sums: dict[str, float] = {}
        count, group = 0, 0
        for i, batch in enumerate(self._waiting_for_data(batches), start=self._skip_batches):
            self.batch_idx = i
            if group == 0:
                self._fire("on_step_start")
            if _is_stream(loader):
                self.stream_samples += int(batch["frames"].shape[0])
            batch = self._chain("on_batch", self._to_device(batch))
            if i == n - 1:  # last micro-batch of the epoch closes its accumulation group
                self.accelerator.step = self.accelerator.gradient_accumulation_steps - 1
            with self.accelerator.accumulate(self.model):
                with self._timed("forward"):
                    outputs = self.model(batch["frames"])
                    losses = self.loss_fn(outputs, batch)
                losses = self._chain("on_loss", losses, outputs, batch)
                skipped = self.skip_update
                with self._timed("backward"):
                    self.accelerator.backward(self._zero_loss() if self.skip_update else losses["loss"])
                self._fire("on_after_backward")
                group += 1
                if self.accelerator.sync_gradients:
                    self._update(losses)
                    group = 0
            if not skipped:  # a vetoed (e.g. NaN) micro-batch stays out of the epoch means
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                count += 1
            if self._stop_now:
                break
        self._skip_batches = 0
        if standalone:
            self.epoch += 1
        means = self._mean_across_processes(sums, count)
        self._epoch_terms = means
        return means.get("loss", float("nan"))

    def _update(self, losses: dict) -> None:
        """Close an accumulation group: clip, step, schedule, count, hooks, step checkpoints."""
        if self.skip_update:  # a hook vetoed this update (e.g. DivergenceGuard)
            self.optimizer.zero_grad(set_to_none=True)
            self.skip_update = False
            return
        with self._timed("optimizer"):
            if self.gradient_clip_val and self.gradient_clip_val > 0:
                self.grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.gradient_clip_val)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.lr_schedule is not None and not self.accelerator.optimizer_step_was_skipped:
            self.lr_schedule.step()
        self.global_step += 1
        self._fire("on_step_end", losses)
        if self.save_every_n_steps and self.global_step % self.save_every_n_steps == 0 and self.checkpoint_manager:
            self.save_checkpoint(metrics=None, epoch_complete=False)

    @torch.no_grad()
    def validate(self, loader, val_steps: int | None = None) -> dict:
        """Validation loss (+ its terms) and, with a postprocessor, the challenge metrics.

        Each process evaluates every ``num_processes``-th batch with the unwrapped model (no DDP
        collectives in eval), then sums and tables are combined, so every process returns the same
        metrics. Metrics: val_loss, val_<term>, and from ``decode_accel.evaluation.evaluate``: jaccard,
        rmse_lat (nm), efficiency_lat, ... ; frames are numbered by validation sample.
        """
        model = self.unwrapped_model
        was_training = model.training
        model.eval()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        sums: dict[str, float] = {}
        n_samples, offset = 0, 0
        gt_tables, pred_tables = [], []
        batches = loader if val_steps is None else itertools.islice(loader, val_steps)
        for i, batch in enumerate(batches):
            size = int(batch["frames"].shape[0])
            if i % world == rank:
                batch = self._to_device(batch)
                outputs = {k: v.float() for k, v in model(batch["frames"]).items()}
                losses = self.loss_fn(outputs, batch)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * size
                n_samples += size
                if self.postprocessor is not None:
                    pred_tables.append(self._postprocess(outputs, offset))
                    gt_tables.append(batch_to_table(batch, offset, self._px_size()))
            offset += size
        model.train(was_training)
        totals = self._sum_across_processes({**sums, "__n": float(n_samples)})
        n = max(totals.pop("__n"), 1.0)
        metrics = {("val_loss" if k == "loss" else f"val_{k}"): v / n for k, v in totals.items()}
        if self.postprocessor is not None:
            metrics.update(self._table_metrics(gt_tables, pred_tables))
        self._fire("on_eval_end", metrics)
        return metrics

    # ------------------------------------------------------------------ set-up, metrics, bookkeeping
    _fitting = False
    _setup_done = False

    def _setup_fit(self, train_loader, epochs, save_dir, save_every, patience, clip, accumulate, log_every,
                   steps_per_epoch, resume, monitor, save_every_n_steps, val_loader=None):
        if accumulate < 1:
            raise DecodeAccelError(f"accumulate_grad_batches must be >= 1, got {accumulate}",
                                   field="accumulate_grad_batches", fix="use 1 for no accumulation")
        self._fitting = self._setup_done = True
        self.should_stop, self.stop_reason, self._stop_now = False, None, False
        self.gradient_clip_val, self.accumulate_grad_batches = float(clip or 0.0), int(accumulate)
        self.accelerator.gradient_accumulation_steps = self.accumulate_grad_batches
        self.steps_per_epoch, self.save_every_n_steps = steps_per_epoch, save_every_n_steps
        self.batch_size = int(getattr(train_loader, "batch_size", None) or 1)
        if _is_stream(train_loader):
            n_batches = steps_per_epoch or 1
        else:
            prepared = self._prepared.setdefault(id(train_loader), self.accelerator.prepare(train_loader))
            n_batches = min(len(prepared), steps_per_epoch or len(prepared))
        self.batches_per_epoch = n_batches
        self.updates_per_epoch = math.ceil(n_batches / self.accumulate_grad_batches)
        if self.scheduler_config:
            sched = {k: v for k, v in self.scheduler_config.items()
                     if not (self.scheduler_config.get("type") == "ReduceLROnPlateau"
                             and k in ("mode", "factor", "patience", "min_lr", "threshold", "cooldown"))}
            self.lr_schedule = build_lr_scheduler(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer")
                                                  else self.optimizer, sched,
                                                  updates_per_epoch=self.updates_per_epoch,
                                                  total_updates=self.updates_per_epoch * epochs)
        if patience and not any(isinstance(h, EarlyStopping) for h in self.hooks):
            self.hooks.append(EarlyStopping(patience, monitor=self.monitor_metric, mode=self.mode))
        if monitor is not None or not any(isinstance(h, MonitorHook) for h in self.hooks):
            self.hooks = [h for h in self.hooks if not isinstance(h, MonitorHook)]
            self.hooks.append(MonitorHook(monitor, log_every=log_every, plot_every=self.plot_every,
                                          plot_loader=val_loader))
        self.monitor = monitor
        self._timer = getattr(monitor, "timer", None)
        if save_dir is not None:
            from decode_accel.training.checkpoint import CheckpointManager
            self.checkpoint_manager = CheckpointManager(save_dir, save_top_k=self.save_top_k,
                                                        monitor_metric=self.monitor_metric, mode=self.mode,
                                                        save_every_n_epochs=1, save_last=True)
            if resume and self.checkpoint_manager.has_checkpoint():
                self._restore(self.checkpoint_manager.load_last_checkpoint(rank=self.accelerator.process_index))
        elif resume:
            raise DecodeAccelError("resume=True needs save_dir", field="resume", fix="pass the checkpoint folder as save_dir")

    def _px_size(self) -> float:
        if self.px_size_nm is None:
            raise DecodeAccelError("validation metrics need the pixel size", field="px_size_nm",
                                   fix="pass px_size_nm to the trainer or the PostProcessor")
        return float(self.px_size_nm)

    def _postprocess(self, outputs: dict, frame_offset: int):
        try:
            return self.postprocessor(outputs, frame_offset=frame_offset)
        except TypeError:
            return self.postprocessor(outputs, frame_offset, self._px_size())

    def _table_metrics(self, gt_tables: list, pred_tables: list) -> dict:
        import pandas as pd
        from accelerate.utils import gather_object

        from decode_accel.evaluation import evaluate

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

    def _sum_across_processes(self, values: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        t = self.accelerator.reduce(t, reduction="sum")
        return dict(zip(keys, t.tolist()))

    def _mean_across_processes(self, sums: dict[str, float], count: int) -> dict[str, float]:
        totals = self._sum_across_processes({**sums, "__n": float(count)})
        n = max(totals.pop("__n"), 1.0)
        return {k: v / n for k, v in totals.items()}

    def _zero_loss(self) -> torch.Tensor:
        # a finite zero that touches every parameter: the skipped update still runs DDP's all-reduce
        # on every process, so no process waits for a collective the others never start
        return sum((p.reshape(-1)[0] * 0.0 for p in self.model.parameters() if p.requires_grad),
                   torch.zeros((), device=self.device))

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
        """JSON-able loop state: position, hook states and history."""
        return {
            "epoch": self.epoch, "global_step": self.global_step, "epoch_complete": bool(epoch_complete),
            "batches_done": 0 if epoch_complete else self.batch_idx + 1,
            "stream_samples": self.stream_samples,
            "hooks": {f"{i}:{type(h).__name__}": h.state_dict() for i, h in enumerate(self.hooks)},
            "history": self.history,
        }

    def save_checkpoint(self, metrics: dict | None = None, epoch_complete: bool = True):
        """Write a checkpoint through the CheckpointManager (all processes wait for it)."""
        if self.checkpoint_manager is None:
            return None
        self.accelerator.wait_for_everyone()
        path = self.checkpoint_manager.save_checkpoint(
            self.epoch, self.model, self.optimizer, scheduler=self.lr_schedule,
            metrics={k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
            config=_config_dict(self.config), step=self.global_step,
            trainer_state=self.trainer_state(epoch_complete), accelerator=self.accelerator)
        self.accelerator.wait_for_everyone()
        return path

    def _restore(self, ckpt: dict) -> None:
        from decode_accel.training.checkpoint import restore_checkpoint
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
        hook_states = state.get("hooks") or {}
        for i, h in enumerate(self.hooks):
            key = f"{i}:{type(h).__name__}"
            if key in hook_states:
                h.load_state_dict(hook_states[key])
        logger.info("resumed at epoch %d, update %d (%d micro-batches into the epoch)", self.epoch,
                    self.global_step, self._skip_batches)

    def rollback_to_last_checkpoint(self, lr_factor: float = 0.5) -> bool:
        """Reload weights and optimizer from the last complete checkpoint and scale the lr; False if none."""
        if self.checkpoint_manager is None or not self.checkpoint_manager.has_checkpoint():
            return False
        from decode_accel.training.checkpoint import restore_checkpoint
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
            try:
                from decode_accel.hub import export_model
            except ImportError:  # hub not installed in this build: weights + config.json only
                logger.warning("decode_accel.hub is missing: writing only save_pretrained() to %s", out_dir)
                self.unwrapped_model.save_pretrained(out_dir)
                path = Path(out_dir)
            else:
                path = export_model(out_dir, self.unwrapped_model, simulation_config=self.simulation_config,
                                    metrics=last, training_config=self.config)
        self.accelerator.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ construction from a config
    @classmethod
    def from_config(cls, config, **overrides) -> "BaseTrainer":
        """Build model, loss, trainer and hooks from a ``TrainingConfig`` (see ``builders.build_trainer``)."""
        from decode_accel.training.builders import build_trainer
        return build_trainer(config, trainer_cls=cls, **overrides)


class MultiChannelTrainer(BaseTrainer):
    """Two-channel ratiometric training (``DoubleMUNet`` + ``UnifiedLoss``).

    The loop is ``BaseTrainer``'s; the loss terms (ch1, ch2, ratio, conservation, uncertainty, bg) are
    logged by name, and ``validate`` adds ratio metrics: with a dye table (``dye_table``: list of
    ``{ratio_mean, ratio_sd, probability}``) the evaluation reports the colour crosstalk.
    """

    def __init__(self, *args, dye_table: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dye_table = dye_table if dye_table is not None else getattr(self.postprocessor, "dye_table", None)

    def _evaluate_kwargs(self) -> dict:
        import inspect

        from decode_accel.evaluation import evaluate
        params = inspect.signature(evaluate).parameters
        return {"dye_table": self.dye_table} if self.dye_table is not None and "dye_table" in params else {}


# ---------------------------------------------------------------------------------------------- seed names
class DistillationTrainer(BaseTrainer):
    """``BaseTrainer`` with a ``DistillationHook`` (the seed's name): ``teacher_model``, ``temperature``, ``alpha``."""

    def __init__(self, teacher_model: torch.nn.Module, *args, temperature: float = 1.0, alpha: float = 0.5,
                 **kwargs):
        hooks = list(kwargs.pop("hooks", ())) + [DistillationHook(teacher_model, alpha=alpha, temperature=temperature)]
        super().__init__(*args, hooks=hooks, **kwargs)


class CurriculumTrainer(BaseTrainer):
    """``BaseTrainer`` with a ``CurriculumHook`` (the seed's name): ``curriculum_config`` = list of stages."""

    def __init__(self, curriculum_config: list, *args, **kwargs):
        hooks = list(kwargs.pop("hooks", ())) + [CurriculumHook(curriculum_config)]
        super().__init__(*args, hooks=hooks, **kwargs)


class AdaptiveLRTrainer(BaseTrainer):
    """``BaseTrainer`` with a ``ReduceLROnPlateauHook`` on the validation loss (the seed's name)."""

    def __init__(self, *args, patience: int = 10, factor: float = 0.5, min_lr: float = 1e-7, **kwargs):
        hooks = list(kwargs.pop("hooks", ())) + [ReduceLROnPlateauHook(factor=factor, patience=patience,
                                                                       min_lr=min_lr)]
        super().__init__(*args, hooks=hooks, **kwargs)


# ---------------------------------------------------------------------------------------------- utilities
def _config_dict(config) -> dict | None:
    if config is None:
        return None
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    return dict(config)
