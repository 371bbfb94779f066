"""Repeat detection: the perceptual hash on real re-encoded, rescaled and shifted images, and the
bounded, pass-aware seen-set."""
from __future__ import annotations

import io
import random
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from stream_swav.curation import PASSES_KEPT, SeenSet, _entries_of, _state_of, hamming, perceptual_hash


def hashes_of(state: dict) -> list[int]:
    """A seen-set state's hashes, least recently seen first."""
    return [h for h, _ in _entries_of(state)]


def random_hash(seed: int) -> int:
    """A 64-bit hash standing for a distinct image, where the set's bookkeeping, not the hash, is tested."""
    return random.Random(seed).getrandbits(64)


def entries(state: dict) -> list[tuple[int, tuple[int, ...]]]:
    """A seen-set state's (hash, occurrences), in hash order: what it holds, whatever the recency."""
    return sorted(_entries_of(state))


def scene(seed: int, size: int = 64) -> Image.Image:
    """A textured gray scene of random shapes: distinct seeds give unrelated images."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", (size, size), int(rng.integers(0, 256)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 16, 2)
        w, h = rng.integers(8, size // 2, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=int(rng.integers(0, 256)))
    return image.filter(ImageFilter.GaussianBlur(1))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_near_copies_stay_close_and_distinct_images_far_apart():
    originals = [scene(seed) for seed in range(12)]
    for original in originals:
        h = perceptual_hash(original)
        variants = [jpeg(original, 25), original.resize((40, 40)), original.resize((96, 96)), original.convert("RGB")]
        assert max(hamming(h, perceptual_hash(v)) for v in variants) <= 4
        # A shift moves more bits (content leaves at one edge, fill enters at the other): one
        # pixel of 64 moved 2-10 of them here, two pixels 8-16.
        shifted = original.transform(original.size, Image.Transform.AFFINE, (1, 0, 1, 0, 1, 0))
        assert hamming(h, perceptual_hash(shifted)) <= 12
    hashes = [perceptual_hash(image) for image in originals]
    distinct = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert min(distinct) > 12 and 20 < np.mean(distinct) < 44


def test_the_hash_of_given_pixels_never_changes():
    """Seen-sets are saved in checkpoints by hash: a hash that changed between versions would make a
    resumed run admit every repeat of what it had trained once more. Thumbnail-sized gray images,
    so that no resampling (which Pillow and Pillow-SIMD may do differently) comes in."""
    rng = np.random.default_rng(2026)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L") for _ in range(4)]
    ramp = Image.fromarray(np.add.outer(np.arange(32), 2 * np.arange(32)).astype(np.uint8), "L")
    assert [perceptual_hash(image) for image in (*noise, ramp)] == [
        0x4c78b0dc20d79ed1, 0x68e912498caa3f9b, 0x41c6d38a19fcb3a2, 0x5ebf2ba6228017d2, 0x2217a5d652aaf75]


def test_flat_images_of_any_colour_hash_to_zero():
    for colour in (0, 255, 128, (200, 30, 30)):
        assert perceptual_hash(Image.new("RGB" if isinstance(colour, tuple) else "L", (28, 28), colour)) == 0
    assert perceptual_hash(scene(0)) != 0


def test_repeats_past_the_allowance_are_dropped_and_near_copies_count_as_repeats():
    seen = SeenSet(capacity=100, max_distance=4, max_repeats=1)
    a, b = perceptual_hash(scene(1)), perceptual_hash(scene(2))
    assert [seen.admit(a, (0, 0), i) for i in range(3)] == [True, True, False]
    assert seen.admit(a ^ 0b1011, (0, 0), 3) is False  # three bits away: the same image
    assert seen.admit(b, (0, 0), 4) is True and len(seen) == 2
    assert seen.admit(a ^ 0b11111, (0, 0), 5) is True  # five bits away: another image, a new entry
    assert len(seen) == 3


def test_a_new_pass_is_not_taken_for_duplication():
    seen = SeenSet(capacity=10, max_repeats=0)
    h = perceptual_hash(scene(3))
    assert [seen.admit(h, (0, 0), 0), seen.admit(h, (0, 1), 0)] == [True, False]
    assert [seen.admit(h, (1, 0), 0), seen.admit(h, (1, 1), 0)] == [True, False]


def test_a_repeat_in_a_pass_is_dropped_while_a_decode_actor_reads_two_passes_ahead():
    """Two passes are read at once, and a third when an idle decode actor runs ahead."""
    seen = SeenSet(capacity=10, max_repeats=0)
    h = perceptual_hash(scene(4))
    assert seen.admit(h, (0, 0), 0) and seen.admit(h, (2, 1), 0)
    assert seen.admit(h, (0, 1), 5) is False


def test_capacity_bounds_memory_and_forgets_the_oldest_first():
    seen = SeenSet(capacity=3, max_distance=2)
    hashes = [perceptual_hash(scene(seed)) for seed in range(4)]
    for i, h in enumerate(hashes):
        assert seen.admit(h, (0, 0), i)
    assert len(seen) == 3
    assert seen.admit(hashes[0], (0, 0), 4) is True  # forgotten: admitted again (and hashes[1] evicted)
    assert seen.admit(hashes[3], (0, 0), 5) is False
    assert sum(len(slot) for slot in seen._index.values()) == 3 * 3  # no index slot outlives its entry


def test_state_round_trips_and_makes_the_same_decisions():
    seen = SeenSet(capacity=5, max_distance=3, max_repeats=1)
    stream = [perceptual_hash(scene(seed % 7)) for seed in range(20)]
    for i, h in enumerate(stream[:10]):
        seen.admit(h, (0, 0), i)
    restored = SeenSet(capacity=5, max_distance=3, max_repeats=1)
    restored.load_state_dict(seen.state_dict())
    assert restored.state_dict() == seen.state_dict()
    assert ([restored.admit(h, (0, 0), i) for i, h in enumerate(stream[10:], 10)]
            == [seen.admit(h, (0, 0), i) for i, h in enumerate(stream[10:], 10)])
    good = seen.state_dict()
    twice = _state_of([(5, (1,)), (5, (2,))])
    for malformed in ({**good, "format": 2}, {**good, "format": torch.tensor([1, 1])}, {**good, "format": True},
                      {**good, "event_counts": good["hashes"]}, {**good, "events": b"x"},
                      {k: v for k, v in good.items() if k != "hashes"}, twice):
        with pytest.raises(ValueError, match="malformed seen-set state"):
            restored.load_state_dict(malformed)
    # Bombs: kilobytes that would inflate to 100 MB, refused as they inflate.
    for bomb in ("hashes", "events"):
        with pytest.raises(ValueError, match=f"malformed seen-set state: {bomb} inflates past"):
            restored.load_state_dict({**good, bomb: zlib.compress(bytes(100_000_000), 9)})
    assert restored.state_dict() == seen.state_dict()  # refused before anything changed


def test_the_trained_state_is_the_set_cut_back_to_what_was_consumed():
    """A worker offers samples ahead of what was trained; cut back to the trained prefix, the set
    decides the re-read samples as a set that had seen only the trained ones would."""
    hashes = [perceptual_hash(scene(seed)) for seed in range(6)]
    # (hash index, shard, position) in the order one worker offered them; two shards interleaved.
    offered = [(0, 0, 0), (1, 1, 0), (0, 1, 1), (2, 0, 1), (3, 1, 2), (2, 0, 2), (4, 1, 3), (5, 0, 3)]
    consumed_up_to = {(0, 0): 2, (0, 1): 3}  # the trained prefix: the first five offers
    ahead = SeenSet(capacity=100, max_repeats=0)
    for hi, shard, position in offered:
        ahead.admit(hashes[hi], (0, shard), position)
    live = ahead.state_dict()
    trained = ahead.trained_state(lambda key, position: position < consumed_up_to[key])
    assert ahead.state_dict() == live  # the live set keeps what it read ahead
    reference = SeenSet(capacity=100, max_repeats=0)
    for hi, shard, position in offered[:5]:
        reference.admit(hashes[hi], (0, shard), position)
    # The same hashes and occurrences; their recency differs (a read-ahead repeat refreshed its entry).
    assert entries(trained) == entries(reference.state_dict())
    # Re-reading the untrained samples: each admitted, as in a run that never went ahead.
    resumed = SeenSet(capacity=100, max_repeats=0)
    resumed.load_state_dict(trained)
    again = [resumed.admit(hashes[hi], (0, shard), position) for hi, shard, position in offered[5:]]
    assert again == [False, True, True]
    # Of the trained hashes, the newest only.
    assert hashes_of(ahead.trained_state(lambda key, position: True, newest=2)) == [hashes[4], hashes[5]]


def test_a_cut_across_a_pass_boundary_keeps_the_earlier_pass_count():
    seen = SeenSet(capacity=10, max_repeats=0)
    h = perceptual_hash(scene(4))
    assert seen.admit(h, (0, 0), 0) and seen.admit(h, (1, 0), 0)
    seen.load_state_dict(seen.trained_state(lambda key, position: key[0] == 0))  # pass 1 not trained yet
    assert seen.admit(h, (0, 3), 7) is False  # still a repeat within pass 0
    assert seen.admit(h, (1, 0), 0) is True


def test_absorbing_another_set_merges_occurrences_and_dedups_across_sets():
    first, second = SeenSet(capacity=10), SeenSet(capacity=10)
    a, b, c = (perceptual_hash(scene(seed)) for seed in (5, 6, 7))
    first.admit(a, (0, 0), 0)
    second.admit(a, (0, 1), 0)
    second.admit(b, (0, 1), 1)
    first.absorb(second.state_dict())
    # In the union's order, as the most recently seen; a, which `first` admitted itself, is news to
    # the union, b is not.
    assert [(h, len(events)) for h, events in _entries_of(first.state_dict())] == [(a, 2), (b, 1)]
    assert hashes_of(first.trained_state(lambda key, position: True, news_only=True)) == [a]
    assert hashes_of(first.trained_state(lambda key, position: True, newest=1)) == [b]
    assert first.admit(b, (0, 0), 1) is False and first.admit(c, (0, 0), 2) is True
    assert hashes_of(first.trained_state(lambda key, position: True, news_only=True)) == [a, c]
    small = SeenSet(capacity=1)
    small.absorb(first.state_dict())
    assert len(small) == 1 and hashes_of(small.state_dict()) == [c]  # bounded, keeping the newest


def test_a_full_set_takes_in_what_the_union_gained_and_sends_back_only_its_news():
    """Once a decode actor's set is full, what the union gained from the other actors at a
    checkpoint must still reach it, pushing out its own oldest hashes (it had kept one of them and
    lost one of its own); and the actor's own hashes since must still be what it sends."""
    capacity = 100
    full, other, union = SeenSet(capacity), SeenSet(capacity), SeenSet(capacity)
    own = [random_hash(n) for n in range(capacity)]
    theirs = [random_hash(1_000 + n) for n in range(50)]
    for position, h in enumerate(own):
        assert full.admit(h, (0, 1), position)
    for position, h in enumerate(theirs):
        assert other.admit(h, (0, 2), position)
    gained = union.merge_trained([other.trained_state(lambda key, position: True)])
    full.absorb(gained)
    assert len(full) == capacity and hashes_of(full.state_dict()) == own[50:] + theirs
    assert full.admit(theirs[0], (0, 1), capacity) is False  # a repeat of another actor's image
    fresh = random_hash(5_000)
    assert full.admit(fresh, (0, 1), capacity + 1)
    # Its news only, however many union hashes are newer: the newest window is not crowded out.
    assert hashes_of(full.trained_state(lambda key, position: True, newest=10, news_only=True)) == \
        own[91:] + [fresh]


def test_absorbing_a_union_keeps_its_newest_hashes():
    """A restarted or replacement actor absorbs the whole union: its newest hashes, the likeliest to
    come again, are the last it forgets."""
    union = SeenSet(5)
    for position, h in enumerate(range(11, 16)):  # 15 the newest
        union.admit(h, (0, 0), position)
    actor = SeenSet(5)
    actor.absorb(union.state_dict())
    assert hashes_of(actor.state_dict()) == [11, 12, 13, 14, 15]
    actor.admit(99, (0, 1), 0)
    assert hashes_of(actor.state_dict()) == [12, 13, 14, 15, 99]


def test_the_least_recently_seen_hash_goes_first():
    seen = SeenSet(capacity=2)
    a, b, c = (perceptual_hash(scene(seed)) for seed in (8, 9, 10))
    assert seen.admit(a, (0, 0), 0) and seen.admit(b, (0, 0), 1)
    assert seen.admit(a, (0, 0), 2) is False  # a repeat: a is now the most recently seen
    assert seen.admit(c, (0, 0), 3)  # b goes, not a
    assert seen.admit(a, (0, 0), 4) is False and seen.admit(b, (0, 0), 5) is True


def test_occurrences_do_not_pile_up_over_passes_when_sets_share_their_hashes():
    """One actor admits a hash in every pass; the driver's union merges the actors' trained sets and
    hands back what it gained, as at every checkpoint. Only PASSES_KEPT passes of occurrences are kept."""
    h = perceptual_hash(scene(11))
    reader, other, union = SeenSet(10), SeenSet(10), SeenSet(10)
    for pass_index in range(6):
        assert reader.admit(h, (pass_index, pass_index % 3), 0)
        gained = union.merge_trained([s.trained_state(lambda key, position: True) for s in (reader, other)])
        for s in (reader, other):
            s.absorb(gained)
    for s in (reader, other, union):
        assert [len(events) for _, events in _entries_of(s.state_dict())] == [PASSES_KEPT]
    assert entries(union.merge_trained([reader.trained_state(lambda key, position: True)])) == []  # nothing new


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"capacity": 1, "max_distance": 32},
                                    {"capacity": 1, "max_repeats": -1}])
def test_impossible_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        SeenSet(**kwargs)


# ------------------------------------------------------------------ in the decode worker

def scene_bytes(seed: int, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    scene(seed, size=48).convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def dedup_worker(capacity: int = 1000):
    from stream_swav.config import Config
    from stream_swav.data.worker import DecodeWorker

    cfg = Config()
    cfg.crops.global_size, cfg.crops.local_size, cfg.crops.local_count = 16, 8, 1
    cfg.data.shuffle_buffer = 1
    cfg.curation.dedup, cfg.curation.seen_capacity = True, capacity
    cfg.validate()
    return DecodeWorker(cfg.data, cfg.crops, cfg.storage, 0, cfg.curation)


def read_all(worker, batch_size: int = 4):
    batches = []
    while (batch := worker.next_batch(batch_size)) is not None:
        batches.append(batch)
    return batches


def test_the_worker_drops_repeats_keeps_distinct_images_and_counts_every_position(tmp_path):
    from conftest import tar_bytes

    from stream_swav.data.cursor import ShardTask

    # 10 distinct scenes; scene 0 and 1 come back as byte copies and re-encoded at another quality.
    samples = [(f"s{n:02d}", {"jpg": scene_bytes(n)}) for n in range(10)]
    samples += [("c00", {"jpg": scene_bytes(0)}), ("c01", {"jpg": scene_bytes(1, quality=40)}),
                ("c00b", {"jpg": scene_bytes(0, quality=60)})]
    path = tmp_path / "repeats.tar"
    path.write_bytes(tar_bytes(samples))
    with dedup_worker() as worker:
        worker.assign(ShardTask(url=str(path), index=0, pass_index=0, seed=0, start=0))
        first = read_all(worker)
        worker.assign(ShardTask(url=str(path), index=0, pass_index=1, seed=0, start=0))
        second = read_all(worker)
    for batches in (first, second):
        kept = sorted(key.rsplit("/", 1)[1] for b in batches for key in b.meta.keys)
        assert kept == [f"s{n:02d}" for n in range(10)]  # a second pass is not taken for duplication
        assert sum(b.meta.dropped["duplicate"] for b in batches) == 3
        assert max(p for b in batches for p in b.meta.progress.values()) == len(samples)  # drops are consumed
        assert sum(b.meta.errors.total() for b in batches) == 0
    assert second[-1].meta.seen_hashes == 10


def test_without_curation_the_worker_keeps_repeats(tmp_path):
    from conftest import tar_bytes

    from stream_swav.config import Config
    from stream_swav.data.cursor import ShardTask
    from stream_swav.data.worker import DecodeWorker

    path = tmp_path / "repeats.tar"
    path.write_bytes(tar_bytes([(f"k{n}", {"jpg": scene_bytes(0)}) for n in range(5)]))
    cfg = Config()
    cfg.crops.global_size, cfg.crops.local_size, cfg.crops.local_count = 16, 8, 1
    with DecodeWorker(cfg.data, cfg.crops, cfg.storage, 0, cfg.curation) as worker:
        worker.assign(ShardTask(url=str(path), index=0, pass_index=0, seed=0, start=0))
        batches = read_all(worker)
        assert worker.seen_state({}) is None
    assert sum(len(b) for b in batches) == 5 and not any(b.meta.dropped for b in batches)


def test_the_union_of_worker_sets_cut_back_to_the_cursor_is_bounded():
    hashes = [perceptual_hash(scene(seed)) for seed in range(8)]
    a, b = SeenSet(100), SeenSet(100)
    for i in range(4):
        a.admit(hashes[i], (0, 0), i)  # shard 0, positions 0-3
        b.admit(hashes[4 + i], (0, 1), i)  # shard 1, positions 0-3
    b.admit(hashes[0], (0, 1), 4)  # a repeat across workers: both admitted it
    trained = {(0, 0): 2, (0, 1): 5}
    merged = SeenSet(100)
    gained = merged.merge_trained([s.trained_state(lambda key, pos: pos < trained[key]) for s in (a, b)])
    assert sorted(hashes_of(merged.state_dict())) == sorted(hashes_of(gained)) == sorted(hashes[:2] + hashes[4:8])
    assert merged.admit(hashes[0], (0, 0), 9) is False and merged.admit(hashes[2], (0, 0), 2) is True
    small = SeenSet(4)
    small.merge_trained([a.trained_state(lambda key, pos: True), b.trained_state(lambda key, pos: True)])
    # Over capacity each set loses its oldest: the two newest of each survive.
    assert sorted(hashes_of(small.state_dict())) == sorted([hashes[2], hashes[3], hashes[7], hashes[0]])


@pytest.mark.parametrize("saved", [{"format": torch.tensor([1, 1])}, torch.zeros(3), [1, 2]])
def test_a_checkpoint_whose_seen_set_does_not_load_resumes_dedup_from_an_empty_one(caplog, saved):
    """The rest of such a checkpoint loads: the run goes on (repeats may be trained once more) and
    says so, where refusing would fail every restart from it."""
    from types import SimpleNamespace

    from stream_swav.checkpoint import ResumePoint
    from stream_swav.config import Config
    from stream_swav.runtime.driver import Trainer

    cfg = Config()
    cfg.curation.dedup = True
    point = ResumePoint(step=4, url="file:///ckpt/step-4", record={}, skipped=[],
                        state={"seen_set": saved, "step": 4})
    seen = Trainer.restored_seen(SimpleNamespace(cfg=cfg.validate()), point)
    assert isinstance(seen, SeenSet) and len(seen) == 0 and "seen_set" not in point.state
    assert "file:///ckpt/step-4: its seen-set does not load" in caplog.text


def test_hashes_crafted_to_share_a_band_cannot_make_every_lookup_scan_the_whole_set():
    """With near matching, hashes that all agree on one band (images crafted for it) crowd one bucket
    of the index. The bucket keeps its newest BUCKET_SHARE of the capacity, so a lookup compares a
    bounded number; a near copy of a recent one is still caught, an old one's only where another
    band agrees too. An entry merged in as the oldest does not push a newer one out."""
    from stream_swav.curation import BUCKET_MIN, BUCKET_SHARE

    seen = SeenSet(capacity=512, max_distance=1)
    assert seen._bucket_cap == BUCKET_MIN == int(512 * BUCKET_SHARE)
    shared_low = 0x5A5A5A5A  # band 0 (the low 32 bits) alike in every hash
    hashes = [(n * 0x9E3779B1 & 0xFFFFFFFF) << 32 | shared_low for n in range(1, 401)]
    for i, h in enumerate(hashes):
        assert seen.admit(h, (0, 0), i)
    crowded = seen._index[seen._keys(shared_low)[0]]
    assert len(seen) == 400 and crowded == hashes[-BUCKET_MIN:]
    assert not seen.admit(hashes[-1] ^ 1 << 40, (0, 0), 400)  # a near copy of a recent one
    assert not seen.admit(hashes[0] ^ 1, (0, 0), 401)  # an old one's that agrees on the high band
    assert seen.admit(hashes[1] ^ 1 << 40, (0, 0), 402)  # one that agrees only on the crowded band
    absorbed, kept = (0x12345 << 32) | shared_low, list(crowded)
    seen.absorb(_state_of([(absorbed, (5,))]))
    # As the most recently seen: the crowded bucket forgets its oldest for it.
    assert absorbed in seen._entries and crowded == kept[1:] + [absorbed]
    # Evicting every hash leaves no bucket behind, crowded or not.
    for h in list(seen._entries):
        seen._entries.pop(h)
        seen._unindex(h)
    assert not seen._index

