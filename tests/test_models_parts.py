"""Scaling rules and the U-Net building block."""

import math

import pytest
import torch
from pydantic import ValidationError

from decode_accel.errors import DecodeAccelError
from decode_accel.models import Scaling, UNet2d
from decode_accel.models.unet import group_count


def test_auto_scaling_reproduces_decodes_reference_values():
    # DECODE's reference simulation: 10 000 +- 3 000 photons, z in +-750 nm, uniform bg 20..200 photons/px
    s = Scaling.auto(photons_mean=10_000, photons_sd=3_000, z_extent_nm=(-750, 750), bg_max=(20, 200))
    assert s.input_scale == pytest.approx(200.0)      # mean / 50
    assert s.input_offset == pytest.approx(110.0)     # mean background = midpoint of the range
    assert s.photons_max == pytest.approx(34_000.0)   # mean + 8 sd
    assert s.z_max == pytest.approx(900.0)            # 1.2 x 750
    assert s.bg_max == pytest.approx(240.0)           # 1.2 x 200


def test_auto_scaling_takes_the_largest_absolute_z_and_a_constant_background():
    s = Scaling.auto(2000, 500, z_extent_nm=(-800, 300), bg_max=50)
    assert s.z_max == pytest.approx(960.0)
    assert s.input_offset == pytest.approx(50.0)
    assert s.bg_max == pytest.approx(60.0)


def test_auto_scaling_of_2d_data_keeps_a_one_nanometre_z_range_and_3d_data_its_own():
    # z_extent 0 (2D) would give z_max = 1.2 x 0 = 0 and an undefined z head; the rule keeps 1 nm instead,
    # while any real z range, however small, still follows the 1.2 x max|z| rule
    assert Scaling.auto(1000, 100, z_extent_nm=0, bg_max=10).z_max == 1.0
    assert Scaling.auto(1000, 100, z_extent_nm=(0, 0), bg_max=10).z_max == 1.0
    assert Scaling.auto(1000, 100, z_extent_nm=(-50, 20), bg_max=10).z_max == pytest.approx(60.0)


@pytest.mark.parametrize("kwargs, field", [
    (dict(photons_mean=-5, photons_sd=1, z_extent_nm=0, bg_max=10), "photons_mean"),
    (dict(photons_mean=5, photons_sd=-1, z_extent_nm=0, bg_max=10), "photons_sd"),
    (dict(photons_mean=5, photons_sd=1, z_extent_nm=0, bg_max=(30, 10)), "bg_max"),
    (dict(photons_mean=5, photons_sd=1, z_extent_nm=(1, 2, 3), bg_max=10), "z_extent_nm"),
])
def test_auto_scaling_rejects_impossible_statistics_naming_the_argument(kwargs, field):
    with pytest.raises(DecodeAccelError, match=field):
        Scaling.auto(**kwargs)


@pytest.mark.parametrize("field, value", [("input_scale", 0.0), ("photons_max", -1.0), ("z_max", 0.0),
                                          ("bg_max", -3.0), ("input_offset", -1.0)])
def test_scaling_rejects_impossible_values(field, value):
    with pytest.raises(ValidationError):
        Scaling(**{field: value})


def test_scaling_rejects_unknown_keys():
    with pytest.raises(ValidationError):
        Scaling(photon_max=100.0)


def _conv_params(c_in, c_out, k):
    return c_in * c_out * k * k + c_out


def test_unet_parameter_count_matches_the_layer_by_layer_sum():
    f, c_in, c_out = 6, 3, 5
    expected = (
        _conv_params(c_in, f, 3) + _conv_params(f, f, 3) + _conv_params(f, f, 2)                 # level 0 + down
        + _conv_params(f, 2 * f, 3) + _conv_params(2 * f, 2 * f, 3) + _conv_params(2 * f, 2 * f, 2)
        + _conv_params(2 * f, 4 * f, 3) + _conv_params(4 * f, 4 * f, 3)                          # base
        + _conv_params(4 * f, 2 * f, 1) + _conv_params(4 * f, 2 * f, 3) + _conv_params(2 * f, 2 * f, 3)
        + _conv_params(2 * f, f, 1) + _conv_params(2 * f, f, 3) + _conv_params(f, f, 3)
        + _conv_params(f, c_out, 1)
    )
    unet = UNet2d(c_in, c_out, features=f, depth=2)
    assert sum(p.numel() for p in unet.parameters()) == expected


def test_unet_with_decodes_shape_has_decodes_parameter_count():
    # DECODE's shared U-Net (1 -> 48 channels, 48 features, depth 2) has 1 027 008 parameters
    assert sum(p.numel() for p in UNet2d(1, 48, features=48, depth=2).parameters()) == 1_027_008


@pytest.mark.parametrize("norm", [None, "group", "batch"])
@pytest.mark.parametrize("activation", ["elu", "relu", "gelu"])
def test_unet_keeps_height_and_width(norm, activation):
    unet = UNet2d(2, 3, features=4, depth=3, activation=activation, norm=norm, dropout=0.1)
    assert unet(torch.randn(2, 2, 16, 24)).shape == (2, 3, 16, 24)


def test_unet_output_at_a_pixel_depends_on_distant_pixels_only_within_its_receptive_field():
    # depth 1: two 3x3 convs at full res, a 2x2 stride-2 down, two 3x3 convs at half res (+-2 low-res px
    # = +-4..5 px), so a change 12 px away cannot reach the centre pixel
    torch.manual_seed(0)
    unet = UNet2d(1, 1, features=4, depth=1).eval()
    x = torch.randn(1, 1, 32, 32)
    y = x.clone()
    y[0, 0, 16, 28] += 10.0
    with torch.no_grad():
        a, b = unet(x), unet(y)
    assert a[0, 0, 16, 16] == b[0, 0, 16, 16]
    assert a[0, 0, 16, 27] != b[0, 0, 16, 27]


def test_group_norm_uses_at_most_eight_groups_of_at_least_four_channels():
    for channels in (4, 8, 16, 48, 96, 192, 12):
        groups = group_count(channels)
        assert channels % groups == 0 and groups <= 8 and (channels // groups >= 4 or groups == 1)
    assert group_count(48) == 8 and group_count(8) == 2


def test_unknown_activation_and_norm_raise_a_clear_error():
    with pytest.raises(DecodeAccelError, match="activation"):
        UNet2d(1, 1, features=4, depth=1, activation="tanhh")
    with pytest.raises(DecodeAccelError, match="norm"):
        UNet2d(1, 1, features=4, depth=1, norm="layer")
    with pytest.raises(DecodeAccelError, match="dropout"):
        UNet2d(1, 1, features=4, depth=1, dropout=1.5)


def test_initial_raw_features_are_not_saturated():
    # the matched Kaiming gains keep the feature scale near 1 through a decode-size U-Net
    torch.manual_seed(0)
    from decode_accel.models import SigmaMUNet
    unet = SigmaMUNet(features=16).stage1[0]
    with torch.no_grad():
        out = unet(torch.randn(4, 1, 32, 32))
    assert 0.1 < float(out.std()) < 10 and math.isfinite(float(out.abs().max()))
