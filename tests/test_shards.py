from __future__ import annotations

import gzip
import io
import os
import tarfile
import threading
from collections import Counter

import numpy as np
import pytest
from conftest import colour_samples, free_port, image_bytes, start_moto, tar_bytes, use_fake_credentials
from PIL import Image

from stream_swav import storage
from stream_swav.config import StorageConfig
from stream_swav.data.shards import (ShardReport, iter_shard, read_samples, shuffled_samples,
                                     split_member_name)

LIMIT = 1 << 20


def read_all(data: bytes, max_sample_bytes: int = LIMIT) -> tuple[list, Counter, ShardReport]:
    errors: Counter = Counter()
    report = ShardReport()
    samples = list(read_samples(io.BytesIO(data), max_sample_bytes, errors, report))
    return samples, errors, report


def header_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [member.offset for member in tar.getmembers()]


def test_split_member_name():
    assert split_member_name("a/b/img01.jpg") == ("a/b/img01", "jpg")
    assert split_member_name("a.b/x.seg.PNG") == ("a.b/x", "seg.png")
    assert split_member_name("noext") == ("noext", "")


def test_members_group_into_samples_with_metadata():
    jpg, png = image_bytes((255, 0, 0)), image_bytes((0, 0, 255), "PNG")
    data = tar_bytes([
        ("dir/a", {"jpg": jpg, "cls": b"3", "json": b'{"w": 1}', "txt": b"a cat", "seg.png": png}),
        ("dir/b", {"json": b"{}", "png": png}),
        ("dir/c", {"json": b"{}"}),
        ("d.e/f", {"webp": b"not really webp", "jpeg": jpg}),
    ])
    samples, errors, report = read_all(data)
    assert [s.key for s in samples] == ["dir/a", "dir/b", "dir/c", "d.e/f"]
    a, b, c, f = samples
    assert (a.image, a.image_ext) == (jpg, "jpg")
    assert a.meta == {"cls": b"3", "json": b'{"w": 1}', "txt": b"a cat"}
    assert a.nbytes == len(jpg) + 1 + 8 + 5
    assert (b.image, b.image_ext, b.meta) == (png, "png", {"json": b"{}"})
    assert (c.image, c.error) == (None, "no-image")
    # The first image member wins; a second one is left unread.
    assert (f.image, f.image_ext, f.error) == (b"not really webp", "webp", None)
    assert not errors
    # Headers and wanted members are read; the unwanted seg.png and the tar's end padding are not.
    assert sum(s.nbytes for s in samples) < report.bytes_read < len(data) - len(png)


def test_an_empty_image_member_does_not_hide_the_real_one_after_it():
    png = image_bytes((0, 0, 255), "PNG")
    data = tar_bytes([("a", {"jpg": b"", "png": png}), ("b", {"jpg": b""}), ("c", {"avif": b"avif bytes"})])
    (a, b, c), errors, _ = read_all(data)
    assert (a.image, a.image_ext, a.error) == (png, "png", None)
    assert (b.image, b.error) == (b"", None)  # the decoder counts it as empty
    assert (c.image, c.image_ext) == (b"avif bytes", "avif")  # AVIF is read, as the decoder accepts it
    assert not errors


def test_long_member_names_pax_and_gnu():
    deep = "/".join(["folder" * 5] * 5) + "/sample-with-a-long-name"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
            for ext, payload in (("jpg", b"JPEGDATA"), ("cls", b"7")):
                info = tarfile.TarInfo(f"{deep}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        samples, errors, _ = read_all(buffer.getvalue())
        assert [(s.key, s.image, s.meta) for s in samples] == [(deep, b"JPEGDATA", {"cls": b"7"})]
        assert not errors


def test_oversized_extended_header_is_damage_not_memory():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        huge = tarfile.TarInfo("PaxHeader/x")
        huge.type = tarfile.XHDTYPE
        huge.size = 3 << 20
        tar.addfile(huge, io.BytesIO(b"9" * huge.size))
        for key, members in colour_samples(2, "after"):
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    samples, errors, report = read_all(buffer.getvalue())
    assert [s.key for s in samples] == ["after-00000", "after-00001"]
    assert errors == Counter({"bad-tar": 1}) and report.bytes_read < 1 << 20


def test_oversized_sample_is_skipped_unread():
    big = os.urandom(200_000)
    data = tar_bytes(colour_samples(2, "x") + [("big", {"jpg": big, "cls": b"1"})] + colour_samples(2, "y"))
    samples, errors, report = read_all(data, max_sample_bytes=100_000)
    assert [s.key for s in samples] == ["x-00000", "x-00001", "big", "y-00000", "y-00001"]
    assert samples[2].error == "too-many-bytes" and samples[2].image is None and samples[2].meta == {}
    assert all(s.error is None and s.image for i, s in enumerate(samples) if i != 2)
    # Seekable input: the big member was skipped, not read.
    assert report.bytes_read <= len(data) - len(big)
    assert not errors


def test_damaged_header_counts_bad_tar_and_reading_goes_on():
    good = colour_samples(6, "s")
    data = bytearray(tar_bytes(good))
    offsets = header_offsets(bytes(data))
    # Members are (jpg|png, cls) per sample: damage the image header of sample 2.
    victim = offsets[4]
    data[victim:victim + 100] = b"\xff" * 100
    samples, errors, _ = read_all(bytes(data))
    assert errors == Counter({"bad-tar": 1})
    keys = [s.key for s in samples if s.error is None]
    assert keys == ["s-00000", "s-00001", "s-00003", "s-00004", "s-00005"]
    # Sample 2 keeps its .cls member but lost its image.
    assert [(s.key, s.error) for s in samples if s.error] == [("s-00002", "no-image")]


def raw_member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE, size_field: bytes | None = None) -> bytes:
    """A ustar member as bytes, its size field optionally replaced (a hostile header's)."""
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), kind
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    if size_field is not None:
        header[124:136] = size_field
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + bytes(-len(data) % 512)


def pax_member(records: dict[bytes, bytes]) -> bytes:
    body = b""
    for key, value in records.items():
        record = b" %s=%s\n" % (key, value)
        length = len(record) + len(str(len(record) + 3))
        body += str(length).encode() + record
    return raw_member("PaxHeader/x", body, tarfile.XHDTYPE)


@pytest.mark.parametrize("hostile", [
    pax_member({b"size": "\u00b2".encode()}),  # "²": str.isdigit() says yes, int() says no
    pax_member({b"size": b"9" * 5000}),  # beyond int()'s digit limit
    pax_member({b"size": b"1" + b"0" * 30}),  # beyond any seek offset
    raw_member("huge.txt", b"", size_field=b"\x80" + (1 << 70).to_bytes(11, "big")),  # base-256
    # Negative: the sample's bytes would count down, letting its image past the limit.
    raw_member("victim.cls", b"", size_field=b"\xff" * 4 + (-10**12 & (1 << 64) - 1).to_bytes(8, "big")),
])
def test_hostile_member_sizes_are_damage_and_reading_goes_on(tmp_path, hostile):
    """Sizes a header may declare but no archive holds (a pax size that is no plain number, beyond
    any offset, or negative in base-256) are counted as damage, on a file and on a stream; they
    never raise out of the reader (every decode actor given such a shard failed) nor let a sample
    past max_sample_bytes."""
    def members(samples: list) -> bytes:
        return b"".join(raw_member(f"{key}.{ext}", payload) for key, fields in samples for ext, payload in fields.items())

    data = (members(colour_samples(2, "before")) + hostile + raw_member("victim.jpg", b"\x00" * 3000)
            + members(colour_samples(2, "after")) + bytes(1024))
    path = tmp_path / "hostile.tar"
    path.write_bytes(data)
    for fileobj in (open(path, "rb"), io.BytesIO(data)):
        with fileobj:
            errors, report = Counter(), ShardReport()
            samples = list(read_samples(fileobj, 2000, errors, report))
        keys = [s.key for s in samples if s.error is None]
        assert keys[:2] == ["before-00000", "before-00001"] and keys[-2:] == ["after-00000", "after-00001"]
        assert all(0 <= s.nbytes <= 2000 and len(s.image or b"") <= 2000 for s in samples)
        assert set(errors) <= {"bad-tar", "truncated-shard"}


@pytest.mark.parametrize("cut", ["mid-data", "at-member-boundary", "mid-header"])
def test_truncated_shard_yields_what_was_readable(cut):
    good = colour_samples(5, "t")
    data = tar_bytes(good)
    offsets = header_offsets(data)
    fourth_image = offsets[6]
    end = {"mid-data": fourth_image + 512 + 40, "at-member-boundary": fourth_image,
           "mid-header": fourth_image + 200}[cut]
    samples, errors, _ = read_all(data[:end])
    assert errors == Counter({"truncated-shard": 1})
    assert [s.key for s in samples] == ["t-00000", "t-00001", "t-00002"]
    assert all(s.error is None for s in samples)


def test_empty_and_garbage_files():
    assert read_all(b"")[1] == Counter({"truncated-shard": 1})
    samples, errors, _ = read_all(os.urandom(5000))
    assert samples == [] and errors == Counter({"bad-tar": 1})


def test_gzipped_shard_and_truncated_gzip():
    plain = tar_bytes(colour_samples(4, "g"))
    packed = gzip.compress(plain)
    samples, errors, report = read_all(packed)
    assert [s.key for s in samples] == [f"g-{n:05d}" for n in range(4)] and not errors
    assert report.bytes_read == len(packed)
    samples, errors, _ = read_all(packed[: len(packed) * 2 // 3])
    assert errors["truncated-shard"] == 1 and len(samples) < 4


def test_shuffle_is_a_seeded_bounded_permutation():
    items = list(range(200))
    a = list(shuffled_samples(items, 16, seed=1))
    assert sorted(a) == items
    assert a == list(shuffled_samples(iter(items), 16, seed=1))
    assert a != list(shuffled_samples(items, 16, seed=2))
    assert a != items
    # Bounded buffer: the k-th item out was among the first k + 16 in.
    assert all(item < k + 16 + 1 for k, item in enumerate(a))
    assert list(shuffled_samples(items, 1, seed=5)) == items
    with pytest.raises(ValueError):
        list(shuffled_samples(items, 0, seed=0))


def test_the_shuffle_buffer_holds_at_most_its_bytes_and_keeps_its_order_where_that_never_binds():
    """Samples of n bytes each (a photograph can be 30 MB; 512 of them per shard is 15 GB): the
    buffer's bytes stay within the bound, the output is still a seeded permutation, and a bound
    that never binds leaves the count-bounded order (saved stream positions keep their samples)."""
    sizes = [1 + (n * 7919) % 100 for n in range(300)]
    items = list(range(300))
    held_at_most = []

    def size_of(item: int) -> int:
        return sizes[item]

    out, buffer_bytes = [], 0
    consumed = iter(items)

    def feed():
        nonlocal buffer_bytes
        for item in consumed:
            buffer_bytes += size_of(item)
            yield item

    for item in shuffled_samples(feed(), 64, seed=3, max_bytes=500, size_of=size_of):
        # What went in minus what came out: the buffer, plus the one sample waiting to go in.
        held_at_most.append(buffer_bytes - sum(size_of(i) for i in out))
        out.append(item)
    assert sorted(out) == items and out == list(shuffled_samples(items, 64, seed=3, max_bytes=500, size_of=size_of))
    assert max(held_at_most) <= 500 + max(sizes)
    assert list(shuffled_samples(items, 64, seed=3, max_bytes=10**9, size_of=size_of)) == list(
        shuffled_samples(items, 64, seed=3))
    assert out != list(shuffled_samples(items, 64, seed=3))


def write_local_shard(tmp_path, samples, name="shard.tar") -> str:
    path = tmp_path / name
    path.write_bytes(tar_bytes(samples))
    return str(path)


def shard_keys(url, fs, seed, start=0, buffer_size=8, **kwargs):
    report = ShardReport()
    got = [(pos, s.key) for pos, s in iter_shard(url, fs, seed, buffer_size, start, max_sample_bytes=LIMIT,
                                                 read_retries=kwargs.pop("read_retries", 2),
                                                 retry_backoff_s=kwargs.pop("retry_backoff_s", 0.01),
                                                 report=report, **kwargs)]
    return got, report


def test_start_position_yields_exactly_the_suffix(tmp_path):
    samples = colour_samples(25, "p")
    samples.insert(7, ("meta-only", {"json": b"{}"}))
    url = write_local_shard(tmp_path, samples)
    fs, _ = storage.filesystem_for(url, StorageConfig())
    full, report = shard_keys(url, fs, seed=11)
    assert [pos for pos, _ in full] == list(range(26))
    assert sorted(k for _, k in full) == sorted(k for k, _ in samples)
    assert [k for _, k in full] != [k for k, _ in samples]
    assert not report.errors and not report.gave_up
    for start in (1, 7, 13, 25, 26, 40):
        assert shard_keys(url, fs, seed=11, start=start)[0] == full[start:]
    assert shard_keys(url, fs, seed=12)[0] != full


def test_missing_shard_gives_up_at_once_and_says_it_is_gone(tmp_path):
    url = str(tmp_path / "nope.tar")
    fs, _ = storage.filesystem_for(url, StorageConfig())
    got, report = shard_keys(url, fs, seed=0, read_retries=5, retry_backoff_s=10.0)
    assert got == [] and report.gave_up and report.gone and report.retries == 0
    assert report.errors == Counter({"shard-gone": 1})


def test_a_fifo_named_like_a_shard_is_given_up_not_waited_on(tmp_path):
    """Opening a FIFO blocks until something writes to it (a device such as /dev/urandom, listed
    in a .txt, reads forever): a local shard that is no regular file is a read error at once."""
    fifo = tmp_path / "pipe.tar"
    os.mkfifo(fifo)
    fs, _ = storage.filesystem_for(str(fifo), StorageConfig())
    got, report = shard_keys(str(fifo), fs, seed=0, read_retries=5, retry_backoff_s=10.0)
    assert got == [] and report.gave_up and report.errors == Counter({"shard-read-error": 1})
    assert not report.gone  # there, but not readable: not to be retired


def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def own_moto_server(monkeypatch):
    """A moto server this test may stop and restart (same port, same in-process objects)."""
    port = free_port()
    servers = [start_moto(port)]
    endpoint = f"http://127.0.0.1:{port}"
    use_fake_credentials(monkeypatch, endpoint)
    yield endpoint, port, servers
    for server in servers:
        server.stop()


def test_endpoint_outage_shorter_than_retry_budget_is_survived(own_moto_server):
    endpoint, port, servers = own_moto_server
    cfg = StorageConfig(endpoint_url=endpoint, retries=0, connect_timeout_s=1.0, read_timeout_s=5.0)
    samples = [(f"n-{i:03d}", {"png": noise_png(i)}) for i in range(24)]
    data = tar_bytes(samples)
    url = "s3://outage-bucket/shard.tar"
    fs, _ = storage.filesystem_for(url, cfg)
    fs.mkdir("outage-bucket")
    storage.write_bytes_atomic(url, data, cfg)
    local_reference = list(shuffled_samples(read_samples(io.BytesIO(data), LIMIT, Counter(), ShardReport()),
                                            4, seed=3))

    report = ShardReport()
    stream = iter_shard(url, fs, 3, 4, 0, max_sample_bytes=LIMIT, read_retries=6, retry_backoff_s=0.25,
                        report=report, block_size=16 * 1024)
    got = [next(stream)]
    servers.pop().stop()
    restart = threading.Timer(1.0, lambda: servers.append(start_moto(port)))
    restart.start()
    got.extend(stream)
    restart.join()

    assert [pos for pos, _ in got] == list(range(24))
    assert [(s.key, s.image) for _, s in got] == [(s.key, s.image) for s in local_reference]
    assert report.retries >= 1 and not report.gave_up and not report.errors


def test_a_shard_overwritten_while_it_is_read_is_not_read_on_in_the_new_content(own_moto_server):
    """s3fs reads each range If-Match the ETag it opened: an object replaced mid-read (a shard
    regenerated under the same name) raises, and a reopen after an outage sees another ETag. Either
    way the rest of the shard is skipped and counted, never read on at the old content's position
    in the new one."""
    endpoint, port, servers = own_moto_server
    cfg = StorageConfig(endpoint_url=endpoint, retries=0, connect_timeout_s=1.0, read_timeout_s=5.0)
    old = tar_bytes([(f"old-{i:03d}", {"png": noise_png(i)}) for i in range(24)])
    new = tar_bytes([(f"new-{i:03d}", {"png": noise_png(100 + i)}) for i in range(24)])
    url = "s3://changing-bucket/shard.tar"
    fs, _ = storage.filesystem_for(url, cfg)
    fs.mkdir("changing-bucket")

    storage.write_bytes_atomic(url, old, cfg)
    report = ShardReport()
    stream = iter_shard(url, fs, 3, 1, 0, max_sample_bytes=LIMIT, read_retries=6, retry_backoff_s=0.25,
                        report=report, block_size=16 * 1024)
    got = [next(stream), next(stream)]
    storage.write_bytes_atomic(url, new, cfg)
    got.extend(stream)
    assert got and all(s.key.startswith("old-") for _, s in got) and len(got) < 24
    assert report.gave_up and report.errors == Counter({"shard-changed": 1})

    # Replaced during an outage: the read fails, and the retry opens another object.
    storage.write_bytes_atomic(url, old, cfg)
    report = ShardReport()
    stream = iter_shard(url, fs, 3, 1, 0, max_sample_bytes=LIMIT, read_retries=6, retry_backoff_s=0.25,
                        report=report, block_size=16 * 1024)
    got = [next(stream)]
    servers.pop().stop()

    def back_with_new_content():
        servers.append(start_moto(port))
        storage.write_bytes_atomic(url, new, cfg)

    restart = threading.Timer(1.0, back_with_new_content)
    restart.start()
    got.extend(stream)
    restart.join()
    assert all(s.key.startswith("old-") for _, s in got) and len(got) < 24
    assert report.retries >= 1 and report.gave_up and report.errors == Counter({"shard-changed": 1})


def test_a_shard_read_on_from_a_position_is_read_on_only_in_the_content_it_was_read_in(tmp_path):
    """After a resume (or a decode actor's replacement) a reader starts part-way, at the position
    the cursor saved with the content identity the positions before it were read in: a shard
    regenerated under the same name meanwhile is not read on at that position (its old samples'
    places are not the new ones'); the rest is skipped for this pass and counted."""
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes(colour_samples(12, prefix="old")))
    fs, _ = storage.filesystem_for(str(path), StorageConfig())

    def read(start: int, identity: str | None) -> tuple[list, ShardReport]:
        report = ShardReport()
        got = list(iter_shard(str(path), fs, 3, 4, start, max_sample_bytes=LIMIT, read_retries=0, retry_backoff_s=0,
                              report=report, identity=identity))
        return got, report

    whole, report = read(0, None)
    read_in = report.identity
    assert len(whole) == 12 and read_in is not None
    on, report = read(5, read_in)
    assert on == whole[5:] and not report.errors and report.identity == read_in
    stat = path.stat()
    path.write_bytes(tar_bytes(colour_samples(12, prefix="new")))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    on, report = read(5, read_in)
    assert on == [] and report.gave_up and report.errors == Counter({"shard-changed": 1})
    again, report = read(0, None)  # its next pass reads the new content whole
    assert len(again) == 12 and all(s.key.startswith("new") for _, s in again) and not report.errors
    # Without a saved identity (a checkpoint from before they were saved) it is read on unchecked.
    on, report = read(5, None)
    assert len(on) == 7 and not report.errors


def test_a_local_shard_replaced_or_rewritten_has_another_identity_and_a_reopen_the_same(tmp_path):
    """What a reopen after a read error compares: a local file replaced by rename (its open handle
    keeps reading the old content) or rewritten in place is another; the same file reopened is not."""
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes(colour_samples(4)))
    fs, _ = storage.filesystem_for(str(path), StorageConfig())

    def identity():
        with fs.open(str(path), "rb") as f:
            return storage.content_identity(f)

    first = identity()
    assert first is not None and identity() == first
    replacement = tmp_path / "s.tar.new"
    replacement.write_bytes(path.read_bytes())
    # Written a moment later (the same bytes, so only the time tells: a file of the same size
    # replaced within one tick of the filesystem's clock is not told apart).
    stat = path.stat()
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    os.replace(replacement, path)
    renamed = identity()
    assert renamed != first
    with open(path, "r+b") as f:
        f.seek(600)
        f.write(b"x")
    os.utime(path, ns=(0, 12_345))
    assert identity() != renamed
