"""Security: loading a checkpoint or a model never runs code, and paths in files cannot leave their folder.

Checkpoints and export folders travel between people (the Hub, shared drives). A pickle can run any
code when it is loaded, so the only safe loaders are safetensors, JSON/YAML (safe_load) and
``torch.load(weights_only=True)``. These tests plant real exploits (a pickle whose ``__reduce__`` would
create a marker file) and check that the marker never appears; a source scan checks that no code path
calls an unsafe loader.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from decode_accel.errors import DecodeAccelError
from tests.test_trainer_helpers import tiny_sigma_munet, tiny_simulation

PACKAGE = Path(__file__).resolve().parents[1] / "decode_accel"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


class Exploit:
    """Unpickling this object would create ``marker`` (the stand-in for any shell command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    from decode_accel.training.checkpoint import CheckpointManager

    torch.manual_seed(0)
    model = tiny_sigma_munet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    return CheckpointManager(tmp_path / "ckpt").save_checkpoint(0, model, opt, scheduler=sched, step=1,
                                                                trainer_state={"epoch": 0})


def reseal(folder: Path) -> None:
    """An attacker rewrites the manifest too, so the sha256 check passes and only the loader stands guard."""
    manifest = json.loads((folder / "complete.json").read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "complete.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("victim", ["optimizer.pt", "scheduler.pt", "rng_rank0.pt"])
def test_a_malicious_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path, checkpoint, victim):
    from decode_accel.training.checkpoint import CheckpointManager, load_checkpoint

    marker = tmp_path / "pwned"
    torch.save({"state": Exploit(marker)}, checkpoint / victim)
    reseal(checkpoint)
    with pytest.raises(DecodeAccelError, match=f"cannot read {victim} safely") as err:
        load_checkpoint(checkpoint)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    # resuming through the manager skips the poisoned folder instead of running it
    with pytest.warns(UserWarning):
        with pytest.raises(DecodeAccelError):
            CheckpointManager(checkpoint.parent).load_last_checkpoint()
    assert not marker.exists()


def test_weights_are_safetensors_not_pickles(checkpoint):
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) > 0
    assert not (checkpoint / "model.pt").exists() and not (checkpoint / "pytorch_model.bin").exists()


def test_saving_state_that_would_need_unpickling_is_refused_at_save_time(tmp_path):
    from decode_accel.training.checkpoint import CheckpointManager

    model = tiny_sigma_munet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    class Custom:
        pass

    opt.param_groups[0]["custom"] = Custom()  # would need arbitrary unpickling to load back
    with pytest.raises(DecodeAccelError, match="cannot be stored safely"):
        CheckpointManager(tmp_path).save_checkpoint(0, model, opt, step=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("step-")]


@pytest.fixture()
def export(tmp_path) -> Path:
    from decode_accel.hub import export_model

    return export_model(tmp_path / "export", tiny_sigma_munet(), simulation_config=tiny_simulation())


@pytest.mark.parametrize("target", ["../secret.bin", "/etc/hostname", "sub/../../secret.bin", "link.bin"])
def test_a_file_path_in_an_export_folder_cannot_point_outside_it(tmp_path, export, target):
    from decode_accel.hub import load_exported

    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    if target == "link.bin":  # a symbolic link inside the folder that leads outside
        os.symlink(tmp_path / "secret.bin", export / "link.bin")
    meta = json.loads((export / "decode_accel.json").read_text())
    meta["simulation"].setdefault("psf", {})["spline_path"] = target
    (export / "decode_accel.json").write_text(json.dumps(meta))
    with pytest.raises(DecodeAccelError, match="outside the export folder") as err:
        load_exported(export)
    assert "simulation.psf.spline_path" in str(err.value)


def test_a_pickled_model_file_in_an_export_folder_is_not_loaded(tmp_path, export):
    from decode_accel.hub import load_exported

    marker = tmp_path / "pwned"
    os.remove(export / "model.safetensors")
    torch.save(Exploit(marker), export / "pytorch_model.bin")
    with pytest.raises(DecodeAccelError, match="model.safetensors"):
        load_exported(export)
    assert not marker.exists()


def test_the_checkpoint_reader_only_opens_the_files_it_knows(tmp_path, checkpoint):
    """A manifest can list extra names (they are size/hash checked), but nothing outside is loaded."""
    from decode_accel.training.checkpoint import load_checkpoint

    outside = tmp_path / "outside.pt"
    torch.save(Exploit(tmp_path / "pwned"), outside)
    manifest = json.loads((checkpoint / "complete.json").read_text())
    data = outside.read_bytes()
    manifest["files"]["../../outside.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "complete.json").write_text(json.dumps(manifest))
    try:
        load_checkpoint(checkpoint)
    except DecodeAccelError:
        pass
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------- source scan
def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted(RECIPES.rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
            bad.append((node.lineno, name))
        elif name.startswith(("pickle.", "cPickle.", "dill.", "cloudpickle.", "marshal.", "shelve.")) and \
                last in ("load", "loads", "Unpickler", "open"):
            bad.append((node.lineno, name))
        elif name == "torch.load" or (last == "load" and name.endswith("torch.load")):
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                bad.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
            bad.append((node.lineno, name))
        elif last == "load" and name.startswith(("np.", "numpy.")):
            ap = _kw(node, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                bad.append((node.lineno, "np.load with allow_pickle"))
        elif _kw(node, "trust_remote_code") is not None:
            val = _kw(node, "trust_remote_code")
            if not (isinstance(val, ast.Constant) and val.value is False):
                bad.append((node.lineno, "trust_remote_code"))
    return bad


def test_the_scanner_catches_the_patterns_it_looks_for():
    planted = ast.parse("eval('1')\nexec('x=1')\nimport pickle\npickle.loads(b'')\ntorch.load('f')\n"
                        "torch.load('f', weights_only=False)\nyaml.load(s)\nnp.load('f', allow_pickle=True)\n"
                        "AutoModel.from_pretrained('x', trust_remote_code=True)\n"
                        "torch.load('f', weights_only=True)\nyaml.safe_load(s)\nmodel.eval()\n")
    assert [line for line, _ in _unsafe_calls(planted)] == [1, 2, 4, 5, 6, 7, 8, 9]


def test_the_package_never_calls_eval_exec_pickle_or_an_unsafe_torch_load():
    findings = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        findings += [f"{path.relative_to(PACKAGE.parent)}:{line}: {what}" for line, what in _unsafe_calls(tree)]
    assert not findings, "\n".join(findings)


def test_the_package_does_not_import_pickle_at_all():
    importers = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve") for n in names):
                importers.append(str(path))
    assert not importers, importers
