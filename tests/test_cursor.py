from __future__ import annotations

import json

import pytest
from conftest import colour_samples, tar_bytes

from stream_swav.config import Config
from stream_swav.data.cursor import ShardTask, StreamCursor, parse_shard_id, shard_id, shard_seed
from stream_swav.data.worker import DecodeWorker

URLS = [f"s3://bkt/shards/{n:03d}.tar" for n in range(8)]


def drain(cursor: StreamCursor) -> list[ShardTask]:
    tasks = []
    while (task := cursor.next_task()) is not None:
        tasks.append(task)
    return tasks


def finish(cursor: StreamCursor, tasks: list[ShardTask], position: int = 10) -> None:
    cursor.advance({t.shard_id: position for t in tasks}, [t.shard_id for t in tasks])


def test_shard_ids_and_seeds():
    assert shard_id(3, "s3://b/x:y.tar") == "3:s3://b/x:y.tar"
    assert parse_shard_id("3:s3://b/x:y.tar") == (3, "s3://b/x:y.tar")
    with pytest.raises(ValueError):
        parse_shard_id("s3://b/x.tar")
    assert shard_seed(0, 0, URLS[0]) == shard_seed(0, 0, URLS[0])
    assert len({shard_seed(0, 0, URLS[0]), shard_seed(1, 0, URLS[0]), shard_seed(0, 1, URLS[0]),
                shard_seed(0, 0, URLS[1])}) == 4


def test_each_pass_visits_every_shard_once_in_a_new_order():
    cursor = StreamCursor(seed=7)
    cursor.add_shards(URLS)
    first = [cursor.next_task() for _ in URLS]
    assert {t.url for t in first} == set(URLS) and {t.pass_index for t in first} == {0}
    assert all(t.start == 0 and t.seed == shard_seed(7, 0, t.url) for t in first)
    # Every shard of pass 0 is out: nothing to hand out until one finishes.
    assert cursor.next_task() is None
    finish(cursor, first[:1])
    # Pass 1 starts while pass 0 still runs, but never with a URL still open in pass 0.
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


def test_single_pass_cursor_ends():
    cursor = StreamCursor(seed=1, endless=False)
    cursor.add_shards(URLS[:3])
    tasks = drain(cursor)
    assert len(tasks) == 3 and not cursor.exhausted
    finish(cursor, tasks)
    assert cursor.exhausted and cursor.next_task() is None


def test_release_hands_the_shard_out_again_from_its_position():
    cursor = StreamCursor(seed=0)
    cursor.add_shards(URLS[:2])
    a, b = cursor.next_task(), cursor.next_task()
    cursor.advance({a.shard_id: 5, b.shard_id: 3}, [])
    cursor.advance({a.shard_id: 4}, [])  # late, smaller: positions never move back
    assert cursor.position(a.shard_id) == 5
    assert cursor.next_task() is None
    cursor.release(a.shard_id)
    again = cursor.next_task()
    assert (again.url, again.pass_index, again.start, again.seed) == (a.url, 0, 5, a.seed)
    assert cursor.assigned() == sorted([a.shard_id, b.shard_id])


def test_new_shards_join_the_pass_under_way():
    cursor = StreamCursor(seed=0)
    assert cursor.next_task() is None
    cursor.add_shards(URLS[:2])
    tasks = drain(cursor)
    assert cursor.add_shards(URLS[1:3]) == [URLS[2]]
    late = cursor.next_task()
    assert (late.url, late.pass_index) == (URLS[2], 0)
    finish(cursor, tasks)
    assert cursor.pass_index == 0
    finish(cursor, [late])
    assert cursor.pass_index == 1


def test_progress_for_a_later_pass_is_kept_until_its_turn():
    # The trained cursor can see pass 1 batches before pass 0 is complete.
    cursor = StreamCursor(seed=0)
    cursor.add_shards(URLS[:2])
    cursor.advance({shard_id(1, URLS[0]): 4}, [])
    cursor.advance({shard_id(0, URLS[0]): 9, shard_id(0, URLS[1]): 9}, [shard_id(0, URLS[0]), shard_id(0, URLS[1])])
    assert cursor.pass_index == 1
    restarted = {t.url: t.start for t in drain(cursor)}
    assert restarted == {URLS[0]: 4, URLS[1]: 0}
    # A batch of a complete pass changes nothing.
    cursor.advance({shard_id(0, URLS[0]): 50}, [shard_id(0, URLS[0])])
    assert cursor.is_finished(shard_id(0, URLS[0])) and cursor.position(shard_id(1, URLS[0])) == 4


def test_state_round_trip_through_json():
    cursor = StreamCursor(seed=3)
    cursor.add_shards(URLS)
    tasks = drain(cursor)
    finish(cursor, tasks[:3])
    cursor.advance({tasks[4].shard_id: 17, tasks[5].shard_id: 2}, [])
    ahead = cursor.next_task()
    cursor.advance({ahead.shard_id: 6}, [])
    state = json.loads(json.dumps(cursor.state_dict()))
    restored = StreamCursor(seed=999)
    restored.load_state_dict(state)
    assert restored.state_dict() == cursor.state_dict() and restored.seed == 3
    # Nothing is open after a restore: unfinished shards come back from their positions.
    resumed = {(t.pass_index, t.url): t.start for t in drain(restored)}
    assert resumed[(0, tasks[4].url)] == 17 and resumed[(0, tasks[5].url)] == 2
    assert resumed[(1, ahead.url)] == 6
    assert {(0, t.url) for t in tasks[3:]} <= set(resumed)
    assert not {(0, t.url) for t in tasks[:3]} & set(resumed)
    twin = cursor.copy()
    assert twin.state_dict() == cursor.state_dict() and twin.assigned() == cursor.assigned()


@pytest.mark.parametrize("damage", [
    lambda s: s.pop("passes"),
    lambda s: s.update(version=99),
    lambda s: s["passes"][0]["finished"].append("s3://elsewhere/x.tar"),
    lambda s: s["passes"][0]["positions"].update({URLS[0]: -1}),
    lambda s: s.update(current_pass=5),
    lambda s: s.update(shards="nope"),
])
def test_malformed_state_is_refused(damage):
    cursor = StreamCursor(seed=0)
    cursor.add_shards(URLS[:3])
    tasks = drain(cursor)
    finish(cursor, tasks[:1])
    state = cursor.state_dict()
    damage(state)
    with pytest.raises(ValueError, match="malformed stream cursor state"):
        StreamCursor(seed=0).load_state_dict(state)


def small_config(**data) -> Config:
    cfg = Config()
    cfg.crops.global_size, cfg.crops.local_size, cfg.crops.local_count = 16, 8, 2
    cfg.data.shuffle_buffer = 4
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg.validate()


def deliver(cursor: StreamCursor, worker: DecodeWorker, batches: int | None, batch_size: int) -> list[str]:
    keys: list[str] = []
    while batches is None or batches > 0:
        while (task := cursor.next_task()) is not None:
            worker.assign(task)
        batch = worker.next_batch(batch_size)
        if batch is None:
            break
        cursor.advance(batch.progress, batch.finished)
        keys.extend(batch.keys)
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

    trained = StreamCursor(seed=cfg.data.seed, endless=False)
    trained.add_shards(sorted(str(p) for p in tmp_path.glob("*.tar")))
    with DecodeWorker(cfg, worker_index=0) as first:
        before = deliver(trained, first, batches=2, batch_size=7)
        # The worker has read ahead; what it read but did not deliver must come again.
        assert first.unfinished()
    snapshot = json.loads(json.dumps(trained.state_dict()))
    assert len(before) == 14

    restored = StreamCursor(seed=cfg.data.seed)
    restored.load_state_dict(snapshot)
    with DecodeWorker(cfg, worker_index=1) as second:
        after = deliver(restored, second, batches=None, batch_size=5)
    assert restored.exhausted
    assert len(before) + len(after) == len(all_keys)
    assert sorted(before + after) == sorted(all_keys)
