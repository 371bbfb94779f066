"""A learner's own supply of batches: it pulls from the decode actors assigned to it.

Each decode actor ("feeder") has a queue of items in call order: requests in
flight (object refs) and, at the front, a batch fetched but not trained yet.
Batches of one feeder are consumed strictly in that order, which is what makes
the stream bookkeeping exact: a feeder's batches reach ever further into the
same shards, so once a batch is trained every earlier batch of that feeder is
too. Batches of different feeders interleave freely.

At most `inflight` requests per feeder are outstanding, which bounds the
decoded batches waiting in the object store (backpressure). A feeder that
answers None had nothing to read; it is asked again after `idle_retry_s`. A
feeder whose call fails (its actor died, or the batch was lost with its node)
is dropped together with every batch of it not yet trained; the driver replaces
it and has the new one re-read from what was trained.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError, RayTaskError

from stream_swav import logs
from stream_swav.data.batch import CropBatch

log = logging.getLogger(__name__)

# What a lost feeder looks like from the learner: its actor died, it raised, or a batch it made
# vanished with its node.
FEEDER_FAILURES = (RayActorError, RayTaskError, ObjectLostError, OwnerDiedError)


@dataclass
class _Feeder:
    handle: Any
    # Oldest first: ObjectRefs of requests in flight, possibly a fetched CropBatch at the front.
    items: collections.deque = field(default_factory=collections.deque)
    idle_until: float = 0.0
    # Replays (key, further shows) to ask for with the next request (curation.balance_mode resample).
    replays: list = field(default_factory=list)


class Feed:
    def __init__(self, batch_size: int, inflight: int, idle_retry_s: float = 0.2) -> None:
        self.batch_size = batch_size
        self.inflight = inflight
        self.idle_retry_s = idle_retry_s
        self.feeders: dict[int, _Feeder] = {}
        self.failed: list[int] = []
        self._turn = 0

    def attach(self, slot: int, handle: Any) -> None:
        """Take batches from decode actor `handle` as feeder `slot` (replacing whatever was there)."""
        self.feeders[slot] = _Feeder(handle)

    def held(self) -> int:
        """Batches requested or fetched and not trained yet."""
        return sum(len(f.items) for f in self.feeders.values())

    def next(self, timeout: float, on_empty: Any) -> tuple[int, CropBatch] | None:
        """The next batch with samples, as (feeder slot, batch), or None if none came within `timeout`.

        Batches with no samples only carry bookkeeping; `on_empty(meta)` receives them in order."""
        deadline = time.monotonic() + timeout
        while True:
            self.refill()
            for slot, feeder in self._in_turn():
                if feeder.items and isinstance(feeder.items[0], CropBatch):
                    return slot, feeder.items.popleft()
            heads = {feeder.items[0]: slot for slot, feeder in self._in_turn() if feeder.items}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if not heads:
                time.sleep(min(remaining, self.idle_retry_s))
                continue
            ready, _ = ray.wait(list(heads), num_returns=1, timeout=min(remaining, self.idle_retry_s),
                                fetch_local=True)
            for ref in ready:
                slot = heads[ref]
                feeder = self.feeders[slot]
                try:
                    batch = ray.get(ref)
                except FEEDER_FAILURES as err:
                    self._fail(slot, err)
                    continue
                feeder.items.popleft()
                if batch is None:
                    # Nothing assigned to read: ask again a little later, not in a busy loop.
                    feeder.idle_until = time.monotonic() + self.idle_retry_s
                elif len(batch) == 0:
                    on_empty(batch.meta)
                else:
                    self._turn = slot + 1
                    return slot, batch

    def put_back(self, slot: int, batch: CropBatch) -> None:
        """A batch taken but not trained: first in line again for its feeder."""
        if slot in self.feeders:
            self.feeders[slot].items.appendleft(batch)

    def ask_replays(self, slot: int, replays: list[tuple[str, int]]) -> None:
        """Ask feeder `slot` for these images of its batches again, with its next request; a feeder
        gone (replaced since) takes nothing: its successor never had those images."""
        if slot in self.feeders and replays:
            self.feeders[slot].replays.extend(replays)

    def take_failed(self) -> list[int]:
        failed, self.failed = self.failed, []
        return failed

    def refill(self) -> None:
        """Keep `inflight` requests outstanding at every feeder not known to be idle."""
        now = time.monotonic()
        for feeder in self.feeders.values():
            if now < feeder.idle_until:
                continue
            while len(feeder.items) < self.inflight:
                feeder.items.append(feeder.handle.next_batch.remote(self.batch_size, feeder.replays))
                feeder.replays = []

    def _in_turn(self) -> list[tuple[int, _Feeder]]:
        """Feeders in round-robin order, starting after the one that gave the last batch."""
        slots = sorted(self.feeders)
        start = next((i for i, slot in enumerate(slots) if slot >= self._turn), 0)
        return [(slot, self.feeders[slot]) for slot in slots[start:] + slots[:start]]

    def _fail(self, slot: int, err: Exception) -> None:
        log.warning("decode actor %d failed (%s); dropping its %d untrained batch(es)", slot,
                    logs.error_line(err), len(self.feeders[slot].items))
        del self.feeders[slot]
        self.failed.append(slot)


__all__ = ["Feed", "FEEDER_FAILURES"]
