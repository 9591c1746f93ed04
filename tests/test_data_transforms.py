"""Augmentations move targets exactly where the image content moves and keep photon bookkeeping consistent."""

from __future__ import annotations

import math

import pytest
import torch

from decode_accel.data import (Compose, GaussianNoise, Normalize, RandomBrightness, RandomContrast, RandomFlip,
                               RandomRotation, collate_samples)
from decode_accel.data.transforms import flip_x, flip_y, rot90


def spot_sample(h, w, x, y, sigma=1.0, photons=1000.0):
    """One emitter at (x, y) px (pixel (i, j) centre at (j + 0.5, i + 0.5)) on a sloped background, in all 3 frames."""
    jj = torch.arange(w, dtype=torch.float64) + 0.5
    ii = torch.arange(h, dtype=torch.float64) + 0.5
    g = torch.exp(-((jj[None, :] - x) ** 2 + (ii[:, None] - y) ** 2) / (2 * sigma ** 2))
    spot = photons * g / g.sum()
    bg = (5.0 + 0.5 * torch.arange(w, dtype=torch.float64)[None, :] + 0.2 * torch.arange(h)[:, None]).expand(h, w)
    frames = (bg + spot).float().expand(1, 3, h, w).clone()
    return {"frames": frames, "bg": bg.float()[None].clone(), "tgt_xyz": torch.tensor([[x, y, 120.0]]),
            "tgt_photons": torch.tensor([photons]), "tgt_ratio": torch.tensor([0.5]), "sample_index": torch.tensor(0)}


def spot_position(sample):
    """Argmax pixel and intensity centroid (px) of the central frame minus the background map."""
    img = (sample["frames"][0, 1] - sample["bg"][0]).double()
    i, j = divmod(int(torch.argmax(img)), img.shape[1])
    h, w = img.shape
    cx = (img * (torch.arange(w) + 0.5)[None, :]).sum() / img.sum()
    cy = (img * (torch.arange(h) + 0.5)[:, None]).sum() / img.sum()
    return (i, j), (float(cx), float(cy))


def assert_target_on_spot(sample):
    (i, j), (cx, cy) = spot_position(sample)
    x, y = sample["tgt_xyz"][0, 0].item(), sample["tgt_xyz"][0, 1].item()
    assert (math.floor(y), math.floor(x)) == (i, j)
    assert (x, y) == pytest.approx((cx, cy), abs=2e-3)
    assert sample["tgt_xyz"][0, 2].item() == 120.0  # z untouched


@pytest.mark.parametrize("op", ["flip_x", "flip_y", "rot1", "rot2", "rot3", "rot-1"])
def test_a_flip_or_quarter_turn_moves_the_target_exactly_where_the_psf_peak_moves(op):
    # spots stay >= 4 sigma from every edge so that the centroid is not biased by truncation
    h, w = (13, 13) if op.startswith("rot") else (12, 17)  # flips also on a non-square frame
    s = spot_sample(h, w, x=6.3, y=4.7)
    assert_target_on_spot(s)  # the fixture itself is consistent
    if op == "flip_x":
        f, b, p = flip_x(s["frames"], s["bg"], s["tgt_xyz"])
    elif op == "flip_y":
        f, b, p = flip_y(s["frames"], s["bg"], s["tgt_xyz"])
    else:
        f, b, p = rot90(s["frames"], s["bg"], s["tgt_xyz"], int(op[3:]))
    out = dict(s, frames=f, bg=b, tgt_xyz=p)
    assert_target_on_spot(out)
    assert not torch.equal(out["frames"], s["frames"])


def test_random_rotation_and_flip_keep_every_sample_of_a_batch_consistent_and_vary_between_samples():
    batch = collate_samples([spot_sample(16, 16, x=4.6 + 0.5 * k, y=10.6) for k in range(8)])
    g = torch.Generator().manual_seed(0)
    out = Compose([RandomRotation((-180, 180)), RandomFlip(p=0.5)])(batch, generator=g)
    positions = set()
    for b in range(8):
        s = {k: v[b] for k, v in out.items()}
        assert_target_on_spot(s)
        positions.add(spot_position(s)[0])
    assert len(positions) > 2  # per-sample random choices, not one for the whole batch


def test_random_rotation_uses_only_the_multiples_of_90_degrees_inside_the_range():
    assert RandomRotation((-180, 180)).angles == [-180, -90, 0, 90, 180]
    assert RandomRotation((-45, 100)).angles == [0, 90]
    with pytest.raises(ValueError, match="multiple of 90"):
        RandomRotation((10, 80))
    # a non-square frame is only turned by 0 or 180 degrees
    s = spot_sample(12, 18, x=5.2, y=4.3)
    for seed in range(6):
        out = RandomRotation((-180, 180))(s, generator=torch.Generator().manual_seed(seed))
        assert out["frames"].shape == s["frames"].shape
        assert_target_on_spot(out)


def test_brightness_scales_frames_background_and_photons_by_the_same_factor():
    s = spot_sample(9, 9, x=4.5, y=4.5)
    out = RandomBrightness((1.5, 1.5))(s)
    torch.testing.assert_close(out["frames"], 1.5 * s["frames"])
    torch.testing.assert_close(out["bg"], 1.5 * s["bg"])
    # the signal above background still sums to the emitter's photons
    signal = (out["frames"][0, 1] - out["bg"][0]).sum()
    assert signal.item() == pytest.approx(out["tgt_photons"].item(), rel=1e-4)


def test_contrast_keeps_the_window_mean_and_scales_the_emitter_signal():
    s = spot_sample(9, 9, x=4.5, y=4.5)
    out = RandomContrast((0.5, 0.5))(s)
    assert out["frames"].mean().item() == pytest.approx(s["frames"].mean().item(), rel=1e-5)
    signal = (out["frames"][0, 1] - out["bg"][0]).sum()
    assert signal.item() == pytest.approx(out["tgt_photons"].item(), rel=1e-4)
    assert out["tgt_photons"].item() == pytest.approx(500.0)


def test_gaussian_noise_has_the_requested_standard_deviation_and_leaves_targets_alone():
    s = spot_sample(64, 64, x=30.0, y=30.0)
    out = GaussianNoise(noise_std=2.0)(s, generator=torch.Generator().manual_seed(1))
    diff = out["frames"] - s["frames"]
    assert diff.std().item() == pytest.approx(2.0, rel=0.03)  # 12288 draws: ~0.6 % standard error
    assert abs(diff.mean().item()) < 0.06
    assert torch.equal(out["tgt_xyz"], s["tgt_xyz"]) and torch.equal(out["tgt_photons"], s["tgt_photons"])


def test_normalize_maps_frames_and_background_alike_and_divides_photons_by_std():
    s = spot_sample(9, 9, x=4.5, y=4.5)
    out = Normalize(mean=0.5, std=0.5)(s)
    torch.testing.assert_close(out["frames"], (s["frames"] - 0.5) / 0.5)
    signal = (out["frames"][0, 1] - out["bg"][0]).sum()
    assert signal.item() == pytest.approx(out["tgt_photons"].item(), rel=1e-4)
