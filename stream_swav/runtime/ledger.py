"""The stream ledger: what was trained, and which decode actor reads which shard.

One `StreamCursor` records what was trained: it moves only when learners
report trained batches, which makes it the state a checkpoint saves. Next to
it, the ledger keeps which shards each decode actor slot holds, so that a
replaced actor's shards are re-read from what was trained (nothing lost, and
nothing its learner had not trained yet is counted), and so that every actor
always holds a few shards ahead of what it reads (its open shards plus as
many waiting).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from stream_swav.data.cursor import ReadOrder, ShardKey, ShardTask, StreamCursor
from stream_swav.runtime.reports import Progress

log = logging.getLogger("stream_swav.ledger")


# A pass that read nothing (every shard failed) is followed by a pause before the next one, doubling
# from the first to the last, rather than decode actors racing through passes that cannot be read.
EMPTY_PASS_PAUSE_S = (1.0, 60.0)

# A followed shard missing from this many listings in a row is retired: gone for good (bucket
# retention, a line dropped from a .txt list). More than one, so that a listing that comes back short
# once (a list file caught half written) does not cut the shards it missed out of the passes under way.
LISTINGS_TO_RETIRE = 2


class StreamLedger:
    def __init__(self, seed: int, shards_per_slot: int, order: ReadOrder | None = None) -> None:
        # The run's reading settings, which the cursor records for every shard it hands out.
        self.order = order
        self.cursor = StreamCursor(seed, order)
        self.shards_per_slot = shards_per_slot
        self.holders: dict[int, set[ShardKey]] = {}
        # No new tasks before this time (time.monotonic()), after a pass that read nothing.
        self.paused_until = 0.0
        # Known shards missing from the latest listings: how many listings in a row.
        self.missing: dict[str, int] = {}

    def follow_listing(self, listing: list[str]) -> tuple[list[str], list[str]]:
        """A listing of the shards that exist now: new ones join the newest pass under way, returning
        (retired) ones the next pass opened, and those missing from LISTINGS_TO_RETIRE listings in a
        row are retired. Returns (new and returning, retired)."""
        new = self.cursor.add_shards(listing)
        self.missing = {url: self.missing.get(url, 0) + 1 for url in self.unlisted(listing)}
        retired = self.cursor.retire([url for url, times in self.missing.items() if times >= LISTINGS_TO_RETIRE])
        for url in retired:
            del self.missing[url]
        return new, retired

    def unlisted(self, listing: list[str]) -> list[str]:
        """The live shards this listing lacks."""
        present = set(listing)
        return [url for url in self.cursor.live_urls() if url not in present]

    def top_up(self, slots: Iterable[int]) -> dict[int, list[ShardTask]]:
        """New shard tasks for these decode actor slots, each up to `shards_per_slot` held at once,
        dealt one at a time in turn, so that when shards are scarce every slot (and so every learner)
        still gets some. A slot holding none gets one whatever the passes in hand have left: its
        learner could otherwise have nothing to train while the others, which step with it, wait
        with every shard left (`StreamCursor.next_task`'s `idle`)."""
        slots = list(slots)
        tasks: dict[int, list[ShardTask]] = {}
        if time.monotonic() < self.paused_until:
            return tasks
        for depth in range(1, self.shards_per_slot + 1):
            for slot in slots:
                held = self.holders.setdefault(slot, set())
                if len(held) >= depth:
                    continue
                task = self.cursor.next_task(idle=not held)
                if task is None:
                    return tasks
                held.add(task.key)
                tasks.setdefault(slot, []).append(task)
        return tasks

    def record(self, progress: Progress) -> None:
        """Trained batches: move the cursor, and let go of finished shards."""
        empty_before = self.cursor.empty_passes_in_row
        self.cursor.advance(progress.positions, progress.finished, progress.identities)
        for key in progress.finished:
            for held in self.holders.values():
                held.discard(key)
        if self.cursor.empty_passes_in_row > empty_before:
            first, last = EMPTY_PASS_PAUSE_S
            pause = min(last, first * 2 ** (self.cursor.empty_passes_in_row - 1))
            self.paused_until = time.monotonic() + pause
            log.warning("pass %d ended without a single sample read (%d pass(es) in a row; every read failed, see "
                        "stream_swav_decode_errors_total): waiting %.0fs before handing out more shards",
                        self.cursor.last_empty_pass, self.cursor.empty_passes_in_row, pause)

    def release(self, slot: int) -> None:
        """Decode actor `slot` is gone: its shards go back, to be re-read from what was trained."""
        for key in self.holders.pop(slot, set()):
            self.cursor.release(key)

    def state_dict(self) -> dict[str, Any]:
        return self.cursor.state_dict()

    def rewind(self, state: dict[str, Any] | None, seed: int, current_shards: list[str],
               saved_order: ReadOrder | None = None) -> None:
        """Back to a checkpoint's cursor (or to the start of the stream when `state` is None), with
        nothing assigned; shards listed now but unknown to the checkpoint join the newest pass under way,
        and those it knows that are not listed now count one listing missed (`follow_listing`).
        `saved_order`: the reading settings of the run that saved `state`, for its part-read shards
        where a state from before 2026-12-08 does not record them."""
        self.holders.clear()
        self.paused_until = 0.0
        self.missing = {}
        self.cursor = StreamCursor(seed, self.order)
        if state is not None:
            self.cursor.load_state_dict(state, saved_order)
        self.follow_listing(current_shards)


__all__ = ["StreamLedger"]
