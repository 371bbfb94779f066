"""The training driver: shards -> decode actors -> learners -> checkpoints and metrics.

The driver owns the stream bookkeeping and nothing heavy: it hands shards to
decode actors, passes batch references (never pixels) to learners, advances
two cursors and decides when to checkpoint.

- `delivered` moves when a decode actor's batch reaches the driver; when an
  actor dies its unfinished shards are re-read from here, so nothing is lost
  or delivered twice.
- `submitted` moves when a batch is handed to a learner. Learner calls run in
  submission order, so a checkpoint requested now reflects exactly the batches
  submitted before it: that cursor is the one saved.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from stream_swav.config import Config, ConfigError
from stream_swav.data.cursor import StreamCursor
from stream_swav.data.sources import ShardSource
from stream_swav.model import BackboneSpec
from stream_swav import checkpoint as ckpt
from stream_swav.runtime.checkpointing import CheckpointPolicy
from stream_swav.runtime.actors import BatchMeta, DecodeActor, LearnerActor
from stream_swav.runtime.metrics import Metrics, PrototypeUsage, collapse_alarm, collapse_settings
from stream_swav.storage import describe_storage

log = logging.getLogger("stream_swav.driver")


class TrainingStopped(RuntimeError):
    """The run ended early for a reason the operator must see (e.g. non-finite losses)."""


@dataclass
class DecodeSlot:
    index: int
    handle: Any = None
    pid: int = 0
    shards: set[str] = field(default_factory=set)
    # (meta ref, batch ref, `assigned` when the call was made), oldest first.
    pending: collections.deque = field(default_factory=collections.deque)
    exhausted: bool = False
    # Shard tasks handed to this slot's actors so far.
    assigned: int = 0
    restarts: int = 0


@dataclass
class PendingStep:
    refs: list[Any]
    images: int
    keys: list[str]


# Where storage is, not who may read it: credentials stay in each node's environment (a local
# cluster inherits the driver's; KubeRay pods get them from a Secret), since Ray shows a job's
# runtime environment on its dashboard.
FORWARDED_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "FSSPEC_S3_ENDPOINT_URL", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                 "AWS_EC2_METADATA_DISABLED")


def init_ray(cfg: Config) -> None:
    """Join the cluster named by RAY_ADDRESS, else start a local one."""
    if ray.is_initialized():
        return
    env_vars = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # Decoders and learners read the same storage as the driver: pass its S3 settings on.
    env_vars.update({k: v for k, v in os.environ.items() if k in FORWARDED_ENV})
    env = {"env_vars": env_vars}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, runtime_env=env, log_to_driver=True,
                 num_cpus=os.cpu_count() or 1)


def cluster_plan(cfg: Config) -> tuple[int, float, float]:
    """How many decode actors, and the GPUs/CPUs each learner asks for."""
    resources = ray.cluster_resources()
    gpus_available = resources.get("GPU", 0.0)
    use_gpu = cfg.train.device != "cpu" and gpus_available >= cfg.train.learners * max(cfg.train.gpus_per_learner, 1e-9)
    if cfg.train.device == "cuda" and not use_gpu:
        raise ValueError(f"train.device: cuda asked for {cfg.train.learners} learner(s) but the cluster offers "
                         f"{gpus_available} GPU(s)")
    learner_gpus = cfg.train.gpus_per_learner if use_gpu else 0.0
    learner_cpus = cfg.train.cpus_per_learner
    actors = cfg.data.decode_actors
    if actors == 0:
        cpus = resources.get("CPU", 1.0)
        actors = max(1, int(cpus - learner_cpus * cfg.train.learners))
    return actors, learner_gpus, learner_cpus


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.stop_reason = ""
        self.metrics = Metrics()
        self.usage = PrototypeUsage(cfg.model.prototypes, cfg.metrics.perplexity_window_steps)
        self.source = ShardSource(cfg.data.shards, cfg.storage)
        self.delivered = StreamCursor(cfg.data.seed)
        self.submitted = StreamCursor(cfg.data.seed)
        self.slots: list[DecodeSlot] = []
        self.learners: list[Any] = []
        self.ready: collections.deque[tuple[BatchMeta, Any]] = collections.deque()
        self.in_flight: collections.deque[PendingStep] = collections.deque()
        self.step = 0
        self.images_seen = 0
        self.images_submitted = 0
        self.last_stats: dict[str, Any] = {}
        self.last_checkpoint_step = -1
        self.decode_errors = 0
        self.collapse = False
        self.throughput = Throughput(window_s=max(cfg.train.log_interval_s, 5.0))
        self.checkpoint_policy = CheckpointPolicy(cfg.checkpoint.every_steps, cfg.checkpoint.every_seconds)
        self.last_relist = 0.0
        self.started = time.time()
        self.metrics_port = 0

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        cfg = self.cfg
        init_ray(cfg)
        n_actors, learner_gpus, learner_cpus = cluster_plan(cfg)
        if cfg.metrics.enabled:
            try:
                self.metrics_port = self.metrics.start_server(cfg.metrics.host, cfg.metrics.port)
            except OSError as err:
                raise ConfigError(f"metrics.port: cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port} "
                                  f"({err.strerror or err}); choose another port, or 0 for any free one") from err
            log.info("metrics at http://%s:%d/metrics", cfg.metrics.host, self.metrics_port)
        if any(url.startswith("s3://") for url in (cfg.data.shards, cfg.checkpoint.dir)):
            log.info("object storage: %s", describe_storage(cfg.storage))
        shards = self.source.list_shards()
        if not shards and not cfg.data.follow:
            raise ValueError(f"data.shards: no shards found for {cfg.data.shards!r}")
        log.info("%d shards at start%s", len(shards), " (following for more)" if cfg.data.follow else "")
        self.delivered.add_shards(shards)
        self.submitted.add_shards(shards)
        self.last_relist = time.time()

        world = cfg.train.learners
        config_dict = cfg.to_dict()
        self.learners = [LearnerActor.options(num_gpus=learner_gpus, num_cpus=learner_cpus,
                                              max_restarts=0).remote(config_dict, rank, world)
                         for rank in range(world)]
        master_addr, master_port = ray.get(self.learners[0].address.remote()) if world > 1 else (None, None)
        devices = ray.get([lrn.setup.remote(master_addr, master_port) for lrn in self.learners])
        log.info("%d learner(s) on %s; %d decode actor(s)", world, ", ".join(devices), n_actors)
        self.metrics.set_actors_up(learners=world, decode_actors=n_actors)

        self.resume()
        self.slots = [DecodeSlot(index=i) for i in range(n_actors)]
        for slot in self.slots:
            self.spawn(slot)

    def resume(self) -> None:
        latest = ckpt.read_latest(self.cfg.checkpoint.dir, self.cfg.storage)
        if latest is None:
            return
        state = ckpt.load_checkpoint(self.cfg.checkpoint.dir, self.cfg.storage)
        cursor_state = state.pop("stream_cursor")
        other_ranks = state.pop("other_ranks", [])
        state.pop("config", None)
        if len(other_ranks) + 1 != len(self.learners):
            log.warning("checkpoint has %d learner(s), this run %d: queues of new ranks start empty",
                        len(other_ranks) + 1, len(self.learners))
        refs = []
        for rank, learner in enumerate(self.learners):
            rank_state = dict(state)
            if rank > 0:
                if rank - 1 < len(other_ranks):
                    rank_state.update(other_ranks[rank - 1])
                else:
                    # A rank new to this checkpoint keeps its own fresh queue and random streams.
                    for key in ("queue", "cpu_rng", "augment_rng", "cuda_rng"):
                        rank_state.pop(key, None)
            refs.append(learner.load_state.remote(rank_state))
        steps = ray.get(refs)
        self.step = int(steps[0])
        self.images_seen = self.images_submitted = int(state["images_seen"])
        self.delivered.load_state_dict(cursor_state)
        self.submitted.load_state_dict(cursor_state)
        # Shards listed now but not in the checkpoint (a growing bucket) join the current pass.
        current = self.source.list_shards()
        self.delivered.add_shards(current)
        self.submitted.add_shards(current)
        self.last_checkpoint_step = self.step
        self.checkpoint_policy.mark(self.step, time.time())
        self.metrics.observe_checkpoint(step=self.step, wall_time=float(latest["wall_time"]), duration_s=0.0,
                                        size_bytes=int(latest.get("state_bytes", 0)) + int(latest.get("backbone_bytes", 0)),
                                        saved_now=False)
        log.info("resumed from %s: step %d, %d images seen", latest.get("state"), self.step, self.images_seen)

    def spawn(self, slot: DecodeSlot) -> None:
        slot.handle = DecodeActor.options(num_cpus=1, max_restarts=0).remote(self.cfg.to_dict(), slot.index)
        slot.pid = ray.get(slot.handle.pid.remote())
        slot.shards = set()
        slot.pending.clear()
        slot.exhausted = False

    # ------------------------------------------------------------ data plane
    def feed_decoders(self) -> None:
        cfg = self.cfg
        if cfg.data.follow and time.time() - self.last_relist >= cfg.data.relist_interval_s:
            new = self.source.relist()
            if new:
                log.info("follow: %d new shard(s)", len(new))
                self.delivered.add_shards(new)
                self.submitted.add_shards(new)
            self.last_relist = time.time()
        for slot in self.slots:
            while len(slot.shards) < cfg.data.open_shards_per_actor:
                task = self.delivered.next_task()
                if task is None:
                    break
                slot.shards.add(task.shard_id)
                slot.handle.assign.remote(task)
                slot.assigned += 1
                slot.exhausted = False
        # Backpressure: decoded batches waiting anywhere (in an actor's queue, in the object store, or ready
        # for a learner) are bounded, so a slow learner slows the readers and the object store never fills.
        # The bound is per actor too, so one slow reader holds only its own share.
        capacity = len(self.slots) * cfg.data.inflight_batches_per_actor + 2 * len(self.learners)
        outstanding = sum(len(slot.pending) for slot in self.slots) + self.ready_batches()
        for slot in sorted(self.slots, key=lambda s: len(s.pending)):
            if slot.exhausted or outstanding >= capacity:
                continue
            while len(slot.pending) < cfg.data.inflight_batches_per_actor and outstanding < capacity:
                meta_ref, batch_ref = slot.handle.next_batch.remote(cfg.train.batch_size)
                slot.pending.append((meta_ref, batch_ref, slot.assigned))
                outstanding += 1

    def collect_batches(self, timeout: float) -> None:
        heads = {slot.pending[0][0]: slot for slot in self.slots if slot.pending}
        if not heads:
            time.sleep(timeout)
            return
        done, _ = ray.wait(list(heads), num_returns=1, timeout=timeout)
        for ref in done:
            slot = heads[ref]
            meta_ref, batch_ref, assigned_at_call = slot.pending.popleft()
            try:
                meta = ray.get(meta_ref)
            except (RayActorError, RayTaskError) as err:
                self.restart(slot, err)
                continue
            if meta is None:
                # An actor answers calls in order: an empty answer to a call made before a later
                # assignment says nothing about that shard, and the calls made after it go on.
                if assigned_at_call == slot.assigned:
                    slot.exhausted = True
                continue
            self.delivered.advance(meta.progress, meta.finished)
            slot.shards.difference_update(meta.finished)
            self.metrics.count_decode_errors(meta.errors)
            self.decode_errors += sum(meta.errors.values())
            self.metrics.count_reads(bytes_read=meta.bytes_read, shards_completed=len(meta.finished))
            # Empty batches still carry finished shards; they queue too, so the submitted cursor
            # takes them in delivery order, never ahead of the same worker's untrained batches.
            self.ready.append((meta, batch_ref))

    def ready_batches(self) -> int:
        """Decoded batches with samples waiting for a learner (empty ones only carry bookkeeping)."""
        return sum(1 for meta, _ in self.ready if meta.size)

    def restart(self, slot: DecodeSlot, err: Exception) -> None:
        """A decode actor died: a new one re-reads its shards from what was delivered."""
        log.warning("decode actor %d (pid %d) failed: %s; restarting it", slot.index, slot.pid,
                    str(err).splitlines()[0] if str(err) else type(err).__name__)
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:  # noqa: BLE001 — already gone
            pass
        for shard_id in slot.shards:
            self.delivered.release(shard_id)
        slot.restarts += 1
        self.metrics.count_decode_actor_restarts()
        self.spawn(slot)

    # --------------------------------------------------------------- learners
    def budget_left(self) -> bool:
        cfg = self.cfg.train
        if cfg.image_budget and self.images_submitted >= cfg.image_budget:
            return False
        if cfg.time_budget_s and time.time() - self.started >= cfg.time_budget_s:
            return False
        return True

    def submit_steps(self) -> None:
        world = len(self.learners)
        while True:
            while self.ready and self.ready[0][0].size == 0:
                meta, _ = self.ready.popleft()
                self.submitted.advance(meta.progress, meta.finished)
            if not (self.ready_batches() >= world and len(self.in_flight) < 2 and self.budget_left()
                    and not self.stop_event.is_set()):
                return
            batches = []
            while len(batches) < world:
                meta, ref = self.ready.popleft()
                if meta.size == 0:
                    self.submitted.advance(meta.progress, meta.finished)
                else:
                    batches.append((meta, ref))
            refs = [lrn.train_step.remote(batch_ref) for lrn, (_, batch_ref) in zip(self.learners, batches)]
            images = sum(meta.size for meta, _ in batches)
            for meta, _ in batches:
                self.submitted.advance(meta.progress, meta.finished)
            keys = [k for meta, _ in batches for k in meta.keys]
            self.in_flight.append(PendingStep(refs=refs, images=images, keys=keys))
            self.images_submitted += images

    def finish_step(self, timeout: float) -> bool:
        if not self.in_flight:
            return False
        head = self.in_flight[0]
        done, _ = ray.wait(head.refs, num_returns=len(head.refs), timeout=timeout)
        if len(done) < len(head.refs):
            return False
        self.in_flight.popleft()
        results = ray.get(head.refs)
        self.on_step(results, head)
        return True

    def on_step(self, results: list[dict[str, Any]], step: PendingStep) -> None:
        stats = results[0]
        self.step = int(stats["step"])
        self.images_seen = int(stats["images_seen"])
        self.last_stats = stats
        self.trained_keys_hook(step.keys)
        self.throughput.add(step.images)
        self.usage.update_from_counts(np.asarray(stats["prototype_counts"], dtype=np.int64))
        perplexity, unused = self.usage.perplexity(), self.usage.unused()
        input_wait = max(r["input_wait_ratio"] for r in results)
        self.metrics.observe_step(images=step.images, images_seen=self.images_seen, loss=stats["loss"],
                                  learning_rate=stats["lr"])
        self.metrics.set_throughput(images_per_second=self.throughput.rate(), input_wait_ratio=input_wait)
        self.metrics.set_batches_in_flight(sum(len(s.pending) for s in self.slots) + self.ready_batches()
                                           + sum(len(p.refs) for p in self.in_flight))
        if "gpu_memory_allocated_bytes" in stats:
            self.metrics.set_gpu_memory(allocated_bytes=int(stats["gpu_memory_allocated_bytes"]),
                                        reserved_bytes=int(stats["gpu_memory_reserved_bytes"]))
        threshold, after_images = collapse_settings(self.cfg.metrics, self.cfg.model.prototypes,
                                                    self.cfg.optim.warmup_images)
        alarm = collapse_alarm(loss=stats["loss"], log_k=math.log(self.cfg.model.prototypes), perplexity=perplexity,
                               threshold_perplexity=threshold, images_seen=self.images_seen,
                               after_images=after_images)
        if alarm and not self.collapse:
            log.warning("collapse alarm: loss %.4f vs ln(K) %.4f, prototype perplexity %.1f of %d",
                        stats["loss"], math.log(self.cfg.model.prototypes), perplexity, self.cfg.model.prototypes)
        self.collapse = alarm
        self.metrics.set_swav_health(queue_fill_ratio=stats["queue_fill"], prototype_perplexity=perplexity,
                                     prototypes_unused=unused, sinkhorn_marginal_error=stats["marginal_error"],
                                     collapse=alarm)
        if stats["nonfinite"]:
            self.metrics.count_nonfinite_loss()
            if stats["nonfinite_in_row"] >= self.cfg.train.max_nonfinite_in_row:
                raise TrainingStopped(
                    f"{int(stats['nonfinite_in_row'])} non-finite losses in a row (train.max_nonfinite_in_row="
                    f"{self.cfg.train.max_nonfinite_in_row}); stopping without a new checkpoint, the last good one "
                    f"is step {self.last_checkpoint_step}")

    def trained_keys_hook(self, keys: list[str]) -> None:
        """Overridden in tests that count exactly which samples were trained."""

    # ------------------------------------------------------------ checkpoints
    def checkpoint(self, final: bool = False) -> None:
        if self.step == self.last_checkpoint_step or self.step == 0:
            return
        start = time.time()
        others = [lrn.rank_state.remote() for lrn in self.learners[1:]]
        info = {"metrics": {k: v for k, v in self.last_stats.items() if isinstance(v, (int, float))},
                **BackboneSpec.from_config(self.cfg.model).to_record(), "final": final,
                # Consumers need crop size and normalisation without loading state.pt.
                "config": self.cfg.to_dict()}
        extra = {"stream_cursor": self.submitted.state_dict(), "config": self.cfg.to_dict()}
        try:
            saved = ray.get(self.learners[0].save_checkpoint.remote(self.cfg.checkpoint.dir, extra, others, info))
        except RayTaskError as err:
            # The previous checkpoint stays the latest; training goes on and the next one is tried on schedule.
            self.metrics.count_checkpoint_failure()
            log.error("checkpoint at step %d failed: %s", self.step, err)
            self.checkpoint_policy.mark(self.step, time.time())
            return
        self.last_checkpoint_step = saved["step"]
        self.checkpoint_policy.mark(self.step, saved["wall_time"])
        self.metrics.observe_checkpoint(step=saved["step"], wall_time=saved["wall_time"],
                                        duration_s=time.time() - start, size_bytes=saved["bytes_written"])
        log.info("checkpoint step %d (%d images) written in %.1fs: %s", saved["step"], saved["images_seen"],
                 time.time() - start, saved["step_url"])

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        self.start()
        progress = Progress(self.cfg, self.images_seen)
        last_log = time.time()
        try:
            while not self.stop_event.is_set():
                self.feed_decoders()
                self.collect_batches(timeout=0.05)
                self.submit_steps()
                while self.finish_step(timeout=0.0):
                    pass
                if not self.in_flight and not self.budget_left():
                    self.stop_reason = "budget reached"
                    break
                if self.checkpoint_policy.due(self.step, time.time()) and self.step > self.last_checkpoint_step:
                    self.drain()
                    self.checkpoint()
                if time.time() - last_log >= self.cfg.train.log_interval_s:
                    last_log = time.time()
                    self.log_progress(progress)
                if all(s.exhausted for s in self.slots) and not self.ready and not self.in_flight:
                    if not self.cfg.data.follow:
                        self.stop_reason = "stream ended"
                        break
            self.drain()
            self.log_progress(progress)
            self.checkpoint(final=True)
            log.info("stopped (%s) at step %d after %d images", self.stop_reason or "stop requested", self.step,
                     self.images_seen)
            return 0
        finally:
            progress.close()

    def drain(self) -> None:
        while self.in_flight:
            self.finish_step(timeout=1.0)

    def log_progress(self, progress: "Progress") -> None:
        s = self.last_stats
        log.info("step %d | %d images | %.1f img/s | loss %.4f | perplexity %.1f/%d | spread %.2f | input-wait %.0f%% | "
                 "decode errors %d | lr %.4g", self.step, self.images_seen, self.throughput.rate(),
                 s.get("loss", math.nan), self.usage.perplexity(), self.cfg.model.prototypes,
                 s.get("feature_spread", math.nan),
                 100 * s.get("input_wait_ratio", 0.0), self.decode_errors, s.get("lr", 0.0))
        if progress.budget or progress.time_budget:
            done, eta = progress.fraction_and_eta(self.images_seen)
            if not progress.enabled:
                log.info("progress %.1f%%, ETA %.0fs", 100 * done, eta)
        progress.update(self.images_seen)

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.stop_event.set()


class Throughput:
    """Images per second over a sliding time window."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.events: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, images: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.events.append((now, images))
        # Keep two events at least, so slow steps (longer than the window) still give a rate.
        while len(self.events) > 2 and now - self.events[0][0] > self.window_s:
            self.events.popleft()

    def rate(self) -> float:
        if len(self.events) < 2:
            return 0.0
        span = self.events[-1][0] - self.events[0][0]
        return sum(n for _, n in list(self.events)[1:]) / span if span > 0 else 0.0


class Progress:
    """A one-line progress bar with ETA on stderr, shown when a budget is set."""

    def __init__(self, cfg: Config, start_images: int) -> None:
        self.budget = cfg.train.image_budget
        self.time_budget = cfg.train.time_budget_s
        # A bar redrawn with carriage returns only makes sense on a terminal; logs get the ETA instead.
        self.enabled = cfg.train.progress_bar and bool(self.budget or self.time_budget) and sys.stderr.isatty()
        self.start = time.time()
        self.start_images = start_images

    def fraction_and_eta(self, images: int) -> tuple[float, float]:
        elapsed = time.time() - self.start
        fractions = []
        if self.budget:
            fractions.append(images / self.budget)
        if self.time_budget:
            fractions.append(elapsed / self.time_budget)
        done = min(max(fractions), 1.0) if fractions else 0.0
        eta = (elapsed / done - elapsed) if done > 0 else math.inf
        return done, eta

    def update(self, images: int) -> None:
        if not self.enabled:
            return
        done, eta = self.fraction_and_eta(images)
        rate = (images - self.start_images) / max(time.time() - self.start, 1e-9)
        bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
        sys.stderr.write(f"\r[{bar}] {100 * done:5.1f}% {images} images {rate:.1f} img/s ETA {eta:6.0f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def train(cfg: Config) -> int:
    """`stream-swav train`: run until a budget, the end of a finite stream, or SIGTERM/SIGINT."""
    trainer = Trainer(cfg)
    # ray.init installs its own SIGTERM handler (an immediate exit, no checkpoint): start Ray first
    # so that ours replaces it.
    init_ray(cfg)
    previous = {}

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: finishing the current step and writing a final checkpoint",
                 signal.Signals(signum).name)
        trainer.request_stop(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        return trainer.run()
    except TrainingStopped as err:
        log.error("%s", err)
        return 3
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        trainer.metrics.stop_server()
        if ray.is_initialized():
            ray.shutdown()
