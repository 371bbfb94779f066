"""The decode actors of a run: spawned, given shard tasks, replaced when they fail.

Each slot feeds one learner rank (at launch, slot s feeds rank s % learners; a
replacement takes over its slot). Actors that cannot be placed in time are
dropped, with a warning, as long as every learner keeps one; the cluster may
simply have fewer CPUs than planned (a lost node). A dropped slot is tried
again every train.resize_interval_s (`poll`), so the room a returning node
brings gives its learner the actor back. At start, a learner left
with none ends the run (`StartupError`); later, its last replacement, if it
was not placed in time, is launched again until one starts. When an elastic group loses
a rank, that rank's actors go with it and their shards are re-read from what
was trained (`drop_ranks`); a joining rank gets actors of its own
(`launch_for`, `take_in`).

With curation.dedup, each actor owns a seen-set of the images it decoded. The
pool gathers them, cut back to what was trained, for a checkpoint
(`seen_states`), hands every live actor what the driver's union gained from
them (`share_seen`), so that repeats read by different actors meet at the
latest one checkpoint later, and starts every actor it launches, replacements
included, from the whole union (`seen_source`).
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError

from stream_swav.config import Config
from stream_swav.runtime.actors import DecodeActor
from stream_swav.runtime.cluster import StartupError
from stream_swav.runtime.learner_group import POLL_S, Stopped, first_line, kill_quietly
from stream_swav.runtime.ledger import StreamLedger

log = logging.getLogger("stream_swav.decoders")

# How `_start_failure` names an actor that was not placed in time, and one whose process or node was
# lost while it started (a preempted CPU node): another try may succeed, where an actor whose
# constructor raised would fail again.
PLACEMENT_TIMEOUT = "TimeoutError: not placed"
LOST_WHILE_STARTING = "lost while starting"
WORTH_ANOTHER_TRY = (PLACEMENT_TIMEOUT, LOST_WHILE_STARTING)


class DecodePool:
    def __init__(self, cfg: Config, learners: int, build_worker: Callable[[Config, int], Any] | None = None,
                 seen_source: Callable[[], dict[str, Any] | None] | None = None) -> None:
        self.cfg = cfg
        self.learners = learners
        self.build_worker = build_worker
        self.actors: dict[int, Any] = {}
        # Which learner rank each slot feeds.
        self.rank_of: dict[int, int] = {}
        # Actors started for a learner about to join: slot -> (handle, ready ref, deadline).
        self.joining: dict[int, tuple[Any, Any, float]] = {}
        self._next_slot = 0
        # Replacements not known to be up yet: slot -> (ready ref, deadline).
        self._starting: dict[int, tuple[Any, float]] = {}
        # Slots given up on. Those dropped for want of room (`regainable`) are tried again from
        # `_regain_at` on, each try an actor that holds no shards until it is up: slot -> (handle,
        # ready ref, deadline). One that failed to start would fail again, and is not.
        self.dropped: set[int] = set()
        self.regainable: set[int] = set()
        self.regaining: dict[int, tuple[Any, Any, float]] = {}
        self._regain_at = 0.0
        # Launched by `launch`, not yet waited for by `wait_started`: slot -> handle.
        self._launched: dict[int, Any] = {}
        # The trained seen-set union now (None when empty or without curation.dedup), for every actor
        # launched: at a (re)start the restored checkpoint's, later the latest checkpoint's.
        self.seen_source = seen_source

    def feeders(self) -> dict[int, dict[int, Any]]:
        """rank -> {slot: handle} of the live decode actors."""
        by_rank: dict[int, dict[int, Any]] = {rank: {} for rank in range(self.learners)}
        for slot, handle in self.actors.items():
            by_rank[self.rank_of[slot]][slot] = handle
        return by_rank

    def up(self) -> int:
        """How many actors feed learners now (replacements still starting are not counted)."""
        return len(self.actors) - len(self._starting)

    def launch(self, count: int) -> None:
        """Start `count` decode actors without waiting for them (`wait_started` does), so that they
        start while the learners do."""
        seen = self._union_once()
        self._launched = {slot: self._launch(slot, seen) for slot in range(count)}
        self.rank_of = {slot: slot % self.learners for slot in range(count)}
        self._next_slot = count

    def drop_ranks(self, ranks: set[int], ledger: StreamLedger) -> int:
        """The actors feeding learner `ranks` (lost) are stopped and their shards go back to be re-read
        from what was trained; the ledger must have recorded what those ranks trained first. How many."""
        slots = [slot for slot, rank in self.rank_of.items() if rank in ranks]
        for slot in slots:
            handle = self.actors.pop(slot, None)
            self._starting.pop(slot, None)
            self.rank_of.pop(slot)
            self.dropped.discard(slot)
            self.regainable.discard(slot)
            trying, _, _ = self.regaining.pop(slot, (None, None, None))
            kill_quietly([h for h in (handle, trying) if h is not None])
            ledger.release(slot)
        return len(slots)

    def renumber(self, old_ranks: list[int]) -> None:
        """The learners were numbered again: new rank i was rank old_ranks[i]."""
        new_rank = {old: new for new, old in enumerate(old_ranks)}
        self.rank_of = {slot: new_rank[rank] for slot, rank in self.rank_of.items()}
        self.learners = len(old_ranks)

    def launch_for(self, count: int) -> list[int]:
        """Start `count` actors for a learner about to join, without waiting (`joined` looks): their slots."""
        deadline = time.monotonic() + self.cfg.train.startup_timeout_s
        slots = []
        seen = self._union_once()
        for _ in range(count):
            slot, self._next_slot = self._next_slot, self._next_slot + 1
            handle = self._launch(slot, seen)
            self.joining[slot] = (handle, handle.ready.remote(), deadline)
            slots.append(slot)
        return slots

    def joined(self, slots: list[int]) -> tuple[bool, list[int]]:
        """Of actors started for a joining learner: (whether each is up or given up on, those up).
        One that failed to start or is past its deadline is given up on."""
        up, waiting = [], False
        for slot in slots:
            if slot not in self.joining:
                continue
            handle, ready, deadline = self.joining[slot]
            failure = self._start_failure(ready, deadline)
            if failure is None:
                waiting = True
            elif not failure:
                up.append(slot)
            else:
                log.warning("decode actor %d for a joining learner could not start: %s", slot, failure)
                kill_quietly([handle])
                del self.joining[slot]
        return not waiting, up

    def take_in(self, slots: list[int], rank: int) -> dict[int, Any]:
        """These joining actors feed learner `rank` from now: its feeders, slot -> handle."""
        feeders = {}
        for slot in slots:
            handle, _, _ = self.joining.pop(slot)
            self.actors[slot] = feeders[slot] = handle
            self.rank_of[slot] = rank
        self.learners = max(self.learners, rank + 1)
        return feeders

    def cancel_joining(self, slots: list[int] | None = None) -> None:
        """Stop actors started for a learner that will not join (all of them by default)."""
        for slot in list(self.joining) if slots is None else slots:
            handle, _, _ = self.joining.pop(slot, (None, None, None))
            if handle is not None:
                kill_quietly([handle])

    def top_up(self, ledger: StreamLedger) -> None:
        """Keep every actor holding its share of shard tasks."""
        for slot, tasks in ledger.top_up(sorted(self.actors)).items():
            self.actors[slot].assign.remote(tasks)

    def replace(self, slots: list[int], ledger: StreamLedger) -> dict[int, dict[int, Any]]:
        """Decode actors that failed: their shards go back to the ledger (re-read from what was
        trained), and new actors take their slots at once; `poll` later checks they came up.
        Returns the new feeders, rank -> {slot: handle}."""
        by_rank: dict[int, dict[int, Any]] = {}
        deadline = time.monotonic() + self.cfg.train.startup_timeout_s
        seen = self._union_once()
        for slot in slots:
            if slot in self.dropped:
                continue  # given up on: its learner's calls to the old actor fail, nothing to replace
            log.warning("decode actor %d failed; replacing it and re-reading its shards from what was trained",
                        slot)
            handle = self.actors.pop(slot, None)
            if handle is not None:
                ray.kill(handle, no_restart=True)
            ledger.release(slot)
            by_rank.setdefault(self.rank_of[slot], {})[slot] = self._launch_replacement(slot, deadline, seen)
        return by_rank

    def _launch_replacement(self, slot: int, deadline: float, seen: Callable[[], Any]) -> Any:
        """A new actor in `slot`, which `poll` watches until it is up or `deadline` passes."""
        handle = self.actors[slot] = self._launch(slot, seen)
        self._starting[slot] = (handle.ready.remote(), deadline)
        return handle

    def poll(self, ledger: StreamLedger, regain: bool = True) -> dict[int, dict[int, Any]]:
        """Replacements that came up are done with; one not up by its deadline is dropped and its
        shards go back (the cluster may have lost the room for it), unless it is its learner's last
        and was not placed in time: that one is launched again, with a new deadline, for as long as
        it takes (a learner without a decode actor holds every step back; the cluster may get the
        room back, and the stall warning says what waits). A learner's last that failed to start
        ends the run (`StartupError`). With `regain`, dropped slots are tried again (`_regain`).
        Returns the feeders launched again and those regained, rank -> {slot: handle}."""
        seen = self._union_once()
        relaunched = self._regain(regain, seen)
        for slot, (ready, deadline) in list(self._starting.items()):
            failure = self._start_failure(ready, deadline)
            if failure is None:
                continue
            del self._starting[slot]
            if not failure:
                continue
            ray.kill(self.actors.pop(slot), no_restart=True)
            ledger.release(slot)
            rank = self.rank_of[slot]
            # A lack of room, or a node lost under it, is waited out; an actor that fails to start
            # would fail again.
            if not self.feeders()[rank] and failure.startswith(WORTH_ANOTHER_TRY):
                log.warning("decode actor %d could not start again (%s); it is learner %d's only one, so it is "
                            "launched again: nothing trains until it starts", slot, failure, rank)
                deadline = time.monotonic() + self.cfg.train.startup_timeout_s
                relaunched.setdefault(rank, {})[slot] = self._launch_replacement(slot, deadline, seen)
                continue
            log.warning("decode actor %d could not start again (%s); running without it", slot, failure)
            self._drop(slot, regain=failure.startswith(WORTH_ANOTHER_TRY))
            self._check_every_learner_fed()
        return relaunched

    def _drop(self, slot: int, regain: bool) -> None:
        """Give `slot` up; with `regain` (it was not placed for want of room), to be tried again
        train.resize_interval_s from now."""
        self.dropped.add(slot)
        if regain:
            self.regainable.add(slot)
            self._regain_at = time.monotonic() + self.cfg.train.resize_interval_s

    def _regain(self, try_again: bool, seen: Callable[[], Any]) -> dict[int, dict[int, Any]]:
        """Actors of dropped slots that came up, rank -> {slot: handle}: they feed their learner again
        (and get shards at the next top-up). A try not up by its deadline is stopped; with
        `try_again`, the slots dropped for want of room are tried again train.resize_interval_s after
        the last try ended, and not while a replacement is starting (a learner's last waits in
        `_starting`, and a try must not take the room it waits for); without it, tries under way
        stop. A try holds no shards, so one that waits for room holds nothing back."""
        regained: dict[int, dict[int, Any]] = {}
        for slot, (handle, ready, deadline) in list(self.regaining.items()):
            failure = self._start_failure(ready, deadline) if try_again else "the room goes to joining learners"
            if failure is None:
                continue
            del self.regaining[slot]
            if failure:
                kill_quietly([handle])
                log.debug("decode actor %d is still dropped: %s", slot, failure)
                continue
            self.dropped.discard(slot)
            self.regainable.discard(slot)
            self.actors[slot] = regained.setdefault(self.rank_of[slot], {})[slot] = handle
            # What the seen-set union gained while it started (a checkpoint's share reached only actors up).
            union = seen()
            if union is not None:
                handle.absorb_seen.remote(union)
            log.warning("decode actor %d is back (it was dropped for want of room): learner %d pulls from it again",
                        slot, self.rank_of[slot])
        now = time.monotonic()
        if self.regaining or self._starting:
            self._regain_at = max(self._regain_at, now + self.cfg.train.resize_interval_s)
        elif try_again and self.regainable and now >= self._regain_at:
            deadline = now + self.cfg.train.startup_timeout_s
            for slot in sorted(self.regainable):
                handle = self._launch(slot, seen)
                self.regaining[slot] = (handle, handle.ready.remote(), deadline)
        return regained

    def _start_failure(self, ready: Any, deadline: float) -> str | None:
        """Of an actor started with `ready` = its ready() ref: None while it may still come up by
        `deadline`, "" once it is up, else why it will not, in one line."""
        done, _ = ray.wait([ready], timeout=0)
        if not done:
            if time.monotonic() <= deadline:
                return None
            return f"{PLACEMENT_TIMEOUT} within train.startup_timeout_s={self.cfg.train.startup_timeout_s:g}s"
        try:
            ray.get(ready)
        except RayActorError as err:
            if err.actor_init_failed:  # its constructor raised
                return first_line(err)
            return f"{LOST_WHILE_STARTING} ({first_line(err)})"
        except Exception as err:  # noqa: BLE001 - whatever kept it from starting, it is given up on
            return first_line(err)
        return ""

    def seen_states(self, trained: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
        """Every live actor's seen-set cut back (by the actor) to the stream cursor state `trained`,
        each of its newest curation.seen_capacity / actors hashes, so that what they send is about
        one set's size whatever the number of actors; as far as they answer within `timeout_s` (an
        actor answers after the batch requests queued before; one that does not is left out, with a
        warning: its repeats since the last checkpoint may be admitted again after a resume).
        Replacements not up yet are not asked: they have read nothing."""
        asked = {slot: handle for slot, handle in self.actors.items() if slot not in self._starting}
        newest = -(-self.cfg.curation.seen_capacity // max(1, len(asked)))
        trained_ref = ray.put(trained)
        pending = {handle.seen_state.remote(trained_ref, newest): slot for slot, handle in asked.items()}
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s) if pending else ([], [])
        states = []
        for ref in done:
            try:
                state = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a failed actor is replaced after its learner reports it
                log.warning("decode actor %d gave no seen-set for the checkpoint: %s", pending[ref], first_line(err))
                continue
            if state is not None:
                states.append(state)
        if late:
            log.warning("decode actor(s) %s gave no seen-set within %.0fs; the checkpoint saves the others'",
                        sorted(pending[ref] for ref in late), timeout_s)
        return states

    def share_seen(self, state: dict[str, Any]) -> None:
        """Give every live actor this seen-set state (trained hashes) to merge into its own."""
        ref = ray.put(state)
        for handle in self.actors.values():
            handle.absorb_seen.remote(ref)

    def shutdown(self) -> None:
        self._starting.clear()
        self.dropped.clear()
        self.regainable.clear()
        self.cancel_joining()
        kill_quietly([*self.actors.values(), *self._launched.values(), *(h for h, _, _ in self.regaining.values())])
        self.regaining.clear()
        self.actors, self._launched = {}, {}

    def wait_started(self, stop: threading.Event) -> None:
        """Wait up to train.startup_timeout_s, counted from now (a decode actor that started beside
        the learners had their start-up time too), until the launched actors are up; those that
        are not are dropped, unless that leaves a learner without any."""
        started, self._launched = self._launched, {}
        pending = {handle.ready.remote(): slot for slot, handle in started.items()}
        deadline = time.monotonic() + self.cfg.train.startup_timeout_s
        while pending and time.monotonic() < deadline:
            if stop.is_set():
                kill_quietly(started.values())
                raise Stopped("stop requested while starting decode actors")
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
            for ref in done:
                slot = pending.pop(ref)
                try:
                    ray.get(ref)
                    self.actors[slot] = started[slot]
                except Exception as err:  # noqa: BLE001 - a decode actor that cannot start is dropped below
                    log.warning("decode actor %d could not start: %s", slot, first_line(err))
        for ref, slot in pending.items():
            ray.kill(started[slot], no_restart=True)
            self._drop(slot, regain=True)
            log.warning("decode actor %d could not be placed within train.startup_timeout_s=%gs; running without it",
                        slot, self.cfg.train.startup_timeout_s)
        self._check_every_learner_fed()

    def _union_once(self) -> Callable[[], Any]:
        """The seen-set union for the actors one call starts: packed and put in the object store at
        most once for all of them, and only if one starts (at the default capacity packing alone
        takes seconds, and the state is ~10 MB); None without a union."""
        return functools.cache(self._seen_ref)

    def _seen_ref(self) -> Any:
        seen = self.seen_source() if self.seen_source is not None else None
        return ray.put(seen) if seen is not None else None

    def _launch(self, slot: int, seen: Callable[[], Any]) -> Any:
        """Start the decode actor of `slot`, giving it the union (`_union_once`) first where there is one."""
        handle = DecodeActor.options(num_cpus=1, max_restarts=0).remote(self.cfg, slot, self.build_worker)
        union = seen()
        if union is not None:
            handle.absorb_seen.remote(union)
        return handle

    def _check_every_learner_fed(self) -> None:
        starving = [rank for rank, slots in self.feeders().items() if not slots]
        if starving:
            raise StartupError(f"data.decode_actors: learner(s) {starving} have no decode actor: none could be "
                               f"placed within train.startup_timeout_s={self.cfg.train.startup_timeout_s:g}s; "
                               f"the cluster needs free CPUs for them")


__all__ = ["DecodePool"]
