"""Stream bookkeeping: which shard to read next, and how far each one has got.

Pure bookkeeping, no I/O. The runtime keeps one cursor of what was trained:
it advances when learners report the batches they trained, is saved in every
checkpoint (so a resumed run delivers exactly the samples not yet trained),
and hands out shard tasks to decode actors.

The stream is a sequence of passes over the known shards. Each pass visits the
shards in its own order: the shards known when the pass began, shuffled from
(seed, pass) with a stable RNG, then the shards discovered later (follow mode)
in discovery order until the next pass begins: a shard discovered joins the
newest pass under way and every later one. (Joining the older passes too kept
the oldest from ever completing where shards arrive faster than one is read:
there was always a new one unfinished in it.) A shard gone from storage
for good is retired: finished in the passes under way and in every later one
(it keeps its number; listed again, it is read from the next pass created). A position is an index
into a shard's deterministic emission order (see `shards.iter_shard`), so
"shard i of pass p at position n" says exactly which samples are done. That order follows from
the shard's seed and the reading settings (`ReadOrder`): a shard handed out part-read is read on
with the settings its first positions were read with, whatever the run's are now.

Shards are numbered in discovery order; `(pass, shard number)` is a
`ShardKey`, the key of batch bookkeeping. Handing out pass p+1 starts as soon
as every shard of pass p is handed out or finished, so readers never wait at a
pass boundary; two passes are handed out at a time, and one shard is not open
in both, except for a reader that would otherwise have nothing to read: it may
take a shard open in the other pass, or run passes ahead (see `next_task`).

Built for millions of shards: handing out a task, recording a batch and
releasing a shard cost O(1) amortised, whatever the number of shards; a pass
keeps its order as a compact array and its finished shards as a bitmap; the
saved state holds the shard list zlib-compressed and each pass as its length
at start, a compressed bitmap and the positions of shards in progress, since
the order itself follows from the seed.
"""
from __future__ import annotations

import array
import dataclasses
import hashlib
import random
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import astuple, dataclass, fields
from typing import Any

from stream_swav.config import DataConfig

STATE_VERSION = 2
# Separates shard names in the saved state: the one byte no file or object name contains.
_NAME_SEPARATOR = b"\0"

ShardKey = tuple[int, int]

# A saved state's compressed arrays are not trusted to inflate to what they claim: zlib reaches about
# 1,000 times, so a small hand-made state could take gigabytes. What an array may inflate to is
# known exactly where its length follows from another part, and otherwise this many times its
# compressed size (names and hashes compress far less).
MAX_INFLATION = 64


def inflate(data: bytes, limit: int, what: str) -> bytes:
    """zlib-decompressed `data`; ValueError (naming `what`) past `limit` bytes or when cut short."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"{what}: expected bytes, got {type(data).__name__}")
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"{what}: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ValueError(f"{what} inflates past {limit} bytes")
    if not inflater.eof:
        raise ValueError(f"{what} is cut short")
    return out


def inflation_limit(data: bytes) -> int:
    """What an array whose length nothing else gives may inflate to (MAX_INFLATION)."""
    return max(MAX_INFLATION * len(data), 1 << 20)


def encode_name(name: str) -> bytes:
    """A shard name as the bytes it came from: names that are not valid UTF-8 reach Python as
    str with surrogate escapes (os.fsdecode), and must hash, log and save all the same."""
    return name.encode("utf-8", "surrogateescape")


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from the parts' text; the same on every machine and Python version."""
    text = b"\x1f".join(encode_name(str(p)) for p in parts)
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def shard_seed(seed: int, pass_index: int, url: str) -> int:
    """Seed of one shard's shuffle in one pass."""
    return stable_seed("shard", seed, pass_index, url)


@dataclass(frozen=True)
class ReadOrder:
    """The `data` settings a shard's emission order depends on besides its seed: the shuffle
    buffer's size and bytes, and the size limits that decide which samples are held (a sample's
    bytes count in the buffer) and where a shard is cut (`shards.iter_shard`)."""

    shuffle_buffer: int
    shuffle_buffer_bytes: int
    max_sample_bytes: int
    max_shard_bytes: int
    max_expansion: float

    @classmethod
    def of(cls, data: Any) -> "ReadOrder":
        """From a `DataConfig`, or a saved configuration's `data` mapping. A key it lacks is from a
        version before the setting: the buffer's bytes and the shard limits were unbounded then
        (0), the others as today's defaults."""
        get = data.get if isinstance(data, Mapping) else lambda key: getattr(data, key)
        defaults = {**dataclasses.asdict(DataConfig()), "shuffle_buffer_bytes": 0, "max_shard_bytes": 0,
                    "max_expansion": 0.0}
        values = {f.name: get(f.name) for f in fields(cls)}
        return cls(**{f.name: (float if f.type == "float" else int)(
            defaults[f.name] if values[f.name] is None else values[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class ShardTask:
    """Read shard number `index` (at `url`) in pass `pass_index` with shuffle seed `seed`, from
    emission position `start`; the positions before it were read in content `identity`, where
    known (`storage.content_identity`): other content is not read on at that position; and with
    the settings `order` (None: the reader's own), which it must read on with."""

    url: str
    index: int
    pass_index: int
    seed: int
    start: int
    identity: str | None = None
    order: ReadOrder | None = None

    @property
    def key(self) -> ShardKey:
        return (self.pass_index, self.index)


def _pass_order(seed: int, pass_index: int, base: int) -> array.array:
    order = list(range(base))
    random.Random(stable_seed("pass", seed, pass_index)).shuffle(order)
    return array.array("q", order)


class _Pass:
    """One pass: the first `base` shards in a seeded order, then the later shards in number order,
    up to `limit` (None while it is the newest pass: every shard discovered joins it)."""

    def __init__(self, seed: int, index: int, base: int) -> None:
        self.seed = seed
        self.index = index
        self.base = base
        self.limit: int | None = None
        # Shuffled when the first shard is handed out: a cursor restored only to say what was trained
        # (a decode actor's, at each checkpoint with dedup on) never needs it, and at a million
        # shards it takes a second.
        self._order: array.array | None = None
        self.finished = bytearray((base + 7) // 8)
        self.n_finished = 0
        self.positions: dict[int, int] = {}
        # The content identity of each shard in `positions`, where known.
        self.identities: dict[int, str] = {}
        # The reading settings (a number in `StreamCursor`'s table of loaded ones) of each shard
        # part-read by an earlier run, where they were recorded; the others are read in this run's.
        self.orders: dict[int, int] = {}
        self.assigned: set[int] = set()
        # Next place in the order to hand out; shards given back, and shards skipped while open in
        # the other pass, wait in their own queues.
        self.cursor = 0
        self.released: deque[int] = deque()
        self.deferred: deque[int] = deque()
        # Whether any sample of this pass was read at all (positions count skipped samples too).
        self.read_any = False

    def shard_at(self, place: int) -> int:
        if place >= self.base:
            return place
        if self._order is None:
            self._order = _pass_order(self.seed, self.index, self.base)
        return self._order[place]

    def is_finished(self, shard: int) -> bool:
        """Finished, or not part of this pass (discovered after the next pass began): nothing left."""
        if self.limit is not None and shard >= self.limit:
            return True
        return shard >> 3 < len(self.finished) and bool(self.finished[shard >> 3] >> (shard & 7) & 1)

    def size(self, n_shards: int) -> int:
        return n_shards if self.limit is None else self.limit

    def mark_finished(self, shard: int) -> None:
        if self.is_finished(shard):
            return
        if shard >> 3 >= len(self.finished):
            self.finished.extend(bytes((shard >> 3) + 1 - len(self.finished)))
        self.finished[shard >> 3] |= 1 << (shard & 7)
        self.n_finished += 1
        self.positions.pop(shard, None)
        self.identities.pop(shard, None)
        self.orders.pop(shard, None)
        self.assigned.discard(shard)

    def complete(self, n_shards: int) -> bool:
        return n_shards > 0 and self.n_finished == self.size(n_shards)


class StreamCursor:
    def __init__(self, seed: int, order: ReadOrder | None = None) -> None:
        self.seed = seed
        # The reading settings of this run (None: not tracked), which every shard it starts is read
        # with, and those of the runs before it that part-read shards still unfinished.
        self.order = order
        self._orders: list[ReadOrder] = []
        self._urls: list[str] = []
        self._numbers: dict[str, int] = {}
        # Oldest pass not yet complete; passes before it are forgotten.
        self._current = 0
        self._passes: dict[int, _Pass] = {}
        # Passes completed in a row without a single sample read (every read failed), the latest of them.
        self.empty_passes_in_row = 0
        self.last_empty_pass = -1
        # Shards gone from storage for good (`retire`): finished in every pass from then on.
        self._gone: set[int] = set()

    # ------------------------------------------------------------- queries
    @property
    def pass_index(self) -> int:
        return self._current

    @property
    def n_shards(self) -> int:
        return len(self._urls)

    def live_urls(self) -> list[str]:
        """The shards known and not retired, in number order."""
        return [url for n, url in enumerate(self._urls) if n not in self._gone]

    def url(self, shard: int) -> str:
        return self._urls[shard]

    def position(self, key: ShardKey) -> int:
        """Emission position reached in a shard of a pass (0 if nothing recorded)."""
        pass_index, shard = key
        if pass_index < self._current:
            raise KeyError(f"pass {pass_index} is complete")
        state = self._passes.get(pass_index)
        return state.positions.get(shard, 0) if state is not None else 0

    def is_finished(self, key: ShardKey) -> bool:
        pass_index, shard = key
        if pass_index < self._current:
            return True
        state = self._passes.get(pass_index)
        return state is not None and state.is_finished(shard)

    def trained(self, key: ShardKey, position: int) -> bool:
        """Whether the sample at emission `position` of shard `key` (pass, shard) is behind the cursor:
        trained, or skipped or dropped on the way."""
        return self.is_finished(key) or position < self.position(key)

    def assigned(self) -> list[ShardKey]:
        """Shards handed out and neither finished nor released."""
        return [(p, shard) for p, state in sorted(self._passes.items()) for shard in sorted(state.assigned)]

    # ------------------------------------------------------------- updates
    def add_shards(self, urls: list[str]) -> list[str]:
        """Make shards known; new ones join the newest pass under way. A retired shard listed again is
        read again from the next pass on (the passes under way count it finished). Returns the new
        and the returning ones."""
        numbers, gone = self._numbers, self._gone
        # Deduplicated after the filter: a listing names millions of known shards and a few new ones.
        new = list(dict.fromkeys(url for url in urls if url not in numbers or numbers[url] in gone))
        for url in new:
            if url in self._numbers:
                self._gone.discard(self._numbers[url])
                continue
            self._numbers[url] = len(self._urls)
            self._urls.append(url)
        return new

    def retire(self, urls: list[str]) -> list[str]:
        """Shards gone from storage for good: finished in every pass under way (what was not read of
        them is not read) and in every later one, so that no pass waits for them and no reader is
        sent to them again. Returns those newly retired."""
        retired = []
        for url in dict.fromkeys(urls):
            shard = self._numbers.get(url)
            if shard is None or shard in self._gone:
                continue
            self._gone.add(shard)
            for state in self._passes.values():
                state.mark_finished(shard)
            retired.append(url)
        # A pass that only retiring completed read something or not; either way it is no pass in
        # which every read failed.
        self._close_complete_passes(count_empty=False)
        return retired

    def next_task(self, idle: bool = False) -> ShardTask | None:
        """Hand out the next shard (it counts as assigned until finished or released), or None for now.

        `idle`: for a reader holding no shard at all. Learners step together, so a reader left
        without work can hold every learner back while the shards in hand wait for it: it is given
        one even where the two passes have none to spare, first a shard that is open in the other
        pass, else the next free shard of a later pass (None only without any shard). A reader that
        keeps finishing while another holds the oldest pass's last shard runs on, a pass at a
        time; in lockstep the holder's reads keep pace, so that takes a reader stuck for a pass."""
        if len(self._gone) >= len(self._urls):
            return None  # every shard retired (or none known): nothing to hand out
        for pass_index in (self._current, self._current + 1):
            state = self._pass(pass_index)
            other = self._passes.get(pass_index - 1 if pass_index > self._current else pass_index + 1)
            shard = self._next_shard(state, other)
            if shard is not None:
                return self._hand_out(pass_index, shard)
        if not idle:
            return None
        pass_index = self._current
        while True:  # ends: a pass not handed out yet has every shard free
            shard = self._next_shard(self._pass(pass_index), None)
            if shard is not None:
                return self._hand_out(pass_index, shard)
            pass_index += 1

    def _hand_out(self, pass_index: int, shard: int) -> ShardTask:
        state = self._passes[pass_index]
        state.assigned.add(shard)
        url = self._urls[shard]
        start = state.positions.get(shard, 0)
        order = self._read_order(state, shard) if start else None
        return ShardTask(url=url, index=shard, pass_index=pass_index, seed=shard_seed(self.seed, pass_index, url),
                         start=start, identity=state.identities.get(shard) if start else None,
                         order=order if order != self.order else None)

    def _read_order(self, state: _Pass, shard: int) -> ReadOrder | None:
        """The settings a shard's positions were read with: an earlier run's where recorded, else
        this run's."""
        number = state.orders.get(shard)
        return self._orders[number] if number is not None else self.order

    def _next_shard(self, state: _Pass, other: _Pass | None) -> int | None:
        """The first shard of the pass that can be handed out. A shard the other live pass still
        reads waits in `deferred` (one reader per shard at a time)."""
        for shard in self._candidates(state):
            if state.is_finished(shard) or shard in state.assigned:
                continue
            if other is not None and shard in other.assigned:
                state.deferred.append(shard)
                continue
            return shard
        return None

    def _candidates(self, state: _Pass) -> Iterator[int]:
        """Released shards first, then the deferred ones, each looked at once per call, then the
        pass's order from its cursor; what is yielded is taken off its queue or passed by the cursor."""
        while state.released:
            yield state.released.popleft()
        for _ in range(len(state.deferred)):
            yield state.deferred.popleft()
        while state.cursor < state.size(len(self._urls)):
            state.cursor += 1
            yield state.shard_at(state.cursor - 1)

    def release(self, key: ShardKey) -> None:
        """The reader of a shard went away: hand it out again later, from its recorded position."""
        pass_index, shard = key
        state = self._passes.get(pass_index)
        if state is not None and shard in state.assigned:
            state.assigned.discard(shard)
            state.released.append(shard)

    def advance(self, progress: dict[ShardKey, int], finished: list[ShardKey],
                identities: dict[ShardKey, str] | None = None) -> None:
        """Record trained batches: positions reached per shard (only ever move forward) and the
        content identity they were read in, where known; shards now finished."""
        for (pass_index, shard), position in progress.items():
            if pass_index < self._current:
                continue  # a pass already complete: nothing left to record
            state = self._pass(pass_index)
            if position > state.positions.get(shard, 0) and not state.is_finished(shard):
                state.positions[shard] = int(position)
                state.read_any = True
                identity = (identities or {}).get((pass_index, shard))
                if identity is not None:
                    state.identities[shard] = identity
        for pass_index, shard in finished:
            if pass_index >= self._current:
                self._pass(pass_index).mark_finished(shard)
        self._close_complete_passes()

    def _close_complete_passes(self, count_empty: bool = True) -> None:
        # With every shard retired there is nothing to pass over: passes would close as fast as they open.
        while (len(self._gone) < len(self._urls) and self._current in self._passes
               and self._passes[self._current].complete(len(self._urls))):
            done = self._passes.pop(self._current)
            if done.read_any:
                self.empty_passes_in_row = 0
            elif count_empty:
                self.empty_passes_in_row, self.last_empty_pass = self.empty_passes_in_row + 1, done.index
            self._current += 1

    def _pass(self, pass_index: int) -> _Pass:
        state = self._passes.get(pass_index)
        if state is None:
            # The passes before it keep the shards known now; those discovered from here on join
            # the newest pass only.
            for earlier in self._passes.values():
                if earlier.limit is None and earlier.index < pass_index:
                    earlier.limit = len(self._urls)
            state = self._passes[pass_index] = _Pass(self.seed, pass_index, len(self._urls))
            if any(index > pass_index for index in self._passes):
                state.limit = len(self._urls)  # progress for a later pass came first: not the newest
            for shard in self._gone:
                state.mark_finished(shard)
        return state

    # ----------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain state (ints, bytes, lists): what was trained. Assignments are not part of it
        (nothing is open after a restart)."""
        # The reading settings of part-read shards, numbered in a table of those in use.
        table: list[ReadOrder] = []
        orders: dict[int, list[list[int]]] = {}
        for index, state in self._passes.items():
            for shard, position in state.positions.items():
                order = self._read_order(state, shard)
                if position > 0 and order is not None:
                    if order not in table:
                        table.append(order)
                    orders.setdefault(index, []).append([shard, table.index(order)])
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "n_shards": len(self._urls),
            "shards": zlib.compress(_NAME_SEPARATOR.join(encode_name(u) for u in self._urls), 1),
            "current_pass": self._current,
            "gone": zlib.compress(bytes(_bitmap(self._gone, len(self._urls))), 1),
            "read_orders": [list(astuple(order)) for order in table],
            "passes": [
                {"index": index, "base": state.base, "limit": state.limit,
                 "finished": zlib.compress(bytes(state.finished), 1),
                 "positions": sorted([shard, pos] for shard, pos in state.positions.items() if pos > 0),
                 "identities": sorted([shard, identity] for shard, identity in state.identities.items()),
                 "orders": sorted(orders.get(index, [])),
                 "read_any": state.read_any}
                for index, state in sorted(self._passes.items())
            ],
        }

    def load_state_dict(self, state: dict[str, Any], saved_order: ReadOrder | None = None) -> None:
        """Replace this cursor's state (seed included) with a saved one; raises ValueError if malformed.
        `saved_order`: the reading settings of the run that saved it (its configuration's), for
        part-read shards a state saved before 2026-12-08 has no record of."""
        try:
            version = state["version"]
            if version == 1:
                state = _upgrade_v1(state)
            elif version != STATE_VERSION:
                raise ValueError(f"unsupported version {version!r}")
            seed, current = int(state["seed"]), int(state["current_pass"])
            raw = inflate(state["shards"], inflation_limit(state["shards"]), "shard list")
            # Decoded whole, then split: the separator is one ASCII byte, so names come out as one by one.
            urls = raw.decode("utf-8", "surrogateescape").split(_NAME_SEPARATOR.decode()) if raw else []
            numbers = dict(zip(urls, range(len(urls))))
            if len(urls) != int(state["n_shards"]) or len(numbers) != len(urls):
                raise ValueError("shard list does not match n_shards or repeats a shard")
            # Saved since 2026-12-08.
            if any(len(entry) != 5 for entry in state.get("read_orders", [])):
                raise ValueError("a read order is not 5 settings")
            orders = [ReadOrder(*(int(v) for v in entry[:4]), float(entry[4])) for entry in state.get("read_orders", [])]
            legacy = None
            if saved_order is not None:
                orders.append(saved_order)
                legacy = len(orders) - 1
            passes: dict[int, _Pass] = {}
            for entry in state["passes"]:
                index, base = int(entry["index"]), int(entry["base"])
                if index < current or not 0 <= base <= len(urls):
                    raise ValueError(f"pass {index} is before current_pass or has a bad base")
                restored = _Pass(seed, index, base)
                finished = bytearray(inflate(entry["finished"], (len(urls) + 7) // 8 + 1, f"pass {index} bitmap"))
                restored.finished = finished
                restored.n_finished = sum(bin(byte).count("1") for byte in finished)
                if _marks_beyond(finished, len(urls)):
                    raise ValueError(f"pass {index} marks unknown shards finished")
                for shard, position in entry["positions"]:
                    if not 0 <= int(shard) < len(urls) or int(position) < 0:
                        raise ValueError(f"pass {index} has a position of an unknown shard or a negative one")
                    restored.positions[int(shard)] = int(position)
                # Saved since 2026-12-08; before, a shard restored part-read is read on unchecked.
                for shard, identity in entry.get("identities", []):
                    if int(shard) not in restored.positions or not isinstance(identity, str):
                        raise ValueError(f"pass {index} has a content identity of a shard it has no position in")
                    restored.identities[int(shard)] = identity
                for shard, number in entry.get("orders", []):
                    if int(shard) not in restored.positions or not 0 <= int(number) < len(state.get("read_orders", [])):
                        raise ValueError(f"pass {index} has a read order of a shard it has no position in, or none")
                    restored.orders[int(shard)] = int(number)
                if "orders" not in entry and legacy is not None:
                    restored.orders.update((shard, legacy) for shard in restored.positions)
                # Saved since 2026-12-07; before, a pass restored part-read counts as read (a resume
                # must not take a pass it had read for one where every read failed).
                restored.read_any = bool(entry.get("read_any", True))
                # Saved since 2026-12-07; before, every pass under way took in the shards discovered.
                limit = entry.get("limit")
                if limit is not None and (not base <= int(limit) <= len(urls) or _marks_beyond(finished, int(limit))):
                    raise ValueError(f"pass {index} has a bad limit")
                restored.limit = None if limit is None else int(limit)
                passes[index] = restored
            # Only the newest pass takes in shards discovered from now on (a state saved before
            # limits has none: its older passes keep every shard known now).
            for index, restored in passes.items():
                if index < max(passes) and restored.limit is None:
                    restored.limit = len(urls)
            # Saved since 2026-12-07; before, no shard was ever retired.
            gone_bitmap = bytearray(inflate(state["gone"], (len(urls) + 7) // 8 + 1, "retired shards bitmap")
                                    if "gone" in state else b"")
            if _marks_beyond(gone_bitmap, len(urls)):
                raise ValueError("the retired shards bitmap marks unknown shards")
            gone = {byte_index * 8 + bit for byte_index, byte in enumerate(gone_bitmap) if byte
                    for bit in range(8) if byte >> bit & 1}
        except (KeyError, TypeError, AttributeError, zlib.error, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed stream cursor state: {type(exc).__name__}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"malformed stream cursor state: {exc}") from None
        self.seed, self._current, self._passes, self._gone = seed, current, passes, gone
        self._orders = orders
        self._urls, self._numbers = urls, numbers


def _bitmap(members: set[int], n_bits: int) -> bytearray:
    """A bitmap of `n_bits` bits with those of `members` set (finished shards, retired shards)."""
    bitmap = bytearray((n_bits + 7) // 8)
    for n in members:
        bitmap[n >> 3] |= 1 << (n & 7)
    return bitmap


def _marks_beyond(bitmap: bytearray, n_bits: int) -> bool:
    """Whether a finished-shards bitmap sets any bit at or past `n_bits`."""
    if len(bitmap) > (n_bits + 7) // 8:
        return True
    return len(bitmap) * 8 > n_bits and bool(bitmap[-1] >> (n_bits % 8))


def _upgrade_v1(state: dict[str, Any]) -> dict[str, Any]:
    """A version-1 state (URL lists, each pass's order written out) in today's form.

    A version-1 pass order was the shards known at its start, shuffled exactly as `_pass_order`
    shuffles their numbers, then later shards in discovery order: its base is the longest
    prefix whose shuffle reproduces it."""
    seed = int(state["seed"])
    urls = [str(u) for u in state["shards"]]
    number = {url: n for n, url in enumerate(urls)}
    passes = []
    for entry in state["passes"]:
        order = [number[str(u)] for u in entry["order"]]
        base = next((b for b in range(len(order), -1, -1)
                     if order[b:] == list(range(b, len(order))) and list(_pass_order(seed, int(entry["index"]), b))
                     == order[:b]), None)
        if base is None:
            raise ValueError(f"pass {entry['index']} has an order this version cannot reproduce")
        finished = _bitmap({number[str(url)] for url in entry["finished"]}, len(urls))
        passes.append({"index": int(entry["index"]), "base": base, "finished": zlib.compress(bytes(finished)),
                       "positions": [[number[str(u)], int(p)] for u, p in entry["positions"].items()]})
    return {"version": STATE_VERSION, "seed": seed, "n_shards": len(urls), "current_pass": int(state["current_pass"]),
            "shards": zlib.compress(_NAME_SEPARATOR.join(encode_name(u) for u in urls)), "passes": passes}


__all__ = ["StreamCursor", "ShardTask", "ShardKey", "ReadOrder", "shard_seed", "stable_seed", "encode_name"]
