"""Post-processing of hand-made output maps: positions in nm, blob merging, splitting, colour."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.evaluation import evaluate
from decode_accel.inference.postprocess import Dye, PostProcessConfig, PostProcessor, color_posterior

H = W = 16


def maps(batch=1, channels=1, two_channel=False):
    out = {k: torch.zeros(batch, H, W) for k in ("p", "dx", "dy", "z", "photons", "photons_sigma", "dx_sigma",
                                                 "dy_sigma", "z_sigma")}
    out["bg"] = torch.zeros(batch, channels, H, W)
    if two_channel:
        for k in ("photons_ch1", "photons_ch2", "ratio", "ratio_sigma"):
            out[k] = torch.zeros(batch, H, W)
    return out


def put(out, b, i, j, p, dx=0.0, dy=0.0, **feats):
    out["p"][b, i, j] = p
    out["dx"][b, i, j] = dx
    out["dy"][b, i, j] = dy
    for k, v in feats.items():
        out[k][b, i, j] = v


def test_an_isolated_emitter_lands_at_its_pixel_centre_plus_offset_in_nm():
    out = maps()
    put(out, 0, 2, 5, 0.97, dx=0.2, dy=-0.1, z=-120.0, photons=1500.0, dx_sigma=0.1, dy_sigma=0.2, z_sigma=30.0,
        photons_sigma=40.0)
    out["bg"][:] = 12.0
    df = PostProcessor(px_size_nm=110.0)(out)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["x"] == pytest.approx((5 + 0.5 + 0.2) * 110, abs=1e-3)  # x along columns, pixel centre at j + 0.5
    assert row["y"] == pytest.approx((2 + 0.5 - 0.1) * 110, abs=1e-3)
    assert row["z"] == pytest.approx(-120.0)
    assert row["photons"] == pytest.approx(1500.0)
    assert row["x_sigma"] == pytest.approx(11.0, abs=1e-4) and row["y_sigma"] == pytest.approx(22.0, abs=1e-4)
    assert row["z_sigma"] == pytest.approx(30.0) and row["photons_sigma"] == pytest.approx(40.0)
    assert row["bg"] == pytest.approx(12.0)
    assert row["prob"] == pytest.approx(0.97)
    assert row["frame"] == 0 and row["id"] == -1


def test_a_blob_over_two_neighbouring_pixels_becomes_one_p_weighted_localization():
    out = maps()
    # One emitter on the border between columns 5 and 6 (x = 6.0 px); both pixels predict it.
    put(out, 0, 4, 5, 0.5, dx=0.45, photons=1000.0)
    put(out, 0, 4, 6, 0.4, dx=-0.5, photons=1200.0)
    df = PostProcessor(threshold=0.7)(out)  # neither pixel alone passes, the blob does
    assert len(df) == 1
    assert df["prob"].iloc[0] == pytest.approx(0.9)
    assert df["x"].iloc[0] == pytest.approx(100 * (0.5 * 5.95 + 0.4 * 6.0) / 0.9, abs=1e-3)
    assert df["photons"].iloc[0] == pytest.approx((0.5 * 1000 + 0.4 * 1200) / 0.9, rel=1e-5)


def test_an_emitter_at_a_pixel_corner_spread_over_four_pixels_is_one_localization():
    out = maps()
    for i, j, dx, dy in [(7, 7, 0.5, 0.5), (7, 8, -0.5, 0.5), (8, 7, 0.5, -0.5), (8, 8, -0.5, -0.5)]:
        put(out, 0, i, j, 0.25, dx=dx, dy=dy, photons=800.0)
    df = PostProcessor(threshold=0.5)(out)
    assert len(df) == 1
    assert df["prob"].iloc[0] == pytest.approx(1.0)  # the diagonal pixel counts too
    assert (df["x"].iloc[0], df["y"].iloc[0]) == (pytest.approx(800.0), pytest.approx(800.0))


def test_two_emitters_in_adjacent_pixels_stay_apart_when_both_are_probable():
    out = maps()
    put(out, 0, 3, 3, 0.95, photons=1000.0)
    put(out, 0, 3, 4, 0.90, photons=3000.0)
    df = PostProcessor()(out)
    assert len(df) == 2
    assert sorted(df["x"]) == [pytest.approx(350.0), pytest.approx(450.0)]
    assert sorted(df["photons"]) == [pytest.approx(1000.0), pytest.approx(3000.0)]


def test_a_probable_neighbour_that_predicts_the_same_emitter_is_merged_not_split():
    out = maps()
    put(out, 0, 3, 3, 0.8, dx=0.45)
    put(out, 0, 3, 4, 0.7, dx=-0.55)  # above the split threshold, but same position x = 3.95 px
    df = PostProcessor()(out)
    assert len(df) == 1
    assert df["x"].iloc[0] == pytest.approx(395.0, abs=1e-3)
    assert df["prob"].iloc[0] == pytest.approx(1.0)


def test_a_dim_neighbour_pointing_elsewhere_does_not_pull_the_position():
    out = maps()
    put(out, 0, 5, 5, 0.9, dx=0.0)
    put(out, 0, 5, 6, 0.2, dx=0.3)  # predicts x = 6.8 px: another (dim) emitter, not this one
    df = PostProcessor(threshold=0.5)(out)
    assert len(df) == 1
    assert df["x"].iloc[0] == pytest.approx(550.0)
    assert df["prob"].iloc[0] == pytest.approx(0.9)


def test_probabilities_below_the_threshold_give_no_localization():
    out = maps()
    put(out, 0, 5, 5, 0.29)
    assert len(PostProcessor(threshold=0.3)(out)) == 0
    assert len(PostProcessor(threshold=0.3)(maps())) == 0  # an empty frame


def test_frames_are_numbered_from_the_offset_and_tiles_are_shifted_by_the_roi_offset():
    out = maps(batch=3)
    put(out, 0, 1, 1, 0.9)
    put(out, 2, 1, 1, 0.9)
    df = PostProcessor(px_size_nm=100.0)(out, frame_offset=40, roi_offset=(10, 20))
    assert list(df["frame"]) == [40, 42]
    assert df["x"].iloc[0] == pytest.approx((20 + 1.5) * 100)
    assert df["y"].iloc[0] == pytest.approx((10 + 1.5) * 100)
    assert PostProcessor(px_size_nm=100.0)(out, px_size=50.0)["x"].iloc[0] == pytest.approx(75.0)


def test_background_of_two_channels_is_summed():
    out = maps(channels=2)
    put(out, 0, 4, 4, 0.9)
    out["bg"][:, 0] = 3.0
    out["bg"][:, 1] = 5.0
    assert PostProcessor()(out)["bg"].iloc[0] == pytest.approx(8.0)


def test_colour_posterior_matches_a_hand_computation():
    dyes = [Dye(name="A", ratio=0.3, ratio_sd=0.05, prob=1.0), Dye(name="B", ratio=0.6, ratio_sd=0.1, prob=3.0)]
    r, rs = 0.42, 0.04
    like = []
    for d in dyes:
        var = rs**2 + d.ratio_sd**2
        like.append(d.prob * math.exp(-((r - d.ratio) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var))
    want = np.array(like) / sum(like)
    got = color_posterior(torch.tensor([r], dtype=torch.float64), torch.tensor([rs], dtype=torch.float64), dyes)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10)

    out = maps(two_channel=True)
    put(out, 0, 6, 6, 0.95, photons=1000.0, photons_ch1=420.0, photons_ch2=580.0, ratio=r, ratio_sigma=rs)
    df = PostProcessor(dye_table=dyes)(out)
    assert df["color"].iloc[0] == int(np.argmax(want))
    assert df["color_prob"].iloc[0] == pytest.approx(want.max(), rel=1e-6)
    assert df["photons_ch1"].iloc[0] == pytest.approx(420.0) and df["ratio_sigma"].iloc[0] == pytest.approx(rs)
    strict = PostProcessor(dye_table=dyes, min_color_prob=0.99)(out)
    assert strict["color"].iloc[0] == -1


def test_ratio_comes_from_the_channel_photons_when_there_is_no_ratio_map():
    out = maps(two_channel=True)
    del out["ratio"], out["ratio_sigma"]
    put(out, 0, 6, 6, 0.95, photons_ch1=200.0, photons_ch2=800.0)
    df = PostProcessor(dye_table=pd.DataFrame({"ratio": [0.2, 0.8], "ratio_sd": [0.05, 0.05]}))(out)
    assert df["ratio"].iloc[0] == pytest.approx(0.2)
    assert df["color"].iloc[0] == 0


def test_impossible_settings_raise_a_user_error():
    with pytest.raises(DecodeAccelError, match="threshold"):
        PostProcessor(threshold=1.5)
    with pytest.raises(DecodeAccelError, match="dye"):
        PostProcessor(dye_table=[{"ratio": 2.0, "ratio_sd": 0.1}])
    with pytest.raises(DecodeAccelError, match="dx"):
        PostProcessor()({"p": torch.zeros(1, 4, 4)})
    with pytest.raises(Exception):
        PostProcessConfig(threshold=0.3, unknown=1)
    with pytest.raises(DecodeAccelError, match="two-channel"):
        out = maps()
        put(out, 0, 1, 1, 0.9)
        PostProcessor(dye_table=[{"ratio": 0.5}])(out)


def test_rendered_blobs_of_random_emitters_are_recovered_exactly():
    # Independent forward model: each emitter spreads p over its pixel and the neighbours its
    # sub-pixel position leans towards; every blob pixel predicts the emitter's true position.
    rng = np.random.default_rng(0)
    rows, out = [], maps(batch=4)
    for b in range(4):
        taken = np.zeros((H, W), bool)
        for _ in range(6):
            i, j = rng.integers(2, H - 2, 2)
            if taken[i - 2:i + 3, j - 2:j + 3].any():
                continue
            taken[i, j] = True
            x, y = j + rng.uniform(0, 1), i + rng.uniform(0, 1)
            sj = 1 if x - j > 0.5 else -1
            si = 1 if y - i > 0.5 else -1
            for (ii, jj), pp in {(i, j): 0.6, (i, j + sj): 0.2, (i + si, j): 0.15}.items():
                put(out, b, ii, jj, pp, dx=x - (jj + 0.5), dy=y - (ii + 0.5), photons=1000.0)
            rows.append((b, x * 100, y * 100, 0.0, 1000.0, len(rows)))
    gt = pd.DataFrame(rows, columns=["frame", "x", "y", "z", "photons", "id"])
    pred = PostProcessor(threshold=0.5)(out)
    m = evaluate(gt, pred)
    assert (m["fp"], m["fn"]) == (0, 0)
    assert m["rmse_lat"] < 1e-3
    assert pred["prob"].to_numpy() == pytest.approx(np.full(len(pred), 0.95), abs=1e-6)


def test_two_probable_non_maximum_pixels_of_one_second_emitter_give_one_localization():
    out = maps()
    put(out, 0, 5, 4, 0.95)  # emitter 1 at its pixel centre (x = 4.5 px)
    put(out, 0, 5, 5, 0.7, dx=0.5)  # emitter 2 at x = 6.0 px, seen by two probable pixels
    put(out, 0, 5, 6, 0.65, dx=-0.5)
    df = PostProcessor()(out)
    assert sorted(df["x"]) == [pytest.approx(450.0), pytest.approx(600.0)]


def test_dye_tables_accept_the_simulation_configs_field_names():
    post = PostProcessor(dye_table=[{"ratio_mean": 0.2, "ratio_sd": 0.05, "probability": 0.5},
                                    {"ratio_mean": 0.8, "ratio_sd": 0.05, "probability": 0.5}])
    assert [d.ratio for d in post.dye_table] == [0.2, 0.8]
