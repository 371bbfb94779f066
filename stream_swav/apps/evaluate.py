"""`stream-swav eval`: how good are a checkpoint's features? kNN and linear probe on labelled shards.

Labelled images (shards whose samples carry ``<key>.cls``) are decoded, resized
(shorter side) and centre-cropped to the evaluation size, and embedded with the
checkpoint's backbone in eval mode. Two probes measure the frozen features:

- weighted k-NN (the DINO recipe): cosine similarity to every training
  feature, the k most similar vote for their class with weight
  exp(similarity / temperature), the class with the largest sum wins;
- a linear probe: multinomial logistic regression on the L2-normalised
  features, standardised with the training mean and deviation (which only
  conditions the problem), fitted full-batch with L-BFGS for at most
  `max_iter` iterations, so its cost is bounded.

Two references put the numbers in context: raw pixels (normalised like the
backbone's input, flattened, L2-normalised by the probes) and a randomly initialised backbone of the same architecture (seed 0). A
learned backbone is worth something exactly when it beats both.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stream_swav.apps import KNN_K as DEFAULT_K, KNN_TEMPERATURE as DEFAULT_TEMPERATURE
from stream_swav.config import AugmentConfig, StorageConfig, UsageError
from stream_swav.data.labelled import LabeledImages, load_labeled_images, normalized_batches
from stream_swav.model import BackboneSpec, build_backbone
from stream_swav.apps.refusals import refused
from stream_swav.checkpoint import ResolvedCheckpoint, load_resolved_backbone, resolve_checkpoint

PROBE_MAX_ITER = 100
PROBE_WEIGHT_DECAY = 1e-4
# Rows of the test set scored against the whole training set at once.
KNN_CHUNK = 1024


# ---- probes (pure) ------------------------------------------------------------------------------------


def _check_split(feats: Tensor, labels: Tensor, name: str) -> None:
    if feats.dim() != 2 or labels.dim() != 1 or len(feats) != len(labels):
        raise ValueError(f"{name}: features must be (N, D) and labels (N,), got {tuple(feats.shape)} and "
                         f"{tuple(labels.shape)}")
    if len(feats) == 0:
        raise ValueError(f"{name}: no samples")


def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, k: int, temperature: float,
                num_classes: int, exclude_self: bool = False) -> Tensor:
    """Weighted k-NN class predictions for the test rows (cosine similarity). With `exclude_self`
    the test rows are the training rows, and none is its own neighbour (leave-one-out)."""
    if k < 1 or temperature <= 0 or num_classes < 1:
        raise ValueError(f"need k >= 1, temperature > 0, num_classes >= 1; got {k}, {temperature}, {num_classes}")
    if exclude_self and len(test_feats) != len(train_feats):
        raise ValueError("exclude_self: the test rows must be the training rows")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float().to(train.device), dim=1)
    labels = train_labels.to(train.device).long()
    k = min(k, len(train) - exclude_self)
    predictions = []
    for start in range(0, len(test), KNN_CHUNK):
        similarity = test[start:start + KNN_CHUNK] @ train.T
        if exclude_self:
            rows = torch.arange(len(similarity), device=train.device)
            similarity[rows, rows + start] = -torch.inf
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(similarity), num_classes, device=train.device)
        votes.scatter_add_(1, labels[top_index], (top_similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions).cpu()


def knn_top1(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
             k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of weighted k-NN: the k most cosine-similar
    training features vote for their label with weight exp(similarity / temperature)."""
    _check_split(train_feats, train_labels, "train")
    _check_split(test_feats, test_labels, "test")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    predictions = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes)
    return (predictions == test_labels.cpu().long()).float().mean().item()


def standardised(train_feats: Tensor, test_feats: Tensor) -> tuple[Tensor, Tensor]:
    """The linear probe's inputs: L2-normalised rows, standardised with the training rows' mean and
    deviation (which only conditions the problem)."""
    train, test = F.normalize(train_feats.float(), dim=1), F.normalize(test_feats.float(), dim=1)
    mean, std = train.mean(dim=0), train.std(dim=0, unbiased=False).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def linear_probe_top1(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                      num_classes: int | None = None, *, weight_decay: float = PROBE_WEIGHT_DECAY,
                      max_iter: int = PROBE_MAX_ITER) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of a multinomial logistic regression trained on
    the L2-normalised training features (standardised with their own mean and deviation)
    by full-batch L-BFGS, with an L2 penalty `weight_decay` on the weights. Deterministic
    for given inputs; runs on the device the training features are on."""
    _check_split(train_feats, train_labels, "train")
    _check_split(test_feats, test_labels, "test")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    device = train_feats.device
    train, test = standardised(train_feats, test_feats.to(device))
    labels = train_labels.to(device).long()

    # (classes, dim) as in nn.Linear: the weight gradient is then grad^T @ features, a fast
    # product on CPUs, where features^T @ grad is ~20x slower for few classes.
    weight = torch.zeros(num_classes, train.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(F.linear(train, weight, bias), labels) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predictions = F.linear(test, weight, bias).argmax(dim=1).cpu()
    return (predictions == test_labels.cpu().long()).float().mean().item()


def pixel_features(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """The no-learning reference: pixels exactly as the backbone is fed them (scaled to [0, 1],
    normalised with the training mean and std), flattened. The normalisation matters for
    cosine similarity: on Fashion-MNIST, k=20, T=0.07, bare [0, 1] pixels give 84.6% top-1,
    ImageNet-normalised ones 85.2%."""
    mean_t = torch.tensor(mean).view(1, 1, 1, 3)
    std_t = torch.tensor(std).view(1, 1, 1, 3)
    return ((images.float() / 255.0 - mean_t) / std_t).reshape(len(images), -1)


def pick_device(name: str = "auto") -> torch.device:
    """--device of the commands that embed images: auto (CUDA where there is one), cpu or cuda[:N]."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:[0-9]+)?", name):
        raise UsageError(f"--device: {name!r} is not a device; use auto, cpu or cuda")
    if name != "cpu" and not torch.cuda.is_available():
        raise UsageError(f"--device: {name}, but this machine has no usable CUDA GPU; use auto or cpu")
    return torch.device(name)


@torch.no_grad()
def embed(backbone: nn.Module, images: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
          batch_size: int = 256, device: torch.device | str = "cpu") -> Tensor:
    """Backbone features (N, D) float32 on CPU for (N, S, S, 3) uint8 images, in eval mode,
    bf16 autocast on CUDA."""
    device = torch.device(device)
    backbone = backbone.to(device).eval()
    on_cuda = device.type == "cuda"
    if on_cuda:
        backbone = backbone.to(memory_format=torch.channels_last)
    outputs = []
    for batch in normalized_batches(images, mean, std, batch_size, device):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=on_cuda):
            outputs.append(backbone(batch).float().cpu())
    return torch.cat(outputs)


@torch.no_grad()
def recalibrate_batchnorm(backbone: nn.Module, images: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                          batch_size: int = 256, device: torch.device | str = "cpu",
                          max_images: int = 4096) -> nn.Module:
    """A copy of `backbone` whose BatchNorm running statistics are the average of the batch
    statistics over (up to `max_images` of) `images`, weights untouched.

    Why it matters as a reference: a freshly initialised ResNet in eval mode normalises nothing
    (running mean 0, variance 1), so its features are dominated by the residual stream's skip path
    and sit close to the pixels; any training, even at learning rate 0, replaces those statistics
    with the data's. This copy separates "the weights learned something" from "BatchNorm saw data".
    """
    device = torch.device(device)
    copy = deepcopy(backbone).to(device)
    norms = [m for m in copy.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over every batch below
    if not norms:  # a ViT: nothing to recalibrate, the row equals random-init
        return copy.eval()
    copy.train()
    subset = images[:max_images] if max_images else images
    for batch in normalized_batches(subset, mean, std, batch_size, device):
        if len(batch) > 1:  # BatchNorm cannot take training statistics of one sample
            copy(batch)
    return copy.eval()


def random_backbone(spec: BackboneSpec, seed: int = 0) -> nn.Module:
    """A freshly initialised backbone; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, _ = build_backbone(spec)
    return backbone


# ---- evaluation ---------------------------------------------------------------------------------------


@dataclass
class EvalData:
    train: LabeledImages
    test: LabeledImages
    image_size: int

    @property
    def num_classes(self) -> int:
        return int(max(self.train.labels.max(), self.test.labels.max())) + 1


def load_eval_data(train_spec: str, test_spec: str, image_size: int, storage_cfg: StorageConfig | None = None,
                   max_train: int = 0, max_test: int = 0) -> EvalData:
    return EvalData(load_labeled_images(train_spec, image_size, storage_cfg, limit=max_train),
                    load_labeled_images(test_spec, image_size, storage_cfg, limit=max_test), image_size)


def score_features(name: str, train_feats: Tensor, test_feats: Tensor, data: EvalData, *, k: int,
                   temperature: float, probe: bool, device: torch.device) -> dict[str, Any]:
    """kNN (and optionally linear-probe) accuracy of one feature set, as a result row."""
    started = time.monotonic()
    train_feats, test_feats = train_feats.to(device), test_feats.to(device)
    row: dict[str, Any] = {"features": name, "dim": int(train_feats.shape[1]),
                           "knn_top1": knn_top1(train_feats, data.train.labels, test_feats, data.test.labels,
                                                k, temperature, data.num_classes)}
    if probe:
        row["probe_top1"] = linear_probe_top1(train_feats, data.train.labels, test_feats, data.test.labels,
                                              data.num_classes)
    row["seconds"] = round(time.monotonic() - started, 3)
    return row


def evaluate_backbone(backbone: nn.Module, name: str, data: EvalData, mean: tuple[float, ...],
                      std: tuple[float, ...], *, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                      probe: bool = True, batch_size: int = 256, device: torch.device | None = None
                      ) -> dict[str, Any]:
    device = device or pick_device()
    train_feats = embed(backbone, data.train.images, mean, std, batch_size, device)
    test_feats = embed(backbone, data.test.images, mean, std, batch_size, device)
    return score_features(name, train_feats, test_feats, data, k=k, temperature=temperature, probe=probe,
                          device=device)


def one_copy_of_equal_channels(train_feats: Tensor, test_feats: Tensor) -> tuple[Tensor, Tensor, int]:
    """Pixel features (N, S*S*3) with one channel when all three are equal everywhere (a grayscale
    dataset), else as they are; and how many equal copies were folded into one (3 or 1).

    Both scores are the same on one copy at a third of the cost. kNN: every dot product and squared
    norm triples, so cosine similarities do not change. Linear probe: `standardised` features of
    three copies are three copies of one copy's, so weights (W1, W2, W3) give the logits of
    W1 + W2 + W3 on one copy; an L2 penalty is smallest for equal thirds, where it is a third of
    that of their sum. Three copies with penalty d have the optimum of one copy with d / 3."""
    def channels(feats: Tensor) -> Tensor:
        return feats.view(len(feats), -1, 3)

    if all(bool((channels(f)[..., 1:] == channels(f)[..., :1]).all()) for f in (train_feats, test_feats)):
        return channels(train_feats)[..., 0].contiguous(), channels(test_feats)[..., 0].contiguous(), 3
    return train_feats, test_feats, 1


def evaluate_pixels(data: EvalData, mean: tuple[float, ...], std: tuple[float, ...], *, k: int = DEFAULT_K,
                    temperature: float = DEFAULT_TEMPERATURE, probe: bool = True,
                    device: torch.device | None = None) -> dict[str, Any]:
    """The raw-pixel row, scored on `one_copy_of_equal_channels` (the probe with the penalty that
    gives the optimum of all three channels); `dim` is the pixels' as fed, channels included."""
    device = device or pick_device()
    started = time.monotonic()
    train_feats = pixel_features(data.train.images, mean, std)
    test_feats = pixel_features(data.test.images, mean, std)
    train_one, test_one, copies = one_copy_of_equal_channels(train_feats, test_feats)
    row = score_features("raw-pixels", train_one, test_one, data, k=k, temperature=temperature, probe=False,
                         device=device)
    if probe:
        row["probe_top1"] = linear_probe_top1(train_one.to(device), data.train.labels, test_one.to(device),
                                              data.test.labels, data.num_classes,
                                              weight_decay=PROBE_WEIGHT_DECAY / copies)
    row.update(dim=int(train_feats.shape[1]), seconds=round(time.monotonic() - started, 3))
    return row


def reference_rows(spec: BackboneSpec, data: EvalData, mean: tuple[float, ...], std: tuple[float, ...],
                   *, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE, probe: bool = True,
                   batch_size: int = 256, device: torch.device | None = None) -> list[dict[str, Any]]:
    """The no-learning rows: the seed-0 random-init backbone as initialised ("random-init"), the
    same weights with BatchNorm statistics of the kNN index images ("random-init-data-bn", see
    `recalibrate_batchnorm`), and raw pixels."""
    device = device or pick_device()
    options = {"k": k, "temperature": temperature, "probe": probe, "device": device}
    backbone = random_backbone(spec)
    calibrated = recalibrate_batchnorm(backbone, data.train.images, mean, std, batch_size, device)
    return [evaluate_backbone(backbone, "random-init", data, mean, std, batch_size=batch_size, **options),
            evaluate_backbone(calibrated, "random-init-data-bn", data, mean, std, batch_size=batch_size, **options),
            evaluate_pixels(data, mean, std, **options)]


def evaluate_checkpoint(url: str, train_spec: str, test_spec: str, storage_cfg: StorageConfig | None = None, *,
                        image_size: int = 0, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                        probe: bool = True, references: bool = True, batch_size: int = 256,
                        device: torch.device | None = None, max_train: int = 0, max_test: int = 0,
                        resolved: ResolvedCheckpoint | None = None) -> dict[str, Any]:
    """The whole `stream-swav eval`: a result dict with one row per feature set
    (checkpoint, then the `reference_rows` when `references`). `resolved`: `url` resolved already."""
    storage_cfg = storage_cfg or StorageConfig()
    device = device or pick_device()
    resolved = resolved or resolve_checkpoint(url, storage_cfg)
    size = image_size or resolved.global_crop_size()
    if not size:
        raise ValueError(f"{url}: no crops.global_size in the checkpoint's configuration; pass --image-size")
    data = load_eval_data(train_spec, test_spec, size, storage_cfg, max_train, max_test)
    mean, std = resolved.normalization()
    options = {"k": k, "temperature": temperature, "probe": probe}
    rows = [evaluate_backbone(load_resolved_backbone(resolved, storage_cfg), "checkpoint", data, mean, std,
                              batch_size=batch_size, device=device, **options)]
    if references:
        rows += reference_rows(resolved.spec, data, mean, std, batch_size=batch_size,
                               device=device, **options)
    return {"checkpoint": url, "backbone": resolved.backbone_url, "step": resolved.step,
            "images_seen": resolved.images_seen, **resolved.spec.to_record(),
            "image_size": size, "mean": list(mean), "std": list(std), "train": train_spec, "test": test_spec,
            "train_count": len(data.train), "test_count": len(data.test), "num_classes": data.num_classes,
            "k": k, "temperature": temperature, "device": str(device),
            "skipped": {"train": dict(data.train.skipped), "test": dict(data.test.skipped)}, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    def percent(value: float | None) -> str:
        return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"

    lines = [f"{result['checkpoint']}: step {result['step']}, {result['images_seen']} images seen, "
             f"{BackboneSpec.from_record(result).describe()}, {result['image_size']} px",
             f"{result['train_count']:,} train -> {result['test_count']:,} test images, {result['num_classes']} "
             f"classes; weighted kNN k={result['k']}, T={result['temperature']}",
             f"{'features':<14} {'dim':>6} {'kNN top-1':>10} {'linear top-1':>13}"]
    for row in result["rows"]:
        lines.append(f"{row['features']:<14} {row['dim']:>6} {percent(row['knn_top1']):>10} "
                     f"{percent(row.get('probe_top1')):>13}")
    skipped = {split: counts for split, counts in result["skipped"].items() if counts}
    if skipped:
        lines.append(f"skipped samples: {skipped}")
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.k < 1 or args.temperature <= 0 or args.batch_size < 1 or args.image_size < 0:
        print("eval: need --k >= 1, --temperature > 0, --batch-size >= 1, --image-size >= 0", file=sys.stderr)
        return 2
    if args.json_out and Path(args.json_out).is_dir():
        # Found out after the whole evaluation otherwise, and its result lost.
        raise UsageError(f"--json-out: {args.json_out} is a folder; give the path of a file to write")
    device = pick_device(args.device)
    storage_cfg = StorageConfig(endpoint_url=args.endpoint_url)
    try:
        resolved = resolve_checkpoint(args.checkpoint, storage_cfg)
    except Exception as error:  # noqa: BLE001 - refused in one line, or raised (see `refused`)
        return refused("eval", error, "--checkpoint", args.checkpoint, storage_cfg, (FileNotFoundError, ValueError))
    try:
        result = evaluate_checkpoint(args.checkpoint, args.train, args.test, storage_cfg, image_size=args.image_size,
                                     k=args.k, temperature=args.temperature, probe=not args.no_probe,
                                     references=not args.no_references, batch_size=args.batch_size,
                                     device=device, max_train=args.max_train,
                                     max_test=args.max_test, resolved=resolved)
    except Exception as error:  # noqa: BLE001 - as above, for the shards
        return refused("eval", error, "--train / --test", f"{args.train} / {args.test}", storage_cfg,
                       (FileNotFoundError, ValueError))
    print(format_table(result))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
