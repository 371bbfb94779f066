"""SwAV network: ResNet trunk, MLP projection head, prototype layer.

The learner feeds crops grouped by resolution; each group is one backbone
call, and the projection head then sees every crop of the step at once so its
BatchNorm statistics cover all of them, as in the reference implementation.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from stream_swav.config import ARCHS, ModelConfig

TORCHVISION_WIDTH = 64
# A backbone file records its BackboneSpec under this key of the state dict's `_metadata`: the
# per-module metadata PyTorch keeps on every state dict. It survives torch.save and
# torch.load(weights_only=True), and load_state_dict only reads the entries of the modules it
# loads, so the file describes itself and still loads strictly into torchvision's ResNet.
SPEC_METADATA_KEY = "stream_swav.backbone_spec"
# Backbone files written before the spec was recorded carried zero-filled torchvision classifier
# entries (SwAV trains no classifier); loading drops them.
PLACEHOLDER_FC_KEYS = ("fc.weight", "fc.bias")

# Residual block and blocks per stage. resnet10 is not in torchvision: one block per stage, the
# cheapest trunk with all four stages, for CPU runs on small images.
RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet10": (BasicBlock, (1, 1, 1, 1)),
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}
assert set(RESNET_LAYOUTS) == set(ARCHS)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild a backbone from its weights; every checkpoint records it."""

    arch: str
    # CIFAR-style stem: a 3x3 convolution and no max-pool, for 28-64 px images.
    small_stem: bool = False
    # Stride of the small stem: 2 runs the first stage at half resolution (14x14 for 28 px).
    stem_stride: int = 1
    # Channels of the first residual stage, doubled at each later stage; torchvision's is 64.
    width: int = TORCHVISION_WIDTH

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown backbone {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if self.stem_stride not in (1, 2) or (self.stem_stride != 1 and not self.small_stem):
            raise ValueError(f"stem_stride must be 1, or 2 with the small stem; got {self.stem_stride} "
                             f"(small_stem={self.small_stem})")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"width must be a positive integer, got {self.width!r}")

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "BackboneSpec":
        return cls(cfg.arch, cfg.small_stem, cfg.stem_stride, cfg.width)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "BackboneSpec":
        """From a checkpoint record or a `model` config section; stem_stride and width may be
        absent (checkpoints written before they existed). Raises ValueError naming what is wrong."""
        arch, small_stem = record.get("arch"), record.get("small_stem")
        if not isinstance(arch, str) or not isinstance(small_stem, bool):
            raise ValueError(f"a backbone needs arch (str) and small_stem (bool), got arch={arch!r}, "
                             f"small_stem={small_stem!r}")
        return cls(arch, small_stem, record.get("stem_stride", 1), record.get("width", TORCHVISION_WIDTH))

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def torchvision_compatible(self) -> bool:
        """Whether the weights load into `torchvision.models.<arch>()` as they are."""
        return hasattr(torchvision.models, self.arch) and not self.small_stem and self.width == TORCHVISION_WIDTH

    def describe(self) -> str:
        details = []
        if self.width != TORCHVISION_WIDTH:
            details.append(f"width {self.width}")
        if self.small_stem:
            details.append("small stem" + (f", stride {self.stem_stride}" if self.stem_stride != 1 else ""))
        return self.arch + (f" ({', '.join(details)})" if details else "")


class ResNetTrunk(nn.Module):
    """torchvision's ResNet without its classifier, with a choice of stem and width.

    Module names and initialisation follow torchvision's, so at width 64 with the standard stem the
    state dict has torchvision's keys and shapes.
    """

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        block, layers = RESNET_LAYOUTS[spec.arch]
        width = spec.width
        if spec.small_stem:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=spec.stem_stride, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if spec.small_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = width
        self.layer1 = self._make_stage(block, width, layers[0], stride=1)
        self.layer2 = self._make_stage(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_stage(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_stage(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.feature_dim = self.inplanes
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_stage(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            downsample = nn.Sequential(conv1x1(self.inplanes, out_channels, stride), nn.BatchNorm2d(out_channels))
        stage = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_channels
        stage += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def backbone_state_dict(self) -> OrderedDict[str, Tensor]:
        """The weights as stream-swav writes them (backbone.pt, `stream-swav export`): a CPU copy
        keyed as `torchvision.models.<arch>()` without the classifier, with the spec recorded
        under `SPEC_METADATA_KEY` of its `_metadata`."""
        state = self.state_dict()
        weights = OrderedDict((k, v.detach().to("cpu", copy=True)) for k, v in state.items())
        weights._metadata = {**state._metadata, SPEC_METADATA_KEY: self.spec.to_record()}  # type: ignore[attr-defined]
        return weights


def build_backbone(spec: BackboneSpec) -> tuple[ResNetTrunk, int]:
    """A randomly initialised ResNet trunk and its feature width."""
    backbone = ResNetTrunk(spec)
    return backbone, backbone.feature_dim


def recorded_spec(state_dict: Mapping[str, Tensor]) -> BackboneSpec | None:
    """The spec a backbone state dict records (see `SPEC_METADATA_KEY`), or None when it records
    none (files written before it was recorded, or a dict rebuilt without its `_metadata`)."""
    metadata = getattr(state_dict, "_metadata", None)
    record = metadata.get(SPEC_METADATA_KEY) if isinstance(metadata, Mapping) else None
    if record is None:
        return None
    if not isinstance(record, Mapping):
        raise ValueError(f"the recorded backbone spec is not a mapping: {record!r}")
    return BackboneSpec.from_record(record)


def load_backbone(source: str | os.PathLike[str] | Mapping[str, Tensor],
                  spec: BackboneSpec | None = None) -> ResNetTrunk:
    """The feature extractor of a backbone file (a local path) or state dict, in eval mode:
    it returns pooled features (its `fc` is `nn.Identity`).

    The architecture is the spec the weights record; `spec` is needed only for files that record
    none (their checkpoint's latest.json or meta.json has it), and is checked against the recorded
    one otherwise. The zero `fc` placeholders of such older files are dropped. Any other missing,
    extra or mis-shaped key raises ValueError.
    """
    if isinstance(source, (str, os.PathLike)):
        state = torch.load(source, map_location="cpu", weights_only=True)
    else:
        state = source
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict (dict of tensors), got {type(state).__name__}")
    recorded = recorded_spec(state)
    if spec is None and recorded is None:
        raise ValueError("the weights record no backbone spec (written before stream-swav recorded it); "
                         "pass the spec from the checkpoint's meta.json: load_backbone(path, BackboneSpec(...))")
    if spec is not None and recorded is not None and spec != recorded:
        raise ValueError(f"state dict does not match {spec.describe()}: it records {recorded.describe()}")
    spec = spec or recorded
    backbone = ResNetTrunk(spec)
    weights = {k: v for k, v in state.items() if k not in PLACEHOLDER_FC_KEYS}
    try:
        backbone.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ValueError(f"state dict does not match {spec.describe()}: {error}") from error
    return backbone.eval()


class SwAVModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.spec = BackboneSpec.from_config(cfg)
        self.backbone, self.feature_dim = build_backbone(self.spec)
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

    def backbone_state_dict(self) -> OrderedDict[str, Tensor]:
        """Backbone weights on CPU, keyed as in `torchvision.models.<arch>()` without `fc`
        (SwAV trains no classifier), with the spec recorded (see `ResNetTrunk.backbone_state_dict`).

        When `spec.torchvision_compatible`, `m = torchvision.models.<arch>(); m.fc = nn.Identity()`
        loads it with `strict=True`; any spec loads with `load_backbone(state)`.
        """
        return self.backbone.backbone_state_dict()


__all__ = ["BackboneSpec", "ResNetTrunk", "SwAVModel", "build_backbone", "load_backbone", "recorded_spec"]
