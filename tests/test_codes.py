"""Online codes beyond equal partition: relaxed (unbalanced) Sinkhorn and lower-bound dual codes."""
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

from stream_swav.codes import (CodesState, annealed_lambda, compute_codes, floor_mixture, global_prototype_mass,
                               lower_bound_codes, project_to_floor, relaxed_sinkhorn, relaxed_target)
from stream_swav.config import SwAVConfig
from stream_swav.swav import sinkhorn

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
    mass = codes.double().mean(dim=0)
    assert mass.min().item() >= floor * (1 - 1e-4), f"lightest prototype has {mass.min().item():.3g} < {floor:.3g}"


# --- rows, floor and partition -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sinkhorn", "relaxed", "lower-bound"])
def test_every_code_is_a_distribution(method: str) -> None:
    scores, _ = long_tailed_scores()
    codes, _ = compute_codes({0: scores, 1: scores.flip(0)}, CodesState.init(K), images_seen=0,
                             cfg=swav_cfg(method))
    assert set(codes) == {0, 1}
    for crop_codes in codes.values():
        assert crop_codes.shape == scores.shape and crop_codes.dtype == torch.float32
        assert (crop_codes >= 0).all()
        torch.testing.assert_close(crop_codes.sum(dim=1), torch.ones(scores.shape[0]), atol=1e-5, rtol=0)


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
    cfg = swav_cfg("relaxed", mass_momentum=0.8, relaxed_anneal_images=0)
    state = CodesState.init(K)
    for _ in range(40):
        codes, state = compute_codes({0: scores}, state, images_seen=10_000, cfg=cfg)
        assert_floor(codes[0])
    frequency = torch.bincount(labels, minlength=K).double() / labels.numel()
    # The three frequent concepts split most of the mass in the stream's proportions, far from 1/K each;
    # the 21 rare ones (5% of the stream) keep little more than the floor, not the 21/K of equal partition.
    assert state.mass[0].item() > 8 / K
    head = state.mass[:3].double()
    torch.testing.assert_close(head / head.sum(), frequency[:3] / frequency[:3].sum(), atol=0.02, rtol=0)
    assert state.mass[3:].sum().item() < (K - 3) * FLOOR + 0.05
    assert state.mass.min().item() >= FLOOR * (1 - 1e-4)
    torch.testing.assert_close(state.mass.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_lower_bound_keeps_the_floor_without_equal_partition() -> None:
    scores, _ = long_tailed_scores()
    codes, dual = lower_bound_codes(scores, torch.zeros(K), EPS, FLOOR, dual_step=0.5, iterations=3)
    assert_floor(codes)
    mass = codes.mean(dim=0)
    assert mass[0].item() > 8 / K and mass[1].item() > 4 / K
    assert (dual >= 0).all() and dual.max().item() > 0
    # The frequent prototypes never needed help.
    assert (dual[:3] == 0).all()


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


def test_floor_with_gamma_one_is_equal_partition() -> None:
    scores, _ = long_tailed_scores()
    codes, _ = lower_bound_codes(scores, torch.zeros(K), EPS, 1.0 / K, dual_step=1.0, iterations=3)
    torch.testing.assert_close(codes.mean(dim=0), torch.full((K,), 1.0 / K), atol=1e-5, rtol=0)


def test_relaxed_target_is_the_floored_estimate() -> None:
    estimate = torch.tensor([0.7, 0.2, 0.1, 0.0])
    target = relaxed_target(estimate, 0.05)
    assert target.min().item() >= 0.05 - 1e-7
    torch.testing.assert_close(target.sum(), torch.tensor(1.0))
    assert target[0] > target[1] > target[2] >= target[3]
    torch.testing.assert_close(relaxed_target(torch.full((4,), 0.25), 0.05), torch.full((4,), 0.25))


# --- limits and optimality --------------------------------------------------------------------------------


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_relaxed_with_huge_lambda_is_sinkhorn(iterations: int) -> None:
    scores, _ = long_tailed_scores()
    relaxed = relaxed_sinkhorn(scores, torch.full((K,), 1.0 / K), 1e9, EPS, iterations, floor=0.0)
    torch.testing.assert_close(relaxed, sinkhorn(scores, EPS, iterations), atol=1e-5, rtol=1e-4)
    via_config = compute_codes({0: scores}, CodesState.init(K), images_seen=0,
                               cfg=swav_cfg("relaxed", mass_floor_gamma=0.0, relaxed_lambda_start=1e9,
                                            relaxed_lambda=1e9, sinkhorn_iterations=iterations))[0][0]
    torch.testing.assert_close(via_config, sinkhorn(scores, EPS, iterations), atol=1e-5, rtol=1e-4)


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


def test_lower_bound_without_floor_is_softmax() -> None:
    scores, _ = long_tailed_scores()
    codes, dual = lower_bound_codes(scores, torch.zeros(K), EPS, 0.0, dual_step=0.5, iterations=3)
    torch.testing.assert_close(codes, torch.softmax(scores / EPS, dim=1))
    assert (dual == 0).all()
    # A leftover dual from a run with a floor is released at once.
    codes, dual = lower_bound_codes(scores, torch.full((K,), 0.3), EPS, 0.0, dual_step=0.5, iterations=1)
    torch.testing.assert_close(codes, torch.softmax(scores / EPS, dim=1))
    assert (dual == 0).all()


def test_lower_bound_dual_converges_to_the_kkt_point() -> None:
    scores, _ = long_tailed_scores()
    _, dual = lower_bound_codes(scores, torch.zeros(K), EPS, FLOOR, dual_step=1.0, iterations=200)
    mass = torch.softmax((scores + dual) / EPS, dim=1).mean(dim=0)
    assert (dual >= 0).all()
    assert mass.min().item() >= FLOOR * (1 - 1e-3)
    # Complementary slackness: a prototype with a positive dual sits exactly on the floor.
    bound = dual > 0
    assert bound.any() and (~bound).any()
    torch.testing.assert_close(mass[bound], torch.full_like(mass[bound], FLOOR), atol=1e-3 * FLOOR, rtol=0)


def test_lower_bound_dual_is_carried_and_released() -> None:
    tailed, _ = long_tailed_scores()
    cfg = swav_cfg("lower-bound", dual_step=1.0, sinkhorn_iterations=3)
    state = CodesState.init(K)
    for _ in range(40):
        _, state = compute_codes({0: tailed}, state, images_seen=0, cfg=cfg)
        assert (state.dual >= 0).all()
    # Carried over steps, the dual alone now keeps the floor: the projection has nothing left to do.
    mass = torch.softmax((tailed + state.dual) / EPS, dim=1).mean(dim=0)
    assert mass.min().item() >= FLOOR * (1 - 1e-2)
    assert state.dual.max().item() > 0.1

    balanced = balanced_scores()
    assert torch.softmax(balanced / EPS, dim=1).mean(dim=0).min().item() > FLOOR
    for _ in range(10):
        _, state = compute_codes({0: balanced}, state, images_seen=0, cfg=cfg)
        assert (state.dual >= 0).all()
    assert (state.dual == 0).all()


def test_crops_start_from_the_same_state_and_average() -> None:
    tailed, _ = long_tailed_scores()
    other, _ = long_tailed_scores(seed=5)
    cfg = swav_cfg("lower-bound")
    state = CodesState.init(K)
    codes, new = compute_codes({0: tailed, 1: other}, state, images_seen=0, cfg=cfg)
    swapped, new_swapped = compute_codes({1: other, 0: tailed}, state, images_seen=0, cfg=cfg)
    torch.testing.assert_close(new.dual, new_swapped.dual)
    torch.testing.assert_close(codes[0], swapped[0])
    _, dual_0 = lower_bound_codes(tailed, state.dual, EPS, FLOOR, cfg.dual_step, cfg.sinkhorn_iterations)
    _, dual_1 = lower_bound_codes(other, state.dual, EPS, FLOOR, cfg.dual_step, cfg.sinkhorn_iterations)
    torch.testing.assert_close(new.dual, (dual_0 + dual_1) / 2)
    # The input state is left alone.
    assert (state.dual == 0).all()


def test_queue_rows_take_part_but_only_batch_codes_come_back() -> None:
    scores, _ = long_tailed_scores(batch=64)
    queued, _ = long_tailed_scores(batch=128, seed=7)
    for method in ("sinkhorn", "relaxed", "lower-bound"):
        codes, _ = compute_codes({0: scores}, CodesState.init(K), images_seen=0, cfg=swav_cfg(method),
                                 queue_scores={0: queued})
        assert codes[0].shape == scores.shape
        joint = torch.cat([scores, queued])
        if method == "relaxed":
            expected = relaxed_sinkhorn(joint, torch.full((K,), 1.0 / K), 100.0, EPS, 3, FLOOR)
        elif method == "lower-bound":
            expected, _ = lower_bound_codes(joint, torch.zeros(K), EPS, FLOOR, 0.5, 3)
        else:
            expected = sinkhorn(joint, EPS, 3)
        torch.testing.assert_close(codes[0], expected[:64])


def test_sinkhorn_method_leaves_state_alone() -> None:
    scores, _ = long_tailed_scores()
    state = CodesState.init(K)
    codes, new = compute_codes({0: scores}, state, images_seen=0, cfg=swav_cfg("sinkhorn"))
    assert new is state
    torch.testing.assert_close(codes[0], sinkhorn(scores, EPS, 3))


# --- annealing ------------------------------------------------------------------------------------------


def test_annealed_lambda_endpoints_and_monotonicity() -> None:
    assert annealed_lambda(0, 100.0, 1.0, 1000) == pytest.approx(100.0)
    assert annealed_lambda(1000, 100.0, 1.0, 1000) == 1.0
    assert annealed_lambda(10**9, 100.0, 1.0, 1000) == 1.0
    # Log-linear: halfway is the geometric mean.
    assert annealed_lambda(500, 100.0, 1.0, 1000) == pytest.approx(10.0)
    values = [annealed_lambda(n, 100.0, 1.0, 1000) for n in range(0, 1200, 37)]
    assert all(a > b for a, b in zip(values, values[1:]) if b != 1.0)
    assert all(a >= b for a, b in zip(values, values[1:]))
    rising = [annealed_lambda(n, 0.1, 10.0, 1000) for n in range(0, 1200, 37)]
    assert all(a <= b for a, b in zip(rising, rising[1:]))
    assert annealed_lambda(0, 100.0, 1.0, 0) == 1.0
    for bad in [(-1, 100.0, 1.0, 10), (0, 0.0, 1.0, 10), (0, 100.0, -1.0, 10), (0, 1.0, 1.0, -5)]:
        with pytest.raises(ValueError):
            annealed_lambda(*bad)


def test_relaxed_moves_from_equal_partition_as_lambda_anneals() -> None:
    scores, _ = long_tailed_scores()
    cfg = swav_cfg("relaxed", relaxed_lambda_start=1e4, relaxed_lambda=0.05, relaxed_anneal_images=1000)
    early, _ = compute_codes({0: scores}, CodesState.init(K), images_seen=0, cfg=cfg)
    late, _ = compute_codes({0: scores}, CodesState.init(K), images_seen=1000, cfg=cfg)
    balanced = sinkhorn(scores, EPS, 3)
    assert (early[0].mean(dim=0) - balanced.mean(dim=0)).abs().max().item() < 0.1 / K
    assert late[0].mean(dim=0).max().item() > early[0].mean(dim=0).max().item() + 2 / K


# --- numerics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["relaxed", "lower-bound"])
def test_extreme_scores_stay_finite(method: str) -> None:
    scores, _ = long_tailed_scores()
    scores = scores * 1e4
    scores[:, -1] = -1e4
    cfg = swav_cfg(method, epsilon=0.01)
    state = CodesState.init(K)
    for _ in range(3):
        codes, state = compute_codes({0: scores}, state, images_seen=0, cfg=cfg)
        assert torch.isfinite(codes[0]).all()
        assert torch.isfinite(state.mass).all() and torch.isfinite(state.dual).all()
        torch.testing.assert_close(codes[0].sum(dim=1), torch.ones(scores.shape[0]), atol=1e-5, rtol=0)
        assert_floor(codes[0])


@pytest.mark.parametrize("method", ["relaxed", "lower-bound"])
def test_bf16_scores_under_autocast_give_float32_codes(method: str) -> None:
    scores, _ = long_tailed_scores()
    reference, _ = compute_codes({0: scores.bfloat16().float()}, CodesState.init(K), images_seen=0,
                                 cfg=swav_cfg(method))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        codes, state = compute_codes({0: scores.bfloat16()}, CodesState.init(K), images_seen=0,
                                     cfg=swav_cfg(method))
    assert codes[0].dtype == torch.float32 and state.mass.dtype == torch.float32
    torch.testing.assert_close(codes[0], reference[0])


def test_bad_inputs_are_refused() -> None:
    scores, _ = long_tailed_scores()
    with pytest.raises(ValueError, match="scores must be"):
        relaxed_sinkhorn(scores[0], torch.full((K,), 1.0 / K), 1.0, EPS, 3, FLOOR)
    with pytest.raises(ValueError, match="target_mass"):
        relaxed_sinkhorn(scores, torch.full((K + 1,), 1.0 / K), 1.0, EPS, 3, FLOOR)
    with pytest.raises(ValueError, match="floor"):
        lower_bound_codes(scores, torch.zeros(K), EPS, 2.0 / K, 0.5, 3)
    with pytest.raises(ValueError, match="dual_step"):
        lower_bound_codes(scores, torch.zeros(K), EPS, FLOOR, 1.5, 3)
    with pytest.raises(ValueError, match="iterations"):
        lower_bound_codes(scores, torch.zeros(K), EPS, FLOOR, 0.5, 0)
    with pytest.raises(ValueError, match="crop 0"):
        compute_codes({0: scores[:, :-1]}, CodesState.init(K), images_seen=0, cfg=swav_cfg("relaxed"))
    with pytest.raises(ValueError, match="queue scores"):
        compute_codes({0: scores}, CodesState.init(K), images_seen=0, cfg=swav_cfg("relaxed"),
                      queue_scores={1: scores})
    with pytest.raises(ValueError, match="codes must be one of"):
        compute_codes({0: scores}, CodesState.init(K), images_seen=0, cfg=swav_cfg("balanced"))


# --- state ----------------------------------------------------------------------------------------------


def test_state_round_trips_through_torch_save() -> None:
    scores, _ = long_tailed_scores()
    state = CodesState.init(K)
    for method in ("relaxed", "lower-bound"):
        _, state = compute_codes({0: scores}, state, images_seen=0, cfg=swav_cfg(method))
    assert state.dual.max() > 0 and state.mass.max() > 1.0 / K
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    restored = CodesState.init(K)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.mass, state.mass, rtol=0, atol=0)
    torch.testing.assert_close(restored.dual, state.dual, rtol=0, atol=0)
    # Same state, same next step.
    cfg = swav_cfg("lower-bound")
    a, next_a = compute_codes({0: scores}, state, images_seen=0, cfg=cfg)
    b, next_b = compute_codes({0: scores}, restored, images_seen=0, cfg=cfg)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(next_a.dual, next_b.dual, rtol=0, atol=0)


@pytest.mark.parametrize("bad, message", [
    ({"mass": torch.full((K,), 1.0 / K)}, "dual must be"),
    ({"mass": torch.full((K + 1,), 1.0 / (K + 1)), "dual": torch.zeros(K)}, "mass must be"),
    ({"mass": torch.full((K,), 1.0 / K), "dual": torch.full((K,), -1.0)}, "dual must be finite and >= 0"),
    ({"mass": torch.full((K,), 1.0 / K), "dual": torch.full((K,), math.nan)}, "dual must be finite"),
    ({"mass": torch.full((K,), 2.0 / K), "dual": torch.zeros(K)}, "sum to 1"),
    ({"mass": torch.ones(K, dtype=torch.int64), "dual": torch.zeros(K)}, "float tensor"),
    ([1, 2], "expected a mapping"),
])
def test_bad_state_is_refused_and_changes_nothing(bad: object, message: str) -> None:
    state = CodesState.init(K)
    state.dual = torch.full((K,), 0.5)
    with pytest.raises(ValueError, match=message):
        state.load_state_dict(bad)  # type: ignore[arg-type]
    torch.testing.assert_close(state.mass, torch.full((K,), 1.0 / K))
    torch.testing.assert_close(state.dual, torch.full((K,), 0.5))


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
            "lower_bound": lower_bound_codes(local, torch.zeros(K), EPS, FLOOR, 0.5, 4),
            "mass": global_prototype_mass(local.softmax(dim=1)),
            "projected": project_to_floor(torch.softmax(local / EPS, dim=1), FLOOR),
        }
        for method in ("relaxed", "lower-bound"):
            state = CodesState.init(K)
            for _ in range(3):
                codes, state = compute_codes({0: local, 1: local.flip(1)}, state, images_seen=0,
                                             cfg=swav_cfg(method))
            results[method] = (codes, state.state_dict())
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_distributed_equals_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    world = 2
    context = mp.start_processes(_distributed_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world,
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
    codes, dual = lower_bound_codes(scores, torch.zeros(K), EPS, FLOOR, 0.5, 4)
    torch.testing.assert_close(torch.cat([p["lower_bound"][0] for p in parts]), codes)
    for part in parts:
        torch.testing.assert_close(part["lower_bound"][1], dual)
        torch.testing.assert_close(part["mass"], scores.softmax(dim=1).mean(dim=0))
    torch.testing.assert_close(torch.cat([p["projected"] for p in parts]),
                               project_to_floor(torch.softmax(scores / EPS, dim=1), FLOOR))
    for method in ("relaxed", "lower-bound"):
        state = CodesState.init(K)
        for _ in range(3):
            codes, state = compute_codes({0: scores, 1: scores.flip(1)}, state, images_seen=0, cfg=swav_cfg(method))
        for crop in (0, 1):
            torch.testing.assert_close(torch.cat([p[method][0][crop] for p in parts]), codes[crop])
        for part in parts:
            torch.testing.assert_close(part[method][1]["mass"], state.mass)
            torch.testing.assert_close(part[method][1]["dual"], state.dual)
