"""The control plane's ceiling: how many learner-steps per second one driver can handle, and what the
stream cursor costs at 10k to 1M shards.

Driver: the runtime's own `stream_swav.runtime.driver.Trainer`, its learner group, decode pool,
ledger and actor shells, on a local Ray, with the two heavy parts swapped for stand-ins through
the actors' factories (`build_worker`, `build_learner`):

- a decode worker whose `next_batch` returns at once a real `CropBatch` of `--batch-bytes` of
  pixels (above Ray's 100 KiB inline limit, so it travels through the object store as a decoded
  batch does) with real `BatchMeta` bookkeeping: progress over its open shards of fake
  `--shard-samples`-sample shards, `finished` when one ends;
- a learner whose `train_step` does no work beyond sleeping `--step-ms` (the GPU's time) and
  returns a real `StepStats` (K prototype counts included).

Learners pull from their own decode actors and report once per `--report-interval-s`; the driver
merges the reports into the ledger, deals shard tasks and keeps the metrics. Per point the run
trains for `--seconds` after its actors are up. Over the timed window (after `--warmup-s`) the
script reads the driver process's CPU time (all its threads, Ray's core-worker threads included)
and counts learner-steps; the ceiling is learner-steps / driver CPU-seconds, the learner-steps per
second the driver could handle if everything else were free. Ready-batch latency is the time from
a decode actor finishing a batch to the learner starting the step that trains it.

Cursor: `StreamCursor` with N shard URLs in two states (one pass half done; two passes live, a
straggler holding pass p open while pass p+1 is half done): the state as checkpointed (torch.save
bytes, as in state.pt), save time (state_dict + pickle to rank 0 + torch.save + the weights_only
reload `checkpoint._serialise` verifies with), load time, and the driver's bookkeeping per batch
(`advance` with one batch's progress) and per finished shard (`next_task`).

    PYTHONPATH=. python bench/control_plane.py --json-out control_plane.json
    PYTHONPATH=. python bench/control_plane.py --learners 1,4 --shards 10000 --seconds 10   # quick

Run it on an otherwise idle machine: all actors share its cores with the driver.
"""
from __future__ import annotations

import argparse
import collections
import gc
import io
import json
import logging
import os
import pickle
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from stream_swav.config import Config, load_config
from stream_swav.data.batch import BatchMeta, CropBatch
from stream_swav.data.cursor import StreamCursor
from stream_swav.learner import StepStats
from stream_swav.runtime import driver
from stream_swav.runtime.ledger import StreamLedger
from stream_swav.runtime.reports import Progress

from machine import cpu_model  # bench/machine.py, beside this script

URL_PATTERN = "s3://bucket/datasets/instagram-2026/shards/{:07d}.tar"
TARGET_STEPS_PER_S = 2560  # 256 learners at 10 steps/s
TARGET_STATE_BYTES = 64 * 2**20
TARGET_SAVE_S = 2.0


# ----------------------------------------------------------------------------------- stand-ins
class NullDecodeWorker:
    """DecodeWorker's interface; batches are pre-made pixels with real bookkeeping."""

    def __init__(self, cfg: Config, worker_index: int, shard_samples: int, batch_bytes: int) -> None:
        self.shard_samples = shard_samples
        self.open: list[list[Any]] = []  # [task, position]
        side = max(1, int((batch_bytes / (2 * 3 * cfg.train.batch_size)) ** 0.5))
        self.pixels = np.zeros((2, cfg.train.batch_size, side, side, 3), np.uint8)
        self.empty = np.zeros((0, cfg.train.batch_size, 1, 1, 3), np.uint8)

    def assign(self, task: Any) -> None:
        self.open.append([task, task.start])

    def next_batch(self, batch_size: int, replays: list[tuple[str, int]] | None = None) -> CropBatch | None:
        # Replay requests (curation.balance_mode resample) are not served: the stand-in keeps no images.
        if not self.open:
            return None
        meta = BatchMeta()
        taken = 0
        # Samples come from every open shard, as out of the per-actor shuffle buffer.
        share = -(-batch_size // len(self.open))
        for entry in list(self.open):
            task, position = entry
            take = min(share, batch_size - taken, self.shard_samples - position)
            taken += take
            entry[1] = position = position + take
            meta.progress[task.key] = position
            meta.urls[task.key] = task.url
            if position >= self.shard_samples:
                meta.finished.append(task.key)
                self.open.remove(entry)
        meta.made_at = time.time()
        return CropBatch(self.pixels[:, :taken], self.empty[:, :taken], meta)


class _NullModel:
    def backbone_state_dict(self) -> dict[str, Any]:
        return {}


class NullLearner:
    """Learner's interface: the step sleeps `step_ms` (a GPU's time) and returns a real StepStats."""

    def __init__(self, cfg: Config, device: Any, rank: int, world_size: int, step_ms: float) -> None:
        self.world_size, self.step_s = world_size, step_ms / 1000
        self.step = self.images_seen = 0
        self.counts = torch.bincount(torch.randint(0, cfg.model.prototypes, (2 * cfg.train.batch_size,)),
                                     minlength=cfg.model.prototypes)
        self.model = _NullModel()

    def train_step(self, batch: CropBatch, step_images: int | None = None) -> StepStats:
        if self.step_s:
            time.sleep(self.step_s)
        self.step += 1
        self.images_seen += step_images if step_images is not None else len(batch) * self.world_size
        return StepStats(step=self.step, images_seen=self.images_seen, loss=torch.tensor(6.5), lr=0.3,
                         prototype_counts=self.counts.clone(), marginal_error=torch.tensor(0.01),
                         feature_spread=torch.tensor(0.5),
                         score_spread=torch.tensor(0.2), queue_fill=0, nonfinite=False, nonfinite_in_row=0)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "images_seen": self.images_seen}

    def rank_local_state(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.images_seen = state["step"], state["images_seen"]


class _Factory:
    """A picklable partial (the script's classes travel to the actors by value)."""

    def __init__(self, cls: type, **kwargs: Any) -> None:
        self.cls, self.kwargs = cls, kwargs

    def __call__(self, *args: Any) -> Any:
        return self.cls(*args, **self.kwargs)


class BenchTrainer(driver.Trainer):
    """The driver as it is, plus notes per chunk: wall time, process and main-thread CPU, steps."""

    def start(self) -> driver.RunState:
        next_state = super().start()
        # The time budget counts from here, once every actor is up.
        self.started = time.monotonic()
        self.samples = [(time.monotonic(), time.process_time(), time.thread_time(), self.step)]
        self.latencies: list[tuple[float, float]] = []  # (wall at report, latency s)
        return next_state

    def train_chunk(self) -> driver.RunState:
        next_state = super().train_chunk()
        now = time.monotonic()
        self.samples.append((now, time.process_time(), time.thread_time(), self.step))
        if self.last_summary is not None:
            self.latencies += [(now, x) for x in self.last_summary.latency_s]
        return next_state


# ------------------------------------------------------------------------------------ measuring
def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def driver_point(learners: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    shard_list = workdir / "shards.txt"
    if not shard_list.exists():
        shard_list.write_text("".join(URL_PATTERN.format(i) + "\n" for i in range(args.driver_shards)))
    cfg = load_config(base={
        "data": {"shards": str(shard_list), "decode_actors": learners,
                 "inflight_batches_per_actor": args.inflight_per_actor},
        "model": {"prototypes": args.prototypes},
        "train": {"batch_size": args.batch_size, "learners": learners, "device": "cpu", "cpus_per_learner": 1,
                  "time_budget_s": args.seconds, "progress_bar": False, "report_interval_s": args.report_interval_s,
                  "log_interval_s": 3600},
        # No periodic checkpoint in the timed window (the final one comes after it).
        "checkpoint": {"dir": str(workdir / f"ckpt-{learners}"), "every_steps": 0, "every_seconds": 0},
        "metrics": {"port": 0},
    })
    mem_before = available_mb()
    # One logical CPU per actor; address="local": always a Ray of our own.
    ray.init(address="local", num_cpus=2 * learners, include_dashboard=False, log_to_driver=True,
             object_store_memory=args.object_store_mb * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent) + os.pathsep
                                       + os.environ.get("PYTHONPATH", "")}})
    trainer = BenchTrainer(cfg, build_learner=_Factory(NullLearner, step_ms=args.step_ms),
                           build_worker=_Factory(NullDecodeWorker, shard_samples=args.shard_samples,
                                                 batch_bytes=args.batch_bytes))
    started = time.monotonic()
    try:
        trainer.run()
        mem_used = mem_before - available_mb()
    finally:
        trainer.metrics.stop_server()
        trainer.shutdown_actors()
        ray.shutdown()
    samples = [s for s in trainer.samples if s[0] >= trainer.samples[0][0] + args.warmup_s]
    first, last = samples[0], samples[-1]
    if last[3] <= first[3]:
        raise RuntimeError(f"{learners} learner(s): no step in the timed window")
    wall, cpu, main_cpu = last[0] - first[0], last[1] - first[1], last[2] - first[2]
    learner_steps = (last[3] - first[3]) * learners
    latency = [1e3 * x for t, x in trainer.latencies if first[0] <= t <= last[0]]
    return {
        "learners": learners, "decode_actors": learners, "startup_s": trainer.samples[0][0] - started,
        "window_s": wall, "chunks": len(samples) - 1, "learner_steps": learner_steps,
        "learner_steps_per_s": learner_steps / wall, "driver_cpu_util": cpu / wall,
        "driver_cpu_us_per_learner_step": 1e6 * cpu / learner_steps,
        "driver_main_thread_cpu_us_per_learner_step": 1e6 * main_cpu / learner_steps,
        "driver_cpu_ms_per_report": 1e3 * cpu / max(1, (len(samples) - 1) * learners),
        "ceiling_learner_steps_per_s": learner_steps / cpu,
        "ready_latency_ms_p50": percentile(latency, 50), "ready_latency_ms_p95": percentile(latency, 95),
        "mem_used_mb": mem_used, "load_avg_1m": os.getloadavg()[0],
    }


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def cursor_states(n: int, seed: int, open_shards: int) -> dict[str, StreamCursor]:
    """Cursors over n shards: pass 0 half done with `open_shards` in progress; and pass 0 done but
    for one straggler while pass 1 is half done, `open_shards` in progress."""
    def finish(cursor: StreamCursor, count: int) -> None:
        for _ in range(count):
            task = cursor.next_task()
            cursor.advance({task.key: 10_000}, [task.key])

    def start(cursor: StreamCursor, count: int) -> None:
        for _ in range(count):
            task = cursor.next_task()
            cursor.advance({task.key: 5_000}, [])

    urls = [URL_PATTERN.format(i) for i in range(n)]
    half = StreamCursor(seed)
    half.add_shards(urls)
    finish(half, n // 2)
    start(half, open_shards)
    two = StreamCursor(seed)
    two.add_shards(urls)
    straggler = two.next_task()
    finish(two, n - 1)
    two.advance({straggler.key: 7_000}, [])
    finish(two, n // 2)
    start(two, open_shards)
    return {"one pass, half done": half, "two passes live": two}


def cursor_point(n: int, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"shards": n, "states": {}}
    t_build, states = timed(cursor_states, n, 0, min(args.open_shards, n // 4))
    for name, cursor in states.items():
        gc.collect()
        t_state_dict, state = timed(cursor.state_dict)
        t_pickle, pickled = timed(pickle.dumps, {"stream_cursor": state}, pickle.HIGHEST_PROTOCOL)
        buffer = io.BytesIO()
        t_save, _ = timed(torch.save, {"stream_cursor": state}, buffer)
        data = buffer.getvalue()
        t_load, loaded = timed(lambda: torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        fresh = StreamCursor(0)
        t_load_state, _ = timed(fresh.load_state_dict, loaded["stream_cursor"])
        entry = {
            "torch_save_bytes": len(data), "pickle_bytes": len(pickled),
            "state_dict_s": t_state_dict, "pickle_s": t_pickle, "torch_save_s": t_save,
            "torch_load_weights_only_s": t_load, "load_state_dict_s": t_load_state,
            # A checkpoint: state_dict in the driver, Ray pickles it to rank 0, checkpoint._serialise
            # torch.saves it and reloads it with weights_only to verify it.
            "save_s": t_state_dict + t_pickle + t_save + t_load,
            "load_s": t_load + t_load_state,
        }
        entry.update(cursor_step_costs(cursor, args))
        result["states"][name] = entry
        del data, buffer, loaded, fresh, pickled
    result["build_s"] = t_build
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def cursor_step_costs(cursor: StreamCursor, args: argparse.Namespace) -> dict[str, Any]:
    """The driver's bookkeeping: ledger.record per chunk (advance per batch), next_task per finished shard."""
    ledger = StreamLedger(0, 4)
    ledger.cursor = cursor
    rounds = 200
    start = time.perf_counter()
    tasks = ledger.top_up(range(rounds // 4))
    next_task_us = 1e6 * (time.perf_counter() - start) / max(1, sum(len(t) for t in tasks.values()))
    keys = [t.key for ts in tasks.values() for t in ts]
    # One batch's progress over 2 open shards, recorded as a one-batch report.
    start = time.perf_counter()
    for i in range(1, 20_001):
        progress = Progress()
        progress.positions = {keys[i % len(keys)]: i, keys[(i + 1) % len(keys)]: i}
        ledger.record(progress)
    advance_us = 1e6 * (time.perf_counter() - start) / 20_000
    shard_ends = args.batch_size / args.shard_samples
    return {"next_task_us": next_task_us, "advance_us": advance_us,
            "cursor_us_per_learner_step": advance_us + shard_ends * next_task_us}


# ------------------------------------------------------------------------------------ reporting
def versions() -> dict[str, str]:
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {"nproc": str(os.cpu_count()), "cpu": cpu_model(), "ram_gib": f"{int(mem) / 2**20:.1f}",
            "python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 64 learners (128 actor processes) do not fit the documented 24 GiB machine; ask for them on a bigger one.
    parser.add_argument("--learners", default="1,4,16", help="learner counts, comma-separated ('' = none)")
    parser.add_argument("--step-ms", type=float, default=100.0, help="a stand-in learner step's time (a GPU's)")
    parser.add_argument("--report-interval-s", type=float, default=2.0, help="train.report_interval_s")
    parser.add_argument("--seconds", type=float, default=20.0, help="training time per point, after start-up")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="left out of the timed window")
    parser.add_argument("--shards", default="10000,100000,1000000", help="cursor sizes ('' = none)")
    parser.add_argument("--driver-shards", type=int, default=10_000, help="shards in the driver runs' stream")
    parser.add_argument("--shard-samples", type=int, default=10_000, help="samples per fake shard")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--prototypes", type=int, default=3000)
    parser.add_argument("--batch-bytes", type=int, default=128 * 1024,
                        help="pixels per batch (Ray inlines objects under 100 KiB)")
    parser.add_argument("--inflight-per-actor", type=int, default=2, help="data.inflight_batches_per_actor")
    parser.add_argument("--object-store-mb", type=int, default=1024)
    parser.add_argument("--open-shards", type=int, default=2048,
                        help="shards in progress in the cursor states (e.g. 1024 decode actors x 2)")
    parser.add_argument("--json-out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    info = versions()
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram_gib']} GiB RAM | Python {info['python']} | "
          f"Ray {info['ray']} | torch {info['torch']}")
    print(f"batch {args.batch_size}, K={args.prototypes}, step {args.step_ms:g} ms, report every "
          f"{args.report_interval_s:g} s, {args.seconds:.0f} s per point ({args.warmup_s:.0f} s warm-up left out)")
    points: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as tmp:
        for learners in [int(x) for x in args.learners.split(",") if x.strip()]:
            print(f"... {learners} learner(s); {available_mb():.0f} MB available", flush=True)
            try:
                points.append(driver_point(learners, args, Path(tmp)))
            except Exception as error:  # noqa: BLE001 - a point that does not fit must not lose the others
                failed.append({"learners": learners, "error": f"{type(error).__name__}: {error}"[:500]})
                print(f"    did not run: {failed[-1]['error']}", flush=True)
                continue
            p = points[-1]
            print(f"    {p['learner_steps_per_s']:.0f} learner-steps/s, driver {p['driver_cpu_us_per_learner_step']:.0f} "
                  f"CPU-us per learner-step -> ceiling {p['ceiling_learner_steps_per_s']:.0f}/s", flush=True)
    if points:
        print(f"\n{'learners':>8} {'lrn-steps/s':>11} {'drv CPU %':>9} {'CPU us/lrn-step':>15} {'main thr us':>11} "
              f"{'ms/report':>9} {'ceiling/s':>10} {'ready p50/p95 ms':>17} {'start-up s':>10} {'mem MB':>7}")
        for p in points:
            print(f"{p['learners']:>8} {p['learner_steps_per_s']:>11.1f} {100 * p['driver_cpu_util']:>9.1f} "
                  f"{p['driver_cpu_us_per_learner_step']:>15.0f} {p['driver_main_thread_cpu_us_per_learner_step']:>11.0f} "
                  f"{p['driver_cpu_ms_per_report']:>9.2f} {p['ceiling_learner_steps_per_s']:>10.0f} "
                  f"{p['ready_latency_ms_p50']:>8.1f}/{p['ready_latency_ms_p95']:<8.1f} {p['startup_s']:>10.1f} "
                  f"{p['mem_used_mb']:>7.0f}")
    cursors = []
    for n in [int(x) for x in args.shards.split(",") if x.strip()]:
        print(f"... cursor with {n} shards", flush=True)
        cursors.append(cursor_point(n, args))
    if cursors:
        print(f"\n{'shards':>9} {'state':<20} {'state.pt MB':>11} {'save s':>7} {'load s':>7} {'advance us':>10} "
              f"{'next_task us':>12} {'cursor us/lrn-step':>18}")
        for c in cursors:
            for name, s in c["states"].items():
                print(f"{c['shards']:>9} {name:<20} {s['torch_save_bytes'] / 1e6:>11.2f} {s['save_s']:>7.2f} "
                      f"{s['load_s']:>7.2f} {s['advance_us']:>10.1f} {s['next_task_us']:>12.1f} "
                      f"{s['cursor_us_per_learner_step']:>18.2f}")

    for f in failed:
        print(f"{f['learners']:>8} learners: not measured ({f['error']})")
    summary: dict[str, Any] = {"machine": info, "settings": vars(args), "driver": points, "driver_failed": failed,
                               "cursor": cursors}
    if points:
        top = max(points, key=lambda p: p["learners"])
        ceiling = top["ceiling_learner_steps_per_s"]
        summary.update(driver_learner_steps_per_s_ceiling=ceiling, driver_ceiling_at_learners=top["learners"],
                       driver_ceiling_by_learners={str(p["learners"]): p["ceiling_learner_steps_per_s"] for p in points})
        print(f"\nceiling at {top['learners']} learners: {ceiling:.0f} learner-steps/s = {ceiling / 10:.0f} learners at "
              f"10 steps/s (target {TARGET_STEPS_PER_S}: {'met' if ceiling >= TARGET_STEPS_PER_S else 'MISSED'})")
    million = next((c for c in cursors if c["shards"] == 1_000_000), None)
    if million:
        worst = max(million["states"].values(), key=lambda s: s["torch_save_bytes"])
        summary["cursor_state_bytes_1m_shards"] = worst["torch_save_bytes"]
        summary["cursor_save_s_1m_shards"] = worst["save_s"]
        print(f"cursor state at 1M shards: {worst['torch_save_bytes'] / 2**20:.1f} MiB (target <= 64 MiB: "
              f"{'met' if worst['torch_save_bytes'] <= TARGET_STATE_BYTES else 'MISSED'}), save {worst['save_s']:.2f} s "
              f"(target < {TARGET_SAVE_S:.0f} s: {'met' if worst['save_s'] < TARGET_SAVE_S else 'MISSED'})")
    if len(cursors) > 1:
        per_step = [c["states"]["one pass, half done"]["cursor_us_per_learner_step"] for c in cursors]
        summary["cursor_step_cost_growth"] = per_step[-1] / per_step[0]
        print(f"cursor bookkeeping per learner-step, {cursors[-1]['shards']} vs {cursors[0]['shards']} shards: "
              f"x{per_step[-1] / per_step[0]:.2f} (target: flat)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {args.json_out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
