"""Repeat detection for online curation (issue #23): a perceptual hash of each image and a bounded
set of the hashes seen, counted per pass, matching near-copies by Hamming distance.

Pure state, no Ray or I/O: with `curation.dedup` on, each decode worker owns one `SeenSet` and asks
`admit` for every image it decodes (`data.worker`); at each checkpoint every worker cuts its set
back to the stream cursor (`SeenSet.trained_state`) and the driver merges them into the union it
saves and shares (`SeenSet.merge_trained`, `runtime.driver`).
`pipelines/dedup_study.py` measures the detector offline on the messy-stream benchmark.

The hash (pHash): the image in gray at 32x32, its 2-D DCT, the 8x8 lowest frequencies; bit i is
set when coefficient i exceeds their median (the DC term excluded: it only says how bright the
image is). Re-encoding, rescaling and small shifts move few bits; different images differ in about
half. A flat image has no AC energy and hashes to 0, so blank and solid placeholders are repeats of
one another, which is what a curator wants of them.
"""
from __future__ import annotations

import functools
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from stream_swav.data.cursor import ShardKey, inflate, inflation_limit

HASH_BITS = 64
_HASH_SIDE = 32  # the gray thumbnail the DCT runs on
_LOW = 8  # the lowest 8x8 frequencies make the 64 bits


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II: rows are frequencies (read-only: it is shared)."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    m.flags.writeable = False
    return m


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit DCT hash of `image` (any mode, any size)."""
    # reducing_gap: a large image is first box-reduced by an integer factor, then filtered (half the
    # time at 640 px; identical for images under twice the thumbnail's side).
    thumbnail = image.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    gray = np.asarray(thumbnail, dtype=np.float64)
    # Only the lowest frequencies are kept, so only their rows of the DCT are computed (half the time).
    low_rows = _dct_matrix(_HASH_SIDE)[:_LOW]
    low = (low_rows @ gray @ low_rows.T).ravel()
    ac = low[1:]
    # A flat image leaves only rounding noise in the AC terms: it must hash to 0, not to that noise.
    if np.abs(ac).max() < 1e-6 * max(1.0, abs(low[0])):
        return 0
    # The median of the 63 AC terms is the middle one (np.median is ten times slower at this size).
    bits = low > np.sort(ac)[len(ac) // 2]
    bits[0] = False
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


# Bounds of a near-match bucket (`SeenSet`): a share of the capacity, above what real images put
# in one band value (perceptual hashes are far from uniform: on the 50x messy benchmark stream the
# commonest value of a band holds 5.6% of the distinct hashes at distance 4, 0.56% at distance 2,
# where random hashes would put 0.02% and 0.00005%), so that only a crafted crowd is cut; and
# BUCKET_MIN at least.
BUCKET_MIN = 64
BUCKET_SHARE = 1 / 8


# An admitted occurrence is one int: pass, shard number and emission position packed together.
_POSITION_BITS = 32
_SHARD_BITS = 40


def _pack(pass_index: int, shard: int, position: int) -> int:
    if not (0 <= position < 1 << _POSITION_BITS and 0 <= shard < 1 << _SHARD_BITS and pass_index >= 0):
        raise ValueError(f"occurrence out of range: pass {pass_index}, shard {shard}, position {position}")
    return (pass_index << _SHARD_BITS | shard) << _POSITION_BITS | position


def _unpack(event: int) -> tuple[ShardKey, int]:
    return ((event >> (_SHARD_BITS + _POSITION_BITS), event >> _POSITION_BITS & ((1 << _SHARD_BITS) - 1)),
            event & ((1 << _POSITION_BITS) - 1))


def _pass_of(event: int) -> int:
    return event >> (_SHARD_BITS + _POSITION_BITS)


class SeenSet:
    """The hashes of the images seen, at most `capacity` of them (the least recently seen first
    out), each with the occurrences of it (or of a hash within `max_distance` bits of it) that were
    admitted.

    `admit(h, shard, position)` says whether an image may train: the first `1 + max_repeats`
    occurrences of a hash in a pass may, later ones may not. Counts are per pass, so reading the
    same shards a second time is not taken for duplication. Each admitted occurrence is remembered
    by where it is in the stream (shard key and emission position), which is what lets
    `trained_state` take the set back to the stream cursor: a decode actor runs ahead of what its
    learner has trained, and a checkpoint must not hold the hashes of images it will read again
    after a resume (they would be dropped as repeats of themselves). Only admitted occurrences are
    kept (a dropped one changes nothing), and only those of an entry's latest `PASSES_KEPT` (3)
    passes: two are read at once, a third while a decode actor with nothing else to read runs ahead
    (`StreamCursor.next_task`). A reader stuck for longer, while another runs two passes ahead, lets
    repeats of its pass be admitted again.

    Near matches are found by multi-index hashing: the 64 bits are cut into `max_distance + 1`
    bands, and two hashes within `max_distance` bits agree exactly on at least one band
    (pigeonhole), so only entries sharing a band value are compared. With `max_distance` 0 the
    hash itself is the key and there is no index. An entry is keyed by the first hash that made it;
    a near match adds its occurrence there. Memory (tracemalloc, 200,000 random hashes, one
    occurrence each): ~140 bytes per hash at distance 0 (~220 for one taken in from the union,
    marked shared; 2026-12-07), ~630 at distance 2 (three bands, measured before that).
    """

    def __init__(self, capacity: int, max_distance: int = 0, max_repeats: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 0 <= max_distance < HASH_BITS // 2:
            raise ValueError(f"max_distance must be in [0, {HASH_BITS // 2 - 1}], got {max_distance}")
        if max_repeats < 0:
            raise ValueError(f"max_repeats must be >= 0, got {max_repeats}")
        self.capacity = capacity
        self.max_distance = max_distance
        self.max_repeats = max_repeats
        edges = np.linspace(0, HASH_BITS, max_distance + 2).round().astype(int)
        self._bands = [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])] if max_distance else []
        # A band value's hashes, at most BUCKET_SHARE of the capacity (BUCKET_MIN at least): images
        # crafted to share a band cannot make each lookup scan the whole set. Past it a bucket
        # forgets its oldest hash, found then only where another band agrees too.
        self._bucket_cap = max(BUCKET_MIN, int(BUCKET_SHARE * capacity))
        # hash -> its admitted occurrences (one packed int, or a tuple of them); least recently seen first.
        self._entries: OrderedDict[int, int | tuple[int, ...]] = OrderedDict()
        # Band value (band number in the top bits) -> the hashes holding it, oldest first; only with
        # max_distance > 0. Lists: most buckets hold one hash, and a dict each would double the memory.
        self._index: dict[int, list[int]] = {}
        # Entries absorbed from the union that this set has added nothing to since: the union has
        # them, so `trained_state(news_only=True)` leaves them out.
        self._shared: set[int] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def _keys(self, h: int) -> list[int]:
        return [band << HASH_BITS | (h >> lo) & ((1 << (hi - lo)) - 1) for band, (lo, hi) in enumerate(self._bands)]

    def _nearest(self, h: int) -> int | None:
        """The stored hash nearest to `h` within max_distance bits, or None."""
        if h in self._entries or not self._bands:
            return h if h in self._entries else None
        best, best_distance = None, self.max_distance + 1
        for key in self._keys(h):
            for other in self._index.get(key, ()):
                distance = hamming(h, other)
                if distance < best_distance:
                    best, best_distance = other, distance
        return best

    def _insert(self, h: int, events: tuple[int, ...]) -> None:
        """A new entry, as the most recently seen one."""
        if len(self._entries) >= self.capacity:
            evicted, _ = self._entries.popitem(last=False)
            self._unindex(evicted)
            self._shared.discard(evicted)
        self._set(h, events)
        for key in self._keys(h):
            bucket = self._index.setdefault(key, [])
            bucket.append(h)  # oldest first, as in `_entries`
            if len(bucket) > self._bucket_cap:
                del bucket[0]

    def _unindex(self, h: int) -> None:
        for key in self._keys(h):
            bucket = self._index.get(key)
            if bucket is not None and h in bucket:  # a full bucket may have forgotten it
                bucket.remove(h)
                if not bucket:
                    del self._index[key]

    def _events(self, h: int) -> tuple[int, ...]:
        events = self._entries[h]
        return (events,) if isinstance(events, int) else events

    def _set(self, h: int, events: tuple[int, ...]) -> None:
        self._entries[h] = events[0] if len(events) == 1 else events

    def admit(self, h: int, shard: ShardKey, position: int) -> bool:
        """Offer the occurrence of `h` at `position` of `shard` (pass, shard number); True while it
        is within the repeats allowed in its pass (and then it is remembered). Either way the entry
        it matches becomes the most recently seen: a hash reposted all the time stays remembered."""
        pass_index = shard[0]
        event = _pack(pass_index, shard[1], position)
        match = self._nearest(h)
        if match is None:
            self._insert(h, (event,))
            return True
        self._entries.move_to_end(match)
        events = self._events(match)
        if sum(1 for e in events if _pass_of(e) == pass_index) > self.max_repeats:
            return False
        self._set(match, _recent((*events, event)))
        self._shared.discard(match)
        return True

    def trained_state(self, consumed: Callable[[ShardKey, int], bool], newest: int | None = None,
                      news_only: bool = False) -> dict[str, Any]:
        """`state_dict()` of this set cut back to what was consumed (the set itself is unchanged):
        without every admitted occurrence for which `consumed((pass, shard), position)` is False,
        and without the hashes left with none; of those, the `newest` (most recently seen) at most;
        with `news_only`, of the hashes not absorbed from the union unchanged since (what a decode
        actor sends the union: the union has the rest).
        That is the set as if only the consumed samples had been offered (exactly so while nothing
        was evicted and with distance 0), when samples were offered in the order they are consumed,
        which holds for one decode worker, whose batches its learner trains in order."""
        entries: list[tuple[int, tuple[int, ...]]] = []
        for h in reversed(self._entries):
            if newest is not None and len(entries) >= newest:
                break
            if news_only and h in self._shared:
                continue
            kept = tuple(e for e in self._events(h) if consumed(*_unpack(e)))
            if kept:
                entries.append((h, kept))
        return _state_of(entries[::-1])

    def absorb(self, state: dict[str, Any]) -> None:
        """Merge the union's `state_dict()` (what every decode actor trained, or a checkpoint's) into
        this one, in the union's order, each entry becoming the most recently seen (the union saw it
        lately; a full set forgets its own oldest for it): a hash this set matches gains its
        occurrences, the others are added. An entry this set then holds nothing more of than the
        union is marked shared, so that `trained_state(news_only=True)` sends only this set's news."""
        for h, events in _entries_of(state):
            key, before = self._merge(h, events)
            if set(before) <= set(events):
                self._shared.add(key)

    def merge_trained(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """Merge several sets' `trained_state`s (the decode actors') into this one, interleaved by
        age rank (each set's oldest first), so that past `capacity` every set loses its oldest, not
        the last one merged all of its own; returns the `state_dict()` of the entries that were
        added or gained occurrences (what the actors do not all know yet)."""
        ranked = []
        for n, state in enumerate(states):
            entries = _entries_of(state)
            ranked += [((i + 1) / len(entries), n, h, events) for i, (h, events) in enumerate(entries)]
        changed: dict[int, None] = {}
        for _, _, h, events in sorted(ranked, key=lambda r: (r[0], r[1])):
            key, before = self._merge(h, events)
            if self._events(key) != before:
                changed[key] = None
        return _state_of([(h, self._events(h)) for h in changed if h in self._entries])

    def _merge(self, h: int, events: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """Add `h` with `events`, or add the events to the entry matching it, as the most recently
        seen: the entry's key, and its occurrences before (none for a new one)."""
        match = self._nearest(h)
        if match is None:
            self._insert(h, _recent(events))
            return h, ()
        before = self._events(match)
        self._set(match, _recent(tuple(sorted(set(before) | set(events)))))
        self._entries.move_to_end(match)
        return match, before

    def state_dict(self) -> dict[str, Any]:
        """Packed arrays (least recently seen hash first), loadable with torch.load(weights_only=True):
        the hashes, how many admitted occurrences each has, and those occurrences as pass, shard,
        position."""
        return _state_of([(h, self._events(h)) for h in self._entries])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        entries = _entries_of(state)
        self._entries.clear()
        self._index.clear()
        self._shared.clear()
        for h, events in entries:
            self._insert(h, events)


# Passes whose occurrences an entry keeps: two passes are read at once, and a third while a decode
# actor with nothing else to read runs a pass ahead (`StreamCursor.next_task`'s `idle`).
PASSES_KEPT = 3


def _recent(events: tuple[int, ...]) -> tuple[int, ...]:
    """The occurrences of the latest PASSES_KEPT passes among `events`, in order."""
    latest = max(_pass_of(e) for e in events)
    return tuple(e for e in events if _pass_of(e) > latest - PASSES_KEPT)


_STATE_FORMAT = 1


def _state_of(entries: list[tuple[int, tuple[int, ...]]]) -> dict[str, Any]:
    """A state from (hash, packed occurrences) pairs: zlib-compressed little-endian arrays."""
    counts = np.fromiter((len(events) for _, events in entries), np.uint32, len(entries))
    hashes = np.fromiter((h for h, _ in entries), np.uint64, len(entries))
    unpacked = [_unpack(e) for _, events in entries for e in events]
    flat = np.fromiter((x for (pass_index, shard), position in unpacked for x in (pass_index, shard, position)),
                       np.int64, 3 * len(unpacked))
    return {"format": _STATE_FORMAT, **{name: zlib.compress(array.astype(array.dtype.newbyteorder("<")).tobytes(), 1)
                                        for name, array in (("hashes", hashes), ("event_counts", counts),
                                                            ("events", flat))}}


def _entries_of(state: dict[str, Any]) -> list[tuple[int, tuple[int, ...]]]:
    """(hash, packed occurrences) of a state; ValueError when it is malformed."""
    if not isinstance(state, dict):
        raise ValueError(f"malformed seen-set state: expected a dict, got {type(state).__name__}")
    try:
        fmt = state["format"]
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt != _STATE_FORMAT:
            raise ValueError(f"unknown format {fmt!r}")
        hashes = np.frombuffer(inflate(state["hashes"], inflation_limit(state["hashes"]), "hashes"), "<u8").tolist()
        counts = np.frombuffer(inflate(state["event_counts"], 4 * len(hashes), "event_counts"), "<u4").tolist()
        flat = np.frombuffer(inflate(state["events"], 24 * sum(counts), "events"), "<i8").tolist()
        if len(hashes) != len(counts) or 3 * sum(counts) != len(flat) or min(counts, default=1) < 1:
            raise ValueError("hashes, event_counts and events disagree")
        if len(set(hashes)) != len(hashes):
            raise ValueError("a hash appears twice")
        entries, at = [], 0
        for h, count in zip(hashes, counts):
            entries.append((h, tuple(_pack(*flat[i:i + 3]) for i in range(at, at + 3 * count, 3))))
            at += 3 * count
        return entries
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed seen-set state: {type(exc).__name__}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"malformed seen-set state: {exc}") from None
