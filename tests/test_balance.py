"""Concept balance (curation.balance): per-sample loss weights from the network's prototype usage."""
from __future__ import annotations

import io

import pytest
import torch
from test_learner import SyntheticStream, tiny_config

from stream_swav.balance import MAX_RATIO, PrototypeBalance
from stream_swav.learner import Learner
from stream_swav.runtime.metrics import usage_perplexity
from stream_swav.swav import swav_loss


def skewed_assignments(n: int, prototypes: int, seed: int = 0) -> torch.Tensor:
    """Zipf-like picks: prototype k drawn with probability proportional to 1 / (k + 1)."""
    probs = 1.0 / torch.arange(1, prototypes + 1, dtype=torch.float64)
    return torch.multinomial(probs / probs.sum(), n, replacement=True, generator=torch.Generator().manual_seed(seed))


def test_balance_moves_the_trained_distribution_towards_uniform_over_prototypes():
    k = 8
    balance = PrototypeBalance(k, strength=1.0, momentum=0.9)
    for step in range(200):  # the usage estimate converges on the skewed stream
        balance.update(torch.bincount(skewed_assignments(256, k, seed=step), minlength=k))
    assigned = skewed_assignments(20_000, k, seed=999)
    raw = torch.bincount(assigned, minlength=k).double()
    trained = torch.zeros(k, dtype=torch.float64).index_add_(0, assigned, balance.weights(assigned).double())
    assert usage_perplexity(raw.numpy()) < 0.85 * k
    assert usage_perplexity(trained.numpy()) > 0.99 * k  # what the loss weighs is uniform over prototypes
    half = PrototypeBalance(k, strength=0.5)
    half.usage.copy_(balance.usage)
    partial = torch.zeros(k, dtype=torch.float64).index_add_(0, assigned, half.weights(assigned).double())
    assert usage_perplexity(raw.numpy()) < usage_perplexity(partial.numpy()) < usage_perplexity(trained.numpy())


def test_weights_have_mean_one_and_bounded_ratios():
    balance = PrototypeBalance(4, strength=1.0)
    assert torch.equal(balance.weights(torch.tensor([0, 1, 2, 3])), torch.ones(4))  # uniform usage at first
    balance.usage.copy_(torch.tensor([0.97, 0.01, 0.01, 0.01]))
    weights = balance.weights(torch.tensor([0, 0, 0, 1]))
    assert weights.mean().item() == pytest.approx(1.0)
    # The rare prototype's weight is capped at MAX_RATIO times a uniformly used one's.
    assert weights[3] / weights[0] == pytest.approx(MAX_RATIO * 4 * 0.97)
    assert torch.equal(PrototypeBalance(4, strength=0.0).weights(torch.tensor([0, 1])), torch.ones(2))


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


@pytest.mark.parametrize("kwargs", [{"prototypes": 0, "strength": 1.0}, {"prototypes": 2, "strength": 1.5},
                                    {"prototypes": 2, "strength": 0.5, "momentum": 1.0}])
def test_impossible_balance_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PrototypeBalance(**kwargs)
