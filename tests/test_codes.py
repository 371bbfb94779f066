"""Online code methods: sinkhorn, prior (power-law marginal) and relaxed (unbalanced Sinkhorn)."""
from __future__ import annotations

import dataclasses
import io
import math
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from stream_swav.codes import (RelaxedCodes, annealed_lambda, build_codes, floor_mixture,
                               global_prototype_mass, power_law_marginal, project_to_floor, relaxed_sinkhorn,
                               relaxed_target)
from stream_swav.config import CODES, SwAVConfig
from stream_swav.swav import sinkhorn
from conftest import free_port

K = 24
GAMMA = 0.2
FLOOR = GAMMA / K
EPS = 0.05


def long_tailed_scores(batch: int = 192, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores of a batch where 3 of K concepts make up 95% of the samples; also the concept labels."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(K, 16, generator=generator), dim=1)
    frequencies = torch.tensor([0.5, 0.3, 0.15] + [0.05 / (K - 3)] * (K - 3))
    labels = torch.multinomial(frequencies, batch, replacement=True, generator=generator)
    noise = 0.3 * F.normalize(torch.randn(batch, 16, generator=generator), dim=1)
    return F.normalize(prototypes[labels] + noise, dim=1) @ prototypes.t(), labels


def balanced_scores(batch: int = 192, seed: int = 1) -> torch.Tensor:
    """Every concept equally frequent."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(K, 16, generator=generator), dim=1)
    labels = torch.arange(batch) % K
    noise = 0.3 * F.normalize(torch.randn(batch, 16, generator=generator), dim=1)
    return F.normalize(prototypes[labels] + noise, dim=1) @ prototypes.t()


def swav_cfg(codes: str, **overrides: object) -> SwAVConfig:
    return dataclasses.replace(SwAVConfig(codes=codes, epsilon=EPS, mass_floor_gamma=GAMMA), **overrides)


def assert_floor(codes: torch.Tensor, floor: float = FLOOR) -> None:
    mass = codes.double().reshape(-1, codes.shape[-1]).mean(dim=0)
    assert mass.min().item() >= floor * (1 - 1e-4), f"lightest prototype has {mass.min().item():.3g} < {floor:.3g}"


def step(method, scores: torch.Tensor, queued: torch.Tensor | None = None, images_seen: int = 0) -> torch.Tensor:
    """One step of a method on (B, K) scores of one assignment crop, committed; the (B, K) codes."""
    codes = method.assign(scores.unsqueeze(0), None if queued is None else queued.unsqueeze(0), images_seen)
    method.commit()
    return codes[0]


# --- every method ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", CODES)
def test_sample_weights_move_the_codes_and_unit_weights_do_not(method: str) -> None:
    """Concept balance's weights set each sample's share of the mass in every method (with a queue
    too, whose rows weigh 1); codes stay distributions."""
    scores, _ = long_tailed_scores()
    both = torch.stack([scores, scores.flip(0)])
    queued = both[:, :32]
    plain = build_codes(swav_cfg(method), K).assign(both, queued, images_seen=0)
    ones = build_codes(swav_cfg(method), K).assign(both, queued, 0, torch.ones(scores.shape[0]))
    torch.testing.assert_close(ones, plain)
    weights = torch.linspace(0.2, 1.8, scores.shape[0])
    weighted = build_codes(swav_cfg(method), K).assign(both, queued, 0, weights)
    torch.testing.assert_close(weighted.sum(dim=2), torch.ones(2, scores.shape[0]), atol=1e-5, rtol=0)
    assert not torch.allclose(weighted, plain, atol=1e-3)


def test_relaxed_codes_follow_the_weighted_mass_of_their_plan():
    """With sample weights the running mass that the relaxed target follows is the weighted plan's
    (each code counted by its weight), not the stream's."""
    scores, _ = long_tailed_scores()
    weights = torch.linspace(0.2, 1.8, scores.shape[0])
    method = build_codes(swav_cfg("relaxed"), K)
    before = method.mass.clone()
    codes = method.assign(scores.unsqueeze(0), None, 0, weights)
    method.commit()
    momentum = method.cfg.mass_momentum
    expected = momentum * before + (1 - momentum) * global_prototype_mass(codes[0], weights)
    torch.testing.assert_close(method.mass, expected, rtol=0, atol=1e-7)
    # The two masses differ well beyond that tolerance, so the check above tells them apart.
    observed, unweighted = global_prototype_mass(codes[0], weights), global_prototype_mass(codes[0])
    assert (observed - unweighted).abs().max() > 1e-3
    assert (expected - (momentum * before + (1 - momentum) * unweighted)).abs().max() > 1e-5
    one_hot = F.one_hot(torch.tensor([0, 0, 0, 1]), 2).float()
    torch.testing.assert_close(global_prototype_mass(one_hot, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])),
                               torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("method", CODES)
def test_every_code_is_a_distribution(method: str) -> None:
    scores, _ = long_tailed_scores()
    both = torch.stack([scores, scores.flip(0)])
    codes = build_codes(swav_cfg(method), K).assign(both, None, images_seen=0)
    assert codes.shape == both.shape and codes.dtype == torch.float32
    assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=2), torch.ones(2, scores.shape[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", CODES)
def test_queue_rows_take_part_but_only_batch_codes_come_back(method: str) -> None:
    scores, _ = long_tailed_scores(batch=64)
    queued, _ = long_tailed_scores(batch=128, seed=7)
    with_queue = step(build_codes(swav_cfg(method), K), scores, queued)
    alone = step(build_codes(swav_cfg(method), K), torch.cat([scores, queued]))
    assert with_queue.shape == scores.shape
    torch.testing.assert_close(with_queue, alone[:64])


@pytest.mark.parametrize("method", ["relaxed"])
def test_state_moves_only_on_commit_and_crop_order_does_not_matter(method: str) -> None:
    tailed, _ = long_tailed_scores()
    other, _ = long_tailed_scores(seed=5)
    first = build_codes(swav_cfg(method), K)
    before = first.state_dict()
    codes = first.assign(torch.stack([tailed, other]), None, images_seen=0)
    # An uncommitted step (a non-finite loss) leaves the carried state as it was.
    for key, value in first.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    first.commit()
    second = build_codes(swav_cfg(method), K)
    swapped = second.assign(torch.stack([other, tailed]), None, images_seen=0)
    second.commit()
    torch.testing.assert_close(codes, swapped.flip(0))
    for key, value in first.state_dict().items():
        torch.testing.assert_close(value, second.state_dict()[key])
        assert not torch.equal(value, before[key])


@pytest.mark.parametrize("method", ["prior", "relaxed"])
def test_bf16_scores_under_autocast_give_float32_codes(method: str) -> None:
    scores, _ = long_tailed_scores()
    reference = step(build_codes(swav_cfg(method), K), scores.bfloat16().float())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        codes = step(build_codes(swav_cfg(method), K), scores.bfloat16())
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes, reference)


@pytest.mark.parametrize("method", ["prior", "relaxed"])
def test_extreme_scores_stay_finite(method: str) -> None:
    scores, _ = long_tailed_scores()
    scores = scores * 1e4
    scores[:, -1] = -1e4
    codes_method = build_codes(swav_cfg(method, epsilon=0.01), K)
    for _ in range(3):
        codes = step(codes_method, scores)
        assert torch.isfinite(codes).all()
        assert all(torch.isfinite(v).all() for v in codes_method.state_dict().values())
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(scores.shape[0]), atol=1e-5, rtol=0)


# --- sinkhorn and prior ---------------------------------------------------------------------------------


def test_sinkhorn_method_is_plain_sinkhorn_and_carries_nothing() -> None:
    scores, _ = long_tailed_scores()
    method = build_codes(swav_cfg("sinkhorn"), K)
    torch.testing.assert_close(step(method, scores), sinkhorn(scores, EPS, 3))
    assert method.state_dict() == {}


def test_prior_codes_follow_the_power_law_marginal() -> None:
    scores = balanced_scores()
    target = power_law_marginal(K, 0.5)
    assert target[0] > target[1] > target[-1] and target.sum().item() == pytest.approx(1.0)
    assert (target[0] / target[-1]).item() == pytest.approx(math.sqrt(K))
    codes = step(build_codes(swav_cfg("prior", prior_exponent=0.5, epsilon=0.5, sinkhorn_iterations=200), K), scores)
    torch.testing.assert_close(codes.double().mean(dim=0), target, atol=1e-4, rtol=0)
    # Exponent 0 is equal partition, i.e. SwAV's Sinkhorn.
    flat = step(build_codes(swav_cfg("prior", prior_exponent=0.0), K), scores)
    torch.testing.assert_close(flat, sinkhorn(scores, EPS, 3))


# --- relaxed --------------------------------------------------------------------------------------------


def test_relaxed_keeps_the_floor_without_equal_partition() -> None:
    scores, _ = long_tailed_scores()
    # Without a floor, the rare prototypes would starve: that is what the floor has to fix.
    plain = relaxed_sinkhorn(scores, torch.full((K,), 1.0 / K), 0.1, EPS, 3, floor=0.0)
    assert plain.mean(dim=0).min().item() < 0.5 * FLOOR
    codes = relaxed_sinkhorn(scores, torch.full((K,), 1.0 / K), 0.1, EPS, 3, floor=FLOOR)
    assert_floor(codes)
    mass = codes.mean(dim=0)
    assert mass[0].item() > 2.5 / K
    # The projection only lifts: prototypes above the floor keep most of what they had.
    assert (mass[:3] >= 0.9 * plain.mean(dim=0)[:3]).all()


def test_relaxed_mass_estimate_follows_the_stream() -> None:
    scores, labels = long_tailed_scores()
    method = build_codes(swav_cfg("relaxed", mass_momentum=0.8, relaxed_anneal_images=0), K)
    assert isinstance(method, RelaxedCodes)
    for _ in range(40):
        assert_floor(step(method, scores, images_seen=10_000))
    frequency = torch.bincount(labels, minlength=K).double() / labels.numel()
    # The three frequent concepts split most of the mass in the stream's proportions, far from 1/K each;
    # the 21 rare ones (5% of the stream) keep little more than the floor, not the 21/K of equal partition.
    mass = method.mass
    assert mass[0].item() > 8 / K
    head = mass[:3].double()
    torch.testing.assert_close(head / head.sum(), frequency[:3] / frequency[:3].sum(), atol=0.02, rtol=0)
    assert mass[3:].sum().item() < (K - 3) * FLOOR + 0.05
    assert mass.min().item() >= FLOOR * (1 - 1e-4)
    torch.testing.assert_close(mass.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_floor_mixture_is_the_smallest_that_lifts_everyone() -> None:
    mass = torch.tensor([0.0, 0.01, 0.09, 0.3, 0.6])
    floor = 0.1
    weight, profile = floor_mixture(mass, floor)
    lifted = (1 - weight) * mass.double() + weight * profile
    assert lifted.min().item() >= floor - 1e-12
    torch.testing.assert_close(lifted.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(profile.sum(), torch.tensor(1.0, dtype=torch.float64))
    # Any smaller weight leaves some prototype below the floor, whatever distribution is mixed in.
    smaller = weight.item() * 0.99
    needed = (floor - (1 - smaller) * mass.double()).clamp_min(0).sum().item()
    assert needed > smaller
    # Nothing to lift: nothing changes.
    weight, profile = floor_mixture(torch.full((5,), 0.2), floor)
    assert weight.item() == 0 and (profile == 0).all()


def test_relaxed_target_is_the_floored_estimate() -> None:
    estimate = torch.tensor([0.7, 0.2, 0.1, 0.0])
    target = relaxed_target(estimate, 0.05)
    assert target.min().item() >= 0.05 - 1e-7
    torch.testing.assert_close(target.sum(), torch.tensor(1.0))
    assert target[0] > target[1] > target[2] >= target[3]
    torch.testing.assert_close(relaxed_target(torch.full((4,), 0.25), 0.05), torch.full((4,), 0.25))


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_relaxed_with_huge_lambda_is_sinkhorn(iterations: int) -> None:
    scores, _ = long_tailed_scores()
    relaxed = relaxed_sinkhorn(scores, torch.full((K,), 1.0 / K), 1e9, EPS, iterations, floor=0.0)
    torch.testing.assert_close(relaxed, sinkhorn(scores, EPS, iterations), atol=1e-5, rtol=1e-4)
    method = build_codes(swav_cfg("relaxed", mass_floor_gamma=0.0, relaxed_lambda_start=1e9, relaxed_lambda=1e9,
                                  sinkhorn_iterations=iterations), K)
    torch.testing.assert_close(step(method, scores), sinkhorn(scores, EPS, iterations), atol=1e-5, rtol=1e-4)


def test_relaxed_solves_the_unbalanced_problem() -> None:
    """At convergence the codes minimise -<S,P> - eps H(P) + lam KL(P1 | a) with exact sample marginals."""
    generator = torch.Generator().manual_seed(3)
    batch, prototypes, lam = 10, 4, 0.2
    scores = torch.randn(batch, prototypes, generator=generator, dtype=torch.float64)
    target = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    codes = relaxed_sinkhorn(scores, target, lam, 0.5, 300, floor=0.0)

    def objective(q: torch.Tensor) -> torch.Tensor:
        plan = q / batch
        mass = plan.sum(dim=0)
        return (-(scores * plan).sum() + 0.5 * torch.special.xlogy(plan, plan).sum()
                + lam * (mass * (mass / target).log()).sum())

    logits = torch.zeros(batch, prototypes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = objective(torch.softmax(logits, dim=1))
        value.backward()
        return value

    optimizer.step(closure)
    torch.testing.assert_close(codes, torch.softmax(logits, dim=1).detach(), atol=1e-5, rtol=0)
    # Not the balanced answer: the prototype marginal moved.
    assert (codes.mean(dim=0) - 0.25).abs().max().item() > 0.05


def test_annealed_lambda_endpoints_and_monotonicity() -> None:
    assert annealed_lambda(0, 100.0, 1.0, 1000) == pytest.approx(100.0)
    assert annealed_lambda(1000, 100.0, 1.0, 1000) == 1.0
    assert annealed_lambda(10**9, 100.0, 1.0, 1000) == 1.0
    # Log-linear: halfway is the geometric mean.
    assert annealed_lambda(500, 100.0, 1.0, 1000) == pytest.approx(10.0)
    values = [annealed_lambda(n, 100.0, 1.0, 1000) for n in range(0, 1200, 37)]
    assert all(a > b for a, b in zip(values, values[1:]) if b != 1.0)
    rising = [annealed_lambda(n, 0.1, 10.0, 1000) for n in range(0, 1200, 37)]
    assert all(a <= b for a, b in zip(rising, rising[1:]))
    assert annealed_lambda(0, 100.0, 1.0, 0) == 1.0


def test_relaxed_moves_from_equal_partition_as_lambda_anneals() -> None:
    scores, _ = long_tailed_scores()
    cfg = swav_cfg("relaxed", relaxed_lambda_start=1e4, relaxed_lambda=0.05, relaxed_anneal_images=1000)
    early = step(build_codes(cfg, K), scores, images_seen=0)
    late = step(build_codes(cfg, K), scores, images_seen=1000)
    balanced = sinkhorn(scores, EPS, 3)
    assert (early.mean(dim=0) - balanced.mean(dim=0)).abs().max().item() < 0.1 / K
    assert late.mean(dim=0).max().item() > early.mean(dim=0).max().item() + 2 / K


# --- state ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["relaxed"])
def test_state_round_trips_through_torch_save(method: str) -> None:
    scores, _ = long_tailed_scores()
    codes_method = build_codes(swav_cfg(method), K)
    for _ in range(3):
        step(codes_method, scores)
    buffer = io.BytesIO()
    torch.save(codes_method.state_dict(), buffer)
    buffer.seek(0)
    restored = build_codes(swav_cfg(method), K)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    # Same state, same next step.
    torch.testing.assert_close(step(restored, scores), step(codes_method, scores), rtol=0, atol=0)
    for key, value in codes_method.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("method, bad, message", [
    ("relaxed", {"mass": None}, "mass must be"),  # no mass at all is another method's state: see test_learner
    ("relaxed", {"mass": torch.full((K + 1,), 1.0 / (K + 1))}, "mass must be"),
    ("relaxed", {"mass": torch.full((K,), 2.0 / K)}, "sum to 1"),
    ("relaxed", {"mass": torch.ones(K, dtype=torch.int64)}, "float tensor"),
    ("relaxed", {"mass": torch.full((K,), -1.0 / K)}, "mass must be finite and >= 0"),
    ("relaxed", {"mass": torch.full((K,), math.nan)}, "mass must be finite"),
])
def test_bad_state_is_refused_and_changes_nothing(method: str, bad: dict, message: str) -> None:
    codes_method = build_codes(swav_cfg(method), K)
    before = codes_method.state_dict()
    with pytest.raises(ValueError, match=message):
        codes_method.load_state_dict(bad)
    for key, value in codes_method.state_dict().items():
        torch.testing.assert_close(value, before[key])


# --- distributed ----------------------------------------------------------------------------------------


def _distributed_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        scores, _ = long_tailed_scores()
        rows = scores.shape[0] // world
        local = scores[rank * rows:(rank + 1) * rows]
        results = {
            "relaxed_sinkhorn": relaxed_sinkhorn(local, relaxed_target(torch.linspace(1, 2, K), FLOOR), 0.5, EPS,
                                                 4, FLOOR),
            "mass": global_prototype_mass(local.softmax(dim=1)),
            "projected": project_to_floor(torch.softmax(local / EPS, dim=1), FLOOR),
        }
        for method in CODES:
            codes_method = build_codes(swav_cfg(method), K)
            for _ in range(3):
                codes = codes_method.assign(torch.stack([local, local.flip(1)]), None, images_seen=0)
                codes_method.commit()
            results[method] = (codes, codes_method.state_dict())
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



def test_distributed_equals_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    world = 2
    context = mp.start_processes(_distributed_worker, args=(world, free_port(), str(tmp_path)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "distributed workers did not finish in 120 s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    scores, _ = long_tailed_scores()
    relaxed = relaxed_sinkhorn(scores, relaxed_target(torch.linspace(1, 2, K), FLOOR), 0.5, EPS, 4, FLOOR)
    torch.testing.assert_close(torch.cat([p["relaxed_sinkhorn"] for p in parts]), relaxed)
    for part in parts:
        torch.testing.assert_close(part["mass"], scores.softmax(dim=1).mean(dim=0))
    torch.testing.assert_close(torch.cat([p["projected"] for p in parts]),
                               project_to_floor(torch.softmax(scores / EPS, dim=1), FLOOR))
    for method in CODES:
        codes_method = build_codes(swav_cfg(method), K)
        for _ in range(3):
            codes = codes_method.assign(torch.stack([scores, scores.flip(1)]), None, images_seen=0)
            codes_method.commit()
        torch.testing.assert_close(torch.cat([p[method][0] for p in parts], dim=1), codes)
        for part in parts:
            for key, value in codes_method.state_dict().items():
                torch.testing.assert_close(part[method][1][key], value)
