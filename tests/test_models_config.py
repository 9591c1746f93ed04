"""The ``model`` config section and build_model."""

import pytest
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.models import DoubleMUNet, ModelConfig, Scaling, SigmaMUNet, build_model, load_pretrained


def test_a_preset_sets_the_width_and_explicit_fields_override_it():
    model = build_model({"preset": "tiny"})
    assert isinstance(model, SigmaMUNet) and model.features == 8 and model.depth == 2
    model = build_model({"preset": "tiny", "features": 4, "norm": "batch", "activation": "relu"})
    assert model.features == 4 and model.norm == "batch" and model.activation == "relu"


def test_without_preset_the_network_is_decodes():
    assert build_model({}).num_parameters() == SigmaMUNet.from_preset("decode").num_parameters()


def test_a_double_munet_is_built_with_its_scaling_from_a_nested_dict():
    model = build_model({"architecture": "DoubleMUNet", "preset": "tiny", "share_stage1": False,
                         "scaling": {"photons_max": 5000.0, "bg_max": 30.0}})
    assert isinstance(model, DoubleMUNet) and not model.share_stage1
    assert model.scaling == Scaling(photons_max=5000.0, bg_max=30.0)
    out = model(torch.zeros(1, 2, 3, 16, 16))
    assert out["bg"].shape == (1, 2, 16, 16)


def test_the_config_round_trips_through_plain_data():
    config = ModelConfig(preset="cpu_small", z_enabled=False, dropout=0.1, scaling=Scaling(z_max=400.0))
    again = ModelConfig(**config.model_dump())
    assert again == config
    assert build_model(again).num_parameters() == build_model(config).num_parameters()


@pytest.mark.parametrize("config, field", [
    ({"architecture": "DoubleMUNet", "channels": 1}, "channels=2"),
    ({"features": 0}, "features"),
    ({"dropout": 1.0}, "dropout"),
    ({"norm": "layer"}, "norm"),
    ({"preset": "huge"}, "preset"),
    ({"scaling": {"photons_max": -1.0}}, "scaling.photons_max"),
    ({"featurs": 8}, "featurs"),
])
def test_bad_config_raises_one_line_naming_the_field(config, field):
    with pytest.raises(DecodeAccelError, match=field) as info:
        build_model(config)
    assert "\n" not in str(info.value)


def test_unknown_preset_name_raises_a_clear_error():
    with pytest.raises(DecodeAccelError, match="preset"):
        SigmaMUNet.from_preset("gigantic")


def test_load_pretrained_builds_the_saved_architecture(tmp_path):
    torch.manual_seed(0)
    double = DoubleMUNet.from_preset("tiny", scaling=Scaling(bg_max=50.0)).eval()
    double.save_pretrained(tmp_path / "double")
    SigmaMUNet.from_preset("tiny").save_pretrained(tmp_path / "single")
    loaded = load_pretrained(tmp_path / "double").eval()
    assert isinstance(loaded, DoubleMUNet) and loaded.scaling.bg_max == 50.0
    assert isinstance(load_pretrained(tmp_path / "single"), SigmaMUNet)
    frames = torch.rand(1, 2, 3, 16, 16) * 100
    with torch.no_grad():
        assert torch.equal(loaded(frames)["photons"], double(frames)["photons"])


def test_load_pretrained_of_a_folder_without_config_raises_a_clear_error(tmp_path):
    with pytest.raises(DecodeAccelError, match="config.json"):
        load_pretrained(tmp_path)
