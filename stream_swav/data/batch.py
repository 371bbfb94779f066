"""What decode workers hand to learners through the object store.

Crops are uint8 NHWC and grouped by resolution, so a learner can run one
forward per resolution and the arrays map zero-copy out of Ray's object store.
Stream bookkeeping travels with the pixels: `progress` says, per shard, how far
in that shard's deterministic emission order this batch reaches (bad samples
skipped on the way count as consumed), so whoever trains the batch can advance
the stream cursor exactly.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CropBatch:
    # (global_count, B, global_size, global_size, 3) uint8; crop-major.
    global_crops: np.ndarray
    # (local_count, B, local_size, local_size, 3) uint8; may have local_count == 0.
    local_crops: np.ndarray
    # B sample keys, "<shard url>/<tar member key>", unique within a pass.
    # B may be 0: a batch can carry only bookkeeping (a shard whose last samples were all bad).
    keys: list[str]
    # shard id ("<pass>:<url>", see data.cursor.shard_id) -> emission position reached (exclusive).
    progress: dict[str, int] = field(default_factory=dict)
    # shard ids whose every sample has now been emitted.
    finished: list[str] = field(default_factory=list)
    # pass number of each shard id in progress or finished (also the id's prefix).
    passes: dict[str, int] = field(default_factory=dict)
    # skipped samples by reason, since the previous batch of the same worker; shard-level
    # reasons (bad-tar, truncated-shard, shard-read-error) arrive with the shard's finish.
    errors: Counter = field(default_factory=Counter)
    # bytes pulled from storage for this batch, re-reads after errors included.
    bytes_read: int = 0

    def __len__(self) -> int:
        return len(self.keys)
