"""The learners of a run as one unit: placed together, set up together, stepping together.

Learners share a torch.distributed process group, so one dead rank stalls the
others inside a collective. A fixed-size group (train.min_learners 0 or train.learners) fails
whole on any member's failure (`LearnerFailure`) and is replaced by the driver
from the latest checkpoint. An elastic group (train.min_learners below
train.learners) reports which members were lost (`LearnersLost`) and goes on
without them: the survivors settle the step under way, the ones a step behind
take the state of the one ahead, and they form a new process group (`shrink`);
learners that start later join the same way, taking a member's state over Ray
(`launch_joiner`, `grow`). Every wait here has a deadline or can be given up,
so the driver never blocks for good.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from stream_swav import logs
from stream_swav.checkpoint import CheckpointInfo
from stream_swav.config import Config
from stream_swav.runtime.actors import LearnerActor, first_line
from stream_swav.runtime.cluster import ClusterPlan, StartupError, describe_shortfall
from stream_swav.runtime.reports import GroupView, Progress, StepReport

log = logging.getLogger("stream_swav.learners")

# How often waits wake up to look at the stop flag.
POLL_S = 0.5


class LearnerFailure(RuntimeError):
    """A learner died or failed; the group is unusable. `cause` says why, in one line."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class LearnersLost(LearnerFailure):
    """Members of an elastic group died (or stopped answering); the others are alive and hold what
    they trained. `lost`: rank -> why; `reports`: the survivors' answers to the chunk, if any."""

    def __init__(self, lost: dict[int, str], reports: dict[int, StepReport] | None = None) -> None:
        super().__init__("; ".join(f"learner {rank}: {why}" for rank, why in sorted(lost.items())))
        self.lost = lost
        self.reports = reports or {}


@dataclass
class Shrunk:
    """What `shrink` did: the group's bookkeeping as far as any survivor knew it committed (the
    lost ranks' steps included), the step the survivors go on from (the furthest any completed),
    the old rank of each new one, and how many survivors took another's state."""

    progress: Progress
    step: int
    images_seen: int
    old_ranks: list[int]
    adopted: int


@dataclass
class Joiner:
    """A learner started for an elastic group that has not joined it yet: placed once `ready` answers,
    then given decode actors (`slots`), then taken in by `grow`."""

    actor: Any
    ready: Any
    slots: list[int] = field(default_factory=list)


def refused_by_learner(failure: LearnerFailure) -> str | None:
    """The first line of the ValueError a learner raised, where `failure` is one: a learner refusing
    what it was given (a configuration it cannot build, a state it cannot load), which no restart
    changes; None for anything else (a process or node lost, a fault at run time)."""
    cause = failure.__cause__
    if isinstance(cause, RayTaskError) and isinstance(cause.cause, ValueError):
        return logs.error_line(cause.cause)
    return None


class CheckpointRejected(RuntimeError):
    """The learners refused a checkpoint's state (`LearnerState.check_state`: another network or
    optimiser shape than this configuration's, or parts that are damaged); nothing was loaded
    on the rank that refused it. `reason` says why, in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Stopped(RuntimeError):
    """A stop was requested while waiting (SIGTERM during start-up or recovery)."""


def wait_all(refs: list[Any], stop: threading.Event | None, deadline: float | None, what: str) -> list[Any]:
    """ray.get of every ref, polling so that a stop request or the deadline is noticed; a failed ref
    raises LearnerFailure at once, without waiting for the others."""
    pending = list(refs)
    while pending:
        if stop is not None and stop.is_set():
            raise Stopped(f"stop requested while waiting for {what}")
        if deadline is not None and time.monotonic() > deadline:
            raise GetTimeoutError(f"{what} did not finish in time")
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
        for ref in done:
            try:
                ray.get(ref)
            except (RayActorError, RayTaskError, RayError) as err:
                raise LearnerFailure(f"{what}: {first_line(err)}") from err
    return ray.get(list(refs))


def unanswered(actors: list[Any], timeout_s: float) -> dict[int, str]:
    """index -> why, for those of `actors` (learner actors) that are gone or do not answer within
    `timeout_s`."""
    refs = [actor.ping.remote() for actor in actors]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    silent = {}
    for index, ref in enumerate(refs):
        if ref not in done:
            silent[index] = f"no answer within {timeout_s:g}s"
            continue
        try:
            ray.get(ref)
        except RayError as err:
            silent[index] = first_line(err)
    return silent


def kill_quietly(handles: Iterable[Any]) -> None:
    """ray.kill every actor, those already gone (with their node) included."""
    for handle in handles:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass


class LearnerGroup:
    def __init__(self, cfg: Config, plan: ClusterPlan,
                 build_learner: Callable[[Config, Any, int, int], Any] | None = None) -> None:
        self.cfg = cfg
        self.plan = plan
        self.build_learner = build_learner
        self.actors: list[Any] = []
        self._placement: Any = None

    def start(self, stop: threading.Event, while_starting: Callable[[], None] = lambda: None) -> list[str]:
        """Place the learners (waiting up to train.startup_timeout_s for the resources), start them,
        join their process group and build the models. Returns each learner's device.

        `while_starting` runs once the learners are placed and their processes are starting: the
        driver launches the decode actors there, whose start (a few seconds shorter than a learner's,
        which imports torch) then overlaps the learners'; the learners' places are held already.
        An elastic group's learners are placed without a placement group (Ray cannot take one
        bundle out of a group, and would keep, and re-place, a lost member's bundle, holding the
        room a joiner needs): they are waited for until they answer before the decode actors are
        launched, so that these do not take the learners' CPUs."""
        world = self.plan.learners
        timeout = self.cfg.train.startup_timeout_s
        deadline = time.monotonic() + timeout
        elastic = self.cfg.train.elastic
        try:
            if elastic:
                self.actors = [self._new_learner(rank, world) for rank in range(world)]
                wait_all([actor.ping.remote() for actor in self.actors], stop, deadline, "learner placement")
            else:
                self._place_in_a_group(stop, deadline)
        except GetTimeoutError:
            self.shutdown()
            which = f"train.min_learners={world} learner(s)" if elastic else "the learners"
            raise StartupError(f"train.learners: could not place {which} within train.startup_timeout_s="
                               f"{timeout:g}s: {describe_shortfall(self.plan, ray.cluster_resources())}") from None
        except BaseException:
            self.shutdown()
            raise
        while_starting()
        try:
            master_addr, master_port = (wait_all([self.actors[0].address.remote()], stop, deadline, "learner start")[0]
                                        if world > 1 else (None, None))
        except GetTimeoutError:
            self.shutdown()
            raise StartupError(f"train.startup_timeout_s: the learners were placed but did not start within "
                               f"{timeout:g}s of asking for them; raise it") from None
        try:
            return wait_all([a.setup.remote(master_addr, master_port) for a in self.actors], stop, None,
                            "learner setup")
        except LearnerFailure as failure:
            refused = refused_by_learner(failure)
            if refused is None:
                raise
            # A learner this configuration cannot build would fail so at every restart.
            self.shutdown()
            raise StartupError(f"the learners cannot be built as configured: {refused}") from None

    def _place_in_a_group(self, stop: threading.Event, deadline: float) -> None:
        """A fixed group's learners, placed together in one placement group (when they ask for
        resources), their actors started without waiting."""
        world, bundle = self.plan.learners, self.plan.learner_bundle
        options: list[dict[str, Any]] = [{} for _ in range(world)]
        if bundle:
            self._placement = placement_group([bundle] * world, strategy="PACK")
            wait_all([self._placement.ready()], stop, deadline, "learner placement")
            options = [{"scheduling_strategy": PlacementGroupSchedulingStrategy(self._placement, rank)}
                       for rank in range(world)]
        self.actors = [self._new_learner(rank, world, **options[rank]) for rank in range(world)]

    def _new_learner(self, rank: int, world: int, **options: Any) -> Any:
        return LearnerActor.options(num_gpus=self.plan.gpus_per_learner, num_cpus=self.plan.cpus_per_learner,
                                    max_restarts=0, **options).remote(self.cfg, rank, world, self.build_learner)

    def attach(self, feeders: dict[int, dict[int, Any]]) -> None:
        """Give each rank its decode actors: rank -> {slot: handle}."""
        wait_all([self.actors[rank].attach.remote(slots) for rank, slots in feeders.items() if slots], None, None,
                 "attaching decode actors")

    def restore(self, state: dict[str, Any]) -> int:
        """Load a checkpoint's state into every rank (rank 0's own, the others' queues and RNGs)."""
        other_ranks = state.pop("other_ranks", [])
        saved = len(other_ranks) + 1
        if saved < len(self.actors):
            log.warning("checkpoint has %d learner(s), this run %d: the new ranks take its weights and start "
                        "their own queues and random streams", saved, len(self.actors))
        elif saved > len(self.actors):
            log.warning("checkpoint has %d learner(s), this run %d: the queues and random streams of its ranks "
                        "%d to %d are dropped", saved, len(self.actors), len(self.actors), saved - 1)
        # Once into the object store, so that each node fetches it once: passed by value, each
        # learner's call carried its own copy of the weights and optimizer state (hundreds of MB
        # each for a ResNet-50, a copy per learner through the driver's node at every recovery).
        shared = ray.put(state)
        own: list[dict[str, Any] | None] = [{}, *other_ranks[:len(self.actors) - 1]]
        own += [None] * (len(self.actors) - len(own))  # ranks new to the checkpoint keep their own
        refs = [actor.load_state.remote(shared, mine) for actor, mine in zip(self.actors, own)]
        try:
            return int(wait_all(refs, None, None, "restoring the checkpoint")[0])
        except LearnerFailure as failure:
            # A learner that checked the state and refused it would refuse it again at every
            # recovery: that is the checkpoint's fault, not the learner's.
            refused = refused_by_learner(failure)
            if refused is None:
                raise
            raise CheckpointRejected(refused) from failure

    def run_chunk(self, max_steps: int, max_seconds: float) -> list[StepReport]:
        """Every rank trains up to `max_steps` steps for at most about `max_seconds`; their reports.

        No deadline and no stop check here; what bounds the wait is the learners: each returns once
        `max_seconds` have passed at the end of the step under way (minutes for a first step that
        torch.compile compiles), a learner that raises fails the wait at once, and Ray fails the
        call of a learner whose process dies (at once) or whose node is lost (when its health checks
        miss). A rank stuck in a collective whose peer hangs holds the chunk until torch.distributed's
        timeout fails its step (train.collective_timeout_s). A stop request is acted on when the
        chunk ends, at most about train.report_interval_s later, so that its steps are kept. An
        elastic group raises `LearnersLost` instead of `LearnerFailure` when members died."""
        refs = [actor.run.remote(max_steps, max_seconds) for actor in self.actors]
        if self.cfg.train.elastic:
            return self._wait_elastic(refs)
        reports = wait_all(refs, None, None, "training")
        interrupted = [r.interrupted for r in reports if r.interrupted]
        if interrupted:  # every rank answered, yet a collective failed (a peer that hung, then came back)
            raise LearnerFailure(f"training: a collective failed: {interrupted[0]}")
        return reports

    def _wait_elastic(self, refs: list[Any]) -> list[StepReport]:
        """The reports of every rank, or `LearnersLost` naming the ranks whose process died and
        holding the survivors' reports. Once one rank is lost or answers that its collective failed,
        the others are waited for up to train.collective_timeout_s plus a chunk (their collective
        fails at once when the peer's connection closes, at that timeout when it hangs); one not
        back by then is lost too (killed)."""
        train = self.cfg.train
        grace_s = train.collective_timeout_s + train.report_interval_s
        pending = {ref: rank for rank, ref in enumerate(refs)}
        reports: dict[int, StepReport] = {}
        lost: dict[int, str] = {}
        until: float | None = None
        while pending:
            if until is not None and time.monotonic() > until:
                for rank in pending.values():
                    lost[rank] = f"no answer within train.collective_timeout_s={train.collective_timeout_s:g}s of a peer's loss"
                kill_quietly([self.actors[rank] for rank in pending.values()])
                break
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
            for ref in done:
                rank = pending.pop(ref)
                try:
                    reports[rank] = ray.get(ref)
                    if reports[rank].interrupted:
                        # A peer is lost or hangs: the others get as long as after a death.
                        until = until or time.monotonic() + grace_s
                except RayActorError as err:
                    lost[rank] = first_line(err)
                    until = until or time.monotonic() + grace_s
                except (RayTaskError, RayError) as err:
                    # A learner that raised (not a lost peer): its state is in doubt, the group fails.
                    raise LearnerFailure(f"training: {first_line(err)}") from err
        if lost:
            raise LearnersLost(lost, reports)
        interrupted = [r for r in reports.values() if r.interrupted]
        if interrupted:
            raise LearnerFailure(f"training: a collective failed with every learner alive: {interrupted[0].interrupted}")
        return [reports[rank] for rank in range(len(refs))]

    def losses(self) -> LearnersLost | None:
        """The members whose actor is gone or does not answer within train.collective_timeout_s, as a
        loss (None if every one answers): after a failure outside a chunk, such as a checkpoint's."""
        lost = unanswered(self.actors, self.cfg.train.collective_timeout_s)
        return LearnersLost(lost) if lost else None

    def shrink(self, lost: Iterable[int]) -> Shrunk:
        """Go on without the `lost` ranks (killed here). The survivors' views of the last chunk give
        what every rank, the lost ones too, trained up to the last step any survivor completed; the
        survivor that got furthest leads: the others settle the step they were attempting against it
        and, when a step behind, take its state. It becomes rank 0 of the new group (whose
        DistributedDataParallel hands its weights to all), the others keep their order."""
        lost = set(lost)
        kill_quietly([self.actors[rank] for rank in lost])
        survivors = [rank for rank in range(len(self.actors)) if rank not in lost]
        if not survivors:
            raise LearnerFailure("every learner was lost")
        timeout = self.cfg.train.collective_timeout_s
        deadline = time.monotonic() + timeout
        answers = wait_all([self.actors[rank].position.remote() for rank in survivors], None, deadline,
                           "the survivors' positions")
        views = [view for view, _, _ in answers]
        steps = [step for _, step, _ in answers]
        lead = max(range(len(survivors)), key=lambda i: steps[i])
        committed, images_seen = steps[lead], answers[lead][2]
        progress = GroupView.union(views)
        settled = wait_all([self.actors[rank].settle.remote(committed) for rank in survivors], None, deadline,
                           "settling the step under way")
        behind = [survivors[i] for i, step in enumerate(settled) if step < committed]
        if behind:
            state = self.actors[survivors[lead]].shared_state.remote()
            wait_all([self.actors[rank].adopt.remote(state) for rank in behind], None, deadline,
                     "a survivor taking the leader's state")
        order = [survivors[lead]] + [rank for rank in survivors if rank != survivors[lead]]
        self.actors = [self.actors[rank] for rank in order]
        self._regroup(deadline)
        return Shrunk(progress=progress, step=committed, images_seen=images_seen, old_ranks=order,
                      adopted=len(behind))

    def launch_joiner(self) -> Joiner:
        """Start a learner for this group without waiting for room: Ray places it when the cluster has
        its CPUs (and GPU); `grow` takes it in once it answers."""
        actor = self._new_learner(len(self.actors), len(self.actors) + 1)
        return Joiner(actor=actor, ready=actor.ping.remote())

    def grow(self, joiners: list[Joiner]) -> list[int]:
        """Take started learners into the group: all form a new process group (the joiners build their
        model there) and the joiners take rank 0's state over Ray, keeping their own fresh queue and
        random streams. Their new ranks. If that fails, the joiners are killed and left out (the
        members' process group is then torn: `shrink` forms it again) and `LearnerFailure` raised."""
        deadline = time.monotonic() + self.cfg.train.collective_timeout_s
        first = len(self.actors)
        self.actors += [joiner.actor for joiner in joiners]
        try:
            self._regroup(deadline)
            state = self.actors[0].shared_state.remote()
            wait_all([joiner.actor.adopt.remote(state) for joiner in joiners], None, deadline,
                     "a joining learner taking the group's state")
        except (LearnerFailure, GetTimeoutError) as err:
            kill_quietly(self.actors[first:])
            del self.actors[first:]
            raise LearnerFailure(f"taking in {len(joiners)} learner(s): {first_line(err)}") from err
        return list(range(first, len(self.actors)))

    def _regroup(self, deadline: float) -> None:
        world = len(self.actors)
        master_addr, master_port = (wait_all([self.actors[0].address.remote()], None, deadline, "a new group's master")[0]
                                    if world > 1 else (None, None))
        wait_all([actor.regroup.remote(master_addr, master_port, rank, world) for rank, actor in enumerate(self.actors)],
                 None, deadline, "forming the learners' process group again")

    def save(self, directory: str, extra: dict[str, Any], info: dict[str, Any],
             lease_run: str | None = None, displaced_run: str | None = None) -> CheckpointInfo:
        """Rank 0 writes the checkpoint, with the other ranks' queues and random states (while run
        `lease_run` holds the folder's lease, when given; it took it from `displaced_run`).

        No deadline and no stop check: a stop waits for the checkpoint under way (it is what a stop
        wants kept). The write is bounded by storage: a local disk's write, or s3fs's own retries and
        timeouts for an object store; a learner that dies meanwhile fails the call."""
        others = [actor.rank_state.remote() for actor in self.actors[1:]]
        ref = self.actors[0].save_checkpoint.remote(directory, extra, others, info, lease_run, displaced_run)
        pending = [ref]
        while pending:  # in short waits, so that Python's signal handlers run meanwhile
            done, pending = ray.wait(pending, timeout=POLL_S)
        try:
            return ray.get(ref)
        except RayActorError as err:
            raise LearnerFailure(f"checkpoint: {first_line(err)}") from err
        # A RayTaskError (the save itself raised, e.g. a full disk) goes to the caller unchanged.

    def shutdown(self) -> None:
        kill_quietly(self.actors)
        self.actors = []
        if self._placement is not None:
            try:
                remove_placement_group(self._placement)
            except Exception:  # noqa: BLE001 - gone with the cluster
                pass
            self._placement = None


__all__ = ["LearnerGroup", "LearnerFailure", "LearnersLost", "Shrunk", "Joiner", "Stopped", "wait_all", "first_line",
           "kill_quietly", "unanswered"]
