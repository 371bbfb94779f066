"""The training driver: a small controller over decode actors, learners, the stream ledger and
checkpoints.

Learners pull decoded batches straight from the decode actors assigned to them
and train a chunk of steps per call (at most `train.report_interval_s`), then
report what they trained. The driver never touches a batch: per chunk it
merges one report per learner into the stream ledger (the cursor of what was
trained, which checkpoints save), hands new shard tasks to decode actors,
replaces failed ones, and decides when to checkpoint and when to stop. What
the run reports as it goes (metrics, alarms, log lines) is the observer's.

The run moves through explicit states, as Ray Train v2's controller does: `run` calls the
handler of the current state, which does that state's work and returns the next one.

  STARTING   -> RUNNING     learners and decode actors up, the latest checkpoint restored
             -> RECOVERING  a learner failed while starting, or reading the checkpoints failed
                            (a storage error: counted, read again at once, then after back-offs)
             -> DONE        stopped while waiting for the actors to come up (exit 0)
  RUNNING    -> RUNNING     a chunk trained (and a checkpoint written when one was due); an
                            elastic group below train.learners took in learners that came up,
                            or a join failed and the members formed their group again
             -> SHRINKING   members of an elastic group died or their node was lost (found in
                            a chunk, by a checkpoint that failed, or while taking in joiners)
             -> RECOVERING  a learner of a fixed-size group died or its node was lost; a learner
                            raised; in an elastic group, members could not form their group again
             -> STOPPING    budget reached or stop requested
             -> FAILED      too many non-finite losses in a row (exit 3)
  SHRINKING  -> RUNNING     the survivors go on from the last step any completed, no checkpoint read
             -> SHRINKING   below train.min_learners, a member was lost while waiting for joiners
             -> RECOVERING  none survived, the survivors could not go on, or the budget is spent
             -> FAILED      below train.min_learners for train.startup_timeout_s (counted from
                            the last loss; exit 5, after a checkpoint of the survivors)
             -> STOPPING    stop requested while below train.min_learners
  RECOVERING -> RUNNING     a new learner group, back at the latest checkpoint
             -> RECOVERING  a learner of the new group failed too, or listing the shards or the
                            checkpoints failed (a storage error; retried after a back-off)
             -> FAILED      failure budget spent (exit 1); a stop was requested and the learners
                            were lost with steps trained since the latest checkpoint (exit 4: the
                            final checkpoint cannot be written)
             -> DONE        stopped while waiting for the actors to come up, or a stop was
                            requested with nothing trained since the latest checkpoint (exit 0)
  STOPPING   -> DONE        final checkpoint written (exit 0), or not (exit 4; while the store
                            does not answer, it is tried again for 2 minutes first)
             -> SHRINKING   the final checkpoint failed because an elastic group lost a member

Usage and environment errors (`ConfigError`, `StartupError`) are raised, not states: the run
cannot be what was asked for, and `stream-swav train` exits 2 in one line. So are the checkpoint
folder's lease errors (`runtime/lease.py`): `LeaseHeld` in STARTING, when another live run holds
checkpoint.dir, and `LeaseLost` before a chunk or a save, once another run took it over.

SIGTERM (`ray job stop`) sets the stop flag. Waits for placement and start-up have a deadline
and watch the flag; a training chunk and a checkpoint save are waited for to their end (bounded by
the learners and by storage, as `LearnerGroup.run_chunk` and `LearnerGroup.save` say), so a stop
is acted on after at most one chunk (about train.report_interval_s) plus a save under way. An
elastic group's resizes are waited for too: forming a new process group, and after a loss the
survivors' answers, each bounded by train.collective_timeout_s.
"""
from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError, RayTaskError

from stream_swav import checkpoint as ckpt
from stream_swav import storage
from stream_swav.backbone_spec import BackboneSpec
from stream_swav.config import Config, ConfigError, UsageError, changed_settings
from stream_swav.curation import SeenSet
from stream_swav.data.cursor import ReadOrder, StreamCursor
from stream_swav.data.labelled import NoShardsFound, load_labeled_images
from stream_swav.data.sources import Relisting, ShardSource, spec_kind
from stream_swav.runtime.checkpointing import CheckpointPolicy
from stream_swav.runtime.cluster import StartupError, init_ray, plan_cluster, shutdown_ray
from stream_swav.runtime.decode_pool import DecodePool
from stream_swav.runtime.learner_group import (POLL_S, CheckpointRejected, Joiner, LearnerFailure, LearnerGroup,
                                                LearnersLost, Stopped, first_line, kill_quietly, unanswered)
from stream_swav.runtime.lease import Lease, LeaseLost, confirm_holder
from stream_swav.runtime.ledger import StreamLedger
from stream_swav.runtime.metrics import Metrics
from stream_swav.runtime.observers import RunObserver
from stream_swav.runtime.reports import ChunkSummary, Progress


log = logging.getLogger("stream_swav.driver")

# Exit statuses of `stream-swav train` besides 0 (done or stopped) and 2 (usage or environment).
EXIT_FAILED = 1
EXIT_NONFINITE = 3
EXIT_FINAL_CHECKPOINT_FAILED = 4
EXIT_TOO_FEW_LEARNERS = 5

# How long a checkpoint waits for the decode actors' seen-sets (curation.dedup).
SEEN_GATHER_TIMEOUT_S = 60.0

# A final checkpoint that failed because the store did not answer is tried again, after pauses
# doubling from the first, for as long as this (deploy/'s RAY_JOB_STOP_WAIT_TIME_S of 300 s leaves
# room for a few slow uploads after it): a blip at the end of a days-long run should not make a
# saved run exit 4.
FINAL_SAVE_RETRY_S = 120.0
FINAL_SAVE_FIRST_PAUSE_S = 5.0


class RunState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    SHRINKING = "shrinking"
    RECOVERING = "recovering"
    STOPPING = "stopping"
    DONE = "done"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (RunState.DONE, RunState.FAILED)


class Trainer:
    def __init__(self, cfg: Config, build_learner: Callable[..., Any] | None = None,
                 build_worker: Callable[..., Any] | None = None) -> None:
        self.cfg = cfg
        self.build_learner, self.build_worker = build_learner, build_worker
        self.state = RunState.STARTING
        self.exit_status = 0
        # Why the learner group failed, for RECOVERING.
        self.failure_cause = ""
        # Whether the last failed save failed because the store did not answer (worth another try).
        self.store_unanswered = False
        self.stop = threading.Event()
        self.stop_reason = ""
        self.metrics = Metrics()
        self.source = ShardSource(cfg.data.shards, cfg.storage)
        self.relisting = Relisting(self.source.relist, cfg.data.relist_interval_s, what=cfg.data.shards)
        # Shards retired since the last listing was applied (URL -> when, the driver's clock): one that
        # began before a shard was retired may still name it, and must not bring it back.
        self.retired_since_listing: dict[str, float] = {}
        # Each decode actor holds its open shards plus as many waiting, so it never waits for the driver.
        self.ledger = StreamLedger(cfg.data.seed, 2 * cfg.data.open_shards_per_actor, ReadOrder.of(cfg.data))
        self.policy = CheckpointPolicy(cfg.checkpoint.every_steps, cfg.checkpoint.every_seconds)
        self.group: LearnerGroup | None = None
        self.pool: DecodePool | None = None
        self.observer = RunObserver(cfg, self.metrics)
        self.step = self.images_seen = 0
        self.last_summary: ChunkSummary | None = None
        self.last_checkpoint_step = -1
        self.restarts = 0
        # Checkpoints the learners refused (absolute step-folder URL -> why): never tried again.
        self.rejected: dict[str, str] = {}
        self.metrics_port = 0
        # When the actors first came up: a time budget counts training time from there.
        self.started: float | None = None
        # The checkpoint folder's lease (checkpoint.lease_s), held from STARTING to the end.
        self.lease: Lease | None = None
        # curation.dedup: the hashes of the images trained, as of the latest checkpoint (saved with it).
        self.seen: SeenSet | None = None
        # An elastic group: the members lost (for SHRINKING), learners started to join it, when it next
        # starts more, and how many decode actors each learner gets.
        self.loss: LearnersLost | None = None
        self.joiners: list[Joiner] = []
        self.next_grow = 0.0
        self.decoders_per_learner = 1
        # Since when chunks have trained nothing, and when that was last logged (train.stall_warning_s).
        self.idle_since: float | None = None
        self.stall_logged = 0.0

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Run the handler of each state in turn until the run is DONE or FAILED; the exit status."""
        handlers: dict[RunState, Callable[[], RunState]] = {
            RunState.STARTING: self.start, RunState.RUNNING: self.train_chunk, RunState.SHRINKING: self.shrink,
            RunState.RECOVERING: self.recover, RunState.STOPPING: self.finish}
        try:
            while not self.state.is_final:
                self.state = handlers[self.state]()
            return self.exit_status
        finally:
            if self.lease is not None:
                self.lease.release()
            self.observer.close()

    # --------------------------------------------------------------- states
    def start(self) -> RunState:
        """STARTING: refuse what cannot run, take the checkpoint folder's lease, serve metrics, find
        the checkpoint to resume from and bring the actors up."""
        cfg = self.cfg
        for warning in cfg.warnings():
            log.warning("%s", warning)
        if not ray.is_initialized():
            log.info("%s", init_ray())
        if cfg.checkpoint.lease_s:
            # First: a job submitted twice is refused for the folder, not for the metrics port it
            # shares with the first, and before it reads a checkpoint.
            lease = Lease(cfg.checkpoint.dir, cfg.storage, cfg.checkpoint.lease_s)
            if not lease.acquire(self.stop):
                log.info("stopped (%s) while waiting for the checkpoint folder's lease", self.stop_reason)
                return RunState.DONE
            self.lease = lease
        if cfg.metrics.enabled:
            try:
                self.metrics_port = self.metrics.start_server(cfg.metrics.host, cfg.metrics.port)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise ConfigError(f"metrics.port: cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port} "
                                      f"({err.strerror or err}); choose another port, or 0 for any free one") from err
                raise ConfigError(f"metrics.host: cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port} "
                                  f"({err.strerror or err}); give an address of this machine, such as 127.0.0.1 "
                                  f"or 0.0.0.0") from err
            log.info("metrics at http://%s:%d/metrics", cfg.metrics.host, self.metrics_port)
        if any(url.startswith("s3://") for url in (cfg.data.shards, cfg.checkpoint.dir)):
            log.info("object storage: %s", storage.describe_storage(cfg.storage))
        shards = self.source.list_shards()
        if not shards and not cfg.data.follow:
            raise ConfigError(f"data.shards: no shards found for {cfg.data.shards!r}")
        log.info("%d shards at start%s", len(shards), " (following for more)" if cfg.data.follow else "")
        if 0 < len(shards) < cfg.train.learners and not cfg.data.follow:
            # Each learner reads its own shards (through its decode actors); one without any would
            # hold the others back for ever.
            raise ConfigError(f"data.shards: {len(shards)} shard(s) for {cfg.train.learners} learners; every learner "
                              f"needs a shard of its own: split the data into more shards or use fewer learners")
        # Which checkpoint to resume from is known before any actor starts: a folder where none
        # loads stops the run here, in one line.
        try:
            point = self.resume_point()
        except storage.TRANSIENT_ERRORS as err:
            # The store did not answer (a checkpoint that does not load is skipped, not raised):
            # a counted failure, tried again as recoveries are.
            self.failure_cause = f"reading the checkpoints failed: {first_line(err)}"
            return RunState.RECOVERING
        return self.bring_up(shards, point)

    def train_chunk(self) -> RunState:
        """RUNNING: one chunk on every learner, merged into the stream ledger; a checkpoint when due."""
        if self.lease is not None:
            self.lease.raise_if_lost(self.last_checkpoint_step)  # training on would be thrown away
        if self.cfg.train.elastic and not self.stop.is_set():
            next_state = self.tend_group()
            if next_state is not None:
                return next_state
        max_steps, max_seconds = self.chunk_limits()
        if self.stop.is_set() or max_steps == 0:
            self.stop_reason = self.stop_reason or "budget reached"
            return RunState.STOPPING
        self.follow_new_shards()
        # An elastic group below its size leaves the room a node brings to joining learners (which
        # bring decode actors of their own) rather than to dropped decode actors.
        growing = self.cfg.train.elastic and len(self.group.actors) < self.cfg.train.learners
        relaunched = self.pool.poll(self.ledger, regain=not growing)
        self.attach_feeders(relaunched)
        self.pool.top_up(self.ledger)
        chunk_started = time.monotonic()
        try:
            summary = ChunkSummary.merge(self.group.run_chunk(max_steps, max_seconds))
        except LearnersLost as loss:
            self.loss = loss
            return RunState.SHRINKING
        except (LearnerFailure, GetTimeoutError) as failure:
            self.failure_cause = getattr(failure, "cause", None) or first_line(failure)
            return RunState.RECOVERING
        self.step, self.images_seen, self.last_summary = summary.step, summary.images_seen, summary
        self.record(summary.progress)
        replaced = self.pool.replace(summary.failed_feeders, self.ledger) if summary.failed_feeders else {}
        self.attach_feeders(replaced)
        self.observer.on_chunk(summary, decode_actors_replaced=sum(len(feeders) for feeders in
                                                                   [*replaced.values(), *relaunched.values()]),
                               decode_actors=self.pool.up())
        self.watch_for_stall(summary, chunk_started)
        limit = self.cfg.train.max_nonfinite_in_row
        if summary.nonfinite_in_row >= limit:
            return self.fail(EXIT_NONFINITE, f"{summary.nonfinite_in_row} non-finite losses in a row "
                                             f"(train.max_nonfinite_in_row={limit}); stopping without a new "
                                             f"checkpoint, the last good one is step {self.last_checkpoint_step}")
        # At the end of the run the checkpoint is written once, as the final one.
        if self.policy.due(self.step, time.time()) and not self.stop.is_set() and self.chunk_limits()[0] > 0:
            self.checkpoint()
        return RunState.SHRINKING if self.loss is not None else RunState.RUNNING

    def attach_feeders(self, feeders: dict[int, dict[int, Any]]) -> None:
        """Hand learners their new decode actors (rank -> {slot: handle}). A learner that died since
        the last chunk fails its attach while the others take theirs; the next chunk finds it and
        shrinks or recovers as for any lost learner, so that is not handled here."""
        if not feeders:
            return
        try:
            self.group.attach(feeders)
        except LearnerFailure as err:
            log.warning("%s; the next chunk deals with the learner", first_line(err))

    def watch_for_stall(self, summary: ChunkSummary, chunk_started: float) -> None:
        """Chunks in a row that train nothing, from the start of the first, for train.stall_warning_s:
        a warning, again each such period, with the shards each learner's decode actors hold (a step
        waits for a batch on every one). A restart or a shrink starts the count again."""
        limit, now = self.cfg.train.stall_warning_s, time.monotonic()
        if summary.steps or not limit:
            self.idle_since = None
            return
        if self.idle_since is None:
            self.idle_since = self.stall_logged = chunk_started
        if now - self.stall_logged >= limit:
            self.stall_logged = now
            held = {rank: sum(len(self.ledger.holders.get(slot, ())) for slot in slots)
                    for rank, slots in self.pool.feeders().items()}
            self.observer.on_stall(now - self.idle_since, held, self.ledger.cursor.n_shards,
                                   paused_s=max(0.0, self.ledger.paused_until - now))

    def shrink(self) -> RunState:
        """SHRINKING: members of an elastic group died or stopped answering. The survivors go on with
        what they hold, from the last step any of them completed; what every rank trained up to it
        goes into the stream ledger, and the lost ranks' decode actors go, their shards re-read from
        there. No checkpoint is read. With nobody left, a spent failure budget, or survivors that
        cannot settle and regroup: RECOVERING (today's restart from the latest checkpoint)."""
        loss, self.loss = self.loss, None
        self.idle_since = None
        budget = self.cfg.train.max_failures
        self.failure_cause = loss.cause
        if 0 <= budget <= self.restarts or len(loss.lost) >= len(self.group.actors):
            return RunState.RECOVERING
        try:
            shrunk = self.group.shrink(loss.lost)
        except (LearnerFailure, GetTimeoutError) as err:
            self.failure_cause = f"{loss.cause}; the survivors could not go on: {first_line(err)}"
            return RunState.RECOVERING
        self.restarts += 1
        self.record(shrunk.progress)
        self.pool.drop_ranks(set(loss.lost), self.ledger)
        self.pool.renumber(shrunk.old_ranks)
        # Decode actors of survivors that failed in the same chunk: the survivors dropped them already.
        failed = sorted({slot for report in loss.reports.values() for slot in report.failed_feeders
                         if slot in self.pool.rank_of})
        if failed:
            self.attach_feeders(self.pool.replace(failed, self.ledger))
        self.observer.on_shrink(self.restarts, loss.cause, learners=len(self.group.actors), step=shrunk.step,
                                adopted=shrunk.adopted, decode_actors=self.pool.up(), progress=shrunk.progress,
                                steps=shrunk.step - self.step, images=shrunk.images_seen - self.images_seen,
                                images_seen=shrunk.images_seen)
        self.step, self.images_seen = shrunk.step, shrunk.images_seen
        if len(self.group.actors) < self.cfg.train.fewest_learners:
            return self.regain_fewest()
        return RunState.RUNNING

    def regain_fewest(self) -> RunState:
        """The survivors are fewer than train.min_learners: wait up to train.startup_timeout_s for
        learners to join, training nothing meanwhile. If too few come, the survivors' state is
        saved (nothing trained is lost) and the run ends: FAILED, exit 5."""
        train = self.cfg.train
        deadline = time.monotonic() + train.startup_timeout_s
        self.next_grow = 0.0
        while len(self.group.actors) < train.fewest_learners and time.monotonic() < deadline \
                and not self.stop.is_set():
            next_state = self.tend_group()
            # RUNNING: a join failed and the members regrouped by themselves; still too few, so wait on.
            if next_state not in (None, RunState.RUNNING):
                return next_state
            time.sleep(POLL_S)
        if len(self.group.actors) >= train.fewest_learners:
            return RunState.RUNNING
        if self.stop.is_set():
            return RunState.STOPPING  # the survivors write the final checkpoint; exit 0
        saved = self.checkpoint(final=True)
        if not saved:
            kept = f"the survivors' checkpoint failed; the latest checkpoint is step {self.last_checkpoint_step}"
        elif self.step == 0:  # lost before the first step: checkpoint() saves nothing then
            kept = "nothing was trained, so there is no checkpoint to save"
        else:
            kept = f"checkpoint step {self.step} holds everything trained"
        return self.fail(EXIT_TOO_FEW_LEARNERS,
                         f"train.min_learners: {len(self.group.actors)} learner(s) left, fewer than train.min_learners="
                         f"{train.fewest_learners}, and no more could be placed within train.startup_timeout_s="
                         f"{train.startup_timeout_s:g}s; {kept}; start the run again when the cluster has room")

    def recover(self) -> RunState:
        """RECOVERING: a learner died or its node was lost. Count it and release every actor; within
        the failure budget, a new group from the latest checkpoint."""
        if self.lease is not None:
            self.lease.raise_if_lost(self.last_checkpoint_step)  # the folder is another run's now
        self.restarts += 1
        self.observer.on_failure(self.restarts, self.failure_cause)
        self.shutdown_actors()
        budget = self.cfg.train.max_failures
        if 0 <= budget < self.restarts:
            return self.fail(EXIT_FAILED, f"learners failed {self.restarts} time(s), more than train.max_failures="
                                          f"{budget}; last cause: {self.failure_cause}; the latest checkpoint is "
                                          f"step {self.last_checkpoint_step}")
        if self.stop.is_set():
            # A stop's final checkpoint needs the learners that were just lost: starting new ones from
            # the latest checkpoint would only save that again.
            if self.step <= self.last_checkpoint_step:
                log.info("stopped (%s); the learners were lost (%s) with nothing trained since checkpoint step %d",
                         self.stop_reason or "stop requested", self.failure_cause, self.last_checkpoint_step)
                return RunState.DONE
            return self.fail(EXIT_FINAL_CHECKPOINT_FAILED,
                             f"stopped ({self.stop_reason or 'stop requested'}) but the learners were lost before "
                             f"the final checkpoint ({self.failure_cause}); the last checkpoint saved is step "
                             f"{self.last_checkpoint_step}, of {self.step} trained")
        log.warning("restarting the learners from the latest checkpoint; steps trained since it are trained again")
        step_before = self.step
        try:
            shards, point = self.source.list_shards(), self.resume_point()
        except storage.TRANSIENT_ERRORS as err:
            # Recovery comes when nodes or the network are unwell: a storage blip here is one more
            # failure, retried within train.max_failures, not the end of the run.
            self.failure_cause = f"listing the shards or the checkpoints failed: {first_line(err)}"
            self.stop.wait(min(60.0, 2.0 ** min(self.restarts, 6)))
            return RunState.RECOVERING
        next_state = self.bring_up(shards, point)
        if next_state is RunState.RUNNING:
            self.observer.on_rollback(max(0, step_before - self.step))
        return next_state

    def finish(self) -> RunState:
        """STOPPING: the final checkpoint (tried again while the store does not answer, for
        FINAL_SAVE_RETRY_S), then DONE."""
        self.observer.log_progress(self.last_summary)
        give_up_at, pause = time.monotonic() + FINAL_SAVE_RETRY_S, FINAL_SAVE_FIRST_PAUSE_S
        while True:
            started = time.monotonic()
            if self.checkpoint(final=True):
                break
            if self.loss is not None:  # an elastic group lost a member: the survivors save it
                return RunState.SHRINKING
            # Another try only where it would start and end (taking as long as this one) in time.
            now = time.monotonic()
            if not self.store_unanswered or now + pause + (now - started) > give_up_at:
                log.error("final checkpoint at step %d failed; the last checkpoint saved is step %d", self.step,
                          self.last_checkpoint_step)
                self.exit_status = EXIT_FINAL_CHECKPOINT_FAILED
                return RunState.DONE
            log.warning("the final checkpoint at step %d failed because the store did not answer; trying again "
                        "in %gs", self.step, pause)
            time.sleep(pause)  # not stop.wait: the stop is what is being served
            pause *= 2
            self.adopt_committed_save()
        log.info("stopped (%s) at step %d after %d images", self.stop_reason or "stop requested", self.step,
                 self.images_seen)
        return RunState.DONE

    def fail(self, exit_status: int, why: str) -> RunState:
        """FAILED, with `why` as the run's last line."""
        log.error("%s", why)
        self.exit_status = exit_status
        return RunState.FAILED

    # ------------------------------------------------------------ bringing actors up
    def resume_point(self) -> ckpt.ResumePoint | None:
        """The newest checkpoint that loads, whose stream cursor and weights the driver can use, and
        that the learners did not refuse; None without any; NoLoadableCheckpoint (one line) when
        there are checkpoints but none of them will do."""
        return ckpt.load_for_resume(self.cfg.checkpoint.dir, self.cfg.storage, check=check_resume_state,
                                    rejected=self.rejected)

    def bring_up(self, shards: list[str], point: ckpt.ResumePoint | None) -> RunState:
        """Start the learners and decode actors and restore `point`: RUNNING. A learner that fails
        meanwhile (a node lost during start-up, a process killed for memory) is a failure like any
        other: RECOVERING. A checkpoint the learners refuse is one to skip, not a failure: the actors
        start again with the next older one (and the run stops in one line when none is left). A
        stop while waiting for resources: DONE, without a checkpoint."""
        while True:
            # Before any decode actor starts, so that each starts from the union of the checkpoint
            # being restored, not from the union of the run that failed (it may be ahead of it).
            self.seen = self.restored_seen(point)
            self.idle_since = None
            try:
                self.start_actors()
                self.restore(shards, point)
                break
            except CheckpointRejected as rejected:
                if point is None:  # a fresh start restores nothing a learner could refuse
                    raise
                changes = state_shaping_changes(point.record.get("config"), self.cfg)
                if changes:
                    # Refused for this run's settings, not for damage: an older checkpoint saved
                    # under these settings would load, and resuming from it would quietly throw away
                    # (and then overwrite) everything trained since.
                    self.shutdown_actors()
                    (key, old, new), others = changes[0], changes[1:]
                    also = "".join(f"; {k} was {o!r}, now {n!r}" for k, o, n in others)
                    raise ConfigError(f"{key}: checkpoint step {point.step} was saved with {old!r}, this run has "
                                      f"{new!r}{also}, and the learners refuse it ({rejected.reason}); set the saved "
                                      f"values back (its meta.json records them) or point checkpoint.dir elsewhere "
                                      f"to start afresh")
                log.error("the learners refuse checkpoint %s: %s; trying an older one", point.url, rejected.reason)
                self.rejected[point.url] = f"the learners refuse it: {rejected.reason}"
                self.shutdown_actors()
                # Actors start afresh: every part restored from the refused checkpoint is forgotten.
                point = self.resume_point()
            except LearnerFailure as failure:
                self.failure_cause = failure.cause
                return RunState.RECOVERING
            except Stopped:
                log.info("stopped (%s) before training could resume; the latest checkpoint is step %d",
                         self.stop_reason, self.last_checkpoint_step)
                return RunState.DONE
        if self.started is None:
            self.started = time.monotonic()
            self.observer.progress.restart(self.images_seen)
        return RunState.RUNNING

    def start_actors(self) -> None:
        train, resources = self.cfg.train, ray.cluster_resources()
        # An elastic group starts with the fewest it trains with; the others join as they come up.
        plan = plan_cluster(self.cfg, resources, learners=train.fewest_learners)
        for warning in plan.warnings:
            log.warning("%s", warning)
        self.decoders_per_learner = plan.decode_actors // plan.learners
        if train.elastic:
            self.next_grow = 0.0
            try:  # each learner gets its share of what the whole group would have, if it fits now
                whole = plan_cluster(self.cfg, resources)
            except StartupError:
                whole = None
            if whole is not None and not any(w.startswith("train.learners:") for w in whole.warnings):
                self.decoders_per_learner = min(self.decoders_per_learner, whole.decode_actors // whole.learners)
                plan = dataclasses.replace(plan, decode_actors=self.decoders_per_learner * plan.learners)
        self.group = LearnerGroup(self.cfg, plan, self.build_learner)
        self.pool = DecodePool(self.cfg, plan.learners, self.build_worker, seen_source=self.seen_state)
        devices = self.group.start(self.stop, while_starting=lambda: self.pool.launch(plan.decode_actors))
        self.pool.wait_started(self.stop)
        self.group.attach(self.pool.feeders())
        self.observer.on_actors_up(plan.learners, devices, len(self.pool.actors))

    def restore(self, shards: list[str], point: ckpt.ResumePoint | None) -> None:
        """Load a checkpoint (the newest that loads) into the learners and rewind the stream to it;
        with none, the stream starts from its beginning (the learners are fresh)."""
        self.relisting.restart()  # the next listing a follow interval from this one, of what is here now
        self.retired_since_listing.clear()
        if point is None:
            self.ledger.rewind(None, self.cfg.data.seed, shards)
            self.step = self.images_seen = 0
            if self.restarts:
                log.warning("no checkpoint yet: restarting from scratch, at the beginning of the stream")
            return
        cursor = point.state.pop("stream_cursor")
        saved = point.state.pop("config", None)
        self.step = self.group.restore(point.state)
        self.images_seen = int(point.state["images_seen"])
        # Shards listed now but not in the checkpoint (a growing bucket) join the newest pass under way.
        self.ledger.rewind(cursor, self.cfg.data.seed, shards, saved_read_order(saved))
        if not self.cfg.data.follow:
            # Those it knows that are gone (bucket retention) are retired, where no later listing will
            # confirm it: each one looked up, so that a listing that came back short (a list file
            # caught half written) cuts nothing that exists. A lookup that fails counts as there.
            self.retire_gone(self.ledger.unlisted(shards))
        self.last_checkpoint_step = self.step
        self.policy.mark(self.step, time.time())
        self.observer.on_resume(point, self.step, self.images_seen)
        if point.skipped and self.lease is not None and not self.lease.check(self.last_checkpoint_step):
            log.warning("latest.json not pointed at %s: this run's lease could not be confirmed (storage out of "
                        "reach); the next save moves it", point.url)
        elif point.skipped:
            try:
                ckpt.repoint_latest(self.cfg.checkpoint.dir, point, self.cfg.storage)
            except OSError as err:
                log.warning("could not point latest.json at %s (%s); a save of a skipped step will fail once",
                            point.url, first_line(err))

    # ------------------------------------------------------------ an elastic group's growth
    def tend_joiners(self) -> None:
        """An elastic group below train.learners, at a chunk boundary: start the learners it lacks
        and take in at once every one whose decode actors are up. Nothing here waits but a last look
        at the joiners (seconds) and the new group's forming (train.collective_timeout_s at most)."""
        ready = self.ready_joiners()
        if ready:
            self.take_in_joiners(ready)

    def ready_joiners(self) -> list[Joiner]:
        """Start the learners the group lacks (Ray places them when the cluster has room; after a
        failed join, again train.resize_interval_s later), give each one that came up its decode
        actors, and return those whose decode actors are up and that still answer."""
        train = self.cfg.train
        missing = train.learners - len(self.group.actors) - len(self.joiners)
        if missing > 0 and time.monotonic() >= self.next_grow:
            self.joiners += [self.group.launch_joiner() for _ in range(missing)]
        ready = []
        for joiner in list(self.joiners):
            if not joiner.slots:
                if not ray.wait([joiner.ready], timeout=0)[0]:
                    continue  # not placed yet
                try:
                    ray.get(joiner.ready)
                except RayError as err:
                    self.drop_joiner(joiner, first_line(err))
                    continue
                joiner.slots = self.pool.launch_for(self.decoders_per_learner)
                continue
            settled, up = self.pool.joined(joiner.slots)
            if settled and not up:
                self.drop_joiner(joiner, "none of its decode actors could start")
            elif settled:
                joiner.slots = up
                ready.append(joiner)
        # One that died since it answered would fail the new group's forming: look once more.
        silent = unanswered([joiner.actor for joiner in ready], timeout_s=5.0)
        for joiner in [ready[index] for index in silent]:
            ready.remove(joiner)
            self.drop_joiner(joiner, "it stopped answering")
        return ready

    def take_in_joiners(self, ready: list[Joiner]) -> None:
        """The group grows by these joiners, each fed from now by its decode actors."""
        for joiner in ready:
            self.joiners.remove(joiner)
        try:
            ranks = self.group.grow(ready)
        except LearnerFailure:
            for joiner in ready:
                self.pool.cancel_joining(joiner.slots)
            self.next_grow = time.monotonic() + self.cfg.train.resize_interval_s
            raise
        feeders = {rank: self.pool.take_in(joiner.slots, rank) for joiner, rank in zip(ready, ranks)}
        self.observer.on_grow(len(ready), learners=len(self.group.actors), decode_actors=self.pool.up())
        try:
            self.group.attach(feeders)
        except LearnerFailure as err:
            # The joiners are members now: one lost here is a loss like any other.
            raise (self.group.losses() or err) from err

    def tend_group(self) -> RunState | None:
        """`tend_joiners`; None when it went well, else the state its failure leads to."""
        try:
            self.tend_joiners()
        except LearnersLost as loss:
            self.loss = loss
            return RunState.SHRINKING
        except (LearnerFailure, GetTimeoutError) as failure:
            return self.after_failed_grow(getattr(failure, "cause", None) or first_line(failure))
        return None

    def after_failed_grow(self, cause: str) -> RunState:
        """Forming a group with joiners, or giving them their decode actors, failed: members lost
        meanwhile are a loss like any other (SHRINKING); if none was, the members that remain
        form their group again by themselves and train on. RECOVERING only if even that fails."""
        log.warning("%s; the learners that answer form their group again", cause)
        self.loss = self.group.losses()
        if self.loss is not None:
            return RunState.SHRINKING
        try:
            self.group.shrink(set())
        except (LearnerFailure, GetTimeoutError) as err:
            self.failure_cause = f"{cause}; the learners could not form their group again: {first_line(err)}"
            return RunState.RECOVERING
        return RunState.RUNNING

    def drop_joiner(self, joiner: Joiner, why: str) -> None:
        log.warning("a learner starting to join could not (%s); trying again in train.resize_interval_s=%gs", why,
                    self.cfg.train.resize_interval_s)
        self.joiners.remove(joiner)
        kill_quietly([joiner.actor])
        self.pool.cancel_joining(joiner.slots)
        self.next_grow = time.monotonic() + self.cfg.train.resize_interval_s

    # ------------------------------------------------------------ helpers
    def chunk_limits(self) -> tuple[int, float]:
        """Steps and seconds the next chunk may take: up to a budget, a checkpoint step, a report."""
        train = self.cfg.train
        steps = math.inf
        if train.image_budget:
            # Per step: the learners training now (an elastic group's size changes).
            global_batch = train.batch_size * len(self.group.actors)
            steps = math.ceil(max(0, train.image_budget - self.images_seen) / global_batch)
        every = self.cfg.checkpoint.every_steps
        if every:
            steps = min(steps, every - self.step % every)
        seconds = train.report_interval_s
        if train.time_budget_s:
            left = train.time_budget_s - (time.monotonic() - self.started)
            if left <= 0:
                return 0, 0.0
            seconds = min(seconds, left)
        return int(min(steps, 2**31 - 1)), seconds

    def record(self, progress: Progress) -> None:
        """What was trained into the stream ledger. Following the listing, a shard a reader found
        gone (shard-gone) is retired once the store confirms it (one lookup), so that no later pass
        sends a reader to it; the next listing that names it brings it back. Without follow mode
        nothing would bring back a shard missing only for a while (a mount that dropped out, a
        shard deleted and uploaded again): it stays, failing once per pass, until a resume's
        listing and lookup retire it."""
        self.ledger.record(progress)
        if progress.gone and self.cfg.data.follow:
            self.retire_gone(sorted({self.ledger.cursor.url(n) for _, n in progress.gone}))

    def retire_gone(self, urls: list[str]) -> None:
        """Retire those of `urls` the store says are not there, and log them."""
        retired = self.ledger.cursor.retire(self.source.gone(urls))
        if retired:
            log_retired(retired)
            if self.cfg.data.follow:  # only a followed listing under way could bring them back
                now = time.monotonic()
                self.retired_since_listing.update((url, now) for url in retired)

    def follow_new_shards(self) -> None:
        """Follow mode: the latest listing's new shards join the stream and those gone long enough
        are retired. Listed on a thread of its own (`Relisting`): the learners do not wait on it."""
        if not self.cfg.data.follow:
            return
        listed = self.relisting.poll()
        if listed is None:
            return  # none finished since the last chunk, or it failed (logged; tried again later)
        listing = listed.urls
        stale = {url for url, when in self.retired_since_listing.items() if when >= listed.started}
        if stale:  # deleted after the listing passed them: listed, yet gone
            listing = [url for url in listing if url not in stale]
        self.retired_since_listing.clear()  # the next listing begins after every one of them
        new, retired = self.ledger.follow_listing(listing)
        if new:
            log.info("follow: %d new shard(s)", len(new))
        if retired:
            # Bucket retention on an endless stream retires shards at every listing: what it is for.
            log_retired(retired, logging.INFO)

    def checkpoint(self, final: bool = False) -> bool:
        """Save through rank 0; False when the save failed (the previous checkpoint stays the latest),
        with `store_unanswered` saying whether it failed because the store did not answer."""
        self.store_unanswered = False
        if self.step == 0:
            return True
        if self.step == self.last_checkpoint_step:
            if self.lease is not None:
                self.lease.raise_if_lost(self.last_checkpoint_step)
            return not final or self.mark_final()
        if self.lease is not None and not self.lease.check(self.last_checkpoint_step):
            self.observer.on_checkpoint_failed(self.step, "this run's lease on checkpoint.dir could not be confirmed "
                                                          "within half of checkpoint.lease_s (storage out of reach)")
            self.policy.mark(self.step, time.time())
            self.store_unanswered = self.lease.failing is None or storage.is_unavailable(self.lease.failing)
            return False
        started = time.time()
        last = self.last_summary
        figures = {"loss": last.loss, "lr": last.lr, "feature_spread": last.feature_spread,
                   "score_spread": last.score_spread,
                   "marginal_error": last.marginal_error} if last is not None else {}
        info = {"metrics": {k: v for k, v in figures.items() if math.isfinite(v)},
                **BackboneSpec.from_config(self.cfg.model).to_record(), "final": final,
                # Consumers need crop size and normalisation without loading state.pt.
                "config": self.cfg.to_dict()}
        extra = {"stream_cursor": self.ledger.state_dict(), "config": self.cfg.to_dict()}
        if self.seen is not None:
            extra["seen_set"] = self.gather_seen(extra["stream_cursor"])
        try:
            saved = self.group.save(self.cfg.checkpoint.dir, extra, info, *self.lease_runs())
        except (RayTaskError, LearnerFailure) as err:
            self.observer.on_checkpoint_failed(self.step, first_line(err))
            cause = err.cause if isinstance(err, RayTaskError) else None
            self.store_unanswered = isinstance(cause, BaseException) and storage.is_unavailable(cause)
            if self.lease is not None:  # rank 0 may have found the lease another run's: stop now if so
                self.lease.check(self.last_checkpoint_step)
            self.policy.mark(self.step, time.time())
            if self.cfg.train.elastic and isinstance(err, LearnerFailure):
                self.loss = self.group.losses()
            return False
        self.last_checkpoint_step = saved.step
        self.policy.mark(self.step, saved.wall_time)
        self.observer.on_checkpoint(saved, duration_s=time.time() - started)
        return True

    def adopt_committed_save(self) -> None:
        """After a save that failed late (its latest.json written, then the store stopped answering
        before it reported): that step is saved, and only its `final` mark is left to write."""
        try:
            latest = ckpt.read_latest(self.cfg.checkpoint.dir, self.cfg.storage)
        except (*storage.TRANSIENT_ERRORS, ValueError):
            return  # the next try finds out
        if latest is not None and latest["step"] == self.step > self.last_checkpoint_step:
            log.info("checkpoint step %d was saved by the try that reported a failure", self.step)
            self.last_checkpoint_step = self.step

    def restored_seen(self, point: ckpt.ResumePoint | None) -> SeenSet | None:
        """curation.dedup's union of trained hashes as `point` saved it (cut back to its cursor:
        nothing read after it), empty without a point; None without dedup."""
        saved = point.state.pop("seen_set", None) if point is not None else None
        curation = self.cfg.curation
        if not curation.dedup:
            return None
        seen = SeenSet(curation.seen_capacity, curation.dedup_max_distance, curation.max_repeats)
        if saved is not None:
            try:
                seen.load_state_dict(saved)
            except ValueError as err:
                # Everything else in the checkpoint loaded: losing the union costs repeats trained
                # once more, where refusing it would fail every restart from this checkpoint.
                log.warning("checkpoint %s: its seen-set does not load (%s); dedup starts from an empty one, so "
                            "repeats of images trained before it may be trained once more", point.url, err)
        return seen

    def gather_seen(self, cursor_state: dict[str, Any]) -> dict[str, Any]:
        """The union's state after merging the decode actors' seen-sets, each cut back (by its
        actor) to the stream cursor: only hashes of samples that were trained, so none read again
        after a resume is taken for its own repeat. Every actor gets what the union gained, so that
        repeats read by different actors meet."""
        gained = self.seen.merge_trained(self.pool.seen_states(cursor_state, SEEN_GATHER_TIMEOUT_S))
        self.pool.share_seen(gained)
        return self.seen.state_dict()

    def seen_state(self) -> dict[str, Any] | None:
        """The trained-hash union as of the latest checkpoint (or the one restored), for a decode
        actor that starts now."""
        return self.seen.state_dict() if self.seen is not None and len(self.seen) else None

    def lease_runs(self) -> tuple[str | None, str | None]:
        """This run's id in the folder's lease and the id of the run it took the lease from (whose
        release may land late); (None, None) without a lease."""
        if self.lease is None:
            return None, None
        return self.lease.me.run, self.lease.displaced.run if self.lease.displaced is not None else None

    def mark_final(self) -> bool:
        # A successor that took the folder over and resumed from this very step has a latest.json
        # naming it too: the lease file, read just before the write, says whose it is.
        run, displaced = self.lease_runs()
        outcome = (f"this run stops without marking its checkpoint step {self.step} final; the last checkpoint it "
                   f"saved is step {self.last_checkpoint_step}")
        before_commit = ((lambda: confirm_holder(self.cfg.checkpoint.dir, run, self.cfg.storage, outcome, displaced))
                         if run is not None else None)
        try:
            if ckpt.mark_final(self.cfg.checkpoint.dir, self.step, self.cfg.storage, before_commit):
                return True
            if before_commit is not None:
                before_commit()  # a successor that has saved since: its lease, not a failed save, ends the run
        except LeaseLost:
            raise  # the run stops in one line, as when a save finds the lease lost
        except (*storage.TRANSIENT_ERRORS, ValueError) as err:  # not only OSErrors: s3fs passes some through
            log.error("could not mark checkpoint step %d as final: %s", self.step, first_line(err))
            self.store_unanswered = storage.is_unavailable(err)
            return False
        log.error("checkpoint step %d is saved but latest.json names another step", self.step)
        return False

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.stop.set()

    def shutdown_actors(self) -> None:
        kill_quietly([joiner.actor for joiner in self.joiners])
        self.joiners = []
        if self.pool is not None:
            self.pool.shutdown()
        if self.group is not None:
            self.group.shutdown()


def check_resume_state(state: dict[str, Any]) -> None:
    """Raise ValueError when a checkpoint's state loads but cannot be resumed from: no stream cursor
    that parses (the driver rewinds the stream to it), or weights that are not finite (every step
    from them would be skipped as non-finite, and every restart would land on them again)."""
    if "stream_cursor" not in state:
        raise ValueError("its state has no stream_cursor")
    StreamCursor(0).load_state_dict(state["stream_cursor"])
    average = state.get("average")
    for part, weights in (("model", state.get("model")),
                          ("average", average.get("module") if isinstance(average, dict) else None)):
        for name, tensor in (weights.items() if isinstance(weights, dict) else ()):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"its {part} weight {name} is not finite")


def saved_read_order(saved_config: Any) -> ReadOrder | None:
    """The reading settings in a checkpoint's saved configuration; None where it has none that
    parse (the cursor's part-read shards without a record are then read with this run's)."""
    data = saved_config.get("data") if isinstance(saved_config, dict) else None
    try:
        return ReadOrder.of(data) if isinstance(data, dict) else None
    except (TypeError, ValueError):
        return None


def log_retired(urls: list[str], level: int = logging.WARNING) -> None:
    log.log(level, "%d shard(s) gone from storage, retired: not read in this pass or later ones unless listed again "
            "(%s%s)", len(urls), ", ".join(urls[:3]), ", ..." if len(urls) > 3 else "")


def state_shaping_changes(saved_config: object, cfg: Config) -> list[tuple[str, object, object]]:
    """`changed_settings` that may explain why the learners refuse a checkpoint: all of `model` (the
    network's shapes) and `optim.optimizer` (AdamW's state and LARS/SGD's do not serve each other),
    as written, not resolved. A refusal with one of these changed is put down to it; other changes
    (a schedule, the queue, the codes, the learners) a state can take."""
    return [change for change in changed_settings(saved_config, cfg, ("model", "optim"))
            if change[0].startswith("model.") or change[0] == "optim.optimizer"]


def check_before_start(cfg: Config) -> None:
    """What can be known to be wrong before Ray starts, each refused in one line naming the key:
    shards (of the stream, or of curation.balance_reference) that cannot be listed or are not there,
    a checkpoint folder out of reach, a GPU asked for on a machine without one."""
    if cfg.train.device == "cuda" and not os.environ.get("RAY_ADDRESS"):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda, but this machine has no usable CUDA GPU and no cluster is named "
                              "(RAY_ADDRESS); use train.device=auto or cpu, or set RAY_ADDRESS to a GPU cluster")
    looks = [("data.shards", cfg.data.shards, lambda url: ShardSource(url, cfg.storage).list_shards()),
             ("checkpoint.dir", cfg.checkpoint.dir, lambda url: _checkpoint_dir_writable(url, cfg))]
    if cfg.curation.balance > 0 and cfg.curation.balance_signal == "reference":
        looks.append(("curation.balance_reference", cfg.curation.balance_reference,
                      lambda url: _reference_readable(url, cfg)))
    for key, url, look in looks:
        try:
            found = look(url)
        except ConfigError:
            raise
        except Exception as error:
            storage.raise_as_usage(error, key, url, cfg.storage)
        if key == "data.shards" and not found and not cfg.data.follow:
            where = "" if storage.exists(url, cfg.storage) or spec_kind(url) != "prefix" else " (it does not exist)"
            raise ConfigError(f"data.shards: no shards at {url}{where}; give a folder or s3:// prefix holding "
                              f".tar/.tar.gz/.tgz shards, a brace pattern or a .txt list (`stream-swav make-shards` "
                              f"makes shards from images), or data.follow: true to wait for them")


def _checkpoint_dir_writable(url: str, cfg: Config) -> bool:
    """checkpoint.dir is a folder (or prefix) this machine can write: a probe file is written and
    removed, so that a run does not find out at its first save, possibly hours in, that every save
    fails (it would go on training, saving nothing)."""
    fs, path = storage.filesystem_for(url, cfg.storage)
    if fs.isfile(path):
        raise ConfigError(f"checkpoint.dir: {url} is a file; point checkpoint.dir at a folder or s3:// prefix")
    probe = storage.join_url(url, f".write-probe-{uuid.uuid4().hex}")
    storage.write_bytes_atomic(probe, b"", cfg.storage)
    storage.rm(probe, cfg.storage)
    return True


def _reference_readable(url: str, cfg: Config) -> bool:
    """Whether curation.balance_reference's shards hold a decodable image, one read here so that
    shards without one are refused once, before Ray starts, not by every learner actor as it starts."""
    key = "curation.balance_reference"
    try:
        load_labeled_images(url, 8, cfg.storage, cfg.data, 1, unlabelled=True, key=key)
    except NoShardsFound:
        raise ConfigError(f"{key}: no shards at {url}; give the shards of a curated reference set (a folder, "
                          f"s3:// prefix, brace pattern or .txt list)") from None
    except UsageError:  # already one line naming its key
        raise
    except ValueError as error:  # shards, but no decodable image in them
        raise ConfigError(f"{key}: {error}") from None
    return True


def train(cfg: Config, trainer: Trainer | None = None) -> int:
    """`stream-swav train`: run until a budget or SIGTERM/SIGINT; the exit status."""
    check_before_start(cfg)
    trainer = trainer or Trainer(cfg)
    # ray.init installs its own SIGTERM handler (an immediate exit, no checkpoint): start Ray first
    # so that ours replaces it. A Ray the caller connected to before is the caller's to shut down.
    connected_here = not ray.is_initialized()
    log.info("%s", init_ray())
    previous = {}

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: finishing the current chunk and writing a final checkpoint",
                 signal.Signals(signum).name)
        trainer.request_stop(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        return trainer.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        trainer.metrics.stop_server()
        trainer.shutdown_actors()
        if connected_here:
            shutdown_ray()


__all__ = ["Trainer", "RunState", "train", "StartupError"]
