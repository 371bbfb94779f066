"""LARS, AdamW and SGD over parameter groups, the learning-rate and weight-decay schedules counted in
images seen, and the exponential moving average of a module's weights that a run can export."""
from __future__ import annotations

import math
import copy
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from stream_swav.config import Config, scaled_learning_rate
from stream_swav.model import check_state_dict


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step is rescaled per tensor by a trust ratio.

    For a tensor w with gradient g the update direction is
    (g + wd * w) * trust_coefficient * ||w|| / (||g|| + wd * ||w||), the ratio
    taken as 1 when either norm is zero (fresh or frozen tensors). Groups with
    ``lars_exclude=True`` (biases, BatchNorm affine) take plain momentum SGD
    steps without weight decay. All per-tensor math runs as foreach kernels on
    device tensors, so a step never waits for the GPU.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 0.0, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001, lars_exclude: bool = False) -> None:
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"LARS: trust_coefficient must be > 0, got {trust_coefficient}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        lars_exclude=lars_exclude)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients")
            grads = [p.grad for p in params]
            if group["lars_exclude"]:
                updates = grads
            else:
                updates = self._adapted_updates(params, grads, group["weight_decay"], group["trust_coefficient"])
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss

    @staticmethod
    def _adapted_updates(params: list[Tensor], grads: list[Tensor], weight_decay: float,
                         trust_coefficient: float) -> list[Tensor]:
        # Norms in float32 at least (bf16 parameters), float64 when a parameter is.
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        weight_norms = torch.stack(torch._foreach_norm(params, dtype=dtype))
        grad_norms = torch.stack(torch._foreach_norm(grads, dtype=dtype))
        ratio = trust_coefficient * weight_norms / (grad_norms + weight_decay * weight_norms)
        ratio = torch.where((weight_norms > 0) & (grad_norms > 0), ratio, torch.ones_like(ratio))
        updates = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else \
            [g.clone() for g in grads]
        ratios = [r.to(u.dtype) for r, u in zip(ratio.unbind(), updates)]
        torch._foreach_mul_(updates, ratios)
        return updates


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices and kernels (a ViT's class token and position embeddings too, as in
    DINO) with weight decay and LARS adaptation, marked ``decayed``; vectors (biases, normalisation
    scales and shifts) with neither."""
    adapted, excluded = [], []
    for param in model.parameters():
        if param.requires_grad:
            (excluded if param.ndim <= 1 else adapted).append(param)
    groups = []
    if adapted:
        groups.append({"params": adapted, "weight_decay": weight_decay, "lars_exclude": False, "decayed": True})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_exclude": True, "decayed": False})
    return groups


def half_cosine(start: float, end: float, progress: float) -> float:
    """From `start` at progress 0 to `end` at progress 1 along half a cosine; `end` past 1."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def learning_rate(images_seen: int, *, peak_lr: float, final_lr: float, warmup_images: int, schedule: str,
                  cosine_images: int) -> float:
    """Learning rate after `images_seen` images.

    Linear warmup from 0 to `peak_lr` over `warmup_images`, then either constant
    (`warmup-constant`, for endless streams) or a half cosine from `peak_lr` at
    the end of warmup to `final_lr` at `cosine_images` images, and `final_lr`
    from there on (`warmup-cosine`).
    """
    if images_seen < warmup_images:
        return peak_lr * images_seen / warmup_images
    if schedule == "warmup-constant":
        return peak_lr
    return half_cosine(peak_lr, final_lr, (images_seen - warmup_images) / (cosine_images - warmup_images))


def learning_rate_for(cfg: Config, images_seen: int, global_batch: int | None = None) -> float:
    """The configured schedule; base_lr and final_lr are both scaled from a global batch of 256 to
    `global_batch` (default cfg.global_batch: every learner of train.learners)."""
    o = cfg.optim
    return learning_rate(images_seen, peak_lr=scaled_learning_rate(cfg, o.base_lr, global_batch),
                         final_lr=scaled_learning_rate(cfg, o.final_lr, global_batch), warmup_images=o.warmup_images,
                         schedule=o.schedule, cosine_images=o.cosine_images)


def weight_decay(images_seen: int, *, start: float, end: float, schedule: str, cosine_images: int) -> float:
    """Weight decay after `images_seen` images: `start` throughout (`constant`), or a half cosine
    from `start` to `end` over `cosine_images` images and `end` from there on (`cosine`, DINO's
    0.04 -> 0.4 for ViTs)."""
    if schedule == "constant":
        return start
    return half_cosine(start, end, images_seen / cosine_images)


def weight_decay_for(cfg: Config, images_seen: int) -> float:
    """The configured weight-decay schedule."""
    o = cfg.optim
    return weight_decay(images_seen, start=o.weight_decay, end=o.weight_decay_end, schedule=o.weight_decay_schedule,
                        cosine_images=o.cosine_images)


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """`cfg.optimizer` (LARS, momentum SGD or AdamW) over `param_groups`; the learning rate and the
    decayed group's weight decay are set per step from their schedules."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    on_cuda = all(p.is_cuda for group in groups for p in group["params"])
    # Fused kernels on CUDA; one foreach kernel per group on the CPU.
    kernels = {"fused": True if on_cuda else None, "foreach": None if on_cuda else True}
    if cfg.optimizer == "lars":
        return LARS(groups, lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay,
                    trust_coefficient=o.trust_coefficient)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay, **kernels)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=o.weight_decay, **kernels)
    raise ValueError(f"optim.optimizer: unknown optimizer {cfg.optimizer!r}")


class WeightAverage:
    """An exponential moving average of a module's parameters and floating-point buffers (BatchNorm
    running statistics), kept in a frozen copy of the module on the same device.

    `update()` after each optimiser step moves every averaged tensor towards the live one by
    1 - min(momentum, (1 + updates) / (10 + updates)): the warm-up keeps the random initial weights
    from dominating the first hundreds of steps. Integer buffers (BatchNorm's batch counter) are
    copied. Training never reads the average; it is what a run exports when asked (Polyak averaging:
    with a constant learning rate the live weights keep bouncing around the average).
    """

    def __init__(self, module: nn.Module, momentum: float) -> None:
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1), got {momentum!r}")
        self.momentum = momentum
        self.updates = 0
        self.module = copy.deepcopy(module).requires_grad_(False)
        # The tensors pair up once: optimisers and load_state_dict change both modules in place.
        self._averaged: list[Tensor] = []
        self._live: list[Tensor] = []
        self._copied: list[tuple[Tensor, Tensor]] = []
        for mine, theirs in zip(self.module.state_dict(keep_vars=True).values(),
                                module.state_dict(keep_vars=True).values()):
            if mine.is_floating_point():
                self._averaged.append(mine.detach())
                self._live.append(theirs.detach())
            else:
                self._copied.append((mine, theirs))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        weight = 1.0 - min(self.momentum, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._averaged, self._live, weight)
        for mine, theirs in self._copied:
            mine.copy_(theirs)

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average again from the live weights (a resumed run whose checkpoint has none)."""
        torch._foreach_copy_(self._averaged, self._live)
        for mine, theirs in self._copied:
            mine.copy_(theirs)
        self.updates = 0

    def state_dict(self) -> dict[str, object]:
        return {"updates": self.updates, "module": {k: v.detach().to("cpu", copy=True)
                                                    for k, v in self.module.state_dict().items()}}

    def check_state(self, state: object) -> None:
        """Raise ValueError when `state` is not a `state_dict()` of an average of this module."""
        if not isinstance(state, Mapping) or not isinstance(state.get("updates"), int) \
                or isinstance(state.get("updates"), bool) or state["updates"] < 0 \
                or not isinstance(state.get("module"), Mapping):
            raise ValueError("weight average: expected {'updates': int >= 0, 'module': state dict}")
        try:
            check_state_dict(state["module"], self.module, "module")
        except ValueError as error:
            raise ValueError(f"weight average: its tensors do not match this model ({error})") from error

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.check_state(state)
        self.module.load_state_dict(state["module"])  # type: ignore[arg-type]
        self.updates = int(state["updates"])  # type: ignore[arg-type]


__all__ = ["LARS", "param_groups", "half_cosine", "learning_rate", "learning_rate_for", "weight_decay", "weight_decay_for",
           "build_optimizer", "WeightAverage"]
