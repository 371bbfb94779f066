"""The shard format: WebDataset tar shards, read as a deterministic, resumable stream of
encoded samples, and written.

Members are grouped into samples the WebDataset way: the key is the member
path up to the first dot of its file name, the rest is the extension
(``a/b/img01.jpg`` -> key ``a/b/img01``, extension ``jpg``). One image member
per sample (see `IMAGE_EXTENSIONS`); ``json``/``txt``/``cls`` ride along as
raw bytes and are never required. Other members are skipped unread. A ``cls``
member holds the class index as ASCII digits (`parse_label`, `label_bytes`).
`ShardWriter` writes shards in this layout, with fixed member metadata so the
same samples always give byte-identical shards.

The tar reader is our own loop over 512-byte blocks, with headers parsed by
``tarfile.TarInfo.frombuf``. ``tarfile``'s stream iterator would do the
grouping just as well but stops silently at a damaged header, exactly as at
the end of the archive, so a corrupt shard could not be told from a short one
and nothing after the damage could be recovered. Here a damaged header counts
``bad-tar`` and reading resumes at the next valid header; an archive that
ends without its end-of-archive block counts ``truncated-shard``. Either way
every sample that could be read is still emitted. Gzipped tars are read too.

Emission order is a bounded-buffer shuffle seeded per (seed, pass, shard),
so it depends only on the shard's bytes and the seed. Every sample emitted
has a position in that order, samples that will fail to decode included;
that lets a reader restart at any position by reading (not decoding) the
samples before it, and lets the stream cursor count progress exactly.
"""
from __future__ import annotations

import gzip
import io
import logging
import math
import os
import posixpath
import random
import re
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TypeVar

import fsspec

from stream_swav import storage
from stream_swav.config import StorageConfig
from stream_swav.storage import CHANGED_ERRORS, PERMANENT_ERRORS, TRANSIENT_ERRORS, content_identity

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif")
# How writers store each image extension: one spelling per format.
_CANONICAL_EXTENSION = {"jpeg": "jpg", "tiff": "tif"}
META_EXTENSIONS = ("json", "txt", "cls")
# Read granularity for remote shards: large enough for throughput, small
# enough that a few open shards per actor stay cheap in memory.
READ_BLOCK_BYTES = 8 * 1024 * 1024

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_GZIP_MAGIC = b"\x1f\x8b"
# Skip reason of the rest of a shard read past its size limits.
SHARD_BYTES_LIMIT = "shard-bytes-limit"
_SKIP_CHUNK = 1024 * 1024
_READ_CHUNK = 8 * 1024 * 1024
_MAX_EXTENDED_HEADER = 1024 * 1024
# A member size a header may declare: at most 2**53 bytes (8 PiB; a seek offset fits), never
# negative (tar's base-256 sizes can be). Any other is a damaged header, not a size to read.
_MAX_MEMBER_SIZE = 1 << 53
# A pax `size` record: ASCII digits only (str.isdigit also takes "²"), at most 15 (under 2**53).
_PAX_SIZE = re.compile(r"[0-9]{1,15}")

T = TypeVar("T")


@dataclass
class Sample:
    """One sample's encoded bytes, before any decoding."""

    key: str
    image: bytes | None = None
    image_ext: str = ""
    # extension -> raw bytes, for json/txt/cls members.
    meta: dict[str, bytes] = field(default_factory=dict)
    # Encoded bytes held in memory (image plus metadata).
    nbytes: int = 0
    # "no-image" or "too-many-bytes" when the sample cannot be used; None otherwise.
    error: str | None = None


@dataclass
class ShardReport:
    """Shard-level outcome of reading one shard, filled in while reading."""

    # bad-tar, truncated-shard, shard-read-error, shard-changed, shard-gone.
    errors: Counter = field(default_factory=Counter)
    # Bytes pulled from the shard file, re-reads after errors included.
    bytes_read: int = 0
    # Times the shard was re-opened after a read error.
    retries: int = 0
    # True when read errors outlasted the retries and the rest of the shard was skipped.
    gave_up: bool = False
    # True when the store said the shard is not there (deleted, say by bucket retention).
    gone: bool = False
    # The content identity the shard was read with (`storage.content_identity`), once opened.
    identity: str | None = None


class TarFormatError(Exception):
    """The archive cannot be read further; `reason` is bad-tar or truncated-shard."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def normalised_ext(name: str) -> str:
    """The extension a writer stores a file named `name` under: lower case, jpeg -> jpg, tiff -> tif."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return _CANONICAL_EXTENSION.get(ext, ext)


# A class index travels as int64 (batch labels, curation.balance_signal label); a larger one is malformed.
MAX_LABEL = 2**63 - 1


def parse_label(data: bytes | None) -> int | None:
    """A ``cls`` member (ASCII digits, surrounding whitespace allowed) as a class index; None when
    absent, malformed, negative or beyond int64."""
    if data is None:
        return None
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return label if 0 <= label <= MAX_LABEL else None


def label_bytes(label: int) -> bytes:
    """The ``cls`` member of class index `label`."""
    if label < 0:
        raise ValueError(f"class index must be >= 0, got {label}")
    return str(int(label)).encode("ascii")


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``); extension lower-cased."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower() if dot else ""


class _TarReader:
    """Walks tar headers one member at a time; the caller reads or ignores each member's data.

    At most `max_bytes` of archive are read (0: no limit), and of a gzipped one at most
    `max_expansion` times its compressed size: a small shard that inflates to gigabytes
    (a compression bomb) costs a bounded share of a decoder's time, every pass."""

    def __init__(self, fileobj: IO[bytes], errors: Counter, report: ShardReport, max_bytes: int = 0,
                 max_expansion: float = 0.0) -> None:
        head = fileobj.read(2)
        fileobj.seek(0)
        self._gzipped = head == _GZIP_MAGIC
        self._limit = max_bytes or math.inf
        compressed = getattr(fileobj, "size", None)
        if self._gzipped and max_expansion and compressed:
            self._limit = min(self._limit, max_expansion * compressed)
        self._consumed = 0
        self._raw = fileobj
        self._file: IO[bytes] = gzip.GzipFile(fileobj=fileobj, mode="rb") if self._gzipped else fileobj
        self._errors = errors
        self._report = report
        self._raw_position = 0
        # Data and padding of the current member that nobody read.
        self._unread = 0
        self._size = 0

    def _read(self, n: int) -> bytes:
        try:
            data = self._file.read(n)
        except EOFError as exc:
            raise TarFormatError("truncated-shard", f"compressed stream ends early: {exc}") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise TarFormatError("bad-tar", f"gzip: {exc}") from None
        self._consumed += len(data)
        if self._consumed > self._limit:
            raise TarFormatError(SHARD_BYTES_LIMIT, f"more than {self._limit:.0f} bytes of archive read "
                                                    f"(data.max_shard_bytes / data.max_expansion)")
        if self._gzipped:
            position = self._raw.tell()
            self._report.bytes_read += position - self._raw_position
            self._raw_position = position
        else:
            self._report.bytes_read += len(data)
        return data

    def _read_exact(self, n: int) -> bytes:
        parts = []
        remaining = n
        while remaining > 0:
            chunk = self._read(min(remaining, _READ_CHUNK))
            if not chunk:
                raise TarFormatError("truncated-shard", f"archive ends {remaining} bytes inside a member")
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if not self._gzipped and self._file.seekable():
            # Past the end is fine here: the next header read then finds nothing.
            self._file.seek(n, 1)
            return
        while n > 0:
            chunk = self._read(min(n, _SKIP_CHUNK))
            if not chunk:
                raise TarFormatError("truncated-shard", f"archive ends {n} bytes inside a member")
            n -= len(chunk)

    def _read_block(self) -> bytes:
        """The next 512 bytes, or fewer at the end of the file."""
        block = self._read(_BLOCK)
        while block and len(block) < _BLOCK:
            more = self._read(_BLOCK - len(block))
            if not more:
                break
            block += more
        return block

    def _read_member_payload(self, size: int) -> bytes:
        data = self._read_exact(size)
        self._skip(-size % _BLOCK)
        return data

    def next_member(self) -> tuple[str, int] | None:
        """(name, size) of the next regular file, or None at the end of the archive."""
        self._skip(self._unread)
        self._unread = 0
        pax: dict[str, str] = {}
        long_name = ""
        resyncing = False
        while True:
            block = self._read_block()
            if len(block) < _BLOCK:
                if resyncing:
                    # The damage already counted runs to the end of the file.
                    return None
                raise TarFormatError("truncated-shard", "archive ends without its end-of-archive block"
                                     if not block else "archive ends inside a header")
            if block == _ZERO_BLOCK:
                if resyncing:
                    continue
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
                if not 0 <= info.size <= _MAX_MEMBER_SIZE:
                    raise tarfile.HeaderError(f"member size {info.size}")
            except tarfile.HeaderError:
                if not resyncing:
                    # Counted once per damaged stretch; reading goes on at the next valid header.
                    self._errors["bad-tar"] += 1
                    resyncing = True
                    pax, long_name = {}, ""
                continue
            resyncing = False
            if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME):
                if info.size > _MAX_EXTENDED_HEADER:
                    # Untrusted sizes: a name or attribute list this long is damage, not data to hold.
                    self._errors["bad-tar"] += 1
                    self._skip(info.size + (-info.size % _BLOCK))
                    pax, long_name = {}, ""
                elif info.type == tarfile.XHDTYPE:
                    pax = _parse_pax(self._read_member_payload(info.size))
                else:
                    long_name = self._read_member_payload(info.size).split(b"\0", 1)[0].decode(
                        "utf-8", "surrogateescape")
                continue
            # A pax size that is no plain number leaves the header's own, as one that is absent does.
            size = int(pax["size"]) if _PAX_SIZE.fullmatch(pax.get("size", "")) else info.size
            if info.type not in _FILE_TYPES:
                self._skip(size + (-size % _BLOCK))
                pax, long_name = {}, ""
                continue
            self._unread = size + (-size % _BLOCK)
            self._size = size
            return pax.get("path") or long_name or info.name, size

    def read_data(self) -> bytes:
        """The whole data of the member `next_member` just returned."""
        data = self._read_exact(self._size)
        self._unread -= self._size
        return data


def _parse_pax(payload: bytes) -> dict[str, str]:
    """PAX extended header records, ``"<len> <key>=<value>\\n"``; damaged records end the parse."""
    records: dict[str, str] = {}
    position = 0
    while position < len(payload):
        space = payload.find(b" ", position)
        if space < 0 or not payload[position:space].isdigit():
            break
        length = int(payload[position:space])
        record = payload[space + 1:position + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            break
        key, value = record[:-1].split(b"=", 1)
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _finished(sample: Sample) -> Sample:
    if sample.error is None and sample.image is None:
        sample.error = "no-image"
    return sample


def read_samples(fileobj: IO[bytes], max_sample_bytes: int, errors: Counter, report: ShardReport, *,
                 max_shard_bytes: int = 0, max_expansion: float = 0.0) -> Iterator[Sample]:
    """Samples of one tar in archive order. Format problems are counted into `errors`, never raised;
    past the archive limits (see `_TarReader`) the rest of the shard is counted as one
    ``shard-bytes-limit`` and skipped."""
    current: Sample | None = None
    try:
        reader = _TarReader(fileobj, errors, report, max_shard_bytes, max_expansion)
        while (member := reader.next_member()) is not None:
            name, size = member
            key, ext = split_member_name(name)
            if current is None or key != current.key:
                if current is not None:
                    yield _finished(current)
                current = Sample(key=key)
            # An empty image member (a failed upload's placeholder) does not hide a real one after it.
            wanted_image = ext in IMAGE_EXTENSIONS and not current.image
            wanted_meta = ext in META_EXTENSIONS and ext not in current.meta
            if current.error is not None or not (wanted_image or wanted_meta):
                continue
            if current.nbytes + size > max_sample_bytes:
                # Drop what is held and leave the rest of this sample unread.
                current.error = "too-many-bytes"
                current.image, current.image_ext, current.meta, current.nbytes = None, "", {}, 0
                continue
            data = reader.read_data()
            current.nbytes += size
            if wanted_image:
                current.image, current.image_ext = data, ext
            else:
                current.meta[ext] = data
    except TarFormatError as exc:
        errors[exc.reason] += 1
        # A sample cut off before its image is part of the shard-level loss, not a sample of its own.
        if current is not None and current.image is None:
            current = None
    if current is not None:
        yield _finished(current)


def shuffled_samples(samples: Iterable[T], buffer_size: int, seed: int, max_bytes: int = 0,
                     size_of: Callable[[T], int] | None = None) -> Iterator[T]:
    """Bounded-buffer shuffle whose output order depends only on the input order and `seed`.

    The buffer holds encoded samples only, at most `buffer_size` of them and, with `max_bytes`, at
    most that many bytes by `size_of` (beside the sample coming in): 512 photographs of 30 MB would
    otherwise be 15 GB per shard. Where the byte bound never binds, the order is the count-bounded
    one, so positions saved by a run before it was set still name the same samples.
    """
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    rng = random.Random(seed)
    # Without a byte bound every sample weighs 0, and `held` stays within any bound.
    measure = size_of if max_bytes and size_of is not None else (lambda _: 0)
    buffer: list[T] = []
    held = 0
    for sample in samples:
        size = measure(sample)
        while buffer and held + size > max_bytes:
            emitted = buffer.pop(rng.randrange(len(buffer)))
            held -= measure(emitted)
            yield emitted
        held += size
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        slot = rng.randrange(buffer_size)
        emitted, buffer[slot] = buffer[slot], sample
        held -= measure(emitted)
        yield emitted
    rng.shuffle(buffer)
    yield from buffer


def _sample_bytes(sample: Sample) -> int:
    return sample.nbytes


def iter_shard(url: str, fs: fsspec.AbstractFileSystem, seed: int, buffer_size: int, start: int = 0, *,
               max_sample_bytes: int, read_retries: int, retry_backoff_s: float,
               report: ShardReport | None = None, max_shard_bytes: int = 0, max_expansion: float = 0.0,
               block_size: int = READ_BLOCK_BYTES, buffer_bytes: int = 0,
               identity: str | None = None) -> Iterator[tuple[int, Sample]]:
    """(position, sample) for every position >= `start` in the shard's emission order.

    Positions before `start` are read and shuffled (the order needs them) but
    handed to nobody, so they cost I/O and no decoding. A read error re-opens
    the shard after ``retry_backoff_s * 2**k`` seconds and carries on at the
    first position not yet yielded; after `read_retries` failures in a row
    without progress (or at once for a forbidden file) the rest of the shard is
    skipped and ``shard-read-error`` counted in `report`; a file that is not
    there, at once, as ``shard-gone`` (`report.gone`). A shard
    whose content changed since this call first opened it (another ETag, or
    another local file) is not read on where the old content stopped: the rest
    of it is skipped and ``shard-changed`` counted, so that its next pass reads
    the new content whole. So is one read from `start` > 0 whose content is not `identity`, the
    one the positions before `start` were read in (by a reader before a resume, or before its
    decode actor was replaced).
    """
    report = report if report is not None else ShardReport()
    path = fs._strip_protocol(url)
    next_position = start
    failures = 0
    if storage.is_special_file(fs, path):  # a FIFO or a device named like a shard, or listed
        _give_up(url, report, Counter(), next_position, OSError("not a regular file"))
        return
    opened = identity if start > 0 else None  # the content identity of the first open
    while True:
        # Format errors of the attempt that ends the shard are the ones reported;
        # an interrupted attempt will meet them again.
        attempt_errors: Counter = Counter()
        try:
            with fs.open(path, "rb", block_size=block_size) as f:
                now = content_identity(f)
                if opened is None:
                    opened = now
                elif now is not None and now != opened:
                    since = ("it was first opened" if report.identity is not None
                             else f"positions before {start} were read")
                    _give_up(url, report, attempt_errors, next_position,
                             OSError(f"the object changed since {since} ({opened} -> {now})"), "shard-changed")
                    return
                report.identity = opened
                samples = shuffled_samples(read_samples(f, max_sample_bytes, attempt_errors, report,
                                                        max_shard_bytes=max_shard_bytes,
                                                        max_expansion=max_expansion), buffer_size, seed,
                                           buffer_bytes, _sample_bytes)
                for position, sample in enumerate(samples):
                    if position < next_position:
                        continue
                    yield position, sample
                    next_position = position + 1
                    failures = 0
            report.errors.update(attempt_errors)
            return
        except FileNotFoundError as exc:
            report.gone = True
            _give_up(url, report, attempt_errors, next_position, exc, "shard-gone")
            return
        except PERMANENT_ERRORS as exc:
            _give_up(url, report, attempt_errors, next_position, exc)
            return
        except CHANGED_ERRORS as exc:
            _give_up(url, report, attempt_errors, next_position, exc, "shard-changed")
            return
        except TRANSIENT_ERRORS as exc:
            failures += 1
            if failures > read_retries:
                _give_up(url, report, attempt_errors, next_position, exc)
                return
            delay = retry_backoff_s * 2 ** (failures - 1)
            log.warning("reading %s at position %d failed (%s: %s); retry %d/%d in %.1fs", url, next_position,
                        type(exc).__name__, exc, failures, read_retries, delay)
            report.retries += 1
            time.sleep(delay)


def _give_up(url: str, report: ShardReport, attempt_errors: Counter, position: int, exc: BaseException,
             reason: str = "shard-read-error") -> None:
    # A shard gone from storage is the stream's churn (retention), not a fault: the driver retires it.
    log.log(logging.WARNING if reason == "shard-gone" else logging.ERROR, "giving up on %s at position %d: %s: %s",
            url, position, type(exc).__name__, exc)
    report.errors.update(attempt_errors)
    report.errors[reason] += 1
    report.gave_up = True


# ---- writing -------------------------------------------------------------------------------------------


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so identical input gives byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Fills one local temporary tar at a time and publishes it under `dest` (a folder or an
    s3:// prefix) only when complete, so a reader never sees half a shard."""

    def __init__(self, dest: str, storage_cfg: StorageConfig) -> None:
        self.dest = dest
        self.storage_cfg = storage_cfg
        protocol, path = storage.split_protocol(dest)
        self.local_dir = path if protocol == "file" else None
        if self.local_dir is not None:
            os.makedirs(self.local_dir, exist_ok=True)
        self.tmp_path: str | None = None
        self.tar: tarfile.TarFile | None = None

    def open(self) -> None:
        # Beside the destination when local, so publishing is a rename.
        handle, self.tmp_path = tempfile.mkstemp(prefix=".shard-", suffix=".tar.tmp", dir=self.local_dir)
        self.tar = tarfile.open(fileobj=os.fdopen(handle, "wb"), mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        """One sample: ``<key>.<ext>`` per field, in sorted order. Keys may not contain dots."""
        assert self.tar is not None
        if "." in posixpath.basename(key):
            raise ValueError(f"sample key {key!r} has a dot in its file name; readers would split it there")
        for ext in sorted(fields):
            _add_member(self.tar, f"{key}.{ext}", fields[ext])

    def publish(self, name: str) -> int:
        """Close the temporary tar, move it to dest/name; returns its size in bytes."""
        assert self.tar is not None and self.tmp_path is not None
        fileobj = self.tar.fileobj
        self.tar.close()
        fileobj.close()
        size = os.path.getsize(self.tmp_path)
        # mkstemp creates owner-only files; shards are meant to be read by other users and services.
        os.chmod(self.tmp_path, 0o644)
        if self.local_dir is not None:
            os.replace(self.tmp_path, os.path.join(self.local_dir, name))
        else:
            fs, path = storage.filesystem_for(storage.join_url(self.dest, name), self.storage_cfg)
            fs.put_file(self.tmp_path, path)
            os.unlink(self.tmp_path)
        self.tar = None
        self.tmp_path = None
        return size

    def discard(self) -> None:
        if self.tar is not None:
            fileobj = self.tar.fileobj
            self.tar.close()
            fileobj.close()
        if self.tmp_path is not None and os.path.exists(self.tmp_path):
            os.unlink(self.tmp_path)
        self.tar = None
        self.tmp_path = None


__all__ = ["IMAGE_EXTENSIONS", "ShardWriter", "parse_label", "label_bytes", "normalised_ext", "META_EXTENSIONS", "READ_BLOCK_BYTES", "Sample", "ShardReport", "TarFormatError",
           "split_member_name", "read_samples", "shuffled_samples", "iter_shard"]
