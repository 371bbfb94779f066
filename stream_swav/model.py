"""SwAV network: ResNet trunk, MLP projection head, prototype layer.

The learner feeds crops grouped by resolution; each group is one backbone
call, and the projection head then sees every crop of the step at once so its
BatchNorm statistics cover all of them, as in the reference implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from stream_swav.config import ARCHS, ModelConfig

# torchvision's ImageNet classifier width; the exported state dict carries an fc
# of this shape so it loads into `torchvision.models.<arch>()` unchanged.
TORCHVISION_CLASSES = 1000
FC_KEYS = ("fc.weight", "fc.bias")


def build_backbone(arch: str, small_stem: bool) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet without its classifier, and its feature width.

    `small_stem` swaps the 7x7/2 convolution and max-pool for a 3x3/1 convolution,
    keeping spatial resolution for 28-64 px inputs (CIFAR-style stem).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone {arch!r}; expected one of {', '.join(ARCHS)}")
    backbone = getattr(torchvision.models, arch)(weights=None)
    feature_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    if small_stem:
        backbone.conv1 = nn.Conv2d(3, backbone.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        backbone.maxpool = nn.Identity()
    return backbone, feature_dim


def load_backbone(state_dict: dict[str, Tensor], arch: str, small_stem: bool) -> nn.Module:
    """Rebuild a backbone from `SwAVModel.backbone_state_dict()` output, loading strictly.

    The fc placeholders are dropped: the returned module ends in `nn.Identity`
    and yields pooled features. Any other missing, extra or mis-shaped key raises.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"expected a state dict (dict of tensors), got {type(state_dict).__name__}")
    backbone, _ = build_backbone(arch, small_stem)
    weights = {k: v for k, v in state_dict.items() if k not in FC_KEYS}
    try:
        backbone.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ValueError(f"state dict does not match {arch} (small_stem={small_stem}): {error}") from error
    return backbone


class SwAVModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.arch = cfg.arch
        self.small_stem = cfg.small_stem
        self.backbone, self.feature_dim = build_backbone(cfg.arch, cfg.small_stem)
        self.projection = nn.Sequential(
            nn.Linear(self.feature_dim, cfg.hidden_dim),
            nn.BatchNorm1d(cfg.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden_dim, cfg.output_dim),
        )
        self.prototypes = nn.Linear(cfg.output_dim, cfg.prototypes, bias=False)
        self.normalize_prototypes()

    def forward(self, crops: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Embed crops given per resolution as (N_r, 3, H_r, W_r) float tensors.

        Returns z (sum N_r, output_dim), unit rows in the order of `crops`, and
        the prototype scores z @ C^T (sum N_r, prototypes).
        """
        if not crops:
            raise ValueError("forward needs at least one group of crops")
        for i, group in enumerate(crops):
            if group.dim() != 4 or group.shape[1] != 3:
                raise ValueError(f"crops[{i}]: expected shape (N, 3, H, W), got {tuple(group.shape)}")
        features = torch.cat([self.backbone(group) for group in crops])
        z = F.normalize(self.projection(features), dim=1)
        return z, self.prototypes(z)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Project prototype vectors back onto the unit sphere (after each optimiser step)."""
        weight = self.prototypes.weight
        weight.copy_(F.normalize(weight, dim=1))

    def embed(self, images: Tensor) -> Tensor:
        """Pooled backbone features (no projection head), the representation evaluated downstream.

        The caller chooses the mode: use `eval()` and `torch.no_grad()` for evaluation.
        """
        return self.backbone(images)

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """Backbone weights on CPU, keyed as in `torchvision.models.<arch>()`.

        SwAV trains no classifier, so `fc.weight` (1000, feature_dim) and `fc.bias`
        (1000,) are zero placeholders that only make a strict load into torchvision
        succeed. With `small_stem` conv1 is 3x3 rather than 7x7, so the dict loads
        into `build_backbone(arch, small_stem=True)` instead (see `load_backbone`).
        """
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.backbone.state_dict().items()}
        dtype = self.backbone.conv1.weight.dtype
        state["fc.weight"] = torch.zeros(TORCHVISION_CLASSES, self.feature_dim, dtype=dtype)
        state["fc.bias"] = torch.zeros(TORCHVISION_CLASSES, dtype=dtype)
        return state


__all__ = ["SwAVModel", "build_backbone", "load_backbone", "TORCHVISION_CLASSES"]
