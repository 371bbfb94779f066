"""SwAV network: a backbone (ResNet, RegNet or ViT), a projection head, a prototype layer.

The learner feeds crops grouped by resolution; each group is one backbone call (a ViT interpolates
its position embeddings to the group's patch grid), and the projection head then sees every crop of
the step at once so its BatchNorm statistics cover all of them, as in the reference implementation.

Every backbone keeps torchvision's module names, so its weights load strictly into the torchvision
model it is built like (`BackboneSpec.torchvision_constructor`) with the classifier replaced by
`nn.Identity()`; `load_backbone` loads any of them, however configured.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models import VisionTransformer
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from stream_swav.backbone_spec import SPEC_METADATA_KEY, BackboneSpec, recorded_spec
from stream_swav.config import RESNET_ARCHS, ModelConfig

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
assert set(RESNET_LAYOUTS) == set(RESNET_ARCHS)


def check_state_dict(saved: Any, module: nn.Module, name: str) -> None:
    """Raise ValueError, starting with `name`, unless `saved` has exactly `module`'s state-dict keys
    with tensors of its shapes: checked before anything is loaded, so a bad state changes nothing."""
    if not isinstance(saved, Mapping):
        raise ValueError(f"{name}: expected a dict of tensors, got {type(saved).__name__}")
    own = module.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if missing or unexpected:
        raise ValueError(f"{name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in own.items():
        tensor = saved[key]
        if not isinstance(tensor, Tensor) or tensor.shape != value.shape:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name}.{key}: expected shape {tuple(value.shape)}, got {shape}")


class Trunk:
    """What every backbone module offers besides `forward` (images -> pooled features): its spec,
    its feature width and its weights as stream-swav writes them."""

    spec: BackboneSpec
    feature_dim: int

    def backbone_state_dict(self) -> OrderedDict[str, Tensor]:
        """The weights as stream-swav writes them (backbone.pt, `stream-swav export`): a CPU copy
        keyed as the torchvision model without its classifier, with the spec recorded under
        `SPEC_METADATA_KEY` of its `_metadata`."""
        state = self.state_dict()  # type: ignore[attr-defined]
        weights = OrderedDict((k, v.detach().to("cpu", copy=True)) for k, v in state.items())
        weights._metadata = {**state._metadata, SPEC_METADATA_KEY: self.spec.to_record()}  # type: ignore[attr-defined]
        return weights


class ResNetTrunk(Trunk, nn.Module):
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
        self.avgpool = nn.AdaptiveAvgPool2d((spec.feature_grid, spec.feature_grid))
        self.fc = nn.Identity()
        self.feature_dim = self.inplanes * spec.feature_grid ** 2
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


class RegNetTrunk(Trunk, nn.Module):
    """torchvision's RegNet without its classifier: its stem and stages, under torchvision's names
    and with its initialisation; the small stem is the same convolution at stride 1."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        net = getattr(torchvision.models, spec.arch)()
        self.stem, self.trunk_output, self.avgpool = net.stem, net.trunk_output, net.avgpool
        if spec.small_stem:
            self.stem[0].stride = (1, 1)
        self.fc = nn.Identity()
        self.feature_dim = net.fc.in_features

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.trunk_output(self.stem(x))), 1))


class ViTTrunk(Trunk, VisionTransformer):
    """torchvision's VisionTransformer without its classifier, for any crop size that is a multiple
    of the patch size: the position embeddings, kept as weights for `vit_image_size`, are
    interpolated bicubically to other patch grids (as DINO does for multi-crop). The feature is the
    class token after the final LayerNorm, what torchvision's classifier reads; at the native size
    the output is torchvision's."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__(image_size=spec.vit_image_size, patch_size=spec.vit_patch_size, num_layers=spec.vit_layers,
                         num_heads=spec.vit_heads, hidden_dim=spec.width, mlp_dim=4 * spec.width)
        self.spec = spec
        self.heads = nn.Identity()
        self.feature_dim = spec.width

    def position_embedding(self, rows: int, cols: int) -> Tensor:
        """(1, 1 + rows * cols, width) embeddings for a rows x cols patch grid."""
        embedding = self.encoder.pos_embedding
        grid = self.image_size // self.patch_size
        if (rows, cols) == (grid, grid):
            return embedding
        patches = embedding[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([embedding[:, :1], patches.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.conv_proj(x)
        n, _, rows, cols = tokens.shape
        tokens = torch.cat([self.class_token.expand(n, -1, -1), tokens.flatten(2).transpose(1, 2)], dim=1)
        tokens = self.encoder.dropout(tokens + self.position_embedding(rows, cols))
        return self.heads(self.encoder.ln(self.encoder.layers(tokens))[:, 0])


TRUNKS: dict[str, type[nn.Module]] = {"resnet": ResNetTrunk, "regnet": RegNetTrunk, "vit": ViTTrunk}


def build_backbone(spec: BackboneSpec) -> tuple[nn.Module, int]:
    """A randomly initialised backbone of `spec`'s family and its feature width."""
    backbone = TRUNKS[spec.family](spec)
    return backbone, backbone.feature_dim


def load_backbone(source: str | os.PathLike[str] | Mapping[str, Tensor],
                  spec: BackboneSpec | None = None) -> nn.Module:
    """The feature extractor of a backbone file (a local path) or state dict, in eval mode:
    it returns pooled features (its classifier is `nn.Identity`).

    The architecture is the spec the weights record; `spec` is needed only for files that record
    none (their checkpoint's latest.json or meta.json has it), and is checked against the recorded
    one otherwise. The zero `fc` placeholders of such older files are dropped. Any other missing,
    extra or mis-shaped key raises ValueError.
    """
    if isinstance(source, (str, os.PathLike)):
        from stream_swav.checkpoint import check_stored_entries  # checkpoint builds models through here

        data = Path(source).read_bytes()
        check_stored_entries(data, str(source))
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
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
    weights = {k: v for k, v in state.items() if k not in PLACEHOLDER_FC_KEYS or spec.family != "resnet"}
    # Checked against a network without storage first: a spec forged into a small file (a ResNet-50
    # 256 wide, a ViT of any depth) would otherwise take gigabytes to build before any weight was
    # found to match. torchvision's RegNets cannot be built so (they compute their widths with
    # tensors), but their sizes are the fixed presets of their names.
    try:
        with torch.device("meta"):
            skeleton, _ = build_backbone(spec)
    except NotImplementedError:
        skeleton = None
    if skeleton is not None:
        check_state_dict(weights, skeleton, f"state dict does not match {spec.describe()}")
    backbone, _ = build_backbone(spec)
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
        if self.spec.family == "vit":
            # DINO's head for ViTs: no BatchNorm, so a ViT run has none to synchronise and no batch
            # statistics couple its crops.
            hidden: list[nn.Module] = [nn.Linear(self.feature_dim, cfg.hidden_dim), nn.GELU()]
        else:
            hidden = [nn.Linear(self.feature_dim, cfg.hidden_dim), nn.BatchNorm1d(cfg.hidden_dim), nn.ReLU(inplace=True)]
        self.projection = nn.Sequential(*hidden, nn.Linear(cfg.hidden_dim, cfg.output_dim))
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
        return self.head(torch.cat([self.backbone(group) for group in crops]))

    def head(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """z, unit rows, and the prototype scores z @ C^T of backbone features (N, feature_dim), both
        float32 whatever autocast computes the rest in: Sinkhorn takes exp(score / 0.05), where
        bf16's 8 significant bits would put ~5% of noise on the codes, and the queue's rows are
        scored in float32 too (a output_dim x prototypes product: nothing to save)."""
        projected = self.projection(features)
        with torch.autocast(device_type=projected.device.type, enabled=False):
            z = F.normalize(projected.float(), dim=1)
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
        """Backbone weights on CPU, keyed as the torchvision model without its classifier (SwAV
        trains none), with the spec recorded (see `Trunk.backbone_state_dict`).

        When `spec.torchvision_constructor()` names a model, that model with its classifier
        (`spec.classifier`) set to nn.Identity() loads it with `strict=True`; any spec loads with
        `load_backbone(state)`.
        """
        return self.backbone.backbone_state_dict()


__all__ = ["BackboneSpec", "RegNetTrunk", "ResNetTrunk", "SwAVModel", "Trunk", "ViTTrunk", "build_backbone",
           "check_state_dict", "load_backbone", "recorded_spec"]
