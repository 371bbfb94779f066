"""`stream-swav make-shards SRC DEST`: images -> WebDataset tar shards, locally or on S3.

SRC is a folder of images (searched recursively), a tar file (WebDataset
shards are regrouped by key; a plain tar of images gives one sample per
file), or a folder with Fashion-MNIST's IDX files. DEST is a local folder or
an s3:// prefix; shards are named ``shard-000000.tar``, ``shard-000001.tar``...

Each sample is stored as ``<key>.<ext>`` (jpg, png, webp...) plus ``<key>.cls``
(the class index as ASCII) when a label is known. Keys are the sample's
position in the source's deterministic order (``f"{index:09d}"``: sorted paths
for folders, member order for tars), so the same input always gives the same
shards. Every image is decoded once to check it; files that fail are counted
by reason in the summary and left out, never fatal.

Resuming: a shard is written to a local temporary file and only copied to
DEST once complete, and then ``manifest.json`` in DEST is rewritten to list
it with the source position it ends at. A re-run with the same settings keeps
every listed shard that still exists, restarts the source after the last one
and only writes what is missing. A manifest from different settings, or
shards without a manifest, make the run stop with an error rather than mix
or overwrite data.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stream_swav import storage
from stream_swav.apps.refusals import refused
from stream_swav.apps import REENCODE_EXT
from stream_swav.config import DataConfig, StorageConfig, UsageError
from stream_swav.data.decode import DecodeLimits, SampleError, decode_image
from stream_swav.data.shards import (IMAGE_EXTENSIONS, ShardReport, ShardWriter, label_bytes, normalised_ext,
                                      parse_label, read_samples)
from stream_swav.progress import ProgressLine

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
SHARD_PREFIX = "shard"
JPEG_QUALITY = 90
# A target side no draft scale can satisfy, i.e. decode JPEGs at full resolution.
FULL_RESOLUTION = 1 << 30
# tar stores every member as a 512-byte header plus data padded to 512 bytes.
TAR_BLOCK = 512
# Off a terminal the progress line is not drawn; a log line this often says how far it got.
PROGRESS_LOG_INTERVAL_S = 5.0


@dataclass(frozen=True)
class ShardSample:
    """One sample ready for a shard."""

    # Position in the source's deterministic order; resuming skips by it.
    index: int
    # WebDataset key: no dots, unique within the output.
    key: str
    # Field extension -> bytes, e.g. {"png": b"...", "cls": b"3"}.
    fields: dict[str, bytes]

    def tar_size(self) -> int:
        return sum(TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK for data in self.fields.values())


@dataclass(frozen=True)
class SkippedSample:
    """A source entry left out, reported in the stream so the summary can count it."""

    index: int
    name: str
    reason: str


@dataclass
class Summary:
    dest: str
    shards_written: int = 0
    # Finished shards found from an earlier run and left untouched.
    shards_kept: int = 0
    samples: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"dest": self.dest, "shards_written": self.shards_written, "shards_kept": self.shards_kept,
                "samples": self.samples, "bytes": self.bytes, "skipped": dict(self.skipped),
                "seconds": round(self.seconds, 3)}

    def format(self) -> str:
        lines = [f"{self.dest}: wrote {self.shards_written} shard(s) with {self.samples:,} samples "
                 f"({self.bytes / 1e6:,.1f} MB) in {self.seconds:,.1f} s; kept {self.shards_kept} finished "
                 f"shard(s) from an earlier run"]
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values()):,} file(s):")
            lines.extend(f"  {reason}: {count:,}" for reason, count in sorted(self.skipped.items()))
        else:
            lines.append("skipped 0 files")
        return "\n".join(lines)


class ShardsExistError(UsageError):
    """DEST holds shards this run must not overwrite or mix with (a mistake the user fixes: one line)."""


def shard_name(number: int) -> str:
    return f"{SHARD_PREFIX}-{number:06d}.tar"


def read_manifest(dest: str, storage_cfg: StorageConfig) -> dict[str, Any] | None:
    url = storage.join_url(dest, MANIFEST)
    try:
        manifest = storage.read_json(url, storage_cfg)
    except ValueError as error:
        raise ShardsExistError(f"{error}; move the manifest away or choose another DEST") from error
    if manifest is None:
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardsExistError(f"{url}: not a make-shards manifest; choose another DEST")
    return manifest


def _write_manifest(dest: str, manifest: dict[str, Any], storage_cfg: StorageConfig) -> None:
    data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    storage.write_bytes_atomic(storage.join_url(dest, MANIFEST), data, storage_cfg)


def _existing_shard_names(dest: str, storage_cfg: StorageConfig) -> list[str]:
    if not storage.exists(dest, storage_cfg):
        return []
    names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in storage.listdir(dest, storage_cfg))
    return sorted(n for n in names if n.startswith(f"{SHARD_PREFIX}-") and n.endswith(".tar"))


def _kept_shards(dest: str, manifest: dict[str, Any], storage_cfg: StorageConfig) -> list[dict[str, Any]]:
    """The manifest's shards up to the first one missing from DEST: those need no rewriting."""
    present = set(_existing_shard_names(dest, storage_cfg))
    kept = []
    for number, entry in enumerate(manifest["shards"]):
        if entry.get("name") != shard_name(number) or entry["name"] not in present:
            break
        kept.append(entry)
    return kept


def _full_settings(settings: dict[str, Any] | None, max_count: int, max_bytes: int) -> dict[str, Any]:
    return {**(settings or {}), "max_count": max_count, "max_bytes": max_bytes}


def resume_index(dest: str | Path, max_count: int, max_bytes: int, storage_cfg: StorageConfig,
                 settings: dict[str, Any] | None = None) -> int:
    """Source position a (re-)run of `write_shards` with these arguments starts reading at.

    Lets a caller skip finished work before paying for decoding. Raises
    ShardsExistError when DEST holds shards of other settings or of no manifest.
    """
    dest = str(dest)
    manifest = _check_dest(dest, storage_cfg, _full_settings(settings, max_count, max_bytes))
    if manifest is None:
        return 0
    kept = _kept_shards(dest, manifest, storage_cfg)
    if manifest.get("complete") and len(kept) == len(manifest["shards"]):
        return int(manifest["next_index"])
    return int(kept[-1]["next_index"]) if kept else 0


def _check_dest(dest: str, storage_cfg: StorageConfig, settings: dict[str, Any]) -> dict[str, Any] | None:
    manifest = read_manifest(dest, storage_cfg)
    if manifest is None:
        existing = _existing_shard_names(dest, storage_cfg)
        if existing:
            raise ShardsExistError(f"{dest} already holds {len(existing)} shard(s) ({existing[0]}...) but no "
                                   f"{MANIFEST}; choose an empty destination")
        return None
    if manifest.get("settings") != settings:
        raise ShardsExistError(f"{dest} holds shards made with other settings ({manifest.get('settings')}, now "
                               f"{settings}); choose another destination or delete it")
    return manifest


def write_shards(samples: Iterable[ShardSample | SkippedSample], dest: str | Path, max_count: int, max_bytes: int,
                 storage_cfg: StorageConfig | None = None, *, settings: dict[str, Any] | None = None,
                 total: int | None = None, progress: bool = False) -> Summary:
    """Pack `samples` into shards of at most `max_count` samples and about `max_bytes`
    bytes (a single larger sample still gets a shard of its own).

    `settings` describes how the samples were made (source, encoding...); it is
    stored in the manifest, and a re-run resumes only when it matches. Samples
    with an index below the resume point are dropped unread, and `total` (the
    expected number of source entries) only drives the progress line.
    """
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"max_count and max_bytes must be >= 1, got {max_count}, {max_bytes}")
    dest = str(dest)
    storage_cfg = storage_cfg or StorageConfig()
    settings = _full_settings(settings, max_count, max_bytes)
    started = time.monotonic()
    summary = Summary(dest=dest)

    manifest = _check_dest(dest, storage_cfg, settings)
    kept = _kept_shards(dest, manifest, storage_cfg) if manifest else []
    summary.shards_kept = len(kept)
    if manifest and manifest.get("complete") and len(kept) == len(manifest["shards"]):
        summary.seconds = time.monotonic() - started
        return summary
    start = int(kept[-1]["next_index"]) if kept else 0
    manifest = {"format": MANIFEST_FORMAT, "settings": settings, "shards": list(kept), "complete": False,
                "next_index": start}

    progress_line = ProgressLine(total=total, unit="samples", start=start, enabled=progress)
    last_logged = time.monotonic()
    writer = ShardWriter(dest, storage_cfg)
    count = size = 0
    first_index = start
    skipped_in_shard: Counter = Counter()
    done = start

    def show_progress(final: bool = False) -> None:
        nonlocal last_logged
        if not progress:
            return
        skipped = sum(summary.skipped.values())
        extra = (f"{len(manifest['shards'])} shard(s) | {(summary.bytes + size) / 1e6:,.1f} MB"
                 + (f" | skipped {skipped:,}" if skipped else ""))
        progress_line.update(done, extra, final=final)
        if not progress_line.interactive and time.monotonic() - last_logged >= PROGRESS_LOG_INTERVAL_S:
            last_logged = time.monotonic()
            log.info("make-shards: %s", progress_line.describe(done, extra))

    def publish(next_index: int) -> None:
        nonlocal count, size
        name = shard_name(len(manifest["shards"]))
        nbytes = writer.publish(name)
        manifest["shards"].append({"name": name, "samples": count, "bytes": nbytes, "first_index": first_index,
                                   "next_index": next_index, "skipped": dict(skipped_in_shard)})
        manifest["next_index"] = next_index
        _write_manifest(dest, manifest, storage_cfg)
        summary.shards_written += 1
        summary.bytes += nbytes
        count = size = 0
        skipped_in_shard.clear()

    try:
        for item in samples:
            if item.index < start:
                continue
            done = item.index + 1
            if isinstance(item, SkippedSample):
                summary.skipped[item.reason] += 1
                skipped_in_shard[item.reason] += 1
            else:
                item_size = item.tar_size()
                if count and (count >= max_count or size + item_size > max_bytes):
                    publish(item.index)
                if count == 0:
                    writer.open()
                    first_index = item.index
                writer.add(item.key, item.fields)
                count += 1
                size += item_size
                summary.samples += 1
            show_progress()
        if count:
            publish(done)
    except BaseException:
        progress_line.close()  # the error goes on a line of its own
        raise
    finally:
        writer.discard()
    manifest["complete"] = True
    manifest["next_index"] = max(done, manifest["next_index"])
    _write_manifest(dest, manifest, storage_cfg)
    show_progress(final=True)
    summary.seconds = time.monotonic() - started
    return summary


# ---- sources -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    """One image as found in the source, before checking and encoding."""

    index: int
    name: str
    ext: str
    data: bytes
    label: int | None


def folder_files(root: Path) -> list[Path]:
    """Every file under `root`, in sorted relative-path order (hidden files excluded)."""
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    found = [p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                     for part in p.relative_to(root).parts)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def folder_classes(root: Path) -> list[str]:
    """Sorted names of the first-level sub-folders: class i is the i-th name (ImageFolder layout)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def iter_folder(root: Path, files: list[Path], classes: list[str] | None, start: int = 0
                ) -> Iterator[SourceFile | SkippedSample]:
    class_index = {name: i for i, name in enumerate(classes or [])}
    for index, path in enumerate(files):
        if index < start:
            continue
        relative = path.relative_to(root).as_posix()
        label = None
        if classes is not None:
            top = relative.split("/", 1)[0]
            if "/" not in relative or top not in class_index:
                yield SkippedSample(index, relative, "outside-class-folder")
                continue
            label = class_index[top]
        try:
            data = path.read_bytes()
        except OSError:
            yield SkippedSample(index, relative, "unreadable-file")
            continue
        yield SourceFile(index, relative, normalised_ext(path.name), data, label)


def iter_tar(path: Path, max_sample_bytes: int, start: int = 0) -> Iterator[SourceFile | SkippedSample]:
    """Samples of a tar in member order, grouped by WebDataset key (a plain tar of images gives
    one per file); a `.cls` member of the same key gives the label. Damage in the archive is
    counted (bad-tar, truncated-shard) after everything readable was yielded."""
    archive_errors: Counter = Counter()
    index = 0
    with open(path, "rb") as f:
        for index, sample in enumerate(read_samples(f, max_sample_bytes, archive_errors, ShardReport())):
            if index < start:
                continue
            if sample.error is not None or sample.image is None:
                yield SkippedSample(index, sample.key, sample.error or "no-image")
                continue
            yield SourceFile(index, sample.key, normalised_ext(f"x.{sample.image_ext}"), sample.image,
                             parse_label(sample.meta.get("cls")))
    for reason, count in sorted(archive_errors.items()):
        for _ in range(count):
            index += 1
            if index >= start:
                yield SkippedSample(index, str(path), reason)


@dataclass(frozen=True)
class Encoding:
    """How images are stored: as found, or re-encoded (optionally shrunk)."""

    reencode: str | None = None
    max_side: int = 0

    def settings(self) -> dict[str, Any]:
        return {"reencode": self.reencode, "max_side": self.max_side}


def array_samples(images: np.ndarray, labels: np.ndarray, *, size: int, image_format: str = "png",
                  indices: np.ndarray | None = None, start: int = 0) -> Iterator[ShardSample]:
    """Shard samples for `images[indices]` (all by default; (N, H, W) or (N, H, W, 3) uint8) as RGB
    images resized to size x size, keyed by stream position, labels in .cls."""
    order = np.arange(len(images)) if indices is None else np.asarray(indices)
    for position in range(start, len(order)):
        i = int(order[position])
        image = array_image(images, i, size)
        fields = {REENCODE_EXT[image_format]: encode_image(image, image_format), "cls": label_bytes(int(labels[i]))}
        yield ShardSample(position, f"{position:09d}", fields)


def array_image(images: np.ndarray, index: int, size: int) -> Image.Image:
    """`images[index]` ((H, W) or (H, W, 3) uint8) as the RGB image, `size` px square, that shards store."""
    image = Image.fromarray(images[index]).convert("RGB")
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)


def encode_image(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    elif fmt == "png":
        image.save(buffer, format="PNG", optimize=False, compress_level=6)
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected jpeg or png")
    return buffer.getvalue()


def prepare_image(source: SourceFile, encoding: Encoding, limits: DecodeLimits) -> ShardSample | SkippedSample:
    """Check that the image decodes; re-encode or shrink it if asked."""
    if source.ext not in IMAGE_EXTENSIONS:
        return SkippedSample(source.index, source.name, "not-an-image-extension")
    keeps_bytes = encoding.reencode is None and not encoding.max_side
    # A mere check may decode JPEGs at 1/8 scale; re-encoding needs the pixels that will be stored.
    min_target_side = 1 if keeps_bytes else encoding.max_side or FULL_RESOLUTION
    try:
        image = decode_image(source.data, limits, min_target_side)
    except SampleError as error:
        return SkippedSample(source.index, source.name, error.reason)
    fmt = encoding.reencode
    if encoding.max_side and max(image.size) > encoding.max_side:
        scale = encoding.max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        fmt = fmt or ("jpeg" if source.ext == "jpg" else "png")
    if fmt is None:
        ext, data = source.ext, source.data
    else:
        ext, data = REENCODE_EXT[fmt], encode_image(image, fmt)
    fields = {ext: data}
    if source.label is not None:
        fields["cls"] = label_bytes(source.label)
    return ShardSample(source.index, f"{source.index:09d}", fields)


# ---- command line ---------------------------------------------------------------------------------------


def _source(args: argparse.Namespace, storage_cfg: StorageConfig, max_bytes: int
            ) -> tuple[Iterable[ShardSample | SkippedSample], dict[str, Any], int | None]:
    """The samples SRC gives (from the resume point on), the settings describing them, and their total."""
    from stream_swav.apps import datasets

    src = Path(args.src)
    encoding = Encoding(args.reencode, args.max_side)
    limits = DecodeLimits.from_config(DataConfig())
    if src.is_dir() and datasets.has_idx_files(src):
        images, labels = datasets.load_split(src, args.split)
        fmt = args.reencode or "png"
        settings = {"source": f"fashion-mnist:{src.resolve()}:{args.split}", "format": fmt, "size": args.size}
        start = resume_index(args.dest, args.max_count, max_bytes, storage_cfg, settings)
        return (array_samples(images, labels, size=args.size or images.shape[1], image_format=fmt,
                                            start=start), settings, len(images))
    if src.is_dir():
        files = folder_files(src)
        if not files:
            raise UsageError(f"src: {src} holds no files; give a folder of images, a tar file of them, or a folder "
                             f"with Fashion-MNIST IDX files")
        classes = folder_classes(src) if args.class_dirs else None
        settings = {"source": f"folder:{src.resolve()}", "classes": classes, **encoding.settings()}
        start = resume_index(args.dest, args.max_count, max_bytes, storage_cfg, settings)
        return ((item if isinstance(item, SkippedSample) else prepare_image(item, encoding, limits)
                 for item in iter_folder(src, files, classes, start)), settings, len(files))
    if src.is_file():
        settings = {"source": f"tar:{src.resolve()}", **encoding.settings()}
        start = resume_index(args.dest, args.max_count, max_bytes, storage_cfg, settings)
        return ((item if isinstance(item, SkippedSample) else prepare_image(item, encoding, limits)
                 for item in iter_tar(src, limits.max_bytes, start)), settings, None)
    raise FileNotFoundError(f"{src}: no such file or folder")


def run(args: argparse.Namespace) -> int:
    storage_cfg = StorageConfig(endpoint_url=args.endpoint_url)
    max_bytes = int(args.max_bytes) if math.isfinite(args.max_bytes) else 0
    if args.max_side < 0 or args.size < 0 or args.max_count < 1 or max_bytes < 1:
        print("make-shards: --max-count and --max-bytes must be >= 1, --max-side and --size >= 0", file=sys.stderr)
        return 2
    try:
        samples, settings, total = _source(args, storage_cfg, max_bytes)
        summary = write_shards(samples, args.dest, args.max_count, max_bytes, storage_cfg,
                               settings=settings, total=total, progress=not args.no_progress)
    except Exception as error:  # noqa: BLE001 - refused in one line, or raised (see `refused`)
        # A missing file or folder is the source's (SRC), not dest's: printed as it is.
        return refused("make-shards", error, "dest", args.dest, storage_cfg,
                       (ValueError, FileNotFoundError, NotADirectoryError), (FileNotFoundError, NotADirectoryError))
    if not summary.shards_written and not summary.shards_kept:
        # A manifest of nothing would make the next run, once images are there, believe it is done.
        storage.rm(storage.join_url(args.dest, MANIFEST), storage_cfg)
        skipped = ", ".join(f"{reason} {count}" for reason, count in summary.skipped.most_common()) or "none"
        raise UsageError(f"src: no image in {args.src} could be read (skipped: {skipped}); nothing was written")
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.format())
    return 0
