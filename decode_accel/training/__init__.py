"""Training: the Accelerate-driven loop, its hooks and schedules, config, checkpoints and monitoring.

Public names (the seed README's API)::

    from decode_accel.training import (BaseTrainer, MultiChannelTrainer, TrainingConfig, LossScheduler,
                                       TrainingMonitor, CheckpointManager)

Names are imported on first use, so ``import decode_accel.training`` stays cheap and a missing optional
piece fails only where it is used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BaseTrainer": "trainer", "MultiChannelTrainer": "trainer", "DistillationTrainer": "trainer",
    "CurriculumTrainer": "trainer", "AdaptiveLRTrainer": "trainer",
    "Hook": "hooks", "LossSchedulerHook": "hooks", "CurriculumHook": "hooks", "DistillationHook": "hooks",
    "EarlyStopping": "hooks", "ReduceLROnPlateauHook": "hooks", "DivergenceGuard": "hooks", "MonitorHook": "hooks",
    "PreemptionHook": "preemption",
    "LossScheduler": "scheduler", "build_lr_scheduler": "scheduler",
    "build_trainer": "trainer", "build_loaders": "builders", "TrainerSettings": "settings",
    "TrainingConfig": "config", "load_config": "config", "save_config": "config",
    "CheckpointManager": "checkpoint",
    "TrainingMonitor": "monitor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"decode_accel.training.{_EXPORTS[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'decode_accel.training' has no attribute {name!r}")


def __dir__():
    return __all__
