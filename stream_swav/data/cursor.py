"""Stream bookkeeping: which shard to read next, and how far each one has got.

Pure bookkeeping, no I/O. The driver keeps two cursors over the same stream:
one advanced when decode actors deliver batches (so a dead actor's shards are
re-read from what was delivered) and one advanced when batches are trained or
submitted for training (saved in checkpoints, so a resumed run delivers exactly
the samples not yet trained).

The stream is a sequence of passes over the known shards. Each pass visits the
shards in its own order, shuffled from (seed, pass) with a stable RNG; shards
discovered in follow mode join the passes already under way. A position is an
index into a shard's deterministic emission order (see `shards.iter_shard`),
so "shard X of pass p at position n" says exactly which samples are done.

Shard ids are ``"<pass>:<url>"`` (`shard_id`). They key CropBatch.progress and
CropBatch.finished, so a batch names its pass without a side channel and the
same URL read in two passes never collides. Handing out pass p+1 starts as
soon as every shard of pass p is handed out or finished, so readers never wait
at a pass boundary; at most two passes are handed out at a time, and one URL
is never open in both.
"""
from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

STATE_VERSION = 1


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from the parts' text; the same on every machine and Python version."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def shard_seed(seed: int, pass_index: int, url: str) -> int:
    """Seed of one shard's shuffle in one pass."""
    return stable_seed("shard", seed, pass_index, url)


def shard_id(pass_index: int, url: str) -> str:
    return f"{pass_index}:{url}"


def parse_shard_id(value: str) -> tuple[int, str]:
    """``"3:s3://b/x.tar"`` -> (3, "s3://b/x.tar")."""
    head, sep, url = value.partition(":")
    if not sep or not head.isdigit() or not url:
        raise ValueError(f"not a shard id (\"<pass>:<url>\"): {value!r}")
    return int(head), url


@dataclass(frozen=True)
class ShardTask:
    """Read `url` in pass `pass_index` with shuffle seed `seed`, from emission position `start`."""

    url: str
    pass_index: int
    seed: int
    start: int

    @property
    def shard_id(self) -> str:
        return shard_id(self.pass_index, self.url)


@dataclass
class _Pass:
    order: list[str]
    positions: dict[str, int] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    assigned: set[str] = field(default_factory=set)

    def complete(self) -> bool:
        return bool(self.order) and len(self.finished) == len(self.order)


class StreamCursor:
    def __init__(self, seed: int, endless: bool = True) -> None:
        self.seed = seed
        # False: a single pass, after which next_task returns None for good.
        self.endless = endless
        self._shards: list[str] = []
        self._known: set[str] = set()
        # Oldest pass not yet complete; passes before it are forgotten.
        self._current = 0
        self._passes: dict[int, _Pass] = {}

    # ------------------------------------------------------------- queries
    @property
    def pass_index(self) -> int:
        return self._current

    @property
    def shards(self) -> list[str]:
        return list(self._shards)

    @property
    def exhausted(self) -> bool:
        """Only for endless=False: the single pass is complete."""
        return not self.endless and self._current > 0

    def position(self, shard: str) -> int:
        """Emission position reached in a shard id (0 if nothing recorded)."""
        pass_index, url = parse_shard_id(shard)
        if pass_index < self._current:
            raise KeyError(f"pass {pass_index} is complete")
        state = self._passes.get(pass_index)
        return state.positions.get(url, 0) if state is not None else 0

    def is_finished(self, shard: str) -> bool:
        pass_index, url = parse_shard_id(shard)
        if pass_index < self._current:
            return True
        state = self._passes.get(pass_index)
        return state is not None and url in state.finished

    def assigned(self) -> list[str]:
        """Shard ids handed out and neither finished nor released."""
        return [shard_id(p, url) for p, state in sorted(self._passes.items()) for url in sorted(state.assigned)]

    # ------------------------------------------------------------- updates
    def add_shards(self, urls: list[str]) -> list[str]:
        """Make shards known; new ones join every pass under way. Returns the new ones."""
        new = [url for url in dict.fromkeys(urls) if url not in self._known]
        self._shards.extend(new)
        self._known.update(new)
        for state in self._passes.values():
            state.order.extend(new)
        return new

    def next_task(self) -> ShardTask | None:
        """Hand out the next shard (it counts as assigned until finished or released), or None for now."""
        if self.exhausted:
            return None
        busy = {url for state in self._passes.values() for url in state.assigned}
        last = self._current + 1 if self.endless else self._current
        for pass_index in range(self._current, last + 1):
            state = self._pass(pass_index)
            for url in state.order:
                if url not in state.finished and url not in state.assigned and url not in busy:
                    state.assigned.add(url)
                    return ShardTask(url=url, pass_index=pass_index, seed=shard_seed(self.seed, pass_index, url),
                                     start=state.positions.get(url, 0))
        return None

    def release(self, shard: str) -> None:
        """The reader of a shard went away: hand it out again later, from its recorded position."""
        pass_index, url = parse_shard_id(shard)
        state = self._passes.get(pass_index)
        if state is not None:
            state.assigned.discard(url)

    def advance(self, progress: dict[str, int], finished: list[str]) -> None:
        """Record a batch: positions reached per shard id (only ever move forward), shards now finished."""
        for shard, position in progress.items():
            state, url = self._lookup(shard)
            if state is not None and position > state.positions.get(url, 0):
                state.positions[url] = int(position)
        for shard in finished:
            state, url = self._lookup(shard)
            if state is not None:
                state.finished.add(url)
                state.assigned.discard(url)
        while self._current in self._passes and self._passes[self._current].complete():
            del self._passes[self._current]
            self._current += 1

    def _lookup(self, shard: str) -> tuple[_Pass | None, str]:
        pass_index, url = parse_shard_id(shard)
        if pass_index < self._current:
            # A pass already complete: nothing left to record.
            return None, url
        self.add_shards([url])
        return self._pass(pass_index), url

    def _pass(self, pass_index: int) -> _Pass:
        state = self._passes.get(pass_index)
        if state is None:
            order = list(self._shards)
            random.Random(stable_seed("pass", self.seed, pass_index)).shuffle(order)
            state = self._passes[pass_index] = _Pass(order=order)
        return state

    # ----------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state; assignments are not part of it (nothing is open after a restart)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "endless": self.endless,
            "shards": list(self._shards),
            "current_pass": self._current,
            "passes": [
                {"index": index, "order": list(state.order),
                 "positions": {url: pos for url, pos in sorted(state.positions.items()) if pos > 0},
                 "finished": sorted(state.finished)}
                for index, state in sorted(self._passes.items())
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this cursor's state (seed included) with a saved one; raises ValueError if malformed."""
        try:
            if state["version"] != STATE_VERSION:
                raise ValueError(f"unsupported version {state['version']!r}")
            shards = [str(url) for url in state["shards"]]
            passes: dict[int, _Pass] = {}
            for entry in state["passes"]:
                order = [str(url) for url in entry["order"]]
                positions = {str(url): int(pos) for url, pos in entry["positions"].items()}
                finished = {str(url) for url in entry["finished"]}
                stray = (set(order) | set(positions) | finished) - set(shards)
                if stray or not finished <= set(order):
                    raise ValueError(f"pass {entry['index']} names unknown shards")
                if any(pos < 0 for pos in positions.values()):
                    raise ValueError(f"pass {entry['index']} has a negative position")
                passes[int(entry["index"])] = _Pass(order=order, positions=positions, finished=finished)
            current = int(state["current_pass"])
            if any(index < current for index in passes):
                raise ValueError("a stored pass precedes current_pass")
            seed, endless = int(state["seed"]), bool(state["endless"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed stream cursor state: {type(exc).__name__}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"malformed stream cursor state: {exc}") from None
        self.seed, self.endless = seed, endless
        self._shards, self._known = shards, set(shards)
        self._current, self._passes = current, passes

    def copy(self) -> "StreamCursor":
        return copy.deepcopy(self)


__all__ = ["StreamCursor", "ShardTask", "shard_id", "parse_shard_id", "shard_seed", "stable_seed"]
