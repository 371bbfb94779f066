"""SwAV's objective as pure tensor functions: online codes, swapped prediction, feature queue.

Codes are computed without gradients from prototype scores; every crop then
predicts the codes of the other (assignment) crops. Shapes follow the learner:
scores are crop-major, rows ``[c * B, (c + 1) * B)`` belong to crop ``c``.
Functions that need the whole batch (Sinkhorn) reduce over all processes when a
``torch.distributed`` process group is up, so each learner passes only its shard.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

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


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Equal-partition soft assignment of samples to prototypes (SwAV's online codes).

    Solves the entropy-regularised transport problem whose plan Q (K x B_global)
    is proportional to exp(scores / epsilon)^T, with each prototype receiving
    1/K and each sample 1/B_global of the mass, by alternating normalisations.
    Returns codes (B, K) for the local rows, each summing to 1.

    The iteration runs in log space with logsumexp, so |scores| / epsilon of
    1e6 neither overflows nor underflows to 0/0; the global scale normalisation
    of the textbook version is implied, since the first prototype normalisation
    removes any constant factor. Autocast is switched off: bf16 is far too
    coarse for exp(score / 0.05).
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn: scores must be (B, K), got shape {tuple(scores.shape)}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"sinkhorn: iterations must be >= 1, got {iterations}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        dtype = exact_dtype(scores)
        log_q = scores.to(dtype).t() / epsilon  # (K, B)
        n_prototypes, batch = log_q.shape
        # Made on the device (no host-to-device copy, which would wait for the GPU).
        global_batch = global_rows(batch, log_q)
        log_k = math.log(n_prototypes)
        log_b = global_batch.log()
        for _ in range(iterations):
            log_q = log_q - (global_logsumexp(log_q, dim=1) + log_k)
            # Columns live entirely on this process: no communication needed.
            log_q = log_q - (torch.logsumexp(log_q, dim=0, keepdim=True) + log_b)
        # The last step left every column with mass 1/B; scaling by B makes each code a distribution.
        return (log_q + log_b).exp().t()


def assignment_codes(scores: Tensor, queue_scores: Tensor | None, epsilon: float, iterations: int) -> Tensor:
    """Codes for one assignment crop, (B, K).

    With a queue, Sinkhorn partitions the batch together with the stored
    features of earlier batches, so that small batches still get an equal
    partition over enough samples; only the batch rows are returned.
    """
    if queue_scores is None:
        return sinkhorn(scores, epsilon, iterations)
    if queue_scores.dim() != 2 or queue_scores.shape[1] != scores.shape[1]:
        raise ValueError(f"assignment_codes: queue scores {tuple(queue_scores.shape)} do not match batch scores "
                         f"{tuple(scores.shape)}")
    dtype = exact_dtype(scores)
    joint = torch.cat([scores.to(dtype), queue_scores.to(dtype)])
    return sinkhorn(joint, epsilon, iterations)[: scores.shape[0]]


def swav_loss(scores: Tensor, codes: Mapping[int, Tensor], batch_size: int, temperature: float) -> Tensor:
    """Swapped-prediction loss.

    scores: (n_crops * B, K) crop-major prototype scores, with gradient.
    codes: assignment crop index -> its codes (B, K), without gradient.
    For each assignment crop i, every other crop v predicts q_i through
    softmax(scores_v / temperature); the cross-entropies are averaged over the
    batch, over the n_crops - 1 predicting crops, then over assignment crops.
    """
    if batch_size < 1 or scores.dim() != 2 or scores.shape[0] % batch_size:
        raise ValueError(f"swav_loss: scores {tuple(scores.shape)} are not n_crops x batch_size={batch_size} rows")
    n_crops = scores.shape[0] // batch_size
    if n_crops < 2:
        raise ValueError(f"swav_loss: swapped prediction needs >= 2 crops, got {n_crops}")
    if not codes:
        raise ValueError("swav_loss: no assignment crops given")
    if not temperature > 0:
        raise ValueError(f"swav_loss: temperature must be > 0, got {temperature}")
    n_prototypes = scores.shape[1]
    with torch.autocast(device_type=scores.device.type, enabled=False):
        dtype = exact_dtype(scores)
        log_p = F.log_softmax(scores.to(dtype) / temperature, dim=1).view(n_crops, batch_size, n_prototypes)
        per_crop_losses = []
        for crop, q in codes.items():
            if not 0 <= crop < n_crops:
                raise ValueError(f"swav_loss: assignment crop {crop} outside [0, {n_crops})")
            if q.shape != (batch_size, n_prototypes):
                raise ValueError(f"swav_loss: codes for crop {crop} have shape {tuple(q.shape)}, "
                                 f"expected {(batch_size, n_prototypes)}")
            # Cross-entropy of q against every crop's prediction, then drop the crop's own term.
            cross_entropy = -(q.to(dtype).unsqueeze(0) * log_p).sum(dim=2).mean(dim=1)  # (n_crops,)
            per_crop_losses.append((cross_entropy.sum() - cross_entropy[crop]) / (n_crops - 1))
        return torch.stack(per_crop_losses).mean()


class FeatureQueue:
    """Per-learner FIFO of past embeddings of the assignment crops, newest first.

    Filling starts once `start_images` images have been seen; the stored
    features take part in code assignment only once the queue is full, so
    zero rows never enter Sinkhorn.
    """

    def __init__(self, n_assign_crops: int, length: int, dim: int, start_images: int = 0,
                 device: torch.device | str | None = None) -> None:
        if n_assign_crops < 1:
            raise ValueError(f"FeatureQueue: n_assign_crops must be >= 1, got {n_assign_crops}")
        if length < 1:
            raise ValueError(f"FeatureQueue: length must be >= 1, got {length}")
        if dim < 1:
            raise ValueError(f"FeatureQueue: dim must be >= 1, got {dim}")
        if start_images < 0:
            raise ValueError(f"FeatureQueue: start_images must be >= 0, got {start_images}")
        self.length = length
        self.start_images = start_images
        self.buffer = torch.zeros(n_assign_crops, length, dim, device=device)
        self.fill = 0

    @property
    def is_full(self) -> bool:
        return self.fill == self.length

    def accepts(self, images_seen: int) -> bool:
        """Whether features of the current batch should be stored."""
        return images_seen >= self.start_images

    def features(self, crop: int) -> Tensor:
        """Stored features (length, dim) for the crop at position `crop` of crops_for_assign."""
        return self.buffer[crop]

    @torch.no_grad()
    def push(self, crop_features: Tensor) -> None:
        """Store (n_assign_crops, B, dim) features in front; the oldest B rows drop out."""
        expected = (self.buffer.shape[0], self.buffer.shape[2])
        if crop_features.dim() != 3 or (crop_features.shape[0], crop_features.shape[2]) != expected:
            raise ValueError(f"FeatureQueue.push: expected (n_assign_crops={expected[0]}, B, dim={expected[1]}), "
                             f"got {tuple(crop_features.shape)}")
        incoming = crop_features.detach().to(self.buffer.dtype)[:, : self.length]
        kept = self.buffer[:, : self.length - incoming.shape[1]]
        self.buffer = torch.cat([incoming, kept], dim=1)
        self.fill = min(self.fill + incoming.shape[1], self.length)

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"features": self.buffer.detach().cpu(), "fill": self.fill}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        features, fill = state.get("features"), state.get("fill")
        if not isinstance(features, Tensor) or features.shape != self.buffer.shape:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"FeatureQueue.load_state_dict: features must be a tensor of shape "
                             f"{tuple(self.buffer.shape)}, got {shape}")
        if not isinstance(fill, int) or isinstance(fill, bool) or not 0 <= fill <= self.length:
            raise ValueError(f"FeatureQueue.load_state_dict: fill must be an int in [0, {self.length}], got {fill!r}")
        self.buffer = features.to(device=self.buffer.device, dtype=self.buffer.dtype).clone()
        self.fill = fill


def _mass(codes_or_counts: Tensor) -> Tensor:
    """Share of the total mass per prototype, from (B, K) codes or (K,) counts."""
    if codes_or_counts.dim() not in (1, 2):
        raise ValueError(f"expected (B, K) codes or (K,) counts, got shape {tuple(codes_or_counts.shape)}")
    dtype = exact_dtype(codes_or_counts)
    total = codes_or_counts.to(dtype)
    if total.dim() == 2:
        total = total.sum(dim=0)
    return total / total.sum().clamp_min(torch.finfo(dtype).tiny)


def prototype_perplexity(codes_or_counts: Tensor) -> Tensor:
    """exp(entropy) of the prototype mass: K when used uniformly, 1 when one prototype takes everything.

    Accepts (B, K) soft or one-hot codes, or (K,) usage counts accumulated over a window.
    """
    mass = _mass(codes_or_counts)
    return torch.exp(-torch.special.xlogy(mass, mass).sum())


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


def unused_prototypes(counts: Tensor) -> Tensor:
    """Number of prototypes never picked in (K,) usage counts."""
    return (counts == 0).sum()


def marginal_error(codes: Tensor) -> Tensor:
    """Largest relative deviation of a prototype's mass from the uniform 1/K: max_k |K * m_k - 1|."""
    mass = _mass(codes)
    return (mass * mass.numel() - 1).abs().max()


__all__ = ["sinkhorn", "assignment_codes", "swav_loss", "FeatureQueue", "prototype_perplexity",
           "prototype_counts", "unused_prototypes", "marginal_error"]
