"""The training loop: events, accumulation, LR stepping, divergence guard, exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from decode_accel.loss import GaussianMMLoss
from decode_accel.training import BaseTrainer, DivergenceGuard, Hook
from decode_accel.training.hooks import EVENTS
from tests.test_trainer_helpers import (ListDataset, flat_params, map_loader, stream_loaders, tiny_sigma_munet,
                                        tiny_simulation)


@pytest.fixture(autouse=True)
def one_thread():
    # bitwise comparisons depend on the thread count (accelerate_notes.md §2a)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_trainer(hooks=(), scheduler=None, lr=1e-3, seed=0):
    torch.manual_seed(seed)
    model = tiny_sigma_munet()
    return BaseTrainer(model, GaussianMMLoss(scaling=model.scaling), {"type": "Adam", "lr": lr}, scheduler,
                       hooks=hooks, cpu=True, seed=seed)


class EventCounter(Hook):
    def __init__(self):
        self.counts = {e: 0 for e in EVENTS}

    def __getattribute__(self, name):
        if name in EVENTS:
            counts = object.__getattribute__(self, "counts")

            def record(trainer, *args):
                counts[name] += 1
                if name in ("on_batch", "on_loss"):
                    return args[0]
            return record
        return object.__getattribute__(self, name)


class LossRecorder(Hook):
    def __init__(self):
        self.losses, self.lrs = [], []

    def on_step_end(self, trainer, losses):
        self.losses.append(float(losses["loss"].detach()))
        self.lrs.append(trainer.get_lr())


def test_every_event_fires_the_expected_number_of_times_with_accumulation_of_two():
    sim = tiny_simulation()
    train, val = stream_loaders(sim)
    counter = EventCounter()
    trainer = make_trainer(hooks=[counter])
    epochs, batches = 2, 6  # 6 micro-batches per epoch -> 3 optimizer updates per epoch
    history = trainer.train(train, val, epochs=epochs, steps_per_epoch=batches, accumulate_grad_batches=2)
    updates = epochs * batches // 2
    assert counter.counts == {
        "on_fit_start": 1, "on_epoch_start": epochs, "on_step_start": updates, "on_batch": epochs * batches,
        "on_loss": epochs * batches, "on_after_backward": epochs * batches, "on_step_end": updates,
        "on_eval_end": epochs, "on_epoch_end": epochs, "on_fit_end": 1}
    assert history["global_step"] == updates
    assert len(history["train_loss"]) == epochs and len(history["val_loss"]) == epochs


def test_an_odd_epoch_length_closes_its_last_accumulation_group():
    sim = tiny_simulation()
    train, _ = stream_loaders(sim)
    counter = EventCounter()
    trainer = make_trainer(hooks=[counter])
    trainer.train(train, None, epochs=2, steps_per_epoch=5, accumulate_grad_batches=2)
    # 5 micro-batches = 2 full groups + 1 group closed by the end of the epoch
    assert counter.counts["on_step_end"] == 2 * 3
    assert trainer.global_step == 6


def test_lr_schedule_steps_once_per_optimizer_update_not_per_micro_batch():
    sim = tiny_simulation()
    train, _ = stream_loaders(sim)
    rec = LossRecorder()
    # ExponentialLR with gamma 0.5 per *update* (interval step): after k updates lr = lr0 * 0.5**k
    trainer = make_trainer(hooks=[rec], scheduler={"type": "ExponentialLR", "gamma": 0.5, "interval": "step"},
                           lr=1e-2)
    trainer.train(train, None, epochs=1, steps_per_epoch=8, accumulate_grad_batches=4)
    assert trainer.global_step == 2
    assert rec.lrs == pytest.approx([1e-2 * 0.5, 1e-2 * 0.25])


def test_epoch_unit_step_lr_changes_only_at_epoch_boundaries_and_warmup_ramps_per_update():
    sim = tiny_simulation()
    train, _ = stream_loaders(sim)
    rec = LossRecorder()
    trainer = make_trainer(hooks=[rec], scheduler={"type": "StepLR", "step_size": 1, "gamma": 0.1,
                                                   "warmup_steps": 2}, lr=1e-2)
    trainer.train(train, None, epochs=2, steps_per_epoch=3)
    # lr after update k (1-based) = 1e-2 * 0.1**floor(k/3) * min(1, k/2)
    expected = [1e-2 * 0.1 ** (k // 3) * min(1.0, k / 2) for k in range(1, 7)]
    assert rec.lrs == pytest.approx(expected)


def test_divergence_guard_skips_a_nan_batch_and_leaves_the_weights_untouched():
    sim = tiny_simulation()
    train, _ = stream_loaders(sim)

    class PoisonThirdBatch(Hook):
        def __init__(self):
            self.seen = 0

        def on_batch(self, trainer, batch):
            self.seen += 1
            if self.seen == 3:
                batch = dict(batch, frames=batch["frames"] * float("nan"))
            return batch

    class Snapshot(Hook):
        def __init__(self):
            self.params = []

        def on_step_start(self, trainer):
            self.params.append(flat_params(trainer.unwrapped_model).clone())

    guard, snap = DivergenceGuard(action="skip", max_events=3), Snapshot()
    trainer = make_trainer(hooks=[PoisonThirdBatch(), guard, snap])
    history = trainer.train(train, None, epochs=1, steps_per_epoch=5)
    assert guard.events == 1 and "non-finite" in guard.log[0]["reason"]
    assert trainer.global_step == 4  # 5 batches, one update skipped
    # the update of batch 3 was skipped: parameters before batch 4 equal those before batch 3
    assert torch.equal(snap.params[2], snap.params[3])
    assert not torch.equal(snap.params[1], snap.params[2])
    assert torch.isfinite(flat_params(trainer.unwrapped_model)).all()
    assert math.isfinite(history["train_loss"][0])  # the vetoed batch stays out of the epoch mean


def test_divergence_guard_stops_with_a_clear_message_after_its_budget():
    sim = tiny_simulation()
    train, _ = stream_loaders(sim)

    class AlwaysNaN(Hook):
        def on_loss(self, trainer, losses, outputs, batch):
            return dict(losses, loss=losses["loss"] * float("nan"))

    trainer = make_trainer(hooks=[AlwaysNaN(), DivergenceGuard(action="skip", max_events=2)])
    history = trainer.train(train, None, epochs=3, steps_per_epoch=4)
    assert history["stopped_early"] and "diverged 2 times" in history["stop_reason"]
    assert "optimizer.lr" in history["stop_reason"]
    assert trainer.global_step == 0


@pytest.mark.parametrize("data", ["stream", "shuffled_map"])
def test_resume_mid_epoch_reproduces_the_uninterrupted_run_exactly(tmp_path, data):
    sim = tiny_simulation()
    dataset = ListDataset(sim, 24) if data == "shuffled_map" else None

    def loader():
        if dataset is not None:
            return map_loader(dataset, batch_size=4, shuffle=True)
        return stream_loaders(sim)[0]

    epochs, per_epoch = 2, 6  # 12 updates; the crash happens at update 9, mid-epoch 2
    kwargs = dict(epochs=epochs, steps_per_epoch=per_epoch, accumulate_grad_batches=1)

    full_rec = LossRecorder()
    full = make_trainer(hooks=[full_rec])
    full.train(loader(), None, save_dir=tmp_path / "full", **kwargs)

    class Crash(Hook):
        def on_step_start(self, trainer):
            if trainer.global_step == 9:
                raise KeyboardInterrupt

    first_rec = LossRecorder()
    first = make_trainer(hooks=[first_rec, Crash()])
    with pytest.raises(KeyboardInterrupt):
        first.train(loader(), None, save_dir=tmp_path / "run", save_every_n_steps=3, **kwargs)
    assert len(first_rec.losses) == 9

    torch.manual_seed(1234)  # the RNG must come back from the checkpoint, not from here
    second_rec = LossRecorder()
    second = make_trainer(hooks=[second_rec])
    second.train(loader(), None, save_dir=tmp_path / "run", resume=True, **kwargs)
    assert second.global_step == 12
    assert first_rec.losses + second_rec.losses == full_rec.losses
    assert torch.equal(flat_params(second.unwrapped_model), flat_params(full.unwrapped_model))


def test_resume_at_an_epoch_boundary_continues_with_the_next_epoch(tmp_path):
    sim = tiny_simulation()
    train, _ = stream_loaders(sim)
    a = make_trainer()
    a.train(train, None, epochs=1, steps_per_epoch=3, save_dir=tmp_path)
    b = make_trainer()
    history = b.train(stream_loaders(sim)[0], None, epochs=2, steps_per_epoch=3, save_dir=tmp_path, resume=True)
    assert b.global_step == 6 and len(history["train_loss"]) == 2


def test_gradient_clipping_bounds_the_update_of_plain_sgd():
    sim = tiny_simulation()
    train, _ = stream_loaders(sim)
    torch.manual_seed(0)
    model = tiny_sigma_munet()
    before = flat_params(model).clone()
    lr, clip = 0.1, 1e-3
    trainer = BaseTrainer(model, GaussianMMLoss(scaling=model.scaling), {"type": "SGD", "lr": lr}, cpu=True)
    trainer.train(train, None, epochs=1, steps_per_epoch=1, gradient_clip_val=clip)
    step = (flat_params(trainer.unwrapped_model) - before).norm()
    # SGD moves by lr * clipped gradient: |step| <= lr * clip (equality when the raw norm exceeds clip)
    assert float(step) == pytest.approx(lr * clip, rel=1e-3)
    assert float(trainer.grad_norm) > clip


def test_divergence_guard_rolls_back_to_the_last_checkpoint_and_halves_the_lr(tmp_path):
    sim = tiny_simulation()
    train, _ = stream_loaders(sim)

    class NaNAfterUpdate5(Hook):
        def on_loss(self, trainer, losses, outputs, batch):
            if trainer.global_step == 5 and trainer.batch_idx == 5:  # the 6th micro-batch
                return dict(losses, loss=losses["loss"] * float("nan"))
            return losses

    class Snapshot(Hook):
        def __init__(self):
            self.after = {}

        def on_step_end(self, trainer, losses):
            self.after[trainer.global_step] = flat_params(trainer.unwrapped_model).clone()

        def on_step_start(self, trainer):
            self.start = flat_params(trainer.unwrapped_model).clone()

    guard, snap, rec = DivergenceGuard(action="rollback", max_events=3), Snapshot(), LossRecorder()
    trainer = make_trainer(hooks=[NaNAfterUpdate5(), guard, snap, rec], lr=1e-3)
    trainer.train(train, None, epochs=1, steps_per_epoch=7, save_dir=tmp_path, save_every_n_steps=4)
    assert guard.events == 1 and guard.log[0]["action"] == "rollback"
    # 7 micro-batches, the 6th vetoed: 6 updates; the 7th started from the step-4 checkpoint at half the lr
    assert trainer.global_step == 6
    assert torch.equal(snap.start, snap.after[4])
    assert rec.lrs == pytest.approx([1e-3] * 5 + [0.5e-3])


def test_gradient_checkpointing_sets_the_model_flag_and_trains_to_the_same_weights():
    sim = tiny_simulation()
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = tiny_sigma_munet()
        trainer = BaseTrainer(model, GaussianMMLoss(scaling=model.scaling), {"type": "SGD", "lr": 1e-3}, cpu=True,
                              gradient_checkpointing=flag)
        assert trainer.unwrapped_model.gradient_checkpointing is flag
        trainer.train(stream_loaders(sim)[0], None, epochs=1, steps_per_epoch=2, gradient_clip_val=1.0)
        results.append(flat_params(trainer.unwrapped_model))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, words", [
    ({"optimizer_config": {"type": "Adamm", "lr": 1e-3}}, "optimizer.type"),
    ({"optimizer_config": {"type": "SGD", "lr": 1e-3, "betas": (0.9, 0.99)}}, "SGD"),
    ({"scheduler_config": {"type": "StepLR"}}, "step_size"),
    ({"scheduler_config": {"type": "Linear"}}, "scheduler.type"),
    ({"mixed_precision": "fp12"}, "mixed_precision"),
])
def test_bad_trainer_arguments_raise_one_line_errors_naming_the_field(kwargs, words):
    from decode_accel.errors import DecodeAccelError
    sim = tiny_simulation()
    model = tiny_sigma_munet()
    args = {"optimizer_config": {"type": "Adam", "lr": 1e-3}, **kwargs}
    with pytest.raises(DecodeAccelError) as err:
        trainer = BaseTrainer(model, GaussianMMLoss(scaling=model.scaling), cpu=True, **args)
        trainer.train(stream_loaders(sim)[0], None, epochs=1, steps_per_epoch=1)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_an_endless_stream_without_an_epoch_length_is_refused():
    from decode_accel.errors import DecodeAccelError
    trainer = make_trainer()
    with pytest.raises(DecodeAccelError, match="steps_per_epoch"):
        trainer.train(stream_loaders(tiny_simulation())[0], None, epochs=1)


def test_accumulation_still_groups_micro_batches_after_an_earlier_loop_left_a_dataloader_unfinished():
    # Accelerate's GradientState is shared by every Accelerator of a process: a prepared DataLoader that an
    # earlier loop abandoned stays "active" and "at its end" and used to make every micro-batch an update.
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    abandoned = accelerator.prepare(torch.utils.data.DataLoader(list(range(4)), batch_size=2))
    iterator = iter(abandoned)
    next(iterator), next(iterator)  # the loader reaches its last batch but the loop never finishes it
    sim = tiny_simulation()
    train, val = stream_loaders(sim)
    counter = EventCounter()
    trainer = make_trainer(hooks=[counter])
    history = trainer.train(train, val, epochs=1, steps_per_epoch=6, accumulate_grad_batches=2)
    assert history["global_step"] == 3 and counter.counts["on_step_end"] == 3
    del iterator
