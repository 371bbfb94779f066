"""Codes on a long-tailed stream: sinkhorn vs prior vs relaxed, same budget, kNN per frequency group.

``python -m pipelines.longtail --out runs/longtail --images N --seeds 0,1,2
--methods sinkhorn,prior,relaxed --streams longtail,balanced [--config FILE] [--set k=v]``

1. Streams, written once as labelled shards under OUT/shards/<stream>:
   ``longtail`` is `zipf_subset` of the Fashion-MNIST training split (class c
   keeps a share proportional to 1/(c+1)^2, so class 0 has 100 times the
   images of class 9; ``--class-order shuffled`` assigns the frequency ranks
   by a permutation drawn from ``--stream-seed`` instead, so the rare classes
   are not always Fashion-MNIST's last, easiest ones); ``balanced`` is the
   same number of images, equal per class (rounded down to a multiple of the
   class count).
2. kNN data, also once: an index of ``--index-per-class`` training images per
   class, and ``--test-images`` queries, equal per class, from the test split
   (0: the whole test split).
3. Every (stream, codes method, seed) trains with the real runtime
   (`stream_swav.runtime.driver.train`, local Ray) for exactly ``--images``
   images; train.seed and data.seed are the run's seed.
4. The final checkpoint is evaluated: its backbone.pt by weighted kNN (k=20,
   cosine, T=0.07), reported overall and per frequency group (the 3 most
   frequent, 4 middle and 3 rarest classes of the long-tailed stream; the
   balanced stream is scored with the same groups, so "rare" names the same
   classes in both). A group's top-1 is the accuracy over the queries whose
   true class is in the group; the queries are class-balanced, so that is the
   mean of its classes' accuracies.
   Prototype usage perplexity: every test query goes to its highest-scoring
   prototype (backbone -> projection head -> prototypes of state.pt, eval
   mode); the perplexity is exp(entropy) of those counts, from 1 (all queries
   on one prototype) to K (queries spread evenly). The queries are balanced,
   so it says how many prototypes the classes occupy, not how the stream's
   mass is split.
5. One row per run in OUT/results.jsonl; OUT/results.md (mean ± sample std
   over seeds, and per-seed differences to sinkhorn) and OUT/longtail.png
   (grouped bars) are redrawn after every run. Runs already in results.jsonl
   for the same configuration are skipped, so an interrupted pipeline picks up
   where it stopped (a run cut short resumes from its own checkpoints).

Defaults follow the demo's CPU recipe (stream_swav.demo.DEMO_CONFIG: ResNet-10 at
width 16, 2x28 px crops, batch 128; on a CPU the learner takes every core) with the
stride-2 3x3 stem the study was measured with, 30 prototypes over 24-d embeddings and no queue; the
keys that are stated in images or steps (warmup, prototype freeze, relaxed's
lambda annealing and mass momentum) are scaled to the budget, see
`budget_scaled`. ``--config`` and ``--set`` override any of them, except what
the pipeline sets per run: shards, seeds, codes method, image budget and
checkpoint folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stream_swav import checkpoint as ckpt
from stream_swav import logs, plotting
from stream_swav.apps import KNN_K, KNN_TEMPERATURE
from stream_swav.apps.datasets import CLASS_NAMES, NUM_CLASSES, load_split, require_fashion_mnist
from stream_swav.apps.demo import DEMO_CONFIG, cpu_learner_overrides
from stream_swav.apps.evaluate import (EvalData, embed, knn_predict, load_eval_data, pick_device, pixel_features,
                                       random_backbone)
from stream_swav.apps.follow import append_jsonl, read_jsonl
from stream_swav.apps.make_shards import array_samples, write_shards
from stream_swav.checkpoint import load_resolved_backbone, resolve_checkpoint
from stream_swav.config import CODES, Config, ModelConfig, StorageConfig, config_from_dict, load_config, merge_dicts
from stream_swav.model import BackboneSpec, SwAVModel
from stream_swav.runtime.metrics import usage_perplexity
from stream_swav.swav import prototype_counts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("stream_swav.longtail")

STREAMS = ("longtail", "balanced")
IMBALANCE_RATIO = 100.0
CLASS_ORDERS = ("label", "shuffled")
# Classes by frequency rank in the long-tailed stream: the 3 most frequent, 4 middle, 3 rarest.
GROUP_SIZES = (("frequent", 3), ("middle", 4), ("rare", 3))
GROUPS = tuple(name for name, _ in GROUP_SIZES)
# Per-run figures summarised over seeds, in table order.
METRICS = ("top1", "frequent_top1", "middle_top1", "rare_top1", "perplexity")
RESULTS_JSONL = "results.jsonl"
RESULTS_MD = "results.md"
PLOT_PNG = "longtail.png"
SHARD_MAX_COUNT = 500
SHARD_MAX_BYTES = 1 << 40
IMAGE_FORMAT = "png"

# The demo's CPU recipe, adjusted for many short runs on a CPU: 30 prototypes (3 per class) over
# 24-d embeddings, no queue (it would only start after the whole budget), budgets in images rather
# than time, only the final checkpoint, and a free metrics port (several pipelines or a demo may run
# side by side). Fewer embedding dims than prototypes, so the prototypes span the embedding space:
# with the demo's 64 dims, one of three sinkhorn runs at 200k images moved its embeddings into the
# prototypes' null space and sat at loss ln(K) for the whole run. The stride-2 stem the study was
# measured with (docs/longtail.md): the demo's stride-1 stem costs twice the time per image, and the
# pipeline trains many runs.
LONGTAIL_CONFIG: dict[str, Any] = merge_dicts(DEMO_CONFIG, {
    "model": {"prototypes": 30, "output_dim": 24, "stem_stride": 2},
    "swav": {"queue_length": 0},
    "train": {"time_budget_s": 0, "log_interval_s": 30, "progress_bar": False},
    "checkpoint": {"every_steps": 0, "every_seconds": 0, "keep_last": 1, "milestone_every": 0},
    "metrics": {"port": 0},
})


# ---- streams (pure) -----------------------------------------------------------------------------------


def zipf_class_counts(available: np.ndarray, imbalance_ratio: float) -> np.ndarray:
    """Per-class sample counts n_c proportional to 1/(c+1)^a, with a chosen so that
    n_0 / n_{C-1} == imbalance_ratio and n_0 the largest count every class can afford."""
    classes = len(available)
    if classes < 2:
        return available.copy()
    exponent = math.log(imbalance_ratio) / math.log(classes)
    shares = 1.0 / np.arange(1, classes + 1) ** exponent
    head = int(np.min(available / shares))
    return np.maximum(1, np.floor(head * shares + 1e-9)).astype(np.int64)


def zipf_subset(labels: np.ndarray, imbalance_ratio: float = 100.0, seed: int = 0,
                class_order: Sequence[int] | None = None) -> np.ndarray:
    """Indices of a long-tailed subset: the class of frequency rank r (0 the head) keeps a share
    proportional to 1/(r+1)^a, so the largest class is `imbalance_ratio` times the smallest.
    `class_order` lists the classes from most to least frequent (default: label order).
    Which samples are kept, and their order (as a stream would see them), follow `seed`."""
    labels = np.asarray(labels)
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    classes = np.unique(labels)
    if class_order is not None:
        if sorted(int(c) for c in class_order) != [int(c) for c in classes]:
            raise ValueError(f"class_order must list each class once, got {list(class_order)} "
                             f"for classes {classes.tolist()}")
        classes = np.asarray(class_order)
    available = np.array([(labels == c).sum() for c in classes])
    counts = zipf_class_counts(available, imbalance_ratio)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:count] for c, count in zip(classes, counts)]
    return rng.permutation(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` samples of every class, chosen and ordered by `seed`."""
    labels = np.asarray(labels)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(f"class {label} has {len(members)} samples, fewer than the {per_class} asked for")
        chosen.append(rng.permutation(members)[:per_class])
    return rng.permutation(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def frequency_order(class_order: str, seed: int, num_classes: int = NUM_CLASSES) -> list[int]:
    """Classes from most to least frequent in the long-tailed stream: label order, or a
    permutation drawn from `seed` (so the rare classes are not always the same ones)."""
    if class_order == "label":
        return list(range(num_classes))
    if class_order == "shuffled":
        return [int(c) for c in np.random.default_rng([seed, 7919]).permutation(num_classes)]
    raise ValueError(f"class_order must be one of {', '.join(CLASS_ORDERS)}, got {class_order!r}")


def stream_indices(stream: str, labels: np.ndarray, seed: int,
                   imbalance_ratio: float = IMBALANCE_RATIO, class_order: str = "label") -> np.ndarray:
    """The training stream's sample indices, in stream order.

    longtail: Zipf class counts, largest/smallest == imbalance_ratio, the most
    frequent class first in `frequency_order(class_order, seed)`. balanced: as
    many images, equal per class (the total rounded down to a multiple of the
    number of classes).
    """
    longtail = zipf_subset(labels, imbalance_ratio, seed, frequency_order(class_order, seed))
    if stream == "longtail":
        return longtail
    if stream == "balanced":
        classes = len(np.unique(labels))
        return balanced_subset(labels, len(longtail) // classes, seed)
    raise ValueError(f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")


def class_counts(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def frequency_groups(counts: np.ndarray) -> dict[str, tuple[int, ...]]:
    """Classes of each group, most frequent first: the first 3 by count, the next 4, the last 3.
    Ties keep label order."""
    counts = np.asarray(counts)
    expected = sum(size for _, size in GROUP_SIZES)
    if counts.shape != (expected,):
        raise ValueError(f"frequency groups need {expected} class counts, got shape {counts.shape}")
    order = [int(c) for c in np.argsort(-counts, kind="stable")]
    groups, start = {}, 0
    for name, size in GROUP_SIZES:
        groups[name] = tuple(order[start:start + size])
        start += size
    return groups


def group_top1(predictions: Tensor, labels: Tensor, groups: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Top-1 over all queries ("top1") and over the queries of each group ("<group>_top1");
    NaN for a group without queries."""
    if predictions.shape != labels.shape or predictions.dim() != 1 or len(labels) == 0:
        raise ValueError(f"predictions and labels must be equal-length non-empty vectors, got "
                         f"{tuple(predictions.shape)} and {tuple(labels.shape)}")
    correct = (predictions.long() == labels.long()).float()
    scores = {"top1": correct.mean().item()}
    for name, classes in groups.items():
        members = torch.isin(labels.long(), torch.tensor(classes, dtype=torch.long))
        scores[f"{name}_top1"] = correct[members].mean().item() if bool(members.any()) else math.nan
    return scores


# ---- runs and results (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    stream: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.stream}-{self.method}-seed{self.seed}"


def plan_runs(streams: Iterable[str], methods: Iterable[str], seeds: Iterable[int]) -> list[RunSpec]:
    """Every (stream, method, seed), stream-major so one stream's table fills up first."""
    streams, methods, seeds = list(streams), list(methods), list(seeds)
    for stream in streams:
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")
    for method in methods:
        if method not in CODES:
            raise ValueError(f"method must be one of {', '.join(CODES)}, got {method!r}")
    return [RunSpec(stream, method, seed) for stream in streams for seed in seeds for method in methods]


def config_id(shared: dict[str, Any]) -> str:
    """A short fingerprint of everything runs share (budget included): rows and checkpoints of
    other settings are never mistaken for this configuration's."""
    text = json.dumps(shared, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def pending_runs(plan: list[RunSpec], rows: list[dict[str, Any]], config: str) -> list[RunSpec]:
    """The planned runs with no row of the same configuration yet."""
    done = {(r.get("stream"), r.get("method"), r.get("seed")) for r in rows if r.get("config_id") == config}
    return [run for run in plan if (run.stream, run.method, run.seed) not in done]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN when empty."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def summarize(rows: list[dict[str, Any]], streams: Iterable[str] = STREAMS,
              methods: Iterable[str] = CODES) -> list[dict[str, Any]]:
    """Per (stream, method), in the given orders: seeds and, per metric, mean and sample std."""
    table = []
    for stream in streams:
        for method in methods:
            group = [r for r in rows if r.get("stream") == stream and r.get("method") == method]
            if not group:
                continue
            entry: dict[str, Any] = {"stream": stream, "method": method,
                                     "seeds": sorted(int(r["seed"]) for r in group)}
            for metric in METRICS:
                entry[metric] = _mean_std([float(r[metric]) for r in group if metric in r])
            table.append(entry)
    return table


def paired_differences(rows: list[dict[str, Any]], stream: str, method: str, metric: str,
                       reference: str = "sinkhorn") -> list[float]:
    """metric(method) - metric(reference) for every seed both ran on `stream`."""
    by_seed = {(r["method"], r["seed"]): float(r[metric]) for r in rows if r.get("stream") == stream}
    return [by_seed[(method, seed)] - by_seed[(reference, seed)]
            for (m, seed) in sorted(by_seed) if m == method and (reference, seed) in by_seed]


def verdict(differences: list[float]) -> str:
    """"higher"/"lower" when the mean paired difference is beyond two standard errors, else
    "within noise"; "-" without at least two seeds."""
    if len(differences) < 2:
        return "-"
    mean, std = _mean_std(differences)
    margin = 2 * std / math.sqrt(len(differences))
    if mean > margin:
        return "higher"
    if mean < -margin:
        return "lower"
    return "within noise"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}" if math.isfinite(value) else "-"


def _pm(value: tuple[float, float], percent: bool, signed: bool = False) -> str:
    mean, std = value
    if not math.isfinite(mean):
        return "-"
    scale = 100.0 if percent else 1.0
    sign = "+" if signed else ""
    return f"{scale * mean:{sign}.1f} ± {scale * std:.1f}"


def format_markdown(rows: list[dict[str, Any]], streams: Iterable[str] = STREAMS,
                    methods: Iterable[str] = CODES, references: dict[str, dict[str, float]] | None = None) -> str:
    """The results table (mean ± std over seeds), reference rows (features scored the same way,
    no training), and the paired comparison with sinkhorn."""
    streams, methods = list(streams), list(methods)
    lines = ["| stream | codes | seeds | top-1 all | top-1 frequent (3) | top-1 middle (4) | top-1 rare (3) "
             "| usage perplexity |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in summarize(rows, streams, methods):
        lines.append(f"| {entry['stream']} | {entry['method']} | {len(entry['seeds'])} | "
                     + " | ".join(_pm(entry[m], percent=m != "perplexity") for m in METRICS) + " |")
    for name, scores in (references or {}).items():
        lines.append(f"| (reference) | {name} | - | "
                     + " | ".join(_percent(scores[m]) for m in METRICS[:4]) + " | - |")
    others = [m for m in methods if m != "sinkhorn"]
    if "sinkhorn" in methods and others:
        lines += ["", "Paired by seed, minus sinkhorn (percentage points; verdict: mean beyond two standard "
                  "errors):", "",
                  "| codes | long-tailed: rare top-1 | verdict | long-tailed: all top-1 | balanced: all top-1 "
                  "| verdict |",
                  "|---|---|---|---|---|---|"]
        for method in others:
            rare = paired_differences(rows, "longtail", method, "rare_top1")
            longtail_all = paired_differences(rows, "longtail", method, "top1")
            balanced_all = paired_differences(rows, "balanced", method, "top1")
            lines.append(f"| {method} | {_pm(_mean_std(rare), True, True)} | {verdict(rare)} | "
                         f"{_pm(_mean_std(longtail_all), True, True)} | {_pm(_mean_std(balanced_all), True, True)}"
                         f" | {verdict(balanced_all)} |")
    return "\n".join(lines) + "\n"


# ---- plot ---------------------------------------------------------------------------------------------

METHOD_COLORS = {"sinkhorn": "#828282", "relaxed": "#1f5eb4", "prior": "#dc6e14"}
BAR_GROUPS = (("all", "top1"), ("frequent", "frequent_top1"), ("middle", "middle_top1"), ("rare", "rare_top1"))
# Pixels per stream panel, plus a margin for the shared axis label.
PANEL_WIDTH_PX, PLOT_HEIGHT_PX, MARGIN_PX = 500, 580, 60


def draw_plot(rows: list[dict[str, Any]], streams: Iterable[str] = STREAMS, methods: Iterable[str] = CODES,
              title: str = "kNN top-1 by class-frequency group (mean ± std over seeds)") -> Figure | None:
    """One panel per stream: bars of top-1 (all, frequent, middle, rare) per codes method, with the
    standard deviation over seeds as error bars and each method's usage perplexity in the legend.
    None when matplotlib is not installed."""
    streams = [s for s in streams if any(r.get("stream") == s for r in rows)]
    if not streams:
        raise ValueError("draw_plot: no rows of the given streams")
    figure = plotting.new_figure(MARGIN_PX + PANEL_WIDTH_PX * len(streams), PLOT_HEIGHT_PX, PLOT_PNG)
    if figure is None:
        return None
    methods = list(methods)
    summary = {(e["stream"], e["method"]): e for e in summarize(rows, streams, methods)}
    figure.suptitle(title)
    axes = figure.subplots(1, len(streams), sharey=True, squeeze=False)[0]
    axes[0].set_ylabel("top-1 %")
    width = 0.8 / max(len(methods), 1)
    for axis, stream in zip(axes, streams):
        axis.set_title(f"{stream} stream")
        axis.grid(axis="y", color="#e1e1e1")
        axis.set_axisbelow(True)
        axis.set_xticks(range(len(BAR_GROUPS)), [label for label, _ in BAR_GROUPS])
        for m, method in enumerate(methods):
            entry = summary.get((stream, method))
            if entry is None:
                continue
            groups = [g for g, (_, key) in enumerate(BAR_GROUPS) if math.isfinite(entry[key][0])]
            means = [100 * entry[BAR_GROUPS[g][1]][0] for g in groups]
            stds = [100 * entry[BAR_GROUPS[g][1]][1] for g in groups]
            perplexity = entry["perplexity"][0]
            label = method + (f", perplexity {perplexity:.1f}" if math.isfinite(perplexity) else "")
            axis.bar([g - 0.4 + (m + 0.5) * width for g in groups], means, width * 0.9, yerr=stds, capsize=3,
                     color=METHOD_COLORS.get(method, "black"), label=label)
        # Under the panel, where it can hide no bar.
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize="small", frameon=False)
    return figure


def write_plot(rows: list[dict[str, Any]], streams: Iterable[str], methods: Iterable[str], path: Path) -> Path | None:
    """The plot of `rows` as a PNG at `path`; None (nothing written) when matplotlib is not installed."""
    figure = draw_plot(rows, streams, methods)
    if figure is None:
        return None
    path.write_bytes(plotting.png_bytes(figure))
    return path


# ---- data, training and evaluation ---------------------------------------------------------------------


@dataclass
class Streams:
    """Shard folders of every stream and of the kNN data, with the class counts of each stream."""

    shards: dict[str, str]
    counts: dict[str, list[int]]
    eval_train: str
    eval_test: str
    groups: dict[str, tuple[int, ...]]


def build_streams(out: Path, data_dir: str | None, streams: Iterable[str], *, stream_seed: int,
                  index_per_class: int, test_images: int, image_size: int, class_order: str = "label") -> Streams:
    """Write (or keep, when already complete) the shards of every stream and of the kNN data."""
    folder = require_fashion_mnist(data_dir, hint="set --data-dir")
    train_images, train_labels = load_split(folder, "train")
    query_images, query_labels = load_split(folder, "test")
    base = {"source": "fashion-mnist", "size": image_size, "format": IMAGE_FORMAT, "seed": stream_seed}
    shards, counts = {}, {}
    for stream in ["longtail", *[s for s in streams if s != "longtail"]]:
        indices = stream_indices(stream, train_labels, stream_seed, class_order=class_order)
        dest = out / "shards" / (stream if class_order == "label" else f"{stream}-{class_order}")
        write_shards(array_samples(train_images, train_labels, size=image_size, image_format=IMAGE_FORMAT,
                                   indices=indices), dest, SHARD_MAX_COUNT, SHARD_MAX_BYTES,
                     settings={**base, "stream": stream, "imbalance_ratio": IMBALANCE_RATIO,
                               "class_order": class_order}, total=len(indices))
        shards[stream] = str(dest)
        counts[stream] = class_counts(train_labels[indices]).tolist()
    index = balanced_subset(train_labels, index_per_class, stream_seed + 1)
    per_query_class = (test_images or len(query_labels)) // NUM_CLASSES
    queries = balanced_subset(query_labels, per_query_class, stream_seed + 2)
    for name, images, labels, chosen in (("eval-train", train_images, train_labels, index),
                                         ("eval-test", query_images, query_labels, queries)):
        write_shards(array_samples(images, labels, size=image_size, image_format=IMAGE_FORMAT,
                                   indices=np.sort(chosen)), out / "shards" / name, SHARD_MAX_COUNT,
                     SHARD_MAX_BYTES, settings={**base, "count": len(chosen)}, total=len(chosen))
    return Streams(shards={s: shards[s] for s in streams}, counts={s: counts[s] for s in streams},
                   eval_train=str(out / "shards" / "eval-train"), eval_test=str(out / "shards" / "eval-test"),
                   groups=frequency_groups(np.array(counts["longtail"])))


def budget_scaled(images: int, batch_size: int) -> dict[str, Any]:
    """Settings given in images or steps, scaled to a budget of `images`.

    The library defaults are sized for ImageNet-length runs: relaxed's lambda
    anneals over 1M images and its mass estimate averages over ~100 steps, so
    a run of a few thousand images would never leave near-equal partition.
    Here warmup is 10% of the budget, prototypes are frozen for the first 10%
    of the steps, lambda reaches its end value at half the budget, and the
    mass estimate averages over about a tenth of the steps (momentum
    1 - 10/steps, kept within [0.5, 0.99]).
    """
    steps = max(1, images // max(batch_size, 1))
    return {"optim": {"warmup_images": max(1, images // 10)},
            "swav": {"freeze_prototypes_steps": max(1, steps // 10), "relaxed_anneal_images": max(1, images // 2),
                     "mass_momentum": round(min(0.99, max(0.5, 1.0 - 10.0 / steps)), 4)}}


def shared_config(images: int, config_file: str | None, overrides: list[str]) -> Config:
    """Recipe <- budget-scaled keys <- --config <- --set, with the image budget fixed to `images`."""
    recipe = LONGTAIL_CONFIG if torch.cuda.is_available() else merge_dicts(LONGTAIL_CONFIG, cpu_learner_overrides())
    first = load_config(config_file, overrides, base=recipe)
    base = merge_dicts(recipe, budget_scaled(images, first.train.batch_size * first.train.learners))
    cfg = load_config(config_file, overrides, base=base)
    return config_from_dict(merge_dicts(cfg.to_dict(), {"train": {"image_budget": images}}))


def run_config(shared: Config, run: RunSpec, shards: str, checkpoint_dir: str) -> Config:
    return config_from_dict(merge_dicts(shared.to_dict(), {
        "data": {"shards": shards, "seed": run.seed}, "train": {"seed": run.seed},
        "swav": {"codes": run.method}, "checkpoint": {"dir": checkpoint_dir}}))


def knn_groups(index_feats: Tensor, query_feats: Tensor, data: EvalData, groups: dict[str, tuple[int, ...]],
               device: torch.device) -> dict[str, float]:
    """Weighted kNN (k=20, cosine, T=0.07) top-1, overall and per frequency group."""
    predictions = knn_predict(index_feats.to(device), data.train.labels, query_feats.to(device), KNN_K,
                              KNN_TEMPERATURE, max(data.num_classes, NUM_CLASSES))
    return group_top1(predictions, data.test.labels, groups)


def reference_scores(data: EvalData, groups: dict[str, tuple[int, ...]], cfg: Config,
                     device: torch.device) -> dict[str, dict[str, float]]:
    """The same kNN scores for raw pixels and for a randomly initialised backbone (seed 0): what a
    trained backbone has to beat before its group accuracies mean anything."""
    mean, std = cfg.augment.mean, cfg.augment.std
    backbone = random_backbone(BackboneSpec.from_config(cfg.model))
    return {"raw-pixels": knn_groups(pixel_features(data.train.images, mean, std),
                                     pixel_features(data.test.images, mean, std), data, groups, device),
            "random-init": knn_groups(embed(backbone, data.train.images, mean, std, device=device),
                                      embed(backbone, data.test.images, mean, std, device=device), data, groups,
                                      device)}


@torch.no_grad()
def evaluate_run(checkpoint_dir: str, data: EvalData, groups: dict[str, tuple[int, ...]],
                 device: torch.device) -> dict[str, Any]:
    """kNN top-1 (overall and per group) of the latest checkpoint's backbone, and the prototype
    usage perplexity of the test queries (see the module docstring)."""
    resolved = resolve_checkpoint(checkpoint_dir)
    mean, std = resolved.normalization()
    backbone = load_resolved_backbone(resolved)
    index_feats = embed(backbone, data.train.images, mean, std, device=device)
    query_feats = embed(backbone, data.test.images, mean, std, device=device)
    row: dict[str, Any] = knn_groups(index_feats, query_feats, data, groups, device)

    state = ckpt.load_checkpoint(checkpoint_dir, StorageConfig())
    # Only the model section matters here; checkpoints of other versions may carry other keys elsewhere.
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = SwAVModel(ModelConfig(**{k: v for k, v in resolved.config["model"].items() if k in known}))
    model.load_state_dict(state["model"])
    model.eval()
    z = F.normalize(model.projection(query_feats), dim=1)
    row["perplexity"] = usage_perplexity(prototype_counts(model.prototypes(z)).numpy())
    metrics = resolved.record.get("metrics", {})
    row.update({"step": resolved.step, "images_seen": resolved.images_seen,
                "final_loss": metrics.get("loss"), "final_batch_perplexity": metrics.get("perplexity"),
                "code": resolved.record.get("code")})
    return row


def run_pipeline(args: argparse.Namespace) -> int:
    from stream_swav.runtime.driver import train

    out = Path(args.out)
    streams = _split(args.streams)
    methods = _split(args.methods)
    seeds = [int(s) for s in _split(args.seeds)]
    plan = plan_runs(streams, methods, seeds)
    shared = shared_config(args.images, args.config, args.overrides)
    config = config_id({**shared.to_dict(), "pipeline": {"stream_seed": args.stream_seed,
                                                         "index_per_class": args.index_per_class,
                                                         "test_images": args.test_images,
                                                         **({} if args.class_order == "label"
                                                            else {"class_order": args.class_order})}})
    made = build_streams(out, args.data_dir, streams, stream_seed=args.stream_seed,
                         index_per_class=args.index_per_class, test_images=args.test_images,
                         image_size=shared.crops.global_size, class_order=args.class_order)
    (out / "streams.json").write_text(json.dumps({"counts": made.counts, "groups": made.groups,
                                                  "class_names": CLASS_NAMES}, indent=2) + "\n")
    log.info("streams: %s; groups by long-tail frequency: %s", made.counts, made.groups)
    results = out / RESULTS_JSONL
    todo = pending_runs(plan, read_jsonl(results), config)
    log.info("configuration %s: %d of %d runs to do", config, len(todo), len(plan))
    data = load_eval_data(made.eval_train, made.eval_test, shared.crops.global_size)
    device = pick_device(args.device)
    references_path = out / f"references-{config}.json"
    if not references_path.is_file():
        references_path.write_text(json.dumps(reference_scores(data, made.groups, shared, device), indent=2) + "\n")
    references = json.loads(references_path.read_text())
    failures = 0
    for run in todo:
        checkpoint_dir = str(out / "checkpoints" / config / run.name)
        cfg = run_config(shared, run, made.shards[run.stream], checkpoint_dir)
        log.info("run %s: %d images", run.name, args.images)
        started = time.monotonic()
        rc = train(cfg)
        train_seconds = time.monotonic() - started
        if rc != 0:
            log.error("run %s: training exited with %d; no row written, a re-run retries it", run.name, rc)
            failures += 1
            continue
        started = time.monotonic()
        row = evaluate_run(checkpoint_dir, data, made.groups, device)
        row.update({"stream": run.stream, "method": run.method, "seed": run.seed, "config_id": config,
                    "images": args.images, "prototypes": shared.model.prototypes, "index": len(data.train),
                    "queries": len(data.test), "train_seconds": round(train_seconds, 1),
                    "eval_seconds": round(time.monotonic() - started, 1), "checkpoint": checkpoint_dir})
        append_jsonl(results, row)
        log.info("run %s: top-1 %.2f%% (frequent %.2f%%, middle %.2f%%, rare %.2f%%), perplexity %.1f",
                 run.name, *(100 * row[m] for m in METRICS[:4]), row["perplexity"])
        write_reports(out, read_jsonl(results), config, streams, methods, references)
    write_reports(out, read_jsonl(results), config, streams, methods, references)
    print((out / RESULTS_MD).read_text())
    return 1 if failures else 0


def write_reports(out: Path, rows: list[dict[str, Any]], config: str, streams: list[str],
                  methods: list[str], references: dict[str, dict[str, float]]) -> None:
    """results.md and the plot from this configuration's rows."""
    rows = [r for r in rows if r.get("config_id") == config]
    (out / RESULTS_MD).write_text(format_markdown(rows, streams, methods, references))
    if rows:
        write_plot(rows, streams, methods, out / PLOT_PNG)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# ---- command line -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/longtail", help="folder for shards, checkpoints and results")
    parser.add_argument("--images", type=int, default=3000, help="training images per run (train.image_budget)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (train.seed and data.seed)")
    parser.add_argument("--methods", default=",".join(CODES), help="comma-separated swav.codes methods")
    parser.add_argument("--streams", default=",".join(STREAMS), help="comma-separated: longtail, balanced")
    parser.add_argument("--index-per-class", type=int, default=500,
                        help="labelled training images per class in the kNN index")
    parser.add_argument("--test-images", type=int, default=2000,
                        help="class-balanced test queries (0: the whole test split)")
    parser.add_argument("--stream-seed", type=int, default=0, help="seed of the streams' and kNN data's subsets")
    parser.add_argument("--class-order", default="label", choices=CLASS_ORDERS,
                        help="which classes are frequent in the long-tailed stream: label order (class 0 the "
                             "head, as in the README table) or a permutation drawn from --stream-seed")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: searched, see pipelines.fashion_mnist)")
    parser.add_argument("--device", default="auto", help="evaluation device: auto, cpu or cuda")
    parser.add_argument("--config", help="YAML file overriding the recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one configuration value; repeatable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.longtail", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.images < 1 or args.index_per_class < 1 or args.test_images < 0:
        parser.error("--images and --index-per-class must be >= 1, --test-images >= 0")
    try:  # refused before any stream or run folder is written
        require_fashion_mnist(args.data_dir, hint="set --data-dir")
    except FileNotFoundError as err:
        print(f"longtail: {err}", file=sys.stderr)
        return 2
    logs.configure()
    return run_pipeline(args)


if __name__ == "__main__":
    sys.exit(main())
