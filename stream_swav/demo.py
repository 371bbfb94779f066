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
import os
import shutil
from pathlib import Path
from typing import Any

from stream_swav.config import load_config, merge_dicts

log = logging.getLogger("stream_swav.demo")

# Embedded defaults: a ResNet-10 at a quarter of torchvision's width, with a 3x3 stride-2 stem so
# 28 px images keep 14x14 in the first stage. A 2-core CPU trains it at several hundred images per
# second, enough passes over the data to learn in minutes; a full-width ResNet-18 trains ~15x slower.
DEMO_CONFIG: dict[str, Any] = {
    "model": {"arch": "resnet10", "width": 16, "small_stem": True, "stem_stride": 2, "hidden_dim": 512,
              "output_dim": 64, "prototypes": 64},
    "crops": {"global_size": 28, "global_count": 2, "global_scale": [0.35, 1.0],
              "local_size": 16, "local_count": 2, "local_scale": [0.15, 0.4]},
    "augment": {"mean": [0.286, 0.286, 0.286], "std": [0.353, 0.353, 0.353], "hue": 0.0,
                "blur_prob_global": 0.2, "blur_sigma": [0.1, 1.0]},
    "swav": {"temperature": 0.1, "epsilon": 0.05, "queue_length": 1024, "queue_start_images": 4096,
             "freeze_prototypes_steps": 50},
    "optim": {"optimizer": "lars", "base_lr": 1.2, "final_lr": 0.0012, "warmup_images": 4096,
              "schedule": "warmup-constant", "weight_decay": 1e-6},
    "train": {"batch_size": 128, "time_budget_s": 240, "log_interval_s": 10},
    "checkpoint": {"every_steps": 0, "every_seconds": 30, "keep_last": 24, "milestone_every": 0},
    "data": {"shuffle_buffer": 256, "min_side": 8},
    "metrics": {"port": 9400},
}

# On a GPU the same recipe runs with a full ResNet-18 at full resolution, a bigger batch and longer.
DEMO_GPU_OVERRIDES: dict[str, Any] = {
    "model": {"arch": "resnet18", "width": 64, "stem_stride": 1},
    "crops": {"local_count": 4},
    "train": {"batch_size": 256, "time_budget_s": 480},
    "swav": {"queue_length": 3840, "queue_start_images": 50_000},
    "optim": {"warmup_images": 50_000},
    # A ResNet-18 checkpoint with optimizer state is ~130 MB: fewer of them, still one per minute.
    "checkpoint": {"every_seconds": 60, "keep_last": 8},
}


def cpu_learner_overrides() -> dict[str, Any]:
    """Ray pins every worker to one thread; a CPU learner on a local machine should use every core
    (decoding 28 px images costs a few percent of one)."""
    return {"train": {"cpu_threads": os.cpu_count() or 1}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for shards, checkpoints and results")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="training time budget (default: 4 on CPU, 8 on GPU)")
    parser.add_argument("--fresh", action="store_true", help="delete checkpoints and results of an earlier demo")
    parser.add_argument("--eval-train", type=int, default=0,
                        help="labelled training images in the kNN index (default: 5,000 on CPU, 60,000 on GPU)")
    parser.add_argument("--eval-test", type=int, default=0,
                        help="labelled test images scored (default: 1,000 on CPU, 10,000 on GPU)")
    parser.add_argument("--dataset", default="auto", choices=("auto", "fashion-mnist", "procedural"),
                        help="demo images: Fashion-MNIST when found (auto), or the procedural 10-class set")


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from pipelines.fashion_mnist import demo_shards
    from pipelines.follow import evaluate_checkpoints
    from stream_swav.runtime.driver import train

    out = Path(args.out)
    gpu = torch.cuda.is_available()
    eval_train = args.eval_train or (60_000 if gpu else 5_000)
    eval_test = args.eval_test or (10_000 if gpu else 1_000)
    made = demo_shards(out / "shards", eval_train=eval_train, eval_test=eval_test, dataset=args.dataset,
                       progress=True)
    log.info("demo data: %s", made.describe())

    base = merge_dicts(DEMO_CONFIG, DEMO_GPU_OVERRIDES if gpu else cpu_learner_overrides())
    if args.minutes:
        base = merge_dicts(base, {"train": {"time_budget_s": args.minutes * 60}})
    base = merge_dicts(base, {"data": {"shards": made.train}, "checkpoint": {"dir": str(out / "checkpoints")},
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
                                out_dir=eval_dir, references=True)
    if not rows:
        log.error("no checkpoint was written in %s; nothing to evaluate (was training stopped early?)",
                  cfg.checkpoint.dir)
        return 1
    last = rows[-1]
    table = [("streaming SwAV, last checkpoint", last["knn_top1"]),
             ("random-init backbone (same arch)", last["random_knn_top1"]),
             ("random-init, BN statistics of the data", last["random_bn_knn_top1"]),
             ("raw pixels", last["pixels_knn_top1"])]
    print()
    print(f"Demo data: {made.describe()}")
    print(f"Trained on {last['images_seen']:,} images ({last['step']} steps). Weighted kNN top-1 "
          f"(k=20, cosine, T=0.07), {made.eval_train_count:,} labelled train -> {made.eval_test_count:,} test images:")
    for name, accuracy in table:
        print(f"  {name:<40} {100 * accuracy:6.2f}%")
    print(f"Accuracy and loss against images seen: {eval_dir / 'accuracy.png'}")
    print(f"Checkpoints: {cfg.checkpoint.dir}   results: {eval_dir / 'results.jsonl'}")
    (eval_dir / "summary.json").write_text(json.dumps({"dataset": made.describe(), "rows": table, "last": last},
                                                       indent=2))
    if last["knn_top1"] <= last["random_knn_top1"]:
        log.error("the learned backbone did not beat the random-init one; train longer (--minutes)")
        return 1
    return 0
