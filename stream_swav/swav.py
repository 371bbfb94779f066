"""SwAV's objective as pure tensor functions: online codes, swapped prediction, feature queue.

Codes are computed without gradients from prototype scores; every crop then
predicts the codes of the other (assignment) crops. Scores of a step are a
``(n_crops, B, K)`` view: crop, sample, prototype.
Functions that need the whole batch (Sinkhorn) reduce over all processes when a
``torch.distributed`` process group is up, so each learner passes only its shard.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def exact_dtype(tensor: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def global_logsumexp(log_x: Tensor, dim: int) -> Tensor:
    """logsumexp along `dim` over every process's entries (keepdim); `dim` is the batch dimension."""
    if not is_distributed():
        return torch.logsumexp(log_x, dim=dim, keepdim=True)
    # Shift by the max over all processes so no exp overflows on any of them.
    shift = log_x.amax(dim=dim, keepdim=True)
    dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    total = (log_x - shift).exp().sum(dim=dim, keepdim=True)
    dist.all_reduce(total)
    return total.log() + shift


def global_rows(rows: int, like: Tensor) -> Tensor:
    """Number of rows in the global batch, as a scalar tensor of like's dtype and device."""
    count = torch.full((), float(rows), dtype=like.dtype, device=like.device)
    if is_distributed():
        dist.all_reduce(count)
    return count


def log_sample_mass(rows: int, like: Tensor, weights: Tensor | None = None) -> Tensor:
    """(1, rows): the log of each local sample's share of the global batch's mass in a transport
    plan, 1/B_global each, or with `weights` (rows,) its weight over every process's weights summed
    (concept balance: an image that counts for more takes more of the prototypes' mass)."""
    if weights is None:
        return (-global_rows(rows, like).log()).expand(1, rows)
    if weights.shape != (rows,):
        raise ValueError(f"sample weights {tuple(weights.shape)} do not match {rows} rows")
    weights = weights.to(device=like.device, dtype=like.dtype)
    total = weights.sum()
    if is_distributed():
        dist.all_reduce(total)
    # In logs, so a weight too small to divide by the total still gives a finite share.
    tiny = torch.finfo(like.dtype).tiny
    return (weights.clamp_min(tiny).log() - total.clamp_min(tiny).log()).unsqueeze(0)


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3, log_marginal: Tensor | None = None,
             sample_weights: Tensor | None = None) -> Tensor:
    """Soft assignment of samples to prototypes with a fixed prototype marginal (SwAV's online codes).

    Solves the entropy-regularised transport problem whose plan Q (K x B_global)
    is proportional to exp(scores / epsilon)^T, with prototype k receiving
    exp(log_marginal[k]) of the mass (1/K each by default: equal partition) and
    each sample 1/B_global (or its share of `sample_weights`, `log_sample_mass`),
    by alternating normalisations. Returns codes (B, K) for the local rows, each
    summing to 1.

    The iteration runs in log space with logsumexp, so |scores| / epsilon of
    1e6 neither overflows nor underflows to 0/0; the global scale normalisation
    of the textbook version is implied, since the first prototype normalisation
    removes any constant factor. Autocast is switched off: bf16 is far too
    coarse for exp(score / 0.05).
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn: scores must be (B, K), got shape {tuple(scores.shape)}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        dtype = exact_dtype(scores)
        log_q = scores.to(dtype).t() / epsilon  # (K, B)
        n_prototypes, batch = log_q.shape
        if log_marginal is None:
            log_row = -math.log(n_prototypes)
        else:
            if log_marginal.shape != (n_prototypes,):
                raise ValueError(f"sinkhorn: log_marginal must be ({n_prototypes},), got {tuple(log_marginal.shape)}")
            log_row = log_marginal.to(device=log_q.device, dtype=dtype).unsqueeze(1)
        # Made on the device (no host-to-device copy, which would wait for the GPU).
        log_column = log_sample_mass(batch, log_q, sample_weights)
        for _ in range(iterations):
            log_q = log_q - global_logsumexp(log_q, dim=1) + log_row
            # Columns live entirely on this process: no communication needed.
            log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) + log_column
        # The last step left every column with its sample's mass; dividing it out makes each code a distribution.
        return (log_q - log_column).exp().t()


def swav_loss(scores: Tensor, codes: Tensor, assign_crops: Sequence[int], temperature: float,
              weights: Tensor | None = None) -> Tensor:
    """Swapped-prediction loss.

    scores: (n_crops, B, K) prototype scores of every crop, with gradient.
    codes: (A, B, K) codes of the assignment crops `assign_crops` (A indices into
    the crops), without gradient. For each assignment crop a, every other crop v
    predicts q_a through softmax(scores_v / temperature); the cross-entropies are
    averaged over the batch, over the n_crops - 1 predicting crops, then over
    assignment crops. `weights` (B,), mean 1, weigh the images in the batch average
    (concept balance, `stream_swav.balance`).
    """
    if scores.dim() != 3 or scores.shape[0] < 2:
        raise ValueError(f"swav_loss: scores must be (n_crops >= 2, B, K), got shape {tuple(scores.shape)}")
    n_crops = scores.shape[0]
    if codes.shape != (len(assign_crops), *scores.shape[1:]):
        raise ValueError(f"swav_loss: codes {tuple(codes.shape)} do not match {len(assign_crops)} assignment "
                         f"crops of scores {tuple(scores.shape)}")
    if not all(0 <= crop < n_crops for crop in assign_crops):
        raise ValueError(f"swav_loss: assignment crops {list(assign_crops)} outside [0, {n_crops})")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        dtype = exact_dtype(scores)
        log_p = F.log_softmax(scores.to(dtype) / temperature, dim=2)
        if weights is not None:
            if weights.shape != (scores.shape[1],):
                raise ValueError(f"swav_loss: weights {tuple(weights.shape)} do not match a batch of {scores.shape[1]}")
            log_p = log_p * weights.to(dtype)[None, :, None]
        # Cross-entropy of each assignment crop's codes against every crop's prediction: (A, n_crops).
        cross_entropy = -torch.einsum("abk,cbk->ac", codes.to(dtype), log_p) / scores.shape[1]
        own = cross_entropy[torch.arange(len(assign_crops)), torch.as_tensor(list(assign_crops))]
        return ((cross_entropy.sum(dim=1) - own) / (n_crops - 1)).mean()


class FeatureQueue:
    """Per-learner ring buffer of past embeddings of the assignment crops.

    Pushing writes over the oldest rows in place (no reallocation). Filling
    starts once `start_images` images have been seen; the stored features take
    part in code assignment only once the queue is full, so zero rows never
    enter Sinkhorn. Row order does not matter to the codes.
    """

    def __init__(self, n_assign_crops: int, length: int, dim: int, start_images: int = 0,
                 device: torch.device | str | None = None) -> None:
        self.length = length
        self.start_images = start_images
        self.buffer = torch.zeros(n_assign_crops, length, dim, device=device)
        self.fill = 0
        # Row the next push starts at: the oldest one once the queue is full.
        self.next = 0

    @property
    def is_full(self) -> bool:
        return self.fill == self.length

    def accepts(self, images_seen: int) -> bool:
        """Whether features of the current batch should be stored."""
        return images_seen >= self.start_images

    def features(self) -> Tensor | None:
        """(n_assign_crops, length, dim) stored features once the queue is full, else None."""
        return self.buffer if self.is_full else None

    @torch.no_grad()
    def push(self, crop_features: Tensor) -> None:
        """Store (n_assign_crops, B, dim) features over the oldest rows (the newest `length` when B > length)."""
        expected = (self.buffer.shape[0], self.buffer.shape[2])
        if crop_features.dim() != 3 or (crop_features.shape[0], crop_features.shape[2]) != expected:
            raise ValueError(f"FeatureQueue.push: expected (n_assign_crops={expected[0]}, B, dim={expected[1]}), "
                             f"got {tuple(crop_features.shape)}")
        incoming = crop_features.detach()[:, -self.length:]
        rows = (self.next + torch.arange(incoming.shape[1], device=self.buffer.device)) % self.length
        self.buffer.index_copy_(1, rows, incoming.to(self.buffer.dtype))
        self.next = (self.next + incoming.shape[1]) % self.length
        self.fill = min(self.fill + incoming.shape[1], self.length)

    def state_dict(self) -> dict[str, Tensor | int]:
        # A copy: pushes write into the buffer in place, and a saved state must not change.
        return {"features": self.buffer.detach().to("cpu", copy=True), "fill": self.fill, "next": self.next}

    def same_shape(self, state: object) -> bool:
        """Whether `state` holds features of this queue's shape (crops, length, dim): false for a queue
        saved with another swav.queue_length or crops_for_assign, or a model of another output_dim."""
        features = state.get("features") if isinstance(state, Mapping) else None
        return isinstance(features, Tensor) and features.shape == self.buffer.shape

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        features, fill = state.get("features"), state.get("fill")
        if not isinstance(features, Tensor) or features.shape != self.buffer.shape:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"FeatureQueue.load_state_dict: features must be a tensor of shape "
                             f"{tuple(self.buffer.shape)}, got {shape}")
        if not isinstance(fill, int) or isinstance(fill, bool) or not 0 <= fill <= self.length:
            raise ValueError(f"FeatureQueue.load_state_dict: fill must be an int in [0, {self.length}], got {fill!r}")
        features = features.to(device=self.buffer.device, dtype=self.buffer.dtype).clone()
        position = state.get("next")
        if position is None:
            # Written before the ring buffer: newest row first, the `fill` valid rows at the front.
            # Reversed they are oldest first, so the next push overwrites the oldest.
            features[:, :fill] = features[:, :fill].flip(1)
            position = fill % self.length
        if not isinstance(position, int) or isinstance(position, bool) or not 0 <= position < self.length:
            raise ValueError(f"FeatureQueue.load_state_dict: next must be an int in [0, {self.length}), "
                             f"got {position!r}")
        self.buffer, self.fill, self.next = features, fill, position


def _mass(codes: Tensor) -> Tensor:
    """Share of the total mass per prototype, (K,), from (N, K) codes."""
    dtype = exact_dtype(codes)
    total = codes.to(dtype).sum(dim=0)
    return total / total.sum().clamp_min(torch.finfo(dtype).tiny)


def prototype_counts(scores: Tensor) -> Tensor:
    """How many rows of (N, K) scores pick each prototype as their best match, (K,) int64.

    Sinkhorn codes are near-uniform in mass by construction, even for a
    collapsed network; which prototype the network itself prefers is what
    reveals collapse.
    """
    if scores.dim() != 2:
        raise ValueError(f"prototype_counts: scores must be (N, K), got shape {tuple(scores.shape)}")
    best = scores.argmax(dim=1)
    # scatter_add rather than bincount: bincount on CUDA reads the maximum back to the host.
    return torch.zeros(scores.shape[1], dtype=torch.int64, device=scores.device).scatter_add_(
        0, best, torch.ones_like(best))


def marginal_error(codes: Tensor, target: Tensor | None = None) -> Tensor:
    """Largest relative deviation of the codes' prototype mass from its target (uniform 1/K by
    default): max_k |m_k / t_k - 1|. Accepts (..., K) codes of any leading shape."""
    mass = _mass(codes.reshape(-1, codes.shape[-1]))
    if target is None:
        return (mass * mass.numel() - 1).abs().max()
    return (mass / target.to(mass) - 1).abs().max()


__all__ = ["sinkhorn", "swav_loss", "FeatureQueue", "prototype_counts", "marginal_error",
           "is_distributed", "exact_dtype", "global_logsumexp", "global_rows"]
