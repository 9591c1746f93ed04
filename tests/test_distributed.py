"""Two CPU processes (accelerate.debug_launcher, gloo): DDP equals one process with the same global batch,
the simulated stream is split between the processes (not duplicated), and validation combines both halves.

The two processes are forked by ``debug_launcher`` from a FRESH interpreter (this file run as a script):
forking the pytest process itself, after other tests have started OpenMP thread pools, can deadlock the
children.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 3, 4
VAL_SAMPLES = 3 * BATCH  # 3 validation batches: 2 on rank 0, 1 on rank 1


def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _trainer(hooks=()):
    from decode_accel.inference.postprocess import PostProcessor
    from decode_accel.loss import GaussianMMLoss
    from decode_accel.training import BaseTrainer
    from tests.test_trainer_helpers import tiny_sigma_munet
    torch.manual_seed(0)
    model = tiny_sigma_munet()
    # a low threshold so that the untrained network makes detections and the table metrics are defined
    post = PostProcessor(threshold=0.001, px_size_nm=100.0)
    # plain SGD with clipping: the update is linear in the gradient, so float rounding is not amplified as
    # by Adam's normalisation of near-zero gradients
    return BaseTrainer(model, GaussianMMLoss(scaling=model.scaling), {"type": "SGD", "lr": 0.01}, hooks=hooks,
                       cpu=True, postprocessor=post)


def _dataset():
    from tests.test_trainer_helpers import ListDataset, tiny_simulation
    return ListDataset(tiny_simulation(), 2 * BATCH * STEPS)


def _val_loader():
    from tests.test_trainer_helpers import stream_loaders, tiny_simulation
    return stream_loaders(tiny_simulation(), batch_size=BATCH, val_samples=VAL_SAMPLES)[1]


def _two_process_run(out_dir: str):
    torch.set_num_threads(1)
    from decode_accel.training import Hook
    from tests.test_trainer_helpers import flat_params, map_loader, stream_loaders, tiny_simulation

    class SeenSamples(Hook):
        def __init__(self):
            self.indices = []

        def on_batch(self, trainer, batch):
            self.indices += batch["sample_index"].tolist()
            return batch

    # 1) map-style data through accelerator.prepare: batches are dealt out to the processes
    dealt = SeenSamples()
    trainer = _trainer(hooks=[dealt])
    rank = trainer.accelerator.process_index
    val_metrics = trainer.validate(_val_loader())
    trainer.train(map_loader(_dataset(), batch_size=BATCH, shuffle=False), None, epochs=1, steps_per_epoch=STEPS,
                  gradient_clip_val=1.0)
    # 2) the simulated stream shards itself by rank
    seen = SeenSamples()
    streamer = _trainer(hooks=[seen])
    train, _ = stream_loaders(tiny_simulation(), batch_size=BATCH, rank=rank,
                              world_size=trainer.accelerator.num_processes)
    streamer.train(train, None, epochs=1, steps_per_epoch=STEPS)
    torch.save({"params": flat_params(trainer.unwrapped_model), "val": val_metrics,
                "world": trainer.accelerator.num_processes, "type": str(trainer.accelerator.distributed_type)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    with open(os.path.join(out_dir, f"seen{rank}.json"), "w") as f:
        json.dump({"stream": seen.indices, "map": dealt.indices}, f)


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["world"] == 2 and "MULTI_CPU" in r0["type"]
    assert torch.equal(r0["params"], r1["params"])  # DDP kept the replicas identical

    from tests.test_trainer_helpers import flat_params, map_loader
    torch.set_num_threads(1)
    # validation: each process evaluated part of the set; the combined metrics are the same everywhere
    # and equal a one-process validation of the same (initial) network
    assert r0["val"] == r1["val"]
    reference = _trainer().validate(_val_loader())
    assert set(reference) == set(r0["val"]) and "jaccard" in reference
    assert r0["val"] == pytest.approx(reference, rel=1e-5)

    # one process: the same 2 x BATCH samples per update, as two accumulated micro-batches of BATCH
    start = flat_params(_trainer().unwrapped_model)
    single = _trainer()
    single.train(map_loader(_dataset(), batch_size=BATCH, shuffle=False), None, epochs=1, steps_per_epoch=2 * STEPS,
                 accumulate_grad_batches=2, gradient_clip_val=1.0)
    assert single.global_step == STEPS
    moved = (r0["params"] - start).norm()
    gap = (flat_params(single.unwrapped_model) - r0["params"]).norm()
    assert moved > 0.005  # the comparison is meaningful: training moved the weights (3 clipped steps of 0.01) ...
    assert gap < 1e-3 * moved  # ... and both runs moved them the same way

    seen0 = json.loads((tmp_path / "seen0.json").read_text())
    seen1 = json.loads((tmp_path / "seen1.json").read_text())
    # accelerate deals whole batches in turn: rank 0 gets batches 0, 2, 4, rank 1 gets 1, 3, 5
    assert [i // BATCH for i in seen0["map"][::BATCH]] == [0, 2, 4]
    assert [i // BATCH for i in seen1["map"][::BATCH]] == [1, 3, 5]
    stream0, stream1 = seen0["stream"], seen1["stream"]
    assert len(stream0) == len(stream1) == BATCH * STEPS
    assert not set(stream0) & set(stream1)  # split, not duplicated
    assert sorted(stream0 + stream1) == list(range(2 * BATCH * STEPS))


if __name__ == "__main__":
    from accelerate import debug_launcher
    debug_launcher(_two_process_run, args=(sys.argv[1],), num_processes=2)
