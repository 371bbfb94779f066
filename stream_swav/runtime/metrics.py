"""Prometheus metrics for the trainer, plus the pure collapse signals they report.

Every family is named ``stream_swav_<what>[_<unit>]``: counters end in
``_total``, units are spelled out (``_seconds``, ``_bytes``, ``_ratio``). Each
``Metrics`` owns its registry, so several can live in one process (tests, an
evaluator next to a trainer) without clashing on the global default registry.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from collections import deque
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from stream_swav.config import MetricsConfig

PREFIX = "stream_swav_"

# Decode-error reasons become label values; past this many distinct ones the
# rest are folded into "other" so a misbehaving reader cannot explode the series count.
MAX_DECODE_ERROR_REASONS = 32



class _Server:
    """A running exposition endpoint that can be stopped again (tests, clean shutdown)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        if self._httpd is not None:
            raise RuntimeError(f"metrics server already listening on port {self._httpd.server_address[1]}")
        # addr=host binds that interface only; the default would be every interface.
        self._httpd, self._thread = start_http_server(port, addr=host, registry=self._registry)
        return int(self._httpd.server_address[1])

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._httpd, self._thread = None, None


class _Exporter:
    """A registry of stream_swav_* families and the HTTP server that exposes it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._server = _Server(self.registry)

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(PREFIX + name, doc, labelnames=labels, registry=self.registry)

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(PREFIX + name, doc, registry=self.registry)

    def family_names(self) -> tuple[str, ...]:
        """Every family this exporter registers, named as PromQL sees it (counters with _total)."""
        return tuple(family.name + ("_total" if family.type == "counter" else "")
                     for family in self.registry.collect())

    def start_server(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 picks a free port); returns the bound port."""
        return self._server.start(host, port)

    def stop_server(self) -> None:
        self._server.stop()


class Metrics(_Exporter):
    """The trainer's families, updated by the driver from learner and reader reports."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._clock = clock
        # Until the first checkpoint, its age counts from start-up, so a run that
        # never manages to save still trips an age alert.
        self._last_checkpoint_time = clock()
        self._decode_error_reasons: set[str] = set()
        counter, gauge = self._counter, self._gauge

        self._images_trained = counter("images_trained", "Images trained on by this process.")
        self._steps = counter("steps", "Optimizer steps applied by this process.")
        self._images_seen = gauge("images_seen", "Images seen by the run, including those before a resume.")
        self._images_per_second = gauge("images_per_second", "Training throughput over the last log interval.")
        self._loss = gauge("loss", "SwAV swapped-prediction loss of the latest step.")
        self._learning_rate = gauge("learning_rate", "Learning rate of the latest step.")
        self._queue_fill_ratio = gauge("queue_fill_ratio", "Fraction of the feature queue holding features.")
        self._prototype_perplexity = gauge("prototype_perplexity",
                                           "exp(entropy) of argmax prototype assignments over the usage window.")
        self._prototypes_unused = gauge("prototypes_unused", "Prototypes given no argmax assignment in the window.")
        self._sinkhorn_marginal_error = gauge("sinkhorn_marginal_error",
                                              "Max deviation of the code marginals from their targets.")
        self._feature_spread = gauge("feature_spread",
                                     "Spread of the batch's unit embeddings (about 1 spread out, 0 collapsed).")
        self._score_spread = gauge("prototype_score_spread",
                                   "Std over prototypes of the cosine scores, batch mean (0: no prototype tells "
                                   "images apart).")
        self._input_wait_ratio = gauge("input_wait_ratio",
                                       "Fraction of the latest chunk the pacing learner spent waiting for batches.")
        # Counters, so that any window's wait fraction is d(wait) / (d(wait) + d(busy)) between two scrapes.
        self._input_wait_seconds = counter("input_wait_seconds", "Seconds the pacing learner waited for batches.")
        self._learner_busy_seconds = counter("learner_busy_seconds", "Seconds the pacing learner spent stepping.")
        self._nonfinite_loss = counter("nonfinite_loss", "Steps skipped because the loss was NaN or infinite.")
        self._collapse_alarm = gauge("collapse_alarm", "1 while the collapse heuristics fire, else 0.")
        self._gpu_memory_allocated = gauge("gpu_memory_allocated_bytes", "CUDA memory held by tensors.")
        self._gpu_memory_reserved = gauge("gpu_memory_reserved_bytes",
                                          "CUDA memory reserved by the caching allocator.")
        self._learners = gauge("learners", "Learners training now (an elastic group's size changes).")
        self._learners_target = gauge("learners_target", "Learners wanted (train.learners).")
        self._resizes = counter("resizes", "Times an elastic learner group shrank or grew, by direction.",
                                ("direction",))
        for direction in ("shrink", "grow"):
            self._resizes.labels(direction=direction)
        self._rollback_steps = counter("rollback_steps", "Global steps trained again after a learner failure "
                                       "(back to a checkpoint); 0 while survivors carry on.")
        self._decode_actors_up = gauge("decode_actors_up", "Decode actors alive.")
        self._decode_errors = counter("decode_errors", "Samples skipped by the readers, by reason.", ("reason",))
        self._curation_dropped = counter("curation_dropped", "Samples decoded and dropped by curation, by reason "
                                         "(duplicate: a repeat; balance: skipped as over-represented, "
                                         "curation.resample_min_shows); they count as read, never as trained.",
                                         ("reason",))
        # Served from the start (at 0), so that rate() over a run with nothing dropped yet is 0, not absent.
        for reason in ("duplicate", "balance"):
            self._curation_dropped.labels(reason=reason)
        self._curation_replays = counter("curation_replays", "Replays of images read before (curation.balance_mode "
                                         "resample), by outcome: trained (counted in images trained, not read), or "
                                         "missed (the decode actor had forgotten the image, or its requests were full).",
                                         ("outcome",))
        for outcome in ("trained", "missed"):
            self._curation_replays.labels(outcome=outcome)
        self._curation_seen_hashes = gauge("curation_seen_hashes",
                                           "Hashes held by the fullest decode actor's seen-set (curation.dedup; "
                                           "at most curation.seen_capacity).")
        self._decode_actor_restarts = counter("decode_actor_restarts", "Decode actors restarted after a failure, "
                                              "launched again, or back after being dropped.")
        self._learner_restarts = counter("learner_restarts",
                                         "Failures counted against train.max_failures (a learner group lost, or a storage "
                                         "error listing shards or reading checkpoints), each followed by a restart from "
                                         "the latest checkpoint unless it ends the run.")
        self._shards_completed = counter("shards_completed", "Shards read to the end.")
        self._bytes_read = counter("bytes_read", "Shard bytes read from storage.")
        self._batches_in_flight = gauge("object_store_batches_in_flight",
                                        "Crop batches in Ray's object store not yet trained on.")
        self._checkpoint_age = gauge("checkpoint_age_seconds", "Seconds since the last completed checkpoint.")
        self._checkpoint_age.set_function(lambda: self._clock() - self._last_checkpoint_time)
        self._checkpoint_duration = gauge("checkpoint_duration_seconds", "Wall time of the last checkpoint save.")
        self._checkpoint_size = gauge("checkpoint_size_bytes", "Bytes written by the last checkpoint save.")
        self._last_checkpoint_step = gauge("last_checkpoint_step", "Step of the last completed checkpoint.")
        self._checkpoints_saved = counter("checkpoints_saved", "Checkpoints completed by this process.")
        self._checkpoint_failures = counter("checkpoint_failures", "Checkpoint saves that raised.")

    def observe_steps(self, *, steps: int, images: int, images_seen: int, loss: float, learning_rate: float) -> None:
        """`steps` optimizer steps over `images` images (all learners together); the last step's figures."""
        self.count_steps(steps=steps, images=images, images_seen=images_seen)
        self._loss.set(loss)
        self._learning_rate.set(learning_rate)

    def count_steps(self, *, steps: int, images: int, images_seen: int) -> None:
        """`steps` optimizer steps over `images` images (all learners together), without figures."""
        self._steps.inc(steps)
        self._images_trained.inc(images)
        self._images_seen.set(images_seen)

    def count_nonfinite_loss(self, steps: int = 1) -> None:
        self._nonfinite_loss.inc(steps)

    def set_throughput(self, *, images_per_second: float, input_wait_ratio: float, input_wait_s: float,
                       busy_s: float) -> None:
        """The latest rate and chunk's wait fraction; the chunk's wait and busy seconds add to the counters."""
        self._images_per_second.set(images_per_second)
        self._input_wait_ratio.set(input_wait_ratio)
        self._input_wait_seconds.inc(input_wait_s)
        self._learner_busy_seconds.inc(busy_s)

    def set_swav_health(self, *, queue_fill_ratio: float, prototype_perplexity: float, prototypes_unused: int,
                        sinkhorn_marginal_error: float, feature_spread: float, score_spread: float,
                        collapse: bool) -> None:
        self._feature_spread.set(feature_spread)
        self._score_spread.set(score_spread)
        self._queue_fill_ratio.set(queue_fill_ratio)
        self._prototype_perplexity.set(prototype_perplexity)
        self._prototypes_unused.set(prototypes_unused)
        self._sinkhorn_marginal_error.set(sinkhorn_marginal_error)
        self._collapse_alarm.set(1 if collapse else 0)

    def set_gpu_memory(self, *, allocated_bytes: int, reserved_bytes: int) -> None:
        self._gpu_memory_allocated.set(allocated_bytes)
        self._gpu_memory_reserved.set(reserved_bytes)

    def set_actors_up(self, *, learners: int | None = None, decode_actors: int | None = None,
                      learners_target: int | None = None) -> None:
        if learners is not None:
            self._learners.set(learners)
        if learners_target is not None:
            self._learners_target.set(learners_target)
        if decode_actors is not None:
            self._decode_actors_up.set(decode_actors)

    def count_decode_errors(self, errors: dict[str, int]) -> None:
        """Add skipped-sample counts keyed by reason (e.g. a batch's `errors` Counter)."""
        for reason, count in errors.items():
            if reason not in self._decode_error_reasons:
                if len(self._decode_error_reasons) >= MAX_DECODE_ERROR_REASONS:
                    reason = "other"
                self._decode_error_reasons.add(reason)
            self._decode_errors.labels(reason=reason).inc(count)

    def count_curation(self, dropped: dict[str, int], seen_hashes: int | None) -> None:
        """Samples dropped by curation by reason, and the fullest seen-set's size (None: no dedup)."""
        for reason, count in dropped.items():
            self._curation_dropped.labels(reason=reason).inc(count)
        if seen_hashes is not None:
            self._curation_seen_hashes.set(seen_hashes)

    def count_replays(self, trained: int, missed: int) -> None:
        self._curation_replays.labels(outcome="trained").inc(trained)
        self._curation_replays.labels(outcome="missed").inc(missed)

    def count_reads(self, *, bytes_read: int = 0, shards_completed: int = 0) -> None:
        self._bytes_read.inc(bytes_read)
        self._shards_completed.inc(shards_completed)

    def count_decode_actor_restarts(self, restarts: int = 1) -> None:
        self._decode_actor_restarts.inc(restarts)

    def count_learner_restart(self) -> None:
        self._learner_restarts.inc()

    def count_resize(self, direction: str) -> None:
        self._resizes.labels(direction=direction).inc()

    def count_rollback_steps(self, steps: int) -> None:
        self._rollback_steps.inc(steps)

    def set_batches_in_flight(self, batches: int) -> None:
        self._batches_in_flight.set(batches)

    def observe_checkpoint(self, *, step: int, wall_time: float, duration_s: float, size_bytes: int,
                           saved_now: bool = True) -> None:
        """A checkpoint completed at unix time `wall_time`. On resume, call with latest.json's and
        `saved_now=False`: the age and step gauges start from it, the saved counter does not."""
        self._last_checkpoint_time = wall_time
        self._last_checkpoint_step.set(step)
        self._checkpoint_duration.set(duration_s)
        self._checkpoint_size.set(size_bytes)
        if saved_now:
            self._checkpoints_saved.inc()

    def count_checkpoint_failure(self) -> None:
        self._checkpoint_failures.inc()


class EvalMetrics(_Exporter):
    """Families of the evaluator that follows the checkpoint folder (k-NN probe)."""

    def __init__(self) -> None:
        super().__init__()
        gauge = self._gauge

        self._knn_top1 = gauge("eval_knn_top1_ratio", "k-NN top-1 accuracy of the last evaluated backbone.")
        self._checkpoint_step = gauge("eval_checkpoint_step", "Step of the last evaluated checkpoint.")
        self._images_seen = gauge("eval_images_seen", "Images seen by the last evaluated checkpoint.")
        self._duration = gauge("eval_duration_seconds", "Wall time of the last evaluation.")
        self._evaluations = self._counter("evaluations", "Evaluations completed.")
        self._failures = self._counter("eval_failures", "Evaluations that raised.")

    def observe_evaluation(self, *, step: int, images_seen: int, knn_top1: float, duration_s: float) -> None:
        self._knn_top1.set(knn_top1)
        self._checkpoint_step.set(step)
        self._images_seen.set(images_seen)
        self._duration.set(duration_s)
        self._evaluations.inc()

    def count_failure(self) -> None:
        self._failures.inc()


def collapse_alarm(*, feature_spread: float, score_spread: float, perplexity: float, settings: "CollapseSettings",
                   images_seen: int) -> bool:
    """True when training looks collapsed, after warm-up: the batch's embeddings have (almost) no
    spread left (every image maps to about the same point), no prototype scores an image
    differently from another (embeddings orthogonal to every prototype: the loss stays at ln(K)
    with no gradient out), or the network's preferred prototypes have shrunk to a handful. The
    loss alone is no sign: a healthy run starts at ln(K) too.

    Non-finite inputs never raise the alarm; non-finite steps have their own counter.
    """
    if images_seen < settings.after_images:
        return False
    no_spread = math.isfinite(feature_spread) and feature_spread < settings.spread
    no_scores = math.isfinite(score_spread) and score_spread < settings.score_spread
    few_prototypes = math.isfinite(perplexity) and perplexity < settings.perplexity
    return no_spread or no_scores or few_prototypes


@dataclass(frozen=True)
class CollapseSettings:
    spread: float
    score_spread: float
    perplexity: float
    after_images: int

    @classmethod
    def from_config(cls, cfg: MetricsConfig, prototypes: int, warmup_images: int) -> "CollapseSettings":
        """With the config's 0 = automatic resolved: K/50 prototypes (at least 2: everything on one
        prototype must fire for small K too), after warm-up."""
        return cls(spread=cfg.collapse_spread, score_spread=cfg.collapse_score_spread,
                   perplexity=cfg.collapse_perplexity if cfg.collapse_perplexity > 0 else max(2.0, prototypes / 50.0),
                   after_images=cfg.collapse_after_images if cfg.collapse_after_images > 0 else warmup_images)


def usage_perplexity(counts: np.ndarray | list[int]) -> float:
    """exp(entropy) of prototype usage counts (K,): K when every prototype is used equally, 1 when
    everything lands on one prototype; NaN for no usage at all."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return math.nan
    p = counts[counts > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


class PrototypeUsage:
    """Argmax prototype assignments over the last `window_steps` training steps.

    Counts arrive per chunk (several steps, all learners together); the window keeps the newest
    chunks that cover `window_steps` steps (at least the newest chunk). Per-prototype totals are
    kept alongside, so reading the perplexity costs O(K) regardless of the window length.
    """

    def __init__(self, num_prototypes: int, window_steps: int) -> None:
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
        if window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}")
        self.num_prototypes = num_prototypes
        self.window_steps = window_steps
        self._chunks: deque[tuple[np.ndarray, int]] = deque()
        self._window_steps_held = 0
        self._totals = np.zeros(num_prototypes, dtype=np.int64)

    def update_from_counts(self, counts: np.ndarray | list[int], steps: int = 1) -> None:
        """Add the assignment count per prototype of `steps` steps (a bincount made where the codes are)."""
        counts = np.asarray(counts)
        if counts.shape != (self.num_prototypes,) or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
            raise ValueError(f"counts must be {self.num_prototypes} non-negative integers, "
                             f"got shape {counts.shape} dtype {counts.dtype}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        counts = counts.astype(np.int64)
        self._chunks.append((counts, steps))
        self._totals += counts
        self._window_steps_held += steps
        while self._window_steps_held - self._chunks[0][1] >= self.window_steps:
            oldest, oldest_steps = self._chunks.popleft()
            self._totals -= oldest
            self._window_steps_held -= oldest_steps

    def perplexity(self) -> float:
        """The window's `usage_perplexity`."""
        return usage_perplexity(self._totals)

    def unused(self) -> int:
        return int((self._totals == 0).sum())


# The names dashboards, alerts and tests may use, read from the exporters themselves.
TRAINER_METRIC_NAMES: tuple[str, ...] = Metrics(clock=lambda: 0.0).family_names()
EVAL_METRIC_NAMES: tuple[str, ...] = EvalMetrics().family_names()
METRIC_NAMES: tuple[str, ...] = TRAINER_METRIC_NAMES + EVAL_METRIC_NAMES
