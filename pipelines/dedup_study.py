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
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import fsspec

from stream_swav.config import DataConfig
from stream_swav.curation import SeenSet, perceptual_hash
from stream_swav.data.decode import DecodeLimits, SampleError, decode_image
from stream_swav.data.shards import iter_shard


def stream_hashes(folder: Path, min_side: int) -> list[tuple[int, dict]]:
    """(hash, json record) of every decodable sample, shards in name order, samples in file order;
    decoded as a decode worker whose largest crop is `min_side` decodes it (`min_decode_side`)."""
    data = DataConfig()
    limits = DecodeLimits.from_config(data)
    fs = fsspec.filesystem("file")
    out = []
    for shard in sorted(folder.glob("*.tar")):
        for _, sample in iter_shard(str(shard), fs, seed=0, buffer_size=1, max_sample_bytes=data.max_sample_bytes,
                                    read_retries=0, retry_backoff_s=0.0):
            if sample.image is None:
                continue
            try:
                image = decode_image(sample.image, limits, min_target_side=min_side)
            except SampleError:
                continue
            out.append((perceptual_hash(image), json.loads(sample.meta["json"])))
    return out


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
    args = parser.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
