"""Checkpoints that are either complete or ignored: ``step-N/`` folders with a manifest written last.

Layout of one checkpoint (``save_dir/step-N/``, N = global optimizer step, or the epoch when no step is given)::

    model.safetensors      unwrapped weights (no ``module.`` / ``_orig_mod.`` prefixes)
    optimizer.pt           optimizer state_dict   (torch.save; read with weights_only=True)
    scheduler.pt           LR-scheduler state_dict (optional, same)
    rng_rank{r}.pt         python / numpy / torch CPU (+CUDA) RNG states of process rank r
    trainer_state.json     JSON-able trainer state: hook states, data-stream position, history
    metrics.json           the metrics passed with this save
    config.yaml            the resolved training config (optional)
    complete.json          manifest: format version, epoch, step, monitored value, size + sha256 of every file

A checkpoint is written as ``step-N.tmp-<pid>/``; every file is fsynced, the manifest is written last,
then the folder is renamed with ``os.replace``. A folder without a valid manifest (a crash mid-save, a
deleted or edited file) is skipped with a warning, so resuming always finds the newest *complete*
checkpoint. Nothing is ever unpickled: weights are safetensors and the ``.pt`` files are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file

from decode_accel.errors import DecodeAccelError
from decode_accel.export import unwrap_model
from decode_accel.io._atomic import fsync_folder, give_umask_mode, swap_folder
from decode_accel.io._json import to_json_data
from decode_accel.training.hooks import improved

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^step-(\d+)\.tmp-(\d+)$")
MANIFEST = "complete.json"

__all__ = ["CheckpointManager", "FORMAT_VERSION", "load_checkpoint", "load_model_state", "restore_checkpoint",
           "capture_rng_state", "restore_rng_state", "unwrap_model"]


# ----------------------------------------------------------------------------------------------
# Model unwrapping, RNG state
# ----------------------------------------------------------------------------------------------

def _clean_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):  # a wrapper the unwrapping above did not know about
            while key.startswith(prefix):
                key = key[len(prefix):]
        # clone: safetensors refuses tensors that share storage; contiguous CPU copies are always accepted
        out[key] = value.detach().to("cpu").clone().contiguous()
    return out


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU, CUDA) RNG states of this process, as weights_only-loadable data."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo ``capture_rng_state``: the next random numbers continue the saved streams exactly."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": np_state["bit_generator"],
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


# ----------------------------------------------------------------------------------------------
# File helpers
# ----------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_fsync_path = fsync_folder


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _to_json(obj, what: str) -> bytes:
    # non-finite numbers are kept (Python's json reads NaN/Infinity back): a resumed run sees the same state
    try:
        return (json.dumps(to_json_data(obj, nonfinite="keep"), indent=1) + "\n").encode()
    except (TypeError, ValueError) as err:
        raise DecodeAccelError(f"{what} cannot be stored as JSON: {err}", field=what,
                               fix="pass only numbers, strings, lists and dicts") from None


def _torch_bytes(obj, what: str) -> bytes:
    """torch.save into memory, checked to load back with weights_only=True (so resuming never unpickles code)."""
    buf = io.BytesIO()
    try:
        torch.save(obj, buf)
        data = buf.getvalue()
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unpickling refusal means the state holds arbitrary objects
        raise DecodeAccelError(f"{what} holds objects that cannot be stored safely ({str(err).splitlines()[0]})",
                               field=what, fix="keep only tensors, numbers, strings, lists and dicts in it") from None
    return data


def _metric_value(metrics: dict | None, name: str) -> float | None:
    if not metrics or name not in metrics:
        return None
    value = metrics[name]
    try:
        value = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return value


def _process_info(accelerator) -> tuple[int, int, bool]:
    if accelerator is not None:
        return accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    rank = int(os.environ.get("RANK", 0))
    return rank, int(os.environ.get("WORLD_SIZE", 1)), rank == 0


def _broadcast(obj, accelerator):
    """Main process's ``obj`` on every process (identity when single-process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return obj
    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _barrier(accelerator) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def _read_manifest(folder: Path, *, verify_hash: bool) -> dict:
    """The manifest of a complete checkpoint; raises DecodeAccelError when incomplete or corrupt."""
    path = folder / MANIFEST
    if not path.is_file():
        raise DecodeAccelError(f"checkpoint is incomplete: {MANIFEST} is missing", path=folder,
                               fix="use another checkpoint; this save was interrupted")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        version = int(manifest["format_version"])
    except (ValueError, KeyError, TypeError):
        raise DecodeAccelError(f"{MANIFEST} is unreadable", path=folder, fix="use another checkpoint") from None
    if version > FORMAT_VERSION:
        raise DecodeAccelError(f"checkpoint format {version} is newer than this decode_accel understands "
                               f"({FORMAT_VERSION})", path=folder, fix="upgrade decode_accel")
    for name, info in files.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != info["size"]:
            raise DecodeAccelError(f"checkpoint file {name} is missing or has the wrong size", path=folder,
                                   fix="use another checkpoint")
        if verify_hash and _sha256(f) != info["sha256"]:
            raise DecodeAccelError(f"checkpoint file {name} is corrupt (sha256 mismatch)", path=folder,
                                   fix="use another checkpoint")
    return manifest


def _torch_load(path: Path):
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001
        raise DecodeAccelError(f"cannot read {path.name} safely ({str(err).splitlines()[0]})", path=path.parent,
                               fix="use a checkpoint written by decode_accel") from None


def load_checkpoint(folder: str | os.PathLike, *, rank: int | None = None, verify: bool = True) -> dict[str, Any]:
    """Read one ``step-N`` checkpoint folder.

    Returns a dict with ``model_state_dict`` (CPU tensors), ``optimizer_state_dict``,
    ``scheduler_state_dict`` (None when not saved), ``epoch``, ``step``, ``metrics``, ``config``
    (plain dict or None), ``trainer_state`` (dict), ``rng_state`` (this rank's, or None) and ``path``.

    Raises:
        DecodeAccelError: incomplete, corrupt, or written by a newer format version.
    """
    try:
        return _load_checkpoint(folder, rank=rank, verify=verify)
    except DecodeAccelError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        # a damaged JSON/YAML/torch file whose manifest was rewritten to match
        first = str(err).splitlines()[0] if str(err) else ""
        raise DecodeAccelError(f"damaged checkpoint ({type(err).__name__}: {first})", path=folder,
                               fix="resume from an older step-N folder or delete this one") from None


def _load_checkpoint(folder, *, rank, verify) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DecodeAccelError("checkpoint folder not found", path=folder, fix="check the path")
    manifest = _read_manifest(folder, verify_hash=verify)
    if rank is None:
        rank = int(os.environ.get("RANK", 0))
    files = manifest["files"]
    try:
        model_state = load_file(str(folder / "model.safetensors"), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for damaged files
        raise DecodeAccelError(f"model.safetensors is damaged ({type(err).__name__})", path=folder,
                               fix="resume from an older step-N folder or delete this one") from None
    rng_name = f"rng_rank{rank}.pt"
    rng_state = _torch_load(folder / rng_name) if rng_name in files else None
    if rng_state is None:
        warnings.warn(f"{folder}: no RNG state for process rank {rank}; random streams start fresh", stacklevel=2)
    config = yaml.safe_load((folder / "config.yaml").read_text()) if "config.yaml" in files else None
    return {
        "model_state_dict": model_state,
        "optimizer_state_dict": _torch_load(folder / "optimizer.pt") if "optimizer.pt" in files else None,
        "scheduler_state_dict": _torch_load(folder / "scheduler.pt") if "scheduler.pt" in files else None,
        "epoch": manifest["epoch"],
        "step": manifest["step"],
        "metrics": json.loads((folder / "metrics.json").read_text()),
        "config": config,
        "trainer_state": json.loads((folder / "trainer_state.json").read_text()),
        "rng_state": rng_state,
        "path": folder,
    }


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str | os.PathLike = "",
                     *, accelerator=None) -> None:
    """Load weights into ``model`` (unwrapped), with a one-line error when the architectures differ."""
    target = unwrap_model(model, accelerator)
    own = target.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(state_dict[k].shape)} saved, "
                         f"{tuple(own[k].shape)} in the model)")
        raise DecodeAccelError(f"checkpoint was written for another architecture: weights {', '.join(parts)}",
                               path=source or None,
                               fix="build the model with the config saved in the checkpoint")
    target.load_state_dict(state_dict, strict=True)


def restore_checkpoint(checkpoint: dict[str, Any], model: torch.nn.Module, optimizer=None, scheduler=None, *,
                       accelerator=None, restore_rng: bool = True) -> dict[str, Any]:
    """Put a loaded checkpoint back: weights (checked), optimizer, scheduler and this rank's RNG streams.

    Returns ``checkpoint`` so calls can be chained.
    """
    source = checkpoint.get("path", "")
    load_model_state(model, checkpoint["model_state_dict"], source, accelerator=accelerator)
    if optimizer is not None and checkpoint.get("optimizer_state_dict") is not None:
        try:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise DecodeAccelError(f"optimizer state does not fit this optimizer ({str(err).splitlines()[0]})",
                                   path=source or None, fix="use the optimizer type of the saved run") from None
    if scheduler is not None and checkpoint.get("scheduler_state_dict") is not None:
        scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
    if restore_rng and checkpoint.get("rng_state") is not None:
        restore_rng_state(checkpoint["rng_state"])
    return checkpoint


# ----------------------------------------------------------------------------------------------
# The manager
# ----------------------------------------------------------------------------------------------

class CheckpointManager:
    """Saves, ranks, prunes and loads ``step-N`` checkpoints in ``save_dir``.

    Args:
        save_dir: folder of the checkpoints (created on the first save).
        save_top_k: keep the k best checkpoints by ``monitor_metric`` (0: none, -1: all).
        monitor_metric: metric name looked up in the ``metrics`` of each save.
        mode: ``'min'`` (lower is better) or ``'max'``.
        save_every_n_epochs: write a checkpoint when ``(epoch + 1) % n == 0``; a checkpoint that
            enters the top k is written whatever the epoch.
        save_last: always keep the most recent checkpoint (the one to resume from).
        keep_every_n_epochs: additionally keep, permanently, every checkpoint with
            ``(epoch + 1) % keep_every_n_epochs == 0`` (None: no permanent snapshots).

    Only the main process writes shared files; with an ``accelerator`` every process writes its
    own RNG file into the same folder before the main process seals it.
    """

    def __init__(self, save_dir: str | os.PathLike, save_top_k: int = 3, monitor_metric: str = "val_loss",
                 mode: str = "min", save_every_n_epochs: int = 1, save_last: bool = True, *,
                 keep_every_n_epochs: int | None = None):
        if mode not in ("min", "max"):
            raise DecodeAccelError(f"mode must be 'min' or 'max', got {mode!r}", field="mode")
        if save_top_k < -1:
            raise DecodeAccelError(f"save_top_k must be >= -1, got {save_top_k}", field="save_top_k")
        if save_every_n_epochs < 1:
            raise DecodeAccelError(f"save_every_n_epochs must be >= 1, got {save_every_n_epochs}",
                                   field="save_every_n_epochs")
        self.save_dir = Path(save_dir)
        self.save_top_k = save_top_k
        self.monitor_metric = monitor_metric
        self.mode = mode
        self.save_every_n_epochs = save_every_n_epochs
        self.save_last = save_last
        self.keep_every_n_epochs = keep_every_n_epochs
        # (epoch, value) of every save call that carried the monitored metric; restored from the newest
        # checkpoint so that early stopping continues across a resume.
        self.history: list[tuple[int, float]] = []
        last = self.latest_complete()
        if last is not None:
            try:
                self.history = [tuple(h) for h in _read_manifest(last, verify_hash=False).get("monitor_history", [])]
            except DecodeAccelError:
                pass

    # -- ranking ---------------------------------------------------------------------------------
    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def _sort_key(self, value: float) -> float:
        return value if self.mode == "min" else -value

    def _scan(self) -> list[tuple[int, Path, dict]]:
        """(N, folder, manifest) of every complete checkpoint, oldest first; broken ones warned about."""
        out = []
        if not self.save_dir.is_dir():
            return out
        for child in self.save_dir.iterdir():
            m = _STEP_DIR.match(child.name)
            if not m or not child.is_dir():
                continue  # unfinished (step-N.tmp-PID), being deleted, or not ours
            try:
                manifest = _read_manifest(child, verify_hash=False)
            except DecodeAccelError as err:
                if "newer than" in str(err):
                    manifest = {"epoch": -1, "step": int(m.group(1)), "newer": True}
                else:
                    warnings.warn(f"ignoring checkpoint: {err}", stacklevel=3)
                    continue
            out.append((int(m.group(1)), child, manifest))
        out.sort(key=lambda t: t[0])
        return out

    def _ranked(self, entries) -> list[tuple[int, Path, dict]]:
        scored = [e for e in entries if e[2].get("monitor_value") is not None
                  and math.isfinite(e[2]["monitor_value"])]
        return sorted(scored, key=lambda e: (self._sort_key(e[2]["monitor_value"]), -e[0]))

    def _keep_set(self, entries) -> set[Path]:
        keep: set[Path] = set()
        ranked = self._ranked(entries)
        if self.save_top_k == -1:
            keep.update(e[1] for e in ranked)
        elif self.save_top_k > 0:
            keep.update(e[1] for e in ranked[: self.save_top_k])
        if self.save_last and entries:
            keep.add(entries[-1][1])
        if self.keep_every_n_epochs:
            keep.update(e[1] for e in entries if (e[2].get("epoch", -1) + 1) % self.keep_every_n_epochs == 0)
        keep.update(e[1] for e in entries if e[2].get("newer"))  # never delete what we cannot read
        return keep

    def _enters_top_k(self, value: float | None, entries) -> bool:
        if value is None or not math.isfinite(value) or self.save_top_k == 0:
            return False
        if self.save_top_k == -1:
            return True
        ranked = self._ranked(entries)
        return len(ranked) < self.save_top_k or self._better(value, ranked[self.save_top_k - 1][2]["monitor_value"])

    # -- saving ----------------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int, model: torch.nn.Module, optimizer=None, scheduler=None,
                        metrics: dict | None = None, config=None, *, step: int | None = None,
                        trainer_state: dict | None = None, accelerator=None) -> Path | None:
        """Record ``metrics`` and write a checkpoint when it is due or enters the top k.

        Call it on every process with the ``accelerator``: only the main process writes shared files,
        every process its RNG file. Without an accelerator only rank 0 (env ``RANK``) writes.

        Args:
            epoch: 0-based epoch that just finished.
            model, optimizer, scheduler: saved unwrapped / as state dicts.
            metrics: numbers by name; ``metrics[monitor_metric]`` ranks the checkpoint.
            config: TrainingConfig or plain dict, saved as config.yaml.
            step: global optimizer step (names the folder ``step-N``); defaults to ``epoch``.
            trainer_state: JSON-able dict (hook states, data-stream position, history).

        Returns:
            The checkpoint folder, or None when nothing was written.

        Raises:
            DecodeAccelError: disk full, read-only folder, or state that cannot be stored safely;
                the previous checkpoints stay intact.
        """
        rank, _, is_main = _process_info(accelerator)
        metrics = dict(metrics or {})
        value = _metric_value(metrics, self.monitor_metric)
        if value is not None and math.isfinite(value):
            self.history.append((int(epoch), value))
        if accelerator is None and not is_main:
            # without an accelerator the processes cannot coordinate a shared folder: only rank 0 writes
            return None
        n = int(step if step is not None else epoch)
        entries = self._scan() if is_main else []
        due = (epoch + 1) % self.save_every_n_epochs == 0
        snapshot = bool(self.keep_every_n_epochs) and (epoch + 1) % self.keep_every_n_epochs == 0
        write = self._enters_top_k(value, entries) or (due and self.save_last) or snapshot
        write = _broadcast(write, accelerator)
        if not write:
            return None

        final = self.save_dir / f"step-{n}"
        tmp = self.save_dir / f"step-{n}.tmp-{os.getpid()}"
        tmp = Path(_broadcast(os.fspath(tmp), accelerator))
        error = None
        if is_main:
            try:
                self.save_dir.mkdir(parents=True, exist_ok=True)
                for stale in self.remove_stale_temporaries():
                    warnings.warn(f"{stale}: removed an unfinished checkpoint of an earlier run", stacklevel=2)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as err:
                error = self._io_error(err)
        error = _broadcast(error, accelerator)
        if error is not None:
            self._cleanup(tmp, is_main)
            raise DecodeAccelError(error)

        # every rank: its own RNG streams, into the folder the main process seals below
        rng_error = None
        try:
            _write_bytes(tmp / f"rng_rank{rank}.pt", _torch_bytes(capture_rng_state(), "rng_state"))
        except OSError as err:
            rng_error = self._io_error(err)
        _barrier(accelerator)

        error = rng_error if is_main else None
        if is_main and error is None:
            try:
                self._write_shared(tmp, final, epoch, n, model, optimizer, scheduler, metrics, value, config,
                                   trainer_state, accelerator)
                self._prune()
            except DecodeAccelError as err:
                error = str(err)
            except OSError as err:
                error = self._io_error(err)
        error = _broadcast(error, accelerator) or rng_error
        if error is not None:
            self._cleanup(tmp, is_main)
            raise DecodeAccelError(error)
        _barrier(accelerator)
        logger.info("saved checkpoint %s (epoch %d, %s=%s)", final, epoch, self.monitor_metric, value)
        return final

    def _io_error(self, err: OSError) -> str:
        """One line naming the folder, the cause and the fix; previous checkpoints are untouched."""
        reason = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system",
                  errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}.get(err.errno,
                                                                                             err.strerror or str(err))
        return str(DecodeAccelError(f"cannot save checkpoint: {reason}", path=self.save_dir, field="save_dir",
                                    fix="free disk space or choose a writable save_dir"))

    @staticmethod
    def _cleanup(tmp: Path, is_main: bool) -> None:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_shared(self, tmp: Path, final: Path, epoch: int, n: int, model, optimizer, scheduler, metrics,
                      value, config, trainer_state, accelerator) -> None:
        weights = _clean_state_dict(unwrap_model(model, accelerator))
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt",
                                                                      "decode_accel_format": str(FORMAT_VERSION)})
        give_umask_mode(tmp / "model.safetensors")  # safetensors writes it 0600
        _fsync_path(tmp / "model.safetensors")
        if optimizer is not None:
            _write_bytes(tmp / "optimizer.pt", _torch_bytes(optimizer.state_dict(), "optimizer state"))
        if scheduler is not None:
            _write_bytes(tmp / "scheduler.pt", _torch_bytes(scheduler.state_dict(), "scheduler state"))
        _write_bytes(tmp / "trainer_state.json", _to_json(trainer_state or {}, "trainer_state"))
        _write_bytes(tmp / "metrics.json", _to_json(metrics, "metrics"))
        config_data = to_json_data(config, nonfinite="keep")
        if config_data is not None:
            _write_bytes(tmp / "config.yaml", yaml.safe_dump(config_data, sort_keys=False).encode())
        files = {}
        for f in sorted(tmp.iterdir()):
            files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        manifest = {
            "format_version": FORMAT_VERSION, "epoch": int(epoch), "step": n,
            "monitor_metric": self.monitor_metric, "monitor_value": value,
            "monitor_history": self.history, "architecture": type(unwrap_model(model, accelerator)).__name__,
            "files": files,
        }
        _write_bytes(tmp / MANIFEST, _to_json(manifest, "manifest"))
        _fsync_path(tmp)
        swap_folder(tmp, final)  # the same step saved again (e.g. after a resume): swap, then drop the old one
        _fsync_path(self.save_dir)

    def _prune(self) -> None:
        entries = self._scan()
        keep = self._keep_set(entries)
        for _, folder, _ in entries:
            if folder not in keep:
                doomed = folder.with_name(f"{folder.name}.deleting-{os.getpid()}")
                os.replace(folder, doomed)  # one rename takes it out of the scan at once
                shutil.rmtree(doomed, ignore_errors=True)

    # -- queries ---------------------------------------------------------------------------------
    def should_stop_early(self, patience: int, *, min_delta: float = 0.0) -> bool:
        """True when the monitored metric has not improved (by more than ``min_delta``) for ``patience``
        consecutive recorded values after its best one."""
        if patience < 1 or len(self.history) <= patience:
            return False
        best_index, best = 0, None
        for i, (_, v) in enumerate(self.history):  # the EarlyStopping hook's rule of improvement
            if improved(v, best, self.mode, min_delta):
                best_index, best = i, v
        return len(self.history) - 1 - best_index >= patience

    def has_checkpoint(self) -> bool:
        """Whether a complete checkpoint exists."""
        return self.latest_complete() is not None

    def latest_complete(self) -> Path | None:
        """The complete checkpoint with the highest step, or None."""
        entries = self._scan()
        return entries[-1][1] if entries else None

    def best_path(self) -> Path | None:
        """The complete checkpoint with the best monitored value (None when no checkpoint has it)."""
        ranked = self._ranked(self._scan())
        return ranked[0][1] if ranked else None

    def load_last_checkpoint(self, model: torch.nn.Module | None = None, *, rank: int | None = None) -> dict:
        """The newest complete checkpoint (corrupt ones are skipped with a warning).

        With ``model``, its weights are also loaded into it (one-line error for another architecture).
        """
        entries = self._scan()
        if self.save_dir.is_dir():
            for child in self.save_dir.iterdir():
                if _TMP_DIR.match(child.name):
                    warnings.warn(f"{child}: ignoring an unfinished checkpoint (interrupted save)", stacklevel=2)
        if not entries:
            raise DecodeAccelError("no complete checkpoint found", path=self.save_dir,
                                   fix="train first or point save_dir at a run's checkpoints")
        for _, folder, _ in reversed(entries):
            try:
                ckpt = load_checkpoint(folder, rank=rank)
            except DecodeAccelError as err:
                if "newer than" in str(err):
                    raise
                warnings.warn(f"skipping checkpoint: {err}", stacklevel=2)
                continue
            if model is not None:
                load_model_state(model, ckpt["model_state_dict"], folder)
            return ckpt
        raise DecodeAccelError("every checkpoint is corrupt", path=self.save_dir, fix="start a new run")

    def load_best_checkpoint(self, model: torch.nn.Module | None = None, *, rank: int | None = None) -> dict:
        """The complete checkpoint with the best monitored metric (the newest if none carries it)."""
        best = self.best_path()
        if best is None:
            warnings.warn(f"{self.save_dir}: no checkpoint carries {self.monitor_metric}; loading the newest",
                          stacklevel=2)
            return self.load_last_checkpoint(model, rank=rank)
        ckpt = load_checkpoint(best, rank=rank)
        if model is not None:
            load_model_state(model, ckpt["model_state_dict"], best)
        return ckpt

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete ``step-N.tmp-<pid>`` folders of processes that no longer run (main process only)."""
        removed = []
        if not self.save_dir.is_dir():
            return removed
        for child in self.save_dir.iterdir():
            m = _TMP_DIR.match(child.name)
            if not m:
                continue
            pid = int(m.group(2))
            try:
                os.kill(pid, 0)
                alive = pid != os.getpid()  # our own leftover is from a save that failed earlier
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
            if not alive:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        return removed
