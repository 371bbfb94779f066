"""How well repeat detection (`stream_swav.curation`) separates copies from distinct images on the
messy-stream benchmark, offline: no training, one pass in stream order.

``python -m pipelines.dedup_study --stream runs/messy/messy [--distances 0,2,4,6,8]
[--max-repeats 0] [--capacity 1000000] [--min-side 28]``

Every sample is read with the shard reader and decoded with the training path's decoder as a decode
worker decodes it (JPEG draft scaling down to ``--min-side``, the recipe's largest crop: the demo's
28 px), hashed, and offered to a fresh `SeenSet` per setting. Each messy sample's json member says what it is
(`pipelines/messy_stream.py`), so per setting this prints: the share of exact and near copies
dropped; the share of junk dropped; the distinct images lost (a training-split image none of whose
occurrences was kept: the mistake curation must not make); and the surplus kept (occurrences kept
beyond the first `1 + max_repeats` of each distinct image).

With ``--checkpoint CKPT [--similarities 0.95,0.97,0.98,0.99,0.995] [--window 8192]`` it also asks
whether a model's embedding would catch what the hash leaves (SemDeDup's and DINOv2's copy
detection, offline): the images the hash keeps at distance 0 are embedded by the checkpoint's
model (eval mode, centred at the global crops' side: the easiest view, the training forward's
augmented crops are harder), and an image counts as a copy at similarity s when one of the
``--window`` kept images before it is at cosine similarity s or more, by its projected feature
and by its (centred) backbone feature. Per setting: the share of the copies the hash kept that
would be caught, of the first occurrences of distinct images (each would be a distinct image
lost), and of junk.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from stream_swav.config import DataConfig, StorageConfig
from stream_swav.curation import SeenSet, perceptual_hash
from stream_swav.data.decode import DecodeLimits, SampleError, decode_image
from stream_swav.data.labelled import resize_center_crop
from stream_swav.data.shards import iter_shard

COPY_CATEGORIES = ("copy", "first", "junk")


def decoded_samples(folder: Path, min_side: int) -> Iterator[tuple[Image.Image, dict]]:
    """(image, json record) of every decodable sample, shards in name order, samples in file order;
    decoded as a decode worker whose draft side is `min_side` decodes it (`min_decode_side`)."""
    data = DataConfig()
    limits = DecodeLimits.from_config(data)
    fs = fsspec.filesystem("file")
    for shard in sorted(folder.glob("*.tar")):
        for _, sample in iter_shard(str(shard), fs, seed=0, buffer_size=1, max_sample_bytes=data.max_sample_bytes,
                                    read_retries=0, retry_backoff_s=0.0):
            if sample.image is None:
                continue
            try:
                image = decode_image(sample.image, limits, min_target_side=min_side)
            except SampleError:
                continue
            yield image, json.loads(sample.meta["json"])


def stream_hashes(folder: Path, min_side: int) -> list[tuple[int, dict]]:
    """(hash, json record) of every decodable sample, in stream order."""
    return [(perceptual_hash(image), record) for image, record in decoded_samples(folder, min_side)]


def kept_by_hash(folder: Path, min_side: int, size: int, capacity: int) -> tuple[Tensor, list[dict]]:
    """The images exact hash matching (a fresh seen-set of `capacity`, distance 0, no repeat allowed)
    keeps in one pass, in stream order, each resized and centre-cropped to `size` as (N, S, S, 3)
    uint8, and their json records."""
    seen = SeenSet(capacity, max_distance=0, max_repeats=0)
    images, records = [], []
    for position, (image, record) in enumerate(decoded_samples(folder, min_side)):
        if seen.admit(perceptual_hash(image), (0, 0), position):
            images.append(resize_center_crop(image, size))
            records.append(record)
    if not images:
        raise ValueError(f"{folder}: no decodable image")
    return torch.from_numpy(np.stack(images)), records


def copy_categories(records: list[dict]) -> np.ndarray:
    """Each kept sample as `copy` (its training-split image occurred before), `first` (the first
    occurrence of its image) or `junk`."""
    seen: set[int] = set()
    categories = []
    for record in records:
        if record["source"] < 0:
            categories.append("junk")
        else:
            categories.append("copy" if record["source"] in seen else "first")
            seen.add(record["source"])
    return np.asarray(categories)


def highest_earlier_similarity(features: Tensor, window: int, chunk: int = 1024) -> Tensor:
    """(N,) each row's highest cosine similarity to the `window` rows before it (-1 for the first);
    `features` (N, D) unit rows."""
    highest = torch.full((len(features),), -1.0)
    for start in range(1, len(features), chunk):
        end = min(len(features), start + chunk)
        low = max(0, start - window)
        similarity = features[start:end] @ features[low:end].t()
        rows = torch.arange(start, end).unsqueeze(1)
        columns = torch.arange(low, end).unsqueeze(0)
        similarity[(columns >= rows) | (columns < rows - window)] = -2.0
        highest[start:end] = similarity.max(dim=1).values.clamp_min(-1.0)
    return highest


def embedding_copies(checkpoint: str, folder: Path, min_side: int, window: int,
                     capacity: int) -> tuple[np.ndarray, dict[str, Tensor]]:
    """The kept images' categories and, per embedding of the checkpoint's model (projected feature,
    centred backbone feature), each one's highest similarity to the `window` kept images before it."""
    from pipelines.balance_signals import scores_z_features
    from stream_swav.apps.gallery import load_swav_model
    from stream_swav.checkpoint import resolve_checkpoint

    storage_cfg = StorageConfig()
    cfg, model = load_swav_model(resolve_checkpoint(checkpoint, storage_cfg), storage_cfg)
    images, records = kept_by_hash(folder, min_side, cfg.crops.global_size, capacity)
    _, projected, pooled = scores_z_features(model, cfg, images)
    embeddings = {"projected feature": projected,
                  "backbone feature": F.normalize(pooled - pooled.mean(dim=0), dim=1)}
    return copy_categories(records), {name: highest_earlier_similarity(f, window) for name, f in embeddings.items()}


def score(hashes: list[tuple[int, dict]], seen: SeenSet) -> dict[str, float]:
    offered, dropped = Counter(), Counter()
    kept_per_source: dict[int, int] = defaultdict(int)
    for position, (h, record) in enumerate(hashes):
        kind = record["kind"]
        offered[kind] += 1
        if seen.admit(h, (0, 0), position):
            if record["source"] >= 0:
                kept_per_source[record["source"]] += 1
        else:
            dropped[kind] += 1
    sources = {record["source"] for _, record in hashes if record["source"] >= 0}
    allowed = 1 + seen.max_repeats
    return {
        "exact_dropped": dropped["exact"] / max(1, offered["exact"]),
        "near_dropped": dropped["near"] / max(1, offered["near"]),
        "junk_dropped": dropped["junk"] / max(1, offered["junk"]),
        "distinct_lost": sum(1 for s in sources if kept_per_source[s] == 0) / max(1, len(sources)),
        "surplus_kept": sum(max(0, kept - allowed) for kept in kept_per_source.values()),
        "images_kept": sum(offered.values()) - sum(dropped.values()),
        "images": sum(offered.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.dedup_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream", required=True, type=Path, help="the messy stream's shard folder")
    parser.add_argument("--distances", default="0,2,4,6,8", help="Hamming distances to try (comma-separated)")
    parser.add_argument("--max-repeats", type=int, default=0)
    parser.add_argument("--capacity", type=int, default=1_000_000)
    parser.add_argument("--min-side", type=int, default=28,
                        help="decode as a worker whose largest crop is this (default 28, the demo's)")
    parser.add_argument("--checkpoint", help="also: what this checkpoint's embedding catches of what the hash keeps")
    parser.add_argument("--similarities", default="0.95,0.97,0.98,0.99,0.995",
                        help="cosine similarities to try with --checkpoint (comma-separated)")
    parser.add_argument("--window", type=int, default=8192, help="kept images each is compared with")
    args = parser.parse_args(argv)
    try:
        similarities = [float(t) for t in args.similarities.split(",")]
    except ValueError:
        parser.error(f"--similarities takes comma-separated numbers, got {args.similarities!r}")
    if args.window < 1:
        parser.error(f"--window must be >= 1, got {args.window}")
    if not any(args.stream.glob("*.tar")):
        print(f"--stream: no shards in {args.stream}; write them with python -m pipelines.messy_stream", file=sys.stderr)
        return 2
    started = time.perf_counter()
    hashes = stream_hashes(args.stream, args.min_side)
    print(f"{len(hashes)} images read, decoded and hashed in {time.perf_counter() - started:.1f} s")
    print("| max distance | exact copies dropped | near copies dropped | junk dropped | distinct images lost "
          "| surplus kept | images kept |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for distance in (int(d) for d in args.distances.split(",")):
        s = score(hashes, SeenSet(args.capacity, max_distance=distance, max_repeats=args.max_repeats))
        print(f"| {distance} | {s['exact_dropped']:.1%} | {s['near_dropped']:.1%} | {s['junk_dropped']:.1%} "
              f"| {s['distinct_lost']:.2%} | {s['surplus_kept']:,} | {s['images_kept']:,} of {s['images']:,} |")
    if args.checkpoint:
        categories, highest = embedding_copies(args.checkpoint, args.stream, args.min_side, args.window,
                                               args.capacity)
        counts = {c: int((categories == c).sum()) for c in COPY_CATEGORIES}
        print(f"\nKept by the hash: {counts['copy']:,} copies of an image already kept, {counts['first']:,} first "
              f"occurrences, {counts['junk']:,} junk; caught at each similarity to one of the {args.window:,} "
              f"kept before:")
        print("| embedding | similarity | copies caught | first occurrences caught (lost) | junk caught |")
        print("|---|---:|---:|---:|---:|")
        for name, similarity in highest.items():
            for threshold in similarities:
                caught = {c: float((similarity.numpy()[categories == c] >= threshold).mean()) if counts[c] else 0.0
                          for c in COPY_CATEGORIES}
                print(f"| {name} | {threshold:g} | {caught['copy']:.1%} | {caught['first']:.2%} | {caught['junk']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
