"""One decode worker: shard tasks in, CropBatches out. No Ray here; the actor is a thin shell.

Each open shard gets a reader thread that walks the shard's deterministic
emission order (`shards.iter_shard`) and puts encoded samples into one bounded
queue, so network reads overlap decoding and a stalled shard does not stop the
others. Each shard is read by exactly one thread and the queue is FIFO, so a
shard's samples arrive in its emission order however the shards interleave;
that is what lets `BatchMeta.progress` be a plain position per shard.

Decoding and cropping happen in the caller's thread, with a numpy Generator
seeded from (data.seed, worker_index). With curation.dedup, each decoded image
is hashed there and offered to the worker's `SeenSet` before it is cropped; a
repeat is dropped and counted, and its position counts as consumed like a
skipped sample's. Samples are offered in the order their batches are trained,
so the set can be cut back to any trained point (`SeenSet.trained_state`).

With curation.balance_mode resample, the worker keeps its latest decoded images
(`curation.resample_cache`) so that a learner can ask for some of them again
(`next_batch`'s `replays`: keys and how many more times). A replay is cropped
afresh and goes at the end of a later batch, one show per image per batch, up
to `curation.resample_share` of the batch; it is not read from the stream, so
it moves no stream position.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from stream_swav.config import CropsConfig, CurationConfig, DataConfig, StorageConfig
from stream_swav.curation import SeenSet, perceptual_hash
from stream_swav.data.batch import BatchMeta, CropBatch
from stream_swav.data.cursor import ReadOrder, ShardKey, ShardTask, StreamCursor
from stream_swav.data.decode import DecodeLimits, SampleError, decode_image
from stream_swav.data.multicrop import (MultiCropGeometry, PerImageCrops, crop_image, largest_crop_side,
                                        min_decode_side, stack_crops)
from stream_swav.data.shards import Sample, ShardReport, iter_shard, parse_label
from stream_swav.storage import filesystem_for

log = logging.getLogger(__name__)

# Encoded samples each open shard may have waiting in the queue.
READAHEAD_PER_SHARD = 64
# ... and at most this many encoded bytes per open shard (64 samples of 32 MiB would be 2 GiB); one
# sample larger than that still passes, alone.
READAHEAD_BYTES_PER_SHARD = 128 * 1024 * 1024
_PUT_POLL_S = 0.1
_JOIN_TIMEOUT_S = 5.0
# An image kept for replays holds at most this many squares of the side the crops need (a 4:1
# panorama at that side); a longer one is not kept.
REPLAY_MAX_AREA = 4


def _same_image(a: tuple[Image.Image, int] | None, b: tuple[Image.Image, int]) -> bool:
    """Whether two cached (image, label) pairs are the same picture and label (None is no picture)."""
    return a is not None and a[1] == b[1] and a[0].mode == b[0].mode and a[0].size == b[0].size \
        and a[0].tobytes() == b[0].tobytes()


@dataclass
class _Item:
    """What a reader thread hands over: a sample at its position, the end of the shard, or both; or a crash."""

    shard: ShardKey
    position: int = -1
    sample: Sample | None = None
    # Set on the shard's last item: the shard is finished.
    report: ShardReport | None = None
    # Bytes the reader pulled from storage since its previous item.
    bytes_read: int = 0
    crash: BaseException | None = None
    # The content identity the shard is read with (`ShardReport.identity`).
    identity: str | None = None

    @property
    def nbytes(self) -> int:
        """Encoded bytes it holds, as the readahead counts them."""
        return self.sample.nbytes if self.sample is not None else 0


class DecodeWorker:
    def __init__(self, data: DataConfig, crops: CropsConfig, storage: StorageConfig, worker_index: int,
                 curation: CurationConfig | None = None) -> None:
        self.data = data
        self.storage = storage
        self.worker_index = worker_index
        self._limits = DecodeLimits.from_config(data)
        self._order = ReadOrder.of(data)
        self._min_side = min_decode_side(crops)
        # Replays are kept at the largest crop's side, not the decode's (7x the pixels at the
        # defaults): a replay's small crops are a little softer than a fresh image's.
        self._replay_side = largest_crop_side(crops)
        # Kinds of error not foreseen (decoding, `_admit`; reading, `_read_shard`), each logged once.
        self._unforeseen: set[type] = set()
        self._geometry = MultiCropGeometry.from_config(crops)
        self._rng = np.random.default_rng([data.seed, worker_index])
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=READAHEAD_PER_SHARD * data.open_shards_per_actor)
        # Encoded bytes of the samples in the queue, within _readahead_bytes; readers wait on it.
        self._readahead_bytes = READAHEAD_BYTES_PER_SHARD * data.open_shards_per_actor
        self._queued_bytes = 0
        self._bytes_taken = threading.Condition()
        self._stop = threading.Event()
        # Assigned and not yet finished, by shard key.
        self._tasks: dict[ShardKey, ShardTask] = {}
        self._waiting: deque[ShardKey] = deque()
        self._readers: dict[ShardKey, threading.Thread] = {}
        self.seen: SeenSet | None = None
        if curation is not None and curation.dedup:
            self.seen = SeenSet(curation.seen_capacity, max_distance=curation.dedup_max_distance,
                                max_repeats=curation.max_repeats)
        # Resampling: images emitted lately (key -> (image, label), or None for a key two different
        # images came under), and those asked for again, as [key, image, label, shows left], served
        # round-robin; each bounded by resample_cache.
        self._resample = curation is not None and curation.resampling
        self._cache_size = curation.resample_cache if curation is not None else 0
        self._curation = curation
        self._recent: OrderedDict[str, tuple[Image.Image, int] | None] = OrderedDict()
        self._replays: deque[list[Any]] = deque()
        self._replays_missed = 0

    @property
    def assigned(self) -> int:
        """Shards assigned and not yet finished (open or waiting)."""
        return len(self._tasks)

    def assign(self, task: ShardTask) -> None:
        if self._stop.is_set():
            raise RuntimeError("worker is closed")
        if task.key in self._tasks:
            raise ValueError(f"shard {task.url} (pass {task.pass_index}) is already assigned to this worker")
        self._tasks[task.key] = task
        self._waiting.append(task.key)

    def next_batch(self, batch_size: int, replays: list[tuple[str, int]] | None = None) -> CropBatch | None:
        """Up to `batch_size` decoded samples with their stream bookkeeping.

        Short when the assigned shards run out. A batch may hold no samples at
        all but still report finished shards, positions and errors (a shard
        whose last samples were all bad): pass its bookkeeping on like any
        other. None only when there was nothing left to report.

        `replays` asks for images of earlier batches of this worker again, as
        (key, further shows); those waiting fill the end of this batch and the
        next ones (`BatchMeta.replayed`).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self._stop.is_set():
            raise RuntimeError("worker is closed")
        self._ask_replays(replays or [])
        crops: list[PerImageCrops] = []
        meta = BatchMeta()
        touched = False
        # Replays take at most their share of the batch, so the stream moves on whatever is asked.
        replay_slots = min(len(self._replays), self._curation.replay_slots(batch_size) if self._resample else 0)
        while len(crops) < batch_size - replay_slots:
            self._start_readers()
            if not self._readers:
                break
            item = self._queue.get()
            self._taken(item)
            touched = True
            task = self._tasks[item.shard]
            if item.crash is not None:
                raise RuntimeError(f"reader of {task.url} (pass {task.pass_index}) failed") from item.crash
            meta.bytes_read += item.bytes_read
            if item.sample is not None:
                meta.progress[item.shard] = item.position + 1
                meta.urls[item.shard] = task.url
                if item.identity is not None:
                    meta.identities[item.shard] = item.identity
                image = self._admit(item, meta)
                if image is not None:
                    key = f"{task.url}/{item.sample.key}"
                    label = parse_label(item.sample.meta.get("cls"))
                    label = -1 if label is None else label
                    crops.append(crop_image(image, self._geometry, self._rng))
                    meta.keys.append(key)
                    meta.labels.append(label)
                    self._remember(key, image, label)
            if item.report is not None:
                self._finish(item.shard)
                meta.finished.append(item.shard)
                if item.report.gone:
                    meta.gone.append(item.shard)
                meta.errors.update(item.report.errors)
        if not touched:
            return None
        # A batch cut short by the end of its shards keeps the share too (none without fresh rows).
        replay_slots = min(replay_slots, self._curation.replays_beside(len(crops)) if self._resample else 0)
        for _ in range(replay_slots):
            entry = self._replays.popleft()
            key, image, label, left = entry
            crops.append(crop_image(image, self._geometry, self._rng))
            meta.keys.append(key)
            meta.labels.append(label)
            meta.replayed += 1
            if left > 1:
                entry[3] = left - 1
                self._replays.append(entry)
        meta.replays_missed, self._replays_missed = self._replays_missed, 0
        global_crops, local_crops = stack_crops(crops, self._geometry)
        meta.made_at = time.time()
        meta.seen_hashes = len(self.seen) if self.seen is not None else 0
        return CropBatch(global_crops=global_crops, local_crops=local_crops, meta=meta)

    def seen_state(self, trained: dict[str, Any], newest: int | None = None) -> dict[str, Any] | None:
        """The seen-set (None without curation.dedup) cut back to what the stream cursor state
        `trained` (`StreamCursor.state_dict()`) says was trained, of the `newest` hashes at most
        that the union it absorbed lacks; the live set keeps what was read ahead."""
        if self.seen is None:
            return None
        cursor = StreamCursor(0)
        cursor.load_state_dict(trained)
        return self.seen.trained_state(cursor.trained, newest, news_only=True)

    def absorb_seen(self, state: dict[str, Any]) -> None:
        """Merge a seen-set state (a checkpoint's, or other workers' cut back to what was trained)."""
        if self.seen is not None:
            self.seen.absorb(state)

    def close(self) -> None:
        """Stop the reader threads; assigned work is dropped (the stream cursor re-reads it)."""
        self._stop.set()
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for shard, thread in self._readers.items():
            while thread.is_alive() and time.monotonic() < deadline:
                # A reader blocked on the full queue notices the stop within one poll.
                self._drain()
                thread.join(_PUT_POLL_S)
            if thread.is_alive():
                # Blocked in a read or a retry pause; it is a daemon and exits on its own.
                log.warning("reader of %s still busy after %.0fs; not waiting for it", shard, _JOIN_TIMEOUT_S)
        self._readers.clear()
        self._drain()

    def __enter__(self) -> "DecodeWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(self) -> None:
        while True:
            try:
                self._taken(self._queue.get_nowait())
            except queue.Empty:
                return

    def _taken(self, item: _Item) -> None:
        """An item left the queue: its bytes no longer count against the readahead."""
        if item.nbytes:
            with self._bytes_taken:
                self._queued_bytes -= item.nbytes
                self._bytes_taken.notify_all()

    def _start_readers(self) -> None:
        while self._waiting and len(self._readers) < self.data.open_shards_per_actor:
            shard = self._waiting.popleft()
            thread = threading.Thread(target=self._read_shard, args=(self._tasks[shard],),
                                      name=f"shard-reader-{self.worker_index}", daemon=True)
            self._readers[shard] = thread
            thread.start()

    def _finish(self, shard: ShardKey) -> None:
        self._readers.pop(shard).join()
        del self._tasks[shard]

    def _remember(self, key: str, image: Image.Image, label: int) -> None:
        """Keep an emitted image for a replay request, the oldest forgotten first; at the largest
        crop's side, so that a large PNG does not hold ~100 MB. An image still more than
        REPLAY_MAX_AREA squares of that side (far longer than wide: an 8 x 5,000,000 PNG is 120 MB)
        is not kept, and a replay of it is missed."""
        if not self._resample:
            return
        scale = self._replay_side / min(image.size)
        if image.width * image.height * min(scale, 1.0) ** 2 > REPLAY_MAX_AREA * self._replay_side ** 2:
            return
        if scale < 1.0:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BILINEAR)
        kept: tuple[Image.Image, int] | None = (image, label)
        if key in self._recent and not _same_image(self._recent[key], kept):
            # A shard that repeats a sample key: a replay asked for by it could mean either image, so
            # while the key is remembered none is replayed (each request missed and counted). The
            # same shard read in two passes at once repeats its keys with the same images: kept.
            kept = None
        self._recent[key] = kept
        self._recent.move_to_end(key)
        if len(self._recent) > self._cache_size:
            self._recent.popitem(last=False)

    def _ask_replays(self, replays: list[tuple[str, int]]) -> None:
        """Queue a learner's replay requests; one for an image forgotten, or beyond what may wait, is missed."""
        for key, shows in replays:
            # A key two images came under stays remembered, so a later request for it is missed too.
            kept = self._recent.pop(key, None) if self._recent.get(key) is not None else None
            if kept is None or len(self._replays) >= self._cache_size:
                self._replays_missed += shows
                continue
            self._replays.append([key, kept[0], kept[1], shows])

    def _admit(self, item: _Item, meta: BatchMeta) -> Image.Image | None:
        """A reader's sample decoded, or None (counted in `meta`) when it is skipped or dropped."""
        sample = item.sample
        if sample.error is not None:
            meta.errors[sample.error] += 1
            return None
        try:
            image = decode_image(sample.image or b"", self._limits, self._min_side)
        except SampleError as exc:
            meta.errors[exc.reason] += 1
            return None
        except Exception as exc:  # noqa: BLE001 - a decoder's error of a kind not foreseen
            # Raised, it would fail the actor, whose replacement meets the same image again, for
            # ever: counted as the image's read error, with the traceback once per kind (a bug shows).
            self._log_unforeseen(exc, f"decoding {sample.key}", "skipped as read-error")
            meta.errors["read-error"] += 1
            return None
        if self.seen is not None and not self.seen.admit(perceptual_hash(image), item.shard, item.position):
            meta.dropped["duplicate"] += 1
            return None
        return image

    def _log_unforeseen(self, exc: Exception, doing: str, outcome: str) -> None:
        """An error of a kind no skip reason foresaw, with its traceback, the first time of each kind."""
        if type(exc) not in self._unforeseen:
            self._unforeseen.add(type(exc))
            log.error("%s raised %s: %s (logged once per kind)", doing, type(exc).__name__, outcome, exc_info=exc)

    def _read_shard(self, task: ShardTask) -> None:
        data = self.data
        # A shard part-read before (a resume, a replaced actor) is read on in the order it was read in.
        order = task.order or self._order
        report = ShardReport()
        reported_bytes = 0
        # Each sample is held back until the next one is read, so the last one can
        # carry the end of the shard and no batch exists only to say "finished".
        held = _Item(task.key)
        try:
            fs, _ = filesystem_for(task.url, self.storage)
            try:
                for position, sample in iter_shard(task.url, fs, task.seed, order.shuffle_buffer, task.start,
                                                   identity=task.identity,
                                                   max_sample_bytes=order.max_sample_bytes,
                                                   read_retries=data.shard_read_retries,
                                                   retry_backoff_s=data.shard_retry_backoff_s, report=report,
                                                   max_shard_bytes=order.max_shard_bytes,
                                                   max_expansion=order.max_expansion,
                                                   buffer_bytes=order.shuffle_buffer_bytes):
                    if held.sample is not None and not self._put(held):
                        return
                    held = _Item(task.key, position=position, sample=sample,
                                 bytes_read=report.bytes_read - reported_bytes, identity=report.identity)
                    reported_bytes = report.bytes_read
            except MemoryError:
                raise  # this process is short of memory: a replacement reads the shard again
            except Exception as exc:  # noqa: BLE001 - reading the shard raised what nothing foresaw
                # Raised, it would fail the actor, whose replacement, reading on from what was trained,
                # would meet it again, for ever: the rest of the shard is given up for this pass, as
                # an unreadable shard's is, with the traceback once per kind (a bug shows).
                self._log_unforeseen(exc, f"reading {task.url}", "the rest of the shard skipped as shard-read-error")
                report.errors["shard-read-error"] += 1
            held.report = report
            held.bytes_read += report.bytes_read - reported_bytes
            self._put(held)
        except BaseException as exc:  # noqa: BLE001 — handed to the caller's thread, which raises it
            self._put(_Item(task.key, crash=exc))

    def _put(self, item: _Item) -> bool:
        size = item.nbytes
        with self._bytes_taken:
            # A sample waits while the queue holds others and it would take them past the bound.
            while self._queued_bytes and self._queued_bytes + size > self._readahead_bytes:
                if self._stop.is_set():
                    return False
                self._bytes_taken.wait(_PUT_POLL_S)
            self._queued_bytes += size
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False


__all__ = ["DecodeWorker", "READAHEAD_BYTES_PER_SHARD", "READAHEAD_PER_SHARD"]
