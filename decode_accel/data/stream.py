"""On-the-fly training data: an endless stream of freshly simulated 3-frame clips.

Seeding and sharding
--------------------
Every sample has a **global index** g = 0, 1, 2, ... over the whole run (all processes together). Samples are
simulated in *chunks* of ``clips_per_call`` consecutive indices (chunk q holds g = q·K .. q·K + K - 1):

* K = 1: sample g is ``Simulator.sample(3, gen)`` with gen seeded by ``SeedSequence([base_seed, stream_id, g])``;
* K > 1: chunk q is one vectorised ``Simulator.sample_windows(K, gen)`` call (about 5x faster on a CPU) with gen
  seeded by ``SeedSequence([base_seed, stream_id, q, K])``; sample g is its clip g mod K.

Nothing else (no global RNG, no worker state) enters a sample, so sample g is the same whoever computes it.
The chunks are split without overlap, counted from the resume point q0 = start_index / K:

* process rank r of world_size W takes chunks q = q0 + r, q0 + r + W, q0 + r + 2W, ... (its n-th local chunk);
* inside a process, DataLoader worker k of K_w takes the local chunks n with (n // b) % K_w == k, where b·K
  samples = ``worker_block_size`` (the loaders set it to the batch size). The DataLoader asks its workers for
  batches in turn, so batches come out in local order n = 0, 1, 2, ... exactly as with no workers.

Hence: the seed of a sample is a function of (base seed, rank, worker, sample index) through g; ranks and
workers never repeat each other's samples; and a run resumed with ``start_index`` = number of samples the whole
run consumed so far (``step · batch_size · world_size``, a multiple of K) continues with exactly the samples an
uninterrupted run would have seen next, with any number of workers.

Why this stream shards by itself
--------------------------------
``accelerator.prepare(DataLoader(iterable))`` would either make rank 0 simulate everything and broadcast it
(``dispatch_batches=True``, the default for iterable datasets) or let every rank run the whole generator and keep
a slice (W times the work). The stream therefore takes ``rank``/``world_size`` itself and **the trainer must not
pass its DataLoader to prepare()**; it moves batches to the device itself.

Why a torch IterableDataset and not ``datasets.IterableDataset.from_generator``
----------------------------------------------------------------------------------
A Hugging Face iterable dataset shards by a *finite* list of shards and reshuffles nothing we need; an infinite
simulator has no natural shards, the resume position would have to be expressed as "shard + offset", and with
typed features + torch format the measured throughput was ~10 samples/s (accelerate_notes.md §3a). The torch
dataset above needs no shards, resumes at any sample, and ran as fast as the bare simulator. Recorded or
pre-simulated files do go through ``datasets`` (:mod:`decode_accel.data.arrow`).

Curriculum
----------
``difficulty_schedule`` maps the global sample index g to simulator overrides (e.g. density, photons,
background). It is evaluated inside whichever worker simulates sample g, so every worker applies the same stage
at the same point of the run without any inter-process communication. See :class:`DifficultySchedule`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import IterableDataset, get_worker_info

from decode_accel.config_base import StrictModel
from decode_accel.data.targets import collate_samples, emitters_to_targets
from decode_accel.errors import DecodeAccelError
from decode_accel.simulation import Simulator

__all__ = [
    "sample_seed", "DifficultyStage", "DifficultySchedule", "apply_overrides", "SimulatedWindowStream",
    "OVERRIDE_ALIASES",
]

#: Short names accepted in curriculum overrides -> dotted SimulationConfig paths.
OVERRIDE_ALIASES: dict[str, str] = {
    "density": "emitters.density",
    "emitters_per_frame": "emitters.emitters_per_frame",
    "photons": "emitters.photons_mean",
    "photons_mean": "emitters.photons_mean",
    "photons_sd": "emitters.photons_sd",
    "bg": "background.uniform",
    "background": "background.uniform",
    "z_range": "emitters.z_range",
    "on_time_mean": "emitters.on_time_mean",
    "channel_background": "channels.background",
}

#: stream ids that keep training, validation and test samples apart for the same base seed
STREAM_IDS = {"train": 0, "val": 1, "test": 2}


def sample_seed(base_seed: int, index: int, stream_id: int = 0, clips_per_call: int = 1) -> int:
    """63-bit seed of sample (K = 1) or chunk (K > 1) ``index`` of stream ``stream_id``, via numpy's SeedSequence."""
    entropy = [int(base_seed), int(stream_id), int(index)] + ([int(clips_per_call)] if clips_per_call > 1 else [])
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class DifficultyStage(StrictModel):
    """One stage of a difficulty schedule: from a sample (or optimizer step) on, apply these simulator overrides."""

    start_sample: int | None = Field(None, ge=0, description="first global sample index of the stage (samples)")
    start_step: int | None = Field(None, ge=0, description="first optimizer step of the stage (steps)")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="simulator overrides: dotted SimulationConfig paths (emitters.density) or the short names "
                    "density (1/µm²), emitters_per_frame, photons (photons), photons_sd, bg (photons/px range)")

    @model_validator(mode="after")
    def _one_start(self) -> "DifficultyStage":
        if (self.start_sample is None) == (self.start_step is None):
            raise ValueError("give exactly one of start_sample or start_step")
        return self


class DifficultySchedule:
    """Piecewise-constant map from the global sample index to simulator overrides (picklable).

    Args:
        stages: :class:`DifficultyStage` objects or dicts with ``start_sample`` or ``start_step`` and ``overrides``.
            Before the first stage starts, no overrides apply; each stage's overrides apply to the base config
            (stages do not accumulate: repeat a value in a later stage to keep it).
        samples_per_step: samples consumed per optimizer step by the whole run (batch_size · world_size ·
            accumulation); needed when a stage starts at a step.
    """

    def __init__(self, stages: Sequence[DifficultyStage | Mapping[str, Any]], samples_per_step: int | None = None):
        parsed = [s if isinstance(s, DifficultyStage) else DifficultyStage.model_validate(dict(s)) for s in stages]
        starts = []
        for s in parsed:
            if s.start_sample is not None:
                starts.append(s.start_sample)
            else:
                if not samples_per_step:
                    raise DecodeAccelError("a stage starts at a step but samples_per_step is unknown",
                                           field="curriculum.start_step", fix="pass samples_per_step or use start_sample")
                starts.append(s.start_step * int(samples_per_step))
        order = np.argsort(starts, kind="stable")
        self.starts = [int(starts[i]) for i in order]
        self.stages = [parsed[i] for i in order]
        self.samples_per_step = samples_per_step

    def stage_index(self, sample_index: int) -> int:
        """Index of the stage in force at ``sample_index`` (-1 before the first stage)."""
        return int(np.searchsorted(self.starts, sample_index, side="right")) - 1

    def __call__(self, sample_index: int) -> dict[str, Any]:
        i = self.stage_index(sample_index)
        return {} if i < 0 else dict(self.stages[i].overrides)


def apply_overrides(config: Any, overrides: Mapping[str, Any], *, where: str = "curriculum.overrides") -> Any:
    """A copy of a SimulationConfig with ``overrides`` (dotted paths or :data:`OVERRIDE_ALIASES`) applied, validated.

    The one applier of simulation overrides: the training stream's curriculum stages and the config's
    ``TrainingConfig.simulation_with`` (stage checks, the tuning movie) both use it. ``where`` names the
    overrides in errors (``curriculum.overrides.<key>``).
    """
    if not overrides:
        return config
    data = config.model_dump()
    for key, value in overrides.items():
        dotted = OVERRIDE_ALIASES.get(key, key)
        parts = dotted.split(".")
        node = data
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node:
                raise DecodeAccelError("unknown simulation field", field=f"{where}.{key}",
                                       fix=f"use a dotted SimulationConfig path or one of {sorted(OVERRIDE_ALIASES)}")
            node = node[p]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise DecodeAccelError("unknown simulation field", field=f"{where}.{key}",
                                   fix=f"use a dotted SimulationConfig path or one of {sorted(OVERRIDE_ALIASES)}")
        node[parts[-1]] = value
        # density and emitters_per_frame are alternatives: setting one clears the other
        if dotted == "emitters.density":
            data["emitters"]["emitters_per_frame"] = None
        elif dotted == "emitters.emitters_per_frame":
            data["emitters"]["density"] = None
    try:
        return type(config).model_validate(data)
    except Exception as err:
        lines = str(err).splitlines()
        raise DecodeAccelError(f"invalid override ({'; '.join(lines[1:3])})", field=where) from None


class SimulatedWindowStream(IterableDataset):
    """Endless (or finite) stream of simulated 3-frame clips with their central-frame targets.

    Each item is a sample dict (see :mod:`decode_accel.data.targets`): ``frames`` (C, 3, H, W) photons,
    ``tgt_xyz`` (m, 3) px/px/nm, ``tgt_photons``, ``tgt_ratio``, ``bg`` (C, H, W) photons/px and
    ``sample_index`` (the global index g). Batch it with :func:`decode_accel.data.targets.collate_samples`.

    Args:
        config: the :class:`~decode_accel.simulation.config.SimulationConfig`.
        base_seed: seed of the whole stream (None: ``config.seed``).
        rank, world_size: this process and the number of processes; the stream shards itself (do not
            pass its DataLoader to ``accelerator.prepare``).
        start_index: global samples already consumed by the whole run (resume), a multiple of ``clips_per_call``.
        num_samples: total samples of the whole run over all ranks (None: endless). Give a multiple of
            world_size · clips_per_call so that all ranks get equally many (collectives hang otherwise).
        photon_min: label filter, photons (None: ``config.emitters.label_min_photons``).
        difficulty_schedule: a picklable callable ``g -> overrides`` (e.g. :class:`DifficultySchedule`) or a list of
            stages accepted by :class:`DifficultySchedule`; evaluated inside the worker at each chunk's first sample.
        clips_per_call: K, clips simulated per simulator call (1: ``sample(3)`` per clip; K > 1: one vectorised
            ``sample_windows(K)``; the loaders use the batch size). Part of the seed: changing it changes the data.
        worker_block_size: consecutive local samples given to one DataLoader worker (the batch size), a multiple of K.
        stream_id: separates independent streams with the same base seed ('train' 0, 'val' 1, 'test' 2).
        simulator_factory: callable ``config -> simulator`` (default ``decode_accel.simulation.Simulator``).
        device: where to simulate ('cpu', or 'cuda' to run the simulator on the GPU in the main process with
            num_workers=0 and pin_memory off); samples are returned on that device. The random streams of
            different devices differ, so a device is part of the seed like ``clips_per_call``.
        with_variance: each sample also carries ``variance`` (C, H, W): its own crop of the per-pixel sCMOS
            read-noise variance map, in photons² (the crop its camera noise was drawn with), for networks
            with ``model.variance_input``. It uses no random numbers: the samples are the same either way.
    """

    def __init__(self, config: Any, *, base_seed: int | None = None, rank: int = 0, world_size: int = 1,
                 start_index: int = 0, num_samples: int | None = None, photon_min: float | None = None,
                 difficulty_schedule: Callable[[int], Mapping[str, Any]] | Sequence[Any] | None = None,
                 clips_per_call: int = 1, worker_block_size: int | None = None, stream_id: int | str = 0,
                 simulator_factory: Callable[[Any], Any] | None = None, device: str | torch.device = "cpu",
                 with_variance: bool = False):
        k = int(clips_per_call)
        block = k if worker_block_size is None else int(worker_block_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise DecodeAccelError(f"rank {rank} is not in [0, world_size={world_size})", field="rank")
        if k < 1:
            raise DecodeAccelError(f"clips_per_call {k} < 1", field="clips_per_call")
        if start_index < 0 or start_index % k:
            raise DecodeAccelError(f"start_index {start_index} is not a non-negative multiple of clips_per_call {k}",
                                   field="start_index", fix="resume at step · batch_size · world_size")
        if block < 1 or block % k:
            raise DecodeAccelError(f"worker_block_size {block} is not a positive multiple of clips_per_call {k}",
                                   field="worker_block_size")
        self.config = config
        self.base_seed = int(config.seed if base_seed is None else base_seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.start_index = int(start_index)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.photon_min = float(config.emitters.label_min_photons if photon_min is None else photon_min)
        if difficulty_schedule is not None and not callable(difficulty_schedule):
            difficulty_schedule = DifficultySchedule(difficulty_schedule)
        self.difficulty_schedule = difficulty_schedule
        self.clips_per_call = k
        self.worker_block_size = block
        self.stream_id = STREAM_IDS[stream_id] if isinstance(stream_id, str) else int(stream_id)
        self.simulator_factory = simulator_factory
        self.device = torch.device(device)
        self.with_variance = bool(with_variance)
        #: yield whole chunks as batch dicts (already padded) instead of single samples; set by
        #: create_dataloader when a batch is one chunk (``whole_batches``): no per-sample split, re-pad or
        #: host sync, which on a GPU cost about 3 syncs per sample (issue 15.3)
        self.yield_batches = False
        self.samples_produced = 0  # counted in the process that iterates (the main process when num_workers=0)
        self._simulators: dict[str, Any] = {}

    # -- pickling: simulators are rebuilt lazily in each worker process
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_simulators"] = {}
        return state

    def local_indices(self) -> "Iterator[int]":
        """Global indices of the samples this rank yields, in order (all workers together)."""
        k, n = self.clips_per_call, 0
        while True:
            q = self.start_index // k + self.rank + self.world_size * n
            for g in range(q * k, q * k + k):
                if self.num_samples is not None and g >= self.num_samples:
                    return
                yield g
            n += 1

    def __len__(self) -> int:
        """Samples this rank yields (finite streams only)."""
        if self.num_samples is None:
            raise TypeError("an endless SimulatedWindowStream has no length")
        return sum(1 for _ in self.local_indices())

    def state_dict(self) -> dict[str, int]:
        """Resume position (valid with num_workers=0): ``start_index`` for a new stream = samples of all ranks."""
        return {"base_seed": self.base_seed, "stream_id": self.stream_id, "clips_per_call": self.clips_per_call,
                "start_index": self.start_index + self.samples_produced * self.world_size}

    def simulator_for(self, overrides: Mapping[str, Any]) -> Any:
        """The simulator of a difficulty stage (built once per stage and process)."""
        return self._stage(overrides)[0]

    def _stage(self, overrides: Mapping[str, Any]) -> tuple[Any, float]:
        key = json.dumps(dict(overrides), sort_keys=True, default=str)
        entry = self._simulators.get(key)
        if entry is None:
            factory = self.simulator_factory
            if factory is None:
                factory = Simulator
            config = apply_overrides(self.config, overrides)
            # the vectorised path filters labels inside the simulator: give it this stream's photon minimum
            config = config.model_copy(update={"emitters": config.emitters.model_copy(
                update={"label_min_photons": self.photon_min})})
            entry = (factory(config), float(config.frame.px_size))
            self._simulators[key] = entry
        return entry

    def overrides_for(self, index: int) -> dict[str, Any]:
        """Simulator overrides in force at global sample ``index`` (empty without a schedule)."""
        return {} if self.difficulty_schedule is None else dict(self.difficulty_schedule(index))

    def simulate_chunk(self, q: int) -> list[dict[str, torch.Tensor]]:
        """Simulate chunk ``q`` (global samples q·K .. q·K + K - 1) as a list of K sample dicts."""
        k = self.clips_per_call
        overrides = self.overrides_for(q * k)
        sim, px_size = self._stage(overrides)
        gen = torch.Generator(device=self.device).manual_seed(sample_seed(self.base_seed, q, self.stream_id, k))
        if k == 1:
            movie = sim.sample(3, gen)
            frames = torch.as_tensor(movie.frames_photons, dtype=torch.float32).permute(1, 0, 2, 3).contiguous()
            em = movie.emitters
            em = em[em["frame"].to_numpy() == 1]
            sample = {"frames": frames, "bg": torch.as_tensor(movie.bg[1], dtype=torch.float32).contiguous(),
                      "sample_index": torch.tensor(q, dtype=torch.int64)}
            if self.with_variance:
                sample["variance"] = sim.camera.read_variance_photons(tuple(frames[:, 0].shape), movie.roi_origin,
                                                                      device=frames.device)
            targets = emitters_to_targets(em, px_size, photon_min=self.photon_min, n_channels=frames.shape[0])
            sample.update({key: v.to(self.device) for key, v in targets.items()})
            return [sample]
        batch = sim.sample_windows(k, gen, with_variance=self.with_variance)
        out = []
        for b in range(k):
            m = batch["tgt_mask"][b]
            out.append({"frames": batch["frames"][b].float().contiguous(), "bg": batch["bg"][b].float().contiguous(),
                        "sample_index": torch.tensor(q * k + b, dtype=torch.int64),
                        "tgt_xyz": batch["tgt_xyz"][b][m].float(), "tgt_photons": batch["tgt_photons"][b][m].float(),
                        "tgt_ratio": batch["tgt_ratio"][b][m].float()})
            if self.with_variance:
                out[-1]["variance"] = batch["variance"][b].contiguous()
        return out

    def simulate_chunk_batch(self, q: int) -> dict[str, torch.Tensor]:
        """Chunk ``q`` as one batch dict (the :func:`collate_samples` layout), without splitting it into samples."""
        k = self.clips_per_call
        if k == 1:
            return collate_samples(self.simulate_chunk(q))
        sim, _ = self._stage(self.overrides_for(q * k))
        gen = torch.Generator(device=self.device).manual_seed(sample_seed(self.base_seed, q, self.stream_id, k))
        batch = sim.sample_windows(k, gen, with_variance=self.with_variance)
        mask = batch["tgt_mask"]
        out = {"tgt_xyz": batch["tgt_xyz"].float(), "tgt_photons": batch["tgt_photons"].float(),
               "tgt_ratio": batch["tgt_ratio"].float(), "tgt_mask": mask,
               "frames": batch["frames"].float().contiguous(), "bg": batch["bg"].float().contiguous(),
               "sample_index": torch.arange(q * k, q * k + k, dtype=torch.int64)}
        if self.with_variance:
            out["variance"] = batch["variance"].contiguous()
        return out

    def make_sample(self, index: int) -> dict[str, torch.Tensor]:
        """Simulate global sample ``index`` alone (its whole chunk is simulated and the rest dropped)."""
        k = self.clips_per_call
        return self.simulate_chunk(index // k)[index % k]

    def __iter__(self) -> "Iterator[dict[str, torch.Tensor]]":
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        k = self.clips_per_call
        chunks_per_block = self.worker_block_size // k
        n = 0
        while True:
            q = self.start_index // k + self.rank + self.world_size * n
            if self.num_samples is not None and q * k >= self.num_samples:
                return
            if (n // chunks_per_block) % n_workers == worker and self.yield_batches:
                batch = self.simulate_chunk_batch(q)
                if self.num_samples is not None and q * k + k > self.num_samples:  # the last, partial chunk
                    keep = self.num_samples - q * k
                    batch = {key: v[:keep] for key, v in batch.items()}
                self.samples_produced += len(batch["sample_index"])
                yield batch
            elif (n // chunks_per_block) % n_workers == worker:
                for sample in self.simulate_chunk(q):
                    if self.num_samples is not None and int(sample["sample_index"]) >= self.num_samples:
                        return
                    self.samples_produced += 1
                    yield sample
            n += 1
