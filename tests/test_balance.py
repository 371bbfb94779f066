"""Concept balance (curation.balance): per-sample loss weights or shows from the network's prototype
usage, the density of its projected features, the stream's labels or a curated reference."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_learner import SyntheticStream, tiny_config

from stream_swav.balance import (MAX_RATIO, DensityBalance, LabelBalance, PrototypeBalance, ReferenceBalance,
                                 expected_shows, reference_fingerprint, resample_shows)
from stream_swav.config import CurationConfig
from stream_swav.learner import Learner
from stream_swav.runtime.metrics import usage_perplexity
from stream_swav.swav import swav_loss


def skewed_assignments(n: int, prototypes: int, seed: int = 0) -> torch.Tensor:
    """Zipf-like picks: prototype k drawn with probability proportional to 1 / (k + 1)."""
    probs = 1.0 / torch.arange(1, prototypes + 1, dtype=torch.float64)
    return torch.multinomial(probs / probs.sum(), n, replacement=True, generator=torch.Generator().manual_seed(seed))


NO_FEATURES = torch.empty(0)  # what a signal that reads no features is given
NO_LABELS = torch.empty(0, dtype=torch.int64)


def picks(assigned: torch.Tensor, prototypes: int) -> torch.Tensor:
    """Scores (B, K) whose argmax is `assigned`."""
    return F.one_hot(assigned, prototypes).float()


def test_balance_moves_the_trained_distribution_towards_uniform_over_prototypes():
    k = 8
    balance = PrototypeBalance(k, strength=1.0, momentum=0.9)
    for step in range(200):  # the usage estimate converges on the skewed stream
        balance.update(torch.bincount(skewed_assignments(256, k, seed=step), minlength=k), NO_FEATURES, NO_LABELS)
    assigned = skewed_assignments(20_000, k, seed=999)
    raw = torch.bincount(assigned, minlength=k).double()
    weights = balance.weights(picks(assigned, k), NO_FEATURES, NO_LABELS).double()
    trained = torch.zeros(k, dtype=torch.float64).index_add_(0, assigned, weights)
    assert usage_perplexity(raw.numpy()) < 0.85 * k
    assert usage_perplexity(trained.numpy()) > 0.99 * k  # what the loss weighs is uniform over prototypes
    half = PrototypeBalance(k, strength=0.5)
    half.usage.copy_(balance.usage)
    half_weights = half.weights(picks(assigned, k), NO_FEATURES, NO_LABELS).double()
    partial = torch.zeros(k, dtype=torch.float64).index_add_(0, assigned, half_weights)
    assert usage_perplexity(raw.numpy()) < usage_perplexity(partial.numpy()) < usage_perplexity(trained.numpy())


def test_a_group_seen_once_stays_seen_however_long_it_is_away():
    """Its share decays towards 0 at every step without it, but never to 0 (float32 underflows
    after ~9,000 steps at momentum 0.99, ~1,000 at 0.9), which would read as never seen: weight 1,
    not placed."""
    balance = LabelBalance(classes=3, strength=1.0, momentum=0.9)
    balance.fold_groups(torch.tensor([0, 1]))
    for _ in range(2_000):
        balance.fold_groups(torch.tensor([1, 1]))
    labels = torch.tensor([0, 1, 2])
    assert balance.seen(labels).tolist() == [True, True, False]
    weights = balance.group_weights(labels)
    # The class away for 20,000 steps is as rare as can be (the cap); the unseen one weighs 1; and
    # the one class present is at its fair share (1), not counted against the long gone one's.
    assert weights[0] / weights[2] == pytest.approx(MAX_RATIO)
    assert weights[1] / weights[2] == pytest.approx(1.0)


def test_weights_have_mean_one_and_bounded_ratios():
    balance = PrototypeBalance(4, strength=1.0)
    assert torch.equal(balance.weights(picks(torch.tensor([0, 1, 2, 3]), 4), NO_FEATURES, NO_LABELS),
                       torch.ones(4))  # uniform usage at first
    balance.usage.copy_(torch.tensor([0.97, 0.01, 0.01, 0.01]))
    weights = balance.weights(picks(torch.tensor([0, 0, 0, 1]), 4), NO_FEATURES, NO_LABELS)
    assert weights.mean().item() == pytest.approx(1.0)
    # The rare prototype's weight is capped at MAX_RATIO times a uniformly used one's.
    assert weights[3] / weights[0] == pytest.approx(MAX_RATIO * 4 * 0.97)
    unit = PrototypeBalance(4, strength=0.0).weights(picks(torch.tensor([0, 1]), 4), NO_FEATURES, NO_LABELS)
    assert torch.equal(unit, torch.ones(2))


def test_weighted_loss_is_the_plain_loss_at_unit_weights_and_weighs_images():
    scores = torch.randn(3, 5, 7)
    codes = torch.softmax(torch.randn(2, 5, 7), dim=2)
    plain = swav_loss(scores, codes, [0, 1], 0.1)
    torch.testing.assert_close(swav_loss(scores, codes, [0, 1], 0.1, torch.ones(5)), plain)
    only_first = torch.tensor([5.0, 0, 0, 0, 0])
    alone = swav_loss(scores[:, :1], codes[:, :1], [0, 1], 0.1)
    torch.testing.assert_close(swav_loss(scores, codes, [0, 1], 0.1, only_first), alone)
    with pytest.raises(ValueError, match="weights"):
        swav_loss(scores, codes, [0, 1], 0.1, torch.ones(4))


def test_a_learner_with_balance_trains_and_keeps_its_estimate_through_a_checkpoint():
    torch.set_num_threads(1)
    cfg = tiny_config(curation={"balance": 1.0, "balance_momentum": 0.5})
    stream = SyntheticStream(n_classes=4, image_size=8, seed=3)
    learner = Learner(cfg, torch.device("cpu"))
    for _ in range(3):
        assert torch.isfinite(learner.train_step(stream.batch(cfg)).loss)
    usage = learner.balance.usage.clone()
    assert usage.sum().item() == pytest.approx(1.0)
    assert not torch.allclose(usage, torch.full_like(usage, 1 / len(usage)))
    state = learner.state_dict()
    assert "balance" in learner.rank_local_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = Learner(cfg, torch.device("cpu"))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.balance.usage, usage)
    state["balance"] = {"usage": torch.ones(3)}
    with pytest.raises(ValueError, match="balance state"):
        restored.load_state_dict(state)
    assert restored.step == 3  # refused before anything changed


@pytest.mark.parametrize("kwargs", [{"prototypes": 0, "strength": 1.0}, {"prototypes": 2, "strength": 2.5},
                                    {"prototypes": 2, "strength": 0.5, "momentum": 1.0}])
def test_impossible_balance_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PrototypeBalance(**kwargs)


def concepts(counts: list[int], dim: int = 16, spread: float = 0.15,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit features of concepts (a random direction each, images scattered around it) with these
    image counts, shuffled; and each image's concept."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(len(counts), dim, generator=generator), dim=1)
    concept = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    points = F.normalize(centres[concept] + spread * torch.randn(len(concept), dim, generator=generator), dim=1)
    order = torch.randperm(len(concept), generator=generator)
    return points[order], concept[order]


def concept_shares(concept: torch.Tensor, weights: torch.Tensor, count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Each concept's share of these images (N,) as they are, and of their weights (N,)."""
    raw = torch.bincount(concept, minlength=count).double() / len(concept)
    weighed = torch.zeros(count, dtype=torch.float64).index_add_(0, concept, weights.double())
    return raw, weighed / weighed.sum()


def test_density_balance_moves_a_flooded_stream_towards_balanced_concepts():
    """Concepts 10:5:2:1 in the stream: weighed by their density among the last images, each
    concept's share of the weight moves most of the way to a quarter; all 1 until the bank is full."""
    features, concept = concepts([4000, 2000, 800, 400])
    balance = DensityBalance(dim=16, strength=1.5, bandwidth=0.2, bank=1024)
    assert torch.equal(balance.weights(NO_FEATURES, features[:256], NO_LABELS), torch.ones(256))
    balance.update(NO_FEATURES, features[:1024], NO_LABELS)
    weights = torch.cat([balance.weights(NO_FEATURES, batch, NO_LABELS) for batch in features[1024:].split(256)])
    raw, weighed = concept_shares(concept[1024:], weights)
    assert raw[0] > 0.5 and raw[3] < 0.06
    assert (weighed - 0.25).abs().sum() < 0.25 * (raw - 0.25).abs().sum()
    for batch in weights.split(256):
        assert batch.mean().item() == pytest.approx(1.0, abs=1e-5)
    unit = DensityBalance(16, strength=0.0, bank=1024)
    assert torch.equal(unit.weights(NO_FEATURES, features[:4], NO_LABELS), torch.ones(4))


def test_the_density_bank_keeps_the_latest_images_and_survives_a_checkpoint():
    features, _ = concepts([300, 100])
    balance = DensityBalance(dim=16, strength=1.5, bank=128)
    for batch in features.split(100):
        balance.update(NO_FEATURES, batch, NO_LABELS)
    torch.testing.assert_close(balance.bank.features()[0].sort(dim=0).values, features[-128:].sort(dim=0).values)
    buffer = io.BytesIO()
    torch.save(balance.state_dict(), buffer)
    buffer.seek(0)
    restored = DensityBalance(dim=16, strength=1.5, bank=128)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.weights(NO_FEATURES, features[:64], NO_LABELS),
                               balance.weights(NO_FEATURES, features[:64], NO_LABELS))
    # curation.balance_bank changed at a resume: the bank starts afresh rather than failing the load.
    smaller = DensityBalance(dim=16, strength=1.5, bank=64)
    smaller.load_state_dict(balance.state_dict())
    assert smaller.bank.features() is None and smaller.bank.length == 64
    poisoned = balance.state_dict()
    poisoned["features"][0, 5, 0] = float("nan")
    for bad in (poisoned, {**balance.state_dict(), "features": torch.zeros(1, 128, 8)}, None):
        with pytest.raises(ValueError, match="density's bank"):
            restored.check_state(bad)
    for kwargs in ({"strength": 2.5}, {"strength": 1.0, "bandwidth": 0.0}, {"strength": 1.0, "bank": 0}):
        with pytest.raises(ValueError):
            DensityBalance(dim=16, **kwargs)


def test_a_learner_with_density_balance_trains_and_keeps_its_bank_through_a_checkpoint():
    torch.set_num_threads(1)
    cfg = tiny_config(curation={"balance": 1.5, "balance_signal": "density", "balance_bank": 8})
    stream = SyntheticStream(n_classes=4, image_size=8, seed=3)
    learner = Learner(cfg, torch.device("cpu"))
    for _ in range(3):
        assert torch.isfinite(learner.train_step(stream.batch(cfg)).loss)
    assert isinstance(learner.balance, DensityBalance) and learner.balance.bank.is_full
    assert "balance_density" in learner.rank_local_state()
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    restored = Learner(cfg, torch.device("cpu"))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.balance.bank.buffer, learner.balance.bank.buffer)
    # A checkpoint of the prototype signal: the density starts afresh rather than refusing the resume.
    prototype_state = Learner(tiny_config(curation={"balance": 1.0}), torch.device("cpu")).state_dict()
    fresh = Learner(cfg, torch.device("cpu"))
    fresh.load_state_dict(prototype_state)
    assert fresh.balance.bank.fill == 0


def test_label_balance_weighs_classes_to_balanced_and_leaves_unlabelled_samples_at_one():
    classes = skewed_assignments(4096, 8, seed=5)
    balance = LabelBalance(classes=1000, strength=1.0, momentum=0.9)
    labels = classes.clone()
    labels[::10] = -1  # a tenth of the stream carries no class
    assert torch.equal(balance.weights(NO_FEATURES, NO_FEATURES, labels[:6]), torch.ones(6))  # nothing seen yet
    for batch in labels.split(256):
        balance.update(NO_LABELS, NO_FEATURES, batch)
    assert torch.count_nonzero(balance.usage) == 8  # 8 classes seen of the 1,000 it can hold
    later = skewed_assignments(20_000, 8, seed=6)
    weights = balance.weights(NO_FEATURES, NO_FEATURES, later).double()
    trained = torch.zeros(8, dtype=torch.float64).index_add_(0, later, weights)
    assert usage_perplexity(torch.bincount(later, minlength=8).double().numpy()) < 0.85 * 8
    assert usage_perplexity(trained.numpy()) > 0.99 * 8
    # An unlabelled sample weighs what a sample of a class at its fair share does.
    mixed = balance.weights(NO_FEATURES, NO_FEATURES, torch.tensor([-1, 0, 7, 5000]))
    assert mixed[0] == mixed[3] and mixed[1] < mixed[0] < mixed[2]
    # A step without labels leaves the estimate as it was.
    before = balance.usage.clone()
    balance.update(NO_LABELS, NO_FEATURES, torch.full((4,), -1))
    assert torch.equal(balance.usage, before)


def test_a_learner_with_label_balance_reads_the_batch_labels():
    torch.set_num_threads(1)
    cfg = tiny_config(curation={"balance": 1.0, "balance_signal": "label", "balance_classes": 4,
                                "balance_momentum": 0.5})
    stream = SyntheticStream(n_classes=4, image_size=8, seed=3)
    learner = Learner(cfg, torch.device("cpu"))
    for _ in range(2):
        batch = stream.batch(cfg)
        batch.meta.labels = [0] * (len(batch) - 1) + [3]
        assert torch.isfinite(learner.train_step(batch).loss)
    assert isinstance(learner.balance, LabelBalance)
    assert learner.balance.usage[0] > learner.balance.usage[3] > 0 and learner.balance.usage[1] == 0
    assert "balance_label" in learner.rank_local_state()


def test_resample_shows_are_the_weight_over_the_batch_reference_in_expectation():
    # A batch as the label signal weighs a 10:1 stream: 90% at 0.1 of the rare images' weight.
    weights = torch.cat([torch.full((900,), 0.2), torch.full((100,), 2.0)])
    generator = torch.Generator().manual_seed(0)
    shows = torch.stack([resample_shows(weights, 10, generator) for _ in range(200)]).double()
    assert shows.min() >= 1 and shows.max() <= 10
    assert torch.equal(shows[:, :900], torch.ones_like(shows[:, :900]))  # the reference is shown once
    assert torch.equal(shows[:, 900:], torch.full_like(shows[:, 900:], 10.0))  # 10 times its weight
    # Between whole numbers, rounded at random to the ratio's expectation.
    halves = torch.cat([torch.full((900,), 1.0), torch.full((100,), 2.5)])
    drawn = torch.stack([resample_shows(halves, 10, generator) for _ in range(400)]).double()
    assert set(drawn[:, 900:].unique().tolist()) == {2.0, 3.0}
    assert drawn[:, 900:].mean().item() == pytest.approx(2.5, abs=0.02)
    # Capped at max_shows however rare an image looks; never below once.
    assert resample_shows(torch.tensor([1.0] * 9 + [1000.0]), 4)[-1] == 4
    assert torch.equal(resample_shows(torch.tensor([1.0] * 19 + [0.01]), 4), torch.ones(20, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_shows"):
        resample_shows(weights, 0)


def test_a_flood_does_not_make_every_other_image_ask_for_more_shows_than_the_replays_can_hold():
    """20% of a batch on one over-represented group (its weight capped at a tenth) is the batch's
    reference: every other image would ask for max_shows, far more than batches of 75% replays hold
    (4 shows per image read), and the shows would be even instead of balanced. Within the budget
    they are scaled down together: the flood once, the rest in proportion to their weights."""
    flood = torch.full((200,), 0.1)
    common, rare = torch.full((600,), 1.2), torch.full((200,), 3.6)
    weights = torch.cat([flood, common, rare])
    unbounded = expected_shows(weights, 10)
    assert torch.equal(unbounded[200:], torch.full((800,), 10.0)) and unbounded.mean() > 8
    budget = CurationConfig(resample_share=0.75).replay_budget(1000)
    assert budget == 4.0 and CurationConfig(resample_share=0.7).replay_budget(64) == 64 / 20  # 44 replay slots
    shows = expected_shows(weights, 10, mean_shows=budget)
    assert shows.mean().item() == pytest.approx(4.0, abs=1e-3)
    assert torch.equal(shows[:200], torch.ones(200))
    assert shows[200] == pytest.approx(shows[-1] / 3) and 1 < shows[200] < shows[-1] <= 10
    drawn = torch.stack([resample_shows(weights, 10, torch.Generator().manual_seed(n), mean_shows=4.0)
                         for n in range(50)]).double()
    assert drawn.mean().item() == pytest.approx(4.0, abs=0.05)
    # A batch within the budget is left as the quantile rule has it; a balanced one, once each.
    within = torch.cat([torch.full((900,), 0.2), torch.full((100,), 2.0)])
    assert torch.equal(expected_shows(within, 10, mean_shows=4.0), expected_shows(within, 10))
    assert torch.equal(expected_shows(torch.ones(64), 10, mean_shows=4.0), torch.ones(64))
    # Images not placed stay at one show and count in the mean.
    placed = torch.arange(1000) >= 500
    assert expected_shows(weights, 10, placed).mean().item() == pytest.approx(1.4)  # rare images 3 shows
    bounded = expected_shows(weights, 10, placed, mean_shows=1.2)
    assert torch.equal(bounded[:800], torch.ones(800)) and bounded.mean().item() == pytest.approx(1.2, abs=1e-3)
    with pytest.raises(ValueError, match="mean_shows"):
        expected_shows(weights, 10, mean_shows=0.5)


def test_a_resampling_learner_asks_for_no_more_shows_than_its_batches_replays_can_hold():
    """30% of a batch of one class, 14 other classes once each: by the quantile rule every other image
    would be shown 6 times (4.5 per image read, over the 4 that batches of 75% replays hold); the
    learner asks for what fits, the flood once and the rest 5 or 6 times, about 5.3 on average."""
    torch.set_num_threads(1)
    cfg = tiny_config(train={"batch_size": 20, "seed": 7},
                      curation={"balance": 1.0, "balance_signal": "label", "balance_classes": 16,
                                "balance_momentum": 0.0, "balance_mode": "resample"})
    assert cfg.curation.replay_budget(cfg.train.batch_size) == 4.0
    learner = Learner(cfg, torch.device("cpu"))
    batch = SyntheticStream(n_classes=4, image_size=8, seed=3).batch(cfg)
    batch.meta.labels = [0] * 6 + list(range(1, 15))
    learner.train_step(batch)  # the estimate: this batch's shares
    shows = learner.train_step(batch).shows
    assert shows[:6].eq(1).all()
    assert set(shows[6:].tolist()) == {5, 6}
    assert shows.double().mean().item() <= 4.0 + 0.7 * 0.5  # within rounding of the budget


def test_a_resampling_learner_trains_unweighted_and_counts_only_what_it_read():
    torch.set_num_threads(1)
    cfg = tiny_config(curation={"balance": 1.0, "balance_signal": "label", "balance_classes": 4,
                                "balance_momentum": 0.5, "balance_mode": "resample"})
    stream = SyntheticStream(n_classes=4, image_size=8, seed=3)
    learner = Learner(cfg, torch.device("cpu"))
    batch = stream.batch(cfg)
    batch.meta.labels = [0] * (len(batch) - 2) + [3, 3]
    batch.meta.replayed = 1  # the last row is a replay: not counted, not asked for again
    first = learner.train_step(batch)
    assert first.shows.shape == (len(batch) - 1,) and first.shows_ready is None
    torch.testing.assert_close(learner.balance.usage[[0, 3]], torch.tensor([0.5 * (len(batch) - 2) / (len(batch) - 1),
                                                                            0.5 * 1 / (len(batch) - 1)]))
    second = learner.train_step(batch)
    # Class 3 is half as common as class 0 in what was read (the replay not counted): its image is
    # shown twice, class 0's, the batch's reference, once.
    assert second.shows.tolist() == [1, 1, 2]
    # Unweighted: the loss is what a learner without balance computes from the same state and batch.
    plain_cfg = tiny_config(curation={})
    plain = Learner(plain_cfg, torch.device("cpu"))
    plain.load_state_dict({k: v for k, v in learner.state_dict().items() if k != "balance_label"})
    resampling = Learner(cfg, torch.device("cpu"))
    resampling.load_state_dict(learner.state_dict())
    torch.manual_seed(7)
    expected = plain.train_step(batch).loss
    torch.manual_seed(7)
    torch.testing.assert_close(resampling.train_step(batch).loss, expected)


def test_a_batch_of_replays_only_trains_and_leaves_the_estimate_alone():
    torch.set_num_threads(1)
    cfg = tiny_config(curation={"balance": 1.0, "balance_signal": "label", "balance_classes": 4,
                                "balance_mode": "resample"})
    learner = Learner(cfg, torch.device("cpu"))
    batch = SyntheticStream(n_classes=4, image_size=8, seed=3).batch(cfg)
    batch.meta.labels = [0] * len(batch)
    batch.meta.replayed = len(batch)
    stats = learner.train_step(batch)
    assert torch.isfinite(stats.loss) and stats.shows is None and learner.step == 1
    assert torch.equal(learner.balance.usage, torch.zeros(4))


def test_only_what_the_signal_places_is_shown_again():
    # Half the batch unlabelled at weight 1 (a class at its fair share), the rest a 9:1 split.
    weights = torch.cat([torch.ones(50), torch.full((45,), 0.2), torch.full((5,), 1.8)])
    placed = torch.arange(100) >= 50
    shows = resample_shows(weights, 10, torch.Generator().manual_seed(0), placed)
    assert torch.equal(shows[:50], torch.ones(50, dtype=torch.int64))  # unplaced: once, whatever their weight
    assert torch.equal(shows[50:95], torch.ones(45, dtype=torch.int64))  # the reference among the placed
    assert torch.equal(shows[95:], torch.full((5,), 9, dtype=torch.int64))
    # Without the mask the unplaced images, five times the reference's weight, are shown five times.
    assert resample_shows(weights, 10, torch.Generator().manual_seed(0))[:50].eq(5).all()
    # None placed: every image once.
    assert resample_shows(weights, 10, placed=torch.zeros(100, dtype=torch.bool)).eq(1).all()
    balance = LabelBalance(classes=4, strength=1.0)
    balance.update(NO_LABELS, NO_FEATURES, torch.tensor([0, 0, 1]))
    assert balance.placed(NO_FEATURES, NO_FEATURES, torch.tensor([0, 1, 2, -1, 7])).tolist() == [
        True, True, False, False, False]
    assert PrototypeBalance(4, 1.0).placed(NO_FEATURES, NO_FEATURES, torch.tensor([0])) is None



def test_reference_balance_weighs_concepts_by_their_anchors_and_leaves_what_is_near_none_alone():
    """Concepts 10:5:2:1 in the stream, a reference of 8 images of each (the curated set): weighed by
    the running share of their nearest anchor, the concepts' shares of the weight move most of the
    way to a quarter; an image near no anchor is neither placed, nor weighed, nor counted."""
    stream, of = concepts([4000, 2000, 800, 400], seed=1)
    # The reference: its own draw around the same centres (the seed's), 8 images of each concept.
    reference, reference_concept = concepts([8, 8, 8, 8], seed=1)
    balance = ReferenceBalance(len(reference), strength=1.0, momentum=0.95, min_similarity=0.5)
    assert torch.equal(balance.nearest(stream[:3]), torch.full((3,), -1))  # no anchors yet
    assert torch.equal(balance.weights(NO_FEATURES, stream[:256], NO_LABELS), torch.ones(256))
    assert not balance.placed(NO_FEATURES, stream[:4], NO_LABELS).any()
    balance.set_anchors(reference)
    assert (reference_concept[balance.nearest(stream)] == of).float().mean() > 0.99
    for batch in stream[:4096].split(256):
        balance.update(NO_LABELS, batch, NO_LABELS)
    weights = torch.cat([balance.weights(NO_FEATURES, batch, NO_LABELS) for batch in stream[4096:].split(256)])
    raw, weighed = concept_shares(of[4096:], weights)
    assert raw[0] > 0.5 and raw[3] < 0.07
    assert (weighed - 0.25).abs().sum() < 0.25 * (raw - 0.25).abs().sum()
    # Far from every anchor (a direction no concept has): weight 1, not placed, not counted.
    stray = -reference[:1]
    assert balance.nearest(stray).item() == -1
    assert torch.equal(balance.weights(NO_FEATURES, stray.expand(3, -1), NO_LABELS), torch.ones(3))
    assert not balance.placed(NO_FEATURES, stray, NO_LABELS).item()
    before = balance.usage.clone()
    balance.update(NO_LABELS, stray.expand(5, -1), NO_LABELS)
    assert torch.equal(balance.usage, before)
    with pytest.raises(ValueError, match="anchors"):
        balance.set_anchors(reference[:3])
    with pytest.raises(ValueError, match="min_similarity"):
        ReferenceBalance(4, 1.0, min_similarity=1.5)


def test_reference_balance_keeps_its_estimate_through_a_checkpoint_unless_the_reference_changed():
    reference, _ = concepts([4, 4])
    stream, _ = concepts([60, 20])
    balance = ReferenceBalance(len(reference), strength=1.0)
    balance.set_anchors(reference)
    balance.update(NO_LABELS, stream, NO_LABELS)
    buffer = io.BytesIO()
    torch.save(balance.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = ReferenceBalance(len(reference), strength=1.0)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.usage, balance.usage)
    # Another reference (another number of anchors): the estimate starts afresh, the resume goes on.
    other = ReferenceBalance(5, strength=1.0)
    other.load_state_dict(state)
    assert torch.equal(other.usage, torch.zeros(5))
    with pytest.raises(ValueError, match="usage"):
        other.check_state({"usage": torch.tensor([float("nan")])})


def test_a_reference_balance_reuses_a_saved_estimate_only_for_the_same_reference_images():
    """As many anchors from other images (the reference's shards changed between a run and its
    resume) must not reuse the old anchors' shares: the fingerprint of the images tells them apart."""
    images = torch.randint(0, 256, (4, 6, 6, 3), dtype=torch.uint8)
    others = images.clone()
    others[2, 0, 0, 0] ^= 1
    fingerprint = reference_fingerprint(images)
    assert fingerprint.dtype == torch.uint8 and fingerprint.shape == (32,)
    assert torch.equal(fingerprint, reference_fingerprint(images.clone()))
    assert not torch.equal(fingerprint, reference_fingerprint(others))
    assert not torch.equal(fingerprint, reference_fingerprint(images.flip(0)))  # the order is the anchors'
    balance = ReferenceBalance(4, strength=1.0, fingerprint=fingerprint)
    balance.set_anchors(concepts([2, 2])[0])
    balance.update(NO_LABELS, concepts([30, 10])[0], NO_LABELS)
    buffer = io.BytesIO()
    torch.save(balance.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert torch.equal(state["reference_fingerprint"], fingerprint)
    same = ReferenceBalance(4, strength=1.0, fingerprint=reference_fingerprint(images))
    same.load_state_dict(state)
    torch.testing.assert_close(same.usage, balance.usage)
    changed = ReferenceBalance(4, strength=1.0, fingerprint=reference_fingerprint(others))
    changed.usage.fill_(0.25)
    changed.load_state_dict(state)
    assert torch.equal(changed.usage, torch.zeros(4))
    # An estimate saved without a fingerprint is not taken for this reference's either.
    unknown = ReferenceBalance(4, strength=1.0, fingerprint=fingerprint)
    unknown.load_state_dict({"usage": state["usage"]})
    assert torch.equal(unknown.usage, torch.zeros(4))
    with pytest.raises(ValueError, match="reference_fingerprint"):
        same.check_state({"usage": state["usage"], "reference_fingerprint": torch.zeros(32)})


def test_a_learner_with_the_reference_signal_embeds_its_reference_and_refreshes_it():
    torch.set_num_threads(1)
    cfg = tiny_config(curation={"balance": 1.0, "balance_signal": "reference", "balance_reference": "unused",
                                "balance_reference_refresh": 2, "balance_mode": "resample"})
    stream = SyntheticStream(n_classes=4, image_size=6, seed=3)
    reference = torch.from_numpy(stream.images(12))
    with pytest.raises(ValueError, match="reference images"):
        Learner(cfg, torch.device("cpu"))
    learner = Learner(cfg, torch.device("cpu"), reference_images=reference)
    assert isinstance(learner.balance, ReferenceBalance) and learner.balance.anchors is None
    learner.train_step(stream.batch(cfg))
    first = learner.balance.anchors.clone()
    assert first.shape == (12, cfg.model.output_dim) and learner.balance.usage.sum() > 0
    # The anchors are the model's own view of the reference, in eval mode, none of its statistics moved.
    learner.model.eval()
    with torch.no_grad():
        mean, std = torch.tensor(cfg.augment.mean).view(1, 3, 1, 1), torch.tensor(cfg.augment.std).view(1, 3, 1, 1)
        images = (reference.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    learner.model.train()
    buffers = [b.clone() for b in learner.model.buffers()]
    learner.refresh_reference()
    assert learner.model.training and all(torch.equal(a, b) for a, b in zip(buffers, learner.model.buffers()))
    with torch.no_grad():
        learner.model.eval()
        expected, _ = learner.model.head(learner.model.embed(images))
        learner.model.train()
    torch.testing.assert_close(learner.balance.anchors, expected)
    stats = learner.train_step(stream.batch(cfg))  # step 1: the anchors of step 0's model are kept
    assert stats.shows is not None and stats.shows.min() >= 1
    learner.train_step(stream.batch(cfg))  # step 2: embedded again, the model having moved
    assert not torch.allclose(learner.balance.anchors, first)
    assert "balance_reference" in learner.rank_local_state() and "balance_reference" not in learner.shared_state()
    # New weights (a resume, or adopting a survivor's): the anchors are embedded again at the next step,
    # and the estimate, saved with the reference's fingerprint, is kept.
    state = learner.state_dict()
    assert torch.equal(state["balance_reference"]["reference_fingerprint"], reference_fingerprint(reference))
    usage = learner.balance.usage.clone()
    learner.load_state_dict(state)
    assert learner.balance.anchors is None and torch.equal(learner.balance.usage, usage) and usage.sum() > 0
    learner.train_step(stream.batch(cfg))
    assert learner.balance.anchors is not None
    # A resume with other reference images of the same number starts the estimate afresh.
    resumed = Learner(cfg, torch.device("cpu"), reference_images=reference.flip(0))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.balance.usage, torch.zeros_like(usage))


def test_the_reference_signal_places_the_stream_as_it_embeds_the_anchors():
    """Stream images are placed by the eval-mode embedding of their first global crop, not colour
    augmented, as the anchors are embedded, not by the training forward's features (batch
    statistics, augmented crops), which are not comparable with the anchors."""
    torch.set_num_threads(1)
    cfg = tiny_config(train={"batch_size": 16, "seed": 7},
                      curation={"balance": 1.0, "balance_signal": "reference", "balance_reference": "unused",
                                "balance_momentum": 0.0, "balance_mode": "resample"})
    stream = SyntheticStream(n_classes=4, image_size=6, seed=3)
    learner = Learner(cfg, torch.device("cpu"), reference_images=torch.from_numpy(stream.images(12)))
    batch = stream.batch(cfg)
    batch.meta.replayed = 3  # replays are not placed or counted
    learner.refresh_reference()
    view = learner.embed_eval(torch.from_numpy(np.asarray(batch.global_crops[0][:13])))
    expected = torch.bincount(learner.balance.nearest(view), minlength=12).float() / 13
    learner.train_step(batch)  # step 0 embeds the anchors again, with the same model
    torch.testing.assert_close(learner.balance.usage, expected)


def test_every_balance_estimate_is_rank_local():
    from stream_swav.checkpoint import RANK_LOCAL_STATE_KEYS

    for balance in (PrototypeBalance, DensityBalance, LabelBalance, ReferenceBalance):
        assert balance.STATE_KEY in RANK_LOCAL_STATE_KEYS


def test_learners_read_the_reference_from_its_shards_at_the_global_crops_side(tmp_path):
    from stream_swav.apps.make_shards import array_samples, write_shards
    from stream_swav.runtime.actors import reference_images

    images = SyntheticStream(n_classes=3, image_size=20, seed=1).images(7)
    write_shards(array_samples(images, np.zeros(7, dtype=np.int64), size=20), tmp_path / "reference", 4, 1 << 30)
    cfg = tiny_config(curation={"balance": 1.0, "balance_signal": "reference",
                                "balance_reference": str(tmp_path / "reference"), "balance_reference_images": 5})
    read = reference_images(cfg)
    assert read.shape == (5, cfg.crops.global_size, cfg.crops.global_size, 3) and read.dtype == torch.uint8
    assert reference_images(tiny_config(curation={"balance": 1.0})) is None


def test_below_one_show_the_most_over_represented_and_the_unplaced_images_are_skipped_that_often():
    """30 images look 4x over-represented, 30 fair, 40 4x rare; with the median shown once, the first
    are shown a quarter of a time (skipped three times in four), the rare 4 times; an image the
    signal cannot place is shown `min_shows` times (where it places most of the batch), and no
    image less often."""
    weights = torch.tensor([0.25] * 30 + [1.0] * 30 + [4.0] * 40)
    placed = torch.ones(100, dtype=torch.bool)
    placed[:5] = False
    shows = expected_shows(weights, 10, placed, min_shows=0.1, quantile=0.5)
    assert torch.equal(shows[:5], torch.full((5,), 0.1))
    torch.testing.assert_close(shows[5:], torch.tensor([0.25] * 25 + [1.0] * 30 + [4.0] * 40))
    assert torch.equal(expected_shows(weights, 10, placed, min_shows=0.5, quantile=0.5)[:30], torch.full((30,), 0.5))
    # A batch the signal places less than half of (a model at its start, before it places the stream
    # near the anchors) skips none of what it cannot place: they are shown once.
    few = torch.zeros(100, dtype=torch.bool)
    few[60:] = True
    sparse = expected_shows(weights, 10, few, min_shows=0.1, quantile=0.5)
    assert torch.equal(sparse[:60], torch.ones(60)) and sparse[60:].eq(1.0).all()  # the placed: all weight 4
    # At min_shows 1 (the default) nothing is skipped, whatever the quantile.
    assert expected_shows(weights, 10, placed, quantile=0.5).min() == 1.0
    drawn = torch.stack([resample_shows(weights, 10, torch.Generator().manual_seed(n), placed, min_shows=0.1,
                                        quantile=0.5) for n in range(400)]).double()
    assert drawn[:, 5:30].mean().item() == pytest.approx(0.25, abs=0.03)
    assert drawn[:, :5].mean().item() == pytest.approx(0.1, abs=0.03)
    assert set(drawn[:, 5:30].unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="min_shows"):
        expected_shows(weights, 10, min_shows=0.0)
    with pytest.raises(ValueError, match="quantile"):
        expected_shows(weights, 10, quantile=1.0)


def skipping_config(**curation):
    return tiny_config(train={"batch_size": 20, "seed": 7},
                       curation={"balance": 1.0, "balance_signal": "label", "balance_classes": 16,
                                 "balance_momentum": 0.0, "balance_mode": "resample", "resample_min_shows": 0.1,
                                 "resample_quantile": 0.75, **curation})


def test_a_skipping_learner_takes_the_skipped_rows_out_before_the_forward_and_counts_them():
    """12 images of class 0, 4 of class 1, 2 of class 2, 1 unlabelled, 1 replay: with the 75th
    percentile weight (class 1's) shown once, class 0 is shown a third of a time, class 2 twice,
    the unlabelled image a tenth of a time, the replay as it came. `select` returns the batch without
    the skipped rows, their keys and labels in step with the crops, counts them as dropped for
    balance, and the step trains what is left and asks for class 2's second shows."""
    torch.set_num_threads(1)
    cfg = skipping_config()
    learner = Learner(cfg, torch.device("cpu"))
    original = SyntheticStream(n_classes=4, image_size=8, seed=3).batch(cfg)
    labels = [0] * 12 + [1] * 4 + [2] * 2 + [-1, 1]
    kept_by_class = {0: 0, 1: 0, 2: 0, -1: 0}
    rounds = 150
    for _ in range(rounds):
        batch = SyntheticStream(n_classes=4, image_size=8, seed=3).batch(cfg)
        batch.meta.keys = [f"k{i}" for i in range(20)]
        batch.meta.labels = list(labels)
        batch.meta.replayed = 1
        selected = learner.select(batch)
        rows = [int(key[1:]) for key in selected.meta.keys]
        assert rows[-1] == 19  # the replay stays, last
        assert selected.meta.labels == [labels[r] for r in rows]
        assert np.array_equal(selected.global_crops, original.global_crops[:, rows])
        assert selected.meta.dropped["balance"] == 20 - len(rows)
        assert len(selected.meta.shows) == len(rows) - 1
        for row, shows in zip(rows[:-1], selected.meta.shows):
            kept_by_class[labels[row]] += 1
            assert shows == {0: 1, 1: 1, 2: 2, -1: 1}[labels[row]]
        assert learner.select(selected) is selected  # selected once only
    assert kept_by_class[1] == 4 * rounds and kept_by_class[2] == 2 * rounds
    assert kept_by_class[0] / (12 * rounds) == pytest.approx(1 / 3, abs=0.05)
    assert kept_by_class[-1] / rounds == pytest.approx(0.1, abs=0.06)
    usage = learner.balance.usage.clone()
    stats = learner.train_step(selected)
    assert stats.shows.tolist() == selected.meta.shows
    assert learner.images_seen == len(selected)
    assert torch.equal(learner.balance.usage, usage)  # the estimate took the batch in `select`


def test_skipping_is_refused_without_a_signal_known_before_the_forward():
    from stream_swav.config import ConfigError

    for curation in ({"balance_signal": "prototypes"}, {"balance_signal": "density"},
                     {"balance_mode": "weigh"}):
        with pytest.raises(ConfigError, match="curation.resample_min_shows"):
            skipping_config(**curation)
    assert skipping_config().curation.skipping
    assert not skipping_config(resample_min_shows=1.0).curation.skipping


def test_resampling_without_skipping_shows_the_configured_quantile_once():
    """resample_quantile holds without skipping too: with the 75th-percentile weight (class 1's)
    shown once, class 0 is shown once (never less), class 2 twice; by default (the 10th percentile,
    class 0's) class 2 would be shown 6 times."""
    torch.set_num_threads(1)
    cfg = skipping_config(resample_min_shows=1.0)
    assert not cfg.curation.skipping
    learner = Learner(cfg, torch.device("cpu"))
    batch = SyntheticStream(n_classes=4, image_size=8, seed=3).batch(cfg)
    batch.meta.labels = [0] * 12 + [1] * 4 + [2] * 2 + [-1, -1]
    learner.train_step(batch)  # the estimate: this batch's shares
    shows = learner.train_step(batch).shows
    assert shows.tolist() == [1] * 16 + [2] * 2 + [1, 1]
    default = Learner(skipping_config(resample_min_shows=1.0, resample_quantile=0.1), torch.device("cpu"))
    default.train_step(batch)
    assert default.train_step(batch).shows.tolist() == [1] * 12 + [3] * 4 + [6] * 2 + [1, 1]


def test_a_label_estimate_survives_a_change_of_balance_classes_and_bad_shares_are_refused():
    """Raising curation.balance_classes at a resume (as the run's warning asks) keeps the shares of
    the classes both estimates have; lowering it drops the others. Shares that are not finite
    non-negative floats are refused, for every usage balance."""
    balance = LabelBalance(classes=4, strength=1.0, momentum=0.0)
    balance.update(NO_LABELS, NO_FEATURES, torch.tensor([0, 0, 0, 1, 2, 3]))
    saved = balance.state_dict()
    wider = LabelBalance(classes=6, strength=1.0)
    wider.load_state_dict(saved)
    torch.testing.assert_close(wider.usage, torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6, 0.0, 0.0]))
    narrower = LabelBalance(classes=2, strength=1.0)
    narrower.load_state_dict(saved)
    torch.testing.assert_close(narrower.usage, torch.tensor([0.5, 1 / 6]))
    for usage in (torch.tensor([0.5, -0.1]), torch.tensor([True, False]), torch.tensor([0.5, float("inf")]),
                  torch.tensor([1j, 0j]), torch.ones(2, 2)):
        for target in (LabelBalance(2, 1.0), PrototypeBalance(2, 1.0), ReferenceBalance(2, 1.0)):
            with pytest.raises(ValueError, match="balance state"):
                target.load_state_dict({"usage": usage})
    with pytest.raises(ValueError, match=r"of shape \(4,\)"):
        PrototypeBalance(4, 1.0).load_state_dict({"usage": torch.full((3,), 1 / 3)})


def test_the_density_weights_stay_finite_at_a_narrow_bandwidth():
    """exp((cos - 1) / bandwidth) underflows to 0 for every image at bandwidth 0.0001 (weights 0 / 0);
    taken in logs the weights stay finite and still favour the isolated images."""
    stream, of = concepts([400, 40], seed=2)
    order = torch.randperm(len(stream), generator=torch.Generator().manual_seed(0))
    balance = DensityBalance(dim=16, strength=1.0, bandwidth=0.0001, bank=256)
    balance.update(NO_FEATURES, stream[order[:256]], NO_LABELS)
    # Images not in the bank: every kernel value underflows in float32.
    rest, rest_of = stream[order[256:]], of[order[256:]]
    assert torch.exp((rest @ stream[order[:256]].t() - 1.0) / 0.0001).sum() == 0
    weights = balance.weights(NO_FEATURES, rest, NO_LABELS)
    assert torch.isfinite(weights).all() and weights.mean().item() == pytest.approx(1.0)
    assert weights[rest_of == 1].mean() > weights[rest_of == 0].mean()
