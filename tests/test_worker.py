from __future__ import annotations

import io
import os
import threading
import time
from collections import Counter

import badsamples
import numpy as np
import pytest
import torch
from PIL import Image
from conftest import colour_of, colour_samples, tar_bytes

from stream_swav.config import Config
from stream_swav.data.batch import CropBatch
from stream_swav.data.cursor import ShardTask, shard_seed
from stream_swav.data.worker import DecodeWorker
from stream_swav.learner import batch_labels


def small_config(**data) -> Config:
    cfg = Config()
    cfg.crops.global_size, cfg.crops.local_size, cfg.crops.local_count = 16, 8, 3
    cfg.data.shuffle_buffer = 4
    cfg.data.shard_retry_backoff_s = 0.01
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg.validate()


SHARD_NUMBERS: dict[str, int] = {}


def task_for(url: str, pass_index: int = 0, start: int = 0) -> ShardTask:
    index = SHARD_NUMBERS.setdefault(url, len(SHARD_NUMBERS))
    return ShardTask(url=url, index=index, pass_index=pass_index, seed=shard_seed(0, pass_index, url), start=start)


def make_worker(cfg: Config, worker_index: int) -> DecodeWorker:
    return DecodeWorker(cfg.data, cfg.crops, cfg.storage, worker_index)


def run_all(worker: DecodeWorker, batch_size: int) -> list[CropBatch]:
    batches = []
    while (batch := worker.next_batch(batch_size)) is not None:
        batches.append(batch)
    return batches


def test_good_samples_arrive_and_bad_ones_are_counted_by_reason(tmp_path):
    cases = badsamples.all_samples()
    too_big = os.urandom(300_000)
    samples = [(f"{i:03d}-{name}", {ext: data}) for i, (name, ext, data, _) in enumerate(cases)]
    samples += [("zz-too-big", {"jpg": too_big}), ("zz-meta-only", {"json": b"{}"})]
    samples += colour_samples(5, "after")
    path = tmp_path / "mixed.tar"
    path.write_bytes(tar_bytes(samples))
    cfg = small_config(max_sample_bytes=200_000)

    with make_worker(cfg, 0) as worker:
        worker.assign(task_for(str(path)))
        batches = run_all(worker, batch_size=6)

    keys = [k for b in batches for k in b.meta.keys]
    good = {f"{path}/{i:03d}-{name}" for i, (name, _, _, expected) in enumerate(cases) if expected[0] == "ok"}
    good |= {f"{path}/{key}" for key, _ in colour_samples(5, "after")}
    assert sorted(keys) == sorted(good)
    # Each image's class from its cls member, -1 where it has none (the odd cases carry none).
    labels = {k: label for b in batches for k, label in zip(b.meta.keys, b.meta.labels, strict=True)}
    assert {labels[f"{path}/{key}"] for key, _ in colour_samples(5, "after")} == {0, 1, 2, 3, 4}
    assert {labels[k] for k in good} - {0, 1, 2, 3, 4} == {-1}
    expected_errors = Counter(expected[1] for _, _, _, expected in cases if expected[0] == "skip")
    expected_errors.update({"too-many-bytes": 1, "no-image": 1})
    assert sum((b.meta.errors for b in batches), Counter()) == expected_errors
    for batch in batches:
        size = len(batch)
        assert batch.global_crops.shape == (2, size, 16, 16, 3) and batch.global_crops.dtype == np.uint8
        assert batch.local_crops.shape == (3, size, 8, 8, 3) and batch.local_crops.dtype == np.uint8
    # Every position was consumed, bad ones included, and the shard reported finished once.
    shard = task_for(str(path)).key
    assert max(b.meta.progress.get(shard, 0) for b in batches) == len(samples)
    assert [s for b in batches for s in b.meta.finished] == [shard]
    assert all(b.meta.urls == {shard: str(path)} for b in batches if b.meta.progress)


def test_a_decoder_error_of_an_unforeseen_kind_skips_the_image_and_logs_it_once(tmp_path, monkeypatch, caplog):
    """A decoder that raises what no skip reason foresaw (Pillow has raised ZeroDivisionError and
    OverflowError on crafted files) would fail the decode actor, and its replacement, re-reading
    from what was trained, would meet the same image again, for ever: the image is counted as a
    read error and the others go on; the first such error of each kind is logged with its traceback."""
    from stream_swav.data import worker as worker_module

    real = worker_module.decode_image
    crafted = {next(data for ext, data in colour_samples(6)[n][1].items() if ext != "cls") for n in (1, 4)}

    def decoding(data, limits, min_side):
        if data in crafted:
            raise ZeroDivisionError("division by zero in a plugin")
        return real(data, limits, min_side)

    monkeypatch.setattr(worker_module, "decode_image", decoding)
    path = tmp_path / "crafted.tar"
    path.write_bytes(tar_bytes(colour_samples(6)))
    with make_worker(small_config(), 0) as worker:
        worker.assign(task_for(str(path)))
        batches = run_all(worker, batch_size=6)
    assert sorted(k.rsplit("/", 1)[1] for b in batches for k in b.meta.keys) == \
        [key for n, (key, _) in enumerate(colour_samples(6)) if n not in (1, 4)]
    assert sum((b.meta.errors for b in batches), Counter()) == Counter({"read-error": 2})
    assert caplog.text.count("raised ZeroDivisionError: skipped as read-error") == 1


def test_a_shard_whose_reading_raises_an_unforeseen_error_is_given_up_for_the_pass(tmp_path, monkeypatch, caplog):
    """Reading a shard that raises what nothing foresaw would fail the decode actor, and every
    replacement, reading on from what was trained, would meet it again, so the pass never ended: the
    rest of the shard is skipped as shard-read-error, as an unreadable shard's is, and it finishes."""
    from stream_swav.data import worker as worker_module

    real = worker_module.iter_shard

    def failing_after_two(url, *args, **kwargs):
        for n, item in enumerate(real(url, *args, **kwargs)):
            if n == 2 and url.endswith("odd.tar"):
                raise OverflowError("a length no tar has")
            yield item

    monkeypatch.setattr(worker_module, "iter_shard", failing_after_two)
    odd, fine = tmp_path / "odd.tar", tmp_path / "fine.tar"
    odd.write_bytes(tar_bytes(colour_samples(5, "odd")))
    fine.write_bytes(tar_bytes(colour_samples(3, "fine")))
    with make_worker(small_config(shuffle_buffer=1), 0) as worker:
        worker.assign(task_for(str(odd)))
        worker.assign(task_for(str(fine)))
        batches = run_all(worker, batch_size=4)
    keys = sorted(k.rsplit("/", 1)[1] for b in batches for k in b.meta.keys)
    assert keys == ["fine-00000", "fine-00001", "fine-00002", "odd-00000", "odd-00001"]
    assert sum((b.meta.errors for b in batches), Counter()) == Counter({"shard-read-error": 1})
    assert sorted(s for b in batches for s in b.meta.finished) == sorted([task_for(str(odd)).key,
                                                                          task_for(str(fine)).key])
    assert caplog.text.count("raised OverflowError: the rest of the shard skipped as shard-read-error") == 1


def test_a_hostile_class_member_makes_an_unlabelled_sample_not_a_failed_step(tmp_path):
    """`cls` members that are no class index (beyond int64, negative, not digits, not ASCII) leave
    the image trained without a label; a batch's labels always fit the learner's int64 tensor."""
    hostile = [b"9" * 30, str(2**63).encode(), b"-3", b"cat", "\u0663".encode(), b" 7 \n", str(2**63 - 1).encode()]
    samples = colour_samples(len(hostile))
    for (_, members), cls in zip(samples, hostile):
        members["cls"] = cls
    path = tmp_path / "labels.tar"
    path.write_bytes(tar_bytes(samples))

    with make_worker(small_config(shuffle_buffer=1), 0) as worker:
        worker.assign(task_for(str(path)))
        batches = run_all(worker, len(hostile))
    labels = [label for batch in batches for label in batch.meta.labels]
    assert labels == [-1, -1, -1, -1, -1, 7, 2**63 - 1]
    assert batch_labels(batches[0], torch.device("cpu")).tolist() == labels


def test_the_readahead_holds_at_most_its_bytes_of_samples_not_yet_decoded(tmp_path, monkeypatch):
    """Readers stop reading ahead at the byte bound (64 samples of 32 MiB each would be 2 GiB per
    shard), not only at the count; every sample still arrives, in order."""
    import stream_swav.data.worker as worker_module

    rng = np.random.default_rng(3)
    samples = [(f"noise-{n:05d}", {"png": png_of(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))})
               for n in range(12)]
    size = max(len(members["png"]) for _, members in samples)
    path = tmp_path / "noise.tar"
    path.write_bytes(tar_bytes(samples))
    monkeypatch.setattr(worker_module, "READAHEAD_BYTES_PER_SHARD", 3 * size)
    with make_worker(small_config(shuffle_buffer=1, open_shards_per_actor=1), 0) as worker:
        worker.assign(task_for(str(path)))
        first = worker.next_batch(1)
        deadline = time.monotonic() + 10
        while worker._queue.qsize() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # a reader ignoring the bound would queue all 11 by now
        assert worker._queue.qsize() == 3 and worker._queued_bytes <= 3 * size
        rest = run_all(worker, 4)
    assert [k.rsplit("/", 1)[1] for b in [first, *rest] for k in b.meta.keys] == [key for key, _ in samples]
    assert worker._queued_bytes == 0


def test_pixels_belong_to_their_keys(tmp_path):
    paths = []
    for n in range(3):
        paths.append(tmp_path / f"{n}.tar")
        paths[-1].write_bytes(tar_bytes(colour_samples(9, f"c{n}", start=9 * n)))
    with make_worker(small_config(open_shards_per_actor=2), 3) as worker:
        for path in paths:
            worker.assign(task_for(str(path), pass_index=2))
        batches = run_all(worker, batch_size=5)
    seen = []
    for batch in batches:
        for i, key in enumerate(batch.meta.keys):
            number = int(key.rsplit("-", 1)[1])
            seen.append(number)
            for crops in (batch.global_crops, batch.local_crops):
                mean = crops[:, i].reshape(-1, 3).mean(axis=0)
                assert np.abs(mean - colour_of(number)).max() < 6, (key, mean)
    assert sorted(seen) == list(range(27))
    # Per shard, progress only grows and ends at the shard's size.
    shard_ids = [task_for(str(p), pass_index=2).key for p in paths]
    for shard in shard_ids:
        reached = [b.meta.progress[shard] for b in batches if shard in b.meta.progress]
        assert reached == sorted(reached) and reached[-1] == 9
        assert all(b.meta.urls[shard] == str(paths[shard_ids.index(shard)]) for b in batches
                   if shard in b.meta.progress)
    assert sorted(s for b in batches for s in b.meta.finished) == sorted(shard_ids)
    # Storage bytes: every member was read, plus its 512-byte header; the tar's trailing padding was not.
    payload = sum(len(d) for n in range(3) for _, members in colour_samples(9, "x", start=9 * n)
                  for d in members.values())
    assert payload + 512 * 54 <= sum(b.meta.bytes_read for b in batches) < sum(p.stat().st_size for p in paths)


def test_start_skips_delivered_positions(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes(colour_samples(12)))
    with make_worker(small_config(), 0) as worker:
        worker.assign(task_for(str(path)))
        full = [k for b in run_all(worker, 4) for k in b.meta.keys]
    with make_worker(small_config(), 0) as worker:
        worker.assign(task_for(str(path), start=5))
        rest = [k for b in run_all(worker, 4) for k in b.meta.keys]
    assert rest == full[5:]


def test_broken_and_missing_shards_are_reported_and_finished(tmp_path):
    good = tmp_path / "good.tar"
    good.write_bytes(tar_bytes(colour_samples(4, "g")))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar_bytes(colour_samples(6, "c"))[:5000])
    missing = tmp_path / "missing.tar"
    with make_worker(small_config(open_shards_per_actor=3), 0) as worker:
        for path in (cut, missing, good):
            worker.assign(task_for(str(path)))
        batches = run_all(worker, 16)
    assert sum((b.meta.errors for b in batches), Counter()) == Counter({"truncated-shard": 1, "shard-gone": 1})
    assert [key for b in batches for key in b.meta.gone] == [task_for(str(missing)).key]
    keys = [k for b in batches for k in b.meta.keys]
    assert {k for k in keys if "/g-" in k} == {f"{good}/g-{n:05d}" for n in range(4)}
    assert {k for k in keys if "/c-" in k}  # what was readable before the cut
    assert sorted(s for b in batches for s in b.meta.finished) == sorted(task_for(str(p)).key
                                                                    for p in (cut, missing, good))


def test_shard_of_only_bad_samples_still_reports_its_end(tmp_path):
    path = tmp_path / "bad.tar"
    path.write_bytes(tar_bytes([("a", {"jpg": b"junk"}), ("b", {"txt": b"no image"})]))
    with make_worker(small_config(), 0) as worker:
        assert worker.next_batch(4) is None
        worker.assign(task_for(str(path)))
        batch = worker.next_batch(4)
        assert len(batch) == 0 and batch.global_crops.shape == (2, 0, 16, 16, 3)
        assert batch.meta.finished == [task_for(str(path)).key]
        assert batch.meta.errors == Counter({"not-an-image": 1, "no-image": 1})
        assert worker.next_batch(4) is None


def test_unfinished_and_close_with_readers_blocked(tmp_path):
    paths = []
    for n in range(3):
        paths.append(tmp_path / f"{n}.tar")
        paths[-1].write_bytes(tar_bytes(colour_samples(150, f"u{n}")))
    worker = make_worker(small_config(open_shards_per_actor=2), 0)
    for path in paths:
        worker.assign(task_for(str(path)))
    with pytest.raises(ValueError, match="already assigned"):
        worker.assign(task_for(str(paths[0])))
    batch = worker.next_batch(3)
    assert len(batch) == 3
    # The readers have filled the queue and wait on it; close must still return promptly.
    worker.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("shard-reader") and t.is_alive()]
    with pytest.raises(RuntimeError, match="closed"):
        worker.assign(task_for(str(tmp_path / "other.tar")))


def test_reads_shards_from_s3(s3_bucket, make_shard):
    url = make_shard(s3_bucket.url("shards/000.tar"), colour_samples(7, "s3"))
    cfg = small_config()
    cfg.storage = s3_bucket.storage
    with make_worker(cfg, 0) as worker:
        worker.assign(task_for(url))
        keys = [k for b in run_all(worker, 4) for k in b.meta.keys]
    assert sorted(keys) == [f"{url}/s3-{n:05d}" for n in range(7)]


def test_unsupported_url_fails_loudly(tmp_path):
    with make_worker(small_config(), 0) as worker:
        worker.assign(task_for("gs://bucket/x.tar"))
        with pytest.raises(RuntimeError, match="reader of gs://bucket/x.tar") as info:
            worker.next_batch(2)
        assert "unsupported scheme" in str(info.value.__cause__)


def resample_worker(cfg: Config, share: float, cache: int) -> DecodeWorker:
    cfg.curation.balance, cfg.curation.balance_mode = 1.0, "resample"
    cfg.curation.resample_share, cfg.curation.resample_cache = share, cache
    # The learners' side the cache must cover (the worker is asked for its own batch sizes below).
    cfg.train.batch_size, cfg.data.inflight_batches_per_actor = 2, 1
    cfg.validate()
    return DecodeWorker(cfg.data, cfg.crops, cfg.storage, 0, cfg.curation)


def test_replays_show_cached_images_again_at_the_batch_end_and_move_no_stream_position(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes(colour_samples(20)))
    shard = task_for(str(path)).key
    with resample_worker(small_config(), share=0.5, cache=8) as worker:
        worker.assign(task_for(str(path)))
        first = worker.next_batch(4)
        a, b = first.meta.keys[:2]
        # a three more times, b once; an unknown key is missed, counted by shows asked.
        second = worker.next_batch(4, replays=[(a, 3), (b, 1), (f"{path}/img-99999", 2)])
        third = worker.next_batch(4)
        fourth = worker.next_batch(4)
        fifth = worker.next_batch(4)
        # Half of each batch at most: two replays, then the stream fills the rest.
        assert (second.meta.replayed, third.meta.replayed, fourth.meta.replayed, fifth.meta.replayed) == (2, 1, 1, 0)
        assert second.meta.keys[-2:] == [a, b] and third.meta.keys[-1] == a and fourth.meta.keys[-1] == a
        assert len(second) == len(third) == len(fifth) == 4
        assert (second.meta.replays_missed, third.meta.replays_missed) == (2, 0)
        # Replays carry their image's pixels and label, and are not read from the stream.
        for batch in (second, third, fourth):
            for i in range(len(batch) - batch.meta.replayed, len(batch)):
                number = int(batch.meta.keys[i].rsplit("-", 1)[1])
                assert batch.meta.labels[i] == number
                mean = batch.global_crops[:, i].reshape(-1, 3).mean(axis=0)
                assert np.abs(mean - colour_of(number)).max() < 6
        assert [b.meta.progress[shard] for b in (first, second, third, fourth, fifth)] == [4, 6, 9, 12, 16]
        fresh = [k for batch in (first, second, third, fourth, fifth)
                 for k in batch.meta.keys[:len(batch) - batch.meta.replayed]]
        assert len(set(fresh)) == len(fresh) == 16
        # Only the latest `resample_cache` (8) emitted images are kept: the first batch's are gone.
        later = worker.next_batch(4, replays=[(first.meta.keys[2], 1), (fifth.meta.keys[0], 1)])
        assert later.meta.replays_missed == 1 and later.meta.keys[-1] == fifth.meta.keys[0]


def png_of(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_replay_is_cropped_afresh(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(f"noise-{n:05d}", {"png": png_of(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))})
               for n in range(4)]
    path = tmp_path / "noise.tar"
    path.write_bytes(tar_bytes(samples))
    with resample_worker(small_config(), share=0.5, cache=8) as worker:
        worker.assign(task_for(str(path)))
        first = worker.next_batch(2)
        again = worker.next_batch(2, replays=[(first.meta.keys[0], 1)])
    assert again.meta.keys[-1] == first.meta.keys[0] and again.meta.replayed == 1
    assert not np.array_equal(again.global_crops[:, -1], first.global_crops[:, 0])


def test_without_resampling_replay_requests_are_all_missed(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes(colour_samples(6)))
    with make_worker(small_config(), 0) as worker:
        worker.assign(task_for(str(path)))
        first = worker.next_batch(3)
        second = worker.next_batch(3, replays=[(first.meta.keys[0], 2)])
    assert second.meta.replayed == 0 and second.meta.replays_missed == 2 and len(second) == 3


def test_a_large_image_is_kept_for_replays_at_the_side_the_crops_need(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "big.tar"
    path.write_bytes(tar_bytes([("big-00000", {"png": png_of(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))}),
                                ("big-00001", {"png": png_of(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))})]))
    with resample_worker(small_config(), share=0.5, cache=8) as worker:
        worker.assign(task_for(str(path)))
        first = worker.next_batch(1)
        (image, _), = worker._recent.values()
        assert image.size == (24, 16)  # the shorter side at the global crop's 16 px
        again = worker.next_batch(1, replays=[(first.meta.keys[0], 1)])
        # A batch of one leaves no room (half of 1 is 0): the replay waits for a batch with fresh rows.
        assert again.meta.replayed == 0 and len(again) == 1
        assert worker.next_batch(2) is None  # the shards are done: nothing fresh, so no replay either


def test_an_image_far_longer_than_wide_is_trained_but_not_kept_for_replays(tmp_path):
    """A 16 x 2,000 strip (a hostile 8 x 5,000,000 one would hold 120 MB per cached copy) is cropped
    and trained as any image, but not kept: a replay of it is missed; a 4:1 one is kept."""
    rng = np.random.default_rng(2)
    path = tmp_path / "strips.tar"
    path.write_bytes(tar_bytes([("strip-00000", {"png": png_of(rng.integers(0, 256, (16, 2000, 3), dtype=np.uint8))}),
                                ("wide-00001", {"png": png_of(rng.integers(0, 256, (16, 64, 3), dtype=np.uint8))}),
                                ("next-00002", {"png": png_of(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))}),
                                ("next-00003", {"png": png_of(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))})]))
    with resample_worker(small_config(shuffle_buffer=1), share=0.5, cache=8) as worker:
        worker.assign(task_for(str(path)))
        first = worker.next_batch(2)
        strip, wide = first.meta.keys
        assert strip.endswith("strip-00000") and len(first) == 2
        assert [key for key in worker._recent] == [wide]
        again = worker.next_batch(2, replays=[(strip, 1), (wide, 1)])
    assert again.meta.replays_missed == 1 and again.meta.keys[-1] == wide


def test_a_key_two_different_images_come_under_replays_neither_and_the_same_image_twice_replays(tmp_path):
    """A hostile shard repeats a sample key (not next to each other, so they are two samples): a
    replay asked for by that key could mean either image, so it is missed, not answered with the
    other one; the same image under a key twice (a shard read in two passes at once) is replayed."""
    grey = [("dup", 10), ("other-00001", 120), ("dup", 240), ("other-00003", 60)]
    grey += [(f"more-{n:05d}", 20 * n) for n in range(4, 10)]
    path = tmp_path / "dup.tar"
    path.write_bytes(tar_bytes([(key, {"png": png_of(np.full((16, 16, 3), level, np.uint8))})
                                for key, level in grey]))
    dup = f"{path}/dup"
    with resample_worker(small_config(shuffle_buffer=1), share=0.5, cache=8) as worker:
        worker.assign(task_for(str(path)))
        first = worker.next_batch(4)
        assert first.meta.keys.count(dup) == 2
        again = worker.next_batch(4, replays=[(dup, 1), (f"{path}/other-00001", 1)])
        assert again.meta.keys[-1] == f"{path}/other-00001" and again.meta.replayed == 1
        assert again.meta.replays_missed == 1
        # A third image under the key, read later, does not answer a late request for the first two.
        worker.assign(task_for(str(path), pass_index=1))
        assert dup in worker.next_batch(6).meta.keys
        late = worker.next_batch(4, replays=[(dup, 1)])
        assert late.meta.replayed == 0 and late.meta.replays_missed == 1
    same, fresh = tmp_path / "same.tar", tmp_path / "fresh.tar"
    same.write_bytes(tar_bytes(colour_samples(4)))
    fresh.write_bytes(tar_bytes(colour_samples(8, "fresh")))
    with resample_worker(small_config(shuffle_buffer=1, open_shards_per_actor=2), share=0.5, cache=8) as worker:
        worker.assign(task_for(str(same)))
        worker.assign(task_for(str(same), pass_index=1))
        first = worker.next_batch(8)
        assert len(first) == 8 and len(set(first.meta.keys)) == 4
        worker.assign(task_for(str(fresh)))
        again = worker.next_batch(4, replays=[(first.meta.keys[0], 1)])
    assert again.meta.replays_missed == 0 and again.meta.keys[-1] == first.meta.keys[0]
