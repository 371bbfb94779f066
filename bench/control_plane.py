"""The control plane's ceiling: how many learner-steps per second one driver can route, and what
the stream cursor costs at 10k to 1M shards.

Driver: today's `stream_swav.runtime.driver.Trainer`, unchanged, on a local Ray, with its two actor
classes swapped for stand-ins that do no heavy work:

- a decode actor whose `next_batch` returns at once a real `BatchMeta` (one key per sample,
  progress per shard id advancing through fake shards of `--shard-samples` samples, `finished`
  when a shard ends, split over its open shards like the shuffle buffer does) and one pre-made
  payload of `--batch-bytes` (by default just above Ray's 100 KiB inline limit, so it travels
  through the object store as a decoded batch does);
- a learner whose `train_step` does nothing and returns the keys the real one returns on a GPU
  (loss, lr, step, images seen, K prototype counts, input wait, GPU memory...).

Per point (learner count) the Trainer runs for `--seconds` of training after its actors are up.
Over the timed window (after `--warmup-s`) the script reads the driver process's CPU time
(`time.process_time`: all of its threads, Ray's core-worker threads included) and its main
thread's (`time.thread_time`), and counts learner-steps (driver steps x learners). The ceiling is
1 / (driver CPU seconds per learner-step): the learner-steps per second the driver could route if
everything else were free. Ready-batch latency is the time from the stand-in decoder making a
batch to the driver issuing the learner call that trains it (and, separately, to the driver
collecting its metadata).

Cursor: `StreamCursor` with N realistic shard URLs, in two states (one pass half done; and two
passes live, a straggler holding pass p open while pass p+1 is half done): state size as
checkpointed (torch.save bytes, as in state.pt; pickle bytes, as shipped to rank 0; JSON bytes),
save time (state_dict + torch.save + the weights_only reload `checkpoint._serialise` verifies
with), load time (torch.load(weights_only=True) + load_state_dict), and the per-step
bookkeeping: advance() with one batch's progress, and next_task() as the driver calls it when a
shard finishes.

    PYTHONPATH=. python bench/control_plane.py --json-out control_plane.json
    PYTHONPATH=. python bench/control_plane.py --learners 1,4 --shards 10000 --seconds 5   # quick
    PYTHONPATH=. python bench/control_plane.py --learners 16 --shards '' --profile   # + cProfile

Run it on an otherwise idle machine: all actors share its cores with the driver.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import io
import json
import logging
import os
import pickle
import platform
import pstats
import random
import resource
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from stream_swav.config import load_config
from stream_swav.data.cursor import StreamCursor, parse_shard_id, shard_id, stable_seed
from stream_swav.runtime import checkpoint as ckpt
from stream_swav.runtime import driver
from stream_swav.runtime.actors import BatchMeta

from machine import cpu_model  # bench/machine.py, beside this script

URL_PATTERN = "s3://bucket/datasets/instagram-2026/shards/{:06d}.tar"
TARGET_STEPS_PER_S = 2560  # 256 learners at 10 steps/s
TARGET_STATE_BYTES = 64 * 2**20
TARGET_SAVE_S = 2.0


# ----------------------------------------------------------------------------- stand-in actors
def standin_decode_actor(shard_samples: int, batch_bytes: int) -> Any:
    """A Ray actor class with DecodeActorImpl's interface that emits pre-made batches at once."""

    class StandInDecodeActor:
        def __init__(self, config: dict[str, Any], worker_index: int) -> None:
            import numpy as np

            self.open: list[list[Any]] = []  # [shard id, url, pass, position]
            self.payload = np.zeros(batch_bytes, dtype=np.uint8)

        def pid(self) -> int:
            return os.getpid()

        def assign(self, task: Any) -> None:
            self.open.append([task.shard_id, task.url, task.pass_index, task.start])

        @ray.method(num_returns=2)
        def next_batch(self, batch_size: int) -> tuple[BatchMeta | None, Any]:
            if not self.open:
                return None, None
            keys: list[str] = []
            progress: dict[str, int] = {}
            passes: dict[str, int] = {}
            finished: list[str] = []
            # Samples come from every open shard, as out of the per-actor shuffle buffer.
            share = -(-batch_size // len(self.open))
            for entry in list(self.open):
                sid, url, pass_index, position = entry
                take = min(share, batch_size - len(keys), shard_samples - position)
                if take <= 0:
                    continue
                keys.extend(f"{url}/{n:06d}" for n in range(position, position + take))
                entry[3] = position = position + take
                progress[sid] = position
                passes[sid] = pass_index
                if position >= shard_samples:
                    finished.append(sid)
                    self.open.remove(entry)
            meta = BatchMeta(size=len(keys), keys=keys, progress=progress, finished=finished, passes=passes,
                             errors={}, bytes_read=len(keys) * 110_000)
            # An extra attribute (pickled with the instance) rather than a subclass: a class defined in
            # this script would travel by value with every batch.
            meta.made_at = time.time()
            return meta, self.payload

    return ray.remote(StandInDecodeActor)


def standin_learner_actor() -> Any:
    """A Ray actor class with LearnerActorImpl's interface whose step does no work."""

    class StandInLearnerActor:
        def __init__(self, config: dict[str, Any], rank: int, world_size: int) -> None:
            self.rank, self.world = rank, world_size
            self.batch_size = int(config["train"]["batch_size"])
            prototypes = int(config["model"]["prototypes"])
            rng = random.Random(rank)
            # A bincount of the argmax codes of two assigned crops per sample, as a real step returns.
            counts = [0] * prototypes
            for _ in range(2 * self.batch_size):
                counts[rng.randrange(prototypes)] += 1
            self.counts = counts
            self.step = 0
            self.last_end: float | None = None
            self.wait = self.busy = 0.0

        def address(self) -> tuple[str, int]:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("", 0))
                return "127.0.0.1", sock.getsockname()[1]

        def setup(self, master_addr: str | None, master_port: int | None) -> str:
            return "stand-in"

        def load_state(self, state: dict[str, Any]) -> int:
            return self.step

        def train_step(self, batch: Any) -> dict[str, Any]:
            start = time.perf_counter()
            if self.last_end is not None:
                self.wait += start - self.last_end
            self.step += 1
            stats: dict[str, Any] = {
                "step": float(self.step), "images_seen": float(self.step * self.batch_size * self.world),
                "loss": 6.5, "lr": 0.3, "perplexity": 2500.0, "marginal_error": 0.01, "queue_fill": 1.0,
                "nonfinite": 0.0, "nonfinite_in_row": 0.0, "prototype_counts": list(self.counts)}
            end = time.perf_counter()
            self.busy += end - start
            self.last_end = end
            stats["input_wait_ratio"] = self.wait / max(self.wait + self.busy, 1e-9)
            stats["step_seconds"] = end - start
            stats["gpu_memory_allocated_bytes"] = 30e9
            stats["gpu_memory_reserved_bytes"] = 40e9
            return stats

        def rank_state(self) -> dict[str, Any]:
            return {}

        def save_checkpoint(self, directory: str, extra: dict[str, Any], other_ranks: list[Any],
                            info: dict[str, Any]) -> dict[str, Any]:
            if other_ranks:
                ray.get(other_ranks)
            url = f"{directory}/step-{self.step:09d}"
            return {"step": self.step, "images_seen": self.step * self.batch_size * self.world, "step_url": url,
                    "state_url": f"{url}/state.pt", "backbone_url": f"{url}/backbone.pt",
                    "latest_url": f"{directory}/latest.json", "bytes_written": 0, "duration_s": 0.0,
                    "wall_time": time.time(), "deleted": ()}

    return ray.remote(StandInLearnerActor)


# ------------------------------------------------------------------------- instrumented driver
class _TimedCall:
    """`handle.train_step` with a note of when each call is issued."""

    def __init__(self, method: Any, trainer: "BenchTrainer") -> None:
        self.method, self.trainer = method, trainer

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self.trainer.note_issued()
        return self.method.remote(*args, **kwargs)


class _TimedLearner:
    def __init__(self, handle: Any, trainer: "BenchTrainer") -> None:
        self.handle = handle
        self.train_step = _TimedCall(handle.train_step, trainer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


class BenchTrainer(driver.Trainer):
    """The driver as it is, plus notes: per step (wall, CPU), per batch (made, collected, issued),
    CPU per driver thread at the start and the end of the timed window."""

    profiler: cProfile.Profile | None = None
    window: tuple[float, float] = (0.0, 0.0)

    def start(self) -> None:
        super().start()
        self.raw_learners = list(self.learners)
        self.learners = [_TimedLearner(h, self) for h in self.raw_learners]
        self.stamps: collections.deque[tuple[float, float]] = collections.deque()
        self.latencies: list[tuple[float, float, float]] = []  # (issued at, made->issued, made->collected)
        self.samples: list[tuple[float, float, float, int]] = []  # (wall, process CPU, main-thread CPU, step)
        # The time budget counts from here, once every actor is up.
        self.started = time.time()
        self.window = (self.started + self.window[0], self.started + self.window[1])
        self.samples.append((self.started, time.process_time(), time.thread_time(), self.step))
        self.threads: list[tuple[int, dict[str, float]]] = []  # (step, CPU seconds per thread name)
        self.machine: list[tuple[float, float, float]] = []  # (wall, machine CPU s, this run's CPU s)
        if self.profiler is not None:
            self.profiler.enable()

    def collect_batches(self, timeout: float) -> None:
        before = len(self.ready)
        super().collect_batches(timeout)
        new = len(self.ready) - before
        if new:
            now = time.time()
            for k in range(new, 0, -1):
                meta = self.ready[-k][0]
                if meta.size:
                    self.stamps.append((meta.made_at, now))

    def note_issued(self) -> None:
        made, collected = self.stamps.popleft()
        now = time.time()
        self.latencies.append((now, now - made, collected - made))

    def on_step(self, results: list[dict[str, Any]], step: driver.PendingStep) -> None:
        super().on_step(results, step)
        # Per-thread CPU when the timed window opens (and when it closes: budget_left), read before the
        # window's first sample so that reading /proc is not counted in it.
        if not self.threads and time.time() >= self.window[0]:
            self.threads.append((self.step, thread_cpu()))
            self.machine.append((time.time(), *machine_cpu()))
        self.samples.append((time.time(), time.process_time(), time.thread_time(), self.step))

    def budget_left(self) -> bool:
        left = super().budget_left()
        if not left and len(self.threads) == 1:
            self.threads.append((self.step, thread_cpu()))
            self.machine.append((time.time(), *machine_cpu()))
            if self.profiler is not None:
                self.profiler.disable()
        return left


# ------------------------------------------------------------------------------- driver points
def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads, summed by thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = collections.defaultdict(float)
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] += (int(fields[11]) + int(fields[12])) / tick
    return dict(out)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def by_second(latencies: list[tuple[float, float, float]], start: float) -> dict[int, list[float]]:
    out: dict[int, list[float]] = collections.defaultdict(list)
    for issued_at, made_to_issued, _ in latencies:
        out[int(issued_at - start)].append(1e3 * made_to_issued)
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks used), from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        table[int(entry.name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    return table


def _descendants(table: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    mine, frontier = set(), [os.getpid()]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in mine:
                mine.add(child)
                frontier.append(child)
    return mine


def machine_cpu() -> tuple[float, float]:
    """(CPU seconds used on the whole machine since boot, CPU seconds of this process and its descendants,
    Ray's raylet, GCS and workers included)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields) if i not in (3, 4))  # all but idle and iowait
    table = _proc_table()
    mine = _descendants(table) | {os.getpid()}
    return busy / tick, sum(table[pid][1] for pid in mine if pid in table) / tick


def settle(limit_s: float = 30.0) -> None:
    """Wait (up to limit_s) until the processes a previous point started (Ray's) are gone."""
    deadline = time.time() + limit_s
    while time.time() < deadline and _descendants(_proc_table()):
        time.sleep(0.5)


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def driver_point(learners: int, decoders: int, args: argparse.Namespace, workdir: Path,
                 profile: bool = False) -> dict[str, Any]:
    shard_list = workdir / "shards.txt"
    if not shard_list.exists():
        shard_list.write_text("".join(URL_PATTERN.format(i) + "\n" for i in range(args.driver_shards)))
    ckpt_dir = tempfile.mkdtemp(prefix="ckpt-", dir=workdir)
    cfg = load_config(base={
        "data": {"shards": str(shard_list), "decode_actors": decoders,
                 "inflight_batches_per_actor": args.inflight_per_actor},
        "model": {"prototypes": args.prototypes},
        "train": {"batch_size": args.batch_size, "learners": learners, "device": "cpu", "cpus_per_learner": 1,
                  "time_budget_s": args.seconds, "progress_bar": False},
        # No periodic checkpoint in the timed window (the final one comes after it).
        "checkpoint": {"dir": ckpt_dir, "every_steps": 0, "every_seconds": 0},
        "metrics": {"port": 0},
    })
    mem_before = available_mb()
    saved = driver.DecodeActor, driver.LearnerActor
    driver.DecodeActor = standin_decode_actor(args.shard_samples, args.batch_bytes)
    driver.LearnerActor = standin_learner_actor()
    # One logical CPU per actor: each decode actor asks for 1, each learner for cpus_per_learner = 1.
    # address="local": always a Ray of our own, never a cluster that `ray start` left running on the machine.
    ray.init(address="local", num_cpus=learners + decoders, include_dashboard=False, log_to_driver=True,
             object_store_memory=args.object_store_mb * 2**20)
    trainer = BenchTrainer(cfg)
    # Main-thread CPU time, from the end of start-up to the end of the timed window.
    profiler = cProfile.Profile(time.thread_time) if profile else None
    trainer.profiler = profiler
    trainer.window = (args.warmup_s, args.seconds)
    t0 = time.time()
    try:
        trainer.run()
        if profiler:
            profiler.disable()
        actors_rss = sum(rss_mb(slot.pid) for slot in trainer.slots)
        mem_available = available_mb()
    finally:
        driver.DecodeActor, driver.LearnerActor = saved
        trainer.metrics.stop_server()
        for handle in [*getattr(trainer, "raw_learners", []), *(s.handle for s in trainer.slots)]:
            if handle is not None:
                ray.kill(handle, no_restart=True)
        ray.shutdown()
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    startup_s = trainer.started - t0
    end = trainer.started + args.seconds
    samples = [s for s in trainer.samples if s[0] <= end]
    first = next((s for s in samples if s[0] >= trainer.started + args.warmup_s), None)
    last = samples[-1]
    if first is None or last[3] <= first[3]:
        raise RuntimeError(f"{learners} learner(s): no step completed in the timed window")
    wall = last[0] - first[0]
    cpu = last[1] - first[1]
    main_cpu = last[2] - first[2]
    learner_steps = (last[3] - first[3]) * learners
    # Batches made and issued inside the window (not the start-up backlog).
    window = [lat for lat in trainer.latencies if lat[0] - lat[1] >= first[0] and lat[0] <= last[0]]
    issued = [1e3 * lat[1] for lat in window]
    collected = [1e3 * lat[2] for lat in window]
    result = {
        "learners": learners, "decode_actors": decoders, "startup_s": startup_s, "window_s": wall,
        "first_step_s": trainer.samples[1][0] - trainer.started if len(trainer.samples) > 1 else float("nan"),
        "driver_steps": last[3] - first[3], "learner_steps": learner_steps,
        "learner_steps_per_s": learner_steps / wall,
        "driver_cpu_s": cpu, "driver_cpu_util": cpu / wall, "driver_main_thread_cpu_s": main_cpu,
        "driver_cpu_us_per_learner_step": 1e6 * cpu / learner_steps,
        "driver_main_thread_cpu_us_per_learner_step": 1e6 * main_cpu / learner_steps,
        "ceiling_learner_steps_per_s": learner_steps / cpu,
        "ready_latency_ms_p50": percentile(issued, 50), "ready_latency_ms_p95": percentile(issued, 95),
        "collect_latency_ms_p50": percentile(collected, 50), "collect_latency_ms_p95": percentile(collected, 95),
        "ready_latency_ms_max": max(issued, default=float("nan")),
        # Per second of the timed window: (second, batches issued, p50 ms, max ms).
        "ready_latency_by_second": [
            (sec, len(v), percentile(v, 50), max(v)) for sec, v in sorted(by_second(window, first[0]).items())],
        "batches_timed": len(window), "load_avg_1m": os.getloadavg()[0],
        "decode_actors_rss_mb": actors_rss,
        # Memory the point took (Ray, actors, object store use): MemAvailable before minus at the end.
        "mem_used_mb": mem_before - mem_available,
    }
    if len(trainer.machine) == 2:
        (w0, m0, o0), (w1, m1, o1) = trainer.machine
        # Cores busy during the window: this run (driver, raylet, GCS, actors) and everything else.
        result["run_cores"] = (o1 - o0) / (w1 - w0)
        result["other_cores"] = max(0.0, (m1 - m0) - (o1 - o0)) / (w1 - w0)
    if len(trainer.threads) == 2:
        (step0, cpu0), (step1, cpu1) = trainer.threads
        steps = max((step1 - step0) * learners, 1)
        per_thread = {name: 1e6 * (cpu1.get(name, 0.0) - cpu0.get(name, 0.0)) / steps for name in cpu1}
        result["driver_thread_cpu_us_per_learner_step"] = dict(
            sorted(((k, v) for k, v in per_thread.items() if v > 0), key=lambda kv: -kv[1]))
    if profiler:
        profiled_steps = (trainer.threads[1][0] if len(trainer.threads) == 2 else trainer.step) * learners
        result["profile"] = profile_summary(profiler, learner_steps=profiled_steps, args=args)
    return result


# Where the driver's main thread spends its CPU time: (label, file suffix, function name), inclusive.
PROFILE_ROWS = [
    ("Trainer.feed_decoders", "runtime/driver.py", "feed_decoders"),
    ("Trainer.collect_batches", "runtime/driver.py", "collect_batches"),
    ("Trainer.submit_steps", "runtime/driver.py", "submit_steps"),
    ("Trainer.finish_step", "runtime/driver.py", "finish_step"),
    ("Trainer.on_step (metrics, prototype usage)", "runtime/driver.py", "on_step"),
    ("Trainer.ready_batches", "runtime/driver.py", "ready_batches"),
    ("ray.wait", "_private/worker.py", "wait"),
    ("ray.get", "_private/worker.py", "get"),
    ("actor method .remote()", "ray/actor.py", "remote"),
    ("StreamCursor.advance", "data/cursor.py", "advance"),
    ("StreamCursor.next_task", "data/cursor.py", "next_task"),
]


def profile_summary(profiler: cProfile.Profile, learner_steps: int, args: argparse.Namespace) -> dict[str, Any]:
    stats = pstats.Stats(profiler)
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(25)
    if args.profile_out:
        stats.dump_stats(args.profile_out)
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values())
    rows = {}
    for label, suffix, name in PROFILE_ROWS:
        calls = cum = 0.0
        for (filename, _line, func), (_cc, nc, _tt, ct, _callers) in raw.items():
            if func == name and filename.endswith(suffix):
                calls += nc
                cum += ct
        rows[label] = {"calls_per_learner_step": calls / max(learner_steps, 1),
                       "us_per_learner_step": 1e6 * cum / max(learner_steps, 1)}
    return {"learner_steps": learner_steps, "main_thread_cpu_us_per_learner_step": 1e6 * total / max(learner_steps, 1),
            "rows": rows, "text": out.getvalue()}


# ------------------------------------------------------------------------------------- cursor
def timed(fn: Any, *a: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn(*a)
    return time.perf_counter() - start, value


def build_states(n: int, seed: int, open_shards: int) -> dict[str, dict[str, Any]]:
    """Saved cursor states for n shards: one pass half done, and two passes live (a straggler shard of pass p
    holds it open while pass p+1 is half done).

    Made through the cursor's own state format. As in a running driver, the URLs of finished and open
    shards are string objects of their own (advance() parses them out of the shard ids that batches carry),
    not the listed ones: pickle stores each distinct object once, so this matters to the saved size.
    """
    urls = [URL_PATTERN.format(i) for i in range(n)]
    cursor = StreamCursor(seed)
    cursor.add_shards(urls)
    cursor.next_task()  # creates pass 0 (its shuffled order)
    base = cursor.state_dict()
    order0 = base["passes"][0]["order"]
    order1 = list(urls)
    random.Random(stable_seed("pass", seed, 1)).shuffle(order1)

    def reported(pass_index: int, chosen: list[str]) -> list[str]:
        return [parse_shard_id(shard_id(pass_index, url))[1] for url in chosen]

    half = n // 2
    mid = dict(base, passes=[{"index": 0, "order": order0,
                              "positions": {u: 5000 for u in reported(0, order0[half:half + open_shards])},
                              "finished": sorted(reported(0, order0[:half]))}])
    stragglers = set(order0[n - open_shards:])
    two = dict(base, passes=[
        {"index": 0, "order": order0, "positions": {u: 5000 for u in reported(0, sorted(stragglers))},
         "finished": sorted(reported(0, order0[:n - open_shards]))},
        {"index": 1, "order": order1,
         "positions": {u: 5000 for u in reported(1, [u for u in order1[half:half + open_shards] if u not in stragglers])},
         "finished": sorted(reported(1, [u for u in order1[:half] if u not in stragglers]))}])
    return {"one pass, half done": mid, "two passes live": two}


def cursor_point(n: int, args: argparse.Namespace) -> dict[str, Any]:
    seed = 1234
    result: dict[str, Any] = {"shards": n, "states": {}}
    wall0, machine0, mine0 = time.time(), *machine_cpu()
    t_build, states = timed(build_states, n, seed, max(1, min(args.open_shards, n // 4)))
    for name, raw in states.items():
        cursor = StreamCursor(seed)
        t_load_raw, _ = timed(cursor.load_state_dict, raw)
        gc.collect()
        t_state_dict, state = timed(cursor.state_dict)
        t_pickle, pickled = timed(pickle.dumps, {"stream_cursor": state}, pickle.HIGHEST_PROTOCOL)
        buffer = io.BytesIO()
        t_save, _ = timed(torch.save, {"stream_cursor": state}, buffer)
        data = buffer.getvalue()
        t_load, loaded = timed(lambda: torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        fresh = StreamCursor(seed)
        t_load_state, _ = timed(fresh.load_state_dict, loaded["stream_cursor"])
        t_json, text = timed(json.dumps, state)
        entry = {
            "torch_save_bytes": len(data), "pickle_bytes": len(pickled), "json_bytes": len(text),
            "state_dict_s": t_state_dict, "pickle_s": t_pickle, "torch_save_s": t_save,
            "torch_load_weights_only_s": t_load, "load_state_dict_s": t_load_state,
            # What checkpoint() costs for the cursor: state_dict in the driver, Ray pickles it to rank 0,
            # checkpoint._serialise torch.saves it and reloads it with weights_only to verify it.
            "save_s": t_state_dict + t_pickle + t_save + t_load,
            # What resume() costs: load state.pt (weights_only) and fill both cursors.
            "load_s": t_load + 2 * t_load_state,
        }
        del loaded, text, pickled, data, buffer, fresh
        entry.update(cursor_step_costs(cursor, n, args))
        result["states"][name] = entry
        del cursor, state
        gc.collect()
    # next_task once pass p is fully handed out: it scans all of pass p, then builds and shuffles the order of
    # pass p+1 (once per pass, in the driver loop).
    mid = states["one pass, half done"]
    order0 = mid["passes"][0]["order"]
    boundary = dict(mid, passes=[{"index": 0, "order": order0, "positions": {},
                                  "finished": [parse_shard_id(shard_id(0, u))[1] for u in order0[:-1]]}])
    del states
    cursor = StreamCursor(seed)
    cursor.load_state_dict(boundary)
    cursor.next_task()  # the last shard of pass 0
    t_new_pass, task = timed(cursor.next_task)
    if task is None or task.pass_index != 1:
        raise RuntimeError(f"expected the first task of pass 1, got {task}")
    result["next_task_new_pass_s"] = t_new_pass
    del cursor, boundary, mid
    gc.collect()
    result["build_s"] = t_build
    wall1, machine1, mine1 = time.time(), *machine_cpu()
    result["other_cores"] = max(0.0, (machine1 - machine0) - (mine1 - mine0)) / (wall1 - wall0)
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def cursor_step_costs(cursor: StreamCursor, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """advance() per batch and next_task() per finished shard, as the driver calls them."""
    work = cursor.copy()
    # next_task: a few calls, bounded in time (it scans the pass's order from the start).
    calls, spent, tasks = 0, 0.0, []
    while calls < 200 and (spent < args.next_task_budget_s or calls < 3):
        t, task = timed(work.next_task)
        spent += t
        calls += 1
        if task is None:
            break
        tasks.append(task)
    next_task_us = 1e6 * spent / calls
    # advance: one batch's progress over two open shards (one decode actor), positions moving on.
    if len(tasks) < 2:
        raise RuntimeError(f"{n} shards: next_task handed out {len(tasks)} task(s); use more shards")
    a, b = tasks[0].shard_id, tasks[1].shard_id
    rounds = 20_000
    start = time.perf_counter()
    for i in range(1, rounds + 1):
        work.advance({a: i, b: i}, [])
    advance_us = 1e6 * (time.perf_counter() - start) / rounds
    # advance with a finished shard (once per shard end).
    finishing = [t.shard_id for t in tasks[2:]] or [a]
    start = time.perf_counter()
    for sid in finishing:
        work.advance({sid: args.shard_samples}, [sid])
    finish_us = 1e6 * (time.perf_counter() - start) / len(finishing)
    # Per learner-step: the delivered and the submitted cursor each advance once per batch; a shard
    # ends every shard_samples / batch_size batches, and then next_task runs once and each cursor
    # records the finish.
    shard_ends = args.batch_size / args.shard_samples
    per_step = 2 * advance_us + shard_ends * (next_task_us + 2 * finish_us)
    return {"next_task_us": next_task_us, "next_task_calls": calls, "advance_us": advance_us,
            "advance_finished_us": finish_us, "cursor_us_per_learner_step": per_step}


# ---------------------------------------------------------------------------------- reporting
def versions() -> dict[str, str]:
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {"nproc": str(os.cpu_count()), "cpu": cpu_model(), "ram_gib": f"{int(mem) / 2**20:.1f}",
            "python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__}


def print_driver_table(points: list[dict[str, Any]]) -> None:
    print("\nDriver (today's Trainer, stand-in actors; CPU = driver process, all threads)")
    head = (f"{'learners':>8} {'decoders':>8} {'window s':>8} {'lrn-steps/s':>11} {'drv CPU %':>9} "
            f"{'CPU us/lrn-step':>15} {'main thr us':>11} {'ceiling/s':>9} {'ready p50 ms':>12} "
            f"{'ready p95 ms':>12} {'collect p50/p95 ms':>18} {'startup s':>9} {'cores run/other':>15}")
    print(head)
    for p in points:
        print(f"{p['learners']:>8} {p['decode_actors']:>8} {p['window_s']:>8.1f} {p['learner_steps_per_s']:>11.1f} "
              f"{100 * p['driver_cpu_util']:>9.0f} {p['driver_cpu_us_per_learner_step']:>15.0f} "
              f"{p['driver_main_thread_cpu_us_per_learner_step']:>11.0f} {p['ceiling_learner_steps_per_s']:>9.0f} "
              f"{p['ready_latency_ms_p50']:>12.1f} {p['ready_latency_ms_p95']:>12.1f} "
              f"{p['collect_latency_ms_p50']:>8.1f} / {p['collect_latency_ms_p95']:<7.1f} {p['startup_s']:>9.1f} "
              f"{p.get('run_cores', float('nan')):>7.2f}/{p.get('other_cores', float('nan')):<7.2f}")


def print_thread_table(points: list[dict[str, Any]]) -> None:
    print("\nDriver CPU per learner-step by thread (us; /proc/self/task, timed window)")
    for p in points:
        threads = p.get("driver_thread_cpu_us_per_learner_step", {})
        shown = ", ".join(f"{name} {us:.0f}" for name, us in list(threads.items())[:8])
        print(f"{p['learners']:>8} learners: {shown}")


def print_cursor_table(points: list[dict[str, Any]]) -> None:
    print("\nStream cursor (StreamCursor, today's state format)")
    print(f"{'shards':>9} {'state':<20} {'torch.save MB':>13} {'pickle MB':>9} {'JSON MB':>8} {'save s':>7} "
          f"{'load s':>7} {'advance us':>10} {'next_task us':>12} {'cursor us/lrn-step':>18}")
    for c in points:
        for name, s in c["states"].items():
            print(f"{c['shards']:>9} {name:<20} {s['torch_save_bytes'] / 1e6:>13.1f} {s['pickle_bytes'] / 1e6:>9.1f} "
                  f"{s['json_bytes'] / 1e6:>8.1f} {s['save_s']:>7.2f} {s['load_s']:>7.2f} {s['advance_us']:>10.1f} "
                  f"{s['next_task_us']:>12.0f} {s['cursor_us_per_learner_step']:>18.1f}")
        print(f"{'':>9}   (next_task that starts a new pass: {1e3 * c['next_task_new_pass_s']:.0f} ms, once per pass)")
        detail = c["states"]["two passes live"]
        print(f"{'':>9}   (two passes: state_dict {detail['state_dict_s']:.2f}s, pickle to rank 0 "
              f"{detail['pickle_s']:.2f}s, torch.save {detail['torch_save_s']:.2f}s, weights_only load "
              f"{detail['torch_load_weights_only_s']:.2f}s, load_state_dict {detail['load_state_dict_s']:.2f}s; "
              f"peak RSS {c['max_rss_mb']:.0f} MB; other load {c['other_cores']:.2f} cores)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learners", default="1,4,16,64,128", help="learner counts, comma-separated ('' = none)")
    parser.add_argument("--max-decoders", type=int, default=16,
                        help="decode actors per point: one per learner, at most this many")
    parser.add_argument("--seconds", type=float, default=20.0, help="training time per point, after start-up")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="left out of the timed window")
    parser.add_argument("--shards", default="10000,100000,1000000", help="cursor sizes ('' = none)")
    parser.add_argument("--driver-shards", type=int, default=10_000, help="shards in the driver runs' stream")
    parser.add_argument("--shard-samples", type=int, default=10_000, help="samples per fake shard")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--prototypes", type=int, default=3000)
    parser.add_argument("--batch-bytes", type=int, default=128 * 1024,
                        help="pre-made payload per batch (Ray inlines objects under 100 KiB)")
    parser.add_argument("--inflight-per-actor", type=int, default=2, help="data.inflight_batches_per_actor")
    parser.add_argument("--object-store-mb", type=int, default=1024)
    parser.add_argument("--open-shards", type=int, default=2048,
                        help="shards open at once in the cursor states (e.g. 1024 decode actors x 2)")
    parser.add_argument("--next-task-budget-s", type=float, default=2.0, help="time spent timing next_task per state")
    parser.add_argument("--profile", action="store_true",
                        help="run one more point (the largest learner count) under cProfile and print it")
    parser.add_argument("--profile-out", default="", help="also dump the cProfile stats to this file")
    parser.add_argument("--json-out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    info = versions()
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram_gib']} GiB RAM | Python {info['python']} | "
          f"Ray {info['ray']} | torch {info['torch']}")
    print(f"batch {args.batch_size}, K={args.prototypes}, {args.shard_samples}-sample shards, payload "
          f"{args.batch_bytes} B, {args.seconds:.0f}s per point ({args.warmup_s:.0f}s warm-up left out)")
    learner_counts = [int(x) for x in args.learners.split(",") if x.strip()]
    shard_counts = [int(x) for x in args.shards.split(",") if x.strip()]

    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as tmp:
        for learners in learner_counts:
            decoders = min(learners, args.max_decoders)
            settle()
            print(f"... {learners} learner(s), {decoders} decode actor(s); {available_mb():.0f} MB available",
                  flush=True)
            points.append(driver_point(learners, decoders, args, Path(tmp)))
            p = points[-1]
            print(f"    {p['learner_steps_per_s']:.0f} learner-steps/s, driver {p['driver_cpu_us_per_learner_step']:.0f} "
                  f"CPU-us per learner-step -> ceiling {p['ceiling_learner_steps_per_s']:.0f}/s", flush=True)
        profiled = None
        if args.profile and learner_counts:
            learners = max(learner_counts)
            settle()
            print(f"... profiling {learners} learner(s) under cProfile", flush=True)
            profiled = driver_point(learners, min(learners, args.max_decoders), args, Path(tmp), profile=True)
    if points:
        print_driver_table(points)
        print_thread_table(points)
    if profiled:
        prof = profiled["profile"]
        print(f"\ncProfile (CPU time, time.thread_time) of the driver's main thread from the end of start-up to the "
              f"end of the timed window, {profiled['learners']} learners, {prof['learner_steps']} learner-steps")
        print(f"main thread under the profiler: {prof['main_thread_cpu_us_per_learner_step']:.0f} CPU-us per "
              "learner-step; inclusive CPU per learner-step (rows nest):")
        for name, row in prof["rows"].items():
            print(f"  {row['us_per_learner_step']:8.1f} us  {row['calls_per_learner_step']:6.2f} calls  {name}")
        print(prof["text"])

    cursors = []
    for n in shard_counts:
        settle()
        print(f"... cursor with {n} shards", flush=True)
        cursors.append(cursor_point(n, args))
    if cursors:
        print_cursor_table(cursors)

    summary: dict[str, Any] = {"machine": info, "settings": vars(args), "driver": points, "cursor": cursors}
    if profiled:
        summary["profile"] = {k: v for k, v in profiled.items() if k != "profile"} | {
            k: v for k, v in profiled["profile"].items() if k != "text"}
    if points:
        top = max(points, key=lambda p: p["learners"])
        summary["driver_learner_steps_per_s_ceiling"] = top["ceiling_learner_steps_per_s"]
        summary["driver_ceiling_at_learners"] = top["learners"]
        summary["driver_ceiling_by_learners"] = {str(p["learners"]): p["ceiling_learner_steps_per_s"] for p in points}
        ceiling = top["ceiling_learner_steps_per_s"]
        print(f"\nceiling at {top['learners']} learners: {ceiling:.0f} learner-steps/s = {ceiling / 10:.0f} learners "
              f"at 10 steps/s (target {TARGET_STEPS_PER_S}: {'met' if ceiling >= TARGET_STEPS_PER_S else 'MISSED'})")
    million = next((c for c in cursors if c["shards"] == 1_000_000), None)
    if million:
        worst = max(million["states"].values(), key=lambda s: s["torch_save_bytes"])
        summary["cursor_state_bytes_1m_shards"] = worst["torch_save_bytes"]
        summary["cursor_save_s_1m_shards"] = worst["save_s"]
        print(f"cursor state at 1M shards (largest state measured): {worst['torch_save_bytes'] / 2**20:.0f} MiB "
              f"(target <= 64 MiB: {'met' if worst['torch_save_bytes'] <= TARGET_STATE_BYTES else 'MISSED'}), "
              f"save {worst['save_s']:.1f}s (target < {TARGET_SAVE_S:.0f}s: "
              f"{'met' if worst['save_s'] < TARGET_SAVE_S else 'MISSED'})")
    if len(cursors) > 1:
        growth = cursors[-1]["states"]["one pass, half done"]["cursor_us_per_learner_step"] / \
            cursors[0]["states"]["one pass, half done"]["cursor_us_per_learner_step"]
        summary["cursor_step_cost_growth"] = growth
        print(f"cursor bookkeeping per learner-step, {cursors[-1]['shards']} vs {cursors[0]['shards']} shards: "
              f"x{growth:.1f} (target: flat)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
