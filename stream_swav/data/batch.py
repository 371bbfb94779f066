"""What decode workers hand to learners through the object store.

Crops are uint8 NHWC and grouped by resolution, so a learner can run one
forward per resolution and the arrays map zero-copy out of Ray's object store.
Stream bookkeeping travels with the pixels in `BatchMeta`: `progress` says, per
shard, how far in that shard's deterministic emission order this batch reaches
(bad samples skipped on the way count as consumed), so whoever trains the
batch can advance the stream cursor exactly.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from stream_swav.data.cursor import ShardKey


@dataclass
class BatchMeta:
    """A batch's stream bookkeeping: what training it means for the cursor."""

    # Sample keys, "<shard url>/<tar member key>", unique within a pass unless a shard repeats a
    # member key (replays by such a key are missed: `DecodeWorker`). May be empty: a batch can
    # carry only bookkeeping (a shard whose last samples were all bad).
    keys: list[str] = field(default_factory=list)
    # Each sample's class from its `cls` member, -1 where it has none (curation.balance_signal: label).
    labels: list[int] = field(default_factory=list)
    # (pass, shard number) -> emission position reached (exclusive).
    progress: dict[ShardKey, int] = field(default_factory=dict)
    # Shards whose every sample has now been emitted.
    finished: list[ShardKey] = field(default_factory=list)
    # Those of `finished` that were not there to read (shard-gone): the driver asks the store and
    # retires them, so that later passes do not send readers to them.
    gone: list[ShardKey] = field(default_factory=list)
    # The URL of every shard in `progress`, for whoever logs or audits what a batch holds.
    urls: dict[ShardKey, str] = field(default_factory=dict)
    # The content identity each shard in `progress` was read with, where known (an ETag; a local
    # file's size and mtime): the stream cursor keeps it, so that whoever reads the shard on from
    # its position (after a resume, or a decode actor's replacement) reads the same content.
    identities: dict[ShardKey, str] = field(default_factory=dict)
    # Skipped samples by reason, since the previous batch of the same worker; shard-level reasons
    # (bad-tar, truncated-shard, shard-read-error...) arrive with the shard's finish.
    errors: Counter = field(default_factory=Counter)
    # Samples decoded but dropped by curation, by reason ("duplicate"), since the previous batch of
    # the same worker. Like skipped ones, they count as consumed in `progress`.
    dropped: Counter = field(default_factory=Counter)
    # The batch's last `replayed` samples are replays (curation.balance_mode: resample): images
    # trained before, shown again with fresh crops at a learner's request. They are not read from the
    # stream, so `progress` does not count them; their keys repeat earlier ones.
    replayed: int = 0
    # How many times each image the batch read from the stream is trained, its rows in order, as
    # the learner decided before training it (`Learner.select`, curation.resample_min_shows < 1,
    # which takes the skipped rows out); None until then.
    shows: list[int] | None = None
    # Replays asked for since the previous batch of the same worker that could not be made: the
    # image was no longer cached, or the waiting requests were full.
    replays_missed: int = 0
    # Hashes the worker's seen-set held when this batch was made (0 without curation.dedup).
    seen_hashes: int = 0
    # Bytes pulled from storage for this batch, re-reads after errors included.
    bytes_read: int = 0
    # Unix time the batch was completed by its decode worker.
    made_at: float = 0.0


@dataclass
class CropBatch:
    # (global_count, B, global_size, global_size, 3) uint8; crop-major.
    global_crops: np.ndarray
    # (local_count, B, local_size, local_size, 3) uint8; may have local_count == 0.
    local_crops: np.ndarray
    meta: BatchMeta = field(default_factory=BatchMeta)

    def __len__(self) -> int:
        return self.global_crops.shape[1] if self.global_crops.shape[0] else self.local_crops.shape[1]
