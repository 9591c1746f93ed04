"""CheckpointManager: complete-or-ignored step-N folders, exact round trips, top-k, early stopping, safe failure."""

import errno
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from decode_accel.errors import DecodeAccelError
from decode_accel.training.checkpoint import CheckpointManager, load_checkpoint, restore_checkpoint


def tiny_model(width=4):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.BatchNorm2d(width),
                               torch.nn.ELU(), torch.nn.Conv2d(width, 2, 1))


def trained(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(steps):
        loss = model(torch.randn(2, 1, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return opt, sched


def draw_all():
    return (random.random(), np.random.rand(), torch.rand(3))


def test_round_trip_restores_identical_tensors_optimizer_state_and_random_streams(tmp_path):
    model = tiny_model()
    opt, sched = trained(model)
    manager = CheckpointManager(tmp_path / "ckpt")
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    path = manager.save_checkpoint(4, model, opt, sched, metrics={"val_loss": 0.5}, config={"epochs": 9},
                                   step=40, trainer_state={"samples_seen": 160, "hooks": {"ema": [1, 2]}})
    expected_draws = draw_all()  # what the streams give right after the save
    assert path.name == "step-40"

    fresh = tiny_model(); torch.nn.init.zeros_(fresh[0].weight)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
    random.seed(99); np.random.seed(99); torch.manual_seed(99)
    ckpt = manager.load_last_checkpoint()
    restore_checkpoint(ckpt, fresh, fresh_opt, fresh_sched)

    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    for group_a, group_b in zip(opt.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values()):
        assert all(torch.equal(group_a[n], group_b[n]) for n in ("exp_avg", "exp_avg_sq", "step"))
    assert fresh_sched.get_last_lr() == sched.get_last_lr() == [1e-2 * 0.5 ** 3]
    draws = draw_all()
    assert draws[0] == expected_draws[0] and draws[1] == expected_draws[1]
    assert torch.equal(draws[2], expected_draws[2])
    assert (ckpt["epoch"], ckpt["step"], ckpt["metrics"], ckpt["config"]) == (4, 40, {"val_loss": 0.5}, {"epochs": 9})
    assert ckpt["trainer_state"] == {"samples_seen": 160, "hooks": {"ema": [1, 2]}}


def test_weights_of_a_compiled_or_wrapped_model_are_saved_without_prefixes(tmp_path):
    model = tiny_model()
    compiled = torch.compile(model)  # compiles lazily: cheap until called; its state_dict has _orig_mod. keys
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    manager = CheckpointManager(tmp_path, save_top_k=-1)
    for epoch, wrapped in enumerate([torch.nn.DataParallel(model), compiled, torch.nn.DataParallel(compiled)]):
        path = manager.save_checkpoint(epoch, wrapped, None, metrics={"val_loss": 1.0})
        keys = set(load_file(str(path / "model.safetensors")))
        assert keys == set(model.state_dict())


def test_interrupted_save_and_deleted_manifest_are_ignored(tmp_path):
    model = tiny_model()
    manager = CheckpointManager(tmp_path, save_top_k=-1)
    good = manager.save_checkpoint(0, model, None, metrics={"val_loss": 2.0}, step=10)
    # a crash mid-save leaves a temporary folder; a later one lost its manifest; another has a truncated file
    (tmp_path / "step-30.tmp-999999").mkdir()
    (tmp_path / "step-30.tmp-999999" / "model.safetensors").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="unfinished checkpoint"):
        crashed = manager.save_checkpoint(1, model, None, metrics={"val_loss": 1.0}, step=20)
    (crashed / "complete.json").unlink()
    with pytest.warns(UserWarning, match="complete.json is missing"):
        truncated = manager.save_checkpoint(2, model, None, metrics={"val_loss": 0.5}, step=25)
    (truncated / "model.safetensors").write_bytes(b"xx")

    with pytest.warns(UserWarning) as record:
        assert manager.latest_complete() == good
        ckpt = manager.load_last_checkpoint()
        best = manager.load_best_checkpoint()
    assert ckpt["step"] == 10 and best["step"] == 10
    messages = " ".join(str(w.message) for w in record)
    assert "step-20" in messages and "step-25" in messages and "wrong size" in messages


def test_edited_weights_are_detected_by_the_checksum(tmp_path):
    model = tiny_model()
    path = CheckpointManager(tmp_path).save_checkpoint(0, model, None, metrics={})
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(DecodeAccelError, match="sha256 mismatch"):
        load_checkpoint(path)


def test_top_k_pruning_keeps_the_best_k_and_the_last(tmp_path):
    model = tiny_model()
    manager = CheckpointManager(tmp_path, save_top_k=2, monitor_metric="val_loss", mode="min")
    losses = [5.0, 3.0, 4.0, 1.0, 2.0, 6.0]
    for epoch, loss in enumerate(losses):
        manager.save_checkpoint(epoch, model, None, metrics={"val_loss": loss}, step=100 * (epoch + 1))
    kept = sorted(int(p.name.split("-")[1]) for p in tmp_path.iterdir())
    # best two are epochs 3 (1.0) and 4 (2.0); the last is epoch 5 (6.0)
    assert kept == [400, 500, 600]
    assert manager.load_best_checkpoint()["metrics"]["val_loss"] == 1.0
    assert manager.load_last_checkpoint()["epoch"] == 5


def test_max_mode_ranks_higher_values_first(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=1, mode="max", monitor_metric="jaccard", save_last=False)
    model = tiny_model()
    for epoch, ji in enumerate([0.2, 0.7, 0.5]):
        manager.save_checkpoint(epoch, model, None, metrics={"jaccard": ji})
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]


def test_should_stop_early_after_patience_evaluations_without_improvement(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=1)
    model = tiny_model()
    answers = []
    for epoch, loss in enumerate([3.0, 2.0, 2.5, 2.1, 2.0, 2.2]):
        manager.save_checkpoint(epoch, model, None, metrics={"val_loss": loss})
        answers.append(manager.should_stop_early(patience=3))
    # best 2.0 at epoch 1; epochs 2, 3, 4 do not beat it (equal is no improvement) -> stop after epoch 4
    assert answers == [False, False, False, False, True, True]
    # the history survives a restart: a new manager on the same folder still wants to stop
    assert CheckpointManager(tmp_path, save_top_k=1).should_stop_early(patience=3)


def test_save_every_n_epochs_writes_only_due_or_best_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=1, save_every_n_epochs=3)
    model = tiny_model()
    written = [manager.save_checkpoint(e, model, None, metrics={"val_loss": loss}) is not None
               for e, loss in enumerate([1.0, 2.0, 3.0, 4.0, 0.5, 6.0])]
    # epoch 0: first best; epoch 2 and 5: due ((epoch+1) % 3 == 0); epoch 4: new best
    assert written == [True, False, True, False, True, True]


def test_read_only_folder_raises_a_one_line_error_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    manager = CheckpointManager(tmp_path)
    old = manager.save_checkpoint(0, model, None, metrics={"val_loss": 1.0}, step=1)
    before = {p.name: p.read_bytes() for p in old.iterdir()}

    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if ".tmp-" in self.name:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    with pytest.raises(DecodeAccelError) as info:
        manager.save_checkpoint(1, model, None, metrics={"val_loss": 0.1}, step=2)
    assert "read-only file system" in str(info.value) and "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert manager.latest_complete() == old


def test_disk_full_mid_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    import decode_accel.training.checkpoint as ck
    model = tiny_model()
    manager = CheckpointManager(tmp_path)
    old = manager.save_checkpoint(0, model, None, metrics={"val_loss": 1.0}, step=1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(DecodeAccelError, match="disk full"):
        manager.save_checkpoint(1, model, None, metrics={"val_loss": 0.1}, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]
    assert manager.load_last_checkpoint()["step"] == 1 and old.is_dir()


def test_loading_into_another_architecture_is_a_one_line_error(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save_checkpoint(0, tiny_model(width=4), None, metrics={"val_loss": 1.0})
    with pytest.raises(DecodeAccelError) as info:
        manager.load_last_checkpoint(model=tiny_model(width=8))
    text = str(info.value)
    assert "another architecture" in text and "shape" in text and "\n" not in text


def test_newer_format_version_is_refused(tmp_path):
    path = CheckpointManager(tmp_path).save_checkpoint(0, tiny_model(), None, metrics={})
    manifest = json.loads((path / "complete.json").read_text())
    manifest["format_version"] = 99
    (path / "complete.json").write_text(json.dumps(manifest))
    with pytest.raises(DecodeAccelError, match="newer than this decode_accel"):
        CheckpointManager(tmp_path).load_last_checkpoint()


class Table:  # an arbitrary user object, importable, so only weights_only loading can refuse it
    pass


def test_scheduler_holding_a_python_function_is_refused_instead_of_pickled(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Closure:  # LambdaLR stores the attributes of callable objects in its state
        def __init__(self):
            self.table = Table()

        def __call__(self, step):
            return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, Closure())
    with pytest.raises(DecodeAccelError, match="cannot be stored safely"):
        CheckpointManager(tmp_path).save_checkpoint(0, model, opt, sched, metrics={})
    assert list(tmp_path.iterdir()) == []  # nothing half-written stays behind


def test_no_checkpoint_is_reported_clearly(tmp_path):
    manager = CheckpointManager(tmp_path / "empty")
    assert not manager.has_checkpoint()
    with pytest.raises(DecodeAccelError, match="no complete checkpoint"):
        manager.load_last_checkpoint()


def _two_process_save_and_resume(folder):
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    torch.manual_seed(1000 + rank)  # every process has its own stream
    manager = CheckpointManager(folder)
    path = manager.save_checkpoint(0, model, opt, metrics={"val_loss": 1.0}, step=7, accelerator=acc)
    after_save = torch.rand(4)
    torch.manual_seed(0)
    ckpt = manager.load_last_checkpoint(rank=rank)
    restore_checkpoint(ckpt, model, opt, accelerator=acc)
    torch.save({"path": str(path), "equal": bool(torch.equal(torch.rand(4), after_save)),
                "draw": after_save}, Path(folder) / f"result{rank}.pt")


def test_two_processes_write_one_checkpoint_with_an_rng_file_per_rank(tmp_path):
    # a fresh interpreter: forking ranks from a pytest process whose OpenMP threads already ran can hang
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [torch.load(tmp_path / f"result{r}.pt") for r in (0, 1)]
    assert results[0]["path"] == results[1]["path"] == str(tmp_path / "step-7")
    assert all(r["equal"] for r in results)  # each rank resumed its own stream
    assert not torch.equal(results[0]["draw"], results[1]["draw"])
    files = sorted(p.name for p in (tmp_path / "step-7").iterdir())
    assert files == ["complete.json", "metrics.json", "model.safetensors", "optimizer.pt", "rng_rank0.pt",
                     "rng_rank1.pt", "trainer_state.json"]
    keys = set(load_file(str(tmp_path / "step-7" / "model.safetensors")))
    assert keys == set(tiny_model().state_dict())  # no DDP "module." prefix


if __name__ == "__main__":
    import sys

    from accelerate import debug_launcher
    debug_launcher(_two_process_save_and_resume, args=(sys.argv[1],), num_processes=2)
