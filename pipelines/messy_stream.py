"""An uncurated stream built to be messy, and its clean reference: the benchmark of online curation
(issue #23).

``python -m pipelines.messy_stream --out runs/messy [--seed 0] [--imbalance-ratio 10]
[--duplicate-fraction 0.4] [--pool-fraction 0.01] [--near-fraction 0.5] [--junk-fraction 0.1]
[--size 28] [--data-dir DIR]``

Real uncurated streams are dominated by repetition and junk: the same image reposted thousands of
times (re-encoded, rescaled, a little shifted or cropped), blank and placeholder images, screenshots
of text, and a few concepts that flood the rest. This pipeline builds such a stream from the
Fashion-MNIST training split, with every knob and the seed stated, and writes it with make-shards'
writer (manifest, byte-identical re-runs, resume):

- ``OUT/messy``: the **distinct images** are a Zipf-imbalanced subset of the training split
  (`pipelines.longtail.zipf_subset`: the most frequent class has ``imbalance_ratio`` times the
  images of the rarest), each once. Beside them, ``duplicate_fraction`` of the stream are copies
  of a **pool** of ``pool_fraction`` of the distinct images (drawn uniformly from the pool, so each
  pool image floods the stream about ``duplicate_fraction / pool_fraction`` times as often as any
  other image); ``near_fraction`` of the copies are near-copies (`NEAR_VARIANTS`: JPEG at another
  quality, rescaled, shifted or cropped by a few pixels), the rest byte-identical. ``junk_fraction``
  of the stream is junk (`JUNK_VARIANTS`: noise, solid or blank, rendered text). The order is a
  permutation drawn from the seed.
- ``OUT/clean``: the reference, the same number of distinct images balanced over the classes, no
  copies, no junk (`pipelines.longtail.balanced_subset`).
- ``OUT/oracle`` (only when asked, ``--oracle``): the messy stream's distinct images, each repeated
  so that every class occurs as often as the largest (byte-identical copies), no pool copies, no
  junk: the classes balanced by their labels, the best any balancing of those images could do.
- ``OUT/deduped`` (only when asked, ``--deduped``): the messy stream as a perfect repeat detector
  would leave it: every exact or near copy of an image already seen removed, in the same order,
  junk untouched; what catching every near copy could give a curation downstream of it.

Every messy sample carries a ``json`` member ``{"kind", "source", "variant"}`` (kind: unique,
exact, near or junk; source: the training-split index, -1 for junk), which the decoders pass
along untouched; it is what a curation measurement counts drops by. Real images carry their class
in ``cls``, junk none. ``OUT/stream.json`` states the composition.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stream_swav import logs
from stream_swav.apps.datasets import NUM_CLASSES, load_split, require_fashion_mnist
from stream_swav.apps.make_shards import ShardSample, array_image, encode_image, write_shards
from stream_swav.data.shards import label_bytes
from pipelines.longtail import balanced_subset, class_counts, zipf_subset

log = logging.getLogger("stream_swav.messy_stream")

KINDS = ("unique", "exact", "near", "junk")
NEAR_VARIANTS = ("jpeg", "rescale", "shift", "crop")
JUNK_VARIANTS = ("noise", "solid", "text")
SHARD_MAX_COUNT = 1000
SHARD_MAX_BYTES = 1 << 40
IMAGE_FORMAT = "png"


@dataclass(frozen=True)
class MessySpec:
    """The messy stream's knobs; fractions are of the whole stream except `pool_fraction` (of the
    distinct images) and `near_fraction` (of the copies)."""

    imbalance_ratio: float = 10.0
    duplicate_fraction: float = 0.4
    pool_fraction: float = 0.01
    near_fraction: float = 0.5
    junk_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.imbalance_ratio < 1:
            raise ValueError(f"imbalance_ratio must be >= 1, got {self.imbalance_ratio}")
        for name in ("duplicate_fraction", "junk_fraction", "near_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.duplicate_fraction + self.junk_fraction >= 1.0:
            raise ValueError(f"duplicate_fraction + junk_fraction must be below 1 (the distinct images need a "
                             f"share), got {self.duplicate_fraction} + {self.junk_fraction}")
        if not 0.0 < self.pool_fraction <= 1.0:
            raise ValueError(f"pool_fraction must be in (0, 1], got {self.pool_fraction}")


@dataclass(frozen=True)
class Entry:
    """One position of the messy stream. `param` seeds the variant's own randomness (a near-copy's
    quality, size or offset, a junk image's content), so an entry renders the same every time."""

    kind: str
    source: int  # training-split index; -1 for junk
    variant: str = ""
    param: int = 0


def plan_messy_stream(labels: np.ndarray, spec: MessySpec) -> list[Entry]:
    """The messy stream's entries in stream order, from the labels of the training split."""
    rng = np.random.default_rng([spec.seed, 23])
    distinct = zipf_subset(labels, spec.imbalance_ratio, spec.seed)
    total = round(len(distinct) / (1.0 - spec.duplicate_fraction - spec.junk_fraction))
    copies = round(total * spec.duplicate_fraction)
    junk = total - len(distinct) - copies
    pool = distinct[rng.permutation(len(distinct))[:max(1, round(len(distinct) * spec.pool_fraction))]]
    near = rng.random(copies) < spec.near_fraction
    params = rng.integers(0, 2**31 - 1, size=copies + junk)
    entries = [Entry("unique", int(i)) for i in distinct]
    entries += [Entry("near", int(source), NEAR_VARIANTS[int(param) % len(NEAR_VARIANTS)], int(param)) if is_near
                else Entry("exact", int(source))
                for source, is_near, param in zip(rng.choice(pool, size=copies), near, params[:copies])]
    entries += [Entry("junk", -1, JUNK_VARIANTS[int(param) % len(JUNK_VARIANTS)], int(param))
                for param in params[copies:]]
    return [entries[i] for i in rng.permutation(len(entries))]


def composition(entries: Sequence[Entry], labels: np.ndarray) -> dict[str, Any]:
    """What the stream holds: entries per kind and variant, distinct images, pool, distinct images per class."""
    unique = [e.source for e in entries if e.kind == "unique"]
    return {"images": len(entries), "kinds": dict(Counter(e.kind for e in entries)),
            "variants": dict(Counter(e.variant for e in entries if e.variant)),
            "distinct_images": len(unique),
            "pool_images": len({e.source for e in entries if e.kind in ("exact", "near")}),
            "distinct_per_class": class_counts(labels[np.asarray(unique, dtype=np.int64)], NUM_CLASSES).tolist()}


# ---- rendering --------------------------------------------------------------------------------------


def near_copy(image: Image.Image, variant: str, param: int) -> tuple[Image.Image, str]:
    """A repost of `image`: another encoding, size or framing. Returns the image and its format."""
    rng = np.random.default_rng(param)
    side = image.size[0]
    if variant == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(20, 81)))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), "jpeg"
    if variant == "rescale":
        new_side = int(rng.integers(max(8, side * 5 // 8), side * 3 // 2 + 1))
        return image.resize((new_side, new_side), Image.Resampling.BILINEAR), IMAGE_FORMAT
    if variant == "shift":
        dx, dy = (int(v) * int(s) for v, s in zip(rng.integers(1, 4, size=2), rng.choice([-1, 1], size=2)))
        shifted = Image.new("RGB", image.size)
        shifted.paste(image, (dx, dy))
        return shifted, IMAGE_FORMAT
    if variant == "crop":
        left, top, right, bottom = (int(v) for v in rng.integers(0, max(2, side // 8), size=4))
        return image.crop((left, top, side - right, side - bottom)).resize(image.size, Image.Resampling.BICUBIC), \
            IMAGE_FORMAT
    raise ValueError(f"unknown near-copy variant {variant!r}; expected one of {', '.join(NEAR_VARIANTS)}")


def junk_image(variant: str, param: int, size: int) -> Image.Image:
    """An image with nothing of the dataset in it: noise, a solid colour (black or white included),
    or a few rendered words."""
    rng = np.random.default_rng(param)
    if variant == "noise":
        channels = 3 if rng.random() < 0.5 else 1
        pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
        return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).convert("RGB")
    if variant == "solid":
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3)) if rng.random() < 0.5 else \
            (int(rng.choice([0, 255])),) * 3
        return Image.new("RGB", (size, size), colour)
    if variant == "text":
        background = int(rng.integers(0, 256))
        image = Image.new("RGB", (size, size), (background,) * 3)
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default()
        ink = (255 - background,) * 3
        for row in range(0, size, max(8, size // 3)):
            word = "".join(chr(int(c)) for c in rng.integers(ord("a"), ord("z") + 1, size=int(rng.integers(2, 7))))
            draw.text((int(rng.integers(0, max(1, size // 4))), row), word, fill=ink, font=font)
        return image
    raise ValueError(f"unknown junk variant {variant!r}; expected one of {', '.join(JUNK_VARIANTS)}")


def entry_fields(entry: Entry, images: np.ndarray, labels: np.ndarray, size: int) -> dict[str, bytes]:
    """The shard members of one entry: the image, its class (real images only) and the json record."""
    if entry.kind == "junk":
        image, fmt = junk_image(entry.variant, entry.param, size), IMAGE_FORMAT
    else:
        image, fmt = array_image(images, entry.source, size), IMAGE_FORMAT
        if entry.kind == "near":
            image, fmt = near_copy(image, entry.variant, entry.param)
    fields = {"jpg" if fmt == "jpeg" else "png": encode_image(image, fmt)}
    if entry.source >= 0:
        fields["cls"] = label_bytes(int(labels[entry.source]))
    record = {"kind": entry.kind, "source": entry.source, "variant": entry.variant}
    fields["json"] = json.dumps(record, sort_keys=True).encode()
    return fields


def entry_samples(entries: Sequence[Entry], images: np.ndarray, labels: np.ndarray, size: int,
                  start: int = 0) -> Iterator[ShardSample]:
    """Shard samples of `entries` (the messy or the clean stream), keyed by stream position."""
    for position in range(start, len(entries)):
        yield ShardSample(position, f"{position:09d}", entry_fields(entries[position], images, labels, size))


def clean_entries(labels: np.ndarray, distinct: int, seed: int) -> list[Entry]:
    """The reference: `distinct` images (rounded down to a multiple of the classes), balanced."""
    return [Entry("unique", int(i)) for i in balanced_subset(labels, distinct // NUM_CLASSES, seed)]


def oracle_entries(messy: Sequence[Entry], labels: np.ndarray, seed: int) -> list[Entry]:
    """The messy stream's distinct images balanced by their labels: an image of a class with n
    distinct images occurs n_max / n times (the fraction drawn per image), byte-identical after the
    first, in an order drawn from `seed`. Balancing by a signal can only approach this."""
    rng = np.random.default_rng([seed, 2323])
    unique = np.asarray([e.source for e in messy if e.kind == "unique"], dtype=np.int64)
    counts = class_counts(labels[unique], NUM_CLASSES)
    repeats = counts.max() / counts[labels[unique]]
    occurrences = np.floor(repeats).astype(np.int64) + (rng.random(len(unique)) < repeats % 1)
    entries = [Entry("unique" if copy == 0 else "exact", int(source))
               for source, times in zip(unique, occurrences) for copy in range(times)]
    return [entries[i] for i in rng.permutation(len(entries))]


def deduped_entries(messy: Sequence[Entry]) -> list[Entry]:
    """The messy stream with every repeat removed: the first occurrence of each training-split image
    (the original, or a copy that comes first) kept, in stream order, and all junk."""
    seen: set[int] = set()
    kept = []
    for entry in messy:
        if entry.source >= 0:
            if entry.source in seen:
                continue
            seen.add(entry.source)
        kept.append(entry)
    return kept


# ---- pipeline ---------------------------------------------------------------------------------------


def build(out: Path, spec: MessySpec, *, size: int = 28, data_dir: str | None = None,
          oracle: bool = False, deduped: bool = False) -> dict[str, Any]:
    """Write (or keep, when already complete) OUT/messy, OUT/clean and, with `oracle` and `deduped`,
    OUT/oracle and OUT/deduped; returns and writes OUT/stream.json."""
    folder = require_fashion_mnist(data_dir, hint="set --data-dir")
    images, labels = load_split(folder, "train")
    messy = plan_messy_stream(labels, spec)
    summary = composition(messy, labels)
    streams = {"messy": messy, "clean": clean_entries(labels, summary["distinct_images"], spec.seed)}
    if oracle:
        streams["oracle"] = oracle_entries(messy, labels, spec.seed)
    if deduped:
        streams["deduped"] = deduped_entries(messy)
    settings = {"source": "fashion-mnist", "size": size, **asdict(spec)}
    for name, entries in streams.items():
        written = write_shards(entry_samples(entries, images, labels, size), out / name, SHARD_MAX_COUNT,
                               SHARD_MAX_BYTES, settings={**settings, "stream": name}, total=len(entries))
        log.info("%s", written.format())
    report = {"spec": asdict(spec), "size": size,
              **{name: {"dir": str(out / name), **composition(entries, labels)} for name, entries in streams.items()}}
    (out / "stream.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = MessySpec()
    parser.add_argument("--out", required=True, help="folder for messy/, clean/ and stream.json")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: the demo's search)")
    parser.add_argument("--size", type=int, default=28, help="stored side of the images (default 28)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--oracle", action="store_true",
                        help="also write OUT/oracle: the distinct images balanced by their labels")
    parser.add_argument("--deduped", action="store_true",
                        help="also write OUT/deduped: the messy stream without its repeats (a perfect detector)")
    for name in ("imbalance_ratio", "duplicate_fraction", "pool_fraction", "near_fraction", "junk_fraction"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.messy_stream", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logs.configure()
    try:
        spec = MessySpec(args.imbalance_ratio, args.duplicate_fraction, args.pool_fraction, args.near_fraction,
                         args.junk_fraction, args.seed)
        report = build(Path(args.out), spec, size=args.size, data_dir=args.data_dir, oracle=args.oracle,
                       deduped=args.deduped)
    except (ValueError, FileNotFoundError) as err:
        print(f"messy_stream: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in report.items() if k not in ("spec", "size")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
