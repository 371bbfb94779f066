"""Repeat detection for online curation (issue #23): a perceptual hash of each image and a bounded
set of the hashes seen in the current pass, matching near-copies by Hamming distance.

Pure state, no Ray or I/O: a decode actor will own one `SeenSet` and ask `admit` for every image it
decodes. Not yet wired into the decode actors or the checkpoints (see docs/curation.md); today
`pipelines/dedup_study.py` measures it on the messy-stream benchmark.

The hash (pHash): the image in gray at 32x32, its 2-D DCT, the 8x8 lowest frequencies; bit i is
set when coefficient i exceeds their median (the DC term excluded: it only says how bright the
image is). Re-encoding, rescaling and small shifts move few bits; different images differ in about
half. A flat image has no AC energy and hashes to 0, so blank and solid placeholders are repeats of
one another, which is what a curator wants of them.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image

HASH_BITS = 64
_HASH_SIDE = 32  # the gray thumbnail the DCT runs on
_LOW = 8  # the lowest 8x8 frequencies make the 64 bits


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II: rows are frequencies."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit DCT hash of `image` (any mode, any size)."""
    gray = np.asarray(image.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BILINEAR),
                      dtype=np.float64)
    dct = _dct_matrix(_HASH_SIDE)
    low = (dct @ gray @ dct.T)[:_LOW, :_LOW].ravel()
    ac = low[1:]
    # A flat image leaves only rounding noise in the AC terms: it must hash to 0, not to that noise.
    if np.abs(ac).max() < 1e-6 * max(1.0, abs(low[0])):
        return 0
    bits = low > np.median(ac)
    bits[0] = False
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass
class _Entry:
    hash: int
    count: int  # occurrences admitted or not, in `pass_index`
    pass_index: int


class SeenSet:
    """The hashes of the images seen, at most `capacity` of them (the oldest first out), each with
    how often it (or a hash within `max_distance` bits of it) occurred in the current pass.

    `admit(h, pass_index)` says whether an image may train: the first `1 + max_repeats` occurrences
    of a hash in a pass may, later ones may not. Counts are per pass: an entry last seen in an
    earlier pass starts again from zero, so reading the same shards a second time is not taken for
    duplication. Near matches are found by multi-index hashing: the 64 bits are cut into
    `max_distance + 1` bands, and two hashes within `max_distance` bits agree exactly on at least
    one band (pigeonhole), so only entries sharing a band value are compared. Memory: one entry
    and `max_distance + 1` index slots per hash, bounded by `capacity`.
    """

    def __init__(self, capacity: int, max_distance: int = 4, max_repeats: int = 0) -> None:
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
        self._bands = [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # by insertion id, oldest first
        self._index: dict[tuple[int, int], set[int]] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _keys(self, h: int) -> list[tuple[int, int]]:
        return [(band, (h >> lo) & ((1 << (hi - lo)) - 1)) for band, (lo, hi) in enumerate(self._bands)]

    def _nearest(self, h: int) -> _Entry | None:
        best, best_distance = None, self.max_distance + 1
        for key in self._keys(h):
            for entry_id in self._index.get(key, ()):
                entry = self._entries[entry_id]
                distance = hamming(h, entry.hash)
                if distance < best_distance:
                    best, best_distance = entry, distance
        return best

    def _insert(self, h: int, pass_index: int, count: int = 1) -> None:
        if len(self._entries) >= self.capacity:
            oldest_id, oldest = self._entries.popitem(last=False)
            for key in self._keys(oldest.hash):
                slot = self._index[key]
                slot.discard(oldest_id)
                if not slot:
                    del self._index[key]
        entry_id = self._next_id
        self._next_id += 1
        self._entries[entry_id] = _Entry(h, count, pass_index)
        for key in self._keys(h):
            self._index.setdefault(key, set()).add(entry_id)

    def admit(self, h: int, pass_index: int) -> bool:
        """Count one occurrence of `h` in pass `pass_index`; True while it is within the allowed repeats."""
        entry = self._nearest(h)
        if entry is None:
            self._insert(h, pass_index)
            return True
        if entry.pass_index != pass_index:
            entry.count, entry.pass_index = 0, pass_index
        entry.count += 1
        return entry.count <= 1 + self.max_repeats

    def state_dict(self) -> dict[str, list[int]]:
        """Plain lists (oldest first), loadable with torch.load(weights_only=True) and as JSON."""
        entries = list(self._entries.values())
        return {"hashes": [e.hash for e in entries], "counts": [e.count for e in entries],
                "passes": [e.pass_index for e in entries]}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        hashes, counts, passes = state["hashes"], state["counts"], state["passes"]
        if not len(hashes) == len(counts) == len(passes):
            raise ValueError("seen-set state: hashes, counts and passes differ in length")
        self._entries.clear()
        self._index.clear()
        for h, count, pass_index in zip(hashes, counts, passes):
            self._insert(int(h), int(pass_index), int(count))
