"""Evaluation: the kNN and linear-probe functions on toys, and `stream-swav eval` end to end on tiny shards."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stream_swav import cli
from stream_swav.apps import evaluate
from stream_swav.apps.evaluate import (
    one_copy_of_equal_channels,
    knn_predict,
    knn_top1,
    linear_probe_top1,
    pixel_features,
    random_backbone,
    resolve_checkpoint,
    standardised,
)
from stream_swav.apps.datasets import procedural_dataset
from stream_swav.data.labelled import load_labeled_images, resize_center_crop
from stream_swav.apps.make_shards import array_samples
from stream_swav.apps.make_shards import ShardSample, write_shards
from stream_swav.config import StorageConfig, config_from_dict
from stream_swav.model import BackboneSpec
from stream_swav.checkpoint import save_checkpoint

STORAGE = StorageConfig()
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def degrees(*angles: float) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])


def test_knn_weighting_by_hand():
    # Query at 0 degrees. Neighbours: one of class 0 at 0 deg (cosine 1), two of class 1 at
    # +-40 deg (cosine 0.766), and a far class-0 point at 90 deg (cosine 0) outside the top 3.
    train = degrees(0, 40, -40, 90)
    labels = torch.tensor([0, 1, 1, 0])
    query, truth = degrees(0), torch.tensor([0])
    # T=0.07: class 0 scores exp(1/0.07) = 1.6e6, class 1 2*exp(0.766/0.07) = 1.1e5 -> class 0.
    assert knn_top1(train, labels, query, truth, k=3, temperature=0.07) == 1.0
    # T=10: exp(0.1) = 1.105 against 2*exp(0.0766) = 2.16 -> the majority, class 1.
    assert knn_top1(train, labels, query, truth, k=3, temperature=10.0) == 0.0
    # k=1 is nearest neighbour; k larger than the set uses every point (class 0: 1.105 + 1.0 < 2.16).
    assert knn_top1(train, labels, query, truth, k=1, temperature=10.0) == 1.0
    assert knn_top1(train, labels, query, truth, k=50, temperature=10.0) == 0.0
    # Cosine: scale does not matter; two queries give a fraction.
    assert knn_top1(5 * train, labels, 0.1 * degrees(0, 85), torch.tensor([0, 0]), k=1, temperature=0.07) == 1.0
    assert knn_top1(train, labels, degrees(0, 45), torch.tensor([0, 0]), k=1, temperature=0.07) == 0.5


def test_knn_leave_one_out_excludes_each_row_from_its_own_neighbours():
    # A class-1 point among class-0 ones: its own label wins at k=1, its neighbours' when excluded.
    points, labels = degrees(0, 5, 10, 12, 90, 95), torch.tensor([0, 0, 0, 1, 1, 1])
    assert knn_predict(points, labels, points, 1, 0.07, 2).tolist() == [0, 0, 0, 1, 1, 1]
    assert knn_predict(points, labels, points, 1, 0.07, 2, exclude_self=True).tolist() == [0, 0, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="exclude_self"):
        knn_predict(points, labels, points[:2], 1, 0.07, 2, exclude_self=True)


def test_knn_rejects_bad_input():
    with pytest.raises(ValueError, match="features must be"):
        knn_top1(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), torch.zeros(1, 2), torch.zeros(1))
    with pytest.raises(ValueError, match="temperature"):
        knn_top1(degrees(0), torch.tensor([0]), degrees(0), torch.tensor([0]), temperature=0.0)


def blobs(n: int, seed: int, dim: int = 16, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.arange(n) % classes
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


def test_linear_probe_learns_a_separable_toy_and_not_noise():
    train, train_labels = blobs(200, seed=0)
    test, test_labels = blobs(100, seed=1)
    assert linear_probe_top1(train, train_labels, test, test_labels) == 1.0
    # Labels unrelated to the features: near chance (4 classes) on held-out data.
    shuffled = train_labels[torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    assert linear_probe_top1(train, shuffled, test, test_labels) < 0.5


def test_resize_center_crop():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 30, 20))
    crop = resize_center_crop(image, 10)
    assert crop.shape == (10, 10, 3)
    # 40x20 -> 20x10, centre 10x10 is the white middle.
    assert crop.min() > 200
    assert resize_center_crop(Image.new("RGB", (16, 16)), 16).shape == (16, 16, 3)
    # A strip far longer than wide: only its central square is resampled (scaling the whole strip
    # to a short side of 224 first would take 224 x 2,800,000 pixels, 1.9 GB).
    strip = Image.new("RGB", (8, 100_000), (0, 0, 0))
    strip.paste((255, 255, 255), (0, 49_980, 8, 50_020))
    crop = resize_center_crop(strip, 224)
    assert crop.shape == (224, 224, 3) and crop.min() > 200


def write_labelled_shards(dest: Path, images: np.ndarray, labels: np.ndarray, extra: list[ShardSample] = ()) -> str:
    samples = list(array_samples(images, labels, size=images.shape[1]))
    samples += [ShardSample(len(samples) + i, f"extra{i}", s.fields) for i, s in enumerate(extra)]
    write_shards(samples, dest, 25, 1 << 30, STORAGE)
    return str(dest)


def tiny_config(size: int, arch: str = "resnet18", small_stem: bool = True) -> dict:
    return config_from_dict({
        "model": {"arch": arch, "small_stem": small_stem, "hidden_dim": 32, "output_dim": 16, "prototypes": 10},
        "crops": {"global_size": size, "local_size": 8},
        "augment": {"mean": list(MEAN), "std": list(STD)},
    }).to_dict()


def save_tiny_checkpoint(root: Path, step: int, backbone: dict, size: int = 16, loss: float = 5.0) -> None:
    save_checkpoint(str(root), step, step * 64, {"config": tiny_config(size)}, backbone,
                    {"arch": "resnet18", "small_stem": True, "metrics": {"loss": loss}}, STORAGE)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("eval-shards")
    train_images, train_labels = procedural_dataset(60, seed=0, size=16)
    test_images, test_labels = procedural_dataset(30, seed=1, size=16)
    broken = ShardSample(0, "x", {"jpg": b"\xff\xd8\xff then no JPEG structure", "cls": b"1"})
    unlabelled = next(array_samples(test_images, test_labels, size=16))
    unlabelled = ShardSample(0, "x", {"png": unlabelled.fields["png"]})
    return (write_labelled_shards(root / "train", train_images, train_labels),
            write_labelled_shards(root / "test", test_images, test_labels, [broken, unlabelled]))


def test_load_labeled_images_counts_what_it_skips(tiny_shards):
    train_spec, test_spec = tiny_shards
    test = load_labeled_images(test_spec, 16)
    assert test.images.shape == (30, 16, 16, 3) and test.images.dtype == torch.uint8
    assert test.labels.tolist() == procedural_dataset(30, seed=1, size=16)[1].tolist()
    assert dict(test.skipped) == {"no-label": 1, "not-an-image": 1}
    assert len(load_labeled_images(train_spec, 8, limit=7)) == 7


def test_eval_end_to_end_reports_every_row(tiny_shards, tmp_path, capsys):
    train_spec, test_spec = tiny_shards
    checkpoints = tmp_path / "checkpoints"
    # The checkpoint holds exactly the seed-0 random-init backbone, so its row must equal that reference.
    reference = random_backbone(BackboneSpec("resnet18", small_stem=True))
    save_tiny_checkpoint(checkpoints, 7, reference.backbone_state_dict())

    out = tmp_path / "result.json"
    rc = cli.main(["eval", "--checkpoint", str(checkpoints), "--train", train_spec, "--test", test_spec,
                        "--device", "cpu", "--batch-size", "16", "--json-out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "resnet18 (small stem), 16 px" in table
    result = json.loads(out.read_text())
    assert [row["features"] for row in result["rows"]] == ["checkpoint", "random-init", "random-init-data-bn",
                                                           "raw-pixels"]
    assert result["step"] == 7 and result["images_seen"] == 448 and result["image_size"] == 16
    assert result["train_count"] == 60 and result["test_count"] == 30 and result["num_classes"] == 10
    assert result["mean"] == list(MEAN) and result["std"] == list(STD)
    checkpoint_row, random_row, _, pixel_row = result["rows"]
    assert checkpoint_row["dim"] == 512 and pixel_row["dim"] == 16 * 16 * 3
    for row in result["rows"]:
        assert 0.0 <= row["knn_top1"] <= 1.0 and 0.0 <= row["probe_top1"] <= 1.0
        assert f"{100 * row['knn_top1']:.2f}%" in table
    assert checkpoint_row["knn_top1"] == random_row["knn_top1"]
    assert checkpoint_row["probe_top1"] == random_row["probe_top1"]

    # The pixel row is the pure function on the normalised pixels.
    train, test = load_labeled_images(train_spec, 16), load_labeled_images(test_spec, 16)
    expected = knn_top1(pixel_features(train.images, MEAN, STD), train.labels,
                        pixel_features(test.images, MEAN, STD), test.labels, 20, 0.07, 10)
    assert pixel_row["knn_top1"] == pytest.approx(expected)


def test_batchnorm_recalibration_takes_exact_data_statistics_and_keeps_weights():
    torch.manual_seed(0)
    backbone = random_backbone(BackboneSpec("resnet18", small_stem=True))
    images = torch.randint(0, 256, (20, 8, 8, 3), dtype=torch.uint8)
    calibrated = evaluate.recalibrate_batchnorm(backbone, images, MEAN, STD, batch_size=5)
    # The first BatchNorm sees conv1's output: its running mean averages the four equal batches'
    # means, i.e. it is that output's exact mean over all 20 images.
    x = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        first = backbone.conv1(x)
    assert torch.allclose(calibrated.bn1.running_mean, first.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not calibrated.training
    # Weights and the original module are untouched.
    for (name, before), after in zip(backbone.state_dict().items(), calibrated.state_dict().values()):
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(before, after), name
    assert torch.equal(backbone.bn1.running_mean, torch.zeros(64)) and backbone.bn1.running_var.eq(1).all()


def test_trained_looking_weights_change_the_result(tiny_shards, tmp_path):
    train_spec, test_spec = tiny_shards
    checkpoints = tmp_path / "checkpoints"
    save_tiny_checkpoint(checkpoints, 3, random_backbone(BackboneSpec("resnet18", True), seed=5).state_dict())
    result = evaluate.evaluate_checkpoint(str(checkpoints / "step-000000003"), train_spec, test_spec, probe=False,
                                          references=False, device=torch.device("cpu"), image_size=12)
    assert [row["features"] for row in result["rows"]] == ["checkpoint"]
    assert "probe_top1" not in result["rows"][0] and result["image_size"] == 12 and result["step"] == 3


def test_resolve_checkpoint_accepts_folder_step_folder_and_file(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    state = random_backbone(BackboneSpec("resnet18", True)).state_dict()
    save_tiny_checkpoint(checkpoints, 1, state)
    save_tiny_checkpoint(checkpoints, 2, state, size=20)
    latest = resolve_checkpoint(str(checkpoints))
    assert latest.step == 2 and latest.global_crop_size() == 20 and latest.spec == BackboneSpec("resnet18", small_stem=True)
    step_one = resolve_checkpoint(str(checkpoints / "step-000000001"))
    assert step_one.step == 1 and step_one.global_crop_size() == 16
    by_file = resolve_checkpoint(str(checkpoints / "step-000000001" / "backbone.pt"))
    assert by_file.backbone_url == str(checkpoints / "step-000000001" / "backbone.pt") and by_file.step == 1
    with pytest.raises(FileNotFoundError, match="no backbone"):
        resolve_checkpoint(str(tmp_path / "empty"))


def test_eval_cli_reports_a_missing_checkpoint_cleanly(tiny_shards, tmp_path, capsys):
    train_spec, test_spec = tiny_shards
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "nothing"), "--train", train_spec, "--test",
                          test_spec]) == 2
    assert "no backbone" in capsys.readouterr().err


def test_pixel_scores_use_one_copy_of_equal_channels_with_the_same_similarities_and_probe_optimum():
    gray = torch.randint(0, 256, (50, 8, 8, 1), dtype=torch.uint8).expand(-1, -1, -1, 3).contiguous()
    feats = pixel_features(gray, (0.3,) * 3, (0.4,) * 3)
    train, test, copies = one_copy_of_equal_channels(feats[:40], feats[40:])
    assert train.shape == (40, 64) and test.shape == (10, 64) and copies == 3
    torch.testing.assert_close(F.normalize(test, dim=1) @ F.normalize(train, dim=1).T,
                               F.normalize(feats[40:], dim=1) @ F.normalize(feats[:40], dim=1).T)
    # The probe's objective on one copy with a third of the penalty, at the 3-copy optimum's folded
    # weights, equals the 3-copy objective there: the same minimum (checked at equal thirds).
    labels = torch.arange(40) % 4
    (three, _), (one, _) = standardised(feats[:40], feats[40:]), standardised(train, test)
    torch.testing.assert_close(three, one.repeat_interleave(3, dim=1))
    weight = torch.randn(4, 64)

    def objective(x: torch.Tensor, w: torch.Tensor, decay: float) -> torch.Tensor:
        return F.cross_entropy(x @ w.T, labels) + 0.5 * decay * w.square().sum()

    thirds = (weight / 3).repeat_interleave(3, dim=1)
    torch.testing.assert_close(objective(three, thirds, 1e-2), objective(one, weight, 1e-2 / 3))
    # Colour images, or gray ones normalised per channel differently, keep all three channels.
    colour = pixel_features(torch.randint(0, 256, (50, 8, 8, 3), dtype=torch.uint8), (0.3,) * 3, (0.4,) * 3)
    assert one_copy_of_equal_channels(colour[:40], colour[40:])[0].shape == (40, 192)
    shifted = pixel_features(gray, (0.3, 0.4, 0.5), (0.4,) * 3)
    kept, _, copies = one_copy_of_equal_channels(shifted[:40], shifted[40:])
    assert kept.shape == (40, 192) and copies == 1
