"""What online curation costs: the decode worker with and without curation.dedup, and the learner
step with and without curation.balance, measured in the same run.

decode:   `DecodeWorker.next_batch` (the decode actors' whole path: shard reading threads, decode,
          multi-crop, batching) over every image of a shard folder, with curation off, with dedup
          on (perceptual hash + seen-set per image; the images dedup drops are not cropped), and
          with balance_mode resample (a learner's replay requests, 2.4 per image read as on the
          benchmark: a replay is cropped again from the cached image, never read or decoded).
          Timed in CPU seconds of the process (reader threads included) per image read and per
          image trained, so load from other jobs on the machine counts less. Each setting runs `--repeats` times,
          alternating, and the median is reported.
learner:  `Learner.train_step` of the demo's CPU recipe (`demo_config`) on a fixed batch, with
          curation.balance off and on with each signal (prototypes 0.5, density 1.5, label 1,
          reference 1 with 1,000 reference images), weighing and resampling, alternating, in CPU
          seconds per step; and the reference's embedding, which the median leaves out as it comes
          every balance_reference_refresh steps, per step amortised.

    python bench/curation.py --shards runs/curation/stream/messy [--repeats 3] [--steps 20]
    python bench/curation.py --photo-side 640 --photos 400     # photo-sized synthetic JPEGs

The shards are any folder of tar shards; `python -m pipelines.messy_stream --out DIR` makes the
benchmark stream (DIR/messy), where about 29% of the images are repeats that dedup drops. With
--photo-side, a temporary shard of textured JPEGs of that side (none repeated) is written and read
with the default crops (2 x 224 + 6 x 96), where decoding, not hashing, is the work.
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from stream_swav.apps.demo import demo_config
from stream_swav.config import Config, CropsConfig, CurationConfig, StorageConfig, config_from_dict, merge_dicts
from stream_swav.data.batch import CropBatch
from stream_swav.data.cursor import ShardTask, shard_seed
from stream_swav.data.shards import ShardWriter
from stream_swav.data.worker import DecodeWorker
from stream_swav.learner import Learner

from machine import cpu_model  # bench/machine.py, beside this script


def recipe(overrides: dict) -> Config:
    cfg = config_from_dict(merge_dicts(demo_config(153_600, gpu=False), overrides))
    cfg.train.device = "cpu"
    return cfg


def photo_shard(folder: Path, count: int, side: int) -> Path:
    """A tar shard of `count` distinct textured JPEGs of `side` x `side` pixels."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(str(folder), StorageConfig())
    writer.open()
    for n in range(count):
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).filter(
            ImageFilter.GaussianBlur(2))
        draw = ImageDraw.Draw(image)
        for _ in range(8):
            x, y = rng.integers(0, side, 2)
            draw.ellipse((int(x), int(y), int(x) + side // 4, int(y) + side // 5),
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        writer.add(f"{n:06d}", {"jpg": buffer.getvalue()})
    writer.publish("photos.tar")
    return folder / "photos.tar"


# With resampling, the learner asks for this many further shows of each image it reads: the oracle's
# demand on the benchmark (60,000 images shown per 17,573 read), so replays are ~70% of what is trained.
REPLAYS_PER_IMAGE = 2.4


def read_everything(shards: list[Path], cfg: Config) -> tuple[float, int, int, int]:
    """(CPU seconds, images read, images kept, images trained) through one decode worker; with
    curation.balance_mode resample, every batch asks for REPLAYS_PER_IMAGE more shows of the last one's
    images on average, as a learner would."""
    started = time.process_time()
    read = kept = trained = 0
    resample = cfg.curation.resampling
    rng = np.random.default_rng(0)
    replays: list[tuple[str, int]] = []
    with DecodeWorker(cfg.data, cfg.crops, cfg.storage, 0, cfg.curation) as worker:
        for index, shard in enumerate(shards):
            worker.assign(ShardTask(url=str(shard), index=index, pass_index=0, seed=shard_seed(0, 0, str(shard)),
                                    start=0))
        while (batch := worker.next_batch(cfg.train.batch_size, replays)) is not None:
            fresh = len(batch) - batch.meta.replayed
            trained += len(batch)
            kept += fresh
            read += fresh + batch.meta.errors.total() + batch.meta.dropped.total()
            if resample:
                extra = rng.poisson(REPLAYS_PER_IMAGE, fresh)
                replays = [(key, int(n)) for key, n in zip(batch.meta.keys[:fresh], extra) if n > 0]
    return time.process_time() - started, read, kept, trained


def decode_cost(shards: list[Path], repeats: int, crops: dict) -> None:
    settings = {"off": recipe({"crops": crops}), "dedup": recipe({"crops": crops, "curation": {"dedup": True}}),
                "resample": recipe({"crops": crops, "curation": {"balance": 1.0, "balance_mode": "resample"}})}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    counts: dict[str, tuple[int, int, int]] = {}
    for _ in range(repeats):
        for name, cfg in settings.items():
            cpu, read, kept, trained = read_everything(shards, cfg)
            seconds[name].append(cpu)
            counts[name] = (read, kept, trained)
    base = statistics.median(seconds["off"]) / counts["off"][0]
    print(f"\ndecode worker, {len(shards)} shards, median of {repeats} (CPU ms per image read, and per image "
          f"trained: kept, and replays with resample)")
    print("| curation | images read | images kept | images trained | CPU ms / image read | vs off "
          "| CPU ms / image trained |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in settings:
        cpu = statistics.median(seconds[name])
        read, kept, trained = counts[name]
        ms = 1000 * cpu / read
        print(f"| {name} | {read:,} | {kept:,} | {trained:,} | {ms:.3f} | {ms / (1000 * base):.2f}x "
              f"| {1000 * cpu / trained:.3f} |")


# What the learner step is timed with: curation.balance off, then each signal at its studied strength.
BALANCE_SETTINGS: dict[str, dict[str, object]] = {
    "off": {"balance": 0.0},
    "prototypes 0.5": {"balance": 0.5, "balance_signal": "prototypes"},
    "density 1.5": {"balance": 1.5, "balance_signal": "density"},
    "label 1": {"balance": 1.0, "balance_signal": "label"},
    "label 1, resample": {"balance": 1.0, "balance_signal": "label", "balance_mode": "resample"},
    "density 1.5, resample": {"balance": 1.5, "balance_signal": "density", "balance_mode": "resample"},
    "reference 1, resample": {"balance": 1.0, "balance_signal": "reference", "balance_reference": "in memory",
                              "balance_mode": "resample"},
}


def learner_cost(steps: int) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    results: dict[str, list[float]] = {name: [] for name in BALANCE_SETTINGS}
    size = recipe({}).crops.global_size
    # The reference signal's images at its default count (random pixels: the cost is the same).
    reference = torch.from_numpy(rng.integers(0, 256, (CurationConfig().balance_reference_images, size, size, 3),
                                              dtype=np.uint8))
    learners = {name: Learner(recipe({"curation": curation}), torch.device("cpu"),
                              reference_images=reference if curation.get("balance_signal") == "reference" else None)
                for name, curation in BALANCE_SETTINGS.items()}
    crops = learners["off"].cfg.crops
    batch_size = learners["off"].cfg.train.batch_size
    batch = CropBatch(
        global_crops=rng.integers(0, 256, (crops.global_count, batch_size, crops.global_size, crops.global_size, 3),
                                  dtype=np.uint8),
        local_crops=np.zeros((0, batch_size, crops.local_size, crops.local_size, 3), np.uint8))
    batch.meta.labels = rng.integers(0, 10, batch_size).tolist()
    # Warm-up, until the density's bank is full (it weighs nothing before).
    for _ in range(-(-learners["density 1.5"].cfg.curation.balance_bank // batch_size) + 1):
        for learner in learners.values():
            learner.train_step(batch)
    for _ in range(steps):
        for name, learner in learners.items():
            started = time.process_time()
            learner.train_step(batch)
            results[name].append(time.process_time() - started)
    base = statistics.median(results["off"])
    print(f"\nlearner step, demo CPU recipe, batch {batch_size}, one thread, median of {steps} steps")
    print("| curation.balance | CPU ms / step | vs off |")
    print("|---|---:|---:|")
    for name, values in results.items():
        ms = 1000 * statistics.median(values)
        print(f"| {name} | {ms:.1f} | {ms / (1000 * base):.3f}x |")
    # The reference is embedded again every balance_reference_refresh steps, outside the median.
    learner = learners["reference 1, resample"]
    refreshes = []
    for _ in range(3):
        started = time.process_time()
        learner.refresh_reference()
        refreshes.append(time.process_time() - started)
    every = learner.cfg.curation.balance_reference_refresh
    ms = 1000 * statistics.median(refreshes)
    print(f"embedding the reference's {len(reference):,} images: {ms:.0f} CPU ms, every {every} steps: "
          f"{ms / every:.1f} ms per step ({ms / every / (1000 * base):.1%} of a step off)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="folder of .tar shards")
    parser.add_argument("--photo-side", type=int, default=0, help="instead, synthetic JPEGs of this side")
    parser.add_argument("--photos", type=int, default=400, help="how many, with --photo-side")
    parser.add_argument("--repeats", type=int, default=3, help="passes per decode setting")
    parser.add_argument("--steps", type=int, default=20, help="timed learner steps per balance setting")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, torch {torch.__version__}")
    if args.photo_side:
        with tempfile.TemporaryDirectory() as folder:
            shard = photo_shard(Path(folder), args.photos, args.photo_side)
            print(f"{args.photos} synthetic {args.photo_side} px JPEGs, default crops (2 x 224 + 6 x 96)")
            decode_cost([shard], args.repeats, crops=CropsConfig().__dict__)
        return
    shards = sorted(args.shards.glob("*.tar")) if args.shards else []
    if not shards:
        raise SystemExit(f"no .tar shards in {args.shards}; make some with python -m pipelines.messy_stream, "
                         f"or use --photo-side")
    decode_cost(shards, args.repeats, crops={})
    learner_cost(args.steps)


if __name__ == "__main__":
    main()
