"""The seed README's examples, run as written (with tiny sizes: 16x16 frames, 8-feature networks, few steps)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.test_trainer_helpers import stream_loaders, tiny_simulation


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    from decode_accel.training.builders import dye_table
    trainer = MultiChannelTrainer(
        model=model, loss_fn=loss_fn,
        optimizer_config={'type': 'AdamW', 'lr': 1e-3, 'weight_decay': 1e-4},
        scheduler_config={'type': 'CosineAnnealingLR', 'T_max': 100, 'eta_min': 1e-6},
        device='cuda', mixed_precision=True, cpu=True,
        postprocessor=PostProcessor(px_size_nm=100.0, dye_table=dye_table(sim)))
    training_history = trainer.train(
        train_loader=train_loader, val_loader=val_loader, epochs=2, save_dir=str(tmp_path / 'ckpt'),
        save_every=1, validate_every=1, early_stopping_patience=15, steps_per_epoch=2)

    assert math.isfinite(training_history['best_val_loss'])
    assert training_history['best_epoch'] in (0, 1)
    assert training_history['total_time'] > 0
    last = training_history['val_metrics'][-1]
    # the two-channel loss terms are logged by name, and the table metrics are in [0, 1]
    assert {'val_ratio_loss', 'val_conservation_loss'} <= set(last)
    assert 0.0 <= last.get('jaccard', 0.0) <= 1.0
    assert (tmp_path / 'ckpt').is_dir()


def test_single_channel_training_example():
    from decode_accel.loss import RatioGaussianNLLLoss
    from decode_accel.models import SigmaMUNet
    from decode_accel.training import BaseTrainer

    train_loader, val_loader = stream_loaders(tiny_simulation())
    model = SigmaMUNet(in_channels=1, out_channels=5, uncertainty=True, features=8)
    loss_fn = RatioGaussianNLLLoss(scaling=model.scaling)
    trainer = BaseTrainer(model=model, loss_fn=loss_fn,
                          optimizer_config={'type': 'Adam', 'lr': 2e-3, 'betas': (0.9, 0.999)},
                          scheduler_config={'type': 'StepLR', 'step_size': 30, 'gamma': 0.5}, cpu=True)
    training_config = {'epochs': 2, 'gradient_clip_val': 1.0, 'accumulate_grad_batches': 2, 'log_every': 100,
                       'validate_every': 5, 'steps_per_epoch': 4}
    results = trainer.train(train_loader=train_loader, val_loader=val_loader, **training_config)
    assert results['global_step'] == 4
    assert len(results['val_loss']) == 1  # validate_every 5 -> only the last epoch validates
    assert all(math.isfinite(v) for v in results['train_loss'])


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
    assert trainer.fit_kwargs['epochs'] == 100 and trainer.fit_kwargs['early_stopping_patience'] == 20

    # the same config, shrunk to a few seconds, trains end to end
    small = trainer.config.model_copy(deep=True)  # the config with its two-channel defaults filled in
    small.model.preset, small.model.features = 'tiny', None
    small.simulation = tiny_simulation(n_channels=2)
    small.data.batch_size, small.data.steps_per_epoch, small.data.val_samples = 2, 2, 4
    small.training_strategy.epochs = 2
    small.monitoring.validate_every = 1
    small.checkpointing.save_dir = str(tmp_path / 'ckpt')
    from decode_accel.training import Hook

    class LRs(Hook):
        def __init__(self):
            self.used = []

        def on_step_start(self, trainer):
            self.used.append(trainer.get_lr())

    lrs = LRs()
    trainer = MultiChannelTrainer.from_config(small, hooks=(lrs,))
    train_loader, val_loader = build_loaders(small)
    history = trainer.train(train_loader, val_loader, **trainer.fit_kwargs)
    assert history['global_step'] == 4 and len(history['val_loss']) == 2
    # OneCycleLR spans exactly the run's 4 updates: from max_lr / div_factor up to max_lr and down to
    # max_lr / (div_factor * final_div_factor) at the last update
    assert lrs.used[0] == pytest.approx(1e-2 / 25) and max(lrs.used) <= 1e-2 * (1 + 1e-9)
    assert lrs.used[-1] == pytest.approx(1e-2 / 25 / 1e4, rel=1e-6)
    # the loss-weight schedule moved ratio_weight from its initial value towards 0.8
    assert trainer.loss_fn.weights['ratio_weight'] == pytest.approx(0.5 + (0.8 - 0.5) * 1 / 10)
    assert (tmp_path / 'ckpt' / 'export' / 'model.safetensors').exists()


def test_loss_scheduler_loop_example():
    from decode_accel.loss import UnifiedLoss
    from decode_accel.models import DoubleMUNet
    from decode_accel.training import BaseTrainer, LossScheduler

    train_loader, _ = stream_loaders(tiny_simulation(n_channels=2), batch_size=2)
    model = DoubleMUNet(features=8)
    loss_fn = UnifiedLoss(scaling=model.scaling)
    trainer = BaseTrainer(model, loss_fn, {'type': 'Adam', 'lr': 1e-3}, cpu=True)
    trainer.steps_per_epoch = 1
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
        seen.append((train_loss, loss_fn.weights))
    assert all(math.isfinite(loss) for loss, _ in seen)
    assert seen[2][1]['ratio_weight'] == pytest.approx(0.1 + 0.7 * 20 / 40)
    assert seen[1][1]['conservation_weight'] == pytest.approx(0.2 - 0.19 * math.exp(-0.1))
    assert trainer.epoch == 3  # standalone train_epoch calls count epochs (reshuffling per epoch)


def test_monitor_loop_example(tmp_path, monkeypatch):
    from decode_accel.loss import GaussianMMLoss
    from decode_accel.models import SigmaMUNet
    from decode_accel.training import BaseTrainer, TrainingMonitor

    monkeypatch.setenv('WANDB_MODE', 'offline')
    train_loader, val_loader = stream_loaders(tiny_simulation(), val_samples=4)
    model = SigmaMUNet.from_preset('tiny')
    loss_fn = GaussianMMLoss(scaling=model.scaling)
    trainer = BaseTrainer(model, loss_fn, {'type': 'Adam', 'lr': 1e-3}, cpu=True)
    optimizer, accelerator = trainer.optimizer, trainer.accelerator
    monitor = TrainingMonitor(log_dir=str(tmp_path / 'logs'), use_tensorboard=True, use_wandb=False,
                              wandb_project='decode_v3',
                              wandb_config={'model': 'SigmaMUNet', 'dataset': 'simulated'})
    for epoch in range(2):
        model.train()
        for batch_idx, batch in enumerate(itertools.islice(train_loader, 2)):
            output = model(batch['frames'])
            terms = loss_fn(output, batch)
            accelerator.backward(terms['loss'])
            optimizer.step()
            optimizer.zero_grad()
            monitor.log_batch_metrics(epoch=epoch, batch_idx=batch_idx, metrics={
                'train_loss': terms['loss'].item(), 'train_loc_loss': terms['loc_loss'].item(),
                'learning_rate': optimizer.param_groups[0]['lr']})
        val_metrics = trainer.validate(val_loader)
        monitor.log_epoch_metrics(epoch=epoch, train_metrics={'loss': terms['loss'].item()},
                                  val_metrics=val_metrics, model=model)
    curves = monitor.plot_training_curves()
    preds = monitor.plot_model_predictions(model, val_loader)
    monitor.close()
    assert curves.exists() and preds.exists()
    assert (tmp_path / 'logs' / 'metrics.jsonl').read_text().count('\n') >= 6


def test_checkpoint_manager_loop_with_early_stopping_and_resume(tmp_path):
    from decode_accel.loss import GaussianMMLoss
    from decode_accel.models import SigmaMUNet
    from decode_accel.training import BaseTrainer, CheckpointManager

    train_loader, val_loader = stream_loaders(tiny_simulation(), val_samples=4)
    model = SigmaMUNet.from_preset('tiny')
    # lr 0: the validation loss cannot improve, so early stopping must trigger after `patience` epochs
    trainer = BaseTrainer(model, GaussianMMLoss(scaling=model.scaling), {'type': 'SGD', 'lr': 0.0}, cpu=True)
    trainer.steps_per_epoch = 1
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
