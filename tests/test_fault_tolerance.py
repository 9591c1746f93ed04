"""Fault tolerance: kills at random moments, pre-emption signals, NaNs, and full or read-only disks.

The subprocess tests run the real recipe command line (``decode-accel train``) with tiny settings and
kill it with SIGKILL, the signal nobody can catch, so they check what is on disk, not what the code
believes it wrote: every complete checkpoint must verify against its sha256 manifest (recomputed here
with hashlib), every resume must work, and the resumed run must end with exactly the parameters of
an uninterrupted run (CPU, one thread, so the arithmetic is bitwise reproducible).
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from decode_accel.errors import DecodeAccelError
from decode_accel.loss import GaussianMMLoss
from decode_accel.training import BaseTrainer, DivergenceGuard, Hook
from decode_accel.training import checkpoint as ckpt_module
from decode_accel.training.preemption import PreemptionHook
from tests.test_trainer_helpers import flat_params, stream_loaders, tiny_sigma_munet, tiny_simulation

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread_and_default_handlers():
    """One thread (bitwise comparisons depend on the thread count) and the default dispositions of an
    interactive Python: SIGINT raises KeyboardInterrupt, SIGTERM ends the process. A CI runner or a shell's
    background job may start the suite with SIGINT ignored; the tests must not depend on that, and a
    failing test must not leave its handlers installed, so the dispositions found are put back after."""
    before = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    for s, h in handlers.items():
        signal.signal(s, h)


# ---------------------------------------------------------------------------------------------- helpers
def verify_manifest(folder: Path) -> None:
    """Independent check of a complete checkpoint: every file listed has its recorded size and sha256."""
    manifest = json.loads((folder / "complete.json").read_text())
    assert manifest["files"], folder
    for name, info in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert len(data) == info["size"], f"{folder}/{name}: size"
        assert hashlib.sha256(data).hexdigest() == info["sha256"], f"{folder}/{name}: sha256"


def complete_checkpoints(save_dir: Path) -> list[Path]:
    """Every ``step-N`` folder (the only names a finished save can have), oldest first."""
    if not save_dir.is_dir():
        return []
    out = [p for p in save_dir.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(out, key=lambda p: int(p.name[5:]))


def make_trainer(hooks=(), seed=0, lr=1e-3):
    torch.manual_seed(seed)
    model = tiny_sigma_munet()
    return BaseTrainer(model, GaussianMMLoss(scaling=model.scaling), {"type": "Adam", "lr": lr}, None,
                       hooks=list(hooks), cpu=True, seed=seed)


class SendSignal(Hook):
    """Sends ``signum`` to this very process at the start of optimizer update ``at_step`` (0-based)."""

    def __init__(self, signum, at_step, times=1):
        self.signum, self.at_step, self.times = signum, at_step, times

    def on_step_start(self, trainer):
        if trainer.global_step == self.at_step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


# ---------------------------------------------------------------------------------------------- signals, in process
def test_sigterm_mid_epoch_saves_the_position_exits_zero_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    sim = tiny_simulation()
    kwargs = dict(epochs=2, steps_per_epoch=5)
    full = make_trainer()
    full.train(stream_loaders(sim)[0], None, save_dir=tmp_path / "full", **kwargs)

    hook = PreemptionHook()
    first = make_trainer(hooks=[SendSignal(signal.SIGTERM, at_step=7), hook])
    with pytest.raises(SystemExit) as exit_info:
        first.train(stream_loaders(sim)[0], None, save_dir=tmp_path / "run", **kwargs)
    assert exit_info.value.code == 0
    # the signal arrived during update 8 (index 7): that update finished, then the checkpoint was written
    assert hook.checkpoint is not None and hook.checkpoint.name == "step-8"
    verify_manifest(hook.checkpoint)
    state = json.loads((hook.checkpoint / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and not state["epoch_complete"] and state["batches_done"] == 3
    assert signal.getsignal(signal.SIGTERM) is not hook._handler  # handlers put back

    torch.manual_seed(999)  # the RNG must come back from the checkpoint
    second = make_trainer()
    second.train(stream_loaders(sim)[0], None, save_dir=tmp_path / "run", resume=True, **kwargs)
    assert second.global_step == 10
    assert torch.equal(flat_params(second.unwrapped_model), flat_params(full.unwrapped_model))


def test_sigint_saves_a_checkpoint_and_exits_with_the_interrupted_code_130(tmp_path):
    sim = tiny_simulation()
    hook = PreemptionHook()
    trainer = make_trainer(hooks=[SendSignal(signal.SIGINT, at_step=2), hook])
    with pytest.raises(SystemExit) as exit_info:
        trainer.train(stream_loaders(sim)[0], None, save_dir=tmp_path, epochs=1, steps_per_epoch=6)
    assert exit_info.value.code == 130 == 128 + signal.SIGINT
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-3"]
    verify_manifest(tmp_path / "step-3")


def test_a_second_sigint_gives_up_the_checkpoint_and_interrupts_at_once(tmp_path):
    sim = tiny_simulation()
    trainer = make_trainer(hooks=[SendSignal(signal.SIGINT, at_step=2, times=2), PreemptionHook()])
    with pytest.raises(KeyboardInterrupt):
        trainer.train(stream_loaders(sim)[0], None, save_dir=tmp_path, epochs=1, steps_per_epoch=6)
    assert complete_checkpoints(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_at_the_last_update_of_an_epoch_finishes_that_epoch_before_exiting(tmp_path):
    sim = tiny_simulation()
    train, val = stream_loaders(sim)
    trainer = make_trainer(hooks=[SendSignal(signal.SIGTERM, at_step=3), PreemptionHook()])
    with pytest.raises(SystemExit) as exit_info:
        trainer.train(train, val, save_dir=tmp_path, epochs=3, steps_per_epoch=4)
    assert exit_info.value.code == 0
    (only,) = complete_checkpoints(tmp_path)
    state = json.loads((only / "trainer_state.json").read_text())
    assert only.name == "step-4" and state["epoch_complete"] and state["epoch"] == 0
    assert len(state["history"]["val_loss"]) == 1  # the epoch's validation ran before the exit


def test_without_exit_process_the_loop_stops_and_returns(tmp_path):
    sim = tiny_simulation()
    hook = PreemptionHook(exit_process=False)
    trainer = make_trainer(hooks=[SendSignal(signal.SIGTERM, at_step=1), hook])
    history = trainer.train(stream_loaders(sim)[0], None, save_dir=tmp_path, epochs=2, steps_per_epoch=5)
    assert history["stopped_early"] and "SIGTERM" in history["stop_reason"]
    assert trainer.global_step == 2 and hook.checkpoint is not None


def test_without_exit_process_the_last_checkpoint_keeps_the_mid_epoch_position(tmp_path):
    sim = tiny_simulation()
    trainer = make_trainer(hooks=[SendSignal(signal.SIGTERM, at_step=1), PreemptionHook(exit_process=False)])
    trainer.train(stream_loaders(sim)[0], None, save_dir=tmp_path, epochs=2, steps_per_epoch=5)
    newest = complete_checkpoints(tmp_path)[-1]
    state = json.loads((newest / "trainer_state.json").read_text())
    assert not state["epoch_complete"] and state["batches_done"] == 2


def test_a_fit_without_signals_puts_the_previous_handlers_back():
    sim = tiny_simulation()
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    make_trainer(hooks=[PreemptionHook()]).train(stream_loaders(sim)[0], None, epochs=1, steps_per_epoch=2)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_forked_data_loader_worker_ignores_the_signal_and_leaves_the_decision_to_the_main_process():
    hook = PreemptionHook()
    hook.install()
    try:
        pid = os.fork()
        if pid == 0:  # the "worker": receives SIGTERM with the inherited handler
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0 if hook.received is None else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert hook.received is None
    finally:
        hook.uninstall()


# ---------------------------------------------------------------------------------------------- NaN
class PoisonWeights(Hook):
    """Writes NaN into the first weight at the start of update ``at_step``."""

    def __init__(self, at_step):
        self.at_step, self.done = at_step, False

    def on_step_start(self, trainer):
        if trainer.global_step == self.at_step and not self.done:
            self.done = True
            with torch.no_grad():
                next(trainer.unwrapped_model.parameters()).view(-1)[0] = float("nan")


class PoisonBatch(Hook):
    def __init__(self, at_batch):
        self.at_batch, self.seen = at_batch, 0

    def on_batch(self, trainer, batch):
        self.seen += 1
        return dict(batch, frames=batch["frames"] * float("nan")) if self.seen == self.at_batch else batch


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_nan_weights_are_rolled_back_to_the_last_checkpoint_and_training_continues(tmp_path):
    from decode_accel.training.monitor import TrainingMonitor

    sim = tiny_simulation()
    guard = DivergenceGuard(action="rollback", max_events=3)
    trainer = make_trainer(hooks=[PoisonWeights(at_step=6), guard], lr=1e-3)
    with TrainingMonitor(tmp_path / "logs", use_tensorboard=False) as monitor:
        history = trainer.train(stream_loaders(sim)[0], None, save_dir=tmp_path / "ckpt", epochs=3,
                                steps_per_epoch=4, monitor=monitor, log_every=1)
    assert guard.events == 1 and guard.log[0]["action"] == "rollback"
    assert torch.isfinite(flat_params(trainer.unwrapped_model)).all()
    assert not history["stopped_early"] and trainer.global_step == 11  # 12 micro-batches, one update dropped
    assert trainer.get_lr() == pytest.approx(0.5e-3)  # rollback halves the learning rate


def test_a_nan_batch_is_skipped_and_training_continues():
    sim = tiny_simulation()
    guard = DivergenceGuard(action="skip", max_events=3)
    trainer = make_trainer(hooks=[PoisonBatch(at_batch=2), guard])
    trainer.train(stream_loaders(sim)[0], None, epochs=1, steps_per_epoch=5)
    assert guard.events == 1 and trainer.global_step == 4
    assert torch.isfinite(flat_params(trainer.unwrapped_model)).all()


def test_a_divergence_event_is_written_to_the_jsonl_log(tmp_path):
    from decode_accel.training.monitor import TrainingMonitor

    sim = tiny_simulation()
    trainer = make_trainer(hooks=[PoisonBatch(at_batch=2), DivergenceGuard(action="skip", max_events=3)])
    with TrainingMonitor(tmp_path / "logs", use_tensorboard=False) as monitor:
        trainer.train(stream_loaders(sim)[0], None, epochs=1, steps_per_epoch=4, monitor=monitor, log_every=1)
    records = _jsonl(tmp_path / "logs" / "metrics.jsonl")
    text = json.dumps([r for r in records if r.get("kind") not in ("batch", "epoch", "performance")])
    assert "non-finite" in text or "diverg" in text.lower()


# ---------------------------------------------------------------------------------------------- full disk
@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only")])
def test_a_full_or_read_only_disk_during_a_save_gives_a_clear_error_and_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch, code, words):
    sim = tiny_simulation()
    trainer = make_trainer()
    trainer.train(stream_loaders(sim)[0], None, save_dir=tmp_path, epochs=1, steps_per_epoch=3)
    (previous,) = complete_checkpoints(tmp_path)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}

    real = ckpt_module._write_bytes

    def failing(path, data):
        if Path(path).name == "trainer_state.json":  # half-way through the save
            raise OSError(code, os.strerror(code), str(path))
        real(path, data)

    monkeypatch.setattr(ckpt_module, "_write_bytes", failing)
    trainer.global_step += 1  # a new step folder, not an overwrite of the old one
    with pytest.raises(DecodeAccelError) as err:
        trainer.save_checkpoint(metrics={"val_loss": 1.0}, epoch_complete=True)
    message = str(err.value)
    assert "\n" not in message and words in message and str(tmp_path) in message and "save_dir" in message
    assert complete_checkpoints(tmp_path) == [previous]
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    verify_manifest(previous)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no half-written folder left


def _export_and_movie(tmp_path):
    import tifffile

    from decode_accel.hub import export_model

    sim = tiny_simulation()
    torch.manual_seed(0)
    export = export_model(tmp_path / "export", tiny_sigma_munet(), simulation_config=sim)
    movie = tmp_path / "movie.tif"
    tifffile.imwrite(movie, np.random.default_rng(0).integers(100, 200, (6, 16, 16), dtype=np.uint16))
    return export, movie


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_during_predict_gives_one_line_and_keeps_the_previous_table(
        tmp_path, monkeypatch, capsys, code):
    from decode_accel.cli import main

    # predict's own name for decode_accel.io.write_table (the package's `predict` is the function)
    predict_module = importlib.import_module("decode_accel.inference.predict")

    export, movie = _export_and_movie(tmp_path)
    out = tmp_path / "locs.csv"
    out.write_text("previous results\n")

    real = predict_module.write_table

    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(out))

    monkeypatch.setattr(predict_module, "write_table", failing)
    try:
        rc = main(["predict", "--model", str(export), "--input", str(movie), "--out", str(out), "--no-progress",
                   "--threshold", "0.01"])
    finally:
        monkeypatch.setattr(predict_module, "write_table", real)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err and str(out) in err
    assert out.read_text() == "previous results\n"


# ---------------------------------------------------------------------------------------------- SIGKILL, subprocess
DRIVER = textwrap.dedent("""
    # decode-accel train with the pre-emption hook and, optionally, slow checkpoint writes (so that a kill
    # lands inside a save: every file written into a step-N.tmp-PID folder waits FT_SLOW_SAVE seconds)
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    import decode_accel.training.checkpoint as ck
    from decode_accel.training import builders
    from decode_accel.training.preemption import PreemptionHook
    delay = float(os.environ.get("FT_SLOW_SAVE", "0"))
    if delay:
        real_write = ck._write_bytes
        def slow_write(path, data):
            if ".tmp-" in str(path):
                time.sleep(delay)
            real_write(path, data)
        ck._write_bytes = slow_write
    import inspect
    if "PreemptionHook" not in inspect.getsource(builders):  # until the recipes install it themselves
        real_hooks = builders.build_hooks
        def with_preemption(config, **kw):
            return [*real_hooks(config, **kw), PreemptionHook()]
        builders.build_hooks = with_preemption
    from decode_accel.cli import main
    sys.exit(main(["train"] + sys.argv[1:]))
""")


def _train_cmd(tmp_path: Path, out: Path, epochs: int) -> list[str]:
    driver = tmp_path / "driver.py"
    if not driver.exists():
        driver.write_text(DRIVER)
    return [sys.executable, str(driver), "--cpu", "--output_dir", str(out), "model.preset=tiny",
            "simulation.frame.height=16", "simulation.frame.width=16", "data.batch_size=2",
            "data.steps_per_epoch=3", "data.val_samples=2", f"training_strategy.epochs={epochs}",
            "monitoring.use_tensorboard=false", "checkpointing.save_top_k=2"]


def _env(slow: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FT_SLOW_SAVE=str(slow),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def _run_and_kill(cmd, save_dir: Path, *, mode: str, rng: random.Random, slow: float) -> int | None:
    """Start a run and SIGKILL it: ``mode='save'`` while a checkpoint is being written (a .tmp folder
    exists), ``mode='random'`` at a random moment after the run got going. Returns the exit code when the
    run ended before the kill."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(slow), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    kill_at = None
    while proc.poll() is None and time.time() < deadline:
        names = [p.name for p in save_dir.iterdir()] if save_dir.is_dir() else []
        if mode == "save" and any(".tmp-" in n for n in names):
            time.sleep(rng.uniform(0, slow))  # somewhere inside the save
            break
        if mode == "random":
            if kill_at is None and names:
                kill_at = time.time() + rng.uniform(0.0, 2.5)
            if kill_at is not None and time.time() >= kill_at:
                break
        time.sleep(0.01)
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return None


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


def _kill_resume_cycle(tmp_path: Path, modes: list[str], seed: int):
    rng = random.Random(seed)
    epochs, slow = 5, 0.12
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    # the uninterrupted reference runs alongside the first killed run
    reference = subprocess.Popen(_train_cmd(tmp_path, ref_dir, epochs), cwd=REPO, env=_env(0.0),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = 0
    for i, mode in enumerate(modes):
        cmd = _train_cmd(tmp_path, run_dir, epochs) + (["--resume"] if i else [])
        rc = _run_and_kill(cmd, run_dir / "checkpoints", mode=mode, rng=rng, slow=slow)
        assert rc in (None, 0), f"run {i} failed with exit code {rc}"
        killed += rc is None
        for folder in complete_checkpoints(run_dir / "checkpoints"):
            verify_manifest(folder)  # a kill never leaves a complete-looking but corrupt checkpoint
        if rc == 0:
            break
    final = subprocess.run(_train_cmd(tmp_path, run_dir, epochs) + ["--resume"], cwd=REPO, env=_env(0.0),
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-2000:]
    for folder in complete_checkpoints(run_dir / "checkpoints"):
        verify_manifest(folder)
    ref, got = _final_weights(ref_dir), _final_weights(run_dir)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    return killed


def test_sigkill_at_a_random_moment_and_inside_a_checkpoint_save_then_resume_ends_like_an_uninterrupted_run(
        tmp_path):
    killed = _kill_resume_cycle(tmp_path, ["random", "save"], seed=1)
    assert killed == 2


@pytest.mark.slow
def test_ten_sigkills_at_random_moments_each_followed_by_a_resume(tmp_path):
    killed = _kill_resume_cycle(tmp_path, ["save", "random"] * 5, seed=2)
    assert killed >= 8  # a late kill may find the run already finished


def test_sigterm_through_the_training_command_line_saves_a_checkpoint_and_exits_zero(tmp_path, monkeypatch):
    """In process (fast): ``decode-accel train`` with the hook the recipes install, SIGTERM at update 4."""
    from decode_accel.cli import main
    from decode_accel.training import builders

    real_hooks = builders.build_hooks
    monkeypatch.setattr(builders, "build_hooks", lambda config, **kw: [
        *(h for h in real_hooks(config, **kw) if not isinstance(h, PreemptionHook)),
        SendSignal(signal.SIGTERM, at_step=4), PreemptionHook()])
    out = tmp_path / "run"
    argv = _train_cmd(tmp_path, out, epochs=3)[2:]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv])
    assert exit_info.value.code == 0
    names = [p.name for p in complete_checkpoints(out / "checkpoints")]
    assert names == ["step-3", "step-5"]  # the epoch checkpoint, then the pre-emption one at update 5
    state = json.loads((out / "checkpoints" / "step-5" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["batches_done"] == 2 and not state["epoch_complete"]
    verify_manifest(out / "checkpoints" / "step-5")
    assert not (out / "export").exists()


@pytest.mark.slow
def test_sigterm_to_the_training_process_saves_a_checkpoint_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tmp_path, out, epochs=200), cwd=REPO, env=_env(0.0),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    save_dir = out / "checkpoints"
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline and not complete_checkpoints(save_dir):
        time.sleep(0.02)
    seen = complete_checkpoints(save_dir)
    assert seen, "no checkpoint appeared"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "SIGTERM" in stderr + stdout
    newest = complete_checkpoints(save_dir)[-1]
    assert int(newest.name[5:]) > int(seen[-1].name[5:])  # a checkpoint written after the signal
    verify_manifest(newest)
    assert not (out / "export").exists()  # pre-empted, not finished: no export
