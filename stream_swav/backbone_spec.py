"""What a backbone is, without building one: `BackboneSpec`, which every checkpoint records, and
`recorded_spec`, which reads it back from a backbone file's state dict.

Apart from `stream_swav.model` (which builds the networks, with torchvision) so that whatever only
records or reads a spec (the training driver, checkpoint bookkeeping) does not import torchvision:
a few seconds of CPU at every start of `stream-swav train`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from stream_swav.config import ARCHS, VIT_KEYS, VIT_SHAPES, ModelConfig, arch_family, backbone_rules, vit_shape

TORCHVISION_WIDTH = 64
# A backbone file records its BackboneSpec under this key of the state dict's `_metadata`: the
# per-module metadata PyTorch keeps on every state dict. It survives torch.save and
# torch.load(weights_only=True), and load_state_dict only reads the entries of the modules it
# loads, so the file describes itself and still loads strictly into torchvision's model.
SPEC_METADATA_KEY = "stream_swav.backbone_spec"

def _torchvision_models() -> Any:
    import torchvision.models

    return torchvision.models


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild a backbone from its weights; every checkpoint records it.

    The fields mirror the `model` config section. Zeros meaning "the architecture's own" are
    resolved on construction, so two specs of the same network are equal however they were written.
    """

    arch: str
    # ResNet: CIFAR-style stem (3x3 convolution, no max-pool); RegNet: a stride-1 stem. For 28-64 px images.
    small_stem: bool = False
    # Stride of a ResNet's small stem: 2 runs the first stage at half resolution (14x14 for 28 px).
    stem_stride: int = 1
    # ResNet: channels of the first stage, doubled at each later one (torchvision: 64). ViT: token width.
    width: int = 0
    # ViT only: patch size, encoder blocks, attention heads, resolution of the position embeddings.
    vit_patch_size: int = 0
    vit_layers: int = 0
    vit_heads: int = 0
    vit_image_size: int = 0
    # ResNet: the side of the grid the last stage is average-pooled to, flattened (1: global pooling).
    feature_grid: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or self.arch not in ARCHS:
            raise ValueError(f"unknown backbone {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if not isinstance(self.small_stem, bool):
            raise ValueError(f"small_stem must be true or false, got {self.small_stem!r}")
        if isinstance(self.feature_grid, bool) or not isinstance(self.feature_grid, int) or self.feature_grid < 1:
            raise ValueError(f"feature_grid must be an integer >= 1, got {self.feature_grid!r}")
        for name in ("stem_stride", "width", *VIT_KEYS):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        if self.family == "resnet" and self.width == 0:
            object.__setattr__(self, "width", TORCHVISION_WIDTH)
        if self.family == "vit":
            shape = vit_shape(self)
            for name, value in (("width", shape.width), ("vit_patch_size", shape.patch_size),
                                ("vit_layers", shape.layers), ("vit_heads", shape.heads),
                                ("vit_image_size", shape.image_size)):
                object.__setattr__(self, name, value)
        for key, holds, message, value in backbone_rules(self):
            if not holds:
                raise ValueError(f"{key}: {message}, got {value!r}")

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "BackboneSpec":
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "BackboneSpec":
        """From a checkpoint record or a `model` config section; every field but arch and small_stem
        may be absent (checkpoints written before it existed). Raises ValueError naming what is wrong."""
        arch, small_stem = record.get("arch"), record.get("small_stem")
        if not isinstance(arch, str) or not isinstance(small_stem, bool):
            raise ValueError(f"a backbone needs arch (str) and small_stem (bool), got arch={arch!r}, "
                             f"small_stem={small_stem!r}")
        return cls(arch, small_stem, **{f.name: record.get(f.name, f.default) for f in fields(cls)[2:]})

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def family(self) -> str:
        """resnet, regnet or vit."""
        return arch_family(self.arch)

    @property
    def classifier(self) -> str:
        """The torchvision model's classifier attribute, which stream-swav's backbones replace with nn.Identity()."""
        return "heads" if self.family == "vit" else "fc"

    def torchvision_constructor(self) -> str | None:
        """The Python expression of the torchvision model these weights load into strictly (its
        classifier set to nn.Identity()) and that computes the same features; None when there is none
        (resnet10, a small stem, a ResNet width other than 64)."""
        if self.family == "vit":
            if vit_shape(self) == VIT_SHAPES[self.arch] and hasattr(_torchvision_models(), self.arch):
                return f"torchvision.models.{self.arch}()"
            return (f"torchvision.models.VisionTransformer(image_size={self.vit_image_size}, "
                    f"patch_size={self.vit_patch_size}, num_layers={self.vit_layers}, num_heads={self.vit_heads}, "
                    f"hidden_dim={self.width}, mlp_dim={4 * self.width})")
        if self.small_stem or (self.family == "resnet" and (self.width != TORCHVISION_WIDTH or self.feature_grid != 1)):
            return None
        return f"torchvision.models.{self.arch}()" if hasattr(_torchvision_models(), self.arch) else None

    def describe(self) -> str:
        details = []
        if self.family == "vit":
            default = VIT_SHAPES[self.arch]
            for value, own, text in ((self.width, default.width, f"width {self.width}"),
                                     (self.vit_layers, default.layers, f"{self.vit_layers} layers"),
                                     (self.vit_heads, default.heads, f"{self.vit_heads} heads"),
                                     (self.vit_patch_size, default.patch_size, f"patch {self.vit_patch_size}"),
                                     (self.vit_image_size, default.image_size, f"{self.vit_image_size} px")):
                if value != own:
                    details.append(text)
        elif self.family == "regnet":
            if self.small_stem:
                details.append("stride-1 stem")
        else:
            if self.width != TORCHVISION_WIDTH:
                details.append(f"width {self.width}")
            if self.small_stem:
                details.append("small stem" + (f", stride {self.stem_stride}" if self.stem_stride != 1 else ""))
            if self.feature_grid != 1:
                details.append(f"{self.feature_grid}x{self.feature_grid} feature grid")
        return self.arch + (f" ({', '.join(details)})" if details else "")


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


__all__ = ["BackboneSpec", "SPEC_METADATA_KEY", "TORCHVISION_WIDTH", "recorded_spec"]
