"""What crosses the Ray boundary from learners to the driver: typed reports, merged there.

A learner trains a run of steps per call (a chunk) and answers with one
`StepReport`: what it trained (the stream bookkeeping of every batch it
consumed, already merged per shard), the health of the last step, and the
input side (waiting, latency, failed decode actors). The driver merges the
reports of all ranks into one `ChunkSummary`.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, fields

from stream_swav.data.batch import BatchMeta
from stream_swav.data.cursor import ShardKey


@dataclass
class Progress:
    """Stream bookkeeping of consumed batches, merged: the furthest position per shard, the shards
    finished, skip and curation-drop counts and bytes. Merging is order-free because each shard is read by one decode
    actor and consumed by one learner, in order."""

    positions: dict[ShardKey, int] = field(default_factory=dict)
    # The content identity each shard of `positions` was read with, where known.
    identities: dict[ShardKey, str] = field(default_factory=dict)
    finished: list[ShardKey] = field(default_factory=list)
    # Finished shards that were not there to read (shard-gone).
    gone: list[ShardKey] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    bytes_read: int = 0
    # The fullest decode worker seen-set among the batches (hashes held).
    seen_hashes: int = 0
    # Replays trained (not read from the stream) and replay requests missed (curation.balance_mode resample).
    replayed: int = 0
    replays_missed: int = 0
    # The highest class index in the batches' `cls` members (-1: none), which the driver checks
    # against curation.balance_classes.
    max_label: int = -1

    def add(self, meta: BatchMeta) -> None:
        for key, position in meta.progress.items():
            if position > self.positions.get(key, 0):
                self.positions[key] = position
        self.identities.update(meta.identities)
        self.finished.extend(meta.finished)
        self.gone.extend(meta.gone)
        self.errors.update(meta.errors)
        self.dropped.update(meta.dropped)
        self.bytes_read += meta.bytes_read
        self.seen_hashes = max(self.seen_hashes, meta.seen_hashes)
        self.replayed += meta.replayed
        self.replays_missed += meta.replays_missed
        self.max_label = max(self.max_label, max(meta.labels, default=-1))

    @classmethod
    def of(cls, meta: BatchMeta) -> "Progress":
        progress = cls()
        progress.add(meta)
        return progress

    def merge(self, other: "Progress") -> None:
        for key, position in other.positions.items():
            if position > self.positions.get(key, 0):
                self.positions[key] = position
        self.identities.update(other.identities)
        self.finished.extend(other.finished)
        self.gone.extend(other.gone)
        self.errors.update(other.errors)
        self.dropped.update(other.dropped)
        self.bytes_read += other.bytes_read
        self.seen_hashes = max(self.seen_hashes, other.seen_hashes)
        self.replayed += other.replayed
        self.replays_missed += other.replays_missed
        self.max_label = max(self.max_label, other.max_label)


@dataclass
class GroupView:
    """What every rank of the group committed in one chunk, as one rank saw it.

    The ranks of an elastic group exchange each step's bookkeeping in the vote before it (`Progress`
    of the batch and of the bookkeeping-only batches received since the last vote), so any survivor
    of a peer's death knows what the dead rank trained up to the last step that completed (a fixed
    group's rank sees only its own). Views of two survivors
    differ at most by the last commit (a collective that completed on some ranks only): `union`
    takes, per rank, the view with the most commits."""

    ranks: dict[int, Progress] = field(default_factory=dict)
    commits: dict[int, int] = field(default_factory=dict)

    def commit(self, rank: int, delta: Progress) -> None:
        self.ranks.setdefault(rank, Progress()).merge(delta)
        self.commits[rank] = self.commits.get(rank, 0) + 1

    @staticmethod
    def union(views: list["GroupView"]) -> Progress:
        """The group's progress as far as any of `views` knows it committed."""
        total = Progress()
        for rank in sorted({rank for view in views for rank in view.ranks}):
            longest = max((v for v in views if rank in v.ranks), key=lambda v: v.commits[rank])
            total.merge(longest.ranks[rank])
        return total


@dataclass
class StepReport:
    """One learner's answer to one `run` call."""

    rank: int
    # Steps taken in this call (skipped non-finite steps included) and the learner's step count after.
    steps: int = 0
    step: int = 0
    # Images this rank trained in the call; images the whole run has seen (equal on every rank).
    images: int = 0
    images_seen: int = 0
    # The last step's figures (NaN when no step was taken).
    loss: float = math.nan
    lr: float = 0.0
    marginal_error: float = math.nan
    feature_spread: float = math.nan
    score_spread: float = math.nan
    queue_fill: int = 0
    # Argmax prototype usage summed over the call's steps (K,).
    prototype_counts: list[int] = field(default_factory=list)
    nonfinite: int = 0
    nonfinite_in_row: int = 0
    progress: Progress = field(default_factory=Progress)
    # Seconds in steps and waiting for input, within the call.
    busy_s: float = 0.0
    wait_s: float = 0.0
    # Seconds from a batch's completion by its decode actor to its step starting, over the call.
    latency_s: list[float] = field(default_factory=list)
    # Decode actor slots whose calls failed (actor or object lost): their batches were dropped.
    failed_feeders: list[int] = field(default_factory=list)
    # Batches fetched or requested but not trained yet, held for the next call.
    batches_held: int = 0
    gpu_memory_allocated_bytes: int = 0
    gpu_memory_reserved_bytes: int = 0
    # Why the call ended in a failed collective (a peer lost), in one line; "" when it did not.
    interrupted: str = ""


@dataclass
class ChunkSummary(StepReport):
    """The reports of one chunk from every rank, merged into one: rank 0's step count and last-step
    figures (equal on every rank, or rank 0's own), the sums, unions and maxima of the rest, and the
    waiting and stepping seconds of the pacing learner (the slowest-fed one sets everyone's pace)."""

    input_wait_ratio: float = 0.0

    @classmethod
    def merge(cls, reports: list[StepReport]) -> "ChunkSummary":
        first = reports[0]
        progress = Progress()
        counts = [0] * len(first.prototype_counts)
        for report in reports:
            progress.merge(report.progress)
            if report.prototype_counts:
                counts = [a + b for a, b in zip(counts, report.prototype_counts)]
        pacing = max(reports, key=lambda r: r.wait_s)
        wait, busy = pacing.wait_s, pacing.busy_s
        merged = {
            "images": sum(r.images for r in reports), "prototype_counts": counts, "progress": progress,
            "wait_s": wait, "busy_s": busy, "input_wait_ratio": wait / (wait + busy) if wait + busy > 0 else 0.0,
            "latency_s": [x for r in reports for x in r.latency_s],
            "failed_feeders": sorted({f for r in reports for f in r.failed_feeders}),
            "batches_held": sum(r.batches_held for r in reports),
            "gpu_memory_allocated_bytes": max(r.gpu_memory_allocated_bytes for r in reports),
            "gpu_memory_reserved_bytes": max(r.gpu_memory_reserved_bytes for r in reports)}
        return cls(**{**{f.name: getattr(first, f.name) for f in fields(StepReport)}, **merged})


__all__ = ["Progress", "GroupView", "StepReport", "ChunkSummary"]
