"""Ray actors: thin shells around DecodeWorker and Learner.

All the data logic lives in stream_swav.data.worker, the step in
stream_swav.learner and the batch supply in runtime.feed; these classes only
move things through Ray. A learner pulls batches from the decode actors
assigned to it and trains a run of steps per call, answering with one
`StepReport`, so the driver handles one small message per learner per chunk
rather than every batch. What crosses Ray is typed: the `Config` itself (validated
once, where it was loaded), `StepReport`s and the `CheckpointInfo` of a save.

Both actors take an optional factory for their inner part (`build_worker`,
`build_learner`): the control-plane benchmark swaps in stand-ins that do no
work, and tests a learner that records what it trained, around the same shells.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import ray
from ray.exceptions import RayTaskError

from stream_swav import logs
from stream_swav.config import Config, TrainConfig
from stream_swav.data.cursor import ShardTask
from stream_swav.runtime.reports import GroupView, Progress, StepReport

if TYPE_CHECKING:
    from stream_swav.checkpoint import CheckpointInfo
    from stream_swav.data.batch import CropBatch

log = logging.getLogger("stream_swav.actors")


def _default_worker(cfg: Config, worker_index: int) -> Any:
    from stream_swav.data.worker import DecodeWorker
    from stream_swav.imaging import log_pillow_flavour

    log_pillow_flavour(log)
    return DecodeWorker(cfg.data, cfg.crops, cfg.storage, worker_index, cfg.curation)


class DecodeActorImpl:
    def __init__(self, cfg: Config, worker_index: int,
                 build_worker: Callable[[Config, int], Any] | None = None) -> None:
        logs.configure()
        self.worker = (build_worker or _default_worker)(cfg, worker_index)

    def ready(self) -> int:
        """The actor's pid, once it is up (the driver waits on this with a timeout)."""
        return os.getpid()

    def assign(self, tasks: list[ShardTask]) -> None:
        for task in tasks:
            self.worker.assign(task)

    def next_batch(self, batch_size: int, replays: list[tuple[str, int]] | None = None) -> Any:
        return self.worker.next_batch(batch_size, replays)

    def seen_state(self, trained: dict[str, Any], newest: int | None) -> dict[str, Any] | None:
        return self.worker.seen_state(trained, newest)

    def absorb_seen(self, state: dict[str, Any]) -> None:
        self.worker.absorb_seen(state)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def learner_cpu_threads(train: TrainConfig) -> int:
    return train.cpu_threads or max(1, math.ceil(train.cpus_per_learner))


class Vote(NamedTuple):
    """The outcome of the ranks' vote before a step: whether every rank has a batch, the images of
    all their batches, and rank -> (pending, batch bookkeeping) of the ranks this one learned of
    (all in an elastic group, itself in a fixed one)."""

    go: bool
    images: int
    bookkeeping: dict[int, tuple[Progress, Progress | None]]


def first_line(err: BaseException) -> str:
    """`Type: first line of the message`; for an error an actor raised, the actor's own error (Ray's
    wrapper begins with a banner that says nothing of the cause)."""
    cause = getattr(err, "cause", None)
    if isinstance(err, RayTaskError) and isinstance(cause, BaseException):
        err = cause
    return logs.error_line(err, with_type=True)


def is_peer_loss(err: BaseException) -> bool:
    """Whether `err` is a collective failing because a peer is gone: gloo's closed connection or
    timeout (a RuntimeError naming gloo), NCCL's and the store's errors (torch's DistError)."""
    import torch.distributed as dist

    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo" in str(err))


def leave_process_group(learner: Any, broken: bool) -> None:
    """Tear down this process's torch.distributed groups (if any), closing their connections now:
    the learner's network lets go of the group first and the garbage is collected, since a
    gloo group's sockets close only when nothing holds it. A `broken` NCCL group (a peer lost)
    is aborted rather than waited for."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if hasattr(learner, "release_network"):
        learner.release_network()
    if broken and dist.get_backend() == "nccl":
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception:  # noqa: BLE001 - already aborted by the watchdog
            pass
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a group broken by a lost peer may fail to tear down cleanly
        pass
    gc.collect()


def _default_learner(cfg: Config, device: Any, rank: int, world_size: int) -> Any:
    from stream_swav.learner import Learner

    return Learner(cfg, device, rank=rank, world_size=world_size, reference_images=reference_images(cfg))


def reference_images(cfg: Config) -> Any:
    """The curated reference's images (curation.balance_signal reference) as the learner embeds them:
    at most curation.balance_reference_images of its shards, decoded, at the global crops' side;
    None for any other signal. Each learner reads its own (a thousand images, once)."""
    curation = cfg.curation
    if curation.balance == 0 or curation.balance_signal != "reference":
        return None
    from stream_swav.data.labelled import load_labeled_images

    read = load_labeled_images(curation.balance_reference, cfg.crops.global_size, cfg.storage, cfg.data,
                               curation.balance_reference_images, unlabelled=True, key="curation.balance_reference")
    if read.skipped:
        log.warning("curation.balance_reference: %d image(s) of %s skipped: %s", sum(read.skipped.values()),
                    curation.balance_reference, dict(read.skipped))
    return read.images


class LearnerActorImpl:
    """One learner: one GPU (or the CPU), one rank of the data-parallel group."""

    def __init__(self, cfg: Config, rank: int, world_size: int,
                 build_learner: Callable[[Config, Any, int, int], Any] | None = None) -> None:
        import torch

        logs.configure()
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.build_learner = build_learner or _default_learner
        want = self.cfg.train.device
        use_cuda = torch.cuda.is_available() and want in ("auto", "cuda")
        if want == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("train.device: cuda was asked for but this learner has no GPU")
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU it granted, so index 0 is ours.
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(learner_cpu_threads(self.cfg.train))
        self.learner: Any = None
        self.vote_group: Any = None
        from stream_swav.runtime.feed import Feed

        self.feed = Feed(self.cfg.train.batch_size, self.cfg.data.inflight_batches_per_actor)
        # Bookkeeping-only batches received since the last vote; they commit with the next one.
        self.pending = Progress()
        # What every rank committed in the current (or last) call, as this rank saw it.
        self.view = GroupView()
        # (step, feeder slot, batch) of a step that failed in a collective, until `settle`.
        self.attempt: tuple[int, int, Any] | None = None
        # (feeder slot, the batch's keys, its StepStats) of the last step that asked for replays
        # (curation.balance_mode resample), read one step later so the device is not waited on.
        self.replays_due: tuple[int, list[str], Any] | None = None

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str | None, master_port: int | None) -> str:
        """Join the process group (when several learners) and build the model."""
        return self.regroup(master_addr, master_port, self.rank, self.world_size)

    def regroup(self, master_addr: str | None, master_port: int | None, rank: int, world_size: int) -> str:
        """Leave the process group this learner is in (if any) and join a new one as `rank` of
        `world_size`, keeping everything trained: an elastic group that shrank or grew. Builds the
        model on the first call. Every member of the new group must be called together."""
        import datetime

        import torch
        import torch.distributed as dist

        self.vote_group = None
        # In an elastic group the old group may be torn (a peer lost, or a join that failed).
        leave_process_group(self.learner, broken=self.cfg.train.elastic)
        self.rank, self.world_size = rank, world_size
        if world_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if backend == "nccl" and self.cfg.train.elastic:
                # NCCL's watchdog aborts a collective stuck past the timeout without ending the process,
                # so that a survivor of a lost peer can join the next group; the step then sees the
                # abort (Learner._check_collectives) and does not commit.
                os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
            timeout = datetime.timedelta(seconds=self.cfg.train.collective_timeout_s)
            dist.init_process_group(backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
                                    rank=rank, world_size=world_size, timeout=timeout)
            # Per-step votes (does every rank have a batch?) go over the CPU, off the GPU's stream.
            self.vote_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
        if self.learner is None:
            torch.manual_seed(self.cfg.train.seed)
            self.learner = self.build_learner(self.cfg, self.device, rank, world_size)
        else:
            self.learner.regroup(rank, world_size)
        return str(self.device)

    def shared_state(self) -> dict[str, Any]:
        """What every rank holds alike, for a learner that joins or fell behind (`adopt`)."""
        return self.learner.shared_state()

    def adopt(self, shared: dict[str, Any]) -> int:
        """Take a survivor's `shared_state()`, keeping this rank's queue and random streams."""
        self.learner.adopt(shared)
        return self.learner.step

    def ping(self) -> int:
        return self.rank

    def position(self) -> tuple[GroupView, int, int]:
        """What every rank committed in the last call as this rank saw it, its step and images seen."""
        return self.view, self.learner.step, self.learner.images_seen

    def settle(self, committed_step: int) -> int:
        """After a peer's loss: the step this rank was attempting when its collective failed was
        trained by the group if a survivor completed it (`committed_step` reaches it), so its batch
        and bookkeeping are spent; otherwise its batch is first in line again. This rank's step."""
        if self.attempt is not None:
            step, slot, batch = self.attempt
            self.attempt = None
            if step <= committed_step:
                self.pending = Progress()
            else:
                self.feed.put_back(slot, batch)
        return self.learner.step

    def _ask_replays(self) -> None:
        """Hand the replays the last step asked for to the feeder that made its batch: each image
        read from the stream that is to be shown more than once, with how many more times."""
        if self.replays_due is None:
            return
        slot, keys, stats = self.replays_due
        self.replays_due = None
        if stats.shows_ready is not None:
            stats.shows_ready.synchronize()
        self.feed.ask_replays(slot, [(key, shows - 1) for key, shows in zip(keys, stats.shows.tolist()) if shows > 1])

    def attach(self, feeders: dict[int, Any]) -> None:
        """Pull from these decode actors (slot -> handle), replacing the feeders of those slots."""
        for slot, handle in feeders.items():
            self.feed.attach(slot, handle)

    def load_state(self, shared: dict[str, Any], own: dict[str, Any] | None) -> int:
        """Restore a checkpoint: `shared`, its state as rank 0 saved it (every rank gets the same
        object, sent to each node once), with `own` over it, this rank's saved queue and random
        streams; None for a rank new to the checkpoint, which keeps its own fresh ones."""
        if own is None:
            self.learner.adopt(shared)
        else:
            self.learner.load_state_dict({**shared, **own})
        return self.learner.step

    def _next_batch(self, timeout: float) -> tuple[int, CropBatch] | None:
        """The feed's next batch with samples, as `Learner.select` leaves it (curation.resample_min_shows
        below 1 skips images before the training forward), or None if none came within `timeout`.
        One left with no samples only carries bookkeeping, taken as the feed's own such batches are."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.feed.next(deadline - time.monotonic(), self.pending.add)
            if got is None:
                return None
            slot, batch = got
            batch = self.learner.select(batch)
            if len(batch):
                return slot, batch
            self.pending.add(batch.meta)

    def _vote(self, batch: Progress | None, images: int) -> Vote:
        """One small all-gather before each step. All take the step only if every rank has a batch,
        so all stay in lockstep, and every rank learns the step's images (batches can be short). In
        an elastic group every rank also learns what every other trains (its pending and batch
        bookkeeping), which is what lets the survivors of a lost peer account for the samples it
        trained; a fixed group, which restarts from a checkpoint on a loss, sends two integers."""
        mine = (self.pending, batch)
        if self.world_size == 1:
            return Vote(batch is not None, images, {self.rank: mine})
        import torch
        import torch.distributed as dist

        if self.cfg.train.elastic:
            votes: list[Any] = [None] * self.world_size
            dist.all_gather_object(votes, (*mine, images), group=self.vote_group)
            return Vote(all(vote[1] is not None for vote in votes), sum(vote[2] for vote in votes),
                        {rank: vote[:2] for rank, vote in enumerate(votes)})
        flags = [torch.zeros(2, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(flags, torch.tensor([int(batch is not None), images]), group=self.vote_group)
        return Vote(all(int(flag[0]) for flag in flags), sum(int(flag[1]) for flag in flags), {self.rank: mine})

    def run(self, max_steps: int, max_seconds: float) -> StepReport:
        """Train up to `max_steps` steps, for about `max_seconds` at most, on batches pulled from the
        feeders; every rank takes the same number of steps. A rank whose input does not come within
        the time ends the chunk for all (the batch of another rank waits for the next call)."""
        import torch

        report = StepReport(rank=self.rank)
        self.view = GroupView()
        deadline = time.monotonic() + max_seconds
        max_nonfinite = self.cfg.train.max_nonfinite_in_row
        counts = None
        last = None
        while True:
            waited = time.perf_counter()
            remaining = deadline - time.monotonic()
            wanted = report.steps < max_steps and remaining > 0
            got = self._next_batch(remaining) if wanted else None
            report.wait_s += time.perf_counter() - waited
            try:
                votes = self._vote(Progress.of(got[1].meta) if got is not None else None,
                                   len(got[1]) if got is not None else 0)
            except Exception as err:
                if not is_peer_loss(err):
                    raise
                if got is not None:
                    self.feed.put_back(*got)
                report.interrupted = first_line(err)
                break
            if not votes.go:
                # No step; what every rank received that trains nothing is accounted for now.
                for rank, (pending, _) in votes.bookkeeping.items():
                    self.view.commit(rank, pending)
                self.pending = Progress()
                if got is not None:
                    self.feed.put_back(*got)
                break
            slot, batch = got
            started = time.perf_counter()
            report.latency_s.append(max(0.0, time.time() - batch.meta.made_at))
            self.attempt = (self.learner.step + 1, slot, batch)
            try:
                last = self.learner.train_step(batch, step_images=votes.images)
            except Exception as err:
                if not is_peer_loss(err):
                    raise
                report.interrupted = first_line(err)
                break
            self.attempt = None
            self._ask_replays()
            if last.shows is not None:
                self.replays_due = (slot, batch.meta.keys, last)
            for rank, (pending, trained) in votes.bookkeeping.items():
                pending.merge(trained)
                self.view.commit(rank, pending)
            self.pending = Progress()
            report.steps += 1
            report.images += len(batch)
            counts = last.prototype_counts if counts is None else counts + last.prototype_counts
            report.nonfinite += int(last.nonfinite)
            report.busy_s += time.perf_counter() - started
            # Every rank sees the same (all-reduced) verdict, so all stop here together.
            if last.nonfinite_in_row >= max_nonfinite:
                break
        self._ask_replays()
        # A sample of the latencies is enough for percentiles, and keeps the report small.
        report.latency_s = report.latency_s[::math.ceil(len(report.latency_s) / 100) or 1]
        # Decode actors keep working while the driver handles this report.
        self.feed.refill()
        report.failed_feeders = self.feed.take_failed()
        report.batches_held = self.feed.held()
        if report.interrupted:
            # At once: in a ring collective only the dead rank's neighbours see its connection close;
            # the others learn of the loss when ours close, rather than at the collective's timeout.
            self.vote_group = None
            leave_process_group(self.learner, broken=True)
        report.progress = self.view.ranks.get(self.rank, Progress())
        report.step, report.images_seen = self.learner.step, self.learner.images_seen
        if last is not None and not report.interrupted:
            # The call's one read of device values: none per step.
            figures = last.figures()
            report.loss, report.lr, report.marginal_error = figures.loss, figures.lr, figures.marginal_error
            report.feature_spread, report.score_spread = figures.feature_spread, figures.score_spread
            report.queue_fill, report.nonfinite_in_row = figures.queue_fill, figures.nonfinite_in_row
            report.prototype_counts = counts.cpu().tolist()
        if self.device.type == "cuda":
            report.gpu_memory_allocated_bytes = int(torch.cuda.memory_allocated(self.device))
            report.gpu_memory_reserved_bytes = int(torch.cuda.memory_reserved(self.device))
        return report

    def rank_state(self) -> dict[str, Any]:
        """What differs between ranks: queue and random streams."""
        return self.learner.rank_local_state()

    def save_checkpoint(self, directory: str, extra: dict[str, Any], other_ranks: list[Any],
                        info: dict[str, Any], lease_run: str | None = None,
                        displaced_run: str | None = None) -> CheckpointInfo:
        """Write a checkpoint of this learner (rank 0), with the other ranks' queues and random states;
        with `lease_run`, only while that run holds the folder's lease (`confirm_holder`: the run it
        took the folder from is `displaced_run`)."""
        from stream_swav.checkpoint import save_checkpoint
        from stream_swav.runtime.lease import confirm_holder

        state = self.learner.state_dict()
        state.update(extra)
        if other_ranks:
            state["other_ranks"] = ray.get(other_ranks)
        return save_checkpoint(directory, step=self.learner.step, images_seen=self.learner.images_seen,
                               state=state, backbone=self.learner.exported_backbone_state_dict(), info=info,
                               storage_cfg=self.cfg.storage, keep_last=self.cfg.checkpoint.keep_last,
                               milestone_steps=self.cfg.checkpoint.milestone_steps,
                               before_commit=(lambda: confirm_holder(directory, lease_run, self.cfg.storage,
                                                                     displaced=displaced_run))
                               if lease_run else None)


DecodeActor = ray.remote(DecodeActorImpl)
LearnerActor = ray.remote(LearnerActorImpl)
