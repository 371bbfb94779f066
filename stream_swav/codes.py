"""Online codes: how each batch's assignment crops are mapped to prototypes, one object per method.

SwAV's Sinkhorn gives every prototype exactly 1/K of each batch. On an
uncurated, long-tailed stream that splits a frequent concept over many
prototypes and pushes rare ones into whatever prototype has room. The methods
(`swav.codes`):

* ``sinkhorn``: SwAV's equal partition.
* ``prior``: Sinkhorn towards a fixed power-law prototype marginal,
  t_k proportional to (k + 1) ** -prior_exponent (as PMSN matches a power-law
  prior, Assran et al. 2023): some prototypes may hold many times the mass of
  others, at no extra cost per step.
* ``relaxed``: entropic unbalanced transport. The sample marginal stays
  exact (each code sums to 1); the prototype marginal is only pulled, with a
  KL penalty of strength lambda, towards a running estimate of each
  prototype's mass, then lifted to a floor of gamma/K. Lambda is annealed
  from near-equal partition downwards.

A method with only a lower bound on each prototype's mass is not offered: under
the swapped loss a network with constant features then pays only the entropy
of the floor distribution, far below ln K, and every such run collapsed (soft
codes with a dual, and CoKe-style hard codes with a dual carried over the
stream; CoKe itself avoids it with labels from the previous epoch, which an
endless stream does not have). README, "Long-tailed streams", has the figures.

Each method is a small object that owns the state it carries between steps
(as DINO's loss owns its centre): `assign` computes codes for the (A, B, K)
scores of the A assignment crops, with an optional (A, N, K) block of queued
scores solved together with the batch (only batch rows come back) and optional
sample weights (B,) (concept balance: a sample's share of the prototypes' mass
follows its weight, queued rows weighing 1), and holds
the state update it implies; `commit` keeps that update once the step turned
out finite. Every crop starts from the same state and the update averages what
the crops observed, so crop order does not matter.

Everything runs without autocast in float32 (float64 stays float64), in log
space where exponents could overflow. Prototype masses are sums over the
global batch: under a ``torch.distributed`` process group each process passes
its own rows and the masses are all-reduced, so the result equals one process
holding the concatenated batch, and the carried state stays identical on
every rank.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from stream_swav.config import SwAVConfig
from stream_swav.swav import exact_dtype, global_logsumexp, is_distributed, log_sample_mass, sinkhorn


def with_queue(scores: Tensor, queued: Tensor | None) -> Tensor:
    """(A, B, K) batch scores followed by (A, N, K) queued ones along the rows: (A, B + N, K)."""
    if queued is None:
        return scores
    if queued.dim() != 3 or queued.shape[0] != scores.shape[0] or queued.shape[2] != scores.shape[2]:
        raise ValueError(f"queued scores {tuple(queued.shape)} do not match batch scores {tuple(scores.shape)}")
    dtype = exact_dtype(scores)
    return torch.cat([scores.to(dtype), queued.to(dtype)], dim=1)


def joint_weights(weights: Tensor | None, rows: int) -> Tensor | None:
    """The batch's sample weights (B,) followed by 1 for each queued row, (rows,); None stays None."""
    if weights is None:
        return None
    return torch.cat([weights, weights.new_ones(rows - len(weights))])


@torch.no_grad()
def global_prototype_mass(codes: Tensor, weights: Tensor | None = None) -> Tensor:
    """Share of the global batch's mass on each prototype, (K,), from (B_local, K) codes whose rows
    sum to 1, each row carrying its share of `weights` (B_local,) when given (concept balance)."""
    if codes.dim() != 2 or codes.shape[0] < 1:
        raise ValueError(f"global_prototype_mass: codes must be (B, K) with B >= 1, got {tuple(codes.shape)}")
    with torch.autocast(device_type=codes.device.type, enabled=False):
        dtype = exact_dtype(codes)
        rows = codes.to(dtype)
        if weights is not None:
            rows = rows * weights.to(device=rows.device, dtype=dtype).unsqueeze(1)
        total = rows.sum(dim=0)
        if is_distributed():
            dist.all_reduce(total)
        return total / total.sum().clamp_min(torch.finfo(dtype).tiny)


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
def project_to_floor(codes: Tensor, floor: float, weights: Tensor | None = None) -> Tensor:
    """Mix every code with the same small distribution so each prototype gets >= floor of the global mass.

    Rows keep summing to 1; codes already respecting the floor are returned
    unchanged. The mixture (see `floor_mixture`) is computed from the
    all-reduced mass, so every process applies the same one.
    """
    weight, profile = floor_mixture(global_prototype_mass(codes, weights), floor)
    return (1.0 - weight).to(codes.dtype) * codes + (weight * profile).to(codes.dtype)


def annealed_lambda(images_seen: int, start: float, end: float, anneal_images: int) -> float:
    """KL strength for `relaxed` codes: log-linear from `start` to `end` over `anneal_images`, then `end`.

    Geometric, since what matters is lambda relative to epsilon across orders
    of magnitude: equal steps in log lambda are equal steps in how much the
    prototype marginal may move.
    """
    if images_seen >= anneal_images:
        return end
    progress = images_seen / anneal_images
    return math.exp(math.log(start) + progress * (math.log(end) - math.log(start)))


@torch.no_grad()
def relaxed_sinkhorn(scores: Tensor, target_mass: Tensor, lam: float, epsilon: float, iterations: int,
                     floor: float, sample_weights: Tensor | None = None) -> Tensor:
    """Codes (B, K) from entropic transport with an exact sample marginal and a KL-relaxed prototype marginal.

    With P (K x B_global) the plan and S the scores, it maximises
    <S, P> + epsilon * H(P) - lam * KL(P 1 || target_mass) subject to every
    sample carrying 1/B_global (or its share of `sample_weights`). Stationarity gives
    P = diag(u) exp(S / epsilon) diag(v)
    and the scaling iterations of Chizat et al. (2018): v makes each sample's
    column sum exactly, u = (target / (G v)) ** (lam / (lam + epsilon)). The
    exponent -> 1 as lam -> inf, which is SwAV's Sinkhorn (towards the
    target); smaller lam lets a prototype's mass follow the data.
    Afterwards `project_to_floor` lifts any prototype still below `floor`.

    target_mass: (K,) positive, summing to 1 (see `relaxed_target`).
    """
    if scores.dim() != 2 or target_mass.shape != scores.shape[1:]:
        raise ValueError(f"relaxed_sinkhorn: scores (B, K) and target_mass (K,) expected, got "
                         f"{tuple(scores.shape)} and {tuple(target_mass.shape)}")
    exponent = 1.0 if math.isinf(lam) else lam / (lam + epsilon)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        dtype = exact_dtype(scores)
        log_kernel = scores.to(dtype).t() / epsilon  # (K, B)
        log_target = target_mass.to(device=scores.device, dtype=dtype).clamp_min(torch.finfo(dtype).tiny)
        log_target = log_target.log().unsqueeze(1)  # (K, 1)
        log_column = log_sample_mass(scores.shape[0], log_kernel, sample_weights)
        log_v = log_column
        for step in range(iterations):
            log_u = exponent * (log_target - global_logsumexp(log_kernel + log_v, dim=1))
            if step + 1 < iterations:
                # Columns live entirely on this process: no communication.
                log_v = log_column - torch.logsumexp(log_kernel + log_u, dim=0, keepdim=True)
        # The final v would normalise each column to its sample's mass; divided out, a softmax over prototypes.
        codes = torch.softmax((log_kernel + log_u).t(), dim=1)
        return project_to_floor(codes, floor, sample_weights)


@torch.no_grad()
def relaxed_target(mass_ema: Tensor, floor: float) -> Tensor:
    """The prototype marginal `relaxed` aims at: the mass estimate, lifted to the floor and normalised."""
    mass = mass_ema.to(torch.float64).clamp_min(0.0)
    mass = mass / mass.sum().clamp_min(torch.finfo(torch.float64).tiny)
    weight, profile = floor_mixture(mass, floor)
    return ((1.0 - weight) * mass + weight * profile).to(mass_ema.dtype)


def power_law_marginal(n_prototypes: int, exponent: float) -> Tensor:
    """(K,) prototype shares proportional to (k + 1) ** -exponent, summing to 1 (exponent 0: uniform)."""
    shares = torch.arange(1, n_prototypes + 1, dtype=torch.float64) ** -exponent
    return shares / shares.sum()


class SinkhornCodes:
    """``sinkhorn`` and ``prior``: Sinkhorn towards a fixed prototype marginal; nothing carried."""

    def __init__(self, cfg: SwAVConfig, target: Tensor) -> None:
        self.epsilon = cfg.epsilon
        self.iterations = cfg.sinkhorn_iterations
        self.target = target
        self._log_target = target.log()

    @torch.no_grad()
    def assign(self, scores: Tensor, queued: Tensor | None, images_seen: int, weights: Tensor | None = None) -> Tensor:
        joint = with_queue(scores, queued)
        column_weights = joint_weights(weights, joint.shape[1])
        return torch.stack([sinkhorn(crop, self.epsilon, self.iterations, self._log_target,
                                     column_weights)[: scores.shape[1]] for crop in joint])

    def commit(self) -> None:
        pass

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def check_state(self, state: Mapping[str, object]) -> None:
        """Nothing is carried, so any saved codes state will do (another method's, at a resume)."""

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        pass


def _checked_vector(state: Mapping[str, object], key: str, like: Tensor, method: str) -> Tensor:
    """state[key] as a finite, non-negative float tensor shaped like `like`; ValueError otherwise."""
    value = state.get(key)
    if not isinstance(value, Tensor) or value.shape != like.shape or not value.is_floating_point():
        found = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{method} codes state: {key} must be a float tensor of shape {tuple(like.shape)}, "
                         f"got {found}")
    if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
        raise ValueError(f"{method} codes state: {key} must be finite and >= 0")
    return value.to(device=like.device, dtype=like.dtype).clone()


class RelaxedCodes:
    """``relaxed``: unbalanced Sinkhorn towards a running mass estimate (carried: `mass`)."""

    def __init__(self, cfg: SwAVConfig, n_prototypes: int, device: torch.device | str | None = None) -> None:
        self.cfg = cfg
        self.floor = cfg.mass_floor_gamma / n_prototypes
        self.mass = torch.full((n_prototypes,), 1.0 / n_prototypes, device=device)
        self._proposed: Tensor | None = None

    @property
    def target(self) -> Tensor:
        return relaxed_target(self.mass, self.floor)

    @torch.no_grad()
    def assign(self, scores: Tensor, queued: Tensor | None, images_seen: int, weights: Tensor | None = None) -> Tensor:
        cfg = self.cfg
        lam = annealed_lambda(images_seen, cfg.relaxed_lambda_start, cfg.relaxed_lambda, cfg.relaxed_anneal_images)
        target = self.target
        joint_scores = with_queue(scores, queued)
        column_weights = joint_weights(weights, joint_scores.shape[1])
        joint = [relaxed_sinkhorn(crop, target, lam, cfg.epsilon, cfg.sinkhorn_iterations, self.floor, column_weights)
                 for crop in joint_scores]
        # The mass the weighted plan puts on each prototype, which is what the target should follow.
        observed = torch.stack([global_prototype_mass(codes, column_weights) for codes in joint]).mean(dim=0)
        self._proposed = (cfg.mass_momentum * self.mass
                          + (1.0 - cfg.mass_momentum) * observed.to(device=self.mass.device, dtype=self.mass.dtype))
        return torch.stack([codes[: scores.shape[1]] for codes in joint])

    def commit(self) -> None:
        if self._proposed is not None:
            self.mass, self._proposed = self._proposed, None

    def state_dict(self) -> dict[str, Tensor]:
        return {"mass": self.mass.detach().cpu().clone()}

    def check_state(self, state: Mapping[str, object]) -> None:
        """ValueError unless `state` holds a usable `mass`, or none at all (a checkpoint of a method
        that carries nothing: swav.codes changed to relaxed at a resume)."""
        self._saved_mass(state)

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """The saved mass; without one (see `check_state`) the estimate starts again from uniform."""
        mass = self._saved_mass(state)
        self.mass = mass if mass is not None else torch.full_like(self.mass, 1.0 / len(self.mass))

    def _saved_mass(self, state: Mapping[str, object]) -> Tensor | None:
        """`state`'s mass, checked, on this estimate's device; None without one."""
        if "mass" not in state:
            return None
        mass = _checked_vector(state, "mass", self.mass, "relaxed")
        total = float(mass.double().sum())
        if abs(total - 1.0) > 1e-3:
            raise ValueError(f"relaxed codes state: mass must sum to 1, got {total:.6g}")
        return mass


CodeMethod = SinkhornCodes | RelaxedCodes


def build_codes(cfg: SwAVConfig, n_prototypes: int, device: torch.device | str | None = None) -> CodeMethod:
    """The `swav.codes` method for `n_prototypes` prototypes, with its state on `device`."""
    if cfg.codes == "sinkhorn":
        return SinkhornCodes(cfg, power_law_marginal(n_prototypes, 0.0).to(device))
    if cfg.codes == "prior":
        return SinkhornCodes(cfg, power_law_marginal(n_prototypes, cfg.prior_exponent).to(device))
    if cfg.codes == "relaxed":
        return RelaxedCodes(cfg, n_prototypes, device)
    raise ValueError(f"swav.codes: unknown method {cfg.codes!r}")


__all__ = ["build_codes", "CodeMethod", "SinkhornCodes", "RelaxedCodes", "with_queue",
           "power_law_marginal", "relaxed_sinkhorn", "relaxed_target", "annealed_lambda", "project_to_floor",
           "floor_mixture", "global_prototype_mass"]
