"""What the run reports as it goes: the Prometheus families, the collapse alarm, the progress log
and the log lines of actors, checkpoints, resumes and failures.

The driver calls one hook per event (`on_actors_up`, `on_chunk`, `on_checkpoint`,
`on_checkpoint_failed`, `on_resume`, `on_failure`); the hooks only record and report, they decide
nothing about the run."""
from __future__ import annotations

import collections
import logging
import math
import time

import numpy as np

from stream_swav.checkpoint import CheckpointInfo, ResumePoint
from stream_swav.config import Config, changed_settings
from stream_swav.progress import ProgressLine
from stream_swav.runtime.metrics import CollapseSettings, Metrics, PrototypeUsage, collapse_alarm
from stream_swav.runtime.reports import ChunkSummary, Progress

log = logging.getLogger("stream_swav.driver")


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


# The setting that decides a skip reason, where one does.
SKIP_REASON_KEYS = {"too-small": "data.min_side", "too-large": "data.max_pixels",
                    "too-many-bytes": "data.max_sample_bytes",
                    "shard-bytes-limit": "data.max_shard_bytes / data.max_expansion"}


class RunObserver:
    def __init__(self, cfg: Config, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.usage = PrototypeUsage(cfg.model.prototypes, cfg.metrics.perplexity_window_steps)
        self.throughput = Throughput(window_s=max(cfg.train.log_interval_s, 5.0))
        self.collapse = CollapseSettings.from_config(cfg.metrics, cfg.model.prototypes, cfg.optim.warmup_images)
        self.collapsed = False
        self.decode_errors = 0
        self.decode_error_reasons: collections.Counter = collections.Counter()
        # Images dropped by curation so far, by reason (duplicate, balance).
        self.curation_dropped: collections.Counter = collections.Counter()
        self.replayed = 0
        self.replays_missed = 0
        # Whether the stream was found to carry classes the label balance has no room for (said once).
        self.classes_beyond_balance = False
        self.progress = ProgressLine(total=cfg.train.image_budget or None, seconds=cfg.train.time_budget_s or None,
                                     unit="images", enabled=cfg.train.progress_bar)
        self._last_log = time.monotonic()
        self._logged_step = -1

    def on_actors_up(self, learners: int, devices: list[str], decode_actors: int) -> None:
        self.metrics.set_actors_up(learners=learners, decode_actors=decode_actors,
                                   learners_target=self.cfg.train.learners)
        log.info("%d learner(s) on %s; %d decode actor(s)", learners, ", ".join(devices), decode_actors)

    def on_chunk(self, summary: ChunkSummary, decode_actors_replaced: int, decode_actors: int) -> None:
        """Metrics, alarms and the log for one chunk, after which `decode_actors_replaced` decode
        actors were replaced or regained (slots given up on are not) and `decode_actors` are up."""
        m = self.metrics
        m.count_decode_actor_restarts(decode_actors_replaced)
        m.set_actors_up(decode_actors=decode_actors)
        self._count_progress(summary.progress)
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
        m.set_batches_in_flight(summary.batches_held)
        if summary.gpu_memory_reserved_bytes:
            m.set_gpu_memory(allocated_bytes=summary.gpu_memory_allocated_bytes,
                             reserved_bytes=summary.gpu_memory_reserved_bytes)
        if summary.nonfinite:
            m.count_nonfinite_loss(summary.nonfinite)
        self.progress.update(summary.images_seen)
        if time.monotonic() - self._last_log >= self.cfg.train.log_interval_s:
            self.log_progress(summary)

    def on_checkpoint(self, saved: CheckpointInfo, duration_s: float) -> None:
        """A checkpoint written by this run, `duration_s` after the driver asked for it."""
        self.metrics.observe_checkpoint(step=saved.step, wall_time=saved.wall_time, duration_s=duration_s,
                                        size_bytes=saved.bytes_written)
        log.info("checkpoint step %d (%d images) written in %.1fs: %s", saved.step, saved.images_seen, duration_s,
                 saved.step_url)

    def on_checkpoint_failed(self, step: int, cause: str) -> None:
        """A save that failed; the previous checkpoint stays the latest."""
        self.metrics.count_checkpoint_failure()
        log.error("checkpoint at step %d failed: %s", step, cause)

    def on_resume(self, point: ResumePoint, step: int, images_seen: int) -> None:
        """The learners were restored from `point`: the checkpoint gauges start from it."""
        for url, why in point.skipped:
            log.warning("skipped checkpoint %s: it does not load (%s); resuming from an older one", url, why)
        record = point.record
        size = record.get("state_bytes", 0) + record.get("backbone_bytes", 0)
        # Types are checked where present (`checkpoint._check_record`); a record without a time is taken as now.
        self.metrics.observe_checkpoint(step=step, wall_time=float(record.get("wall_time", time.time())),
                                        duration_s=0.0,
                                        size_bytes=size, saved_now=False)
        log.info("resumed from %s: step %d, %d images seen", point.url, step, images_seen)
        changes = changed_settings(record.get("config"), self.cfg)
        if changes:
            # What the learners hold (network, codes, queue, optimiser) is what a change can affect.
            saved = {key: old for key, old, _ in changes}
            swav = self.cfg.swav
            # As `LearnerState.load_state_dict` has it: a saved queue of another shape is not loaded.
            queue_emptied = swav.queue_length > 0 and (
                saved.get("swav.queue_length", swav.queue_length) != swav.queue_length
                or len(saved.get("swav.crops_for_assign", swav.crops_for_assign)) != len(swav.crops_for_assign))
            log.log(logging.WARNING if any(key.split(".")[0] in ("model", "swav", "optim") for key in saved)
                    else logging.INFO, "settings changed since checkpoint step %d was saved: %s%s", step,
                    "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes),
                    "; the feature queue starts empty" if queue_emptied else "")

    def on_failure(self, restarts: int, cause: str) -> None:
        """The learner group failed, for the `restarts`-th time in this run."""
        self.metrics.count_learner_restart()
        log.error("learner failure %d (train.max_failures=%d): %s", restarts, self.cfg.train.max_failures, cause)

    def _count_progress(self, progress: Progress) -> None:
        """The reader-side counters of what a chunk trained."""
        m = self.metrics
        m.count_decode_errors(progress.errors)
        self.decode_errors += sum(progress.errors.values())
        self.decode_error_reasons.update(progress.errors)
        if progress.dropped or (self.cfg.curation.dedup and progress.seen_hashes):
            # A chunk that trained no batch knows nothing of the seen-sets: the gauge keeps its value.
            m.count_curation(progress.dropped, progress.seen_hashes if self.cfg.curation.dedup else None)
            self.curation_dropped.update(progress.dropped)
        if progress.replayed or progress.replays_missed:
            m.count_replays(progress.replayed, progress.replays_missed)
            self.replayed += progress.replayed
            self.replays_missed += progress.replays_missed
        m.count_reads(bytes_read=progress.bytes_read, shards_completed=len(progress.finished))
        curation = self.cfg.curation
        if (curation.balance > 0 and curation.balance_signal == "label" and not self.classes_beyond_balance
                and progress.max_label >= curation.balance_classes):
            # Such images are left alone (weight 1, shown once) as unlabelled ones are: a balance
            # that silently covers only part of the stream's classes must be said.
            self.classes_beyond_balance = True
            log.warning("the stream carries class %d, beyond curation.balance_classes=%d: images of classes from "
                        "%d on are not balanced (left alone as unlabelled ones are, skipped with them when "
                        "skipping); set curation.balance_classes above the stream's highest class (a resume keeps "
                        "the estimate)", progress.max_label, curation.balance_classes, curation.balance_classes)

    def on_shrink(self, failures: int, cause: str, *, learners: int, step: int, adopted: int,
                  decode_actors: int, progress: Progress, steps: int, images: int, images_seen: int) -> None:
        """An elastic group lost members and went on with `learners` survivors from `step`, nothing
        rolled back; `adopted` survivors were a step behind and took the leader's state. The chunk
        the loss cut short trained `steps` steps of `images` images (what `progress` says was read)."""
        self._count_progress(progress)
        if steps > 0:
            # The loss and rate gauges keep the last whole chunk's figures.
            self.metrics.count_steps(steps=steps, images=images, images_seen=images_seen)
        self.metrics.count_resize("shrink")
        self.metrics.set_actors_up(learners=learners, decode_actors=decode_actors)
        log.error("learner failure %d (train.max_failures=%d): %s", failures, self.cfg.train.max_failures, cause)
        log.warning("going on with %d of %d learner(s) from step %d: no checkpoint read, nothing trained again%s",
                    learners, self.cfg.train.learners, step,
                    f" ({adopted} survivor(s) a step behind took the leader's state)" if adopted else "")

    def on_grow(self, joined: int, *, learners: int, decode_actors: int) -> None:
        self.metrics.count_resize("grow")
        self.metrics.set_actors_up(learners=learners, decode_actors=decode_actors)
        log.info("%d learner(s) joined: training with %d of %d", joined, learners, self.cfg.train.learners)

    def on_stall(self, seconds: float, shards_held: dict[int, int], shards_listed: int, paused_s: float) -> None:
        """No step trained for `seconds`; `shards_held`: learner rank -> shards its decode actors hold;
        `paused_s`: how long shards are still held back after passes that read nothing."""
        if not shards_listed:
            why = "no shard listed yet (data.follow waits for new ones)"
        elif paused_s > 0:
            why = (f"no shard handed out for another {paused_s:.0f}s: the last pass read nothing (every read "
                   f"failed, see stream_swav_decode_errors_total)")
        else:
            why = "shards held for each learner: " + ", ".join(
                f"learner {rank}: {count}" for rank, count in sorted(shards_held.items()))
        log.warning("no step trained for %.0fs: the learners wait for batches (a step needs one on every learner); "
                    "%s; decode errors so far %d%s", seconds, why, self.decode_errors, self._top_reasons())

    def _top_reasons(self) -> str:
        """The commonest skip reasons, each with the setting that decides it: a stream whose every
        image is refused by a limit stalls with nothing else to say why."""
        if not self.decode_error_reasons:
            return ""
        top = self.decode_error_reasons.most_common(3)
        return " (" + ", ".join(f"{reason} {count}" + (f": {SKIP_REASON_KEYS[reason]}" if reason in SKIP_REASON_KEYS
                                                        else "") for reason, count in top) + ")"

    def on_rollback(self, steps: int) -> None:
        """A restart from a checkpoint trains these global steps again."""
        self.metrics.count_rollback_steps(steps)

    def log_progress(self, s: ChunkSummary | None) -> None:
        """The log line of the latest chunk `s` (none before the first), once per step."""
        self._last_log = time.monotonic()
        if s is None or s.step == self._logged_step:
            return
        self._logged_step = s.step
        curation = (f" | repeats dropped {self.curation_dropped['duplicate']} | seen-set {s.progress.seen_hashes}"
                    if self.cfg.curation.dedup else "")
        if self.cfg.curation.resampling:
            curation += f" | replayed {self.replayed} (missed {self.replays_missed})"
        if self.cfg.curation.skipping:
            curation += f" | skipped {self.curation_dropped['balance']}"
        log.info("step %d | %d images | %.1f img/s | loss %.4f | perplexity %.1f/%d | spread %.2f | scores %.3f "
                 "| input-wait %.0f%% | decode errors %d%s | lr %.4g", s.step, s.images_seen, self.throughput.rate(),
                 s.loss, self.usage.perplexity(), self.cfg.model.prototypes, s.feature_spread, s.score_spread,
                 100 * s.input_wait_ratio, self.decode_errors, curation, s.lr)
        if not self.progress.interactive:
            line = self.progress.describe(s.images_seen)
            if line:
                log.info("progress %s", line)

    def close(self) -> None:
        self.progress.close()


__all__ = ["RunObserver", "Throughput"]
