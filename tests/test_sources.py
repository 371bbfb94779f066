from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time

import pytest
from conftest import FAKE_SECRET, colour_samples

from stream_swav import storage
from stream_swav.config import StorageConfig
from stream_swav.data.sources import LOOKUP_THREADS, Listed, Relisting, ShardSource, ShardSpecError, spec_kind


def test_spec_kinds():
    assert spec_kind("s3://b/shards/{000..009}.tar") == "pattern"
    assert spec_kind("/data/one.tar") == "pattern"
    assert spec_kind("s3://b/lists/train.txt") == "list"
    assert spec_kind("s3://b/shards/") == "prefix"
    assert spec_kind("/data/shards") == "prefix"


def test_brace_pattern_keeps_padding_and_lists_only_existing_shards(s3_bucket, make_shard):
    for n in (0, 1, 3, 12):
        make_shard(s3_bucket.url(f"shards/{n:06d}.tar"), colour_samples(1))
    source = ShardSource(s3_bucket.url("shards/{000000..000012}.tar"), s3_bucket.storage)
    listed = [s3_bucket.url(f"shards/{n:06d}.tar") for n in (0, 1, 3, 12)]
    assert source.list_shards() == listed and source.relist() == listed
    # Follow mode over a bucket still being filled: missing entries are picked up when they land.
    make_shard(s3_bucket.url("shards/000002.tar"), colour_samples(1))
    make_shard(s3_bucket.url("shards/000013.tar"), colour_samples(1))  # outside the pattern
    assert source.relist() == [s3_bucket.url(f"shards/{n:06d}.tar") for n in (0, 1, 2, 3, 12)]


def test_pattern_spanning_folders_and_lists(tmp_path, make_shard):
    for part in ("a", "b"):
        for n in range(3):
            make_shard(str(tmp_path / part / f"{n:02d}.tar"), colour_samples(1))
    source = ShardSource(str(tmp_path / "{a,b,c}" / "{00..01}.tar"), StorageConfig())
    assert source.list_shards() == [str(tmp_path / p / f"{n:02d}.tar") for p in ("a", "b") for n in range(2)]


def test_single_tar_spec(tmp_path, make_shard):
    path = make_shard(str(tmp_path / "only.tar"), colour_samples(1))
    assert ShardSource(path, StorageConfig()).list_shards() == [path]
    assert ShardSource(f"file://{path}", StorageConfig()).list_shards() == [path]


def test_prefix_lists_all_tars_below_sorted(s3_bucket, make_shard):
    for key in ("data/b/002.tar", "data/a/001.tar", "data/a/000.tar", "data/c.tar.gz", "other/x.tar"):
        make_shard(s3_bucket.url(key), colour_samples(1))
    storage.write_bytes_atomic(s3_bucket.url("data/readme.txt"), b"not a shard", s3_bucket.storage)
    source = ShardSource(s3_bucket.url("data/"), s3_bucket.storage)
    expected = [s3_bucket.url(k) for k in ("data/a/000.tar", "data/a/001.tar", "data/b/002.tar", "data/c.tar.gz")]
    assert source.list_shards() == expected
    # A new shard appears after the first listing: relist lists it.
    make_shard(s3_bucket.url("data/a/000b.tar"), colour_samples(1))
    assert source.relist() == source.list_shards() == sorted(expected + [s3_bucket.url("data/a/000b.tar")])
    # A key prefix that is not a folder.
    assert ShardSource(s3_bucket.url("data/a/00"), s3_bucket.storage).list_shards() == [
        s3_bucket.url("data/a/000.tar"), s3_bucket.url("data/a/000b.tar"), s3_bucket.url("data/a/001.tar")]


def test_local_folder(tmp_path, make_shard):
    for name in ("2.tar", "1.tar", "sub/0.tar"):
        make_shard(str(tmp_path / name), colour_samples(1))
    (tmp_path / "notes.json").write_text("{}")
    source = ShardSource(str(tmp_path), StorageConfig())
    assert source.list_shards() == [str(tmp_path / n) for n in ("1.tar", "2.tar", "sub/0.tar")]
    assert ShardSource(str(tmp_path / "missing"), StorageConfig()).list_shards() == []


def test_list_file_on_s3(s3_bucket, make_shard):
    make_shard(s3_bucket.url("s/0.tar"), colour_samples(1))
    make_shard(s3_bucket.url("lists/1.tar"), colour_samples(1))
    text = f"# training shards\n{s3_bucket.url('s/0.tar')}\n\n  1.tar  \n# {s3_bucket.url('s/x.tar')}\n"
    list_url = s3_bucket.url("lists/train.txt")
    storage.write_bytes_atomic(list_url, text.encode(), s3_bucket.storage)
    source = ShardSource(list_url, s3_bucket.storage)
    assert source.list_shards() == [s3_bucket.url("s/0.tar"), s3_bucket.url("lists/1.tar")]
    storage.write_bytes_atomic(list_url, (text + "/abs/local.tar\n").encode(), s3_bucket.storage)
    assert source.relist() == [s3_bucket.url("s/0.tar"), s3_bucket.url("lists/1.tar"), "/abs/local.tar"]


def test_list_file_local_relative_entries(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "all.txt").write_text("a.tar\n../b.tar\ns3://bkt/c.tar\n#x.tar\na.tar\n")
    source = ShardSource(str(tmp_path / "lists" / "all.txt"), StorageConfig())
    assert source.list_shards() == [str(tmp_path / "lists" / "a.tar"), str(tmp_path / "b.tar"), "s3://bkt/c.tar"]


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(ShardSpecError, match="nbalanced"):
        ShardSource(str(tmp_path / "{000..003.tar"), StorageConfig())
    with pytest.raises(ShardSpecError, match="empty"):
        ShardSource("  ", StorageConfig())
    with pytest.raises(ShardSpecError, match="does not exist"):
        ShardSource(str(tmp_path / "missing.txt"), StorageConfig()).list_shards()
    (tmp_path / "bad.txt").write_text("gs://elsewhere/x.tar\n")
    with pytest.raises(ShardSpecError, match="line 1.*unsupported scheme"):
        ShardSource(str(tmp_path / "bad.txt"), StorageConfig()).list_shards()
    with pytest.raises(ValueError, match="unsupported scheme"):
        ShardSource("gs://bucket/{0..3}.tar", StorageConfig())


def test_a_shard_is_gone_only_when_the_store_says_so(tmp_path, s3_bucket, make_shard):
    here = make_shard(str(tmp_path / "0.tar"), colour_samples(1))
    source = ShardSource(str(tmp_path), StorageConfig())
    assert source.gone([here, str(tmp_path / "1.tar")]) == [str(tmp_path / "1.tar")]
    on_s3 = make_shard(s3_bucket.url("s/0.tar"), colour_samples(1))
    bucket = ShardSource(s3_bucket.url("s/"), s3_bucket.storage)
    # More than one lookup thread's share, in the order asked.
    missing = [s3_bucket.url(f"s/{n}.tar") for n in range(1, 2 * LOOKUP_THREADS)]
    assert bucket.gone([missing[0], on_s3, *missing[1:]]) == missing
    assert bucket.gone([]) == []
    # A store that cannot be asked (here: no such bucket's endpoint answers) says nothing is gone.
    unreachable = StorageConfig(endpoint_url="http://127.0.0.1:9", retries=0, connect_timeout_s=1, read_timeout_s=1)
    assert ShardSource("s3://nowhere/s/", unreachable).gone(["s3://nowhere/s/0.tar"]) == []


def test_relist_survives_a_listing_failure(tmp_path, make_shard, caplog):
    list_path = tmp_path / "l.txt"
    list_path.write_text(str(tmp_path / "0.tar") + "\n")
    source = ShardSource(str(list_path), StorageConfig())
    assert source.list_shards() == [str(tmp_path / "0.tar")]
    list_path.unlink()
    with caplog.at_level(logging.WARNING):
        assert source.relist() is None  # failed: nothing said of what exists
    assert "will retry" in caplog.text
    list_path.write_text(f"{tmp_path / '0.tar'}\n{tmp_path / '1.tar'}\n")
    assert source.relist() == [str(tmp_path / "0.tar"), str(tmp_path / "1.tar")]


class HeldListing:
    """A listing that lasts until the test lets it finish, as one of a big bucket on a slow store
    does: each call waits for `finish(listing)` and answers with that listing (or raises it)."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.answers: queue.Queue[list[str] | BaseException] = queue.Queue()

    def __call__(self) -> list[str]:
        self.started.release()
        answer = self.answers.get(timeout=30)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def finish(self, listing: list[str] | BaseException) -> None:
        assert self.started.acquire(timeout=10), "no listing was started"
        self.answers.put(listing)


def next_listing(relisting: Relisting, within_s: float = 10.0) -> Listed:
    deadline = time.monotonic() + within_s
    while (listed := relisting.poll()) is None:
        assert time.monotonic() < deadline, "the listing never came"
        time.sleep(0.01)
    return listed


def test_a_listing_under_way_holds_up_no_poll_and_one_from_before_a_restart_is_dropped():
    """Follow mode lists on a thread of its own: every poll returns at once while a listing lasts."""
    now = [0.0]
    listing = HeldListing()
    relisting = Relisting(listing, interval_s=30, clock=lambda: now[0])
    assert relisting.poll() is None and not listing.started.acquire(timeout=0.1)  # not due yet
    now[0] = 30.0
    assert relisting.poll() is None and relisting.poll() is None  # started, still under way
    listing.finish(["0.tar", "1.tar"])
    assert next_listing(relisting) == Listed(["0.tar", "1.tar"], started=30.0)
    # The next one an interval after that one ended, not before.
    now[0] = 59.0
    assert relisting.poll() is None and not listing.started.acquire(timeout=0.1)
    # One under way when the caller lists for itself (a resume) is dropped; the next waits for it
    # to end, an interval after the restart (never two at once).
    now[0] = 60.0
    assert relisting.poll() is None
    now[0] = 61.0
    relisting.restart()
    now[0] = 95.0
    assert relisting.poll() is None  # the dropped one lasts: no other starts beside it
    assert listing.started.acquire(timeout=10) and not listing.started.acquire(timeout=0.1)
    listing.started.release()
    listing.finish(["0.tar"])
    time.sleep(0.2)
    assert relisting.poll() is None  # dropped; and the next one starts now
    listing.finish(["0.tar", "1.tar", "2.tar"])
    assert next_listing(relisting) == Listed(["0.tar", "1.tar", "2.tar"], started=95.0)


def test_a_listing_that_does_not_end_is_reported_once(caplog):
    now = [0.0]
    listing = HeldListing()
    relisting = Relisting(listing, interval_s=30, what="s3://bucket/shards/", clock=lambda: now[0])
    now[0] = 30.0
    relisting.poll()
    with caplog.at_level(logging.INFO):
        for minutes in (29, 31, 45):
            now[0] = 30.0 + minutes * 60
            assert relisting.poll() is None
        assert caplog.text.count("listing s3://bucket/shards/ has run for 31 min without an answer") == 1
        assert caplog.text.count("has run for") == 1
        listing.finish(["0.tar"])
        assert next_listing(relisting).urls == ["0.tar"]
    assert "listing s3://bucket/shards/ ended after 45 min" in caplog.text


def test_an_unexpected_error_of_a_listing_reaches_the_poll():
    def broken() -> list[str]:
        raise RuntimeError("a bug in the listing")

    relisting = Relisting(broken, interval_s=0)
    with pytest.raises(RuntimeError, match="a bug in the listing"):
        next_listing(relisting)


def test_an_unexpected_error_of_a_dropped_listing_is_logged(caplog):
    """A listing dropped at a resume is not handed to the caller, but a bug in it is not hidden."""
    listing = HeldListing()
    relisting = Relisting(listing, interval_s=0, what="s3://bucket/shards/")
    relisting.poll()
    relisting.restart()
    listing.finish(RuntimeError("a bug in the listing"))
    with caplog.at_level(logging.ERROR):
        deadline = time.monotonic() + 10
        while "raised" not in caplog.text:
            assert relisting.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    assert "listing s3://bucket/shards/ (dropped at a resume) raised" in caplog.text
    assert "RuntimeError: a bug in the listing" in caplog.text


def test_a_bad_line_added_to_a_list_during_the_run_hides_no_other_shard(tmp_path, caplog):
    """At the start a bad line refuses the list (one line, naming it); added later while the run
    follows the list, it is skipped and said once, and the shards after it still come in."""
    list_path = tmp_path / "l.txt"
    list_path.write_text("0.tar\n")
    source = ShardSource(str(list_path), StorageConfig())
    assert source.list_shards() == [str(tmp_path / "0.tar")]
    list_path.write_text("0.tar\nhttps://cdn.example/c.tar\n1.tar\n")
    with caplog.at_level(logging.WARNING):
        assert source.relist() == [str(tmp_path / "0.tar"), str(tmp_path / "1.tar")]
        list_path.write_text("0.tar\nhttps://cdn.example/c.tar\n1.tar\n2.tar\n")
        assert source.relist() == [str(tmp_path / n) for n in ("0.tar", "1.tar", "2.tar")]
    assert caplog.text.count("line 2 skipped: ") == 1 and "unsupported scheme" in caplog.text
    with pytest.raises(ShardSpecError, match="line 2.*unsupported scheme"):
        ShardSource(str(list_path), StorageConfig()).list_shards()


# ------------------------------------------------------------------ storage


def test_endpoint_from_environment_and_config_precedence(s3_bucket, make_shard, monkeypatch):
    url = make_shard(s3_bucket.url("x/0.tar"), colour_samples(1))
    # The fixture put the endpoint in AWS_ENDPOINT_URL: a default config reaches moto through it.
    assert storage.exists(url, StorageConfig())
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_bucket.endpoint)
    assert storage.exists(url, StorageConfig(retries=0))
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    # The config's endpoint wins over the environment.
    assert storage.exists(url, StorageConfig(endpoint_url=s3_bucket.endpoint))


def test_storage_helpers_local_and_s3(tmp_path, s3_bucket):
    for base in (str(tmp_path / "ckpt"), f"file://{tmp_path}/ckpt2", s3_bucket.url("ckpt")):
        cfg = s3_bucket.storage
        storage.write_bytes_atomic(f"{base}/step-1/meta.json", b'{"a": 1}', cfg)
        storage.write_bytes_atomic(f"{base}/latest.json", b"old", cfg)
        storage.write_bytes_atomic(f"{base}/latest.json", b"new", cfg)
        assert storage.read_bytes(f"{base}/latest.json", cfg) == b"new"
        assert storage.listdir(base, cfg) == ["latest.json", "step-1"]
        assert storage.exists(f"{base}/step-1/meta.json", cfg)
        storage.rm(f"{base}/step-1", cfg)
        assert not storage.exists(f"{base}/step-1/meta.json", cfg)
        assert storage.listdir(base, cfg) == ["latest.json"]
    # No temporary files left next to the target.
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["latest.json"]


def test_filesystems_are_cached_per_options(s3_bucket):
    fs_a, path = storage.filesystem_for(s3_bucket.url("k"), s3_bucket.storage)
    fs_b, _ = storage.filesystem_for(s3_bucket.url("other"), s3_bucket.storage)
    fs_c, _ = storage.filesystem_for(s3_bucket.url("k"), StorageConfig(endpoint_url=s3_bucket.endpoint, retries=3))
    assert path == f"{s3_bucket.name}/k"
    assert fs_a is fs_b and fs_a is not fs_c
    assert fs_c.retries == 4


def test_describe_storage_redacts_secrets(s3_bucket):
    text = json.dumps(storage.describe_storage(s3_bucket.storage))
    assert FAKE_SECRET not in text and "testing-key-id" not in text
    assert s3_bucket.endpoint in text and "***" in text
