"""`stream-swav export`: a checkpoint's backbone as a torchvision-keyed state_dict, optionally a torch.export program.

The state_dict (``--out``, a torch.save file) is keyed as the torchvision model without its
classifier (SwAV trains none), and records the backbone's spec. Every ViT, every RegNet with its
own stem and every ResNet with torchvision's stem at width 64 loads strictly into torchvision::

    model = torchvision.models.resnet50()   # or regnet_y_16gf(), vit_b_16(), VisionTransformer(...)
    model.fc = torch.nn.Identity()          # pooled features (a ViT's classifier is model.heads)
    model.load_state_dict(torch.load("resnet50-swav.pt", weights_only=True))
    model.eval()

Any backbone (small stem, a width other than 64, resnet10) loads with
``stream_swav.load_backbone("resnet50-swav.pt")``, which reads the spec from the file.
The command prints the snippet that fits what it wrote.

``--pt2`` also writes ``<out stem>.pt2``: the feature extractor (pooled features) as a
``torch.export`` program taking any batch size at a fixed image size, checked against
the eager module on a dummy batch before it is saved. ``torch.export.load(path).module()``
runs it without stream-swav.
"""
from __future__ import annotations

import argparse
import io
import sys
from typing import Any

import torch
from torch import nn

from stream_swav import storage
from stream_swav.apps.refusals import refused
from stream_swav.config import StorageConfig
from stream_swav.model import BackboneSpec
from stream_swav.checkpoint import load_resolved_backbone, resolve_checkpoint

# The dummy batch that checks the exported program; more than one image, as torch.export
# specialises a dimension of size 1.
CHECK_BATCH = 2


def export_program(backbone: nn.Module, image_size: int) -> torch.export.ExportedProgram:
    """torch.export of the feature extractor in eval mode, with a free batch dimension and
    image_size x image_size inputs, verified on a dummy batch against eager mode."""
    backbone = backbone.eval()
    dummy = torch.randn(CHECK_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(backbone, (dummy,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    with torch.no_grad():
        expected, got = backbone(dummy), program.module()(dummy)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"the exported program's output differs from eager: {tuple(got.shape)} vs "
                           f"{tuple(expected.shape)}, max difference {(got - expected).abs().max().item():.3g}")
    return program


def pt2_path(out: str) -> str:
    stem = out[:-3] if out.endswith(".pt") else out
    return f"{stem}.pt2"


def export_backbone(checkpoint: str, out: str, *, pt2: bool = False, image_size: int = 0,
                    storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    """Write the state_dict (and the torch.export program) of `checkpoint`'s backbone; returns what
    was written. Backbone files of every format are read; the output is always the current one."""
    storage_cfg = storage_cfg or StorageConfig()
    resolved = resolve_checkpoint(checkpoint, storage_cfg)
    backbone = load_resolved_backbone(resolved, storage_cfg)
    buffer = io.BytesIO()
    torch.save(backbone.backbone_state_dict(), buffer)
    storage.write_bytes_atomic(out, buffer.getvalue(), storage_cfg)
    written = {"state_dict": out, **resolved.spec.to_record(), "step": resolved.step,
               "images_seen": resolved.images_seen, "bytes": buffer.tell()}
    if pt2:
        size = image_size or resolved.global_crop_size() or 224
        program_buffer = io.BytesIO()
        torch.export.save(export_program(backbone, size), program_buffer)
        written.update(pt2=pt2_path(out), pt2_image_size=size)
        storage.write_bytes_atomic(written["pt2"], program_buffer.getvalue(), storage_cfg)
    return written


def _local_name(url: str) -> tuple[str, list[str]]:
    """The path a loading snippet names, and comment lines for a file that has to be fetched first."""
    protocol, path = storage.split_protocol(url)
    if protocol == "file":
        return path, []
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name, [f"# after downloading {url} to {name}"]


def loading_snippet(written: dict[str, Any]) -> list[str]:
    """Python lines that load the state_dict `export_backbone` wrote into `model` (a feature extractor)."""
    path, comments = _local_name(written["state_dict"])
    spec = BackboneSpec.from_record(written)
    constructor = spec.torchvision_constructor()
    if constructor:
        return [*comments, "import torch, torchvision",
                f"model = {constructor}",
                f"model.{spec.classifier} = torch.nn.Identity()  # SwAV trains no classifier: the model returns "
                f"{'the class token' if spec.family == 'vit' else 'pooled features'}",
                f"model.load_state_dict(torch.load({path!r}, weights_only=True))",
                "model.eval()"]
    return [*comments, "import stream_swav",
            f"model = stream_swav.load_backbone({path!r})  # {spec.describe()}, eval mode, pooled features"]


def program_snippet(written: dict[str, Any]) -> list[str]:
    """Python lines that load the torch.export program into `model`."""
    path, comments = _local_name(written["pt2"])
    return [*comments, "import torch", f"model = torch.export.load({path!r}).module()"]


def run(args: argparse.Namespace) -> int:
    if args.image_size < 0:
        print("export: --image-size must be >= 0", file=sys.stderr)
        return 2
    storage_cfg = StorageConfig(endpoint_url=args.endpoint_url)
    try:
        written = export_backbone(args.checkpoint, args.out, pt2=args.pt2, image_size=args.image_size,
                                  storage_cfg=storage_cfg)
    except Exception as error:  # noqa: BLE001 - refused in one line, or raised (see `refused`)
        return refused("export", error, "--checkpoint / --out", f"{args.checkpoint} / {args.out}", storage_cfg,
                       (FileNotFoundError, ValueError, RuntimeError))
    spec = BackboneSpec.from_record(written)
    print(f"{spec.describe()} backbone of step {written['step']} -> {written['state_dict']} "
          f"({written['bytes'] / 1e6:.1f} MB); load it with:")
    print("\n".join(f"    {line}" for line in loading_snippet(written)))
    if "pt2" in written:
        size = written["pt2_image_size"]
        print(f"torch.export feature extractor (N x 3 x {size} x {size} images) -> {written['pt2']}; load it with:")
        print("\n".join(f"    {line}" for line in program_snippet(written)))
    return 0
