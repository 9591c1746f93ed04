"""Simulator, emitters, camera and config, checked against photon statistics and closed forms."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from decode_accel.errors import DecodeAccelError
from decode_accel.simulation import (Camera, CameraConfig, ChannelsConfig, EmitterConfig, FrameConfig, SimulationConfig,
                                     Simulator)
from decode_accel.simulation.emitters import sample_blinking


def gen(seed):
    return torch.Generator().manual_seed(seed)


def small_config(**sections):
    base = dict(frame=dict(height=16, width=16, px_size=100.0), emitters=dict(emitters_per_frame=3.0))
    base.update(sections)
    return SimulationConfig.model_validate(base)


# ---------------------------------------------------------------------------- config
def test_config_rejects_negative_photons():
    with pytest.raises(ValidationError, match="photons_mean"):
        EmitterConfig(photons_mean=-5.0)


def test_config_rejects_z_min_above_z_max():
    with pytest.raises(ValidationError, match="z_range"):
        EmitterConfig(z_range=(300.0, -300.0))


def test_config_rejects_both_density_and_emitters_per_frame_but_defaults_to_a_density():
    with pytest.raises(ValidationError, match="not both"):
        EmitterConfig(density=1.0, emitters_per_frame=5.0)
    frame = FrameConfig(height=10, width=10, px_size=100.0)  # 1 µm²
    assert EmitterConfig().mean_visible(frame) == pytest.approx(1.0)
    assert EmitterConfig(emitters_per_frame=5.0).mean_visible(frame) == 5.0


def test_config_rejects_unknown_keys_and_inverted_background():
    with pytest.raises(ValidationError, match="extra"):
        SimulationConfig.model_validate({"frame": {"hieght": 10}})
    with pytest.raises(ValidationError, match="min"):
        SimulationConfig.model_validate({"background": {"uniform": (50.0, 10.0)}})


def test_density_per_um2_converts_with_the_frame_area():
    # 40 x 40 px of 100 nm = 16 µm²
    assert EmitterConfig(density=0.5).mean_visible(FrameConfig(height=40, width=40, px_size=100.0)) == pytest.approx(8.0)


def test_challenge_preset_fills_the_camera_and_explicit_values_win():
    c = CameraConfig(preset="challenge2016")
    assert (c.baseline, c.e_per_adu, c.em_gain, c.read_noise, c.spurious_charge, c.qe) == (100, 45, 300, 74.4, 0.002, 0.9)
    assert CameraConfig(preset="challenge2016", em_gain=100.0).em_gain == 100.0


# ---------------------------------------------------------------------------- emitters
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_mean_visible_emitters_per_frame_equals_the_requested_density(tau):
    cfg = EmitterConfig(emitters_per_frame=10.0, on_time_mean=tau)
    em = sample_blinking(cfg, ChannelsConfig(), 10.0, 4000, 32, 32, gen(0))
    per_frame = torch.bincount(em.frame, minlength=4000).double()
    assert per_frame.mean().item() == pytest.approx(10.0, rel=0.05)


def test_blinking_is_stationary_even_in_three_frame_clips():
    cfg = EmitterConfig(emitters_per_frame=8.0, on_time_mean=3.0)
    em = sample_blinking(cfg, ChannelsConfig(), 8.0, 3 * 3000, 32, 32, gen(1), clip_length=3)
    per_frame = torch.bincount(em.frame, minlength=9000).double().view(3000, 3).mean(0)
    for k in range(3):
        assert per_frame[k].item() == pytest.approx(8.0, rel=0.05)
    # blinks never cross from one clip into the next: an id lives in one clip only
    clips_per_id = {}
    for f, i in zip(em.frame.tolist(), em.id.tolist()):
        clips_per_id.setdefault(i, set()).add(f // 3)
    assert all(len(c) == 1 for c in clips_per_id.values())


def test_on_fraction_photons_sum_to_intensity_times_on_time():
    # with one long blink per molecule the per-frame photons of an id add up to intensity x duration;
    # equivalently no frame gets more than a full frame's photons
    cfg = EmitterConfig(emitters_per_frame=5.0, on_time_mean=4.0, photons_mean=1000.0, photons_sd=0.0)
    em = sample_blinking(cfg, ChannelsConfig(), 5.0, 200, 16, 16, gen(2))
    assert em.photons.max().item() <= 1000.0 + 1e-9
    # mean photons per visible emitter-frame = I * E[on-fraction] = I * tau / (tau + 1)
    assert em.photons.mean().item() == pytest.approx(1000.0 * 4.0 / 5.0, rel=0.05)


def test_ids_and_positions_are_constant_while_a_molecule_blinks():
    cfg = EmitterConfig(emitters_per_frame=5.0, on_time_mean=3.0)
    em = sample_blinking(cfg, ChannelsConfig(), 5.0, 50, 16, 16, gen(3))
    for i in torch.unique(em.id):
        rows = em.xyz[em.id == i]
        assert torch.all(rows == rows[0])
        frames = em.frame[em.id == i]
        assert torch.all(frames.diff() == 1)  # consecutive frames


def test_lognormal_photons_have_the_requested_mean_and_sd():
    from decode_accel.simulation.emitters import draw_intensity

    x = draw_intensity(EmitterConfig(photons_mean=2000.0, photons_sd=800.0, photons_distribution="lognormal"),
                       200000, gen(4), "cpu")
    assert x.min() > 0
    assert x.mean().item() == pytest.approx(2000.0, rel=0.01)
    assert x.std().item() == pytest.approx(800.0, rel=0.03)


# ---------------------------------------------------------------------------- camera
def test_emccd_variance_is_twice_the_mean_in_photon_units_at_high_gain():
    cam = Camera(CameraConfig(kind="emccd", qe=1.0, spurious_charge=0.0, em_gain=300.0, read_noise=1.0, e_per_adu=1.0))
    x = torch.full((400, 400), 40.0)
    p = cam.to_photons(cam.forward(x, gen(5)))
    assert p.mean().item() == pytest.approx(40.0, rel=0.01)
    assert p.var().item() == pytest.approx(80.0, rel=0.03)  # excess noise factor 2


def test_challenge_camera_round_trip_recovers_the_mean_photons():
    cam = Camera(CameraConfig(preset="challenge2016"))
    x = torch.full((300, 300), 130.0)
    adu = cam.forward(x, gen(6))
    assert adu.min() >= 0 and adu.max() <= 65535 and torch.all(adu == adu.floor())
    p = cam.to_photons(adu)
    assert p.mean().item() == pytest.approx(130.0, rel=0.01)
    # variance = 2 x / qe (EM excess noise, Poisson in e-) + read noise, all in photon units
    gain = 300.0 * 0.9
    expected_var = 2 * 130.0 / 0.9 + (74.4 / gain) ** 2 + (45.0 / gain) ** 2 / 12
    assert p.var().item() == pytest.approx(expected_var, rel=0.05)


def test_emccd_dark_pixels_average_to_zero_photons_after_spurious_charge_is_removed():
    cam = Camera(CameraConfig(preset="challenge2016", read_noise=0.0))
    p = cam.to_photons(cam.forward(torch.zeros(500, 500), gen(7)))
    # without the correction the mean would be spur / qe = 0.0022 photons; its standard error is 1.4e-4
    assert p.mean().item() == pytest.approx(0.0, abs=7e-4)
    # with read noise the floor biases the mean by -0.5 ADU = -0.5 * 45 / 300 / 0.9 photons
    cam = Camera(CameraConfig(preset="challenge2016"))
    p = cam.to_photons(cam.forward(torch.zeros(500, 500), gen(7)))
    assert p.mean().item() == pytest.approx(-0.5 * 45 / 300 / 0.9, abs=0.01)


def test_perfect_camera_is_poisson():
    cam = Camera(CameraConfig(kind="perfect"))
    adu = cam.forward(torch.full((300, 300), 12.0), gen(8))
    assert torch.all(adu == adu.round())
    assert adu.mean().item() == pytest.approx(12.0, rel=0.01) and adu.var().item() == pytest.approx(12.0, rel=0.03)


def test_scmos_maps_are_applied_per_pixel_and_inverted(tmp_path):
    H, W = 8, 10
    offset = np.linspace(90, 110, H * W, dtype=np.float32).reshape(H, W)
    gain = np.where(np.arange(W)[None, :] < 5, 2.0, 0.5).astype(np.float32) * np.ones((H, W), np.float32)
    np.save(tmp_path / "offset.npy", offset)
    np.save(tmp_path / "gain.npy", gain)
    cfg = CameraConfig(kind="scmos", qe=1.0, read_noise=1.5, scmos_offset_map=str(tmp_path / "offset.npy"),
                       scmos_e_per_adu_map=str(tmp_path / "gain.npy"))
    cam = Camera(cfg, (H, W))
    x = torch.full((4000, H, W), 50.0)
    adu = cam.forward(x, gen(9))
    # dark level of each pixel is its offset; 50 e- read as 50 / e_per_adu ADU above it; -0.5: floor
    mean_adu = adu.mean(0).numpy()
    np.testing.assert_allclose(mean_adu, offset + 50.0 / gain - 0.5, atol=1.0)  # 4.5 standard errors
    # read noise 1.5 e- adds (1.5 / e_per_adu)² ADU² to the Poisson variance 50 / e_per_adu²
    var_adu = adu.var(0).numpy()
    np.testing.assert_allclose(var_adu, 50.0 / gain ** 2 + (1.5 / gain) ** 2 + 1 / 12, rtol=0.12)
    p = cam.to_photons(adu).mean(0)
    assert torch.allclose(p, torch.full((H, W), 50.0), atol=1.5)


def test_scmos_map_of_the_wrong_size_names_the_field(tmp_path):
    np.save(tmp_path / "off.npy", np.zeros((5, 5), np.float32))
    with pytest.raises(DecodeAccelError, match="scmos_offset_map"):
        Camera(CameraConfig(kind="scmos", scmos_offset_map=str(tmp_path / "off.npy")), (8, 8))


# ---------------------------------------------------------------------------- simulator
def test_sample_returns_the_contract_shapes_and_columns():
    sim = Simulator(small_config())
    m = sim.sample(5, gen(10))
    for t in (m.frames_adu, m.frames_photons, m.bg):
        assert t.shape == (5, 1, 16, 16) and t.dtype == torch.float32
    for col in ("frame", "x", "y", "z", "photons", "id", "ratio", "photons_ch1", "photons_ch2"):
        assert col in m.emitters.columns
    e = m.emitters
    assert e["frame"].between(0, 4).all() and e["x"].between(0, 1600).all() and e["y"].between(0, 1600).all()
    assert (m.labels["photons"] >= sim.config.emitters.label_min_photons).all()


def test_table_positions_are_nm_with_pixel_centres_at_j_plus_half():
    # a single bright emitter, no background, perfect camera: the image centroid (pixel centres at
    # j + 0.5) divided back to nm must be the table position
    cfg = small_config(frame=dict(height=24, width=24, px_size=110.0),
                       emitters=dict(emitters_per_frame=0.5, photons_mean=1e6, photons_sd=0.0, on_time_mean=5.0),
                       background=dict(uniform=(0.0, 0.0)), camera=dict(kind="perfect"))
    m = Simulator(cfg).sample(100, gen(11))
    e = m.emitters
    yy, xx = np.meshgrid(np.arange(24) + 0.5, np.arange(24) + 0.5, indexing="ij")
    checked = 0
    for f, rows in e.groupby("frame"):
        if len(rows) != 1 or rows["photons"].iloc[0] < 1e5:
            continue
        x_px, y_px = rows["x"].iloc[0] / 110.0, rows["y"].iloc[0] / 110.0
        if not (4 < x_px < 20 and 4 < y_px < 20):
            continue
        img = m.frames_photons[f, 0].numpy()
        assert (img * xx).sum() / img.sum() == pytest.approx(x_px, abs=0.02)
        assert (img * yy).sum() / img.sum() == pytest.approx(y_px, abs=0.02)
        checked += 1
    assert checked >= 3


def test_frames_average_to_background_plus_emitter_photons():
    cfg = small_config(emitters=dict(emitters_per_frame=2.0, photons_mean=3000.0, photons_sd=0.0),
                       background=dict(uniform=(20.0, 40.0)), camera=dict(preset="challenge2016"),
                       psf=dict(roi_size=15))
    m = Simulator(cfg).sample(200, gen(12))
    expected = m.bg.sum() + torch.tensor(m.emitters["photons"].sum())
    # photons near the border fall outside the frame: the emitters' share can only shrink a bit
    got = m.frames_photons.double().sum()
    assert 0.93 * expected < got < 1.01 * expected
    assert m.bg.mean().item() == pytest.approx(30.0, rel=0.05)


def test_ratio_split_conserves_photons_and_follows_the_dye():
    cfg = small_config(emitters=dict(emitters_per_frame=4.0, photons_mean=5000.0, photons_sd=500.0),
                       background=dict(uniform=(0.0, 0.0)), camera=dict(kind="perfect"),
                       channels=dict(n_channels=2, dyes=[dict(ratio_mean=0.3, ratio_sd=0.0)]))
    m = Simulator(cfg).sample(30, gen(13))
    e = m.emitters
    np.testing.assert_allclose(e["photons_ch1"] + e["photons_ch2"], e["photons"], rtol=1e-12)
    np.testing.assert_allclose(e["ratio"], 0.3)
    ch = m.frames_photons.double().sum(dim=(0, 2, 3))
    assert (ch[0] / ch.sum()).item() == pytest.approx(0.3, abs=0.005)


def test_dye_table_draws_dyes_by_probability_and_clips_ratios():
    cfg = small_config(emitters=dict(emitters_per_frame=20.0),
                       channels=dict(n_channels=2, dyes=[dict(ratio_mean=0.9, ratio_sd=0.2, probability=3.0),
                                                         dict(ratio_mean=0.2, ratio_sd=0.05, probability=1.0)]))
    e = Simulator(cfg).sample(40, gen(14)).emitters.drop_duplicates("id")
    assert (e["color"] == 0).mean() == pytest.approx(0.75, abs=0.05)
    assert e["ratio"].between(0.0, 1.0).all() and (e["ratio"] == 1.0).any()  # 0.9 + 0.2 sd reaches the clip
    assert e.loc[e["color"] == 1, "ratio"].mean() == pytest.approx(0.2, abs=0.02)


def test_affine_transform_moves_channel_two():
    cfg = small_config(frame=dict(height=24, width=24, px_size=100.0),
                       emitters=dict(emitters_per_frame=1.0, photons_mean=1e5, photons_sd=0.0),
                       background=dict(uniform=(0.0, 0.0)), camera=dict(kind="perfect"),
                       channels=dict(n_channels=2, affine=[[1.0, 0.0, 1.5], [0.0, 1.0, -0.75]]))
    m = Simulator(cfg).sample(20, gen(15))
    yy, xx = np.meshgrid(np.arange(24) + 0.5, np.arange(24) + 0.5, indexing="ij")
    for f, rows in m.emitters.groupby("frame"):
        x, y = rows["x"].iloc[0] / 100, rows["y"].iloc[0] / 100
        if len(rows) == 1 and 5 < x < 17 and 5 < y < 17 and rows["photons"].iloc[0] > 1e4:
            img1, img2 = m.frames_photons[f, 0].numpy(), m.frames_photons[f, 1].numpy()
            shift_x = (img2 * xx).sum() / img2.sum() - (img1 * xx).sum() / img1.sum()
            shift_y = (img2 * yy).sum() / img2.sum() - (img1 * yy).sum() / img1.sum()
            assert shift_x == pytest.approx(1.5, abs=0.05) and shift_y == pytest.approx(-0.75, abs=0.05)
            return
    pytest.fail("no isolated emitter in the sample")


def test_seeded_runs_are_identical_and_different_seeds_differ():
    sim = Simulator(small_config(psf=dict(kind="astigmatic"), background=dict(smooth_amplitude=0.5)))
    a, b, c = sim.sample(4, gen(16)), sim.sample(4, gen(16)), sim.sample(4, gen(17))
    assert torch.equal(a.frames_adu, b.frames_adu) and a.emitters.equals(b.emitters)
    assert not torch.equal(a.frames_adu, c.frames_adu)
    wa, wb = sim.sample_windows(3, gen(18)), sim.sample_windows(3, gen(18))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_smooth_background_varies_in_space_within_its_amplitude():
    cfg = small_config(frame=dict(height=32, width=32), background=dict(uniform=(50.0, 50.0), smooth_amplitude=0.4,
                                                                        smooth_length=6.0))
    bg = Simulator(cfg).sample(3, gen(19)).bg
    assert bg.min() >= 50 * 0.6 - 1e-4 and bg.max() <= 50 * 1.4 + 1e-4
    assert bg[0, 0].std() > 1.0
    assert torch.equal(bg[0], bg[1])  # one pattern for the whole movie (the level is per frame)


def test_sample_windows_gives_the_batch_contract_with_central_frame_targets():
    cfg = small_config(emitters=dict(emitters_per_frame=4.0, photons_mean=4000.0, label_min_photons=50.0))
    sim = Simulator(cfg)
    b = sim.sample_windows(6, gen(20), with_adu=True)
    B, M = b["tgt_mask"].shape
    assert b["frames"].shape == (6, 1, 3, 16, 16) and b["bg"].shape == (6, 1, 16, 16)
    assert b["tgt_xyz"].shape == (6, M, 3) and M >= 1
    assert torch.all(b["tgt_ratio"] == 0.5)
    real = b["tgt_mask"]
    assert torch.all(b["tgt_photons"][real] >= 50.0) and torch.all(b["tgt_photons"][~real] == 0)
    assert torch.all((b["tgt_xyz"][real][:, :2] >= 0) & (b["tgt_xyz"][real][:, :2] < 16))
    torch.testing.assert_close(b["frames"], sim.camera.to_photons(b["frames_adu"]))


def test_sample_windows_mean_targets_per_clip_equals_the_density():
    cfg = small_config(emitters=dict(emitters_per_frame=5.0, on_time_mean=2.0, label_min_photons=0.0))
    b = Simulator(cfg).sample_windows(600, gen(21))
    assert b["tgt_mask"].sum(1).double().mean().item() == pytest.approx(5.0, rel=0.05)


def test_with_overrides_changes_difficulty_and_leaves_the_original():
    sim = Simulator(small_config())
    harder = sim.with_overrides(density=4.0, photons_mean=800.0, background=(100.0, 120.0))
    assert harder.config.emitters.density == 4.0 and harder.config.emitters.emitters_per_frame is None
    assert sim.config.emitters.emitters_per_frame == 3.0
    m = harder.sample(2, gen(22))
    assert m.bg.min() >= 100 and m.bg.max() <= 120
    assert harder.camera is sim.camera and harder.psf is sim.psf


def test_zero_density_gives_background_only_frames_and_an_empty_table():
    cfg = small_config(emitters=dict(emitters_per_frame=0.0), camera=dict(kind="perfect"))
    sim = Simulator(cfg)
    m = sim.sample(3, gen(23))
    assert len(m.emitters) == 0 and list(m.emitters.columns)[:6] == ["frame", "x", "y", "z", "photons", "id"]
    b = sim.sample_windows(2, gen(23))
    assert b["tgt_mask"].shape == (2, 1) and not b["tgt_mask"].any()


def test_generators_derived_from_seed_and_keys_are_reproducible_and_distinct():
    sim = Simulator(small_config(seed=7))
    a = torch.rand(4, generator=sim.generator(3, 0, 1))
    assert torch.equal(a, torch.rand(4, generator=sim.generator(3, 0, 1)))
    assert not torch.equal(a, torch.rand(4, generator=sim.generator(3, 1, 0)))
    assert not torch.equal(a, torch.rand(4, generator=Simulator(small_config(seed=8)).generator(3, 0, 1)))


def test_z_range_beyond_the_spline_calibration_is_rejected(tmp_path):
    from decode_accel.simulation import save_smap_calibration

    path = tmp_path / "c_3dcal.mat"
    save_smap_calibration(path, np.zeros((4, 4, 10, 64), np.float32), x0=2.0, z0=5.0, dz=20.0)  # -100 .. 100 nm
    with pytest.raises(DecodeAccelError, match="emitters.z_range"):
        Simulator(small_config(psf=dict(kind="spline", spline_path=str(path))))
    Simulator(small_config(psf=dict(kind="spline", spline_path=str(path)),
                           emitters=dict(emitters_per_frame=1.0, z_range=(-100.0, 100.0))))


def test_two_channel_windows_carry_the_ratio_and_both_channels():
    cfg = small_config(emitters=dict(emitters_per_frame=3.0, photons_mean=4000.0, label_min_photons=0.0),
                       channels=dict(n_channels=2, dyes=[dict(ratio_mean=0.3)], background=[(5.0, 5.0), (40.0, 40.0)]))
    b = Simulator(cfg).sample_windows(8, gen(24))
    assert b["frames"].shape == (8, 2, 3, 16, 16) and b["bg"].shape == (8, 2, 16, 16)
    assert torch.all(b["bg"][:, 0] == 5.0) and torch.all(b["bg"][:, 1] == 40.0)
    assert torch.allclose(b["tgt_ratio"][b["tgt_mask"]], torch.tensor(0.3))
