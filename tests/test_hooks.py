"""Hooks and schedules: loss-weight schedules, curriculum, distillation, early stopping, plateau LR."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.loss import GaussianMMLoss
from decode_accel.training import (BaseTrainer, CurriculumHook, DistillationHook, EarlyStopping, Hook,
                                   LossScheduler, LossSchedulerHook, ReduceLROnPlateauHook)
from tests.test_trainer_helpers import flat_params, stream_loaders, tiny_sigma_munet, tiny_simulation


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_trainer(hooks=(), lr=1e-3, scheduler=None):
    torch.manual_seed(0)
    model = tiny_sigma_munet()
    return BaseTrainer(model, GaussianMMLoss(scaling=model.scaling), {"type": "Adam", "lr": lr}, scheduler,
                       hooks=hooks, cpu=True)


# ---------------------------------------------------------------------------------------------- LossScheduler
SEED_SCHEDULE = {
    "ch1_weight": {"type": "constant", "value": 1.0},
    "ratio_weight": {"type": "linear", "start_value": 0.1, "end_value": 0.8, "start_epoch": 10, "end_epoch": 50},
    "conservation_weight": {"type": "exponential", "start_value": 0.01, "end_value": 0.2, "decay_rate": 0.1},
    "uncertainty_weight": {"type": "cosine", "min_value": 0.05, "max_value": 0.15, "period": 20},
    "bg_weight": {"type": "step", "values": [0.0, 0.5, 1.0], "milestones": [5, 15]},
}


@pytest.mark.parametrize("epoch", [0, 5, 10, 30, 50, 70])
def test_loss_scheduler_weights_follow_their_closed_forms(epoch):
    w = LossScheduler(100, SEED_SCHEDULE).get_weights(epoch)
    assert w["ch1_weight"] == 1.0
    assert w["ratio_weight"] == pytest.approx(0.1 + 0.7 * min(1.0, max(0.0, (epoch - 10) / 40)))
    assert w["conservation_weight"] == pytest.approx(0.2 - 0.19 * math.exp(-0.1 * epoch))
    assert w["uncertainty_weight"] == pytest.approx(0.10 + 0.05 * math.cos(2 * math.pi * epoch / 20))
    assert w["bg_weight"] == (0.0 if epoch < 5 else 0.5 if epoch < 15 else 1.0)


def test_cosine_weight_starts_at_its_maximum_and_reaches_its_minimum_after_half_a_period():
    s = LossScheduler(10, {"u": {"type": "cosine", "min_value": 0.05, "max_value": 0.15, "period": 20}})
    assert s.get_weights(0)["u"] == pytest.approx(0.15)
    assert s.get_weights(10)["u"] == pytest.approx(0.05)


def test_the_seed_shorthand_ramps_from_the_initial_weight_to_the_final_weight_over_the_warmup():
    s = LossScheduler.from_config({"enable": True, "schedule_type": "linear", "warmup_epochs": 10,
                                   "final_weights": {"ratio_weight": 0.8, "ch1_weight": 1.0}}, 100,
                                  initial_weights={"ratio_weight": 0.5, "ch1_weight": 1.0})
    assert s.get_weights(0) == pytest.approx({"ratio_weight": 0.5, "ch1_weight": 1.0})
    assert s.get_weights(5)["ratio_weight"] == pytest.approx(0.65)
    assert s.get_weights(20)["ratio_weight"] == pytest.approx(0.8)
    assert LossScheduler.from_config({"enable": False, "final_weights": {"a": 1.0}}, 10) is None


@pytest.mark.parametrize("bad, words", [
    ({"w": {"type": "sawtooth"}}, "schedule_config.w"),
    ({"w": {"type": "linear", "start_value": -1.0}}, "start_value"),
    ({"w": {"type": "cosine", "min_value": 0.5, "max_value": 0.1, "period": 3}}, "min_value"),
    ({"w": {"value": 1.0}}, "no 'type'"),
    ({"w": {"type": "step", "values": [1, 2], "milestones": []}}, "milestones"),
])
def test_impossible_schedules_are_rejected_with_a_one_line_error(bad, words):
    with pytest.raises(DecodeAccelError) as err:
        LossScheduler(10, bad)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_loss_scheduler_hook_sets_the_loss_weights_at_every_epoch_start():
    sim = tiny_simulation()
    train, _ = stream_loaders(sim)
    sched = LossScheduler(3, {"loc_weight": {"type": "linear", "start_value": 0.2, "end_value": 1.0,
                                             "start_epoch": 0, "end_epoch": 2}})

    class Seen(Hook):
        def __init__(self):
            self.weights = []

        def on_step_start(self, trainer):
            self.weights.append(trainer.loss_fn.weights["loc_weight"])

    seen = Seen()
    trainer = make_trainer(hooks=[LossSchedulerHook(sched), seen])
    trainer.train(train, None, epochs=3, steps_per_epoch=1)
    assert seen.weights == pytest.approx([0.2, 0.6, 1.0])


# ---------------------------------------------------------------------------------------------- curriculum
def test_curriculum_difficulty_reaches_a_dataloader_worker_and_lr_and_weights_follow_the_stages():
    sim = tiny_simulation()
    from decode_accel.data import create_dataloader
    train = create_dataloader(None, {"batch_size": 2, "num_workers": 1, "seed": 1}, "train", simulation_config=sim)
    stages = [
        {"until_epoch": 1, "simulation": {"emitters.emitters_per_frame": 0.0}, "lr": 1e-3,
         "loss_weights": {"bg_weight": 2.0}, "description": "empty frames"},
        {"until_epoch": 2, "simulation": {"emitters": {"emitters_per_frame": 6.0}}, "lr": 5e-4,
         "loss_weights": {"bg_weight": 1.0}},
    ]

    class Seen(Hook):
        def __init__(self):
            self.rows = []

        def on_batch(self, trainer, batch):
            self.rows.append((trainer.epoch, int(batch["tgt_mask"].sum()), trainer.get_lr(),
                              trainer.loss_fn.weights["bg_weight"]))
            return batch

    seen = Seen()
    trainer = make_trainer(hooks=[CurriculumHook(stages), seen])
    trainer.train(train, None, epochs=2, steps_per_epoch=2)
    first = [r for r in seen.rows if r[0] == 0]
    second = [r for r in seen.rows if r[0] == 1]
    # the worker simulated no emitter in stage 0, and (6 per frame on average) some in stage 1
    assert all(n == 0 for _, n, _, _ in first)
    assert sum(n for _, n, _, _ in second) > 0
    assert {lr for _, _, lr, _ in first} == {1e-3} and {lr for _, _, lr, _ in second} == {5e-4}
    assert {w for *_, w in first} == {2.0} and {w for *_, w in second} == {1.0}


def test_the_hook_the_config_and_the_seed_share_one_curriculum_stage_type():
    from decode_accel.training.config import CurriculumStage, TrainingConfig

    config = TrainingConfig(curriculum=[{"until_epoch": 2, "lr": 1e-3}])
    seed = {"end_epoch": 4, "learning_rate": 2e-4, "description": "dense"}
    hook = CurriculumHook([config.curriculum[0], seed])
    assert all(type(s) is CurriculumStage for s in hook.stages)
    assert hook.stages[0] is config.curriculum[0]
    assert (hook.stages[1].until_epoch, hook.stages[1].lr) == (4, 2e-4)
    # a stage that says neither where it ends nor a known field is refused in one line naming the stage
    with pytest.raises(DecodeAccelError, match=r"curriculum\.1: give exactly one of until_epoch and until_step"):
        CurriculumHook([{"until_epoch": 1}, {"lr": 1e-3}])
    with pytest.raises(DecodeAccelError, match=r"curriculum\.0\.lrate"):
        CurriculumHook([{"until_epoch": 1, "lrate": 1e-3}])


# ---------------------------------------------------------------------------------------------- distillation
def test_distillation_blends_teacher_and_ground_truth_and_leaves_the_teacher_untouched():
    sim = tiny_simulation()
    train, _ = stream_loaders(sim)
    torch.manual_seed(7)
    teacher = tiny_sigma_munet()
    teacher_before = flat_params(teacher).clone()
    alpha = 0.7

    class Seen(Hook):
        def __init__(self):
            self.terms = []

        def on_step_end(self, trainer, losses):
            self.terms.append({k: float(v.detach()) for k, v in losses.items()})

    seen = Seen()
    hook = DistillationHook(teacher, alpha=alpha)
    trainer = make_trainer(hooks=[hook, seen])
    trainer.train(train, None, epochs=1, steps_per_epoch=3)
    for t in seen.terms:
        assert t["loss"] == pytest.approx(alpha * t["distill_loss"] + (1 - alpha) * t["gt_loss"], rel=1e-5)
        assert t["distill_loss"] > 0
    assert torch.equal(flat_params(teacher), teacher_before)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_a_student_identical_to_its_teacher_has_no_detection_distillation_loss():
    sim = tiny_simulation()
    train, _ = stream_loaders(sim)
    trainer = make_trainer()
    teacher = copy.deepcopy(trainer.unwrapped_model)
    hook = DistillationHook(teacher, alpha=1.0)
    hook.on_fit_start(trainer)
    batch = trainer.to_device(next(iter(train)))
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(batch["frames"])
        losses = hook.on_loss(trainer, trainer.loss_fn(out, batch), out, batch)
    assert float(losses["distill_p_loss"]) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- stopping / LR
class FakeValLoss(Hook):
    """Replaces the validation loss by a scripted sequence (an independent, known signal)."""

    def __init__(self, values):
        self.values = list(values)

    def on_eval_end(self, trainer, metrics):
        metrics["val_loss"] = self.values.pop(0)


def test_early_stopping_stops_after_patience_validations_without_improvement():
    sim = tiny_simulation()
    train, val = stream_loaders(sim, val_samples=4)
    trainer = make_trainer(hooks=[FakeValLoss([3.0, 2.0, 2.5, 2.1, 2.2, 1.0, 0.5])])
    history = trainer.train(train, val, epochs=7, steps_per_epoch=1, early_stopping_patience=3)
    # best 2.0 at epoch 1; epochs 2, 3, 4 do not improve -> stop after epoch 4
    assert len(history["train_loss"]) == 5 and history["stopped_early"]
    assert "early stopping" in history["stop_reason"]
    assert history["best_val_loss"] == 2.0 and history["best_epoch"] == 1


def test_reduce_lr_on_plateau_halves_the_learning_rate_after_patience_stalls():
    sim = tiny_simulation()
    train, val = stream_loaders(sim, val_samples=4)
    plateau = ReduceLROnPlateauHook(factor=0.5, patience=2, min_lr=1e-5)
    trainer = make_trainer(hooks=[FakeValLoss([1.0, 1.0, 1.0, 1.0, 1.0]), plateau], lr=1e-3)
    history = trainer.train(train, val, epochs=5, steps_per_epoch=1)
    # stalls at epochs 1, 2 -> halve (after epoch 2); stalls 3, 4 -> halve again (after epoch 4)
    assert history["lr"] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
    assert plateau.reductions == 2


def test_scheduler_type_reduce_lr_on_plateau_installs_the_plateau_hook():
    trainer = make_trainer(scheduler={"type": "ReduceLROnPlateau", "factor": 0.1, "patience": 4})
    hooks = [h for h in trainer.hooks if isinstance(h, ReduceLROnPlateauHook)]
    assert len(hooks) == 1 and hooks[0].factor == 0.1 and hooks[0].patience == 4


def test_hook_states_survive_a_checkpoint_round_trip(tmp_path):
    sim = tiny_simulation()
    train, val = stream_loaders(sim, val_samples=4)
    stop = EarlyStopping(patience=5)
    trainer = make_trainer(hooks=[FakeValLoss([2.0, 3.0]), stop])
    trainer.train(train, val, epochs=2, steps_per_epoch=1, save_dir=tmp_path)
    assert (stop.best, stop.wait) == (2.0, 1)
    again = EarlyStopping(patience=5)
    resumed = make_trainer(hooks=[FakeValLoss([]), again])
    resumed.train(stream_loaders(sim)[0], None, epochs=2, steps_per_epoch=1, save_dir=tmp_path, resume=True)
    assert (again.best, again.wait) == (2.0, 1)


def test_per_term_schedules_from_a_training_config_follow_their_closed_forms():
    from decode_accel.training import TrainingConfig
    cfg = TrainingConfig(loss_scheduling={"enable": True, "schedules": {
        "ratio_weight": {"type": "linear", "start_value": 0.0, "end_value": 1.0, "start_epoch": 2, "end_epoch": 6},
        "conservation_weight": {"type": "exponential", "start_value": 1.0, "end_value": 0.0, "decay_rate": 0.5},
        "bg_weight": {"type": "step", "start_value": 1.0, "end_value": 0.1, "end_epoch": 3}}})
    s = LossScheduler.from_config(cfg.loss_scheduling, 10)
    w = s.get_weights(4)
    assert w["ratio_weight"] == pytest.approx(0.5)
    assert w["conservation_weight"] == pytest.approx(math.exp(-2.0))
    assert s.get_weights(2)["bg_weight"] == 1.0 and w["bg_weight"] == 0.1


def test_divergence_guard_judges_a_negative_mixture_nll_by_its_spread_not_by_its_median():
    """The mixture NLL hovers around zero or below; ordinary noise there is not a divergence."""
    from decode_accel.training.hooks import DivergenceGuard

    guard = DivergenceGuard()
    rng = torch.Generator().manual_seed(0)
    noise = (torch.randn(60, generator=rng) * 0.3 - 0.2).tolist()  # median -0.2, spread 0.3
    for value in noise:
        assert not guard._is_bad(torch.tensor(value))[0]
        guard.history.append(value)
    assert not guard._is_bad(torch.tensor(0.6))[0]        # 2.7 sigma above: noise
    assert guard._is_bad(torch.tensor(50.0))[0]           # an explosion
    assert guard._is_bad(torch.tensor(float("nan")))[0]
