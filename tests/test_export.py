"""`stream-swav export`: the backbone loads into torchvision strictly, and the TorchScript module runs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from stream_swav import cli
from stream_swav.apps import export
from stream_swav.config import StorageConfig, config_from_dict
from stream_swav.model import BackboneSpec, SwAVModel, load_backbone
from stream_swav.checkpoint import save_checkpoint

STORAGE = StorageConfig()


def save_trained_looking_checkpoint(root: Path, small_stem: bool, step: int = 40) -> SwAVModel:
    cfg = config_from_dict({"model": {"arch": "resnet18", "small_stem": small_stem, "hidden_dim": 32,
                                      "output_dim": 16, "prototypes": 10},
                            "crops": {"global_size": 32, "local_size": 16}})
    torch.manual_seed(step)
    model = SwAVModel(cfg.model)
    # Non-default BatchNorm statistics, as after training, so a dropped buffer would show.
    with torch.no_grad():
        for module in model.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    save_checkpoint(str(root), step, step * 256, {"config": cfg.to_dict()}, model.backbone_state_dict(),
                    {"arch": "resnet18", "small_stem": small_stem, "metrics": {"loss": 6.0}}, STORAGE)
    return model


# torch 2.14 marks TorchScript deprecated; it still works and is what users of TorchScript need.
@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_export_loads_into_torchvision_strictly_and_torchscript_runs(tmp_path, capsys):
    model = save_trained_looking_checkpoint(tmp_path / "checkpoints", small_stem=False)
    out = tmp_path / "export" / "resnet18-swav.pt"
    rc = cli.main(["export", "--checkpoint", str(tmp_path / "checkpoints"), "--out", str(out), "--torchscript"])
    assert rc == 0
    assert "resnet18-swav.torchscript.pt" in capsys.readouterr().out

    state = torch.load(out, weights_only=True)
    resnet = torchvision.models.resnet18()
    resnet.load_state_dict(state, strict=True)
    assert torch.equal(resnet.conv1.weight, model.backbone.conv1.weight)
    assert torch.equal(resnet.layer4[1].bn2.running_var, model.backbone.layer4[1].bn2.running_var)
    assert resnet.fc.weight.abs().sum() == 0

    scripted = torch.jit.load(str(tmp_path / "export" / "resnet18-swav.torchscript.pt"))
    images = torch.randn(3, 3, 40, 40)
    model.eval()
    resnet.fc = nn.Identity()
    resnet.eval()
    with torch.no_grad():
        features = scripted(images)
        assert features.shape == (3, 512)
        torch.testing.assert_close(features, model.embed(images), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(features, resnet(images), rtol=1e-4, atol=1e-4)


def test_small_stem_export_loads_after_swapping_the_stem(tmp_path):
    model = save_trained_looking_checkpoint(tmp_path / "checkpoints", small_stem=True)
    out = tmp_path / "small.pt"
    written = export.export_backbone(str(tmp_path / "checkpoints" / "step-000000040"), str(out))
    assert written["small_stem"] and written["step"] == 40 and "torchscript" not in written

    resnet = torchvision.models.resnet18()
    with pytest.raises(RuntimeError, match="size mismatch"):
        resnet.load_state_dict(torch.load(out, weights_only=True), strict=True)
    resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    resnet.maxpool = nn.Identity()
    resnet.load_state_dict(torch.load(out, weights_only=True), strict=True)
    resnet.fc = nn.Identity()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(resnet.eval()(images), model.eval().embed(images))


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_narrow_backbone_exports_with_its_spec_and_as_torchscript(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    cfg = config_from_dict({"model": {"arch": "resnet10", "small_stem": True, "stem_stride": 2, "width": 8,
                                      "hidden_dim": 32, "output_dim": 16, "prototypes": 10},
                            "crops": {"global_size": 28, "local_size": 16}})
    model = SwAVModel(cfg.model).eval()
    spec = BackboneSpec.from_config(cfg.model)
    save_checkpoint(str(root), 40, 40 * 64, {"model": model.state_dict(), "config": cfg.to_dict()},
                    model.backbone_state_dict(), {**spec.to_record(), "metrics": {"loss": 6.0}}, STORAGE)
    out = tmp_path / "narrow.pt"
    assert cli.main(["export", "--checkpoint", str(root), "--out", str(out), "--torchscript"]) == 0
    printed = capsys.readouterr().out
    assert "resnet10 (width 8, small stem, stride 2)" in printed and "build_backbone(BackboneSpec(" in printed
    backbone = load_backbone(torch.load(out, weights_only=True), spec).eval()
    scripted = torch.jit.load(export.torchscript_path(str(out)))
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), model.embed(images))
        torch.testing.assert_close(scripted(images), model.embed(images), rtol=1e-4, atol=1e-4)


def test_export_of_a_missing_or_wrong_checkpoint_is_a_clean_error(tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "no backbone" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()

    # Weights of another architecture than the record claims: refused by the strict load.
    save_trained_looking_checkpoint(tmp_path / "checkpoints", small_stem=False)
    state = torchvision.models.resnet34().state_dict()
    torch.save(state, tmp_path / "checkpoints" / "step-000000040" / "backbone.pt")
    assert cli.main(["export", "--checkpoint", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "y.pt")]) == 2
    assert "does not match resnet18" in capsys.readouterr().err
    assert not (tmp_path / "y.pt").exists()


def test_torchscript_path():
    assert export.torchscript_path("a/b.pt") == "a/b.torchscript.pt"
    assert export.torchscript_path("s3://bucket/model") == "s3://bucket/model.torchscript.pt"
