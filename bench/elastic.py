"""What a learner failure costs: an elastic group (train.min_learners=1) against today's restart
from the latest checkpoint (a fixed group of 2), measured in the same run on a CPU Ray cluster of
two nodes made on this machine with `ray.cluster_utils.Cluster`.

Each measurement is a run of the real driver (`Trainer`, the path `stream-swav train` takes) with
the real learner on a small CPU recipe, two learners, over synthetic shards:

  death    rank 1's process is SIGKILLed half-way between two checkpoints (--checkpoint-every
           steps apart). Figures: seconds from the kill to the end of the first chunk that trained
           a step again, and learner-steps lost (global steps trained again, from
           stream_swav_rollback_steps_total, times the learners).
  arrival  two CPUs per learner, so one learner per node; the worker node is removed (the fixed
           group restarts and waits for room, the elastic one goes on with one learner) and a node
           is added back --gap seconds later. Figures: global steps trained while the node was
           away, and seconds from the node's arrival to the end of the first chunk trained by two
           learners again.

Times are taken at chunk ends (train.report_interval_s=0.25 s apart), so they are late by up to
that much.

    PYTHONPATH=. python bench/elastic.py [--checkpoint-every 40] [--gap 3] [--repeats 2] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
from PIL import Image
from ray.cluster_utils import Cluster

from stream_swav.config import Config, StorageConfig, config_from_dict
from stream_swav.data.shards import ShardWriter
from stream_swav.runtime import driver

from machine import cpu_model  # bench/machine.py, beside this script

NODE_CPUS = 3
RECIPE: dict[str, Any] = {
    "model": {"arch": "resnet18", "width": 16, "small_stem": True, "hidden_dim": 64, "output_dim": 32,
              "prototypes": 32},
    "crops": {"global_size": 16, "local_size": 12, "local_count": 2},
    "swav": {"queue_length": 0, "freeze_prototypes_steps": 2},
    "optim": {"warmup_images": 64},
    "train": {"batch_size": 8, "device": "cpu", "learners": 2, "progress_bar": False, "log_interval_s": 30,
              "report_interval_s": 0.25, "startup_timeout_s": 120, "max_failures": 5, "cpu_threads": 1},
    "checkpoint": {"every_seconds": 0, "keep_last": 2},
    "metrics": {"enabled": False},
    "data": {"decode_actors": 2, "shuffle_buffer": 16},
}


def write_shards(folder: Path, shards: int, per_shard: int) -> str:
    rng = np.random.default_rng(0)
    writer = ShardWriter(str(folder), StorageConfig())
    for s in range(shards):
        writer.open()
        for n in range(per_shard):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
            writer.add(f"s{s}-{n:05d}", {"png": buffer.getvalue()})
        writer.publish(f"shard-{s:03d}.tar")
    return str(folder)


class TimedTrainer(driver.Trainer):
    """The driver, noting when each chunk that trained a step ended and with how many learners, and
    calling `act(trainer)` after each chunk."""

    def __init__(self, cfg: Config, act: Callable[["TimedTrainer"], None]) -> None:
        super().__init__(cfg)
        self.act = act
        self.trained: list[tuple[float, int, int]] = []  # (time, step, learners)
        self.events: dict[str, float] = {}
        self.rolled_back = 0

    def train_chunk(self) -> driver.RunState:
        before = self.step
        state = super().train_chunk()
        if state is driver.RunState.RUNNING:
            if self.step > before:
                self.trained.append((time.monotonic(), self.step, len(self.group.actors)))
            self.act(self)
        return state

    def recover(self) -> driver.RunState:
        before = self.step
        state = super().recover()
        self.rolled_back += max(0, before - self.step) if state is driver.RunState.RUNNING else 0
        return state

    def first_trained_after(self, event: str, learners: int = 1) -> float:
        at = self.events[event]
        return next(t for t, _, n in self.trained if t > at and n >= learners) - at


def kill_rank(trainer: driver.Trainer, rank: int) -> None:
    pid = ray.get(trainer.group.actors[rank].__ray_call__.remote(lambda _self: os.getpid()))
    os.kill(pid, signal.SIGKILL)


def death(cluster: Cluster, shards: str, workdir: Path, elastic: bool, every: int) -> dict[str, Any]:
    cfg = config_from_dict({**RECIPE, "data": {**RECIPE["data"], "shards": shards},
                            "train": {**RECIPE["train"], "min_learners": 1 if elastic else 0},
                            "checkpoint": {**RECIPE["checkpoint"], "dir": str(workdir / "ckpt"), "every_steps": every}})

    def act(trainer: TimedTrainer) -> None:
        events = trainer.events
        if "kill" not in events and len(trainer.group.actors) == 2 and trainer.step >= every \
                and trainer.step % every >= every // 2:
            events["kill"], events["kill_step"] = time.monotonic(), trainer.step
            kill_rank(trainer, 1)
        elif "kill" in events and time.monotonic() - events["kill"] > 5 and any(
                t > events["kill"] for t, _, _ in trainer.trained):
            trainer.request_stop("measured")

    trainer = run(cfg, act)
    return {"path": "elastic" if elastic else "restore", "killed_at_step": int(trainer.events["kill_step"]),
            "seconds_to_next_step": round(trainer.first_trained_after("kill"), 2),
            "steps_trained_again": trainer.rolled_back, "learner_steps_lost": trainer.rolled_back * 2}


def arrival(cluster: Cluster, shards: str, workdir: Path, elastic: bool, gap: float) -> dict[str, Any]:
    node = cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    cfg = config_from_dict({**RECIPE, "data": {**RECIPE["data"], "shards": shards},
                            "train": {**RECIPE["train"], "min_learners": 1 if elastic else 0, "cpus_per_learner": 2,
                                      "resize_interval_s": 1},
                            "checkpoint": {**RECIPE["checkpoint"], "dir": str(workdir / "ckpt"), "every_steps": 20}})

    def act(trainer: TimedTrainer) -> None:
        events = trainer.events
        if "remove" not in events and len(trainer.group.actors) == 2 and trainer.step >= 30:
            events["remove"] = time.monotonic()
        elif "arrived" in events and any(t > events["arrived"] and n == 2 for t, _, n in trainer.trained):
            trainer.request_stop("measured")

    def change_the_cluster(trainer: TimedTrainer) -> None:
        # Ray's cluster utilities run in the main thread only; the trainer runs in another.
        events = trainer.events
        if "remove" in events and "removed" not in events:
            cluster.remove_node(node)
            events["removed"] = time.monotonic()
        elif "removed" in events and "arrived" not in events and time.monotonic() - events["removed"] > gap:
            cluster.add_node(num_cpus=NODE_CPUS)
            events["arrived"] = time.monotonic()

    trainer = run(cfg, act, change_the_cluster)
    for extra in list(cluster.worker_nodes):
        cluster.remove_node(extra)
    events = trainer.events
    away = [step for t, step, _ in trainer.trained if events["removed"] < t <= events["arrived"]]
    before = max(step for t, step, _ in trainer.trained if t <= events["removed"])
    return {"path": "elastic" if elastic else "restore",
            "steps_trained_while_away": max(0, max(away, default=before) - before),
            "seconds_from_arrival_to_two_learners_training": round(trainer.first_trained_after("arrived", 2), 2),
            "steps_trained_again": trainer.rolled_back}


def run(cfg: Config, act: Callable[[TimedTrainer], None],
        every: Callable[[TimedTrainer], None] = lambda _trainer: None) -> TimedTrainer:
    """Run the trainer to its stop in a thread, calling `every(trainer)` here every 0.2 s meanwhile."""
    trainer = TimedTrainer(cfg, act)
    ended: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: ended.update(status=trainer.run()), daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            every(trainer)
            thread.join(0.2)
    finally:
        trainer.request_stop("bench ended")
        thread.join()
        trainer.shutdown_actors()
    if ended.get("status") != 0:
        raise RuntimeError(f"the run ended with exit status {ended.get('status')}")
    return trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-every", type=int, default=40, help="steps between checkpoints")
    parser.add_argument("--gap", type=float, default=3.0, help="seconds between a node's loss and its return")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement")
    parser.add_argument("--json-out", help="also write the figures here")
    args = parser.parse_args()
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False,
                                      "_system_config": {"health_check_failure_threshold": 3,
                                                         "health_check_period_ms": 500,
                                                         "health_check_initial_delay_ms": 0}})
    here = str(Path(__file__).resolve().parent.parent)
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": here}})
    results: dict[str, Any] = {"machine": cpu_model(), "checkpoint_every_steps": args.checkpoint_every,
                               "gap_s": args.gap}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            shards = write_shards(Path(tmp) / "shards", shards=8, per_shard=256)
            cluster.add_node(num_cpus=NODE_CPUS)
            cluster.wait_for_nodes()
            results["death"] = [death(cluster, shards, Path(tmp) / f"death-{elastic}-{n}", elastic,
                                      args.checkpoint_every)
                                for n in range(args.repeats) for elastic in (False, True)]
            for node in list(cluster.worker_nodes):
                cluster.remove_node(node)
            results["arrival"] = [arrival(cluster, shards, Path(tmp) / f"arrival-{elastic}-{n}", elastic, args.gap)
                                  for n in range(args.repeats) for elastic in (False, True)]
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"machine: {results['machine']}; 2 learners (tiny ResNet-18, CPU), checkpoint every "
          f"{args.checkpoint_every} steps, node back after {args.gap:g} s")
    print(f"{'death':<8} {'s to next step':>14} {'steps trained again':>19} {'learner-steps lost':>18}")
    for row in results["death"]:
        print(f"{row['path']:<8} {row['seconds_to_next_step']:>14.2f} {row['steps_trained_again']:>19d} "
              f"{row['learner_steps_lost']:>18d}")
    print(f"{'arrival':<8} {'steps while away':>16} {'s from arrival to 2 training':>28} {'steps trained again':>19}")
    for row in results["arrival"]:
        print(f"{row['path']:<8} {row['steps_trained_while_away']:>16d} "
              f"{row['seconds_from_arrival_to_two_learners_training']:>28.2f} {row['steps_trained_again']:>19d}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
