"""`stream-swav export`: the printed loading snippets work on the file written, the state_dict loads
into torchvision strictly, and the torch.export program runs without stream-swav."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from stream_swav import cli
from stream_swav.apps import export
from stream_swav.checkpoint import save_checkpoint
from stream_swav.config import StorageConfig, config_from_dict
from stream_swav.model import BackboneSpec, SwAVModel, recorded_spec

STORAGE = StorageConfig()
# Runs a loading snippet in a fresh interpreter where stream_swav cannot be imported, saving the
# model's features for the images in argv[1] to argv[2].
WITHOUT_STREAM_SWAV = """\
import sys
sys.modules["stream_swav"] = None  # any import of stream_swav now fails
{snippet}
import torch
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[1])), sys.argv[2])
"""


def trained_looking_model(cfg) -> SwAVModel:
    model = SwAVModel(cfg.model)
    # Non-default BatchNorm statistics, as after training, so a dropped buffer would show.
    with torch.no_grad():
        for module in model.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def save_trained_looking_checkpoint(root: Path, model_section: dict, crop_size: int, step: int = 40) -> SwAVModel:
    cfg = config_from_dict({"model": {**model_section, "hidden_dim": 32, "output_dim": 16, "prototypes": 10},
                            "crops": {"global_size": crop_size, "local_size": 16}})
    torch.manual_seed(step)
    model = trained_looking_model(cfg)
    save_checkpoint(str(root), step, step * 256, {"config": cfg.to_dict()}, model.backbone_state_dict(),
                    {**model.spec.to_record(), "metrics": {"loss": 6.0}}, STORAGE)
    return model


def printed_snippets(printed: str) -> list[str]:
    """The indented code blocks that follow each "load it with:" line."""
    snippets: list[list[str]] = []
    for line in printed.splitlines():
        if line.endswith("load it with:"):
            snippets.append([])
        elif snippets and line.startswith("    "):
            snippets[-1].append(line)
    return [textwrap.dedent("\n".join(lines)) for lines in snippets]


def run_snippet(snippet: str) -> nn.Module:
    namespace: dict = {}
    exec(snippet, namespace)
    return namespace["model"]


def features_without_stream_swav(snippet: str, images: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    torch.save(images, tmp_path / "images.pt")
    script = tmp_path / "load.py"
    script.write_text(WITHOUT_STREAM_SWAV.format(snippet=snippet))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-W", "error", str(script), str(tmp_path / "images.pt"),
                    str(tmp_path / "features.pt")], check=True, cwd=tmp_path, env=env, timeout=300)
    return torch.load(tmp_path / "features.pt", weights_only=True)


@pytest.mark.filterwarnings("error")
def test_torchvision_backbone_loads_as_printed_and_the_pt2_program_runs_without_stream_swav(tmp_path, capsys):
    model = save_trained_looking_checkpoint(tmp_path / "checkpoints", {"arch": "resnet18"}, crop_size=40)
    out = tmp_path / "export" / "resnet18-swav.pt"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "checkpoints"), "--out", str(out), "--pt2"]) == 0
    printed = capsys.readouterr().out
    load_state_dict, load_program = printed_snippets(printed)
    assert "torchvision.models.resnet18()" in load_state_dict and "N x 3 x 40 x 40" in printed

    state = torch.load(out, weights_only=True)
    assert not any(key.startswith("fc.") for key in state)
    assert recorded_spec(state) == BackboneSpec("resnet18")
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    resnet.load_state_dict(state, strict=True)
    assert torch.equal(resnet.layer4[1].bn2.running_var, model.backbone.layer4[1].bn2.running_var)

    images = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        expected = model.embed(images)
        torch.testing.assert_close(run_snippet(load_state_dict)(images), expected)
    assert features_without_stream_swav(load_state_dict, images, tmp_path).shape == (3, 512)
    # The program takes any batch size at the exported image size.
    torch.testing.assert_close(features_without_stream_swav(load_program, images, tmp_path), expected,
                               rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(run_snippet(load_program)(images[:1]), expected[:1], rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("error")
def test_narrow_backbone_loads_with_the_printed_one_call_loader_and_as_pt2(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    model = save_trained_looking_checkpoint(root, {"arch": "resnet10", "small_stem": True, "stem_stride": 2,
                                                   "width": 8}, crop_size=28)
    out = tmp_path / "narrow.pt"
    assert cli.main(["export", "--checkpoint", str(root), "--out", str(out), "--pt2"]) == 0
    printed = capsys.readouterr().out
    assert "resnet10 (width 8, small stem, stride 2) backbone of step 40" in printed
    load_state_dict, load_program = printed_snippets(printed)
    assert "stream_swav.load_backbone(" in load_state_dict

    images = torch.randn(2, 3, 28, 28)
    loaded = run_snippet(load_state_dict)
    assert not loaded.training and isinstance(loaded.fc, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model.embed(images))
        torch.testing.assert_close(run_snippet(load_program)(images), model.embed(images), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="size mismatch"):
        torchvision.models.resnet18().load_state_dict(torch.load(out, weights_only=True), strict=False)


def test_small_stem_export_loads_into_torchvision_after_swapping_the_stem(tmp_path):
    model = save_trained_looking_checkpoint(tmp_path / "checkpoints", {"arch": "resnet18", "small_stem": True},
                                            crop_size=16)
    out = tmp_path / "small.pt"
    written = export.export_backbone(str(tmp_path / "checkpoints" / "step-000000040"), str(out))
    assert written["small_stem"] and written["step"] == 40 and "pt2" not in written
    assert "stream_swav.load_backbone(" in "\n".join(export.loading_snippet(written))

    resnet = torchvision.models.resnet18()
    resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    resnet.maxpool = nn.Identity()
    resnet.fc = nn.Identity()
    resnet.load_state_dict(torch.load(out, weights_only=True), strict=True)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(resnet.eval()(images), model.embed(images))


def test_a_checkpoint_in_the_old_format_exports_in_the_new_one(tmp_path, capsys):
    """backbone.pt files written before the spec was recorded: zero fc placeholders, the spec only
    in meta.json."""
    root = tmp_path / "checkpoints"
    cfg = config_from_dict({"model": {"arch": "resnet18", "hidden_dim": 32, "output_dim": 16, "prototypes": 10},
                            "crops": {"global_size": 32, "local_size": 16}})
    torch.manual_seed(3)
    model = trained_looking_model(cfg)
    old = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    old.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    save_checkpoint(str(root), 7, 7 * 256, {"config": cfg.to_dict()}, old, model.spec.to_record(), STORAGE)
    out = tmp_path / "resnet18.pt"
    assert cli.main(["export", "--checkpoint", str(root), "--out", str(out)]) == 0
    (load_state_dict,) = printed_snippets(capsys.readouterr().out)
    state = torch.load(out, weights_only=True)
    assert "fc.weight" not in state and recorded_spec(state) == BackboneSpec("resnet18")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(run_snippet(load_state_dict)(images), model.embed(images))


def test_an_s3_export_prints_the_snippet_for_the_downloaded_file():
    written = {"state_dict": "s3://bucket/models/r50.pt", **BackboneSpec("resnet50").to_record(), "pt2":
               "s3://bucket/models/r50.pt2"}
    assert export.loading_snippet(written)[0] == "# after downloading s3://bucket/models/r50.pt to r50.pt"
    assert "model.load_state_dict(torch.load('r50.pt', weights_only=True))" in export.loading_snippet(written)
    assert export.program_snippet(written)[-1] == "model = torch.export.load('r50.pt2').module()"


def test_export_of_a_missing_or_wrong_checkpoint_is_a_clean_error(tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "no backbone" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()

    # Weights of another architecture than the record claims: refused by the strict load.
    save_trained_looking_checkpoint(tmp_path / "checkpoints", {"arch": "resnet18"}, crop_size=32)
    state = torchvision.models.resnet34().state_dict()
    torch.save(state, tmp_path / "checkpoints" / "step-000000040" / "backbone.pt")
    assert cli.main(["export", "--checkpoint", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "y.pt")]) == 2
    assert "does not match resnet18" in capsys.readouterr().err
    assert not (tmp_path / "y.pt").exists()

    # A file recording another spec than its checkpoint's record.
    narrow = SwAVModel(config_from_dict({"model": {"arch": "resnet18", "width": 8}}).model)
    torch.save(narrow.backbone_state_dict(), tmp_path / "checkpoints" / "step-000000040" / "backbone.pt")
    assert cli.main(["export", "--checkpoint", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "z.pt")]) == 2
    assert "it records resnet18 (width 8)" in capsys.readouterr().err


def test_pt2_path():
    assert export.pt2_path("a/b.pt") == "a/b.pt2"
    assert export.pt2_path("s3://bucket/model") == "s3://bucket/model.pt2"
