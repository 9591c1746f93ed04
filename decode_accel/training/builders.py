"""The thin builder: ``TrainingConfig`` -> objects (model, loss, optimizer, loaders, hooks, monitor, and the
trainer's constructor arguments).

Domain modules take plain arguments; only this file knows the config tree. ``trainer.build_trainer`` (and
``BaseTrainer.from_config``) turn :func:`trainer_parts` into a trainer; the recipes' command line is
``decode_accel.cli.run_from_cli``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from decode_accel.data import create_dataloader
from decode_accel.errors import DecodeAccelError
from decode_accel.export import dye_table, load_exported
from decode_accel.inference.postprocess import PostProcessor
from decode_accel.loss import build_loss
from decode_accel.models import build_model
from decode_accel.simulation.camera import Camera
from decode_accel.training.config import TrainingConfig
from decode_accel.training.hooks import CurriculumHook, DistillationHook, DivergenceGuard, LossSchedulerHook
from decode_accel.training.monitor import TrainingMonitor
from decode_accel.training.scheduler import LossScheduler
from decode_accel.training.settings import make_accelerator, make_settings

logger = logging.getLogger("decode_accel.training")

#: recipes/configs next to the package (editable install / source checkout)
RECIPE_CONFIG_DIR = Path(__file__).resolve().parents[2] / "recipes" / "configs"


def scheduler_dict(config) -> dict | None:
    """The ``scheduler`` config section as the trainer's ``scheduler_config`` dict (None for type none)."""
    sec = config.scheduler
    if sec.type == "none" and not sec.warmup_steps:
        return None
    out = {"type": sec.type, **dict(sec.kwargs), "warmup_steps": sec.warmup_steps}
    if sec.interval is not None:
        out["interval"] = sec.interval
    return out


def optimizer_dict(config) -> dict:
    """The ``optimizer`` section as the trainer's ``optimizer_config`` dict."""
    sec = config.optimizer
    out = {"type": sec.type, "lr": sec.lr, "weight_decay": sec.weight_decay, "betas": sec.betas,
           "amsgrad": sec.amsgrad, "momentum": sec.momentum, "eps": sec.eps, **dict(sec.kwargs)}
    return {k: v for k, v in out.items() if v is not None}


def build_model_from_config(config) -> torch.nn.Module:
    """The network of ``config.model`` with the regularisation section applied (dropout, batch norm)."""
    model_cfg = config.model.model_dump()
    reg = config.regularization
    if reg.dropout and model_cfg.get("dropout") is None:
        model_cfg["dropout"] = reg.dropout
    if reg.batch_norm and model_cfg.get("norm") in (None, "none"):
        model_cfg["norm"] = "batch"
    if config.training_strategy.gradient_checkpointing:
        model_cfg["gradient_checkpointing"] = True
    model = build_model(model_cfg)
    if config.training_strategy.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_loss_from_config(config, model) -> Any:
    kwargs = dict(config.loss.weights)
    if config.model.architecture == "SigmaMUNet" and config.loss.type in ("GaussianMM", "RatioGaussianNLL"):
        kwargs.setdefault("z_enabled", config.model.z_enabled)
    return build_loss(config.loss.type, scaling=getattr(model, "scaling", None), **kwargs)


def build_postprocessor(config):
    sim = config.simulation
    return PostProcessor(px_size_nm=float(sim.frame.px_size), dye_table=dye_table(sim))


def build_loaders(config, *, rank: int = 0, world_size: int = 1):
    """(train_loader, val_loader) from the data and simulation sections.

    The simulated training stream is sharded by ``rank``/``world_size`` (do not prepare it); the
    validation set is complete on every process (``BaseTrainer.validate`` splits it).
    """
    data = config.data
    cam = config.simulation.camera
    if config.model.variance_input and not Camera(cam).has_variance_map:  # the config names a map file: read it
        raise DecodeAccelError("model.variance_input needs a per-pixel read-noise variance map, but the sCMOS maps "
                               "hold none", path=cam.scmos_maps, field="simulation.camera.scmos_maps",
                               fix="add variance_adu2 (ADU²) to the .npz, give scmos_variance_map, or set "
                                   "model.variance_input: false")
    common = {"batch_size": data.batch_size, "num_workers": data.num_workers, "seed": config.training_strategy.seed,
              "label_photon_min": data.label_photon_min, "with_variance": config.model.variance_input}
    sim_device = data.resolved_sim_device() if hasattr(data, "resolved_sim_device") else "cpu"
    if sim_device != "cpu":
        common["sim_device"] = sim_device  # simulate on the accelerator (issue 15.3: CPU simulation starves a GPU)
    n_ch = config.simulation.channels.n_channels
    train = create_dataloader(data.data_path, {**common, "val_samples": max(1, data.val_samples)}, "train",
                              simulation_config=config.simulation, n_channels=n_ch, rank=rank, world_size=world_size)
    val = None
    if data.val_samples > 0 or data.val_data_path:
        val = create_dataloader(data.val_data_path, {**common, "val_samples": max(1, data.val_samples),
                                                     "num_workers": 0}, "val",
                                simulation_config=config.simulation, n_channels=n_ch)
    return train, val


def build_hooks(config, *, teacher=None, initial_weights: dict | None = None) -> list:
    """Hooks the config asks for: loss scheduling, curriculum, distillation and the divergence guard."""
    hooks = [DivergenceGuard(action="rollback", max_events=max(1, config.training_strategy.max_divergence_restarts))]
    if config.loss_scheduling.enable:
        sched = LossScheduler.from_config(config.loss_scheduling, config.training_strategy.epochs,
                                          initial_weights=initial_weights or dict(config.loss.weights))
        if sched is not None:
            hooks.append(LossSchedulerHook(sched))
    if config.curriculum:
        hooks.append(CurriculumHook(config.curriculum))
    if config.distillation.teacher or teacher is not None:
        teacher = teacher if teacher is not None else load_teacher(config.distillation.teacher)
        hooks.append(DistillationHook(teacher, alpha=config.distillation.alpha,
                                      temperature=config.distillation.temperature))
    return hooks


def load_teacher(path: str) -> torch.nn.Module:
    """The teacher network of an export folder or Hub id (``decode_accel.export.load_exported``)."""
    return load_exported(path).model


def as_two_channel(config):
    """``config`` with the two-channel defaults filled in where the user left them unset.

    ``MultiChannelTrainer.from_config`` on a config that names neither the architecture, nor the
    channel count, nor the loss (as in the seed's example) means DoubleMUNet + UnifiedLoss on two-channel
    simulation with two dyes (ratio 0.3 and 0.7); an explicit single-channel setting is an error.
    """
    data = config.model_dump()
    explicit = []
    if config.model.architecture != "DoubleMUNet":
        if "architecture" in config.model.model_fields_set:
            explicit.append("model.architecture")
        data["model"]["architecture"] = "DoubleMUNet"
    ch = config.simulation.channels
    if ch.n_channels != 2:
        if "n_channels" in ch.model_fields_set:
            explicit.append("simulation.channels.n_channels")
        data["simulation"]["channels"]["n_channels"] = 2
        if "dyes" not in ch.model_fields_set:
            data["simulation"]["channels"]["dyes"] = [{"ratio_mean": 0.3, "ratio_sd": 0.03, "probability": 1.0},
                                                      {"ratio_mean": 0.7, "ratio_sd": 0.03, "probability": 1.0}]
    if config.loss.type == "GaussianMM":
        if "type" in config.loss.model_fields_set:
            explicit.append("loss.type")
        data["loss"]["type"] = "Unified"
    if explicit:
        raise DecodeAccelError(f"MultiChannelTrainer needs two-channel settings but {', '.join(explicit)} "
                               f"say single channel", field=explicit[0],
                               fix="use BaseTrainer, or set model.architecture=DoubleMUNet, "
                                   "simulation.channels.n_channels=2 and loss.type=Unified")
    if data == config.model_dump():
        return config
    logger.info("MultiChannelTrainer: using DoubleMUNet, two-channel simulation and UnifiedLoss")
    return TrainingConfig.model_validate(data)


def trainer_parts(config, *, cpu: bool | None = None, mixed_precision: str | bool | None = None,
                  accelerator=None, teacher=None, hooks: tuple = ()) -> dict:
    """The trainer's constructor arguments from a ``TrainingConfig``: accelerator, model, loss, optimizer and
    scheduler configs, postprocessor, hooks (the config's, then ``hooks``), monitor factory and settings.

    ``trainer.build_trainer`` (and ``BaseTrainer.from_config``) pass them to the trainer class.
    """
    ts, mon, ck = config.training_strategy, config.monitoring, config.checkpointing
    force_cpu = bool(ts.cpu if cpu is None else cpu)
    on_cpu = force_cpu or not torch.cuda.is_available()
    if mixed_precision is None and ("mixed_precision" in ts.model_fields_set
                                    or not os.environ.get("ACCELERATE_MIXED_PRECISION")):
        mixed_precision = ts.mixed_precision
        if mixed_precision == "auto":  # the default: bf16 on accelerators, fp32 on the CPU (issue 15.3)
            mixed_precision = "no" if on_cpu else "bf16"
        if on_cpu and mixed_precision != "no":
            # the config asks for autocast, which pays on GPUs; on a CPU without bf16 units it is ~10x slower
            logger.info("training on the CPU: using fp32 instead of %s (pass --mixed_precision %s to force it)",
                        mixed_precision, mixed_precision)
            mixed_precision = "no"
    if accelerator is None:
        accelerator = make_accelerator(None, mixed_precision, force_cpu)
    set_seed(ts.seed)  # before the model is built: identical initial weights on every process
    model = build_model_from_config(config)
    loss_fn = build_loss_from_config(config, model)
    updates = config.data.epoch_steps(ts.accumulate_grad_batches, accelerator.num_processes)
    settings = make_settings(
        epochs=ts.epochs, steps_per_epoch=updates * ts.accumulate_grad_batches,
        accumulate_grad_batches=ts.accumulate_grad_batches, gradient_clip_val=ts.gradient_clipping or 0.0,
        early_stopping_patience=ts.early_stopping_patience, validate_every=mon.validate_every,
        log_every=mon.log_every, plot_every=mon.plot_every, save_dir=ck.save_dir, save_every=mon.save_every,
        save_top_k=ck.save_top_k, save_last=ck.save_last, monitor_metric=ck.monitor_metric, mode=ck.mode,
        seed=ts.seed, cpu=force_cpu,
        compile=ts.compile, px_size_nm=float(config.simulation.frame.px_size))
    hook_list = list(build_hooks(config, teacher=teacher, initial_weights=getattr(loss_fn, "weights", None)))
    return dict(model=model, loss_fn=loss_fn, optimizer_config=optimizer_dict(config),
                scheduler_config=scheduler_dict(config), settings=settings, hooks=hook_list + list(hooks),
                postprocessor=build_postprocessor(config), accelerator=accelerator,
                monitor=functools.partial(build_monitor, config), config=config)


def build_monitor(config, is_main_process: bool = True):
    """The ``TrainingMonitor`` of the ``monitoring`` section (JSONL, TensorBoard, W&B, plots)."""
    mon = config.monitoring
    return TrainingMonitor(log_dir=mon.log_dir, use_tensorboard=mon.use_tensorboard, use_wandb=mon.use_wandb,
                           wandb_project=mon.wandb_project, wandb_config=config.model_dump(mode="json"),
                           is_main_process=is_main_process)


def resolve_default_config(name_or_path: str | os.PathLike | None) -> Path | None:
    """A recipe's embedded config: a name in recipes/configs (``single_channel``) or a path."""
    if name_or_path is None:
        return None
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json") and p.exists():
        return p
    candidate = RECIPE_CONFIG_DIR / f"{p.stem}.yaml"
    if candidate.exists():
        return candidate
    raise DecodeAccelError("recipe config not found", path=candidate,
                           fix="give --config FILE.yaml or reinstall decode_accel from a source checkout")
