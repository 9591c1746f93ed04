"""The trainer's public contract: the seed-named subclasses, validated settings, devices, checked hooks
with state keyed by name, refused arguments, and no host synchronisation per micro-batch."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.loss import GaussianMMLoss
from decode_accel.training import (AdaptiveLRTrainer, BaseTrainer, CurriculumTrainer, DistillationTrainer,
                                   DivergenceGuard, EarlyStopping, Hook, LossScheduler)
from decode_accel.training.trainer import TrainerSettings, make_accelerator
from tests.test_trainer_helpers import flat_params, stream_loaders, tiny_sigma_munet, tiny_simulation


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed=0):
    torch.manual_seed(seed)
    model = tiny_sigma_munet()
    return model, GaussianMMLoss(scaling=model.scaling)


class FakeValLoss(Hook):
    def __init__(self, values):
        self.values = list(values)

    def on_eval_end(self, trainer, metrics):
        metrics["val_loss"] = self.values.pop(0)


class Rows(Hook):
    def __init__(self):
        self.rows = []

    def on_step_start(self, trainer):
        self.rows.append((trainer.current_epoch, trainer.get_lr(), trainer.loss_fn.weights["bg_weight"]))


# ---------------------------------------------------------------------------------------------- seed-named classes
def test_distillation_trainer_takes_the_seeds_positional_order_and_trains_on_the_blend():
    teacher, _ = tiny(seed=7)
    before = flat_params(teacher).clone()
    model, loss_fn = tiny()
    trainer = DistillationTrainer(teacher, 2.0, 0.6, model, loss_fn, {"type": "Adam", "lr": 1e-3}, cpu=True)
    (hook,) = [h for h in trainer.hooks if type(h).__name__ == "DistillationHook"]
    assert (hook.loss.weights["alpha"], hook.loss.temperature) == (0.6, 2.0) and hook.teacher is teacher
    history = trainer.train(stream_loaders(tiny_simulation())[0], None, epochs=1, steps_per_epoch=3)
    terms = trainer.epoch_terms
    # the epoch mean of the trained loss is the blend of the means of its two parts
    assert terms["distill_loss"] > 0 and history["train_loss"][0] == pytest.approx(
        0.6 * terms["distill_loss"] + 0.4 * terms["gt_loss"], rel=1e-5)
    assert torch.equal(flat_params(teacher), before) and not teacher.training
    # the seed's defaults
    assert (DistillationTrainer.__init__.__defaults__) == (4.0, 0.7)


def test_distillation_trainer_refuses_a_model_where_the_temperature_goes():
    teacher, _ = tiny(seed=7)
    model, loss_fn = tiny()
    with pytest.raises(DecodeAccelError) as err:
        DistillationTrainer(teacher, model, loss_fn, cpu=True)
    assert "temperature" in str(err.value) and "keyword" in str(err.value) and "\n" not in str(err.value)


def test_curriculum_trainer_applies_each_stage_with_the_seeds_keys():
    stages = [{"end_epoch": 1, "description": "sparse", "learning_rate": 1e-3, "loss_weights": {"bg_weight": 2.0}},
              {"end_epoch": 3, "description": "dense", "learning_rate": 2e-4, "loss_weights": {"bg_weight": 0.5}}]
    model, loss_fn = tiny()
    rows = Rows()
    trainer = CurriculumTrainer(stages, model, loss_fn, {"type": "Adam", "lr": 5e-3}, cpu=True, hooks=[rows])
    assert trainer.current_stage == -1
    trainer.train(stream_loaders(tiny_simulation())[0], None, epochs=3, steps_per_epoch=1)
    assert rows.rows == [(0, 1e-3, 2.0), (1, 2e-4, 0.5), (2, 2e-4, 0.5)]
    assert trainer.current_stage == 1


def test_adaptive_lr_trainer_takes_patience_factor_min_lr_in_the_seeds_order():
    model, loss_fn = tiny()
    train, val = stream_loaders(tiny_simulation(), val_samples=4)
    trainer = AdaptiveLRTrainer(2, 0.5, 3e-4, model, loss_fn, {"type": "Adam", "lr": 1e-3}, cpu=True,
                                hooks=[FakeValLoss([1.0] * 5)])
    history = trainer.train(train, val, epochs=5, steps_per_epoch=1)
    # halved after epoch 2, then floored at min_lr after epoch 4
    assert history["lr"] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 3e-4])
    # the seed's method drives the same plateau logic
    trainer.adjust_learning_rate(2.0)
    trainer.adjust_learning_rate(2.0)
    assert trainer.get_lr() == pytest.approx(3e-4)  # already at min_lr: no further reduction


# ---------------------------------------------------------------------------------------------- settings and devices
def test_the_settings_object_holds_every_run_setting_and_train_overrides_it():
    model, loss_fn = tiny()
    settings = TrainerSettings(epochs=3, steps_per_epoch=2, accumulate_grad_batches=2, gradient_clip_val=0.5)
    trainer = BaseTrainer(model, loss_fn, settings=settings, cpu=True, seed=5)
    assert trainer.settings.seed == 5 and trainer.gradient_clip_val == 0.5 and trainer.accumulate_grad_batches == 2
    trainer.gradient_clip_val = 2.0  # the seed's attribute writes through to the validated settings
    assert trainer.settings.gradient_clip_val == 2.0
    history = trainer.train(stream_loaders(tiny_simulation())[0], None, epochs=2)
    assert history["global_step"] == 2 and trainer.settings.epochs == 2
    with pytest.raises(DecodeAccelError, match="gradient_clip_val"):
        trainer.gradient_clip_val = -1.0


@pytest.mark.parametrize("where, kwargs, words", [
    ("init", {"epoch": 3}, "did you mean 'epochs'"),
    ("init", {"save_evry": 2}, "did you mean 'save_every'"),
    ("train", {"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
    ("train", {"steps_per_epch": 2}, "did you mean 'steps_per_epoch'"),
    ("train", {"mode": "maximum"}, "mode"),
])
def test_an_unknown_or_impossible_setting_is_refused_with_one_line_naming_it(where, kwargs, words):
    model, loss_fn = tiny()
    with pytest.raises(DecodeAccelError) as err:
        trainer = BaseTrainer(model, loss_fn, cpu=True, **(kwargs if where == "init" else {}))
        trainer.train(stream_loaders(tiny_simulation())[0], None, steps_per_epoch=1,
                      **(kwargs if where == "train" else {}))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_device_values_act_or_are_refused(monkeypatch, caplog):
    with pytest.raises(DecodeAccelError, match="'cpu', 'cuda' or 'cuda:N'"):
        make_accelerator("tpu")
    with pytest.raises(DecodeAccelError, match="device"):
        make_accelerator("mps")
    if not torch.cuda.is_available():
        with caplog.at_level(logging.WARNING, logger="decode_accel.training"):
            acc = make_accelerator("cuda:1", cpu=False)
        assert acc.device.type == "cpu" and "CUDA is not available" in caplog.text
        # pretend there is one GPU: an index beyond it, or one index for several processes, is refused
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        with pytest.raises(DecodeAccelError, match="only 1 GPU"):
            make_accelerator("cuda:1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(DecodeAccelError, match="gpu_ids"):
            make_accelerator("cuda:0")
        selected, built = [], []
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.setattr(torch.cuda, "set_device", selected.append)
        monkeypatch.setattr("decode_accel.training.settings.Accelerator", lambda **kw: built.append(kw) or "acc")
        assert make_accelerator("cuda:0") == "acc"
        # the requested GPU became the current one before the (single-process) Accelerator was made for it
        assert selected == [0] and built[0]["cpu"] is False and built[0]["mixed_precision"] == "bf16"


def test_one_cycle_epochs_and_steps_per_epoch_act_or_are_refused():
    model, loss_fn = tiny()
    train = stream_loaders(tiny_simulation())[0]
    short = BaseTrainer(model, loss_fn, {"type": "Adam", "lr": 1e-3},
                        {"type": "OneCycleLR", "max_lr": 1e-2, "epochs": 1, "steps_per_epoch": 2}, cpu=True)
    with pytest.raises(DecodeAccelError, match="spans 2 updates but the run has 4"):
        short.train(train, None, epochs=2, steps_per_epoch=2)
    half = BaseTrainer(model, loss_fn, {"type": "Adam", "lr": 1e-3},
                       {"type": "OneCycleLR", "max_lr": 1e-2, "epochs": 3}, cpu=True)
    with pytest.raises(DecodeAccelError, match="both epochs and steps_per_epoch"):
        half.train(train, None, epochs=1, steps_per_epoch=2)


def test_a_step_schedule_with_a_start_epoch_is_refused_instead_of_ignored():
    with pytest.raises(DecodeAccelError) as err:
        LossScheduler(10, {"bg_weight": {"type": "step", "start_value": 1.0, "end_value": 0.1, "start_epoch": 2,
                                         "end_epoch": 5}})
    assert "start_epoch" in str(err.value) and "schedule_config.bg_weight" in str(err.value)
    ok = LossScheduler(10, {"bg_weight": {"type": "step", "start_value": 1.0, "end_value": 0.1, "start_epoch": 0,
                                          "end_epoch": 5}})
    assert ok.get_weights(4)["bg_weight"] == 1.0 and ok.get_weights(5)["bg_weight"] == 0.1


# ---------------------------------------------------------------------------------------------- hooks
def test_a_misspelt_event_is_an_error_at_registration_with_the_right_name():
    class Typo(Hook):
        def on_step_ends(self, trainer, losses):
            pass

    model, loss_fn = tiny()
    with pytest.raises(DecodeAccelError) as err:
        BaseTrainer(model, loss_fn, cpu=True, hooks=[Typo()])
    assert "Typo.on_step_ends" in str(err.value) and "on_step_end" in str(err.value)
    trainer = BaseTrainer(model, loss_fn, cpu=True)
    with pytest.raises(DecodeAccelError, match="not a Hook"):
        trainer.add_hook(object())
    # an event set on the instance (a callable attribute) is checked too
    patched = Hook()
    patched.on_fit_ends = lambda trainer, history: None
    with pytest.raises(DecodeAccelError, match=r"Hook\.on_fit_ends .*on_fit_end"):
        trainer.add_hook(patched)
    fine = Hook()
    fine.on_fit_end = lambda trainer, history: None
    assert trainer.add_hook(fine) is fine


def test_hook_state_is_keyed_by_name_so_a_resume_with_hooks_in_another_order_keeps_it(tmp_path):
    train, val = stream_loaders(tiny_simulation(), val_samples=4)
    model, loss_fn = tiny()
    stop, guard = EarlyStopping(patience=5), DivergenceGuard()
    trainer = BaseTrainer(model, loss_fn, cpu=True, hooks=[FakeValLoss([2.0, 3.0]), stop, guard])
    trainer.train(train, val, epochs=2, steps_per_epoch=1, save_dir=tmp_path)
    assert (stop.best, stop.wait) == (2.0, 1) and len(guard.history) + len(guard._pending) == 2
    again, guard2 = EarlyStopping(patience=5), DivergenceGuard()
    model, loss_fn = tiny()
    resumed = BaseTrainer(model, loss_fn, cpu=True, hooks=[guard2, FakeValLoss([]), again])  # another order
    resumed.train(stream_loaders(tiny_simulation())[0], None, epochs=2, steps_per_epoch=1, save_dir=tmp_path,
                  resume=True)
    assert (again.best, again.wait) == (2.0, 1)
    assert len(guard2.history) + len(guard2._pending) == 2
    assert {h.state_key for h in resumed.hooks} >= {"EarlyStopping", "DivergenceGuard", "FakeValLoss"}


def test_two_hooks_of_one_class_get_distinct_stable_names_and_old_positional_keys_still_load():
    from decode_accel.training.trainer import _hook_states
    model, loss_fn = tiny()
    a, b = EarlyStopping(patience=2), EarlyStopping(patience=3, monitor="jaccard", mode="max")
    trainer = BaseTrainer(model, loss_fn, cpu=True, hooks=[a, b])
    assert (a.state_key, b.state_key) == ("EarlyStopping", "EarlyStopping#2")
    assert _hook_states({"0:EarlyStopping": {"wait": 1}, "3:EarlyStopping": {"wait": 2}, "1:Other": {}}) == {
        "EarlyStopping": {"wait": 1}, "EarlyStopping#2": {"wait": 2}, "Other": {}}
    assert trainer.hooks[:2] == [a, b]


# ---------------------------------------------------------------------------------------------- host syncs
def _count_host_syncs(monkeypatch):
    """Count tensor -> host reads (item, float, int, bool, tolist) made by decode_accel/training code."""
    calls = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "decode_accel/training/" in caller.replace("\\", "/"):
                calls.append((_name, caller.rsplit("/", 1)[-1], sys._getframe(1).f_lineno))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize("guard", [False, True])
def test_no_host_sync_per_micro_batch_and_at_most_one_per_update_with_the_divergence_guard(monkeypatch, guard):
    counts = {}
    for micro_batches in (8, 16):
        model, loss_fn = tiny()
        hooks = [DivergenceGuard(refresh_every=1000)] if guard else []
        trainer = BaseTrainer(model, loss_fn, {"type": "Adam", "lr": 1e-3}, cpu=True, hooks=hooks)
        train = stream_loaders(tiny_simulation())[0]
        calls = _count_host_syncs(monkeypatch)
        trainer.train(train, None, epochs=1, steps_per_epoch=micro_batches, accumulate_grad_batches=4,
                      log_every=1000)
        monkeypatch.undo()
        counts[micro_batches] = calls
    extra = len(counts[16]) - len(counts[8])
    # 8 more micro-batches = 2 more updates: nothing more without the guard, one read per update with it
    assert extra == (2 if guard else 0), counts[16]


def test_adam_and_adamw_are_fused_on_a_gpu_unless_the_config_says_otherwise():
    # one kernel launch for all parameters instead of several per tensor (issue 15.3); torch >= 2.4 has the
    # fused kernel on the CPU as well, so the construction itself is checked here
    from decode_accel.training.settings import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert build_optimizer(params, {"type": "AdamW", "lr": 1e-3}, device="cuda:1").defaults["fused"] is True
    assert build_optimizer(params, {"type": "Adam", "lr": 1e-3}, device=torch.device("cuda")).defaults["fused"] is True
    assert not build_optimizer(params, {"type": "AdamW", "lr": 1e-3}, device="cpu").defaults["fused"]
    assert not build_optimizer(params, {"type": "AdamW", "lr": 1e-3, "fused": False}, device="cuda").defaults["fused"]
    assert build_optimizer(params, {"type": "AdamW", "lr": 1e-3, "foreach": True}, device="cuda").defaults["foreach"]
    assert "fused" not in build_optimizer(params, {"type": "SGD", "lr": 1e-3}, device="cuda").defaults or \
        not build_optimizer(params, {"type": "SGD", "lr": 1e-3}, device="cuda").defaults["fused"]
