"""What the driver does with each chunk besides the stream bookkeeping: the Prometheus families,
the collapse alarm, the non-finite policy and the progress log."""
from __future__ import annotations

import collections
import logging
import math
import time

import numpy as np

from stream_swav.config import Config
from stream_swav.progress import ProgressLine
from stream_swav.runtime.metrics import CollapseSettings, Metrics, PrototypeUsage, collapse_alarm
from stream_swav.runtime.reports import ChunkSummary

log = logging.getLogger("stream_swav.driver")


class TrainingStopped(RuntimeError):
    """The run ended early for a reason the operator must see (e.g. non-finite losses)."""


class Throughput:
    """Images per second over a sliding time window."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.events: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, images: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.events.append((now, images))
        # Keep two events at least, so slow chunks (longer than the window) still give a rate.
        while len(self.events) > 2 and now - self.events[0][0] > self.window_s:
            self.events.popleft()

    def rate(self) -> float:
        if len(self.events) < 2:
            return 0.0
        span = self.events[-1][0] - self.events[0][0]
        return sum(n for _, n in list(self.events)[1:]) / span if span > 0 else 0.0


class RunObserver:
    def __init__(self, cfg: Config, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.usage = PrototypeUsage(cfg.model.prototypes, cfg.metrics.perplexity_window_steps)
        self.throughput = Throughput(window_s=max(cfg.train.log_interval_s, 5.0))
        self.collapse = CollapseSettings.from_config(cfg.metrics, cfg.model.prototypes, cfg.optim.warmup_images)
        self.collapsed = False
        self.last: ChunkSummary | None = None
        self.decode_errors = 0
        self.last_checkpoint_step = -1
        self.progress = ProgressLine(total=cfg.train.image_budget or None, seconds=cfg.train.time_budget_s or None,
                                     unit="images", enabled=cfg.train.progress_bar)
        self._last_log = time.monotonic()
        self._logged_step = -1

    def on_chunk(self, summary: ChunkSummary, batches_in_flight: int) -> None:
        """Metrics, alarms and the log for one chunk; raises TrainingStopped on too many non-finite
        losses in a row."""
        self.last = summary
        m = self.metrics
        progress = summary.progress
        m.count_decode_errors(progress.errors)
        self.decode_errors += sum(progress.errors.values())
        m.count_reads(bytes_read=progress.bytes_read, shards_completed=len(progress.finished))
        if summary.steps:
            self.throughput.add(summary.images)
            self.usage.update_from_counts(np.asarray(summary.prototype_counts, dtype=np.int64), summary.steps)
            m.observe_steps(steps=summary.steps, images=summary.images, images_seen=summary.images_seen,
                            loss=summary.loss, learning_rate=summary.lr)
            perplexity = self.usage.perplexity()
            alarm = collapse_alarm(feature_spread=summary.feature_spread, score_spread=summary.score_spread,
                                   perplexity=perplexity, settings=self.collapse, images_seen=summary.images_seen)
            if alarm and not self.collapsed:
                log.warning("collapse alarm: embedding spread %.3f (alarm below %g), score spread %.4f "
                            "(alarm below %g), prototype perplexity %.1f of %d (alarm below %g); loss %.4f",
                            summary.feature_spread, self.collapse.spread, summary.score_spread,
                            self.collapse.score_spread, perplexity, self.cfg.model.prototypes,
                            self.collapse.perplexity, summary.loss)
            self.collapsed = alarm
            m.set_swav_health(queue_fill_ratio=summary.queue_fill / max(self.cfg.swav.queue_length, 1),
                              prototype_perplexity=perplexity, prototypes_unused=self.usage.unused(),
                              sinkhorn_marginal_error=summary.marginal_error,
                              feature_spread=summary.feature_spread, score_spread=summary.score_spread,
                              collapse=alarm)
        m.set_throughput(images_per_second=self.throughput.rate(), input_wait_ratio=summary.input_wait_ratio,
                         input_wait_s=summary.wait_s, busy_s=summary.busy_s)
        m.set_batches_in_flight(batches_in_flight)
        if summary.gpu_memory_reserved_bytes:
            m.set_gpu_memory(allocated_bytes=summary.gpu_memory_allocated_bytes,
                             reserved_bytes=summary.gpu_memory_reserved_bytes)
        if summary.nonfinite:
            m.count_nonfinite_loss(summary.nonfinite)
            if summary.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
                raise TrainingStopped(
                    f"{summary.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite_in_row="
                    f"{self.cfg.train.max_nonfinite_in_row}); stopping without a new checkpoint, the last good "
                    f"one is step {self.last_checkpoint_step}")
        self.progress.update(summary.images_seen)
        if time.monotonic() - self._last_log >= self.cfg.train.log_interval_s:
            self.log_progress()

    def log_progress(self) -> None:
        self._last_log = time.monotonic()
        s = self.last
        if s is None or s.step == self._logged_step:
            return
        self._logged_step = s.step
        log.info("step %d | %d images | %.1f img/s | loss %.4f | perplexity %.1f/%d | spread %.2f | scores %.3f "
                 "| input-wait %.0f%% | decode errors %d | lr %.4g", s.step, s.images_seen, self.throughput.rate(),
                 s.loss, self.usage.perplexity(), self.cfg.model.prototypes, s.feature_spread, s.score_spread,
                 100 * s.input_wait_ratio, self.decode_errors, s.lr)
        if not self.progress.interactive:
            line = self.progress.describe(s.images_seen)
            if line:
                log.info("progress %s", line)

    def close(self) -> None:
        self.progress.close()


__all__ = ["RunObserver", "Throughput", "TrainingStopped"]
