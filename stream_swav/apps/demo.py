"""`stream-swav demo`: the whole system on one machine, from nothing to a result.

Makes demo shards (Fashion-MNIST when its files are found, otherwise a
procedural 10-class image set, with a few corrupt and odd-format samples
mixed in on purpose), trains streaming SwAV on a local Ray for a time budget
with rolling checkpoints and a metrics endpoint, then evaluates the retained
checkpoints by kNN against raw pixels and a randomly initialised backbone, and
writes a plot of accuracy and loss against images seen.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stream_swav.apps import DEMO_DATASETS, DEMO_GPU_IMAGES, DEMO_GPU_MINUTES, DEMO_IMAGES, DEMO_MINUTES
from stream_swav.apps.datasets import find_fashion_mnist, load_split, procedural_dataset, require_fashion_mnist
from stream_swav.apps.make_shards import ShardSample, Summary, array_samples, write_shards
from stream_swav.apps.odd_images import odd_images
from stream_swav.config import StorageConfig, UsageError, load_config, merge_dicts
from stream_swav.data.shards import label_bytes

log = logging.getLogger("stream_swav.demo")

# Embedded defaults: a ResNet-10 at a quarter of torchvision's width, with a 3x3 stride-1 stem so
# 28 px images keep their full resolution in the first stage (and 4x4 in the last). A 2-core CPU trains
# it at several hundred images per second, enough passes over the data to learn in minutes; a
# full-width ResNet-18 trains ~15x slower. In the quality study's wall-clock screen (docs/quality.md,
# screen 4) the stride-1 stem learned the most per second of everything tried, though a stride-2 stem
# trains twice as many images in the same time.
DEMO_CONFIG: dict[str, Any] = {
    # The features are the last stage's map pooled to 2x2, not its global mean: Fashion-MNIST's
    # garments are centred and aligned, and the layout that global pooling throws away is what raw
    # pixels score on (docs/quality.md: on a trained backbone +0.7-1.1 kNN and +1.9-2.8 probe points
    # over global pooling; on a random-init one +2.9 and +5.7, so the demo's references use the same grid).
    "model": {"arch": "resnet10", "width": 16, "small_stem": True, "stem_stride": 1, "feature_grid": 2,
              "hidden_dim": 512, "output_dim": 64, "prototypes": 64},
    # No local crops: in the quality study (docs/quality.md) 2x16 px local crops of 28 px images
    # cost 40% of the step and gave no accuracy per image; without them kNN rose 2.2 points at 75k.
    "crops": {"global_size": 28, "global_count": 2, "global_scale": [0.35, 1.0],
              "local_size": 16, "local_count": 0, "local_scale": [0.15, 0.4]},
    "augment": {"mean": [0.286, 0.286, 0.286], "std": [0.353, 0.353, 0.353], "hue": 0.0,
                "blur_prob_global": 0.2, "blur_sigma": [0.1, 1.0]},
    # No feature queue: with 64 prototypes a batch's 256 codes already spread over them, and in the
    # study the queue's stale features cost ~0.5 kNN points (a 4,096 queue 1.7).
    "swav": {"temperature": 0.1, "epsilon": 0.05, "queue_length": 0, "freeze_prototypes_steps": 50},
    "optim": {"optimizer": "lars", "base_lr": 1.2, "final_lr": 0.0012, "warmup_images": 4096,
              "schedule": "warmup-constant", "weight_decay": 1e-6},
    "train": {"batch_size": 128, "log_interval_s": 10},
    # The accuracy curve's points: a checkpoint at every quarter of the image budget (set in
    # `demo_config`), all kept. Each point costs ~10 s of kNN on 2 cores; the linear probe (~30 s)
    # runs on the last one only.
    "checkpoint": {"every_seconds": 0, "keep_last": 8, "milestone_every": 0},
    "data": {"shuffle_buffer": 256, "min_side": 8},
    "metrics": {"port": 9400},
}

# On a GPU the same recipe runs with a full ResNet-18, a bigger batch and longer. The CPU study's
# lessons carry over on paper (no local crops, no queue, a constant rate, the stride-1 stem, the 2x2
# feature grid: here the last stage's 4x4 map pooled to 2x2, 2,048-d); never measured on a GPU.
DEMO_GPU_OVERRIDES: dict[str, Any] = {
    "model": {"arch": "resnet18", "width": 64},
    "train": {"batch_size": 256},
    "optim": {"warmup_images": 50_000},
}

# Corrupt and odd-format samples the demo's train shards carry, spread over the stream.
DEMO_ODD_COPIES = 2


@dataclass
class DemoShards:
    dataset: str
    train: str
    eval_train: str
    eval_test: str
    train_count: int
    eval_train_count: int
    eval_test_count: int
    image_size: int
    # Deliberately broken or odd-format samples among the train samples.
    odd_count: int
    summaries: dict[str, Summary]

    def describe(self) -> str:
        return (f"{self.dataset}, {self.image_size} px: {self.train_count:,} train samples (incl. "
                f"{self.odd_count} corrupt/odd-format on purpose) in {self.train}; kNN index "
                f"{self.eval_train_count:,} in {self.eval_train}, queries {self.eval_test_count:,} in "
                f"{self.eval_test}")


def _with_odd_samples(images: np.ndarray, labels: np.ndarray, size: int, image_format: str,
                      copies: int) -> Iterator[ShardSample]:
    """The images as samples, with the odd-image set inserted `copies` times at spread-out positions."""
    base = array_samples(images, labels, size=size, image_format=image_format)
    odd = []
    for copy in range(copies):
        source = int(len(images) * (copy + 0.5) / copies) if len(images) else 0
        pixels = np.asarray(Image.fromarray(images[source]).convert("RGB").resize((size, size)))
        odd.append((source, odd_images(pixels), int(labels[source])))
    position = 0
    for sample in base:
        while odd and odd[0][0] == sample.index:
            _, extras, label = odd.pop(0)
            for extra in extras:
                fields = {extra.ext: extra.data}
                if extra.decodable:
                    fields["cls"] = label_bytes(label)
                yield ShardSample(position, f"{position:09d}", fields)
                position += 1
        yield ShardSample(position, f"{position:09d}", sample.fields)
        position += 1


def demo_shards(dest: str | Path, storage_cfg: StorageConfig | None = None, *, eval_train: int = 10_000,
                eval_test: int = 2_000, dataset: str = "auto", data_dir: str | Path | None = None, size: int = 0,
                image_format: str = "png", procedural_train: int = 20_000, max_count: int = 5_000,
                seed: int = 0, progress: bool = False) -> DemoShards:
    """Train shards (every training image plus a few corrupt and odd-format samples) under
    dest/train, and labelled evaluation shards under dest/eval-train (a seeded subset of the
    training images, the kNN index) and dest/eval-test (queries from the test split).

    `dataset`: "fashion-mnist" (from `data_dir`, else searched, see `find_fashion_mnist`),
    "procedural" (`procedural_dataset`), or "auto": Fashion-MNIST when found, else procedural.
    `size` 0 keeps the native size (28 for Fashion-MNIST, 32 procedural). Re-running
    keeps finished shards (see make_shards), so a second call is cheap.
    """
    storage_cfg = storage_cfg or StorageConfig()
    dest = str(dest).rstrip("/")
    if dataset not in DEMO_DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DEMO_DATASETS)}, got {dataset!r}")
    if dataset == "procedural":
        folder = None
    elif data_dir or dataset == "fashion-mnist":
        folder = require_fashion_mnist(data_dir)
    else:  # auto: the procedural stand-in when none is found
        folder = find_fashion_mnist()
    if folder is not None:
        description = f"Fashion-MNIST ({folder})"
        train_images, train_labels = load_split(folder, "train")
        test_images, test_labels = load_split(folder, "test")
        size = size or train_images.shape[1]
        source = "fashion-mnist"
    else:
        size = size or 32
        description = ("procedural 10-class shapes" if dataset == "procedural"
                       else "procedural 10-class shapes (Fashion-MNIST not found)")
        train_images, train_labels = procedural_dataset(procedural_train, seed, size)
        test_images, test_labels = procedural_dataset(max(eval_test, 1), seed + 1, size)
        source = f"procedural:{procedural_train}"
    eval_train = min(eval_train, len(train_images))
    eval_test = min(eval_test, len(test_images))
    rng = np.random.default_rng(seed)
    eval_train_indices = np.sort(rng.permutation(len(train_images))[:eval_train])
    eval_test_indices = np.sort(rng.permutation(len(test_images))[:eval_test])
    settings = {"source": source, "size": size, "format": image_format, "seed": seed}
    budget = 1 << 40
    odd_count = DEMO_ODD_COPIES * len(odd_images(np.zeros((size, size, 3), np.uint8)))

    eval_args = {name: (images, labels, indices, f"{dest}/{name}", size, image_format, max_count, budget, storage_cfg,
                        {**settings, "count": len(indices)})
                 for name, images, labels, indices in (("eval-train", train_images, train_labels, eval_train_indices),
                                                       ("eval-test", test_images, test_labels, eval_test_indices))}

    def write_train() -> Summary:
        return write_shards(_with_odd_samples(train_images, train_labels, size, image_format, DEMO_ODD_COPIES),
                            f"{dest}/train", max_count, budget, storage_cfg,
                            settings={**settings, "odd_copies": DEMO_ODD_COPIES},
                            total=len(train_images) + odd_count, progress=progress)

    # A forked process writes the evaluation shards while this one writes the train shards: encoding
    # is single-threaded Python, and on 2 cores the demo would otherwise wait ~60 s instead of ~35.
    # Fork (spawn would re-import the caller's main module) with nothing but PIL and tar in the child;
    # where there is no fork, one after the other.
    if "fork" not in multiprocessing.get_all_start_methods():
        summaries = {"train": write_train(), **{name: _write_labelled_shards(*args) for name, args in eval_args.items()}}
    else:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork")) as pool:
            jobs = {name: pool.submit(_write_labelled_shards, *args) for name, args in eval_args.items()}
            summaries = {"train": write_train(), **{name: job.result() for name, job in jobs.items()}}
    return DemoShards(dataset=description, train=f"{dest}/train", eval_train=f"{dest}/eval-train",
                      eval_test=f"{dest}/eval-test", train_count=len(train_images) + odd_count,
                      eval_train_count=eval_train, eval_test_count=eval_test, image_size=size,
                      odd_count=odd_count, summaries=summaries)


def _write_labelled_shards(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, dest: str, size: int,
                           image_format: str, max_count: int, max_bytes: int, storage_cfg: StorageConfig,
                           settings: dict[str, Any]) -> Summary:
    """Labelled evaluation shards of `images[indices]` (run in a worker process by `demo_shards`)."""
    return write_shards(array_samples(images, labels, size=size, image_format=image_format, indices=indices),
                        dest, max_count, max_bytes, storage_cfg, settings=settings, total=len(indices))


def demo_config(images: int, gpu: bool) -> dict[str, Any]:
    """The demo recipe for a budget of `images` images (a `warmup-cosine` schedule set by override decays
    to the end of it; the demo's own rate is constant)."""
    recipe = merge_dicts(DEMO_CONFIG, DEMO_GPU_OVERRIDES if gpu else cpu_learner_overrides())
    quarter = max(1, images // (4 * recipe["train"]["batch_size"]))
    return merge_dicts(recipe, {"train": {"image_budget": images}, "optim": {"cosine_images": images},
                                "checkpoint": {"every_steps": quarter}})


def cpu_learner_overrides() -> dict[str, Any]:
    """Ray pins every worker to one thread; a CPU learner on a local machine should use every core
    (decoding 28 px images costs a few percent of one)."""
    return {"train": {"cpu_threads": os.cpu_count() or 1}}


def run(args: argparse.Namespace) -> int:
    import torch

    from stream_swav.apps.follow import PLOT_PNG, evaluate_checkpoints
    from stream_swav.runtime.driver import train

    out = Path(args.out)
    gpu = torch.cuda.is_available()
    # Mistakes refused before minutes of writing shards, named as the user wrote them.
    if args.images < 0 or not 0 <= args.minutes < math.inf:
        raise UsageError("--images and --minutes must be >= 0 (0: the demo's own budget)")
    load_config(args.config, args.overrides, base=demo_config(args.images or DEMO_IMAGES, gpu))
    made = demo_shards(out / "shards", eval_train=args.eval_train or 60_000, eval_test=args.eval_test or 10_000,
                       dataset=args.dataset, progress=True)
    log.info("demo data: %s", made.describe())
    if args.prepare_only:
        print(made.describe())
        return 0

    images = args.images or (DEMO_GPU_IMAGES if gpu else DEMO_IMAGES)
    base = merge_dicts(demo_config(images, gpu), {
        "train": {"time_budget_s": 60 * (args.minutes or (DEMO_GPU_MINUTES if gpu else DEMO_MINUTES))},
        "data": {"shards": made.train}, "checkpoint": {"dir": str(out / "checkpoints")},
        "crops": {"global_size": made.image_size}})
    cfg = load_config(args.config, args.overrides, base=base)
    eval_dir = out / "eval"
    if args.fresh:
        for folder in (Path(cfg.checkpoint.dir), eval_dir):
            if folder.exists():
                shutil.rmtree(folder)

    rc = train(cfg)
    if rc != 0:
        log.error("training ended with exit code %d", rc)
        return rc

    rows = evaluate_checkpoints(cfg.checkpoint.dir, made.eval_train, made.eval_test, storage_cfg=cfg.storage,
                                out_dir=eval_dir, references=True, probe=True, probe_newest_only=True)
    if not rows:
        log.error("no checkpoint was written in %s; nothing to evaluate (was training stopped early?)",
                  cfg.checkpoint.dir)
        return 1
    last = rows[-1]
    table = summary_table(last)
    print()
    print(f"Demo data: {made.describe()}")
    budget_note = "" if last["images_seen"] >= cfg.train.image_budget else (
        f", cut short by the {cfg.train.time_budget_s / 60:g}-minute cap before the "
        f"{cfg.train.image_budget:,}-image budget")
    print(f"Trained on {last['images_seen']:,} images ({last['step']} steps{budget_note}). Top-1 on "
          f"{made.eval_test_count:,} test images, {made.eval_train_count:,} labelled train images as the kNN index "
          f"and linear-probe training set:")
    print(f"  {'':<40} {'kNN':>8} {'linear':>8}")
    for name, knn, probe in table:
        print(f"  {name:<40} {100 * knn:7.2f}% {100 * probe:7.2f}%")
    margins = (last["knn_top1"] - last["pixels_knn_top1"], last["probe_top1"] - last["pixels_probe_top1"])
    print(f"  {'margin to raw pixels (points)':<40} {100 * margins[0]:+8.2f} {100 * margins[1]:+8.2f}")
    if min(margins) <= 0:
        print("  The learned features are NOT above raw pixels on " +
              " and ".join(n for n, m in zip(("kNN", "the linear probe"), margins) if m <= 0) + ".")
    print("  (kNN: weighted, k=20, cosine, T=0.07; linear: logistic regression on standardised features, L-BFGS)")
    if (eval_dir / PLOT_PNG).exists():  # not drawn without matplotlib (logged)
        print(f"Accuracy and loss against images seen: {eval_dir / PLOT_PNG}")
    print(f"Checkpoints: {cfg.checkpoint.dir}   results: {eval_dir / 'results.jsonl'}")
    (eval_dir / "summary.json").write_text(json.dumps(
        {"dataset": made.describe(), "columns": ["features", "knn_top1", "probe_top1"], "rows": table,
         "margin_to_pixels": {"knn_top1": margins[0], "probe_top1": margins[1]}, "last": last}, indent=2))
    if last["knn_top1"] <= last["random_knn_top1"]:
        log.error("the learned backbone did not beat the random-init one; train longer (--images)")
        return 1
    return 0


def summary_table(last: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(features, kNN top-1, linear-probe top-1) of the last checkpoint and the references."""
    return [(name, last[f"{prefix}knn_top1"], last[f"{prefix}probe_top1"]) for name, prefix in (
        ("streaming SwAV, last checkpoint", ""), ("random-init backbone (same arch)", "random_"),
        ("random-init, BN statistics of the data", "random_bn_"), ("raw pixels", "pixels_"))]
