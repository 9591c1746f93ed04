"""create_dataloader / create_multi_channel_dataloader: batch contract, deterministic shuffling, files and simulation."""

from __future__ import annotations

import pytest
import torch

from decode_accel.data import (ArrowWindowDataset, RandomBrightness, create_dataloader, create_multi_channel_dataloader,
                               hdf5_to_arrow, simulate_to_file)
from decode_accel.errors import DecodeAccelError
from decode_accel.simulation.config import ChannelsConfig, EmitterConfig, FrameConfig, SimulationConfig

SIM = SimulationConfig(frame=FrameConfig(height=12, width=12), emitters=EmitterConfig(emitters_per_frame=3.0))
SIM2 = SIM.model_copy(update={"channels": ChannelsConfig(n_channels=2)})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("movies")
    return {1: simulate_to_file(SIM, 10, d / "one.h5", seed=0), 2: simulate_to_file(SIM2, 10, d / "two.h5", seed=0)}


def check_batch_contract(batch, b, c, h=12, w=12):
    m = batch["tgt_xyz"].shape[1]
    assert m >= 1
    expect = {"frames": ((b, c, 3, h, w), torch.float32), "tgt_xyz": ((b, m, 3), torch.float32),
              "tgt_photons": ((b, m), torch.float32), "tgt_ratio": ((b, m), torch.float32),
              "tgt_mask": ((b, m), torch.bool), "bg": ((b, c, h, w), torch.float32),
              "sample_index": ((b,), torch.int64)}
    assert set(batch) == set(expect)
    for key, (shape, dtype) in expect.items():
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, key
    assert torch.all(batch["tgt_photons"][batch["tgt_mask"]] > 0)


def order(loader):
    return torch.cat([b["sample_index"] for b in loader]).tolist()


def test_a_file_loader_yields_batches_of_the_contract_and_visits_every_window_once_per_epoch(files):
    loader = create_dataloader(files[1], {"batch_size": 4, "shuffle": True, "drop_last": False}, mode="train")
    batches = list(loader)
    check_batch_contract(batches[0], 4, 1)
    assert sorted(order(loader)) == list(range(10))


def test_shuffling_is_deterministic_for_a_seed_and_differs_between_seeds(files):
    def loader(seed):
        return create_dataloader(files[1], {"batch_size": 2, "seed": seed}, mode="train")

    assert order(loader(3)) == order(loader(3))
    assert order(loader(3)) != order(loader(4))
    assert order(create_dataloader(files[1], {"batch_size": 3}, mode="val")) == list(range(10))  # no shuffle, no drop


def test_the_multi_channel_loader_reads_two_channel_files_and_refuses_single_channel_ones(files):
    batch = next(iter(create_multi_channel_dataloader(files[2], {"batch_size": 2, "shuffle": False}, mode="val")))
    check_batch_contract(batch, 2, 2)
    real = batch["tgt_ratio"][batch["tgt_mask"]]
    assert torch.all((real >= 0) & (real <= 1))
    with pytest.raises(DecodeAccelError, match="1 channel"):
        create_multi_channel_dataloader(files[1], {"batch_size": 2}, mode="val")


def test_an_arrow_copy_of_a_file_gives_the_same_batches(files, tmp_path):
    hdf5_to_arrow(files[2], save_dir=tmp_path / "arrow")
    assert len(ArrowWindowDataset(tmp_path / "arrow")) == 10
    cfg = {"batch_size": 4, "label_photon_min": 50.0}
    for a, b in zip(create_dataloader(files[2], cfg, "val"), create_dataloader(tmp_path / "arrow", cfg, "val")):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], msg=key)


def test_a_simulated_validation_set_is_finite_fixed_and_independent_of_the_training_stream():
    val_a = list(create_dataloader(None, {"batch_size": 4, "val_samples": 8}, "val", simulation_config=SIM))
    val_b = list(create_dataloader(None, {"batch_size": 4, "val_samples": 8}, "val", simulation_config=SIM))
    assert len(val_a) == 2
    check_batch_contract(val_a[0], 4, 1)
    assert all(torch.equal(x["frames"], y["frames"]) for x, y in zip(val_a, val_b))
    train = next(iter(create_dataloader(None, {"batch_size": 4}, "train", simulation_config=SIM)))
    assert not torch.equal(train["frames"], val_a[0]["frames"])


def test_a_simulated_training_loader_shards_by_rank_and_resumes_at_a_sample():
    cfg = {"batch_size": 2}
    r1 = create_dataloader(None, cfg, "train", simulation_config=SIM, rank=1, world_size=2)
    it = iter(r1)
    first, second = next(it), next(it)
    assert first["sample_index"].tolist() == [2, 3] and second["sample_index"].tolist() == [6, 7]
    resumed = next(iter(create_dataloader(None, cfg, "train", simulation_config=SIM, rank=1, world_size=2,
                                          start_index=4)))
    assert torch.equal(resumed["frames"], second["frames"])


def test_the_two_channel_simulated_loader_defaults_to_a_two_channel_simulation():
    batch = next(iter(create_multi_channel_dataloader(None, {"batch_size": 2, "val_samples": 2}, "val")))
    assert batch["frames"].shape[1] == 2
    with pytest.raises(DecodeAccelError, match="n_channels"):
        create_multi_channel_dataloader(None, {"batch_size": 2}, "val", simulation_config=SIM)


def test_transforms_apply_to_training_batches_only(files):
    double = RandomBrightness((2.0, 2.0))
    cfg = {"batch_size": 10, "shuffle": False}
    plain = next(iter(create_dataloader(files[1], cfg, "val", transforms=double)))
    train = next(iter(create_dataloader(files[1], cfg, "train", transforms=double)))
    torch.testing.assert_close(train["frames"], 2 * plain["frames"])
    torch.testing.assert_close(train["tgt_photons"], 2 * plain["tgt_photons"])


def test_bad_loader_arguments_give_one_line_errors(tmp_path):
    with pytest.raises(DecodeAccelError, match="batch_sise"):
        create_dataloader(None, {"batch_sise": 4}, "train")
    with pytest.raises(DecodeAccelError, match="mode"):
        create_dataloader(None, {}, "predict")
    with pytest.raises(DecodeAccelError, match="no such file"):
        create_dataloader(tmp_path / "absent.h5", {}, "train")
