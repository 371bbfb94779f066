"""Which concepts a balancing signal would weigh up or down, offline, on a labelled stream: can the
model's own view of the stream see the stream's class imbalance at all?

``python -m pipelines.balance_signals --checkpoint CKPT --shards STREAM [--strength 1]
[--clusters 10,100] [--levels 200/20] [--density 0.2/1.5] [--bank 4096] [--max-images 0] [--seed 0]
[--resample MAX_SHOWS [--min-shows 1] [--quantile 0.1]]
[--reference SHARDS --reference-images 1000 --reference-similarity -1 [--reference-temperature 0]] [--knn 0]``

Every image of the shards is scored with the checkpoint's whole SwAV model, and each signal gives
it a weight within the same cap as `curation.balance`: the group signals (K * usage of its group)
** -strength (`stream_swav.balance.raw_weights`), usage being the share of the stream's images in
the group; the density signal as `DensityBalance` weighs:

- `prototypes`: the group is the argmax of the image's prototype scores, what `curation.balance`
  weighs by in training (there from a running estimate, here from the whole stream);
- `kmeans-K`: spherical k-means with K centroids on the pooled backbone features (centred), which
  unlike SwAV's prototypes are not fitted under an equal-partition constraint;
- `hkmeans-K1/K2`: two levels (Vo et al. 2024, the curation behind DINOv2's data: flat k-means
  puts centroids where the data is dense, clustering the centroids again spreads them over
  concepts): the K1 centroids clustered into K2, an image weighed by its top-level group's usage;
- `reference-R`: the group is the most similar of R images of a curated reference (`--reference`),
  in the projected space, as `curation.balance_signal: reference` weighs (an image less similar to
  every one than `--reference-similarity` weighs 1 and is shown once);
- `reference-R-soft-T` (with `--reference-temperature T`): as `reference-R`, each placed image
  shared out over the anchors by softmax(similarity / T) instead of given to its nearest
  (closer to balanced offline; built into the runtime at bebccbe, it recovered no more in training,
  and was taken out again: docs/curation.md);
- `knn-K` (with `--knn K`): the group is the class the image's K nearest other labelled images
  vote for (the evaluation's weighted k-NN), in the projected space: the labels as the embedding
  sees them, a ceiling for any signal of the model's own embedding;
- `label`: the group is the class itself (unlabelled images weigh 1, as `LabelBalance` weighs
  them, and are shown once when resampled): the perfect signal, for scale.

With `--resample`, each signal's weights become the expected number of shows of each image under
curation.balance_mode resample (`stream_swav.balance.expected_shows`, in random batches of the
checkpoint's batch size, within its replay budget; with `--min-shows` below 1, skipping too, as
curation.resample_min_shows and resample_quantile): the columns are then the shares of what would
be trained.

The table gives, per class (the shards' `cls`; images without one, such as the messy stream's junk,
are a row of their own), its share of the stream and its share of the weight under each signal,
and the total-variation distance of the labelled classes' shares from uniform: what a balance that
sees concepts would bring towards 0. With a labelled reference, a second table (`format_cells`)
says where the reference signal's weights come from: per class of its anchors, how much of the
class it finds at them, how pure and how full of junk their cells are, and how over-represented
the class looks to it against what the labels say.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stream_swav import logs
from stream_swav.apps import KNN_TEMPERATURE
from stream_swav.apps.evaluate import embed, knn_predict, pick_device
from stream_swav.data.labelled import NO_LABEL, load_labeled_images
from stream_swav.apps.gallery import load_swav_model
from stream_swav.balance import (MAX_STRENGTH, RESAMPLE_REFERENCE_QUANTILE, DensityBalance, ReferenceBalance, expected_shows,
                                 raw_weights)
from stream_swav.checkpoint import resolve_checkpoint
from stream_swav.config import Config, StorageConfig
from stream_swav.model import SwAVModel

BATCH_SIZE = 512
KMEANS_ITERATIONS = 30
KMEANS_RESTARTS = 3


class ScoresAndFeatures(nn.Module):
    """A SwAV model as one module from a batch of images to [prototype scores | projected features |
    pooled backbone features], so that `embed` runs the backbone once for all."""

    def __init__(self, model: SwAVModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        features = self.model.embed(images)
        z, scores = self.model.head(features)
        return torch.cat([scores, z, features], dim=1)


def scores_z_features(model: SwAVModel, cfg: Config, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Prototype scores, projected features (unit rows) and pooled backbone features of (N, S, S, 3)
    uint8 images, by the whole SwAV model in eval mode (`embed`: bf16 autocast on CUDA)."""
    both = embed(ScoresAndFeatures(model), images, cfg.augment.mean, cfg.augment.std, BATCH_SIZE, pick_device("auto"))
    scores, z, features = both.split([cfg.model.prototypes, cfg.model.output_dim,
                                      both.shape[1] - cfg.model.prototypes - cfg.model.output_dim], dim=1)
    return scores, z, features


def spherical_kmeans(points: Tensor, k: int, seed: int, restarts: int = KMEANS_RESTARTS) -> tuple[Tensor, Tensor]:
    """Centroids (k, D) and each point's centroid (N,) for unit rows `points` (N, D): of `restarts`
    runs from `seed`, the one whose points are closest to their centroids (one start can leave a
    concept split and another merged)."""
    if not 1 <= k <= len(points):
        raise ValueError(f"k must be in [1, {len(points)}] (the points to cluster), got {k}")
    generator = torch.Generator().manual_seed(seed)
    runs = [_lloyd(points, k, generator) for _ in range(restarts)]
    centroids = max(runs, key=lambda c: float((points @ c.T).max(dim=1).values.sum()))
    return centroids, (points @ centroids.T).argmax(dim=1)


def _lloyd(points: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Lloyd's iterations under cosine similarity from a k-means++ start (each next centroid a point
    drawn with odds its squared distance to the nearest one so far, so a small concept far from the
    rest gets one); an empty centroid keeps its place."""
    centroids = points.new_empty(k, points.shape[1])
    centroids[0] = points[torch.randint(len(points), (1,), generator=generator)]
    nearest = (1.0 - points @ centroids[0]).clamp_min(0.0)
    for j in range(1, k):
        odds = nearest  # 1 - cos of unit vectors is half their squared distance
        pick = torch.multinomial(odds if odds.sum() > 0 else torch.ones_like(odds), 1, generator=generator)
        centroids[j] = points[pick]
        nearest = torch.minimum(nearest, (1.0 - points @ centroids[j]).clamp_min(0.0))
    for _ in range(KMEANS_ITERATIONS):
        assigned = (points @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assigned, points)
        filled = torch.bincount(assigned, minlength=k) > 0
        centroids[filled] = F.normalize(sums[filled], dim=1)
    return centroids


def group_weights(groups: Tensor, count: int, strength: float) -> Tensor:
    """Each image's weight (N,) when images are weighed by the usage of their group (N,) of `count`."""
    usage = torch.bincount(groups, minlength=count).double() / len(groups)
    return raw_weights(usage, strength)[groups]


def class_shares(labels: np.ndarray, weights: np.ndarray, classes: list[int]) -> list[float]:
    total = weights.sum()
    return [float(weights[labels == c].sum() / total) for c in classes]


def distance_from_uniform(labels: np.ndarray, weights: np.ndarray) -> float:
    """Total-variation distance of the labelled classes' weighted shares (unlabelled images left
    out) from uniform over those classes."""
    labelled = labels != NO_LABEL
    classes = sorted(set(labels[labelled].tolist()))
    shares = np.asarray(class_shares(labels[labelled], weights[labelled], classes))
    return float(0.5 * np.abs(shares - 1.0 / len(classes)).sum())


def density_weights(z: Tensor, bandwidth: float, strength: float, bank: int, seed: int) -> Tensor:
    """Each image's weight (N,) under `DensityBalance`, its bank `bank` of the images `z` (N, dim)
    drawn at random."""
    balance = DensityBalance(z.shape[1], strength, bandwidth, min(bank, len(z)))
    drawn = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))[:balance.bank.length]
    no_labels = torch.empty(0, dtype=torch.int64)
    balance.update(z[:0], z[drawn], no_labels)
    return balance.weights(z[:0], z, no_labels).double()


def nearest_anchors(z: Tensor, references: Tensor, similarity: float) -> Tensor:
    """Each image's anchor (N,) among these (R, dim) as `ReferenceBalance` places it; -1: none."""
    balance = ReferenceBalance(len(references), 1.0, min_similarity=similarity)
    balance.set_anchors(references)
    return balance.nearest(z)


def reference_weights(z: Tensor, references: Tensor, similarity: float, strength: float) -> tuple[Tensor, Tensor]:
    """Each image's weight (N,) under `ReferenceBalance` with these anchors (R, dim), the usage being
    the share of the stream's placed images at each, and which images it places (N,) bool."""
    anchor = nearest_anchors(z, references, similarity)
    placed = anchor >= 0
    weights = torch.ones(len(z), dtype=torch.float64)
    if placed.any():
        # Relative to the anchors the stream reaches, as the running estimate's are.
        _, reached = torch.unique(anchor[placed], return_inverse=True)
        weights[placed] = group_weights(reached, int(reached.max()) + 1, strength)
    return weights, placed


def soft_reference_weights(z: Tensor, references: Tensor, similarity: float, strength: float,
                           temperature: float) -> tuple[Tensor, Tensor]:
    """Each image's weight (N,) when every placed image (as `reference_weights` places them) is shared
    out over the anchors (R, dim) by softmax(cosine similarity / temperature) instead of given to
    its nearest, and which images are placed (N,) bool: an anchor's usage is the mean of its shares
    (relative to all R anchors, which such shares always reach, as the runtime's version at bebccbe
    had it), an image weighs its shares' mean of the anchors' weights."""
    placed = nearest_anchors(z, references, similarity) >= 0
    weights = torch.ones(len(z), dtype=torch.float64)
    if placed.any():
        shares = torch.softmax(z[placed].double() @ F.normalize(references.double(), dim=1).T / temperature, dim=1)
        weights[placed] = shares @ raw_weights(shares.mean(dim=0), strength).double()
    return weights, placed


def knn_class_weights(z: Tensor, labels: Tensor, k: int, strength: float) -> Tensor:
    """Each labelled image weighed by the share of the class its `k` nearest other labelled images
    vote for (the evaluation's weighted k-NN on projected features; unlabelled images weigh 1): what
    a signal that saw the stream only through this embedding, but knew its labels, could do at best."""
    known = torch.nonzero(labels != NO_LABEL).flatten()
    if not 1 <= k < len(known):
        raise ValueError(f"--knn must be in [1, {len(known) - 1}] (the labelled images but one), got {k}")
    classes, grouped = torch.unique(labels[known], return_inverse=True)
    voted = knn_predict(z[known], grouped, z[known], k, KNN_TEMPERATURE, len(classes), exclude_self=True)
    weights = torch.ones(len(labels), dtype=torch.float64)
    weights[known] = group_weights(voted, len(classes), strength)
    return weights


def signal_weights(scores: Tensor, z: Tensor, features: Tensor, labels: Tensor, strength: float,
                   clusters: list[int], levels: list[tuple[int, int]], densities: list[tuple[float, float]],
                   bank: int, seed: int, references: Tensor | None = None,
                   reference_similarity: float = -1.0, reference_temperature: float = 0.0,
                   knn: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every signal's weights (N,), in table order (`uniform`, all 1, is the stream as it is), and for
    the signals that place only some images (`reference-R` and its soft column, `knn-K`, `label`),
    which (N,) bool."""
    out = {"uniform": torch.ones(len(scores), dtype=torch.float64)}
    placed = {}
    out["prototypes"] = group_weights(scores.argmax(dim=1), scores.shape[1], strength)
    for bandwidth, density_strength in densities:
        out[f"density-{bandwidth:g}/{density_strength:g}"] = density_weights(z, bandwidth, density_strength, bank,
                                                                             seed)
    points = F.normalize(features - features.mean(dim=0), dim=1)
    for k in clusters:
        _, assigned = spherical_kmeans(points, k, seed)
        out[f"kmeans-{k}"] = group_weights(assigned, k, strength)
    for fine, coarse in levels:
        centroids, assigned = spherical_kmeans(points, fine, seed)
        _, parent = spherical_kmeans(centroids, coarse, seed)
        out[f"hkmeans-{fine}/{coarse}"] = group_weights(parent[assigned], coarse, strength)
    if references is not None:
        name = f"reference-{len(references)}"
        out[name], placed[name] = reference_weights(z, references, reference_similarity, strength)
        if reference_temperature > 0:
            soft = f"{name}-soft-{reference_temperature:g}"
            out[soft], placed[soft] = soft_reference_weights(z, references, reference_similarity, strength,
                                                             reference_temperature)
    known = labels != NO_LABEL
    if knn:
        out[f"knn-{knn}"] = knn_class_weights(z, labels, knn, strength)
        placed[f"knn-{knn}"] = known
    classes, grouped = torch.unique(labels[known], return_inverse=True)
    out["label"] = torch.ones(len(labels), dtype=torch.float64)
    out["label"][known] = group_weights(grouped, len(classes), strength)
    placed["label"] = known
    return out, placed


def as_resampled(weights: Tensor, batch_size: int, max_shows: int, seed: int, placed: Tensor | None = None,
                 mean_shows: float | None = None, min_shows: float = 1.0,
                 quantile: float = RESAMPLE_REFERENCE_QUANTILE) -> Tensor:
    """Each image's expected shows (N,) when the stream, in batches of `batch_size` drawn at random,
    is resampled by these weights as curation.balance_mode resample does (images not `placed`, (N,)
    bool, shown `min_shows` times; a batch's shows within `mean_shows` on average, the replay budget;
    the `quantile` weight shown once, below 1 show skipping, as curation.resample_min_shows)."""
    order = torch.randperm(len(weights), generator=torch.Generator().manual_seed(seed))
    shows = torch.empty(len(weights), dtype=torch.float64)
    for batch in order.split(batch_size):
        shows[batch] = expected_shows(weights[batch], max_shows, None if placed is None else placed[batch],
                                      mean_shows, min_shows, quantile).double()
    return shows


def format_markdown(labels: np.ndarray, weights: dict[str, Tensor]) -> str:
    classes = sorted(set(labels.tolist()) - {NO_LABEL}) + ([NO_LABEL] if (labels == NO_LABEL).any() else [])
    names = list(weights)
    lines = ["| class | " + " | ".join("share" if n == "uniform" else n for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    columns = {n: class_shares(labels, w.numpy(), classes) for n, w in weights.items()}
    for row, c in enumerate(classes):
        lines.append(f"| {'no label' if c == NO_LABEL else c} | "
                     + " | ".join(f"{100 * columns[n][row]:.1f}%" for n in names) + " |")
    lines.append("| distance from balanced | "
                 + " | ".join(f"{distance_from_uniform(labels, w.numpy()):.3f}" for w in weights.values()) + " |")
    return "\n".join(lines) + "\n"


def format_cells(labels: np.ndarray, anchor_labels: np.ndarray, anchor: np.ndarray) -> str:
    """Where the reference signal's weights come from, per class of the reference's labelled anchors:
    how many anchors it has; of its stream images, the share placed at an anchor of their own class;
    of the placed images at its anchors (its cells), the share of its class and of junk (unlabelled);
    and how over-represented its placed images look to the signal, on average (their anchor's share
    of the placed stream times the anchors reached: 1 is a fair share), beside what the labels say
    (the class's share of the labelled stream times the classes)."""
    placed = anchor >= 0
    usage = np.bincount(anchor[placed], minlength=len(anchor_labels)) / max(int(placed.sum()), 1)
    reached = int((usage > 0).sum())
    cell_class = np.where(placed, anchor_labels[np.where(placed, anchor, 0)], NO_LABEL - 1)
    real = labels != NO_LABEL
    classes = sorted(set(anchor_labels.tolist()) - {NO_LABEL})
    lines = [f"{placed[real].mean():.1%} of labelled images placed, {placed[~real].mean() if (~real).any() else 0:.1%}"
             " of unlabelled ones\n",
             "| class | anchors | placed at its own class's anchors | its cells: own class | its cells: junk "
             "| looks (1 = fair) | is (labels) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in classes:
        own, cells = labels == c, cell_class == c
        looks = usage[anchor[own & placed]].mean() * reached if (own & placed).any() else float("nan")
        lines.append(f"| {c} | {int((anchor_labels == c).sum())} | {(cells & own).sum() / max(own.sum(), 1):.1%} "
                     f"| {(cells & own).sum() / max(cells.sum(), 1):.1%} "
                     f"| {(cells & ~real).sum() / max(cells.sum(), 1):.1%} | {looks:.2f} "
                     f"| {own[real].mean() * len(classes):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.balance_signals", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoint (folder, latest.json or backbone.pt)")
    parser.add_argument("--shards", required=True, help="labelled shards: the stream the run trained on")
    parser.add_argument("--strength", type=float, default=1.0, help="the weights' exponent, as curation.balance")
    parser.add_argument("--clusters", default="10,100", help="flat k-means sizes, comma-separated")
    parser.add_argument("--levels", default="200/20", help="two-level k-means sizes FINE/COARSE, comma-separated")
    parser.add_argument("--density", default="0.2/1.5",
                        help="density signals BANDWIDTH/STRENGTH, comma-separated (none: empty)")
    parser.add_argument("--bank", type=int, default=4096, help="the density signal's bank of images")
    parser.add_argument("--max-images", type=int, default=0, help="read at most this many images (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="k-means initialisation seed")
    parser.add_argument("--resample", type=int, default=0, metavar="MAX_SHOWS",
                        help="each signal resampling (curation.balance_mode resample with resample_max_shows "
                             "MAX_SHOWS, batches of the checkpoint's train.batch_size) instead of weighing")
    parser.add_argument("--min-shows", type=float, default=1.0,
                        help="with --resample, the fewest shows an image may get (curation.resample_min_shows; "
                             "below 1, skipping)")
    parser.add_argument("--quantile", type=float, default=RESAMPLE_REFERENCE_QUANTILE,
                        help="with --resample, the batch's weight quantile shown once (curation.resample_quantile)")
    parser.add_argument("--reference", help="shards of a curated reference: adds the reference signal's column")
    parser.add_argument("--reference-images", type=int, default=1000,
                        help="the reference's images read, each an anchor (curation.balance_reference_images)")
    parser.add_argument("--reference-similarity", type=float, default=-1.0,
                        help="an image is placed when this similar to an anchor "
                             "(curation.balance_reference_similarity)")
    parser.add_argument("--reference-temperature", type=float, default=0.0,
                        help="> 0: a column more, each placed image shared out over the anchors at this "
                             "temperature instead of given to its nearest")
    parser.add_argument("--knn", type=int, default=0,
                        help="> 0: a column more, the class an image's K nearest labelled images vote for, "
                             "weighed by its share (the labels seen through the embedding: a ceiling)")
    args = parser.parse_args(argv)
    logs.configure()
    if args.reference_temperature < 0 or args.knn < 0:
        parser.error(f"--reference-temperature and --knn must be >= 0 (0: no column), got "
                     f"{args.reference_temperature} and {args.knn}")
    if not 0.0 <= args.strength <= MAX_STRENGTH:
        parser.error(f"--strength must be in [0, {MAX_STRENGTH:g}] (as curation.balance), got {args.strength}")
    if not (0.0 < args.min_shows <= 1.0 and 0.0 < args.quantile < 1.0):
        parser.error(f"--min-shows must be in (0, 1] and --quantile in (0, 1), got {args.min_shows} and {args.quantile}")
    try:
        clusters = [int(k) for k in args.clusters.split(",") if k]
        levels = [(int(f), int(c)) for f, c in (pair.split("/") for pair in args.levels.split(",") if pair)]
        densities = [(float(b), float(x)) for b, x in (pair.split("/") for pair in args.density.split(",") if pair)]
    except ValueError:
        parser.error(f"--clusters takes integers, --levels FINE/COARSE pairs and --density BANDWIDTH/STRENGTH "
                     f"pairs, got {args.clusters!r}, {args.levels!r} and {args.density!r}")
    storage_cfg = StorageConfig()
    cfg, model = load_swav_model(resolve_checkpoint(args.checkpoint, storage_cfg), storage_cfg)
    read = load_labeled_images(args.shards, cfg.crops.global_size, storage_cfg, cfg.data, args.max_images,
                               unlabelled=True)
    scores, z, features = scores_z_features(model, cfg, read.images)
    labels = np.asarray(read.labels)
    references = anchor_labels = None
    if args.reference:
        reference = load_labeled_images(args.reference, cfg.crops.global_size, storage_cfg, cfg.data,
                                        args.reference_images, unlabelled=True)
        _, references, _ = scores_z_features(model, cfg, reference.images)
        anchor_labels = np.asarray(reference.labels)
    try:
        weights, placed = signal_weights(scores, z, features, torch.from_numpy(labels), args.strength, clusters,
                                         levels, densities, args.bank, args.seed, references,
                                         args.reference_similarity, args.reference_temperature, args.knn)
    except ValueError as err:
        parser.error(str(err))
    if args.resample:
        # As the balances place them: an image a signal cannot place (unlabelled, near no anchor) is shown
        # once, or `--min-shows` times when skipping in a batch the signal places half of.
        budget = cfg.curation.replay_budget(cfg.train.batch_size)
        weights = {name: w if name == "uniform" else as_resampled(w, cfg.train.batch_size, args.resample, args.seed,
                                                                  placed.get(name), budget, args.min_shows,
                                                                  args.quantile)
                   for name, w in weights.items()}
        if args.min_shows < 1.0:
            # What skipping trains per image read; the shares below are of what is trained.
            print("shows per image read, by signal: " + ", ".join(
                f"{name} {w.mean():.2f}" for name, w in weights.items() if name != "uniform") + "\n")
    how = (f", resampled (at most {args.resample} shows, at least {args.min_shows:g}, the {args.quantile:g} "
           f"quantile shown once)" if args.resample else "")
    print(f"{args.checkpoint} on {args.shards}: {len(labels):,} images, strength {args.strength:g}{how}\n")
    print(format_markdown(labels, weights))
    if references is not None and (anchor_labels != NO_LABEL).any():
        print(f"The reference's cells (similarity {args.reference_similarity:g}), by the class of its anchors:\n")
        print(format_cells(labels, anchor_labels, nearest_anchors(z, references, args.reference_similarity).numpy()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
