"""Training scaling: samples/s of the same short training with 1 and 2 processes, side by side (issue 15.4).

The training is the trainer of ``benchmarks/training_speed.py`` (scenario (a),
recipes/configs/benchmark/a_2d_low_density.yaml, on-the-fly simulation inline, every hook the config
implies), a fixed number of updates of ``--batch`` samples *per process*, timed after ``--warmup`` updates.
It runs in three configurations, each in fresh processes, alternated A B C A B C ... (``--repeats``; the
machine is noisy, the median is reported):

* ``1p x 1t``: one process, 1 thread (the per-process baseline);
* ``1p x 2t``: one process, 2 threads (the same total cores as 2 processes: the honest baseline on 2 cores);
* ``2p x 1t``: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`` with ``cpu=True`` in
  the Accelerator and 1 thread each (DDP over gloo; ``accelerate launch --cpu --num_processes 2`` starts only
  one process, see accelerate_configs/cpu.yaml).

Samples/s are global: all processes' samples over the slowest rank's timed wall time. The scaling efficiency is
``samples/s(2p x 1t) / (2 x samples/s(1p x 1t))`` (perfect per-process scaling = 1) and
``samples/s(2p x 1t) / samples/s(1p x 2t)`` (processes against threads on the same cores). On a machine other
jobs load, wall-clock rates follow the share of the cores each run got (reported per run as ``cores used``,
CPU-seconds over wall seconds); samples per CPU-second (all processes and threads) do not, and their ratio
between 2 processes and 1 process x 1 thread is what the second process costs in work.

Every rank records the ``sample_index`` (the stream's global sample index, data/stream.py) of each batch it
trained on and a SHA-256 fingerprint of its first batch's frames; a 2-process run counts only if both ranks
ran in one 2-process group (``num_processes`` 2, ``MULTI_CPU``) and their sample sets are disjoint and their
first batches differ (otherwise the launcher started two copies of a 1-process training)::

    python benchmarks/training_scaling.py --json benchmarks/results/training_scaling_cpu.json
"""

from __future__ import annotations

import time

#: when this process started (epoch seconds), before the heavy imports: the start-up cost of a rank
PROCESS_START = time.time()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is no package

from decode_accel.errors import DecodeAccelError  # noqa: E402
from decode_accel.pipeline import write_json  # noqa: E402
from decode_accel.training.builders import build_loaders  # noqa: E402
from decode_accel.training.hooks import Hook  # noqa: E402
from decode_accel.training.monitor import TrainingMonitor  # noqa: E402
from decode_accel.training.trainer import build_trainer  # noqa: E402
from training_speed import scenario_config  # noqa: E402

#: (name, processes, threads per process), in the order they alternate
CONFIGURATIONS = (("1p x 1t", 1, 1), ("1p x 2t", 1, 2), ("2p x 1t", 2, 1))


class ScalingProbe(Hook):
    """Per rank: the wall time of each update after the warm-up, and which samples the rank trained on.

    The clock starts at the end of update ``warmup`` and reads at each update's end; with DDP every update
    ends with the gradient all-reduce, so the ranks' clocks cover the same updates. ``on_batch`` keeps the
    batch's ``sample_index`` (global sample indices of the stream; a CPU tensor here, so no device sync) and
    hashes the first batch's frames.
    """

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.update_seconds: list[float] = []
        self.sample_indices: list[int] = []
        self.first_batch_sha256: str | None = None
        self._mark: float | None = None
        self.clock_started_at: float | None = None  # epoch seconds
        self._cpu_mark = 0.0
        self.cpu_seconds = 0.0  # this process's CPU time (all threads, user + system) over the timed updates

    def on_batch(self, trainer, batch):
        self.sample_indices.extend(int(i) for i in batch["sample_index"].reshape(-1).tolist())
        if self.first_batch_sha256 is None:
            frames = batch["frames"].detach().to("cpu", torch.float32).contiguous()
            self.first_batch_sha256 = hashlib.sha256(frames.numpy().tobytes()).hexdigest()[:16]
        return batch

    def on_step_end(self, trainer, losses):
        now = time.perf_counter()
        if trainer.global_step == self.warmup:
            self.clock_started_at = time.time()
            self._cpu_mark = time.process_time()
            trainer.monitor.reset_performance()  # the data-wait clock starts with the timed updates
        elif trainer.global_step > self.warmup:
            self.update_seconds.append(now - self._mark)
            self.cpu_seconds = time.process_time() - self._cpu_mark
        self._mark = now

    def on_fit_end(self, trainer, history):
        phases = trainer.monitor.performance_summary(log=False).get("phases", {})
        self.data_seconds = phases.get("data", {}).get("seconds", 0.0)


def train_one_rank(*, preset: str, frame: int, batch: int, updates: int, warmup: int, threads: int,
                   out_dir: Path) -> dict:
    """One rank of one configuration: the short training, then ``rank{r}.json`` in ``out_dir``.

    Runs in a process of its own (plain ``python`` for 1 process, ``accelerate launch`` for 2); ``threads``
    is torch's intra-op thread count of this process. Returns what it wrote.
    """
    torch.set_num_threads(threads)
    config = scenario_config(preset, frame=frame, batch=batch, workers=0, micro_batches=warmup + updates,
                             log_dir=out_dir / "logs")
    trainer = build_trainer(config, cpu=True, mixed_precision="no")
    built_at = time.time()
    acc = trainer.accelerator
    rank, world = acc.process_index, acc.num_processes
    probe = ScalingProbe(warmup)
    trainer.add_hook(probe)
    train_loader, _ = build_loaders(config, rank=rank, world_size=world)
    stream = train_loader.dataset
    monitor = TrainingMonitor(out_dir / "logs" / f"rank{rank}", use_tensorboard=False,
                              is_main_process=acc.is_main_process)
    try:
        trainer.train(train_loader, None, monitor=monitor, save_dir=None)
    finally:
        monitor.close()
    trained_at = time.time()
    timed = sum(probe.update_seconds)
    # epoch seconds: process start (before imports), trainer and process group built, clock started, fit returned
    moments = {"process_start": PROCESS_START, "trainer_built": built_at, "clock_started": probe.clock_started_at,
               "fit_returned": trained_at}
    row = {"rank": rank, "world_size": world, "distributed_type": str(acc.distributed_type),
           "threads": torch.get_num_threads(), "global_step": trainer.global_step,
           "updates_timed": len(probe.update_seconds), "timed_seconds": timed, "cpu_seconds": probe.cpu_seconds,
           "update_seconds": probe.update_seconds, "data_wait_share": probe.data_seconds / timed if timed else None,
           "stream": {"base_seed": stream.base_seed, "rank": stream.rank, "world_size": stream.world_size,
                      "clips_per_call": stream.clips_per_call},
           "sample_indices": probe.sample_indices, "first_batch_sha256": probe.first_batch_sha256, "moments": moments}
    write_json(row, out_dir / f"rank{rank}.json")
    return row


def _free_port() -> int:
    """A free TCP port for the process group (other engineers' distributed runs may hold the default 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int, worker_args: list[str]) -> list[str]:
    """The command line of one configuration: plain python for 1 process, ``accelerate launch`` for 2+."""
    script = [str(Path(__file__).resolve()), *worker_args]
    if processes == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *script]


def check_disjoint(ranks: list[dict], processes: int) -> dict:
    """The ranks of one run: one process group of ``processes`` ranks, on disjoint samples.

    Raises DecodeAccelError when the launcher did not make one group (e.g. two independent 1-process
    trainings, which would train on the same samples) or two ranks shared a sample.
    """
    worlds = sorted({r["world_size"] for r in ranks})
    if len(ranks) != processes or worlds != [processes] or sorted(r["rank"] for r in ranks) != list(range(processes)):
        raise DecodeAccelError(f"expected one group of {processes} rank(s), got ranks "
                               f"{[r['rank'] for r in ranks]} of world sizes {worlds}", field="num_processes",
                               fix="launch with ACCELERATE_USE_CPU=1 and Accelerator(cpu=True)")
    seen: set[int] = set()
    overlap = 0
    for r in ranks:
        mine = set(r["sample_indices"])
        overlap += len(seen & mine)
        seen |= mine
    fingerprints = [r["first_batch_sha256"] for r in ranks]
    disjoint = overlap == 0 and len(set(fingerprints)) == len(fingerprints)
    if not disjoint:
        raise DecodeAccelError(f"the {processes} ranks trained on shared samples ({overlap} sample indices in "
                               f"common, first-batch fingerprints {fingerprints})", field="rank",
                               fix="build the stream with rank=accelerator.process_index, "
                                   "world_size=accelerator.num_processes")
    return {"samples_disjoint": True, "shared_sample_indices": overlap, "first_batch_sha256": fingerprints}


def run_configuration(name: str, processes: int, threads: int, *, preset: str, frame: int, batch: int,
                      updates: int, warmup: int, work_dir: Path) -> dict:
    """One configuration in fresh processes; its global samples/s and the disjointness check."""
    out_dir = Path(tempfile.mkdtemp(prefix=f"run_{processes}p{threads}t_", dir=work_dir))
    worker_args = ["--rank-job", "--preset", preset, "--frame", str(frame), "--batch", str(batch),
                   "--updates", str(updates), "--warmup", str(warmup), "--threads", str(threads),
                   "--out-dir", str(out_dir)]
    thread_env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               ACCELERATE_USE_CPU="1", **thread_env)
    launched_at, start = time.time(), time.perf_counter()
    proc = subprocess.run(launch_command(processes, worker_args), env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise DecodeAccelError(f"configuration {name} failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'}",
                               fix=f"run it alone to see the whole error; its log is in {out_dir}")
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    check = check_disjoint(ranks, processes)
    slowest = max(r["timed_seconds"] for r in ranks)
    timed = ranks[0]["updates_timed"]
    return {"configuration": name, "processes": processes, "threads_per_process": threads,
            "threads_seen": [r["threads"] for r in ranks], "distributed_type": ranks[0]["distributed_type"],
            "updates_timed": timed, "samples_timed": timed * batch * processes,
            "samples_per_s": timed * batch * processes / slowest, "timed_seconds": slowest,
            "cpu_seconds": sum(r["cpu_seconds"] for r in ranks),
            "samples_per_cpu_second": timed * batch * processes / sum(r["cpu_seconds"] for r in ranks),
            # cores the run got on average (CPU-seconds over wall seconds): shows how much the load took from it
            "cores_used": sum(r["cpu_seconds"] for r in ranks) / slowest,
            "launch_wall_seconds": wall,
            # seconds from the launch to each rank's process start, its trainer built, its clock started
            "startup_seconds_per_rank": [{k: round(v - launched_at, 2) for k, v in r["moments"].items()}
                                         for r in ranks],
            "data_wait_share": statistics.mean(r["data_wait_share"] for r in ranks),
            **check, "first_samples_per_rank": [r["sample_indices"][:batch] for r in ranks],
            "update_seconds_per_rank": [r["update_seconds"] for r in ranks]}


def summarise(runs: list[dict]) -> dict:
    """Medians per configuration and the scaling efficiencies (ratios of the medians).

    Wall-clock samples/s depend on how much of the machine the runs got; samples per CPU-second (all
    threads and processes) do not, so their ratio isolates what a second process costs in work
    (gradient all-reduce, a second model replica's overheads) from the load of the moment.
    """
    def median(key: str) -> dict[str, float]:
        return {name: statistics.median(r[key] for r in runs if r["configuration"] == name)
                for name, _, _ in CONFIGURATIONS}
    rate, work = median("samples_per_s"), median("samples_per_cpu_second")
    return {"median_samples_per_s": rate, "median_samples_per_cpu_second": work,
            "efficiency_vs_2x_one_process_one_thread": rate["2p x 1t"] / (2 * rate["1p x 1t"]),
            "efficiency_vs_one_process_two_threads": rate["2p x 1t"] / rate["1p x 2t"],
            "speedup_two_threads_vs_one": rate["1p x 2t"] / rate["1p x 1t"],
            "cpu_work_efficiency_two_processes": work["2p x 1t"] / work["1p x 1t"],
            "cpu_work_efficiency_two_threads": work["1p x 2t"] / work["1p x 1t"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu_small", help="network preset (model.preset)")
    parser.add_argument("--frame", type=int, default=40, help="training frame size (px)")
    parser.add_argument("--batch", type=int, default=8, help="samples per update per process")
    parser.add_argument("--updates", type=int, default=30, help="timed updates per run")
    parser.add_argument("--warmup", type=int, default=3, help="updates before the clock starts")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration, alternated A B C A B C")
    parser.add_argument("--json", default=None, help="write the runs and the summary here")
    parser.add_argument("--work-dir", default=None, help="folder for the ranks' JSON and logs (default: a temp folder)")
    # one rank of one configuration (the parent starts these)
    parser.add_argument("--rank-job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.updates < 1 or args.warmup < 1 or args.repeats < 1:
        parser.error("--updates, --warmup and --repeats must be >= 1")
    if args.rank_job:
        train_one_rank(preset=args.preset, frame=args.frame, batch=args.batch, updates=args.updates,
                       warmup=args.warmup, threads=args.threads, out_dir=Path(args.out_dir))
        return 0
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="decode_accel_scaling_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for repeat in range(args.repeats):
            for name, processes, threads in CONFIGURATIONS:
                run = run_configuration(name, processes, threads, preset=args.preset, frame=args.frame,
                                        batch=args.batch, updates=args.updates, warmup=args.warmup,
                                        work_dir=work_dir)
                runs.append(dict(run, repeat=repeat))
                print(f"  repeat {repeat} {name}: {run['samples_per_s']:.2f} samples/s "
                      f"({run['updates_timed']} updates in {run['timed_seconds']:.1f} s; launch "
                      f"{run['launch_wall_seconds']:.0f} s)", flush=True)
    except DecodeAccelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.work_dir is None:  # the ranks' files are all in the JSON; keep them only where asked to
        shutil.rmtree(work_dir, ignore_errors=True)
    summary = summarise(runs)
    med, work = summary["median_samples_per_s"], summary["median_samples_per_cpu_second"]
    print(f"\ntraining scaling on CPU ({os.cpu_count()} cores): {args.preset}, {args.frame}x{args.frame} px, batch "
          f"{args.batch} per process, {args.updates} timed updates after {args.warmup}, median of {args.repeats}")
    print(f"{'configuration':<14}{'processes':>10}{'threads/proc':>14}{'samples/s':>11}{'samples/CPU-s':>15}"
          f"   samples/s (cores used) of each run")
    for name, processes, threads in CONFIGURATIONS:
        each = ", ".join(f"{r['samples_per_s']:.2f} ({r['cores_used']:.2f})"
                         for r in runs if r["configuration"] == name)
        print(f"{name:<14}{processes:>10}{threads:>14}{med[name]:>11.2f}{work[name]:>15.2f}   {each}")
    print(f"scaling efficiency, baseline 2 x (1 process x 1 thread): "
          f"{100 * summary['efficiency_vs_2x_one_process_one_thread']:.0f} %")
    print(f"scaling efficiency, baseline 1 process x 2 threads (same cores): "
          f"{100 * summary['efficiency_vs_one_process_two_threads']:.0f} %")
    print(f"samples per CPU-second, 2 processes / 1 process x 1 thread: "
          f"{100 * summary['cpu_work_efficiency_two_processes']:.0f} % (load-independent cost of the second process)")
    print("(samples/s over all processes; every 2-process run trained on disjoint samples: "
          f"{all(r['samples_disjoint'] for r in runs if r['processes'] == 2)})")
    if args.json:
        write_json({"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                    "cpu_count": os.cpu_count(), "preset": args.preset, "frame_px": args.frame,
                    "batch_per_process": args.batch, "updates_timed": args.updates, "warmup": args.warmup,
                    "repeats": args.repeats, "summary": summary, "runs": runs}, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
