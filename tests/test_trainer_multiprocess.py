"""Two CPU processes: the trainer, not the hooks, agrees on skip and stop decisions.

Rank 1 alone sees a NaN loss, rank 0 alone receives SIGTERM; both processes must drop the same update,
stop at the same update (the first agreement point after the signal) and write one checkpoint there.
Runs in a fresh interpreter (forking after OpenMP has started can hang), like tests/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(out_dir: str):
    torch.set_num_threads(1)
    from decode_accel.loss import GaussianMMLoss
    from decode_accel.training import BaseTrainer, DivergenceGuard, Hook
    from decode_accel.training.preemption import PreemptionHook
    from tests.test_trainer_helpers import flat_params, stream_loaders, tiny_sigma_munet, tiny_simulation

    class NaNOnRank1(Hook):
        def on_loss(self, trainer, losses, outputs, batch):
            if trainer.accelerator.process_index == 1 and trainer.batch_idx == 1:
                return dict(losses, loss=losses["loss"] * float("nan"))
            return losses

    class SigtermOnRank0(Hook):
        def on_step_start(self, trainer):
            if trainer.accelerator.process_index == 0 and trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    torch.manual_seed(0)
    model = tiny_sigma_munet()
    guard = DivergenceGuard(action="skip", max_events=3)
    trainer = BaseTrainer(model, GaussianMMLoss(scaling=model.scaling), {"type": "SGD", "lr": 0.01}, cpu=True,
                          sync_every=2, hooks=[NaNOnRank1(), guard, SigtermOnRank0(), PreemptionHook(exit_process=False)])
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    train, _ = stream_loaders(tiny_simulation(), batch_size=2, rank=rank, world_size=world)
    history = trainer.train(train, None, epochs=1, steps_per_epoch=8, save_dir=os.path.join(out_dir, "ckpt"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world": world, "global_step": trainer.global_step, "reason": history["stop_reason"],
                   "stopped": history["stopped_early"], "events": guard.events,
                   "params": flat_params(trainer.unwrapped_model).tolist()[:50]}, f)


def test_two_processes_drop_the_same_update_and_stop_together_on_a_signal_one_of_them_got(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # the NaN of rank 1 dropped update 2 on both processes: the replicas stayed identical
    assert r0["events"] == r1["events"] == 1 and r0["params"] == r1["params"]
    # SIGTERM reached rank 0 during update 3; the next agreement point (sync_every=2) is update 4
    assert r0["global_step"] == r1["global_step"] == 4 and r0["stopped"] and r1["stopped"]
    assert "SIGTERM" in r0["reason"] and "another process" in r1["reason"]
    steps = sorted(p.name for p in (tmp_path / "ckpt").glob("step-*") if (p / "complete.json").exists())
    assert steps == ["step-4"]
    state = json.loads((tmp_path / "ckpt" / "step-4" / "trainer_state.json").read_text())
    assert not state["epoch_complete"] and state["batches_done"] == 5  # 5 micro-batches, one update dropped


if __name__ == "__main__":
    from accelerate import debug_launcher
    debug_launcher(_run, args=(sys.argv[1],), num_processes=2)
