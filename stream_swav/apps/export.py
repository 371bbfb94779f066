"""`stream-swav export`: a checkpoint's backbone as a torchvision state_dict, optionally TorchScript.

The state_dict (``--out``, a torch.save file) is keyed as ``torchvision.models.<arch>()``
and includes the zero ``fc`` placeholders, so with the standard stem it loads
with ``strict=True``::

    model = torchvision.models.resnet50()
    model.load_state_dict(torch.load("backbone.pt", weights_only=True))
    model.fc = torch.nn.Identity()          # SwAV trained no classifier

Other backbones (small stem, a width other than 64, resnet10) have the same
keys but other shapes; they load into ``stream_swav.model.build_backbone(spec)``,
with the spec printed by the export and stored beside the weights'
checkpoint, or run without stream-swav through ``--torchscript``.

``--torchscript`` also writes ``<out stem>.torchscript.pt``: the feature
extractor (pooled features, no classifier) compiled with torch.jit.script,
checked against the eager module on a dummy batch before it is saved. Load it
with ``torch.jit.load`` and no stream-swav code.
"""
from __future__ import annotations

import argparse
import io
import sys
from typing import Any

import torch
from torch import Tensor, nn

from stream_swav import storage
from stream_swav.config import StorageConfig
from stream_swav.model import FC_KEYS, TORCHVISION_CLASSES, BackboneSpec, load_backbone
from stream_swav import checkpoint as ckpt
from stream_swav.checkpoint import resolve_checkpoint


def torchvision_state_dict(state: dict[str, Tensor], spec: BackboneSpec) -> dict[str, Tensor]:
    """The backbone weights, validated by a strict load, plus zero fc placeholders of
    torchvision's shape (SwAV trains no classifier; whatever fc the input had is dropped)."""
    backbone = load_backbone(state, spec)
    exported = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    feature_dim = backbone.feature_dim
    dtype = exported["conv1.weight"].dtype
    exported[FC_KEYS[0]] = torch.zeros(TORCHVISION_CLASSES, feature_dim, dtype=dtype)
    exported[FC_KEYS[1]] = torch.zeros(TORCHVISION_CLASSES, dtype=dtype)
    return exported


def script_backbone(backbone: nn.Module, image_size: int) -> torch.jit.ScriptModule:
    """torch.jit.script of the feature extractor, verified on a dummy batch against eager mode."""
    backbone = backbone.eval()
    scripted = torch.jit.script(backbone)
    dummy = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = backbone(dummy), scripted(dummy)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"TorchScript output differs from eager: {tuple(got.shape)} vs {tuple(expected.shape)}, "
                           f"max difference {(got - expected).abs().max().item():.3g}")
    return scripted


def torchscript_path(out: str) -> str:
    stem = out[:-3] if out.endswith(".pt") else out
    return f"{stem}.torchscript.pt"


def export_backbone(checkpoint: str, out: str, *, torchscript: bool = False, image_size: int = 0,
                    storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    """Write the state_dict (and TorchScript module) of `checkpoint`'s backbone; returns what was written."""
    storage_cfg = storage_cfg or StorageConfig()
    resolved = resolve_checkpoint(checkpoint, storage_cfg)
    state = ckpt.load_backbone_state(resolved.backbone_url, storage_cfg)
    exported = torchvision_state_dict(state, resolved.spec)
    buffer = io.BytesIO()
    torch.save(exported, buffer)
    storage.write_bytes_atomic(out, buffer.getvalue(), storage_cfg)
    written = {"state_dict": out, **resolved.spec.to_record(), "step": resolved.step,
               "images_seen": resolved.images_seen, "bytes": buffer.tell()}
    if torchscript:
        size = image_size or resolved.global_crop_size() or 224
        scripted = script_backbone(load_backbone(exported, resolved.spec), size)
        script_buffer = io.BytesIO()
        torch.jit.save(scripted, script_buffer)
        written["torchscript"] = torchscript_path(out)
        storage.write_bytes_atomic(written["torchscript"], script_buffer.getvalue(), storage_cfg)
    return written


def run(args: argparse.Namespace) -> int:
    try:
        written = export_backbone(args.checkpoint, args.out, torchscript=args.torchscript,
                                  image_size=args.image_size, storage_cfg=StorageConfig(endpoint_url=args.endpoint_url))
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"export: {error}", file=sys.stderr)
        return 2
    spec = BackboneSpec.from_record(written)
    loads_into = (f"torchvision.models.{spec.arch}()" if spec.torchvision_compatible
                  else f"stream_swav.model.build_backbone({spec!r})")
    print(f"{spec.describe()} backbone of step {written['step']} "
          f"-> {written['state_dict']} ({written['bytes'] / 1e6:.1f} MB), loads into {loads_into}")
    if "torchscript" in written:
        print(f"TorchScript feature extractor -> {written['torchscript']}")
    return 0
