"""Online codes for long-tailed streams: alternatives to SwAV's equal partition.

SwAV's Sinkhorn gives every prototype exactly 1/K of each batch. On an
uncurated stream that splits a frequent concept over many prototypes and
pushes rare ones into whatever prototype has room. Two relaxations:

* ``relaxed``: entropic unbalanced transport. The sample marginal stays
  exact (each code sums to 1); the prototype marginal is only pulled, with a
  KL penalty of strength lambda, towards a running estimate of each
  prototype's mass. Lambda is annealed from near-equal partition downwards.
* ``lower-bound``: no partition constraint at all, only a floor: every
  prototype keeps at least gamma/K of the mass. Codes are a softmax of the
  scores shifted by a non-negative per-prototype dual variable, solved by
  dual ascent inside the call and carried from batch to batch (in the
  spirit of CoKe, Qian et al. 2022).

Both end with `project_to_floor`, so the floor holds on the returned codes
even when a few iterations have not yet converged.

Every function is pure (state in, new state out) and runs without autocast in
float32 (float64 stays float64), in log space where exponents could
overflow. Prototype masses are sums over the global batch: when a
``torch.distributed`` process group is up, each process passes its own rows
and the masses are all-reduced, so the result equals one process holding the
concatenated batch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from stream_swav.config import CODES, SwAVConfig
from stream_swav.swav import assignment_codes, exact_dtype, global_logsumexp, global_rows, is_distributed


@torch.no_grad()
def global_prototype_mass(codes: Tensor) -> Tensor:
    """Share of the global batch's mass on each prototype, (K,), from (B_local, K) codes whose rows sum to 1."""
    if codes.dim() != 2 or codes.shape[0] < 1:
        raise ValueError(f"global_prototype_mass: codes must be (B, K) with B >= 1, got {tuple(codes.shape)}")
    with torch.autocast(device_type=codes.device.type, enabled=False):
        dtype = exact_dtype(codes)
        total = codes.to(dtype).sum(dim=0)
        if is_distributed():
            dist.all_reduce(total)
        return total / global_rows(codes.shape[0], total)


def floor_mixture(mass: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """The smallest shared mixture that lifts every prototype's mass to the floor.

    Given masses m (K,) summing to 1 and a floor f <= 1/K, returns (t, r):
    a weight t in [0, 1] and a distribution r over prototypes such that
    (1 - t) * m + t * r >= f everywhere, with t as small as possible
    (t = 0 and r = 0 when m already respects the floor).

    Why this t: for a weight t the prototypes below the floor need
    g(t) = sum_k max(0, f - (1 - t) m_k) of extra mass, and r can supply t.
    g(t) <= t holds iff, for every set A of prototypes,
    |A| f - S_A + t S_A <= t (S_A the mass of A), i.e.
    t >= (|A| f - S_A) / (1 - S_A). For a given size the bound is largest
    for the lightest prototypes, so t is the maximum over j < K of
    (j f - S_j) / (1 - S_j), S_j the sum of the j smallest masses. At that t
    the deficits sum to exactly t and r is their normalised profile.
    Computed in float64: K numbers, and the floor is checked to ~1e-12.
    """
    if mass.dim() != 1 or mass.numel() < 1:
        raise ValueError(f"floor_mixture: mass must be (K,), got shape {tuple(mass.shape)}")
    n_prototypes = mass.numel()
    if not 0.0 <= floor <= (1.0 + 1e-9) / n_prototypes:
        raise ValueError(f"floor_mixture: floor must be in [0, 1/K = {1.0 / n_prototypes:.3g}], got {floor}")
    m = mass.to(torch.float64)
    lightest = torch.sort(m).values.cumsum(dim=0)[:-1]
    sizes = torch.arange(1, n_prototypes, dtype=torch.float64, device=m.device)
    bounds = (sizes * floor - lightest) / (1.0 - lightest).clamp_min(torch.finfo(torch.float64).tiny)
    weight = bounds.amax().clamp(0.0, 1.0) if n_prototypes > 1 else m.new_zeros(())
    deficits = (floor - (1.0 - weight) * m).clamp_min(0.0)
    # Zero deficits (weight 0) give r = 0, which leaves the codes untouched.
    profile = deficits / deficits.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return weight, profile


@torch.no_grad()
def project_to_floor(codes: Tensor, floor: float) -> Tensor:
    """Mix every code with the same small distribution so each prototype gets >= floor of the global mass.

    Rows keep summing to 1; codes already respecting the floor are returned
    unchanged. The mixture (see `floor_mixture`) is computed from the
    all-reduced mass, so every process applies the same one.
    """
    weight, profile = floor_mixture(global_prototype_mass(codes), floor)
    return (1.0 - weight).to(codes.dtype) * codes + (weight * profile).to(codes.dtype)


def annealed_lambda(images_seen: int, start: float, end: float, anneal_images: int) -> float:
    """KL strength for `relaxed` codes: log-linear from `start` to `end` over `anneal_images`, then `end`.

    Geometric, since what matters is lambda relative to epsilon across orders
    of magnitude: equal steps in log lambda are equal steps in how much the
    prototype marginal may move.
    """
    if images_seen < 0:
        raise ValueError(f"annealed_lambda: images_seen must be >= 0, got {images_seen}")
    if not (start > 0 and end > 0 and math.isfinite(start) and math.isfinite(end)):
        raise ValueError(f"annealed_lambda: start and end must be finite and > 0, got {start}, {end}")
    if anneal_images < 0:
        raise ValueError(f"annealed_lambda: anneal_images must be >= 0, got {anneal_images}")
    if images_seen >= anneal_images:
        return end
    progress = images_seen / anneal_images
    return math.exp(math.log(start) + progress * (math.log(end) - math.log(start)))


def _check_scores(name: str, scores: Tensor, epsilon: float, iterations: int) -> None:
    if scores.dim() != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(f"{name}: scores must be (B, K) with B, K >= 1, got shape {tuple(scores.shape)}")
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"{name}: epsilon must be finite and > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"{name}: iterations must be >= 1, got {iterations}")


def _check_prototype_vector(name: str, what: str, vector: Tensor, n_prototypes: int) -> None:
    if vector.shape != (n_prototypes,):
        raise ValueError(f"{name}: {what} must have shape ({n_prototypes},), got {tuple(vector.shape)}")


@torch.no_grad()
def relaxed_sinkhorn(scores: Tensor, target_mass: Tensor, lam: float, epsilon: float, iterations: int,
                     floor: float) -> Tensor:
    """Codes (B, K) from entropic transport with an exact sample marginal and a KL-relaxed prototype marginal.

    With P (K x B_global) the plan and S the scores, it maximises
    <S, P> + epsilon * H(P) - lam * KL(P 1 || target_mass) subject to every
    sample carrying 1/B_global. Stationarity gives P = diag(u) exp(S / epsilon) diag(v)
    and the scaling iterations of Chizat et al. (2018): v makes each sample's
    column sum exactly, u = (target / (G v)) ** (lam / (lam + epsilon)). The
    exponent -> 1 as lam -> inf, which is SwAV's Sinkhorn (towards the
    target); smaller lam lets a prototype's mass follow the data.
    Afterwards `project_to_floor` lifts any prototype still below `floor`.

    target_mass: (K,) positive, summing to 1 (see `relaxed_target`).
    """
    _check_scores("relaxed_sinkhorn", scores, epsilon, iterations)
    _check_prototype_vector("relaxed_sinkhorn", "target_mass", target_mass, scores.shape[1])
    if not lam > 0:
        raise ValueError(f"relaxed_sinkhorn: lam must be > 0, got {lam}")
    exponent = 1.0 if math.isinf(lam) else lam / (lam + epsilon)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        dtype = exact_dtype(scores)
        log_kernel = scores.to(dtype).t() / epsilon  # (K, B)
        log_target = target_mass.to(device=scores.device, dtype=dtype).clamp_min(torch.finfo(dtype).tiny)
        log_target = log_target.log().unsqueeze(1)  # (K, 1)
        log_sample_mass = -global_rows(scores.shape[0], log_kernel).log()
        log_v = log_sample_mass.expand(1, scores.shape[0])
        for step in range(iterations):
            log_u = exponent * (log_target - global_logsumexp(log_kernel + log_v, dim=1))
            if step + 1 < iterations:
                # Columns live entirely on this process: no communication.
                log_v = log_sample_mass - torch.logsumexp(log_kernel + log_u, dim=0, keepdim=True)
        # The final v would normalise each column to 1/B; rescaled by B that is a softmax over prototypes.
        codes = torch.softmax((log_kernel + log_u).t(), dim=1)
        return project_to_floor(codes, floor)


@torch.no_grad()
def relaxed_target(mass_ema: Tensor, floor: float) -> Tensor:
    """The prototype marginal `relaxed` aims at: the mass estimate, lifted to the floor and normalised."""
    mass = mass_ema.to(torch.float64).clamp_min(0.0)
    mass = mass / mass.sum().clamp_min(torch.finfo(torch.float64).tiny)
    weight, profile = floor_mixture(mass, floor)
    return ((1.0 - weight) * mass + weight * profile).to(mass_ema.dtype)


@torch.no_grad()
def lower_bound_codes(scores: Tensor, dual: Tensor, epsilon: float, floor: float, dual_step: float,
                      iterations: int) -> tuple[Tensor, Tensor]:
    """Codes (B, K) with every prototype's global mass >= floor and no other constraint, and the new dual (K,).

    The problem: maximise sum_b <q_b, s_b> + epsilon * H(q_b) over codes q_b
    in the simplex, subject to m_k = mean_b q_bk >= floor. With a multiplier
    mu_k >= 0 per constraint the maximiser is q_b = softmax((s_b + mu) / epsilon):
    a starving prototype gets its scores raised by mu_k, and mu_k = 0 where
    the floor is slack (complementary slackness).

    The dual is minimised over mu >= 0; its gradient is m(mu) - floor, so
    plain projected ascent reads mu <- max(0, mu + eta (floor - m)). But the
    masses are O(1/K) and span orders of magnitude, so no single eta fits.
    Holding the per-sample normalisers fixed, m_k scales as exp(mu_k / epsilon),
    so the exact minimiser in mu_k is mu_k + epsilon * log(floor / m_k),
    clipped at 0 -- the Sinkhorn step for an inequality constraint. We take
    mu <- max(0, mu + dual_step * epsilon * (log floor - log m)): the
    gradient step preconditioned by the dual's curvature epsilon / m_k
    (to first order, epsilon * log(f / m) = epsilon * (f - m) / m), exact
    at dual_step = 1 and damped below it, which averages mu over batches
    when it is carried from step to step. Masses are taken in log space, so
    a prototype with no mass at all (m = exp(-1e6)) gets a finite step.

    `iterations` rounds of (codes, masses, dual) run in the call; the codes
    returned use the final dual and then go through `project_to_floor`, which
    only acts while the dual has not caught up. dual: (K,) >= 0, in score units.

    Beware: under the swapped-prediction loss, constant features are an optimum.
    Their codes are the floor distribution, and predicting it costs only its
    entropy, which is far below ln K unless gamma is close to 1 (README, long-tail results).
    """
    _check_scores("lower_bound_codes", scores, epsilon, iterations)
    _check_prototype_vector("lower_bound_codes", "dual", dual, scores.shape[1])
    if not 0 < dual_step <= 1:
        raise ValueError(f"lower_bound_codes: dual_step must be in (0, 1], got {dual_step}")
    n_prototypes = scores.shape[1]
    if not 0.0 <= floor <= (1.0 + 1e-9) / n_prototypes:
        raise ValueError(f"lower_bound_codes: floor must be in [0, 1/K = {1.0 / n_prototypes:.3g}], got {floor}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        dtype = exact_dtype(scores)
        logits = scores.to(dtype) / epsilon
        mu = dual.to(device=scores.device, dtype=dtype)
        log_rows = global_rows(scores.shape[0], logits).log()
        # log 0 = -inf drives every mu to its lower bound 0: gamma = 0 is plain softmax.
        log_floor = math.log(floor) if floor > 0 else -math.inf
        for _ in range(iterations):
            log_codes = torch.log_softmax(logits + mu / epsilon, dim=1)
            log_mass = global_logsumexp(log_codes, dim=0).squeeze(0) - log_rows
            mu = (mu + dual_step * epsilon * (log_floor - log_mass)).clamp_min(0.0)
        codes = project_to_floor(torch.softmax(logits + mu / epsilon, dim=1), floor)
        return codes, mu.to(dual.dtype)


@dataclass
class CodesState:
    """What `relaxed` and `lower-bound` carry from step to step; identical on every learner.

    mass: (K,) running estimate of each prototype's share of the stream (sums
    to 1); `relaxed` aims at it and updates it.
    dual: (K,) >= 0 lower-bound multipliers in score units; `lower-bound` uses
    and updates it. Each method leaves the other's field as it was.
    """

    mass: Tensor
    dual: Tensor

    @classmethod
    def init(cls, n_prototypes: int, device: torch.device | str | None = None) -> CodesState:
        if n_prototypes < 1:
            raise ValueError(f"CodesState.init: n_prototypes must be >= 1, got {n_prototypes}")
        return cls(mass=torch.full((n_prototypes,), 1.0 / n_prototypes, device=device),
                   dual=torch.zeros(n_prototypes, device=device))

    def state_dict(self) -> dict[str, Tensor]:
        return {"mass": self.mass.detach().cpu().clone(), "dual": self.dual.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Replace mass and dual with saved ones; everything is checked before anything changes."""
        if not isinstance(state, Mapping):
            raise ValueError(f"CodesState.load_state_dict: expected a mapping, got {type(state).__name__}")
        n_prototypes = self.mass.shape[0]
        loaded = {}
        for key in ("mass", "dual"):
            value = state.get(key)
            if not isinstance(value, Tensor) or value.shape != (n_prototypes,) or not value.is_floating_point():
                found = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"CodesState.load_state_dict: {key} must be a float tensor of shape "
                                 f"({n_prototypes},), got {found}")
            if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                raise ValueError(f"CodesState.load_state_dict: {key} must be finite and >= 0")
            loaded[key] = value
        total = float(loaded["mass"].double().sum())
        if abs(total - 1.0) > 1e-3:
            raise ValueError(f"CodesState.load_state_dict: mass must sum to 1, got {total:.6g}")
        self.mass = loaded["mass"].to(device=self.mass.device, dtype=self.mass.dtype).clone()
        self.dual = loaded["dual"].to(device=self.dual.device, dtype=self.dual.dtype).clone()


@torch.no_grad()
def compute_codes(scores: Mapping[int, Tensor], state: CodesState, *, images_seen: int, cfg: SwAVConfig,
                  queue_scores: Mapping[int, Tensor] | None = None) -> tuple[dict[int, Tensor], CodesState]:
    """Codes for every assignment crop with the method `cfg.codes`, and the state for the next step.

    scores: assignment crop -> its (B, K) scores on this process.
    queue_scores: assignment crop -> (N, K) scores of its queued features, or
    None; when given, the codes are solved on batch and queue together (as
    SwAV's queue does) and only the batch rows are returned; the floor and
    the masses then refer to batch and queue together.
    images_seen: images consumed before this batch (drives lambda's annealing).

    Every crop starts from the same `state`; the new state averages what the
    crops observed, so the order of crops does not matter. The input state is
    not modified. Keep the new state only when the step's loss is finite.
    """
    if cfg.codes not in CODES:
        raise ValueError(f"compute_codes: codes must be one of {', '.join(CODES)}, got {cfg.codes!r}")
    if not scores:
        raise ValueError("compute_codes: no assignment crops given")
    if queue_scores is not None and set(queue_scores) != set(scores):
        raise ValueError(f"compute_codes: queue scores for crops {sorted(queue_scores)} do not match "
                         f"assignment crops {sorted(scores)}")
    if cfg.codes == "sinkhorn":
        codes = {crop: assignment_codes(s, None if queue_scores is None else queue_scores[crop], cfg.epsilon,
                                        cfg.sinkhorn_iterations) for crop, s in scores.items()}
        return codes, state

    n_prototypes = state.mass.shape[0]
    floor = cfg.mass_floor_gamma / n_prototypes
    if cfg.codes == "relaxed":
        lam = annealed_lambda(images_seen, cfg.relaxed_lambda_start, cfg.relaxed_lambda, cfg.relaxed_anneal_images)
        target = relaxed_target(state.mass, floor)
    codes: dict[int, Tensor] = {}
    observed = []
    for crop, crop_scores in scores.items():
        if crop_scores.dim() != 2 or crop_scores.shape[1] != n_prototypes:
            raise ValueError(f"compute_codes: scores for crop {crop} must be (B, {n_prototypes}), "
                             f"got {tuple(crop_scores.shape)}")
        joint = crop_scores
        if queue_scores is not None:
            queued = queue_scores[crop]
            if queued.dim() != 2 or queued.shape[1] != n_prototypes:
                raise ValueError(f"compute_codes: queue scores for crop {crop} must be (N, {n_prototypes}), "
                                 f"got {tuple(queued.shape)}")
            dtype = exact_dtype(crop_scores)
            joint = torch.cat([crop_scores.to(dtype), queued.to(dtype)])
        if cfg.codes == "relaxed":
            joint_codes = relaxed_sinkhorn(joint, target, lam, cfg.epsilon, cfg.sinkhorn_iterations, floor)
            observed.append(global_prototype_mass(joint_codes))
        else:
            joint_codes, dual = lower_bound_codes(joint, state.dual, cfg.epsilon, floor, cfg.dual_step,
                                                  cfg.sinkhorn_iterations)
            observed.append(dual)
        codes[crop] = joint_codes[: crop_scores.shape[0]]

    mean_observed = torch.stack(observed).mean(dim=0)
    if cfg.codes == "relaxed":
        batch_mass = mean_observed.to(device=state.mass.device, dtype=state.mass.dtype)
        mass = cfg.mass_momentum * state.mass + (1.0 - cfg.mass_momentum) * batch_mass
        return codes, CodesState(mass=mass, dual=state.dual)
    return codes, CodesState(mass=state.mass, dual=mean_observed.to(device=state.dual.device,
                                                                      dtype=state.dual.dtype))


__all__ = ["CodesState", "compute_codes", "relaxed_sinkhorn", "relaxed_target", "lower_bound_codes",
           "annealed_lambda", "project_to_floor", "floor_mixture", "global_prototype_mass"]
