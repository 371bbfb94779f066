from __future__ import annotations

import collections
import dataclasses
import io
import os
import random
import time
import zlib

import pytest
import torch
from conftest import colour_samples, tar_bytes

from stream_swav.config import Config
from stream_swav.data.cursor import ReadOrder, ShardTask, StreamCursor, shard_seed, stable_seed
from stream_swav.data.worker import DecodeWorker
from stream_swav.runtime.ledger import StreamLedger
from stream_swav.runtime.reports import Progress

URLS = [f"s3://bkt/shards/{n:03d}.tar" for n in range(8)]


def drain(cursor: StreamCursor) -> list[ShardTask]:
    tasks = []
    while (task := cursor.next_task()) is not None:
        tasks.append(task)
    return tasks


def finish(cursor: StreamCursor, tasks: list[ShardTask], position: int = 10) -> None:
    cursor.advance({t.key: position for t in tasks}, [t.key for t in tasks])


def test_seeds_are_stable_and_accept_any_file_name():
    assert shard_seed(0, 0, URLS[0]) == shard_seed(0, 0, URLS[0])
    assert len({shard_seed(0, 0, URLS[0]), shard_seed(1, 0, URLS[0]), shard_seed(0, 1, URLS[0]),
                shard_seed(0, 0, URLS[1])}) == 4
    # A file name that is not UTF-8 reaches Python with surrogate escapes; it must seed all the same.
    odd = b"/data/shard-\xff\xfe.tar".decode("utf-8", "surrogateescape")
    assert shard_seed(0, 0, odd) != shard_seed(0, 0, "/data/shard-.tar")
    assert stable_seed("x", odd) == stable_seed("x", odd)


def test_a_retired_shard_is_left_out_of_the_passes_under_way_and_later_ones_until_listed_again():
    """Bucket retention deletes shards of an endless stream: a shard gone for good was handed out
    in every pass for ever (a failed read and an error line each time), and no pass could finish
    without it being tried."""
    cursor = StreamCursor(seed=3)
    cursor.add_shards(URLS[:4])
    first = drain(cursor)
    gone = first[1]
    cursor.advance({gone.key: 5}, [])  # part-read when it went
    finish(cursor, [t for t in first if t is not gone])
    assert cursor.pass_index == 0  # pass 0 waits for it
    assert cursor.retire([gone.url, "s3://bkt/never-known.tar"]) == [gone.url]
    assert cursor.retire([gone.url]) == []
    assert cursor.pass_index == 1 and cursor.live_urls() == [u for u in URLS[:4] if u != gone.url]
    for _ in range(2):  # later passes never hand it out, and complete without it
        tasks = drain(cursor)
        assert sorted(t.url for t in tasks) == sorted(cursor.live_urls())
        finish(cursor, tasks)
    assert cursor.pass_index == 3
    saved = StreamCursor(seed=0)
    saved.load_state_dict(cursor.state_dict())
    assert saved.live_urls() == cursor.live_urls() and gone.url not in {t.url for t in drain(saved)}
    # Listed again: back from the next pass on (the pass under way counts it finished).
    saved = StreamCursor(seed=0)
    saved.load_state_dict(cursor.state_dict())
    assert saved.add_shards([gone.url]) == [gone.url] and saved.live_urls() == URLS[:4]
    assert {t.pass_index for t in drain(saved) if t.url == gone.url} == {4}


def test_with_every_shard_retired_an_idle_reader_gets_nothing():
    cursor = StreamCursor(seed=0)
    cursor.add_shards(URLS[:2])
    cursor.retire(URLS[:2])
    assert cursor.next_task(idle=True) is None and cursor.next_task() is None
    assert cursor.add_shards([URLS[2]]) == [URLS[2]]
    assert cursor.next_task(idle=True).url == URLS[2]


def test_the_ledger_retires_a_followed_shard_missing_from_two_listings_in_a_row():
    ledger = StreamLedger(seed=0, shards_per_slot=2)
    assert ledger.follow_listing(URLS[:3]) == (URLS[:3], [])
    # Missing once (a list file caught half written, say): kept; twice in a row: retired.
    assert ledger.follow_listing(URLS[:1]) == ([], [])
    assert ledger.follow_listing(URLS[:2] + URLS[3:4]) == ([URLS[3]], [URLS[2]])
    assert ledger.cursor.live_urls() == URLS[:2] + URLS[3:4]
    # Listed again later: it returns.
    assert ledger.follow_listing(URLS[:4]) == ([URLS[2]], [])
    # A resume's listing counts as one (without follow mode the driver asks the store instead).
    ledger.rewind(ledger.state_dict(), 0, URLS[:3])
    assert ledger.unlisted(URLS[:3]) == [URLS[3]] and ledger.cursor.live_urls() == URLS[:4]
    assert ledger.follow_listing(URLS[:3]) == ([], [URLS[3]])


def test_with_every_shard_retired_passes_do_not_close_as_empty_ones():
    """Retention can empty a followed bucket: passes with nothing left to read closed as fast as
    they opened, each taken for one in which every read failed (a warning and a doubling pause)."""
    ledger = StreamLedger(seed=0, shards_per_slot=1)
    ledger.follow_listing(URLS[:2])
    tasks = ledger.top_up([0, 1])
    ledger.record(Progress(positions={tasks[0][0].key: 3}))
    ledger.cursor.retire(URLS[:2])
    for _ in range(3):
        assert ledger.top_up([0, 1]) == {}
        ledger.record(Progress())
    assert ledger.cursor.empty_passes_in_row == 0 and ledger.paused_until == 0.0
    before = ledger.cursor.pass_index
    ledger.follow_listing(URLS[2:3])
    assert ledger.top_up([2])[2][0].url == URLS[2] and ledger.cursor.pass_index == before


def test_each_pass_visits_every_shard_once_in_a_new_order():
    cursor = StreamCursor(seed=7)
    cursor.add_shards(URLS)
    first = [cursor.next_task() for _ in URLS]
    assert {t.url for t in first} == set(URLS) and {t.pass_index for t in first} == {0}
    assert all(t.start == 0 and t.seed == shard_seed(7, 0, t.url) and cursor.url(t.index) == t.url for t in first)
    # Every shard of pass 0 is out: nothing to hand out until one finishes.
    assert cursor.next_task() is None
    finish(cursor, first[:1])
    # Pass 1 starts while pass 0 still runs, but never with a shard still open in pass 0.
    ahead = drain(cursor)
    assert [(t.url, t.pass_index) for t in ahead] == [(first[0].url, 1)]
    finish(cursor, first[1:])
    assert cursor.pass_index == 1
    second = ahead + drain(cursor)
    assert {t.url for t in second} == set(URLS) and {t.pass_index for t in second} == {1}
    assert [t.url for t in second] != [t.url for t in first]
    assert all(t.seed == shard_seed(7, 1, t.url) for t in second)
    # Another cursor with the same seed makes the same orders.
    twin = StreamCursor(seed=7)
    twin.add_shards(URLS)
    assert [t.url for t in drain(twin)] == [t.url for t in first]


def test_release_hands_the_shard_out_again_from_its_position():
    cursor = StreamCursor(seed=0)
    cursor.add_shards(URLS[:2])
    a, b = cursor.next_task(), cursor.next_task()
    cursor.advance({a.key: 5, b.key: 3}, [])
    cursor.advance({a.key: 4}, [])  # late, smaller: positions never move back
    assert cursor.position(a.key) == 5
    assert cursor.next_task() is None
    cursor.release(a.key)
    again = cursor.next_task()
    assert (again.url, again.pass_index, again.start, again.seed) == (a.url, 0, 5, a.seed)
    assert cursor.assigned() == sorted([a.key, b.key])


def test_a_shard_open_in_one_pass_waits_before_the_next():
    cursor = StreamCursor(seed=0)
    cursor.add_shards(URLS[:2])
    a, b = cursor.next_task(), cursor.next_task()
    finish(cursor, [a])
    # a's pass 1 is free; b's pass 1 waits while b is open in pass 0, then comes.
    assert [(t.url, t.pass_index) for t in drain(cursor)] == [(a.url, 1)]
    finish(cursor, [b])
    assert [(t.url, t.pass_index) for t in drain(cursor)] == [(b.url, 1)]


def test_an_idle_reader_gets_a_shard_open_in_the_other_pass_then_one_of_a_later_pass():
    cursor = StreamCursor(seed=0)
    cursor.add_shards(URLS[:2])
    a, b = cursor.next_task(), cursor.next_task()
    # Both shards are open in pass 0, so pass 1 waits for a reader that holds one already...
    assert cursor.next_task() is None
    # ...but not for a reader holding none (its learner would hold back every other one).
    first, second = cursor.next_task(idle=True), cursor.next_task(idle=True)
    assert {(t.url, t.pass_index) for t in (first, second)} == {(a.url, 1), (b.url, 1)}
    beyond = cursor.next_task(idle=True)
    assert beyond.pass_index == 2 and beyond.start == 0
    assert cursor.next_task() is None
    # The passes complete in order all the same, and a restart starts the later pass over.
    finish(cursor, [a, b, first, second])
    assert cursor.pass_index == 2 and cursor.assigned() == [beyond.key]
    restored = StreamCursor(seed=0)
    restored.load_state_dict(cursor.state_dict())
    assert {(t.url, t.pass_index) for t in drain(restored)} == {(a.url, 2), (b.url, 2)}
    assert StreamCursor(seed=0).next_task(idle=True) is None  # no shard at all


def test_a_decode_actor_left_with_no_shard_gets_one_while_another_holds_what_the_passes_have_left():
    """The arrangement that stalled an elastic group: a survivor's decode actor held the last
    shards of pass 0, so pass 1's copies of them waited, and the joining learner's actor had
    none; the learners step together, so neither trained again."""
    ledger = StreamLedger(seed=0, shards_per_slot=4)
    ledger.follow_listing(URLS[:4])
    held = ledger.top_up([1])[1]
    assert [t.pass_index for t in held] == [0, 0, 0, 0]
    ledger.record(Progress(finished=[held[0].key]))
    later = ledger.top_up([1])[1]
    assert [(t.url, t.pass_index) for t in later] == [(held[0].url, 1)]
    given = ledger.top_up([1, 2])
    assert list(given) == [2] and len(given[2]) == 1 and given[2][0].pass_index == 1
    assert given[2][0].url in {t.url for t in held[1:]}


def test_new_shards_join_the_newest_pass_under_way():
    cursor = StreamCursor(seed=0)
    assert cursor.next_task() is None
    cursor.add_shards(URLS[:2])
    first = cursor.next_task()
    # Pass 0 is the only pass: a shard discovered joins it.
    assert cursor.add_shards(URLS[1:3]) == [URLS[2]]
    tasks = [first, *drain(cursor)]
    assert sorted((t.url, t.pass_index) for t in tasks) == [(URLS[0], 0), (URLS[1], 0), (URLS[2], 0)]
    # Pass 1 is under way too now (drain looked into it): the next one joins pass 1, not pass 0.
    cursor.add_shards([URLS[3]])
    late = cursor.next_task()
    assert (late.url, late.pass_index) == (URLS[3], 1)
    finish(cursor, tasks)
    assert cursor.pass_index == 1 and cursor.is_finished((0, 3))  # pass 0 done without it


def test_shards_arriving_faster_than_one_is_read_do_not_keep_a_pass_open():
    """Follow mode on a bucket that fills continuously: a shard arrives every few seconds and each
    takes minutes to read. When each one joined every pass under way, the oldest pass always held
    one unfinished and never completed; passes piled up and the readers, held to the two oldest,
    ran short of shards."""
    ledger = StreamLedger(seed=0, shards_per_slot=4)
    urls = [f"s3://bkt/shards/{n:05d}.tar" for n in range(8)]
    ledger.follow_listing(urls)
    reading: dict[int, list] = {}  # slot -> [task key, ticks left]
    held = []
    for tick in range(3000):
        if tick % 3 == 0:  # a new shard every 3 ticks; 4 readers take 10 ticks a shard: 1.3 times as fast
            urls.append(f"s3://bkt/shards/{len(urls):05d}.tar")
            ledger.follow_listing(urls)
        ledger.top_up(range(4))
        done = []
        for slot in range(4):
            held.append(len(ledger.holders.get(slot, ())))
            if slot not in reading and ledger.holders.get(slot):
                reading[slot] = [min(ledger.holders[slot]), 10]
            if slot in reading:
                reading[slot][1] -= 1
                if reading[slot][1] == 0:
                    done.append(reading.pop(slot)[0])
        ledger.record(Progress(positions={key: 1 for key in done}, finished=done))
    assert ledger.cursor.pass_index >= 3 and len(ledger.cursor._passes) <= 2
    assert sum(held[-400:]) / 400 == 4  # every reader holds as many shards as it may


def test_progress_for_a_later_pass_is_kept_until_its_turn():
    # The trained cursor can see pass 1 batches before pass 0 is complete.
    cursor = StreamCursor(seed=0)
    cursor.add_shards(URLS[:2])
    cursor.advance({(1, 0): 4}, [])
    cursor.advance({(0, 0): 9, (0, 1): 9}, [(0, 0), (0, 1)])
    assert cursor.pass_index == 1
    restarted = {t.url: t.start for t in drain(cursor)}
    assert restarted == {URLS[0]: 4, URLS[1]: 0}
    # A batch of a complete pass changes nothing.
    cursor.advance({(0, 0): 50}, [(0, 0)])
    assert cursor.is_finished((0, 0)) and cursor.position((1, 0)) == 4


def round_trip(state: dict) -> dict:
    """Through torch.save and a weights_only load, as in state.pt."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_round_trip_through_a_checkpoint():
    cursor = StreamCursor(seed=3)
    odd = b"/data/odd-\xff.tar".decode("utf-8", "surrogateescape")
    cursor.add_shards(URLS + [odd])
    tasks = drain(cursor)
    finish(cursor, tasks[:3])
    cursor.advance({tasks[4].key: 17, tasks[5].key: 2}, [])
    ahead = cursor.next_task()
    cursor.advance({ahead.key: 6}, [])
    restored = StreamCursor(seed=999)
    restored.load_state_dict(round_trip(cursor.state_dict()))
    assert restored.state_dict() == cursor.state_dict() and restored.seed == 3
    assert restored.url(cursor.n_shards - 1) == odd
    # Nothing is open after a restore: unfinished shards come back from their positions.
    resumed = {(t.pass_index, t.url): t.start for t in drain(restored)}
    assert resumed[(0, tasks[4].url)] == 17 and resumed[(0, tasks[5].url)] == 2
    assert resumed[(1, ahead.url)] == 6
    assert {(0, t.url) for t in tasks[3:]} <= set(resumed)
    assert not {(0, t.url) for t in tasks[:3]} & set(resumed)


def test_a_pass_read_before_a_checkpoint_is_not_taken_for_an_empty_one_after_a_resume():
    """A decode actor with nothing else to read runs a pass ahead: pass 1 was read whole while pass 0
    was part-way at the checkpoint. Resumed from it, pass 0 completing (and pass 1 with it) is no pass
    in which every read failed, which had logged a false alarm and paused the hand-out."""
    ledger = StreamLedger(seed=7, shards_per_slot=1)
    ledger.follow_listing(["a"])
    ledger.top_up([0, 1])
    ledger.record(Progress(positions={(1, 0): 5}, finished=[(1, 0)]))
    ledger.record(Progress(positions={(0, 0): 2}))
    ledger.rewind(ledger.state_dict(), 7, ["a"])
    ledger.top_up([0, 1])
    ledger.record(Progress(positions={(0, 0): 5}, finished=[(0, 0)]))
    assert ledger.cursor.pass_index == 2
    assert ledger.cursor.empty_passes_in_row == 0 and ledger.paused_until == 0.0
    # A pass in which nothing was read is still one.
    ledger.top_up([0])
    ledger.record(Progress(finished=[(2, 0)]))
    assert ledger.cursor.empty_passes_in_row == 1 and ledger.cursor.last_empty_pass == 2


def test_a_state_saved_before_pass_limits_keeps_its_older_passes_to_the_shards_it_knows():
    cursor = StreamCursor(seed=1)
    cursor.add_shards(URLS[:2])
    tasks = drain(cursor)  # pass 0 handed out, pass 1 under way
    state = cursor.state_dict()
    assert [entry["limit"] for entry in state["passes"]] == [2, None]
    for entry in state["passes"]:
        del entry["limit"]  # as saved before limits
    restored = StreamCursor(seed=1)
    restored.load_state_dict(round_trip(state))
    assert restored.state_dict() == cursor.state_dict()
    restored.add_shards([URLS[2]])
    finish(restored, tasks)
    assert restored.pass_index == 1 and restored.next_task().pass_index == 1


def test_version_one_states_still_load():
    """The state of earlier releases (URL lists and each pass's order written out) loads into the
    same cursor, which then hands out what the old one would have."""
    urls = URLS[:5]
    old_order = list(urls)
    random.Random(stable_seed("pass", 4, 0)).shuffle(old_order)
    old = {"version": 1, "seed": 4, "endless": True, "shards": urls + ["s3://bkt/late.tar"], "current_pass": 0,
           "passes": [{"index": 0, "order": old_order + ["s3://bkt/late.tar"],
                       "positions": {old_order[1]: 7}, "finished": [old_order[0]]}]}
    cursor = StreamCursor(seed=0)
    cursor.load_state_dict(old)
    tasks = drain(cursor)
    assert [t.url for t in tasks if t.pass_index == 0] == old_order[1:] + ["s3://bkt/late.tar"]
    assert tasks[0].start == 7


@pytest.mark.parametrize("damage", [
    lambda s: s.pop("passes"),
    lambda s: s.update(version=99),
    lambda s: s["passes"][0].update(finished=zlib.compress(b"\xff\xff")),
    lambda s: s["passes"][0]["positions"].append([0, -1]),
    lambda s: s["passes"][0]["positions"].append([99, 1]),
    lambda s: s.update(current_pass=5),
    lambda s: s.update(shards=b"nope"),
    lambda s: s.update(n_shards=2),
    lambda s: s["passes"][0].update(limit=99),
    lambda s: s["passes"][0].update(limit=0),
])
def test_malformed_state_is_refused(damage):
    state = saved_state()
    damage(state)
    with pytest.raises(ValueError, match="malformed stream cursor state"):
        StreamCursor(seed=0).load_state_dict(state)


def saved_state() -> dict:
    cursor = StreamCursor(seed=0)
    cursor.add_shards(URLS[:3])
    tasks = drain(cursor)
    finish(cursor, tasks[:1])
    cursor.advance({tasks[1].key: 2}, [])
    return cursor.state_dict()


@pytest.mark.parametrize("damage", [
    lambda s: s.update(shards=zlib.compress(b"\0" * 100_000_000, 9)),
    lambda s: s["passes"][0].update(finished=zlib.compress(b"\0" * 100_000_000, 9)),
    lambda s: s.update(shards=zlib.compress(b"a.tar\0b.tar\0c.tar")[:-3]),
])
def test_a_state_that_inflates_far_past_its_size_is_refused_as_it_inflates(damage):
    """A few kilobytes that would inflate to 100 MB (a 0.5 MB one took a gigabyte and 51 s): the
    bitmap's length follows from the shards, the shard list's from its compressed size."""
    state = saved_state()
    damage(state)
    with pytest.raises(ValueError, match="malformed stream cursor state: .*(inflates past|cut short)"):
        StreamCursor(seed=0).load_state_dict(state)


def test_a_million_shards_cost_little_per_batch_and_in_the_checkpoint():
    """What the driver does per batch does not grow with the number of shards, and the saved state
    stays compact (bench/control_plane.py measures it; here only the behaviour is checked)."""
    urls = [f"s3://bucket/datasets/stream/shards/{n:07d}.tar" for n in range(1_000_000)]
    cursor = StreamCursor(seed=1)
    cursor.add_shards(urls)
    tasks = [cursor.next_task() for _ in range(2_000)]
    for task in tasks[:1_000]:
        cursor.advance({task.key: 100}, [task.key])
    tasks += [cursor.next_task() for _ in range(1_000)]
    assert len({t.index for t in tasks}) == 3_000
    state = cursor.state_dict()
    size = len(state["shards"]) + sum(len(p["finished"]) + 16 * len(p["positions"]) for p in state["passes"])
    assert size < 64 * 1024 * 1024
    restored = StreamCursor(seed=0)
    restored.load_state_dict(round_trip(state))
    assert restored.n_shards == 1_000_000 and restored.is_finished(tasks[0].key)
    assert not restored.is_finished(tasks[1_500].key)


def small_config(**data) -> Config:
    cfg = Config()
    cfg.crops.global_size, cfg.crops.local_size, cfg.crops.local_count = 16, 8, 2
    cfg.data.shuffle_buffer = 4
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg.validate()


def deliver(cursor: StreamCursor, worker: DecodeWorker, batches: int | None, batch_size: int,
            passes: int | None = None) -> list[str]:
    keys: list[str] = []
    while batches is None or batches > 0:
        while (task := cursor.next_task()) is not None and (passes is None or task.pass_index < passes):
            worker.assign(task)
        if task is not None:
            cursor.release(task.key)
        batch = worker.next_batch(batch_size)
        if batch is None:
            break
        cursor.advance(batch.meta.progress, batch.meta.finished, batch.meta.identities)
        keys.extend(batch.meta.keys)
        batches = None if batches is None else batches - 1
    return keys


def test_restore_delivers_exactly_the_samples_not_yet_delivered(tmp_path):
    cfg = small_config(open_shards_per_actor=2)
    all_keys = []
    for n in range(3):
        samples = colour_samples(10, prefix=f"s{n}")
        # A sample that fails to decode still takes a position.
        samples.insert(4, (f"s{n}-bad", {"jpg": b"not a jpeg"}))
        path = tmp_path / f"{n}.tar"
        path.write_bytes(tar_bytes(samples))
        all_keys += [f"{path}/{key}" for key, _ in samples if not key.endswith("-bad")]

    trained = StreamCursor(seed=cfg.data.seed)
    trained.add_shards(sorted(str(p) for p in tmp_path.glob("*.tar")))
    with DecodeWorker(cfg.data, cfg.crops, cfg.storage, worker_index=0) as first:
        # The worker reads ahead of what it delivers; what it read but did not deliver must come again.
        before = deliver(trained, first, batches=2, batch_size=7, passes=1)
    snapshot = round_trip(trained.state_dict())
    assert len(before) == 14

    restored = StreamCursor(seed=cfg.data.seed)
    restored.load_state_dict(snapshot)
    with DecodeWorker(cfg.data, cfg.crops, cfg.storage, worker_index=1) as second:
        after = deliver(restored, second, batches=None, batch_size=5, passes=1)
    assert restored.pass_index == 1
    assert len(before) + len(after) == len(all_keys)
    assert sorted(before + after) == sorted(all_keys)


def test_a_shard_regenerated_between_a_checkpoint_and_a_resume_is_not_read_on_at_its_old_position(tmp_path):
    """The cursor saves the content each part-read shard was read in; a resume's reader finds the
    shard replaced, skips the rest of it for this pass (counted as shard-changed), and the next
    pass reads the new content whole. The other shards come exactly once, as without a change."""
    cfg = small_config(open_shards_per_actor=1)
    paths = [tmp_path / f"{n}.tar" for n in range(2)]
    for n, path in enumerate(paths):
        path.write_bytes(tar_bytes(colour_samples(10, prefix=f"s{n}")))
    trained = StreamCursor(seed=cfg.data.seed)
    trained.add_shards([str(p) for p in paths])
    with DecodeWorker(cfg.data, cfg.crops, cfg.storage, worker_index=0) as first:
        before = deliver(trained, first, batches=1, batch_size=4, passes=1)
    state = round_trip(trained.state_dict())
    [part_read] = [(shard, position) for shard, position in state["passes"][0]["positions"]]
    [[shard, identity]] = state["passes"][0]["identities"]
    assert shard == part_read[0] and identity and len(before) == 4
    regenerated = paths[shard]
    stat = regenerated.stat()
    regenerated.write_bytes(tar_bytes(colour_samples(10, prefix="new")))
    os.utime(regenerated, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))

    restored = StreamCursor(seed=cfg.data.seed)
    restored.load_state_dict(state)
    task = restored.next_task()
    assert (task.index, task.start, task.identity) == (shard, part_read[1], identity)
    restored.release(task.key)
    keys, errors = [], collections.Counter()
    with DecodeWorker(cfg.data, cfg.crops, cfg.storage, worker_index=1) as second:
        while True:
            while (task := restored.next_task()) is not None and task.pass_index < 2:
                second.assign(task)
            if task is not None:
                restored.release(task.key)
            if (batch := second.next_batch(4)) is None:
                break
            restored.advance(batch.meta.progress, batch.meta.finished, batch.meta.identities)
            keys += batch.meta.keys
            errors.update(batch.meta.errors)
    assert errors == {"shard-changed": 1} and restored.pass_index == 2
    # The other shard once a pass; the regenerated one: the old samples trained before the
    # checkpoint, none of the old or the new after it in that pass, the new ones whole in the next.
    other = paths[1 - shard]
    assert sorted(k for k in keys if k.startswith(f"{other}/")) == sorted(
        f"{other}/s{1 - shard}-{i:05d}" for i in range(10) for _ in range(2))
    assert all(k.startswith(f"{regenerated}/s{shard}-") for k in before)
    assert sorted(k for k in keys if k.startswith(f"{regenerated}/")) == [f"{regenerated}/new-{i:05d}"
                                                                          for i in range(10)]


def read_on_after_a_settings_change(tmp_path, strip_records: bool) -> tuple[list[str], list[str]]:
    """Train part of a pass with one shuffle buffer, resume with another: (keys before, after)."""
    before_cfg = small_config(open_shards_per_actor=2, shuffle_buffer=3)
    after_cfg = small_config(open_shards_per_actor=2, shuffle_buffer=16, shuffle_buffer_bytes=1 << 20)
    for n in range(3):
        (tmp_path / f"{n}.tar").write_bytes(tar_bytes(colour_samples(12, prefix=f"s{n}")))
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    trained = StreamCursor(seed=before_cfg.data.seed, order=ReadOrder.of(before_cfg.data))
    trained.add_shards(urls)
    with DecodeWorker(before_cfg.data, before_cfg.crops, before_cfg.storage, worker_index=0) as first:
        before = deliver(trained, first, batches=2, batch_size=5, passes=1)
    state = round_trip(trained.state_dict())
    assert state["read_orders"] == [[3, before_cfg.data.shuffle_buffer_bytes, before_cfg.data.max_sample_bytes,
                                     before_cfg.data.max_shard_bytes, before_cfg.data.max_expansion]]
    if strip_records:  # as saved before 2026-12-08: the saved configuration says what was used
        del state["read_orders"]
        for entry in state["passes"]:
            del entry["orders"]
    restored = StreamCursor(seed=after_cfg.data.seed, order=ReadOrder.of(after_cfg.data))
    restored.load_state_dict(state, saved_order=ReadOrder.of(dataclasses.asdict(before_cfg.data)))
    part_read = [t for t in drain(restored) if t.start > 0]
    assert part_read and all(t.order == ReadOrder.of(before_cfg.data) for t in part_read)
    for task in part_read:
        restored.release(task.key)
    restored = StreamCursor(seed=after_cfg.data.seed, order=ReadOrder.of(after_cfg.data))
    restored.load_state_dict(state, saved_order=ReadOrder.of(dataclasses.asdict(before_cfg.data)))
    with DecodeWorker(after_cfg.data, after_cfg.crops, after_cfg.storage, worker_index=1) as second:
        after = deliver(restored, second, batches=None, batch_size=5, passes=1)
    return before, after


@pytest.mark.parametrize("strip_records", [False, True], ids=["recorded", "from-the-saved-config"])
def test_a_part_read_shard_is_read_on_in_its_order_after_the_shuffle_settings_changed(tmp_path, strip_records):
    """A resume with another shuffle buffer (say, smaller after running short of memory) would
    reorder a part-read shard: some samples trained twice, others never. Read on with the settings
    its first positions were read with, every sample comes once."""
    before, after = read_on_after_a_settings_change(tmp_path, strip_records)
    expected = [f"{tmp_path}/{n}.tar/s{n}-{i:05d}" for n in range(3) for i in range(12)]
    assert len(before) == 10 and sorted(before + after) == sorted(expected)


def test_read_orders_are_saved_only_for_part_read_shards_and_checked_at_load():
    cursor = StreamCursor(seed=0, order=ReadOrder(4, 0, 100, 0, 0.0))
    cursor.add_shards(["a.tar", "b.tar"])
    first, second = cursor.next_task(), cursor.next_task()
    assert first.order is None and second.order is None  # from the start: the reader's own settings
    cursor.advance({first.key: 3}, [])
    state = cursor.state_dict()
    assert state["read_orders"] == [[4, 0, 100, 0, 0.0]]
    assert state["passes"][0]["orders"] == [[first.index, 0]]  # the other shard has no position yet
    cursor.advance({first.key: 9}, [first.key])
    assert cursor.state_dict()["read_orders"] == [] and cursor.state_dict()["passes"][0]["orders"] == []
    state["passes"][0]["orders"] = [[first.index, 1]]
    with pytest.raises(ValueError, match="read order"):
        StreamCursor(seed=0).load_state_dict(state)
    state["passes"][0]["orders"] = [[first.index, 0]]
    state["read_orders"] = [[4, 0, 100]]
    with pytest.raises(ValueError, match="read order is not 5 settings"):
        StreamCursor(seed=0).load_state_dict(state)
    # The same settings now as then: nothing to override.
    state["read_orders"] = [[4, 0, 100, 0, 0.0]]
    same = StreamCursor(seed=0, order=ReadOrder(4, 0, 100, 0, 0.0))
    same.load_state_dict(state)
    assert [t.order for t in drain(same) if t.start] == [None]
    # A configuration saved before the byte bound and the shard limits: they were unbounded then.
    assert ReadOrder.of({"shuffle_buffer": 8}) == ReadOrder(8, 0, Config().data.max_sample_bytes, 0, 0.0)


def test_a_cursor_state_with_a_content_identity_of_a_shard_without_a_position_is_refused():
    cursor = StreamCursor(seed=0)
    cursor.add_shards(["a.tar", "b.tar"])
    cursor.advance({(0, 0): 3}, [], {(0, 0): "etag-1", (0, 1): "etag-2"})
    state = cursor.state_dict()
    assert state["passes"][0]["identities"] == [[0, "etag-1"]]  # b.tar has no position: nothing kept
    cursor.advance({(0, 0): 5}, [(0, 0)], {(0, 0): "etag-1"})
    assert cursor.state_dict()["passes"][0]["identities"] == []  # finished: nothing to read on
    state["passes"][0]["identities"] = [[1, "etag-2"]]
    with pytest.raises(ValueError, match="content identity of a shard it has no position in"):
        StreamCursor(seed=0).load_state_dict(state)
    del state["passes"][0]["identities"]  # saved before identities: read on unchecked
    restored = StreamCursor(seed=0)
    restored.load_state_dict(state)
    [task] = [t for t in drain(restored) if t.index == 0]
    assert task.start == 3 and task.identity is None


def test_trained_says_which_positions_are_behind_the_cursor():
    cursor = StreamCursor(seed=0)
    cursor.add_shards(["a.tar", "b.tar"])
    cursor.advance({(0, 0): 3}, [(0, 1)])
    assert cursor.trained((0, 0), 2) and not cursor.trained((0, 0), 3)
    assert cursor.trained((0, 1), 10**6)  # finished
    assert not cursor.trained((1, 0), 0)  # the next pass has not started
