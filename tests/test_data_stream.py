"""The on-the-fly simulated stream: seeding, sharding across ranks and workers, resume, curriculum."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from decode_accel.data import (BatchCollator, DifficultyStage, DifficultySchedule, SimulatedWindowStream,
                               collate_samples)
from decode_accel.data.stream import apply_overrides
from decode_accel.errors import DecodeAccelError
from decode_accel.simulation.config import EmitterConfig, FrameConfig, SimulationConfig

CFG = SimulationConfig(frame=FrameConfig(height=12, width=12), emitters=EmitterConfig(emitters_per_frame=2.0))


def take(stream, n):
    out = []
    for s in stream:
        out.append(s)
        if len(out) == n:
            break
    return out


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.mark.parametrize("k", [1, 4])
def test_a_seeded_stream_is_identical_across_runs_and_differs_between_seeds(k):
    a = take(SimulatedWindowStream(CFG, base_seed=3, clips_per_call=k), 8)
    b = take(SimulatedWindowStream(CFG, base_seed=3, clips_per_call=k), 8)
    c = take(SimulatedWindowStream(CFG, base_seed=4, clips_per_call=k), 8)
    assert all(same(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x["frames"], y["frames"]) for x, y in zip(a, c))
    assert [int(s["sample_index"]) for s in a] == list(range(8))
    # different samples of one stream differ too (no reused generator state)
    assert not torch.equal(a[0]["frames"], a[1]["frames"])


@pytest.mark.parametrize("k", [1, 2])
def test_ranks_split_the_stream_without_overlap_and_together_give_the_single_process_stream(k):
    single = take(SimulatedWindowStream(CFG, base_seed=1, clips_per_call=k), 12)
    ranks = [take(SimulatedWindowStream(CFG, base_seed=1, rank=r, world_size=3, clips_per_call=k), 4)
             for r in range(3)]
    seen = {int(s["sample_index"]): s for samples in ranks for s in samples}
    assert len(seen) == 12  # disjoint
    assert all(same(seen[i], single[i]) for i in range(12))


def test_dataloader_workers_split_a_rank_without_overlap_and_keep_its_order():
    def batches(workers):
        stream = SimulatedWindowStream(CFG, base_seed=2, rank=1, world_size=2, clips_per_call=2, worker_block_size=4)
        loader = DataLoader(stream, batch_size=4, num_workers=workers, collate_fn=collate_samples)
        out = []
        for b in loader:
            out.append(b)
            if len(out) == 4:
                break
        return out

    plain, workers = batches(0), batches(2)
    indices = torch.cat([b["sample_index"] for b in workers]).tolist()
    assert len(set(indices)) == 16
    # rank 1 of 2 owns the chunks q = 1, 3, 5, ... (samples 2q, 2q + 1)
    assert indices[:6] == [2, 3, 6, 7, 10, 11]
    assert all(same(a, b) for a, b in zip(plain, workers))


@pytest.mark.parametrize("k", [1, 3])
def test_resuming_at_sample_k_reproduces_the_tail_of_an_uninterrupted_stream(k):
    world = 2
    full = take(SimulatedWindowStream(CFG, base_seed=9, rank=1, world_size=world, clips_per_call=k), 4 * k)
    consumed = 2 * k * world  # both ranks consumed 2 chunks
    resumed = take(SimulatedWindowStream(CFG, base_seed=9, rank=1, world_size=world, start_index=consumed,
                                         clips_per_call=k), 2 * k)
    assert all(same(a, b) for a, b in zip(full[2 * k:], resumed))


def test_the_stream_reports_how_many_samples_it_produced_and_where_to_resume():
    stream = SimulatedWindowStream(CFG, base_seed=0, rank=0, world_size=2, clips_per_call=2)
    take(stream, 6)
    assert stream.samples_produced == 6
    state = stream.state_dict()
    assert state["start_index"] == 12
    nxt = take(SimulatedWindowStream(CFG, base_seed=0, rank=0, world_size=2, clips_per_call=2,
                                     start_index=state["start_index"]), 1)[0]
    assert int(nxt["sample_index"]) == 12


def test_a_finite_stream_stops_at_num_samples_and_has_a_length():
    stream = SimulatedWindowStream(CFG, base_seed=0, rank=1, world_size=2, num_samples=10, clips_per_call=2)
    got = [int(s["sample_index"]) for s in stream]
    assert got == [2, 3, 6, 7] and len(stream) == 4


def test_a_resume_point_inside_a_chunk_is_refused():
    with pytest.raises(DecodeAccelError, match="start_index"):
        SimulatedWindowStream(CFG, clips_per_call=4, start_index=6)


def test_a_difficulty_schedule_switches_stage_at_its_start_sample_and_step():
    sched = DifficultySchedule([{"start_step": 2, "overrides": {"bg": (9.0, 9.0)}},
                                DifficultyStage(start_sample=4, overrides={"photons": 10.0})], samples_per_step=8)
    assert sched(3) == {} and sched(4) == {"photons": 10.0} and sched(15) == {"photons": 10.0}
    assert sched(16) == {"bg": (9.0, 9.0)}
    with pytest.raises(ValueError):
        DifficultyStage(overrides={})  # neither start given


def test_overrides_accept_short_names_and_dotted_paths_and_reject_unknown_fields():
    cfg = apply_overrides(CFG, {"density": 2.5, "bg": (1.0, 2.0), "emitters.z_range": (-10.0, 10.0)})
    assert cfg.emitters.density == 2.5 and cfg.emitters.emitters_per_frame is None
    assert cfg.background.uniform == (1.0, 2.0) and cfg.emitters.z_range == (-10.0, 10.0)
    with pytest.raises(DecodeAccelError, match="curriculum.overrides.brightness"):
        apply_overrides(CFG, {"brightness": 3})
    with pytest.raises(DecodeAccelError, match="invalid override"):
        apply_overrides(CFG, {"photons": -5.0})


def test_a_dataloader_worker_process_applies_the_curriculum_stage_of_each_sample():
    # background fixed to 10 photons/px before sample 8 and to 200 from sample 8 on: the expected-background
    # target of every sample tells which stage the worker process used
    sched = DifficultySchedule([DifficultyStage(start_sample=0, overrides={"bg": (10.0, 10.0)}),
                                DifficultyStage(start_sample=8, overrides={"bg": (200.0, 200.0)})])
    stream = SimulatedWindowStream(CFG, base_seed=0, difficulty_schedule=pickle.loads(pickle.dumps(sched)),
                                   clips_per_call=2, worker_block_size=4)
    loader = DataLoader(stream, batch_size=4, num_workers=2, collate_fn=BatchCollator())
    levels = {}
    for i, batch in enumerate(loader):
        for idx, bg in zip(batch["sample_index"].tolist(), batch["bg"]):
            levels[idx] = bg.unique().tolist()
        if i == 3:
            break
    assert all(levels[i] == [10.0] for i in range(8))
    assert all(levels[i] == [200.0] for i in range(8, 16))


def _two_process_stream_check():
    from accelerate import Accelerator

    from decode_accel.data import create_dataloader

    acc = Accelerator(cpu=True)
    # the simulated loader shards itself by rank and is NOT passed to accelerator.prepare
    loader = create_dataloader(None, {"batch_size": 2}, "train", simulation_config=CFG,
                               rank=acc.process_index, world_size=acc.num_processes)
    it = iter(loader)
    mine = torch.cat([next(it)["sample_index"] for _ in range(2)])
    everyone = acc.gather(mine).tolist()
    assert acc.num_processes == 2
    assert sorted(everyone) == list(range(8)), everyone


def test_two_accelerate_processes_draw_disjoint_samples_that_together_cover_the_stream():
    # a fresh interpreter: forking the 2 ranks from a pytest process whose torch thread pool and DataLoader
    # workers have already run can deadlock the children
    code = ("from accelerate import debug_launcher; from tests.test_data_stream import _two_process_stream_check; "
            "debug_launcher(_two_process_stream_check, num_processes=2)")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
