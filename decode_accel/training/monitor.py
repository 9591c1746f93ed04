"""Training monitor: metric logs (JSONL + TensorBoard/W&B through ``accelerate.tracking``), plots, timings, anomalies.

Everything a run logs goes to ``log_dir``:

* ``metrics.jsonl`` - one JSON object per log call (``kind`` = batch | epoch | anomaly | performance),
  non-finite numbers written as the strings "nan", "inf", "-inf" so every line is strict JSON;
* ``tensorboard/<run_name>/`` - TensorBoard event files (and the flattened hparams);
* ``wandb/`` - W&B run files (``WANDB_MODE=offline`` works without network; ``wandb sync`` later);
* ``plots/`` - PNG training curves and prediction panels.

Only the main process writes; on other processes the logging calls do nothing (timers still measure).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from accelerate.state import PartialState
from accelerate.tracking import TensorBoardTracker, WandBTracker

from decode_accel.errors import DecodeAccelError
from decode_accel.models.variance import network_input
from decode_accel.io._atomic import writable_folder
from decode_accel.io._json import to_json_data
from decode_accel.training.config.dicts import flatten_dict

logger = logging.getLogger(__name__)

__all__ = ["TrainingMonitor"]


def _to_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean().item() if value.numel() else float("nan")
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def robust_location_scale(values) -> tuple[float, float]:
    """(median, scale) of recent loss values, for spike tests that also work for negative losses.

    The scale is the larger of |median| and 1.4826 x the median absolute deviation (the standard
    deviation for Gaussian noise): a mixture NLL hovering around zero is judged by its own spread,
    not by a near-zero median.
    """
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    return median, max(abs(median), 1.4826 * mad, 1e-6)


class TrainingMonitor:
    """Logs and plots a training run.

    Args:
        log_dir: output folder (created on the main process).
        use_tensorboard: write TensorBoard events through ``accelerate.tracking.TensorBoardTracker``.
        use_wandb: log to Weights & Biases through ``accelerate.tracking.WandBTracker``; W&B files go
            under ``log_dir/wandb`` unless ``WANDB_DIR`` is set. Without network set ``WANDB_MODE=offline``.
        wandb_project: W&B project name (default ``decode_accel``).
        wandb_config: run configuration (nested dicts or a pydantic config); flattened to dotted keys
            and stored as hparams in every tracker.
        use_jsonl: write ``metrics.jsonl``.
        is_main_process: False on the other processes of a multi-process run (they write nothing).
        run_name: name of the run in the trackers.
        spike_factor: a loss above ``spike_factor`` x the running median of the last ``spike_window``
            values is flagged as a spike.
    """

    def __init__(self, log_dir: str | os.PathLike, use_tensorboard: bool = True, use_wandb: bool = False,
                 wandb_project: str | None = None, wandb_config: Mapping | Any | None = None, use_jsonl: bool = True,
                 is_main_process: bool = True, *, run_name: str = "train", spike_factor: float = 10.0,
                 spike_window: int = 50, spike_min_history: int = 5):
        self.log_dir = Path(log_dir)
        self.is_main_process = is_main_process
        self.run_name = run_name
        self.spike_factor = spike_factor
        self.spike_min_history = spike_min_history
        self._recent: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=spike_window))
        self.batch_history: list[dict[str, Any]] = []
        self.epoch_history: list[dict[str, Any]] = []
        self.anomalies: list[dict[str, Any]] = []
        self._step = 0
        self._phase_seconds: dict[str, float] = collections.defaultdict(float)
        self._phase_calls: dict[str, int] = collections.defaultdict(int)
        self._samples = 0
        self._perf_start: float | None = None
        self._jsonl = None
        self.trackers: list = []
        self._closed = False
        if not is_main_process:
            return
        writable_folder(self.log_dir, field="monitoring.log_dir",
                        fix="choose a folder you can write to, with --output_dir DIR or monitoring.log_dir=DIR")
        if use_jsonl:
            try:
                self._jsonl = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8", buffering=1)
            except OSError as err:
                raise DecodeAccelError(f"cannot write: {err.strerror or err}", path=self.log_dir / "metrics.jsonl",
                                       field="monitoring.log_dir",
                                       fix="choose a folder you can write to, with --output_dir DIR or "
                                           "monitoring.log_dir=DIR") from None
        config = wandb_config.model_dump(mode="json") if hasattr(wandb_config, "model_dump") else wandb_config
        flat_config = flatten_dict(config, scalars=True) if config else {}
        if use_tensorboard:
            tracker = TensorBoardTracker(run_name, self.log_dir / "tensorboard")
            tracker.start()
            self.trackers.append(tracker)
        if use_wandb:
            self.trackers.append(self._start_wandb(wandb_project, flat_config))
        if flat_config:
            for tracker in self.trackers:
                if tracker.name == "tensorboard":  # W&B received the config at init
                    tracker.store_init_configuration(flat_config)

    def _start_wandb(self, project: str | None, flat_config: dict):
        wandb_dir = Path(os.environ.get("WANDB_DIR") or self.log_dir / "wandb")
        wandb_dir.mkdir(parents=True, exist_ok=True)
        # accelerate's trackers log through its process state: a monitor built before any Accelerator (a user's
        # script, a notebook) would fail in tracker.start(); PartialState() is the existing state once one exists
        PartialState()
        tracker = WandBTracker(project or "decode_accel", dir=os.fspath(wandb_dir), name=self.run_name,
                               config=flat_config or None)
        try:
            tracker.start()
        except Exception as err:  # noqa: BLE001 - wandb raises its own UsageError/CommError types
            raise DecodeAccelError(f"cannot start Weights & Biases: {str(err).splitlines()[0]}",
                                   field="monitoring.use_wandb",
                                   fix="run `wandb login`, or set WANDB_MODE=offline to log without network") from None
        return tracker

    # ------------------------------------------------------------------------------------------
    # Logging
    # ------------------------------------------------------------------------------------------
    def log_event(self, kind: str, **fields: Any) -> None:
        """Write a one-off event (e.g. ``kind='divergence'``) to the JSONL log and the python log."""
        if not self.is_main_process:
            return
        logger.warning("%s: %s", kind, ", ".join(f"{k}={v}" for k, v in fields.items()))
        self._write({"kind": kind, "time": time.time(), **fields})

    def _write(self, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(to_json_data(record, nonfinite="text", default=str)) + "\n")

    def _track(self, values: dict[str, Any], step: int) -> None:
        scalars = {}
        for k, v in values.items():
            v = _to_number(v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                scalars[k] = float(v)
        if scalars:
            for tracker in self.trackers:
                tracker.log(scalars, step=step)

    def log_batch_metrics(self, epoch: int, batch_idx: int, metrics: Mapping[str, Any], step: int | None = None
                          ) -> list[dict[str, Any]]:
        """Log the metrics of one training batch (loss terms, learning rate, ...).

        Args:
            epoch: 0-based epoch; batch_idx: batch index within the epoch.
            metrics: numbers (or 0-d tensors) by name.
            step: global step for the trackers; defaults to a counter of log calls.

        Returns:
            The anomalies found in these metrics (also logged).
        """
        if step is None:
            step = self._step
        self._step = step + 1
        values = {k: _to_number(v) for k, v in metrics.items()}
        anomalies = self.check_anomalies(values, step)
        if not self.is_main_process:
            return anomalies
        record = {"kind": "batch", "time": time.time(), "epoch": epoch, "batch": batch_idx, "step": step, **values}
        self.batch_history.append(record)
        self._write(record)
        self._track(values, step)
        return anomalies

    def log_epoch_metrics(self, epoch: int, train_metrics: Mapping[str, Any] | None,
                          val_metrics: Mapping[str, Any] | None, model: torch.nn.Module | None = None,
                          step: int | None = None) -> dict[str, Any]:
        """Log the end-of-epoch metrics, prefixed ``train_`` / ``val_`` (unless they already are).

        With ``model``, adds ``grad_norm`` and ``weight_norm`` (global L2 norms), the largest
        per-parameter gradient norm and the number of parameters whose gradient is exactly zero
        (dead units), from the gradients currently stored on the model.

        Returns:
            The flat record that was logged.
        """
        record: dict[str, Any] = {}
        for prefix, metrics in (("train_", train_metrics), ("val_", val_metrics)):
            for k, v in (metrics or {}).items():
                name = k if k.startswith(prefix) else prefix + k
                record[name] = _to_number(v)
        if model is not None:
            record.update(self.model_summary(model))
        if step is None:
            step = self._step
        anomalies = self.check_anomalies({k: v for k, v in record.items() if not k.startswith("grad")}, step)
        if model is not None and record.get("grad_params", 0) > 0 and record.get("grad_norm") == 0.0:
            anomalies.append(self._flag({"type": "dead_gradients", "metric": "grad_norm", "value": 0.0,
                                         "step": step, "message": "every gradient is zero"}))
        if self.is_main_process:
            full = {"kind": "epoch", "time": time.time(), "epoch": epoch, "step": step, **record}
            self.epoch_history.append(full)
            self._write(full)
            self._track({f"epoch/{k}": v for k, v in record.items()}, step)
        return record

    @staticmethod
    def model_summary(model: torch.nn.Module) -> dict[str, Any]:
        """Global gradient/weight L2 norms, the parameter with the largest gradient norm, zero-gradient count."""
        weight_sq, grad_sq, largest, largest_name, zero, with_grad = 0.0, 0.0, -1.0, "", 0, 0
        for name, p in model.named_parameters():
            weight_sq += float(p.detach().float().square().sum())
            if p.grad is None:
                continue
            with_grad += 1
            g = float(p.grad.detach().float().norm())
            grad_sq += g * g
            if g > largest:
                largest, largest_name = g, name
            if g == 0.0:
                zero += 1
        out: dict[str, Any] = {"weight_norm": math.sqrt(weight_sq), "grad_params": with_grad}
        if with_grad:
            out.update({"grad_norm": math.sqrt(grad_sq), "grad_norm_max": largest,
                        "grad_norm_max_param": largest_name, "grad_zero_params": zero})
        return out

    # ------------------------------------------------------------------------------------------
    # Anomalies
    # ------------------------------------------------------------------------------------------
    def _flag(self, anomaly: dict[str, Any]) -> dict[str, Any]:
        self.anomalies.append(anomaly)
        logger.warning("training anomaly at step %s: %s %s=%s (%s)", anomaly.get("step"), anomaly["type"],
                       anomaly.get("metric"), anomaly.get("value"), anomaly.get("message", ""))
        if self.is_main_process:
            self._write({"kind": "anomaly", "time": time.time(), **anomaly})
        return anomaly

    def check_anomalies(self, metrics: Mapping[str, Any], step: int,
                        output: Mapping[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
        """Flag non-finite metrics, loss spikes and dead model outputs.

        * non-finite: any metric that is NaN or infinite;
        * spike: a metric whose name contains "loss" exceeds ``spike_factor`` x the median of its
          recent finite values (after ``spike_min_history`` values; losses can be negative, so the
          test is on the distance above the median in units of :func:`robust_location_scale`);
        * dead output (with ``output``, the model's map dict): a map that is constant over the batch,
          or a detection map ``p`` whose maximum is below 1e-4.

        Returns:
            The anomalies (each also logged to python logging and the JSONL file).
        """
        found = []
        for name, value in metrics.items():
            value = _to_number(value)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            value = float(value)
            if not math.isfinite(value):
                found.append(self._flag({"type": "non_finite", "metric": name, "value": value, "step": step,
                                         "message": "lower the learning rate or enable gradient clipping"}))
                continue
            if "loss" in name:
                recent = self._recent[name]
                if len(recent) >= self.spike_min_history:
                    median, scale = robust_location_scale(recent)
                    if value - median > (self.spike_factor - 1.0) * scale:
                        found.append(self._flag({"type": "spike", "metric": name, "value": value, "step": step,
                                                 "median": median,
                                                 "message": f"{(value - median) / scale:.1f} scales above the "
                                                            f"running median"}))
                recent.append(value)
        if output is not None:
            for name, tensor in output.items():
                if not isinstance(tensor, torch.Tensor) or tensor.numel() < 2 or not tensor.is_floating_point():
                    continue
                t = tensor.detach().float()
                if name == "p" and float(t.max()) < 1e-4:
                    found.append(self._flag({"type": "dead_output", "metric": name, "value": float(t.max()),
                                             "step": step, "message": "the detection map is zero everywhere"}))
                elif float(t.std()) == 0.0:
                    found.append(self._flag({"type": "dead_output", "metric": name, "value": float(t.mean()),
                                             "step": step, "message": "the map is constant over the batch"}))
        return found

    # ------------------------------------------------------------------------------------------
    # Performance
    # ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def timer(self, name: str, *, sync_cuda: bool = False):
        """Accumulate the wall time of a phase (e.g. data_wait, forward, backward, optimizer).

        ``sync_cuda=True`` waits for queued GPU work at both ends so the time is the phase's own.
        """
        if self._perf_start is None:
            self._perf_start = time.perf_counter()
        if sync_cuda and torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync_cuda and torch.cuda.is_available():
                torch.cuda.synchronize()
            self._phase_seconds[name] += time.perf_counter() - start
            self._phase_calls[name] += 1

    def reset_performance(self) -> None:
        """Forget the timings so far (e.g. after warm-up updates); the clock restarts now."""
        self._phase_seconds.clear()
        self._phase_calls.clear()
        self._samples = 0
        self._perf_start = time.perf_counter()

    def add_samples(self, n: int) -> None:
        """Count ``n`` processed training samples (for samples/s)."""
        if self._perf_start is None:
            self._perf_start = time.perf_counter()
        self._samples += int(n)

    def performance_summary(self, log: bool = True) -> dict[str, Any]:
        """Samples/s, seconds and share of wall time per timed phase, peak memory.

        ``peak_rss_mib`` is this process's peak resident memory (MiB); ``cuda_max_allocated_mib`` the
        peak GPU memory allocated by torch (MiB) when a GPU is in use.
        """
        wall = time.perf_counter() - self._perf_start if self._perf_start is not None else 0.0
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_mib = rss_kib / (1024 * 1024) if sys.platform == "darwin" else rss_kib / 1024  # bytes on macOS
        summary: dict[str, Any] = {
            "wall_seconds": wall,
            "samples": self._samples,
            "samples_per_second": self._samples / wall if wall > 0 else float("nan"),
            "phases": {name: {"seconds": s, "calls": self._phase_calls[name],
                              "share": s / wall if wall > 0 else float("nan")}
                       for name, s in self._phase_seconds.items()},
            "peak_rss_mib": rss_mib,
        }
        timed = sum(self._phase_seconds.values())
        summary["untimed_share"] = max(0.0, 1.0 - timed / wall) if wall > 0 else float("nan")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            summary["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if log and self.is_main_process:
            self._write({"kind": "performance", "time": time.time(), **summary})
        return summary

    # ------------------------------------------------------------------------------------------
    # Plots
    # ------------------------------------------------------------------------------------------
    def _plot_path(self, path, default_name: str) -> Path:
        path = Path(path) if path is not None else self.log_dir / "plots" / default_name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _log_image(self, tag: str, path: Path, step: int | None) -> None:
        """Send a written PNG to the trackers that show images (TensorBoard, W&B)."""
        if step is None or not self.trackers:
            return
        import matplotlib.image as mpimg  # heavy: matplotlib only for plots
        image = mpimg.imread(path)[..., :3]  # (H, W, 3) floats in [0, 1]
        for tracker in self.trackers:
            if hasattr(tracker, "log_images"):
                kwargs = {"dataformats": "HWC"} if tracker.name == "tensorboard" else {}
                tracker.log_images({tag: image}, step=step, **kwargs)

    def plot_training_curves(self, path: str | os.PathLike | None = None, step: int | None = None) -> Path:
        """PNG of the logged losses (batch and epoch, train and val), the learning rate and the other
        validation metrics over steps. Default path ``log_dir/plots/training_curves.png``; with
        ``step`` the image is also sent to the trackers."""
        import matplotlib  # heavy: matplotlib only for plots
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt  # heavy: pyplot is slow to import, only for plots

        path = self._plot_path(path, "training_curves.png")
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        ax_loss, ax_lr, ax_val = axes

        def series(rows, key):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
                   and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
            return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])

        batch_loss_keys = sorted({k for r in self.batch_history for k in r if "loss" in k})
        for key in batch_loss_keys:
            x, y = series(self.batch_history, key)
            ax_loss.plot(x, y, lw=0.8, alpha=0.6, label=f"{key} (batch)")
        epoch_loss_keys = sorted({k for r in self.epoch_history for k in r if k.endswith("loss")})
        for key in epoch_loss_keys:
            x, y = series(self.epoch_history, key)
            ax_loss.plot(x, y, "o-", label=key)
        ax_loss.set(title="loss", xlabel="step", ylabel="loss")
        lr_keys = sorted({k for r in self.batch_history for k in r if k in ("lr", "learning_rate")})
        for key in lr_keys:
            ax_lr.plot(*series(self.batch_history, key), label=key)
        ax_lr.set(title="learning rate", xlabel="step", ylabel="lr")
        val_keys = sorted({k for r in self.epoch_history for k in r if k.startswith("val_") and
                           not k.endswith("loss")})
        for key in val_keys:
            ax_val.plot(*series(self.epoch_history, key), "o-", label=key)
        ax_val.set(title="validation metrics", xlabel="step")
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes)
        if any(self._positive(self.batch_history, k) for k in batch_loss_keys):
            ax_loss.set_yscale("log")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        self._log_image("training_curves", path, step)
        return path

    @staticmethod
    def _positive(rows, key) -> bool:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return bool(vals) and min(vals) > 0

    def plot_model_predictions(self, model: torch.nn.Module, batch_or_loader: Mapping | Iterable,
                               postprocess: Callable | None = None, path: str | os.PathLike | None = None,
                               index: int = 0, threshold: float = 0.5, step: int | None = None) -> Path:
        """PNG of one sample: the central input frame (photons) with the true emitters (``tgt_xyz``,
        circles) and the predicted ones (crosses), next to the ``p``, ``photons`` and ``bg`` maps.

        Args:
            model: maps ``frames`` (B, C, 3, H, W) to the output dict (architecture contract).
            batch_or_loader: a batch dict, or an iterable of them (the first batch is used).
            postprocess: ``PostProcessor``-like callable ``(output, frame_offset, px_size) -> DataFrame``;
                called with px_size = 1 so its x, y come back in pixels. Without it, pixels with
                p > ``threshold`` are shown at their centre plus the predicted (dx, dy).
            path: output PNG; default ``log_dir/plots/predictions.png``.
            step: when given, the image is also sent to the trackers at this step.
        """
        import matplotlib  # heavy: matplotlib only for plots
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt  # heavy: pyplot is slow to import, only for plots

        batch = batch_or_loader if isinstance(batch_or_loader, Mapping) else next(iter(batch_or_loader))
        path = self._plot_path(path, "predictions.png")
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        frames = batch["frames"][index: index + 1].to(device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = model(network_input(batch, model)[index: index + 1].to(device))
        finally:
            model.train(was_training)
        output = {k: v.detach().float().cpu() for k, v in output.items() if isinstance(v, torch.Tensor)}

        image = frames[0, 0, frames.shape[2] // 2].float().cpu().numpy()
        h, w = image.shape
        extent = (0, w, h, 0)  # pixel (i, j) covers [j, j+1) x [i, i+1): centres at j + 0.5, i + 0.5
        if postprocess is not None:
            table = postprocess(output, 0, 1.0)
            table = table[table["frame"] == 0] if "frame" in table else table
            pred_x, pred_y = table["x"].to_numpy(), table["y"].to_numpy()
        elif "p" in output:
            p = output["p"][0]
            ii, jj = torch.nonzero(p > threshold, as_tuple=True)
            dx = output["dx"][0][ii, jj] if "dx" in output else torch.zeros(len(ii))
            dy = output["dy"][0][ii, jj] if "dy" in output else torch.zeros(len(ii))
            pred_x, pred_y = (jj + 0.5 + dx).numpy(), (ii + 0.5 + dy).numpy()
        else:
            pred_x = pred_y = []

        panels = [("p", "detection probability"), ("photons", "photons"), ("bg", "background (photons/px)")]
        panels = [(k, t) for k, t in panels if k in output]
        fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.2 * (1 + len(panels)), 4))
        axes = list(axes) if len(panels) else [axes]
        ax = axes[0]
        im = ax.imshow(image, cmap="gray", extent=extent, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, label="photons")
        if "tgt_xyz" in batch:
            xyz = batch["tgt_xyz"][index].cpu()
            mask = batch["tgt_mask"][index].cpu().bool() if "tgt_mask" in batch else torch.ones(len(xyz), dtype=bool)
            ax.scatter(xyz[mask, 0], xyz[mask, 1], s=60, facecolors="none", edgecolors="lime", label="true")
        ax.scatter(pred_x, pred_y, s=40, marker="x", c="red", label="predicted")
        ax.set(title="central frame", xlim=(0, w), ylim=(h, 0), xlabel="x (px)", ylabel="y (px)")
        ax.legend(fontsize=7, loc="upper right")
        for ax, (key, title) in zip(axes[1:], panels):
            m = output[key][0]
            m = m[0] if m.dim() == 3 else m  # bg is (C, H, W): show channel 1
            im = ax.imshow(m.numpy(), extent=extent, interpolation="nearest",
                           vmin=0 if key == "p" else None, vmax=1 if key == "p" else None)
            fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set(title=title, xlabel="x (px)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        self._log_image("predictions", path, step)
        return path

    # ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush and close the trackers and the JSONL file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception as err:  # noqa: BLE001 - a tracker failing at exit must not lose the run
                logger.warning("tracker %s did not close cleanly: %s", tracker.name, err)
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> "TrainingMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
