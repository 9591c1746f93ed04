"""The GPU data path: the simulator's device comes from the config, and a simulated stream yields whole
batches (no split into samples, no re-padding, no per-sample host sync). Checked on the CPU (issue 15.3)."""

from __future__ import annotations

import torch

from decode_accel.data import create_dataloader
from tests.test_trainer_helpers import tiny_simulation


def batches(whole: bool, n: int = 3, mode: str = "train", **extra):
    loader = create_dataloader(None, {"batch_size": 4, "seed": 5, "whole_batches": whole, "val_samples": 10, **extra},
                               mode, simulation_config=tiny_simulation())
    out = []
    for i, b in enumerate(loader):
        if i == n:
            break
        out.append(b)
    return loader, out


def trimmed(batch):
    m = max(1, int(batch["tgt_mask"].sum(1).max()))
    return {k: (v[:, :m] if k.startswith("tgt_") else v) for k, v in batch.items()}


def test_whole_batches_equal_the_collated_samples():
    loader, whole = batches(True)
    assert loader.dataset.yield_batches and loader.batch_size is None
    _, split = batches(False)
    for a, b in zip(whole, split):
        a, b = trimmed(a), trimmed(b)
        assert sorted(a) == sorted(b)
        for key in b:
            assert a[key].shape == b[key].shape, key
            assert a[key].dtype == b[key].dtype, key
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_finite_stream_ends_with_a_partial_whole_batch():
    _, got = batches(True, n=10, mode="val")
    assert [len(b["sample_index"]) for b in got] == [4, 4, 2]
    assert torch.cat([b["sample_index"] for b in got]).tolist() == list(range(10))


class SyncCounter:
    """Counts the aten ops that make a GPU wait for the host: scalar reads and data-dependent shapes."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.index.Tensor", "aten.masked_select")

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(str(func).startswith(name) for name in counter.SYNCING):
                    counter.n += 1
                return func(*args, **(kwargs or {}))

        self.n, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_whole_batches_need_no_host_sync_per_sample():
    per_batch = {}
    for whole in (True, False):
        loader = create_dataloader(None, {"batch_size": 16, "seed": 5, "whole_batches": whole}, "train",
                                   simulation_config=tiny_simulation())
        it = iter(loader)
        next(it)  # simulators built
        with SyncCounter() as syncs:
            next(it)
        per_batch[whole] = syncs.n
    # the simulator's own syncs per call remain; the split into 16 samples added 3 per sample
    assert per_batch[True] + 3 * 16 <= per_batch[False], per_batch


def test_the_simulator_device_is_set_in_the_config():
    from decode_accel.training.config import DataConfig

    assert DataConfig().sim_device == "auto"
    assert DataConfig(sim_device="cuda:1").resolved_sim_device() == "cuda:1"
    if not torch.cuda.is_available():
        assert DataConfig().resolved_sim_device() == "cpu"
    import pytest
    with pytest.raises(ValueError, match="sim_device"):
        DataConfig(sim_device="tpu")
    with pytest.raises(ValueError, match="num_workers"):
        DataConfig(sim_device="cuda", num_workers=2)


def test_build_loaders_passes_the_simulator_device(monkeypatch):
    from decode_accel.training import builders
    from decode_accel.training.config import TrainingConfig

    seen = []
    monkeypatch.setattr(builders, "create_dataloader", lambda path, cfg, mode, **kw: seen.append(cfg) or None)
    config = TrainingConfig.model_validate({"data": {"sim_device": "cuda", "val_samples": 4}})
    builders.build_loaders(config)
    assert [c.get("sim_device") for c in seen] == ["cuda", "cuda"]


def test_training_precision_defaults_to_bf16_on_accelerators_and_fp32_on_the_cpu():
    from decode_accel.training.config import TrainingStrategyConfig

    assert TrainingStrategyConfig().mixed_precision == "auto"
    assert TrainingStrategyConfig(mixed_precision=True).mixed_precision == "bf16"
