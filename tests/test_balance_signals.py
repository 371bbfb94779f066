"""The balance-signal study's pure parts: k-means, group weights and the distance from balanced, on
features where the concepts are plain to see (so a signal that sees them must balance them)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.balance_signals import (as_resampled, distance_from_uniform, format_cells, format_markdown,
                                      signal_weights, spherical_kmeans)
from stream_swav.data.labelled import NO_LABEL

# Three concepts, 10:3:1, and unlabelled images of a fourth.
SIZES = {0: 500, 1: 150, 2: 50, NO_LABEL: 100}


def separated_concepts(dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    axes = torch.eye(dim)[:len(SIZES)] * 5.0
    points, labels = [], []
    for axis, (label, count) in zip(axes, SIZES.items()):
        points.append(axis + 0.1 * torch.randn(count, dim, generator=generator))
        labels += [label] * count
    return torch.cat(points), np.asarray(labels)


def test_kmeans_finds_separated_concepts_whatever_their_size():
    features, labels = separated_concepts()
    _, assigned = spherical_kmeans(F.normalize(features, dim=1), 4, seed=1)
    # Every concept lands in one cluster of its own.
    assert {label: len(set(assigned[labels == label].tolist())) for label in SIZES} == {label: 1 for label in SIZES}
    assert len(set(assigned.tolist())) == 4
    with pytest.raises(ValueError, match="k must be"):
        spherical_kmeans(F.normalize(features, dim=1), len(features) + 1, seed=0)


def test_a_signal_that_sees_the_concepts_balances_them_and_the_stream_as_is_does_not():
    features, labels = separated_concepts()
    # Prototype scores that see nothing: every image prefers prototype 0.
    scores = torch.zeros(len(labels), 8)
    scores[:, 0] = 1.0
    z = F.normalize(features, dim=1)
    # A curated reference: an image of each labelled concept, none of the unlabelled one's.
    references = torch.cat([z[labels == label][:1] for label in (0, 1, 2)])
    weights, placed = signal_weights(scores, z, features, torch.from_numpy(labels), 1.0, [4], [(12, 4)],
                                     [(0.2, 1.0)], bank=400, seed=1, references=references, reference_similarity=0.5)
    assert list(weights) == ["uniform", "prototypes", "density-0.2/1", "kmeans-4", "hkmeans-12/4", "reference-3",
                             "label"]
    # The reference places every image of its concepts and none of the fourth; balances the former.
    assert torch.equal(placed["reference-3"], torch.from_numpy(labels != NO_LABEL))
    assert distance_from_uniform(labels, weights["reference-3"].numpy()) < 0.01
    assert weights["reference-3"][torch.from_numpy(labels == NO_LABEL)].eq(1).all()
    as_is = distance_from_uniform(labels, weights["uniform"].numpy())
    assert as_is == pytest.approx(0.5 * (abs(500 / 700 - 1 / 3) + abs(150 / 700 - 1 / 3) + abs(50 / 700 - 1 / 3)))
    assert distance_from_uniform(labels, weights["prototypes"].numpy()) == pytest.approx(as_is)
    assert distance_from_uniform(labels, weights["kmeans-4"].numpy()) < 0.01
    assert distance_from_uniform(labels, weights["hkmeans-12/4"].numpy()) < 0.05
    # Separated concepts: an image's density is its concept's share of the bank, so strength 1 balances.
    assert distance_from_uniform(labels, weights["density-0.2/1"].numpy()) < 0.05
    # The labels balance the labelled classes exactly; unlabelled images weigh 1.
    assert distance_from_uniform(labels, weights["label"].numpy()) == pytest.approx(0.0, abs=1e-9)
    assert torch.equal(weights["label"][torch.from_numpy(labels == NO_LABEL)], torch.ones(SIZES[NO_LABEL],
                                                                                           dtype=torch.float64))

    table = format_markdown(labels, weights)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert rows["0"].startswith("| 0 | 62.5% | 62.5% |") and rows["0"].endswith("| 25.0% | 25.0% | 29.2% | 29.2% |")
    assert rows["no label"].startswith("| no label | 12.5% |")
    assert f"{as_is:.3f}" in rows["distance from balanced"]


def test_soft_reference_and_knn_columns_balance_concepts_the_embedding_separates():
    """`--reference-temperature`: each placed image shared out over the anchors (a sharp temperature
    is the nearest anchor's balance); `--knn`: the labels seen through the embedding, a ceiling that
    balances concepts it separates. Neither places the unlabelled concept's images."""
    features, labels = separated_concepts()
    z = F.normalize(features, dim=1)
    references = torch.cat([z[labels == label][:2] for label in (0, 1, 2)])
    weights, placed = signal_weights(torch.zeros(len(labels), 4), z, features, torch.from_numpy(labels), 1.0, [], [],
                                     [], bank=400, seed=1, references=references, reference_similarity=0.5,
                                     reference_temperature=0.01, knn=5)
    assert list(weights) == ["uniform", "prototypes", "reference-6", "reference-6-soft-0.01", "knn-5", "label"]
    unlabelled = torch.from_numpy(labels == NO_LABEL)
    for name in ("reference-6-soft-0.01", "knn-5"):
        assert distance_from_uniform(labels, weights[name].numpy()) < 0.01
        assert torch.equal(placed[name], ~unlabelled) and weights[name][unlabelled].eq(1).all()
    with pytest.raises(ValueError, match="--knn must be"):
        signal_weights(torch.zeros(len(labels), 4), z, features, torch.from_numpy(labels), 1.0, [], [], [], bank=400,
                       seed=1, knn=len(labels))


def test_resampled_by_the_labels_the_trained_classes_move_to_balanced_up_to_the_show_cap():
    features, labels = separated_concepts()
    known = torch.from_numpy(labels)
    weights, _ = signal_weights(torch.zeros(len(labels), 4), F.normalize(features, dim=1), features, known, 1.0, [],
                                [], [], bank=400, seed=1)
    # 10:3:1 over 700 labelled images: resampled within 10 shows, the rare class is shown 10 times and
    # the middle one 10/3, in batches where the common class is the reference.
    shows = as_resampled(weights["label"], batch_size=700 + 100, max_shows=10, seed=0)
    assert distance_from_uniform(labels, shows.numpy()) < 0.02
    capped = as_resampled(weights["label"], batch_size=800, max_shows=2, seed=0)
    assert 0.1 < distance_from_uniform(labels, capped.numpy()) < distance_from_uniform(labels, np.ones(len(labels)))
    # Unlabelled images placed nowhere are shown once; otherwise as a class at its fair share.
    labelled = known != NO_LABEL
    placed = as_resampled(weights["label"], batch_size=800, max_shows=10, seed=0, placed=labelled)
    assert placed[~labelled].eq(1).all() and shows[~labelled].gt(2).all()
    assert distance_from_uniform(labels, placed.numpy()) < 0.02
    # Skipping: with the 90th-percentile weight (the middle class's) shown once, the common class is
    # shown 3/10 of a time, the rare one 3 times, the unlabelled images a tenth of a time: balanced
    # with fewer shows than images read.
    skipping = as_resampled(weights["label"], batch_size=800, max_shows=10, seed=0, placed=labelled, min_shows=0.1,
                            quantile=0.9)
    assert distance_from_uniform(labels, skipping.numpy()) < 0.02
    assert torch.allclose(skipping[~labelled], torch.tensor(0.1, dtype=torch.float64)) and skipping.max() == pytest.approx(3.0)
    assert skipping.mean().item() == pytest.approx((3 * 150 + 0.1 * 100) / 800)


def test_the_cells_table_says_where_the_reference_places_each_class_and_how_rare_it_looks():
    # Anchors: two of class 0, one of class 1. Stream: six class-0 images (five at class-0 anchors, one
    # at the class-1 anchor: an intruder), two class-1 images at the class-1 anchor, one junk image at
    # the class-1 anchor and one junk image placed nowhere.
    anchor_labels = np.asarray([0, 0, 1])
    labels = np.asarray([0, 0, 0, 0, 0, 0, 1, 1, NO_LABEL, NO_LABEL])
    anchor = np.asarray([0, 0, 0, 1, 1, 2, 2, 2, 2, -1])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in
            format_cells(labels, anchor_labels, anchor).splitlines() if line.startswith("| ") and "class" not in line}
    assert format_cells(labels, anchor_labels, anchor).startswith("100.0% of labelled images placed, 50.0% of unlabelled")
    # Class 0: 2 anchors; 5 of its 6 at its anchors, whose cells hold only class 0; it looks as its
    # images' anchors' shares of the 9 placed (3/9, 2/9, and 4/9 for the intruder) times 3 anchors.
    looks_0 = (3 * (3 / 9) * 3 + 2 * (2 / 9) * 3 + (4 / 9) * 3) / 6
    assert rows["0"][:4] == ["2", "83.3%", "100.0%", "0.0%"]
    assert float(rows["0"][4]) == pytest.approx(looks_0, abs=0.005)
    assert float(rows["0"][5].strip(" |")) == pytest.approx(6 / 8 * 2)
    # Class 1: its one cell holds 4 placed images: 2 of its own, one intruder, one junk.
    assert rows["1"][:4] == ["1", "100.0%", "50.0%", "25.0%"]
    assert float(rows["1"][4]) == pytest.approx(4 / 9 * 3, abs=0.005)
    assert float(rows["1"][5].strip(" |")) == pytest.approx(2 / 8 * 2)
