from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stream_swav.swav import FeatureQueue, marginal_error, prototype_counts, sinkhorn, swav_loss
from conftest import free_port


def reference_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The textbook exp-domain iteration in float64, for moderate scores only."""
    q = torch.exp(scores.double() / epsilon).t()
    n_prototypes, batch = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    return (q * batch).t()


def random_scores(batch: int, prototypes: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, prototypes, generator=generator) * 0.3


def test_sinkhorn_matches_textbook_iteration():
    scores = random_scores(24, 10)
    for iterations in (1, 3, 7):
        codes = sinkhorn(scores, epsilon=0.05, iterations=iterations)
        expected = reference_sinkhorn(scores, 0.05, iterations).float()
        torch.testing.assert_close(codes, expected, rtol=1e-4, atol=1e-5)


def test_sinkhorn_rows_are_distributions_and_mass_is_equal_after_many_iterations():
    scores = random_scores(40, 8, seed=1)
    codes = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert codes.shape == (40, 8)
    assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(40))

    converged = sinkhorn(scores, epsilon=0.05, iterations=200)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((8,), 40 / 8), rtol=1e-3, atol=1e-3)
    assert marginal_error(converged) < 1e-3
    # Three iterations are not converged: the check above is not vacuous.
    assert marginal_error(codes) > marginal_error(converged)


def test_sinkhorn_ignores_constant_shifts():
    scores = random_scores(16, 6, seed=2)
    codes = sinkhorn(scores)
    torch.testing.assert_close(sinkhorn(scores + 7.5), codes, rtol=1e-4, atol=1e-5)
    per_prototype = torch.linspace(-3, 3, 6)
    torch.testing.assert_close(sinkhorn(scores + per_prototype), codes, rtol=1e-4, atol=1e-5)
    # A per-sample shift only cancels at the fixed point, where column scalings absorb it.
    per_sample = torch.linspace(-0.2, 0.2, 16).unsqueeze(1)
    torch.testing.assert_close(sinkhorn(scores + per_sample, iterations=500), sinkhorn(scores, iterations=500),
                               rtol=1e-3, atol=1e-4)


def test_sinkhorn_is_finite_for_huge_scores_and_small_epsilon():
    generator = torch.Generator().manual_seed(3)
    scores = (torch.rand(32, 12, generator=generator) * 2 - 1) * 1e4
    scores[0] = 1e4  # ties at the extreme
    scores[1] = -1e4
    codes = sinkhorn(scores, epsilon=0.01, iterations=3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(32))
    # Row 0 scores every prototype equally, so its code can only be uniform-ish, never NaN.
    assert (codes[0] >= 0).all()


def test_sinkhorn_runs_in_float32_under_autocast_and_keeps_float64():
    scores = random_scores(16, 5, seed=4)
    low_precision = scores.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sinkhorn(low_precision)
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes, sinkhorn(low_precision.float()))
    assert sinkhorn(scores.double()).dtype == torch.float64


def test_sinkhorn_rejects_bad_shapes():
    with pytest.raises(ValueError, match="scores must be"):
        sinkhorn(torch.zeros(3))
    with pytest.raises(ValueError, match="log_marginal"):
        sinkhorn(torch.zeros(3, 2), log_marginal=torch.zeros(3))



def test_weighted_sinkhorn_partitions_the_weighted_batch_equally_and_keeps_codes_distributions():
    """Sample weights (concept balance) set each sample's share of the mass: the prototypes split
    the *weighted* batch equally, so a down-weighted flood no longer takes most of them."""
    generator = torch.Generator().manual_seed(6)
    # 30 images of a flooded concept lean to prototypes 0-3, 10 of a rare one to 4-7.
    lean = torch.cat([torch.tensor([1.0] * 4 + [0.0] * 4).expand(30, 8),
                      torch.tensor([0.0] * 4 + [1.0] * 4).expand(10, 8)])
    scores = lean + 0.1 * torch.randn(40, 8, generator=generator)
    weights = torch.cat([torch.full((30,), 1 / 3), torch.ones(10)])
    weights = weights / weights.mean()
    plain = sinkhorn(scores, epsilon=0.05, iterations=200)
    weighted = sinkhorn(scores, epsilon=0.05, iterations=200, sample_weights=weights)
    torch.testing.assert_close(weighted.sum(dim=1), torch.ones(40))
    # The weighted batch's mass per prototype is equal; the plain one's is not, under these weights.
    mass = (weights[:, None] * weighted).sum(dim=0) / weights.sum()
    torch.testing.assert_close(mass, torch.full((8,), 1 / 8), rtol=1e-3, atol=1e-4)
    assert ((weights[:, None] * plain).sum(dim=0) / weights.sum() - 1 / 8).abs().max() > 0.02
    # Unweighted, a third of the flood's mass spills into the rare concept's prototypes; weighted, none.
    assert plain[:30, 4:].sum(dim=1).mean() > 0.25 and weighted[:30, 4:].sum(dim=1).mean() < 0.05
    # Unit weights are the plain algorithm.
    torch.testing.assert_close(sinkhorn(scores, sample_weights=torch.ones(40)), sinkhorn(scores))
    with pytest.raises(ValueError, match="sample weights"):
        sinkhorn(scores, sample_weights=torch.ones(39))


def _sinkhorn_worker(rank: int, world_size: int, port: int, scores: torch.Tensor, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        shard = scores.chunk(world_size)[rank]
        torch.save(sinkhorn(shard, epsilon=0.05, iterations=3), f"{out_dir}/codes{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_sinkhorn_over_two_processes_equals_single_process(tmp_path):
    scores = random_scores(20, 6, seed=5) * 5
    mp.spawn(_sinkhorn_worker, args=(2, free_port(), scores, str(tmp_path)), nprocs=2, join=True)
    distributed = torch.cat([torch.load(tmp_path / f"codes{rank}.pt", weights_only=True) for rank in range(2)])
    torch.testing.assert_close(distributed, sinkhorn(scores, epsilon=0.05, iterations=3), rtol=1e-5, atol=1e-6)
    # Each half partitioned on its own gives something else: the reduction mattered.
    local_only = torch.cat([sinkhorn(half) for half in scores.chunk(2)])
    assert not torch.allclose(distributed, local_only, atol=1e-3)


def test_swav_loss_equals_hand_computed_value():
    batch, prototypes, n_crops, temperature = 2, 3, 3, 0.5
    scores = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.5, -0.1],     # crop 0
                           [0.2, 0.2, -0.4], [-0.3, 0.1, 0.6],     # crop 1
                           [0.4, -0.5, 0.0], [0.1, 0.1, 0.1]],     # crop 2
                          dtype=torch.float64)
    codes = {0: torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64),
             1: torch.tensor([[0.3, 0.3, 0.4], [0.5, 0.25, 0.25]], dtype=torch.float64)}
    by_crop = scores.view(n_crops, batch, prototypes)

    def log_softmax_row(row: list[float]) -> list[float]:
        exps = [math.exp(v / temperature) for v in row]
        total = sum(exps)
        return [math.log(e / total) for e in exps]

    rows = scores.tolist()
    per_assignment = []
    for crop, q in codes.items():
        subloss = 0.0
        for view in range(n_crops):
            if view == crop:
                continue
            cross_entropy = 0.0
            for b in range(batch):
                log_p = log_softmax_row(rows[view * batch + b])
                cross_entropy -= sum(q[b, k].item() * log_p[k] for k in range(prototypes))
            subloss += cross_entropy / batch
        per_assignment.append(subloss / (n_crops - 1))
    expected = sum(per_assignment) / len(per_assignment)

    loss = swav_loss(by_crop, torch.stack(list(codes.values())), list(codes), temperature=temperature)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_swav_loss_gradient_reaches_scores_only_and_float32_under_autocast():
    scores = random_scores(3 * 4, 5, seed=8).view(3, 4, 5).requires_grad_()
    codes = torch.stack([sinkhorn(scores[0].detach()), sinkhorn(scores[2].detach())])
    loss = swav_loss(scores, codes, [0, 2], temperature=0.1)
    loss.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = swav_loss(scores.detach().to(torch.bfloat16), codes, [0, 2], temperature=0.1)
    assert low.dtype == torch.float32


def test_swav_loss_rejects_inconsistent_shapes():
    scores = torch.zeros(3, 2, 4)
    with pytest.raises(ValueError, match="do not match"):
        swav_loss(scores, torch.full((1, 4, 4), 0.25), [0], temperature=0.1)
    with pytest.raises(ValueError, match="do not match"):
        swav_loss(scores, torch.full((2, 2, 4), 0.25), [0], temperature=0.1)
    with pytest.raises(ValueError, match="outside"):
        swav_loss(scores, torch.full((1, 2, 4), 0.25), [3], temperature=0.1)
    with pytest.raises(ValueError, match="n_crops >= 2"):
        swav_loss(torch.zeros(1, 2, 4), torch.full((1, 2, 4), 0.25), [0], temperature=0.1)

def batch_features(value: float, batch: int = 2, n_crops: int = 2, dim: int = 3) -> torch.Tensor:
    """(n_crops, batch, dim) with crop c, sample b holding value + 10c + b everywhere."""
    crop = torch.arange(n_crops, dtype=torch.float32).view(-1, 1, 1) * 10
    sample = torch.arange(batch, dtype=torch.float32).view(1, -1, 1)
    return (value + crop + sample).expand(n_crops, batch, dim).clone()


def test_queue_overwrites_the_oldest_rows_in_place_and_is_full_only_after_length_rows():
    queue = FeatureQueue(n_assign_crops=2, length=5, dim=3)
    storage = queue.buffer.data_ptr()
    assert not queue.is_full and queue.fill == 0 and queue.features() is None
    queue.push(batch_features(100))
    assert queue.fill == 2 and not queue.is_full and queue.features() is None
    queue.push(batch_features(200))
    assert queue.fill == 4 and not queue.is_full
    queue.push(batch_features(300))
    assert queue.fill == 5 and queue.is_full
    # Ring order: the oldest row (100) was overwritten by the newest batch's second row.
    assert queue.features()[0, :, 0].tolist() == [301, 101, 200, 201, 300]
    assert queue.features()[1, :, 0].tolist() == [311, 111, 210, 211, 310]
    queue.push(batch_features(400, batch=7))
    assert sorted(queue.features()[0, :, 0].tolist()) == [402, 403, 404, 405, 406]
    assert queue.buffer.data_ptr() == storage  # no reallocation


def test_queue_starts_filling_at_start_images():
    queue = FeatureQueue(n_assign_crops=1, length=4, dim=2, start_images=1000)
    assert not queue.accepts(999)
    assert queue.accepts(1000)


def test_queue_loads_the_newest_first_layout_of_older_checkpoints():
    old = torch.tensor([[[3.0], [2.0], [1.0], [0.0]]])  # newest first, 3 of 4 rows filled
    queue = FeatureQueue(n_assign_crops=1, length=4, dim=1)
    queue.load_state_dict({"features": old, "fill": 3})
    queue.push(torch.tensor([[[4.0], [5.0]]]))
    # The oldest row (1) went first, as the old queue would have dropped it.
    assert sorted(queue.features()[0, :, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]


def test_queue_state_round_trips_and_rejects_bad_state():
    queue = FeatureQueue(n_assign_crops=2, length=4, dim=3)
    queue.push(batch_features(1))
    restored = FeatureQueue(n_assign_crops=2, length=4, dim=3)
    restored.load_state_dict(queue.state_dict())
    assert restored.fill == 2 and not restored.is_full
    torch.testing.assert_close(restored.buffer, queue.buffer)
    queue.push(batch_features(5))
    restored.push(batch_features(5))
    assert restored.is_full
    torch.testing.assert_close(restored.buffer, queue.buffer)

    before = restored.buffer.clone()
    with pytest.raises(ValueError, match="shape"):
        restored.load_state_dict({"features": torch.zeros(2, 5, 3), "fill": 2})
    with pytest.raises(ValueError, match="fill"):
        restored.load_state_dict({"features": torch.zeros(2, 4, 3), "fill": 9})
    torch.testing.assert_close(restored.buffer, before)
    assert restored.fill == 4
    with pytest.raises(ValueError, match="next"):
        restored.load_state_dict({"features": torch.zeros(2, 4, 3), "fill": 2, "next": 4})
    with pytest.raises(ValueError, match="push"):
        restored.push(torch.zeros(2, 2, 4))


def test_prototype_usage_and_marginal_error():
    uniform = torch.full((10, 4), 0.25)
    assert marginal_error(uniform).item() == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.zeros(10, 4)
    collapsed[:, 2] = 1
    assert marginal_error(collapsed).item() == pytest.approx(3.0)
    # Against a non-uniform target, and for (A, B, K) codes of several crops.
    target = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert marginal_error(target.expand(2, 5, 4), target).item() == pytest.approx(0.0, abs=1e-6)
    assert marginal_error(uniform, target).item() == pytest.approx(1.5)
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.8, 0.0, 0.1]])
    assert prototype_counts(scores).tolist() == [2, 1, 0]
