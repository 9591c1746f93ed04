"""Export folders: self-contained, round trip to identical outputs, clear errors, Hub push without network."""

import json
import shutil

import numpy as np
import pytest
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.hub import export_model, load_exported, push_to_hub
from decode_accel.models import DoubleMUNet, SigmaMUNet
from decode_accel.simulation.config import SimulationConfig


def sim_config(**channels):
    return SimulationConfig(frame={"height": 16, "width": 16, "px_size": 117.0},
                            camera={"preset": "challenge2016"}, channels=channels or {"n_channels": 1})


def tiny_sigma():
    torch.manual_seed(0)
    return SigmaMUNet(features=4, depth=1)


def frames(c=1):
    return 100 + 20 * torch.rand(2, c, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def test_export_then_load_gives_identical_outputs_and_the_training_physics(tmp_path):
    model = tiny_sigma().eval()
    out = export_model(tmp_path / "export", model, simulation_config=sim_config(),
                       metrics={"jaccard": 0.71, "rmse_lat_nm": 23.4})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "decode_accel.json",
                                                     "model.safetensors"]
    loaded = load_exported(out)
    assert not loaded.model.training and type(loaded.model) is SigmaMUNet
    x = frames()
    with torch.no_grad():
        expected, got = model(x), loaded.model(x)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert loaded.px_size_nm == 117.0 and loaded.n_channels == 1 and loaded.frame_size == (16, 16)
    assert loaded.dye_table is None
    # the camera is the training camera: challenge EMCCD inverse ((adu - 100) * 45 / 300 - 0.002) / 0.9
    adu = torch.tensor([100.0, 400.0, 1000.0])
    expected_photons = ((adu - 100) * 45 / 300 - 0.002) / 0.9
    assert torch.allclose(loaded.camera.to_photons(adu), expected_photons)


def test_nothing_of_training_is_exported_and_the_card_says_how_to_run(tmp_path):
    from decode_accel.training.config import TrainingConfig
    out = export_model(tmp_path / "e", tiny_sigma(), simulation_config=sim_config(),
                       metrics={"jaccard": 0.5}, training_config=TrainingConfig(epochs=3, batch_size=4))
    names = {p.name for p in out.rglob("*")}
    assert not any(n.endswith((".pt", ".pth", ".bin")) or "optimizer" in n for n in names)
    card = (out / "README.md").read_text()
    assert "decode-accel predict --model DIR --input movie.tif --out locs.csv" in card
    assert "| jaccard | 0.5 |" in card and "117 nm" in card and "EM gain 300" in card and "3 epochs" in card
    meta = json.loads((out / "decode_accel.json").read_text())
    assert meta["architecture"] == "SigmaMUNet" and meta["px_size_nm"] == 117.0
    assert meta["frame_size"] == [16, 16] and meta["camera"]["em_gain"] == 300.0


def test_two_channel_export_carries_the_dye_table(tmp_path):
    torch.manual_seed(0)
    model = DoubleMUNet(features=4, depth=1).eval()
    sim = sim_config(n_channels=2, dyes=[{"ratio_mean": 0.3, "ratio_sd": 0.05, "probability": 1.0},
                                         {"ratio_mean": 0.8, "ratio_sd": 0.05, "probability": 2.0}])
    loaded = load_exported(export_model(tmp_path / "two", model, simulation_config=sim))
    assert loaded.n_channels == 2
    assert [(d["ratio"], d["prob"]) for d in loaded.dye_table] == [(0.3, 1.0), (0.8, 2.0)]
    x = frames(2)
    with torch.no_grad():
        assert torch.equal(model(x)["ratio"], loaded.model(x)["ratio"])


def test_channel_mismatch_between_model_and_simulation_is_refused(tmp_path):
    with pytest.raises(DecodeAccelError, match="reads 1 channel"):
        export_model(tmp_path / "x", tiny_sigma(), simulation_config=sim_config(n_channels=2))
    assert not (tmp_path / "x").exists()


def test_missing_file_is_a_one_line_error_naming_folder_and_file(tmp_path):
    out = export_model(tmp_path / "e", tiny_sigma(), simulation_config=sim_config())
    (out / "config.json").unlink()
    with pytest.raises(DecodeAccelError) as info:
        load_exported(out)
    assert str(out) in str(info.value) and "missing config.json" in str(info.value)
    assert "\n" not in str(info.value)


def test_asset_paths_are_copied_in_and_may_not_escape_the_folder(tmp_path):
    offset = tmp_path / "offset.npy"
    np.save(offset, np.full((16, 16), 100.0, dtype=np.float32))
    sim = SimulationConfig(frame={"height": 16, "width": 16}, camera={"kind": "scmos", "scmos_offset_map": str(offset)})
    out = export_model(tmp_path / "e", tiny_sigma(), simulation_config=sim)
    offset.unlink()  # the export must not depend on the original file
    loaded = load_exported(out)
    assert loaded.metadata["camera"]["scmos_offset_map"] == "assets/camera_scmos_offset_map.npy"
    meta = json.loads((out / "decode_accel.json").read_text())
    meta["simulation"]["camera"]["scmos_offset_map"] = "../../etc/passwd"
    (out / "decode_accel.json").write_text(json.dumps(meta))
    with pytest.raises(DecodeAccelError, match="outside the export folder"):
        load_exported(out)


def test_export_replaces_an_earlier_export_but_never_another_folder(tmp_path):
    target = tmp_path / "e"
    export_model(target, tiny_sigma(), simulation_config=sim_config(), metrics={"v": 1})
    export_model(target, tiny_sigma(), simulation_config=sim_config(), metrics={"v": 2})
    assert json.loads((target / "decode_accel.json").read_text())["metrics"] == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temporary folders left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(DecodeAccelError, match="refusing to overwrite"):
        export_model(other, tiny_sigma(), simulation_config=sim_config())
    assert (other / "thesis.tex").read_text() == "precious"


def test_unknown_hub_id_while_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DecodeAccelError, match="cannot download model 'someone/no-such-model'"):
        load_exported("someone/no-such-model")
    with pytest.raises(DecodeAccelError, match="export folder not found"):
        load_exported(tmp_path / "nowhere")


def test_push_creates_the_repo_and_uploads_the_export_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    out = export_model(tmp_path / "e", tiny_sigma(), simulation_config=sim_config())
    calls = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None, **kw):
        calls["create"] = (repo_id, private, exist_ok, repo_type)

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None, **kw):
        calls["upload"] = (repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()))
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert push_to_hub(out, "lab/decode-tiny", private=True, token="hf_fake") == "commit-info"
    assert calls["create"] == ("lab/decode-tiny", True, True, "model")
    assert calls["upload"] == ("lab/decode-tiny", ["README.md", "config.json", "decode_accel.json",
                                                   "model.safetensors"])


def test_push_offline_reports_the_cause_in_one_line(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled
    out = export_model(tmp_path / "e", tiny_sigma(), simulation_config=sim_config())

    def offline(self, *a, **k):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(DecodeAccelError, match="OfflineModeIsEnabled") as info:
        push_to_hub(out, "lab/decode-tiny")
    assert "\n" not in str(info.value)
    shutil.rmtree(out)
    with pytest.raises(DecodeAccelError, match="missing decode_accel.json"):
        push_to_hub(out, "lab/decode-tiny")


def test_push_command_uploads_the_export_folder_through_the_hub_client(tmp_path, monkeypatch):
    """`decode-accel push` creates the repo and uploads exactly the export folder (client monkeypatched)."""
    from huggingface_hub import HfApi

    from decode_accel.cli import main
    from decode_accel.hub import REQUIRED_FILES

    folder = tmp_path / "export"
    folder.mkdir()
    for name in REQUIRED_FILES:
        (folder / name).write_text("{}")
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kw: calls.setdefault("create", kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))
    assert main(["push", "--model", str(folder), "--repo-id", "someone/model", "--private"]) == 0
    assert calls["create"]["repo_id"] == "someone/model" and calls["create"]["private"] is True
    assert calls["upload"]["folder_path"] == str(folder)


def test_push_command_rejects_a_folder_without_weights_in_one_line(tmp_path, capsys):
    from decode_accel.cli import main

    assert main(["push", "--model", str(tmp_path), "--repo-id", "someone/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err
