"""3-frame windows, targets in pixel units, the label filter and collate padding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from decode_accel.data import MovieWindowDataset, collate_samples, emitters_to_targets, window_indices


def test_edge_windows_replicate_the_neighbouring_frame_index():
    assert window_indices(0, 5) == [0, 0, 1]
    assert window_indices(2, 5) == [1, 2, 3]
    assert window_indices(4, 5) == [3, 4, 4]
    assert window_indices(0, 1) == [0, 0, 0]
    with pytest.raises(IndexError):
        window_indices(5, 5)


def test_an_emitter_at_a_pixel_centre_gets_the_half_integer_pixel_coordinate():
    px = 110.0
    # pixel (row 3, column 7) has its centre at x = 7.5 px = 825 nm, y = 3.5 px = 385 nm
    table = pd.DataFrame({"x": [7.5 * px], "y": [3.5 * px], "z": [-250.0], "photons": [1234.0], "ratio": [0.2]})
    tgt = emitters_to_targets(table, px)
    torch.testing.assert_close(tgt["tgt_xyz"], torch.tensor([[7.5, 3.5, -250.0]]))
    torch.testing.assert_close(tgt["tgt_photons"], torch.tensor([1234.0]))
    assert tgt["tgt_ratio"].item() == 0.5  # single channel: the contract's 0.5, not the table's value
    assert emitters_to_targets(table, px, n_channels=2)["tgt_ratio"].item() == pytest.approx(0.2)


def test_dim_emitters_are_dropped_from_the_targets_only():
    table = pd.DataFrame({"x": [100.0, 200.0, 300.0], "y": [100.0] * 3, "z": [0.0] * 3, "photons": [99.0, 100.0, 5e3]})
    tgt = emitters_to_targets(table, 100.0, photon_min=100.0)
    torch.testing.assert_close(tgt["tgt_photons"], torch.tensor([100.0, 5000.0]))
    assert emitters_to_targets(table, 100.0, photon_min=1e6)["tgt_xyz"].shape == (0, 3)


def test_a_window_stacks_frames_t_minus_1_t_t_plus_1_per_channel_with_the_central_targets():
    n, c, h, w = 4, 2, 6, 8
    # frame t, channel k has the constant value 10 t + k: the window's content identifies its frames
    frames = (10 * torch.arange(n)[:, None, None, None] + torch.arange(c)[None, :, None, None]).float()
    frames = frames.expand(n, c, h, w).clone()
    bg = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    table = pd.DataFrame({"frame": [1, 2, 2, 3], "x": [50.0, 150.0, 250.0, 350.0], "y": [50.0] * 4, "z": [0.0] * 4,
                          "photons": [500.0, 600.0, 700.0, 800.0], "ratio": [0.1, 0.2, 0.3, 0.4]})
    ds = MovieWindowDataset(frames, bg, table, px_size=100.0)
    s = ds[2]
    assert s["frames"].shape == (c, 3, h, w)
    for k in range(c):
        assert [s["frames"][k, i, 0, 0].item() for i in range(3)] == [10 + k, 20 + k, 30 + k]
    torch.testing.assert_close(s["bg"], torch.tensor([5.0, 6.0])[:, None, None].expand(c, h, w))
    torch.testing.assert_close(s["tgt_xyz"][:, 0], torch.tensor([1.5, 2.5]))
    torch.testing.assert_close(s["tgt_ratio"], torch.tensor([0.2, 0.3]))
    assert ds[0]["frames"][0, :, 0, 0].tolist() == [0.0, 0.0, 10.0]  # edge frame replicated
    assert ds[0]["tgt_photons"].numel() == 0


def test_collate_pads_emitter_lists_to_the_batch_maximum_and_masks_the_padding():
    def sample(m):
        return {"frames": torch.zeros(1, 3, 4, 4), "bg": torch.zeros(1, 4, 4), "sample_index": torch.tensor(m),
                "tgt_xyz": torch.arange(3 * m, dtype=torch.float32).view(m, 3) + 1,
                "tgt_photons": torch.full((m,), 100.0 * (m + 1)), "tgt_ratio": torch.full((m,), 0.25)}

    batch = collate_samples([sample(2), sample(0), sample(3)])
    assert batch["tgt_xyz"].shape == (3, 3, 3) and batch["frames"].shape == (3, 1, 3, 4, 4)
    assert batch["tgt_mask"].tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    torch.testing.assert_close(batch["tgt_xyz"][2], torch.arange(9, dtype=torch.float32).view(3, 3) + 1)
    assert batch["tgt_photons"][0].tolist() == [300.0, 300.0, 0.0]
    assert batch["tgt_xyz"][1].abs().sum() == 0
    assert batch["sample_index"].tolist() == [2, 0, 3]
    # a batch without any emitter still has M = 1 (no zero-sized axis), fully masked
    empty = collate_samples([sample(0), sample(0)])
    assert empty["tgt_xyz"].shape == (2, 1, 3) and not empty["tgt_mask"].any()
    assert torch.all(empty["tgt_ratio"] == 0.5)


def test_windows_from_a_simulated_file_match_the_simulator_ground_truth(tmp_path):
    from decode_accel.data import read_hdf5, simulate_to_file
    from decode_accel.simulation.config import CameraConfig, FrameConfig, SimulationConfig

    cfg = SimulationConfig(frame=FrameConfig(height=16, width=16, px_size=100.0), camera=CameraConfig(kind="perfect"))
    path = simulate_to_file(cfg, 6, tmp_path / "s.h5", seed=1)
    movie = read_hdf5(path)
    ds = MovieWindowDataset.from_hdf5(path, photon_min=0.0)
    for t in range(6):
        s = ds[t]
        # perfect camera: photons are the ADU themselves
        np.testing.assert_array_equal(s["frames"][0, 1].numpy(), movie.frames[t, 0].astype(np.float32))
        rows = movie.emitters[movie.emitters["frame"] == t]
        np.testing.assert_allclose(np.sort(s["tgt_xyz"][:, 0].numpy()), np.sort(rows["x"].to_numpy() / 100.0),
                                   rtol=1e-6)


def test_a_simulated_file_applies_its_own_label_filter_by_default(tmp_path):
    from decode_accel.data import read_hdf5, simulate_to_file
    from decode_accel.simulation.config import EmitterConfig, FrameConfig, SimulationConfig

    cfg = SimulationConfig(frame=FrameConfig(height=16, width=16),
                           emitters=EmitterConfig(emitters_per_frame=6.0, label_min_photons=3000.0))
    path = simulate_to_file(cfg, 5, tmp_path / "s.h5", seed=2)
    table = read_hdf5(path).emitters
    ds = MovieWindowDataset.from_hdf5(path)
    counts = [ds[t]["tgt_photons"].numel() for t in range(5)]
    assert counts == [int(((table["frame"] == t) & (table["photons"] >= 3000.0)).sum()) for t in range(5)]
    assert sum(counts) < int((table["frame"] < 5).sum())  # some dim emitter-frames were in the movie
