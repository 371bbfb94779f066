"""Concept balance from the model's own prototype assignments (curation.balance): samples the
network assigns to over-used prototypes weigh less in the loss, so that what the model is trained
on moves towards uniform over prototypes, as DINOv2's retrieval-based balancing does offline.

Sinkhorn already spreads each batch's *codes* evenly over the prototypes; the premise here is that
a flooded concept skews which prototype the network itself prefers (the argmax of its scores, also
the collapse monitor's signal). Measured on the messy-stream benchmark it barely does: a model
trained on the stream spreads its prototypes over the flooded concept too, and these weights leave
the classes' shares almost as they were (docs/curation.md). `PrototypeBalance` keeps a running
estimate of that usage and turns it into one
weight per sample: (K * usage[assigned prototype]) ** -strength, rescaled to mean 1 over the batch,
so the loss keeps its scale. Strength 1 makes the weighted usage uniform when the estimate is
right; 0 is plain SwAV. Nothing is dropped (the stream cursor is untouched) and nothing extra is
computed: the scores come from the step's own forward pass.

Pure state in torch, no I/O or process group: each learner keeps its own estimate from its own
batches (rank-local, saved per rank like the feature queue), which needs no collective per step.
"""
from __future__ import annotations

import torch
from torch import Tensor

# A sample's weight before the batch rescaling stays within [1/MAX_RATIO, MAX_RATIO] (1 at uniform
# usage): an image of a prototype almost never picked must not carry a step.
MAX_RATIO = 10.0


def raw_weights(usage: Tensor, strength: float) -> Tensor:
    """The weight of an image of each prototype at these usage shares (K,), before a batch's weights
    are rescaled to mean 1: (K * usage) ** -strength within [1/MAX_RATIO, MAX_RATIO]."""
    relative = (usage.shape[0] * usage).clamp_min(1e-6)
    return relative.pow(-strength).clamp(1.0 / MAX_RATIO, MAX_RATIO)


class PrototypeBalance:
    def __init__(self, prototypes: int, strength: float, momentum: float = 0.99,
                 device: torch.device | str | None = None) -> None:
        if prototypes < 1:
            raise ValueError(f"prototypes must be >= 1, got {prototypes}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.strength = strength
        self.momentum = momentum
        # Share of argmax assignments per prototype; starts uniform (every weight 1).
        self.usage = torch.full((prototypes,), 1.0 / prototypes, device=device)

    def weights(self, assigned: Tensor) -> Tensor:
        """(B,) loss weights, mean 1, for samples whose argmax prototypes are `assigned` (B,) int."""
        weights = raw_weights(self.usage, self.strength)[assigned]
        return weights / weights.mean()

    def update(self, counts: Tensor) -> None:
        """Fold in one step's argmax counts (K,) (`swav.prototype_counts`)."""
        # counts sum to the assignment rows of a step, never 0; no host-side check, so no device sync.
        self.usage.mul_(self.momentum).add_(counts.to(self.usage.dtype) / counts.sum(), alpha=1.0 - self.momentum)

    def state_dict(self) -> dict[str, Tensor]:
        return {"usage": self.usage.detach().cpu().clone()}

    def check_state(self, state: object) -> None:
        """Raise ValueError unless `state` is a `state_dict()` of a balance with as many prototypes."""
        usage = state.get("usage") if isinstance(state, dict) else None
        if not isinstance(usage, Tensor) or usage.shape != self.usage.shape or not torch.isfinite(usage).all():
            raise ValueError(f"balance state: usage must be a finite tensor of shape {tuple(self.usage.shape)}")

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.check_state(state)
        self.usage.copy_(state["usage"])


__all__ = ["PrototypeBalance", "MAX_RATIO", "raw_weights"]
