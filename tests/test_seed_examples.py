"""Every Python snippet of the seed README, run as written (imports renamed, sizes shrunk: 16x16 frames,
tiny networks, a few steps) and checked for what it claims.

The subclass examples (MixedPrecisionTrainer, GradientAccumulationTrainer, AdaptiveLRTrainer,
DistributedTrainer, CurriculumTrainer, DistillationTrainer) keep the seed's bodies; only the lines of
the batch/loss mapping documented in the README ("Extending the trainer") change, each marked
``# mapped:`` with the seed's original.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from decode_accel.training import BaseTrainer, Hook
from tests.test_trainer_helpers import ListDataset, flat_params, map_loader, stream_loaders, tiny_simulation


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _complete_steps(folder):
    return sorted(int(p.name[5:]) for p in folder.glob("step-*") if (p / "complete.json").exists())


# ---------------------------------------------------------------------------------------------- 使用示例
def test_multi_channel_training_example(tmp_path):
    from decode_accel.data import create_multi_channel_dataloader
    from decode_accel.loss import UnifiedLoss
    from decode_accel.models import DoubleMUNet
    from decode_accel.training import MultiChannelTrainer

    sim = tiny_simulation(n_channels=2)
    train_loader = create_multi_channel_dataloader(
        data_path=None, config={'batch_size': 4, 'shuffle': True, 'num_workers': 0, 'pin_memory': False},
        mode='train', simulation_config=sim)
    val_loader = create_multi_channel_dataloader(
        data_path=None, config={'batch_size': 4, 'shuffle': False, 'val_samples': 8}, mode='val',
        simulation_config=sim)
    model = DoubleMUNet(in_channels=1, out_channels_ch1=5, out_channels_ch2=5, out_channels_ratio=1,
                        uncertainty=True, features=8)
    loss_fn = UnifiedLoss(ch1_weight=1.0, ch2_weight=1.0, ratio_weight=0.5, conservation_weight=0.1,
                          uncertainty_weight=0.1, scaling=model.scaling)
    from decode_accel.inference.postprocess import PostProcessor
    from decode_accel.export import dye_table
    trainer = MultiChannelTrainer(
        model=model, loss_fn=loss_fn,
        optimizer_config={'type': 'AdamW', 'lr': 1e-3, 'weight_decay': 1e-4},
        scheduler_config={'type': 'CosineAnnealingLR', 'T_max': 100, 'eta_min': 1e-6},
        device='cuda', mixed_precision=True, cpu=True,
        # (a threshold below the untrained network's p, about 0.001-0.009 per pixel and rising with training,
        # so that detections reach the evaluation whatever the trajectory of 4 updates)
        postprocessor=PostProcessor(px_size_nm=100.0, dye_table=dye_table(sim), threshold=0.001))
    training_history = trainer.train(
        train_loader=train_loader, val_loader=val_loader, epochs=2, save_dir=str(tmp_path / 'ckpt'),
        save_every=1, validate_every=1, early_stopping_patience=15, steps_per_epoch=2)

    # best_val_loss / best_epoch are the best of the validations that ran (one per epoch)
    assert len(training_history['val_loss']) == 2
    assert training_history['best_val_loss'] == min(training_history['val_loss'])
    assert training_history['best_epoch'] == training_history['val_loss'].index(training_history['best_val_loss'])
    assert training_history['total_time'] > 0 and not training_history['stopped_early']
    # save_every=1: a complete checkpoint after each epoch of 2 updates
    assert _complete_steps(tmp_path / 'ckpt') == [2, 4]
    # CosineAnnealingLR with T_max in epochs, stepped per update: the lr after epoch e follows the closed form
    expected = [1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * e / 100)) / 2 for e in (1, 2)]
    assert training_history['lr'] == pytest.approx(expected, rel=1e-9)
    last = training_history['val_metrics'][-1]
    # the two-channel loss terms are logged by name, and the table metrics are computed against the truth
    assert {'val_ratio_loss', 'val_conservation_loss', 'jaccard', 'n_gt', 'n_pred', 'tp', 'fp', 'fn'} <= set(last)
    n_true = sum(int(b['tgt_mask'].sum()) for b in val_loader)
    assert n_true > 0 and last['n_gt'] == n_true and last['tp'] + last['fn'] == n_true
    assert last['n_pred'] > 0 and last['tp'] + last['fp'] == last['n_pred']
    assert last['jaccard'] == pytest.approx(last['tp'] / (last['tp'] + last['fp'] + last['fn']))


def test_single_channel_training_example():
    from decode_accel.loss import RatioGaussianNLLLoss
    from decode_accel.models import SigmaMUNet

    train_loader, val_loader = stream_loaders(tiny_simulation())
    model = SigmaMUNet(in_channels=1, out_channels=5, uncertainty=True, features=8)
    loss_fn = RatioGaussianNLLLoss(scaling=model.scaling)
    trainer = BaseTrainer(model=model, loss_fn=loss_fn,
                          optimizer_config={'type': 'Adam', 'lr': 2e-3, 'betas': (0.9, 0.999)},
                          scheduler_config={'type': 'StepLR', 'step_size': 30, 'gamma': 0.5}, cpu=True)
    training_config = {'epochs': 2, 'gradient_clip_val': 1.0, 'accumulate_grad_batches': 2, 'log_every': 100,
                       'validate_every': 5, 'steps_per_epoch': 4}
    results = trainer.train(train_loader=train_loader, val_loader=val_loader, **training_config)
    assert results['global_step'] == 4  # 2 epochs x 4 micro-batches / 2 accumulated
    assert len(results['val_loss']) == 1  # validate_every 5 -> only the last epoch validates
    assert all(math.isfinite(v) for v in results['train_loss'])
    assert trainer.grad_norm is not None and trainer.gradient_clip_val == 1.0  # clipping ran
    assert trainer.optimizer.param_groups[0]['betas'] == (0.9, 0.999)
    assert results['lr'] == pytest.approx([2e-3, 2e-3])  # StepLR halves only after 30 epochs


def test_advanced_training_config_builds_a_multi_channel_trainer(tmp_path):
    from decode_accel.training import MultiChannelTrainer, TrainingConfig, build_loaders

    config = TrainingConfig(
        epochs=100, batch_size=16, learning_rate=1e-3,
        optimizer={'type': 'AdamW', 'weight_decay': 1e-4, 'amsgrad': True},
        scheduler={'type': 'OneCycleLR', 'max_lr': 1e-2, 'pct_start': 0.3, 'anneal_strategy': 'cos'},
        regularization={'dropout': 0.1, 'batch_norm': True, 'weight_decay': 1e-4},
        training_strategy={'mixed_precision': True, 'gradient_clipping': 1.0, 'accumulate_grad_batches': 1,
                           'early_stopping_patience': 20},
        loss_scheduling={'enable': True, 'schedule_type': 'linear', 'warmup_epochs': 10,
                         'final_weights': {'ch1_weight': 1.0, 'ch2_weight': 1.0, 'ratio_weight': 0.8,
                                           'conservation_weight': 0.2}},
        monitoring={'log_every': 50, 'validate_every': 5, 'save_every': 10, 'plot_every': 20})
    trainer = MultiChannelTrainer.from_config(config)
    assert type(trainer) is MultiChannelTrainer
    assert type(trainer.unwrapped_model).__name__ == 'DoubleMUNet'
    opt = trainer.optimizer.param_groups[0]
    assert opt['amsgrad'] is True and opt['weight_decay'] == 1e-4
    s = trainer.settings
    assert (s.epochs, s.early_stopping_patience, s.gradient_clip_val, s.log_every, s.validate_every, s.save_every,
            s.plot_every) == (100, 20, 1.0, 50, 5, 10, 20)
    assert trainer.fit_kwargs['epochs'] == 100
    assert any(isinstance(m, (nn.Dropout, nn.Dropout2d)) and m.p == 0.1 for m in trainer.unwrapped_model.modules())

    # the same config, shrunk to a few seconds, trains end to end with its monitoring section acting
    small = trainer.config.model_copy(deep=True)  # the config with its two-channel defaults filled in
    small.model.preset, small.model.features = 'tiny', None
    small.simulation = tiny_simulation(n_channels=2)
    small.data.batch_size, small.data.steps_per_epoch, small.data.val_samples = 2, 2, 4
    small.training_strategy.epochs = 2
    small.monitoring.validate_every, small.monitoring.log_every, small.monitoring.plot_every = 1, 1, 2
    small.monitoring.log_dir, small.monitoring.use_tensorboard = str(tmp_path / 'logs'), False
    small.checkpointing.save_dir = str(tmp_path / 'ckpt')

    class LRs(Hook):
        def __init__(self):
            self.used = []

        def on_step_start(self, trainer):
            self.used.append(trainer.get_lr())

    lrs = LRs()
    trainer = MultiChannelTrainer.from_config(small, hooks=(lrs,))
    train_loader, val_loader = build_loaders(small)
    history = trainer.train(train_loader, val_loader)  # from_config(...).train(...): the Python path
    assert history['global_step'] == 4 and len(history['val_loss']) == 2
    # OneCycleLR spans exactly the run's 4 updates: from max_lr / div_factor up to max_lr and down to
    # max_lr / (div_factor * final_div_factor) at the last update
    assert lrs.used[0] == pytest.approx(1e-2 / 25) and max(lrs.used) <= 1e-2 * (1 + 1e-9)
    assert lrs.used[-1] == pytest.approx(1e-2 / 25 / 1e4, rel=1e-6)
    # the loss-weight schedule moved ratio_weight from its initial value towards 0.8
    assert trainer.loss_fn.weights['ratio_weight'] == pytest.approx(0.5 + (0.8 - 0.5) * 1 / 10)
    assert (tmp_path / 'export' / 'model.safetensors').exists()  # the export: beside checkpoints/
    # monitoring: batch metrics every update (log_every 1), epoch metrics, curves at epoch 2 (plot_every 2)
    records = _jsonl(tmp_path / 'logs' / 'metrics.jsonl')
    batches = [r for r in records if r['kind'] == 'batch']
    assert [r['step'] for r in batches] == [1, 2, 3, 4]
    assert all(math.isfinite(r['train_loss']) and 'train_ratio_loss' in r for r in batches)
    assert len([r for r in records if r['kind'] == 'epoch']) == 2
    assert (tmp_path / 'logs' / 'plots' / 'training_curves.png').stat().st_size > 1000


def test_loss_scheduler_loop_example():
    from decode_accel.loss import UnifiedLoss
    from decode_accel.models import DoubleMUNet
    from decode_accel.training import LossScheduler

    train_loader, _ = stream_loaders(tiny_simulation(n_channels=2), batch_size=2)
    model = DoubleMUNet(features=8)
    loss_fn = UnifiedLoss(scaling=model.scaling)
    trainer = BaseTrainer(model, loss_fn, {'type': 'Adam', 'lr': 1e-3}, cpu=True, steps_per_epoch=1)
    loss_scheduler = LossScheduler(
        total_epochs=100,
        schedule_config={
            'ch1_weight': {'type': 'constant', 'value': 1.0},
            'ch2_weight': {'type': 'constant', 'value': 1.0},
            'ratio_weight': {'type': 'linear', 'start_value': 0.1, 'end_value': 0.8, 'start_epoch': 10,
                             'end_epoch': 50},
            'conservation_weight': {'type': 'exponential', 'start_value': 0.01, 'end_value': 0.2,
                                    'decay_rate': 0.1},
            'uncertainty_weight': {'type': 'cosine', 'min_value': 0.05, 'max_value': 0.15, 'period': 20}})
    seen = []
    for epoch in (0, 1, 30):
        current_weights = loss_scheduler.get_weights(epoch)
        loss_fn.update_weights(**current_weights)
        train_loss = trainer.train_epoch(train_loader)
        seen.append((train_loss, dict(loss_fn.weights)))
    assert all(math.isfinite(loss) for loss, _ in seen)
    assert seen[2][1]['ratio_weight'] == pytest.approx(0.1 + 0.7 * 20 / 40)
    assert seen[1][1]['conservation_weight'] == pytest.approx(0.2 - 0.19 * math.exp(-0.1))
    assert seen[0][1]['uncertainty_weight'] == pytest.approx(0.15)
    assert trainer.epoch == 3 and trainer.global_step == 3  # standalone train_epoch calls count epochs


def test_monitor_loop_example(tmp_path, monkeypatch):
    from PIL import Image

    from decode_accel.loss import GaussianMMLoss
    from decode_accel.models import SigmaMUNet
    from decode_accel.training import TrainingMonitor

    monkeypatch.setenv('WANDB_MODE', 'offline')
    train_loader, val_loader = stream_loaders(tiny_simulation(), val_samples=4)
    model = SigmaMUNet.from_preset('tiny')
    loss_fn = GaussianMMLoss(scaling=model.scaling)
    trainer = BaseTrainer(model, loss_fn, {'type': 'Adam', 'lr': 1e-3}, cpu=True)
    optimizer, accelerator = trainer.optimizer, trainer.accelerator
    monitor = TrainingMonitor(log_dir=str(tmp_path / 'logs'), use_tensorboard=True, use_wandb=False,
                              wandb_project='decode_v3',
                              wandb_config={'model': 'SigmaMUNet', 'dataset': 'simulated'})
    logged, validated = [], []
    for epoch in range(2):
        model.train()
        for batch_idx, batch in enumerate(itertools.islice(train_loader, 2)):
            output = model(batch['frames'])
            terms = loss_fn(output, batch)
            accelerator.backward(terms['loss'])
            optimizer.step()
            optimizer.zero_grad()
            logged.append(terms['loss'].item())
            monitor.log_batch_metrics(epoch=epoch, batch_idx=batch_idx, metrics={
                'train_loss': terms['loss'].item(), 'train_loc_loss': terms['loc_loss'].item(),
                'learning_rate': optimizer.param_groups[0]['lr']})
        val_metrics = trainer.validate(val_loader)
        validated.append(val_metrics['val_loss'])
        monitor.log_epoch_metrics(epoch=epoch, train_metrics={'loss': terms['loss'].item()},
                                  val_metrics=val_metrics, model=model)
    curves = monitor.plot_training_curves()
    preds = monitor.plot_model_predictions(model, val_loader)
    monitor.close()
    # the log holds exactly what was logged: four batch records and two epoch records with their values
    records = _jsonl(tmp_path / 'logs' / 'metrics.jsonl')
    batches = [r for r in records if r['kind'] == 'batch']
    epochs = [r for r in records if r['kind'] == 'epoch']
    assert [r['train_loss'] for r in batches] == pytest.approx(logged)
    assert [(r['epoch'], r['batch']) for r in batches] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r['val_loss'] for r in epochs] == pytest.approx(validated) and validated[0] != validated[1]
    assert all('train_loss' in r and 'weight_norm' in r for r in epochs)
    assert list((tmp_path / 'logs').rglob('events.out.tfevents*'))  # TensorBoard got the metrics too
    # both figures are real images with content, not empty canvases
    for path in (curves, preds):
        with Image.open(path) as img:
            pixels = np.asarray(img.convert('L'), dtype=np.float32)
            assert img.width >= 200 and img.height >= 150 and float(pixels.std()) > 5.0


def test_checkpoint_manager_loop_with_early_stopping_and_resume(tmp_path):
    from decode_accel.loss import GaussianMMLoss
    from decode_accel.models import SigmaMUNet
    from decode_accel.training import CheckpointManager

    train_loader, val_loader = stream_loaders(tiny_simulation(), val_samples=4)
    model = SigmaMUNet.from_preset('tiny')
    # lr 0: the validation loss cannot improve, so early stopping must trigger after `patience` epochs
    trainer = BaseTrainer(model, GaussianMMLoss(scaling=model.scaling), {'type': 'SGD', 'lr': 0.0}, cpu=True,
                          steps_per_epoch=1)
    optimizer = trainer.optimizer
    checkpoint_manager = CheckpointManager(save_dir=str(tmp_path / 'ckpt'), save_top_k=3, monitor_metric='val_loss',
                                           mode='min', save_every_n_epochs=1, save_last=True)
    training_config = {'epochs': 10, 'note': 'seed example'}
    stopped_at = None
    for epoch in range(10):
        trainer.train_epoch(train_loader)
        val_metrics = trainer.validate(val_loader)
        checkpoint_manager.save_checkpoint(epoch=epoch, model=model, optimizer=optimizer, scheduler=None,
                                           metrics=val_metrics, config=training_config)
        if checkpoint_manager.should_stop_early(patience=2):
            stopped_at = epoch
            break
    assert stopped_at == 2
    best_checkpoint = checkpoint_manager.load_best_checkpoint()
    model.load_state_dict(best_checkpoint['model_state_dict'])
    assert checkpoint_manager.has_checkpoint()
    checkpoint = checkpoint_manager.load_last_checkpoint()
    model.load_state_dict(checkpoint['model_state_dict'])
    optimizer.load_state_dict(checkpoint['optimizer_state_dict'])
    start_epoch = checkpoint['epoch'] + 1
    assert start_epoch == 3


# ---------------------------------------------------------------------------------------------- 高级训练技术
class CountCalls(Hook):
    """Counts micro-batches and optimizer updates seen by the loop."""

    def __init__(self):
        self.batches, self.updates, self.lrs, self.weights = 0, 0, [], []

    def on_batch(self, trainer, batch):
        self.batches += 1
        return batch

    def on_step_start(self, trainer):
        self.lrs.append((trainer.current_epoch, trainer.get_lr()))
        self.weights.append(dict(getattr(trainer.loss_fn, 'weights', {})))

    def on_step_end(self, trainer, losses):
        self.updates += 1


def _tiny(seed=0):
    from decode_accel.loss import GaussianMMLoss
    from decode_accel.models import SigmaMUNet
    torch.manual_seed(seed)
    model = SigmaMUNet.from_preset('tiny')
    return model, GaussianMMLoss(scaling=model.scaling)


@pytest.fixture
def fresh_accelerate_state():
    """bf16 needs its own Accelerator setting: one process holds one, so reset it around the test."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    reset()
    yield
    reset()


def test_mixed_precision_trainer_override_runs_under_autocast_and_accumulates(fresh_accelerate_state):
    class MixedPrecisionTrainer(BaseTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # mapped: self.scaler = GradScaler() -- Accelerate owns loss scaling (fp16) and autocast
            self.use_amp = True
            self.calls = 0

        def train_step(self, batch):
            self.calls += 1
            inputs, targets = batch['frames'], batch  # mapped: inputs, targets = batch

            with self.autocast(enabled=self.use_amp):  # mapped: autocast(enabled=self.use_amp)
                outputs = self.model(inputs)
                loss = self.loss_fn(outputs, targets)['loss']  # mapped: self.loss_fn(outputs, targets)

            # 反向传播
            self.backward(loss)  # mapped: self.scaler.scale(loss).backward()

            # 梯度裁剪
            if self.gradient_clip_val > 0:
                self.clip_gradients()  # mapped: scaler.unscale_ + clip_grad_norm_

            # 优化器步骤
            self.optimizer.step()  # mapped: self.scaler.step(self.optimizer); self.scaler.update()
            self.optimizer.zero_grad()

            return loss  # mapped: loss.item() (works too, at the price of a host sync)

    model, loss_fn = _tiny()
    dtypes = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    before = flat_params(model).clone()
    counter = CountCalls()
    trainer = MixedPrecisionTrainer(model, loss_fn, {'type': 'Adam', 'lr': 1e-3}, mixed_precision='bf16', cpu=True,
                                    hooks=[counter])
    history = trainer.train(stream_loaders(tiny_simulation())[0], None, epochs=1, steps_per_epoch=4,
                            accumulate_grad_batches=2, gradient_clip_val=1.0)
    assert trainer.accelerator.mixed_precision == 'bf16'
    assert trainer.calls == 4 and counter.batches == 4  # the override ran for every micro-batch
    assert dtypes and set(dtypes) == {torch.bfloat16}  # AMP: the convolutions ran in bf16
    # accumulation owned by Accelerate: the seed's optimizer.step() only stepped at each group's end
    assert history['global_step'] == 2 and counter.updates == 2
    assert trainer.grad_norm is not None
    after = flat_params(trainer.unwrapped_model)
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    assert math.isfinite(history['train_loss'][0])


class GradientAccumulationTrainer(BaseTrainer):
    def __init__(self, accumulate_grad_batches=1, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accumulate_grad_batches = accumulate_grad_batches

    def train_epoch(self, train_loader):
        self.model.train()
        total_loss = 0

        for batch_idx, batch in enumerate(self.epoch_batches(train_loader)):  # mapped: enumerate(train_loader)
            loss = self.compute_loss(batch)['loss']  # mapped: self.train_step(batch) (the seed's returns the loss)

            # 标准化损失
            loss = loss / self.accumulate_grad_batches
            loss.backward()

            # 每accumulate_grad_batches步更新一次
            if (batch_idx + 1) % self.accumulate_grad_batches == 0:
                if self.gradient_clip_val > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.gradient_clip_val)

                self.optimizer.step()
                self.optimizer.zero_grad()

            total_loss += loss.item() * self.accumulate_grad_batches

        return total_loss / self.batches_per_epoch  # mapped: / len(train_loader)


def test_gradient_accumulation_trainer_steps_once_per_group_and_matches_the_built_in_accumulation():
    dataset = ListDataset(tiny_simulation(), 16)
    results = {}
    for kind in ('seed', 'built-in'):
        model, loss_fn = _tiny(seed=4)
        if kind == 'seed':
            trainer = GradientAccumulationTrainer(4, model, loss_fn, {'type': 'SGD', 'lr': 0.05}, cpu=True)
            assert trainer.accumulate_grad_batches == 4  # the seed's attribute is the trainer's setting
        else:
            trainer = BaseTrainer(model, loss_fn, {'type': 'SGD', 'lr': 0.05}, cpu=True, accumulate_grad_batches=4)
        steps = []
        trainer.optimizer.optimizer.register_step_post_hook(lambda *_: steps.append(trainer.batch_idx))
        history = trainer.train(map_loader(dataset, batch_size=2, shuffle=False), None, epochs=1)
        assert math.isfinite(history['train_loss'][0])
        results[kind] = (steps, flat_params(trainer.unwrapped_model))
    # 8 micro-batches, one update after micro-batches 4 and 8
    assert results['seed'][0] == results['built-in'][0] == [3, 7]
    # the seed's hand-written accumulation and Accelerate's give the same weights (SGD: mean gradient)
    torch.testing.assert_close(results['seed'][1], results['built-in'][1], rtol=1e-4, atol=1e-7)


class FakeValLoss(Hook):
    """Replaces the validation loss by a scripted sequence (an independent, known signal)."""

    def __init__(self, values):
        self.values = list(values)

    def on_eval_end(self, trainer, metrics):
        metrics['val_loss'] = self.values.pop(0)


def test_adaptive_lr_trainer_reduces_the_learning_rate_after_patience_stalls(capsys):
    class AdaptiveLRTrainer(BaseTrainer):
        def __init__(self, patience=10, factor=0.5, min_lr=1e-7, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.patience = patience
            self.factor = factor
            self.min_lr = min_lr
            self.best_val_loss = float('inf')
            self.patience_counter = 0

        def adjust_learning_rate(self, val_loss):
            if val_loss < self.best_val_loss:
                self.best_val_loss = val_loss
                self.patience_counter = 0
            else:
                self.patience_counter += 1

                if self.patience_counter >= self.patience:
                    current_lr = self.optimizer.param_groups[0]['lr']
                    new_lr = max(current_lr * self.factor, self.min_lr)

                    if new_lr < current_lr:
                        for param_group in self.optimizer.param_groups:
                            param_group['lr'] = new_lr
                        print(f"学习率降低到: {new_lr:.2e}")
                        self.patience_counter = 0

        # mapped: the seed does not say who calls adjust_learning_rate; here, every validation does
        def validate(self, loader, **kwargs):
            metrics = super().validate(loader, **kwargs)
            self.adjust_learning_rate(metrics['val_loss'])
            return metrics

    model, loss_fn = _tiny()
    train, val = stream_loaders(tiny_simulation(), val_samples=4)
    trainer = AdaptiveLRTrainer(2, 0.5, 1e-5, model, loss_fn, {'type': 'Adam', 'lr': 1e-3}, cpu=True,
                                hooks=[FakeValLoss([1.0, 1.0, 1.0, 1.0, 1.0])])
    history = trainer.train(train, val, epochs=5, steps_per_epoch=1)
    # stalls at epochs 1, 2 -> halve (after epoch 2); stalls 3, 4 -> halve again (after epoch 4)
    assert history['lr'] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
    assert capsys.readouterr().out.count('学习率降低到') == 2


def test_distributed_trainer_shards_with_its_sampler_and_reshuffles_each_epoch():
    from decode_accel.data.targets import collate_samples

    class DistributedTrainer(BaseTrainer):
        def __init__(self, local_rank, world_size, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.local_rank = local_rank
            self.world_size = world_size
            # mapped: dist.init_process_group / torch.cuda.set_device / DDP(self.model): Accelerate does these
            # when the script runs under `accelerate launch`

        def create_distributed_dataloader(self, dataset, batch_size, shuffle=True):
            sampler = DistributedSampler(
                dataset,
                num_replicas=self.world_size,
                rank=self.local_rank,
                shuffle=shuffle
            )

            return DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=sampler,
                num_workers=0,  # shrunk: 4
                pin_memory=False,  # shrunk: True
                collate_fn=collate_samples,  # mapped: (none) our samples hold ragged emitter lists
            )

        def train_epoch(self, train_loader):
            # 设置epoch以确保数据shuffle
            train_loader.sampler.set_epoch(self.current_epoch)

            return super().train_epoch(train_loader)

    class SeenSamples(Hook):
        def __init__(self):
            self.rows = []

        def on_batch(self, trainer, batch):
            self.rows += [(trainer.current_epoch, int(i)) for i in batch['sample_index']]
            return batch

    model, loss_fn = _tiny()
    seen = SeenSamples()
    trainer = DistributedTrainer(0, 1, model, loss_fn, {'type': 'Adam', 'lr': 1e-3}, cpu=True, hooks=[seen])
    dataset = ListDataset(tiny_simulation(), 12)
    loader = trainer.create_distributed_dataloader(dataset, batch_size=4)
    history = trainer.train(loader, None, epochs=2)
    assert history['global_step'] == 6 and loader.sampler.epoch == 1
    orders = [[i for e, i in seen.rows if e == epoch] for epoch in (0, 1)]
    everything = sorted(int(s['sample_index']) for s in dataset.samples)
    # each epoch sees the sampler's shard (here all 12 samples) once, in a new order
    assert sorted(orders[0]) == sorted(orders[1]) == everything and orders[0] != orders[1]


def test_curriculum_trainer_switches_stage_learning_rate_and_loss_weights(capsys):
    class CurriculumTrainer(BaseTrainer):
        def __init__(self, curriculum_config, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.curriculum_config = curriculum_config
            self.current_stage = 0

        def get_current_curriculum(self, epoch):
            """根据epoch获取当前课程设置"""
            for stage, config in enumerate(self.curriculum_config):
                if epoch < config['end_epoch']:
                    return stage, config
            return len(self.curriculum_config) - 1, self.curriculum_config[-1]

        def train_epoch(self, train_loader):
            stage, config = self.get_current_curriculum(self.current_epoch)

            if stage != self.current_stage:
                print(f"切换到课程阶段 {stage}: {config['description']}")
                self.current_stage = stage

                # 调整学习率
                if 'learning_rate' in config:
                    for param_group in self.optimizer.param_groups:
                        param_group['lr'] = config['learning_rate']

                # 调整损失权重
                if 'loss_weights' in config:
                    self.loss_fn.update_weights(**config['loss_weights'])

            return super().train_epoch(train_loader)

    stages = [{'end_epoch': 1, 'description': 'sparse', 'learning_rate': 1e-3, 'loss_weights': {'bg_weight': 2.0}},
              {'end_epoch': 3, 'description': 'dense', 'learning_rate': 2e-4, 'loss_weights': {'bg_weight': 0.5}}]
    model, loss_fn = _tiny()
    counter = CountCalls()
    trainer = CurriculumTrainer(stages, model, loss_fn, {'type': 'Adam', 'lr': 1e-3}, cpu=True, hooks=[counter])
    trainer.train(stream_loaders(tiny_simulation())[0], None, epochs=3, steps_per_epoch=1)
    # the seed starts in stage 0 without applying it, and switches once, at epoch 1
    assert counter.lrs == [(0, 1e-3), (1, 2e-4), (2, 2e-4)]
    assert [w['bg_weight'] for w in counter.weights] == [1.0, 0.5, 0.5]
    assert trainer.current_stage == 1
    assert capsys.readouterr().out.count('切换到课程阶段 1: dense') == 1


def test_distillation_trainer_override_adds_the_teacher_term_and_leaves_the_teacher_alone():
    class DistillationTrainer(BaseTrainer):
        def __init__(self, teacher_model, temperature=4.0, alpha=0.7, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher_model = teacher_model.to(self.device)  # mapped: teacher_model
            self.teacher_model.eval()
            self.temperature = temperature
            self.alpha = alpha
            self.kl_loss = nn.KLDivLoss(reduction='batchmean')
            self.parts = []

        def distillation_loss(self, student_outputs, teacher_outputs, targets):
            # 硬目标损失
            hard_loss = self.loss_fn(student_outputs, targets)['loss']  # mapped: self.loss_fn(...)

            # 软目标损失 -- mapped: the class logits become each frame's map of detection logits
            student_soft = F.log_softmax(student_outputs['logits'].flatten(1) / self.temperature, dim=1)
            teacher_soft = F.softmax(teacher_outputs['logits'].flatten(1) / self.temperature, dim=1)
            soft_loss = self.kl_loss(student_soft, teacher_soft) * (self.temperature ** 2)

            # 组合损失
            total_loss = self.alpha * soft_loss + (1 - self.alpha) * hard_loss
            self.parts.append([float(v.detach()) for v in (total_loss, soft_loss, hard_loss)])  # (test only)
            return total_loss

        def train_step(self, batch):
            inputs, targets = batch['frames'], batch  # mapped: inputs, targets = batch

            # 学生模型前向传播
            student_outputs = self.model(inputs)

            # 教师模型前向传播
            with torch.no_grad():
                teacher_outputs = self.teacher_model(inputs)

            # 计算蒸馏损失
            loss = self.distillation_loss(student_outputs, teacher_outputs, targets)

            # 反向传播
            self.backward(loss)  # mapped: loss.backward()

            if self.gradient_clip_val > 0:
                self.clip_gradients()  # mapped: torch.nn.utils.clip_grad_norm_(...)

            self.optimizer.step()
            self.optimizer.zero_grad()

            return loss  # mapped: loss.item()

    teacher, _ = _tiny(seed=7)
    teacher_before = flat_params(teacher).clone()
    teacher_calls = []
    teacher.register_forward_hook(lambda mod, args, out: teacher_calls.append(torch.is_grad_enabled()))
    model, loss_fn = _tiny(seed=0)
    trainer = DistillationTrainer(teacher, 4.0, 0.7, model, loss_fn, {'type': 'Adam', 'lr': 1e-3}, cpu=True,
                                  scheduler_config={'type': 'ExponentialLR', 'gamma': 0.5, 'interval': 'step'})
    history = trainer.train(stream_loaders(tiny_simulation())[0], None, epochs=1, steps_per_epoch=3,
                            gradient_clip_val=1.0)
    assert teacher_calls == [False, False, False]  # one teacher forward per step, without gradients
    assert torch.equal(flat_params(teacher), teacher_before) and not teacher.training
    for total, soft, hard in trainer.parts:  # the teacher term is in the loss that was trained on
        assert soft > 0 and total == pytest.approx(0.7 * soft + 0.3 * hard, rel=1e-5) and total != hard
    # the loop around the override: update counter, lr schedule per update, epoch mean of its returns
    assert history['global_step'] == 3 and trainer.get_lr() == pytest.approx(1e-3 * 0.5 ** 3)
    assert history['train_loss'][0] == pytest.approx(sum(t for t, _, _ in trainer.parts) / 3, rel=1e-5)


# ---------------------------------------------------------------------------------------------- 训练策略
def test_learning_rate_schedule_snippets_build_torch_schedulers_and_the_same_types_work_as_scheduler_config():
    model, loss_fn = _tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_loader = map_loader(ListDataset(tiny_simulation(), 8), batch_size=2, shuffle=True)

    # 1. 余弦退火
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=100, eta_min=1e-6
    )
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    # 2. 一周期学习率
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-2, steps_per_epoch=len(train_loader), epochs=100
    )
    assert scheduler.total_steps == 400
    # 3. 指数衰减
    scheduler = torch.optim.lr_scheduler.ExponentialLR(
        optimizer, gamma=0.95
    )
    # 4. 自适应调整
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode='min', factor=0.5, patience=10, min_lr=1e-7
    )
    # 5. 分段常数
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[30, 60, 90], gamma=0.1
    )
    assert scheduler.milestones == {30: 1, 60: 1, 90: 1}

    # in the trainer: OneCycleLR's epochs x steps_per_epoch (updates) set the cycle, as in torch
    lrs = CountCalls()
    trainer = BaseTrainer(model, loss_fn, {'type': 'AdamW', 'lr': 1e-3},
                          {'type': 'OneCycleLR', 'max_lr': 1e-2, 'steps_per_epoch': 4, 'epochs': 2}, cpu=True,
                          hooks=[lrs])
    trainer.train(train_loader, None, epochs=1)  # 4 of the cycle's 8 updates
    reference = torch.optim.lr_scheduler.OneCycleLR(torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3),
                                                    max_lr=1e-2, steps_per_epoch=4, epochs=2)
    expected = []
    for _ in range(4):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert [lr for _, lr in lrs.lrs] == pytest.approx(expected)
    # ReduceLROnPlateau as scheduler_config installs the plateau hook with the snippet's options
    plateau = BaseTrainer(model, loss_fn, {'type': 'AdamW', 'lr': 1e-3},
                          {'type': 'ReduceLROnPlateau', 'mode': 'min', 'factor': 0.5, 'patience': 10, 'min_lr': 1e-7},
                          cpu=True)
    (hook,) = [h for h in plateau.hooks if type(h).__name__ == 'ReduceLROnPlateauHook']
    assert (hook.mode, hook.factor, hook.patience, hook.min_lr) == ('min', 0.5, 10, 1e-7)


def test_data_augmentation_snippet_composes_the_transforms_and_keeps_the_targets_consistent():
    from decode_accel.data.transforms import (Compose, GaussianNoise, Normalize, RandomBrightness,  # noqa: F401
                                              RandomContrast, RandomFlip, RandomRotation)

    # 训练时数据增强
    train_transforms = Compose([
        RandomRotation(angle_range=(-180, 180)),
        RandomFlip(p=0.5),
        GaussianNoise(noise_std=0.1),
        RandomBrightness(factor_range=(0.8, 1.2)),
        RandomContrast(factor_range=(0.8, 1.2)),
        Normalize(mean=0.5, std=0.5)
    ])

    # 验证时只做标准化
    val_transforms = Compose([
        Normalize(mean=0.5, std=0.5)
    ])

    batch = next(iter(stream_loaders(tiny_simulation(), batch_size=4)[0]))
    out = train_transforms(batch, generator=torch.Generator().manual_seed(0))
    assert out['frames'].shape == batch['frames'].shape and torch.isfinite(out['frames']).all()
    assert not torch.equal(out['frames'], batch['frames'])
    # geometry moves the emitters with the pixels: every target stays inside the frame
    xy = out['tgt_xyz'][..., :2][out['tgt_mask']]
    assert ((xy >= 0) & (xy <= 16)).all() and int(out['tgt_mask'].sum()) == int(batch['tgt_mask'].sum())
    val = val_transforms(batch)
    torch.testing.assert_close(val['frames'], (batch['frames'] - 0.5) / 0.5)


def test_regularization_snippet_dropout_weight_decay_and_the_users_own_stubs():
    from decode_accel.models import SigmaMUNet

    # 1. Dropout
    model = SigmaMUNet(
        in_channels=1,
        out_channels=5,
        dropout=0.1,
        features=8,  # shrunk
    )

    # 2. 权重衰减
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=1e-3,
        weight_decay=1e-4
    )

    # 3. 标签平滑
    class LabelSmoothingLoss(nn.Module):
        def __init__(self, smoothing=0.1):
            super().__init__()
            self.smoothing = smoothing

        def forward(self, pred, target):
            # 实现标签平滑
            pass

    # 4. 梯度惩罚
    def gradient_penalty(model, real_data, fake_data):
        # 实现梯度惩罚
        pass

    dropouts = [m for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]
    assert dropouts and all(m.p == 0.1 for m in dropouts)
    assert optimizer.param_groups[0]['weight_decay'] == 1e-4
    assert LabelSmoothingLoss().smoothing == 0.1 and gradient_penalty(model, None, None) is None
