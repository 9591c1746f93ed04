"""The training configuration: one typed, validated tree, loaded from YAML/JSON with inheritance and overrides.

``TrainingConfig`` composes one pydantic section per concern (model, simulation, data, loss, optimizer,
scheduler, regularization, training strategy, loss scheduling, curriculum, distillation, monitoring,
checkpointing, operating point). Every field states its unit in its description; ``config_reference_markdown()``
turns those descriptions into the README's reference table so the two cannot drift apart.

Loading (``load_config``) supports

* ``base: other.yaml`` (or a list of files) inheritance, resolved relative to the including file,
  with cycle detection; the child's keys win, mappings are merged, lists replaced;
* dotted command-line overrides such as ``training_strategy.epochs=5`` (values parsed as YAML
  scalars, so ``5`` is an int, ``1e-3`` a float, ``[1, 2]`` a list, ``null`` None);
* one ``DecodeAccelError`` that lists *every* problem at once, with "did you mean" for unknown keys.

The package keeps the three concerns apart: :mod:`.sections` (the typed tree), :mod:`.loader`
(files, inheritance, overrides, errors) and :mod:`.reference` (the Markdown reference); the names
below are importable from ``decode_accel.training.config`` as before.
"""

from __future__ import annotations

from decode_accel.io._atomic import atomic_write_text  # noqa: F401  (also part of this module's API)
from decode_accel.training.config.dicts import apply_override, deep_merge, flatten_dict, undot  # noqa: F401
from decode_accel.training.config.loader import load_config, load_config_data, save_config
from decode_accel.training.config.reference import config_reference_markdown
from decode_accel.training.config.sections import (SCHEDULER_TYPES, CheckpointingConfig, CurriculumStage,  # noqa: F401
                                                   DataConfig, DistillationConfig, LossConfig, LossSchedulingConfig,
                                                   ModelConfig, MonitoringConfig, OperatingPointConfig,
                                                   OptimizerConfig, RegularizationConfig, SchedulerConfig, SimulationConfig,
                                                   TermSchedule, TrainingConfig, TrainingStrategyConfig)

__all__ = [
    "TrainingConfig", "ModelConfig", "SimulationConfig", "DataConfig", "LossConfig", "OptimizerConfig", "SchedulerConfig",
    "RegularizationConfig", "TrainingStrategyConfig", "TermSchedule", "LossSchedulingConfig",
    "CurriculumStage", "DistillationConfig", "MonitoringConfig", "CheckpointingConfig", "OperatingPointConfig",
    "load_config", "load_config_data", "save_config", "config_reference_markdown", "SCHEDULER_TYPES",
]
