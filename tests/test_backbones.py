"""Every backbone family (ResNet, RegNet, ViT) through the user's path: `stream-swav train` on real
shards, a resume from its checkpoint, `export` (state_dict and torch.export
program), a strict load into torchvision's own model, `eval` and `follow` on labelled shards.

CPU-sized members of each family: the same classes and code paths as the full-size ones, only
configured smaller (a 16 px crop, a 4-pixel-patch ViT of width 32). The runs share one local Ray
started by the module (a private Ray per run costs ~8 s each; tests/test_demo.py and test_resume.py
start theirs the user's way).
"""
from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
import torchvision
from torch import nn

from runtime_helpers import RAY_ENV, resumed_step, write_config
from stream_swav import cli
from stream_swav.apps.datasets import procedural_dataset
from stream_swav.apps.make_shards import array_samples, write_shards
from stream_swav.checkpoint import resolve_checkpoint
from stream_swav.config import StorageConfig
from stream_swav.model import BackboneSpec, ViTTrunk, build_backbone, load_backbone, recorded_spec

STORAGE = StorageConfig()
SIZE = 16
FAMILIES: dict[str, dict[str, Any]] = {
    "resnet": {"arch": "resnet10", "width": 8, "small_stem": True},
    "regnet": {"arch": "regnet_y_400mf", "width": 0, "small_stem": False},
    "vit": {"arch": "vit_s_16", "small_stem": False, "width": 32, "vit_layers": 2, "vit_heads": 2,
            "vit_patch_size": 4, "vit_image_size": SIZE},
}
OPTIM = {"vit": {"base_lr": 5e-4, "warmup_images": 16}}


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory) -> tuple[str, str]:
    """Train (64 images, also the training stream) and test (32) shards of 16 px labelled images."""
    root = tmp_path_factory.mktemp("family-shards")
    specs = []
    for name, count, seed in (("train", 64, 0), ("test", 32, 1)):
        images, labels = procedural_dataset(count, seed=seed, size=SIZE)
        write_shards(array_samples(images, labels, size=SIZE), root / name, 16, 1 << 30, STORAGE)
        specs.append(str(root / name))
    return specs[0], specs[1]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env=RAY_ENV, log_to_driver=False)
    yield
    ray.shutdown()


def train(config: Path, budget: int) -> int:
    return cli.main(["train", "--config", str(config), "--set", f"train.image_budget={budget}"])


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_resumes_exports_and_loads_into_torchvision(family, labelled_shards, local_ray, tmp_path,
                                                                        caplog, capsys):
    train_spec, test_spec = labelled_shards
    checkpoints = tmp_path / "checkpoints"
    config = write_config(tmp_path / "config.yaml", {
        "model": {**FAMILIES[family], "hidden_dim": 32, "output_dim": 16},
        "crops": {"global_size": SIZE, "local_size": 8},
        "optim": OPTIM.get(family, {}),
        "data": {"shards": train_spec},
        "checkpoint": {"dir": str(checkpoints), "every_steps": 2},
    })
    caplog.set_level(logging.INFO, logger="stream_swav")
    # Two steps (one checkpoint) each way: a run's cost is its actors' start, not its steps.
    assert train(config, 16) == 0
    assert resolve_checkpoint(str(checkpoints), STORAGE).images_seen == 16
    assert train(config, 32) == 0
    assert resumed_step(caplog.text) == 2  # 16 images at batch 8, then on to 32 from there
    resolved = resolve_checkpoint(str(checkpoints), STORAGE)
    assert resolved.images_seen == 32 and resolved.spec == BackboneSpec.from_record(FAMILIES[family])

    # export: the state_dict loads strictly into the torchvision model the snippet names, the
    # torch.export program gives the same features.
    capsys.readouterr()
    out = tmp_path / f"{family}.pt"
    assert cli.main(["export", "--checkpoint", str(checkpoints), "--out", str(out), "--pt2"]) == 0
    printed = capsys.readouterr().out
    snippet = textwrap.dedent("\n".join(line for line in printed.splitlines()[1:] if line.startswith("    ")
                                        and "torch.export.load" not in line))
    state = torch.load(out, weights_only=True)
    assert recorded_spec(state) == resolved.spec
    loaded = load_backbone(out)
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = loaded(images)
        program = torch.export.load(str(out.with_suffix(".pt2"))).module()
        torch.testing.assert_close(program(images), expected, rtol=1e-4, atol=1e-4)
    if family == "resnet":
        assert "stream_swav.load_backbone(" in snippet  # width 8: no torchvision model has these shapes
    else:
        constructor = resolved.spec.torchvision_constructor()
        assert constructor and constructor in snippet
        namespace: dict[str, Any] = {}
        exec(snippet.split("model.load_state_dict")[0], namespace)
        model = namespace["model"]
        assert isinstance(getattr(model, resolved.spec.classifier), nn.Identity)
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(images), expected)

    # eval and follow score it beside the references.
    result_path = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(checkpoints), "--train", train_spec, "--test", test_spec,
                     "--device", "cpu", "--batch-size", "16", "--json-out", str(result_path)]) == 0
    rows = {row["features"]: row for row in json.loads(result_path.read_text())["rows"]}
    assert rows["checkpoint"]["dim"] == loaded.feature_dim and 0.0 <= rows["checkpoint"]["knn_top1"] <= 1.0
    if family == "vit":  # no BatchNorm: recalibrating it changes nothing
        assert rows["random-init-data-bn"]["knn_top1"] == rows["random-init"]["knn_top1"]
    assert cli.main(["follow", "--checkpoints", str(checkpoints), "--train", train_spec, "--test", test_spec,
                     "--out", str(tmp_path / "follow"), "--once", "--device", "cpu", "--batch-size", "16"]) == 0
    followed = [json.loads(line) for line in (tmp_path / "follow" / "results.jsonl").read_text().splitlines()]
    assert followed and followed[-1]["images_seen"] == 32


def test_a_regnet_with_the_stride_one_stem_keeps_torchvisions_keys_but_loads_through_stream_swav():
    spec = BackboneSpec("regnet_y_400mf", small_stem=True)
    backbone, _ = build_backbone(spec)
    assert backbone.stem[0].stride == (1, 1) and spec.describe() == "regnet_y_400mf (stride-1 stem)"
    # Same keys and shapes as torchvision's, but another computation: no torchvision model to name.
    reference = torchvision.models.regnet_y_400mf()
    reference.fc = nn.Identity()
    reference.load_state_dict(backbone.backbone_state_dict(), strict=True)
    assert spec.torchvision_constructor() is None
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(backbone.backbone_state_dict())(images), backbone.eval()(images))


def test_vit_features_at_224_px_match_torchvisions_vit_b_16_with_the_same_weights():
    backbone, dim = build_backbone(BackboneSpec("vit_b_16"))
    reference = torchvision.models.vit_b_16()
    reference.heads = nn.Identity()
    reference.load_state_dict(backbone.backbone_state_dict(), strict=True)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = load_backbone(backbone.backbone_state_dict())(images)
        torch.testing.assert_close(features, reference.eval()(images), rtol=0, atol=0)
    assert features.shape == (2, dim) == (2, 768)


def test_vit_multi_crop_interpolates_position_embeddings_and_keeps_the_native_ones():
    spec = BackboneSpec.from_record({**FAMILIES["vit"], "vit_image_size": 32})
    vit = ViTTrunk(spec).eval()
    native = vit.encoder.pos_embedding.detach().clone()
    assert vit.position_embedding(8, 8) is vit.encoder.pos_embedding  # 32 px / 4 px patches: no resampling
    local = vit.position_embedding(2, 2)
    assert local.shape == (1, 1 + 4, 32)
    torch.testing.assert_close(local[:, 0], native[:, 0])  # the class token's embedding stays
    # Bicubic resampling of a constant grid is that constant.
    with torch.no_grad():
        vit.encoder.pos_embedding[:, 1:] = 0.5
    torch.testing.assert_close(vit.position_embedding(3, 5)[:, 1:], torch.full((1, 15, 32), 0.5))
    # Each crop size is its own group through the same weights; the parameters never change shape.
    with torch.no_grad():
        features = [vit(torch.randn(2, 3, size, size)) for size in (32, 16, 8)]
    assert [f.shape for f in features] == [(2, 32)] * 3
    assert vit.encoder.pos_embedding.shape == native.shape


def test_parameter_counts_of_the_recipes_backbones():
    """The counts README's architecture table states, from the models themselves (on the meta
    device where the builder allows it: no memory, no time; torchvision's RegNet builders compute
    their widths with tensors, so they are built for real)."""
    def count(arch: str, device: str) -> float:
        with torch.device(device):
            backbone, _ = build_backbone(BackboneSpec(arch))
        return round(sum(p.numel() for p in backbone.parameters()) / 1e6, 1)

    assert count("resnet50", "meta") == 23.5
    assert count("regnet_y_32gf", "cpu") == 141.3
    assert count("vit_s_16", "meta") == 21.7
