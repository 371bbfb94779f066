"""`stream-swav follow`: each new checkpoint evaluated exactly once, results as jsonl/csv/png/gauges."""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor

from stream_swav import cli
from stream_swav.apps import follow
from stream_swav.apps.evaluate import random_backbone
from stream_swav.model import BackboneSpec
from stream_swav.apps.datasets import procedural_dataset
from stream_swav.apps.make_shards import array_samples
from stream_swav.apps.follow import Follower, evaluate_checkpoints, read_results, write_plot
from stream_swav.apps.make_shards import write_shards
from stream_swav.config import StorageConfig, config_from_dict
from stream_swav.checkpoint import save_checkpoint
from stream_swav.runtime.metrics import EvalMetrics

STORAGE = StorageConfig()


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("follow-shards")
    specs = []
    for name, n, seed in (("train", 40, 0), ("test", 20, 1)):
        images, labels = procedural_dataset(n, seed=seed, size=12)
        write_shards(array_samples(images, labels, size=12), root / name, 100, 1 << 30, STORAGE)
        specs.append(str(root / name))
    return specs[0], specs[1]


def save_tiny_checkpoint(root: Path, step: int, seed: int, loss: float) -> None:
    config = config_from_dict({"model": {"arch": "resnet18", "small_stem": True},
                               "crops": {"global_size": 12, "local_size": 8}}).to_dict()
    save_checkpoint(str(root), step, step * 100, {"config": config},
                    random_backbone(BackboneSpec("resnet18", True), seed=seed).state_dict(),
                    {"arch": "resnet18", "small_stem": True, "metrics": {"loss": loss, "lr": 0.1}}, STORAGE)


def follow_once(checkpoints: Path, shards: tuple[str, str], out: Path, *extra: str) -> int:
    return cli.main(["follow", "--checkpoints", str(checkpoints), "--train", shards[0], "--test", shards[1],
                        "--out", str(out), "--once", "--device", "cpu", "--batch-size", "32", *extra])


def test_once_evaluates_each_new_checkpoint_exactly_once(tiny_shards, tmp_path):
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "eval"
    # No such folder: a typo, refused. A run that started but saved nothing yet: a quiet no-op.
    assert follow_once(checkpoints, tiny_shards, out) == 2
    checkpoints.mkdir()
    assert follow_once(checkpoints, tiny_shards, out) == 0
    assert read_results(out / "results.jsonl") == []

    save_tiny_checkpoint(checkpoints, 10, seed=1, loss=7.5)
    assert follow_once(checkpoints, tiny_shards, out, "--probe") == 0
    first = read_results(out / "results.jsonl")
    assert len(first) == 1
    row = first[0]
    assert row["step"] == 10 and row["images_seen"] == 1000 and row["loss"] == 7.5
    assert 0.0 <= row["knn_top1"] <= 1.0 and 0.0 <= row["probe_top1"] <= 1.0
    assert row["train_count"] == 40 and row["test_count"] == 20 and row["image_size"] == 12

    # Same latest.json: no second evaluation, the file is untouched.
    before = (out / "results.jsonl").read_bytes()
    assert follow_once(checkpoints, tiny_shards, out) == 0
    assert (out / "results.jsonl").read_bytes() == before

    save_tiny_checkpoint(checkpoints, 20, seed=2, loss=6.25)
    assert follow_once(checkpoints, tiny_shards, out) == 0
    rows = read_results(out / "results.jsonl")
    assert [r["step"] for r in rows] == [10, 20] and rows[0] == row
    assert rows[1]["probe_top1"] is None and rows[1]["loss"] == 6.25

    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["step"] for r in table] == ["10", "20"]
    assert table[0]["knn_top1"] == str(row["knn_top1"]) and table[1]["probe_top1"] == ""
    assert table[1]["loss"] == "6.25" and tuple(table[0]) == follow.CSV_COLUMNS
    with Image.open(out / "accuracy.png") as image:
        assert image.format == "PNG" and image.size == follow.PLOT_SIZE_PX


def test_a_step_saved_again_is_evaluated_again(tiny_shards, tmp_path):
    """A run that resumed from an older checkpoint, after skipping a newer one that does not load,
    points latest.json back and saves that step again: other weights under the same step."""
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "eval"
    save_tiny_checkpoint(checkpoints, 10, seed=1, loss=7.0)
    save_tiny_checkpoint(checkpoints, 20, seed=2, loss=6.0)
    assert follow_once(checkpoints, tiny_shards, out) == 0
    first = read_results(out / "results.jsonl")[-1]
    latest = checkpoints / "latest.json"
    latest.write_text((checkpoints / "step-000000010" / "meta.json").read_text())  # the resume's repointing
    save_tiny_checkpoint(checkpoints, 20, seed=3, loss=5.0)
    assert follow_once(checkpoints, tiny_shards, out) == 0
    rows = read_results(out / "results.jsonl")
    assert [r["step"] for r in rows] == [20, 20] and rows[1]["loss"] == 5.0
    assert rows[1]["checkpoint_time"] != first["checkpoint_time"]
    assert follow_once(checkpoints, tiny_shards, out) == 0 and len(read_results(out / "results.jsonl")) == 2
    # `--all` tells them apart the same way, where the step saved again is no longer the latest: step
    # 20 saved a third time and then step 30; each is evaluated, and step 10, never evaluated, too.
    latest.write_text((checkpoints / "step-000000010" / "meta.json").read_text())
    save_tiny_checkpoint(checkpoints, 20, seed=4, loss=4.0)
    save_tiny_checkpoint(checkpoints, 30, seed=5, loss=3.0)
    assert follow_once(checkpoints, tiny_shards, out, "--all") == 0
    rows = read_results(out / "results.jsonl")
    assert [(r["step"], r["loss"]) for r in rows[2:]] == [(10, 7.0), (20, 4.0), (30, 3.0)]
    assert follow_once(checkpoints, tiny_shards, out, "--all") == 0 and len(read_results(out / "results.jsonl")) == 5


def test_a_pruned_checkpoint_fails_the_poll_and_is_retried_later(tiny_shards, tmp_path, caplog):
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "eval"
    save_tiny_checkpoint(checkpoints, 5, seed=1, loss=7.0)
    backbone = checkpoints / "step-000000005" / "backbone.pt"
    saved = backbone.read_bytes()
    backbone.unlink()
    assert follow_once(checkpoints, tiny_shards, out) == 1
    assert "evaluation failed" in caplog.text
    assert read_results(out / "results.jsonl") == []
    backbone.write_bytes(saved)
    assert follow_once(checkpoints, tiny_shards, out) == 0
    assert [r["step"] for r in read_results(out / "results.jsonl")] == [5]


def test_with_all_a_damaged_retained_checkpoint_holds_back_neither_the_others_nor_the_latest(tiny_shards, tmp_path,
                                                                                             caplog):
    """A milestone is retained for good: one whose backbone was cut short used to fail every round
    of `follow --all` before any other step, and the latest, was evaluated."""
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "eval"
    for step in (10, 20, 30):
        save_tiny_checkpoint(checkpoints, step, seed=step, loss=7.0)
    damaged = checkpoints / "step-000000010" / "backbone.pt"
    damaged.write_bytes(damaged.read_bytes()[:500])
    assert follow_once(checkpoints, tiny_shards, out, "--all") == 1
    assert [r["step"] for r in read_results(out / "results.jsonl")] == [20, 30]
    assert caplog.text.count("evaluation failed for step 10") == 1
    # A follower that keeps running retries it every round, and logs it again only if it fails otherwise.
    metrics = EvalMetrics()
    follower = Follower(str(checkpoints), *tiny_shards, out, metrics=metrics, device=torch.device("cpu"))
    assert follower.evaluate_retained() == [] and follower.evaluate_retained() == []
    assert caplog.text.count("evaluation failed for step 10") == 2
    assert metrics.registry.get_sample_value("stream_swav_eval_failures_total") == 2


def test_restart_reads_results_and_serves_the_last_value(tiny_shards, tmp_path):
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "eval"
    save_tiny_checkpoint(checkpoints, 3, seed=1, loss=7.0)
    metrics = EvalMetrics()
    follower = Follower(str(checkpoints), *tiny_shards, out, metrics=metrics, device=torch.device("cpu"))
    row = follower.poll()
    assert row is not None and follower.poll() is None
    value = metrics.registry.get_sample_value("stream_swav_eval_knn_top1_ratio")
    assert value == pytest.approx(row["knn_top1"])
    assert metrics.registry.get_sample_value("stream_swav_eval_checkpoint_step") == 3

    # A crash mid-append leaves a partial line: it is ignored, the complete rows count.
    with open(out / "results.jsonl", "a") as f:
        f.write('{"step": 4, "knn_')
    restarted_metrics = EvalMetrics()
    restarted = Follower(str(checkpoints), *tiny_shards, out, metrics=restarted_metrics, device=torch.device("cpu"))
    assert restarted.results.steps == {3} and restarted.poll() is None
    assert restarted_metrics.registry.get_sample_value("stream_swav_eval_checkpoint_step") == 3


def test_evaluate_checkpoints_covers_retained_steps_with_references(tiny_shards, tmp_path):
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "eval"
    for step in (1, 2, 3):
        save_tiny_checkpoint(checkpoints, step, seed=step, loss=8.0 - step)
    # A step folder without meta.json is a save that died: not evaluated.
    shutil.copytree(checkpoints / "step-000000003", checkpoints / "step-000000009")
    (checkpoints / "step-000000009" / "meta.json").unlink()
    rows = evaluate_checkpoints(checkpoints, *tiny_shards, out_dir=out, references=True,
                                device=torch.device("cpu"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    # References are computed once and repeated on every row.
    assert len({(r["random_knn_top1"], r["pixels_knn_top1"]) for r in rows}) == 1
    assert (out / "accuracy.png").exists()
    again = evaluate_checkpoints(checkpoints, *tiny_shards, out_dir=out, device=torch.device("cpu"))
    assert again == rows


def colour_pixels(png: Path, colour: str, tolerance: int = 12) -> int:
    """Pixels of the PNG within `tolerance` of `colour` on every channel (lines are antialiased)."""
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(ImageColor.getrgb(colour))) <= tolerance).all(axis=2).sum())


def test_plot_shows_each_series_and_the_references(tmp_path):
    rows = [{"step": s, "images_seen": s * 1000, "knn_top1": 0.3 + 0.05 * s, "probe_top1": 0.4 + 0.04 * s,
             "loss": 8.0 - 0.5 * s, "random_knn_top1": 0.25, "pixels_knn_top1": 0.5} for s in range(1, 6)]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_plot(results, tmp_path / "plot.png")
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == follow.PLOT_SIZE_PX
    for colour in (follow.BLUE, follow.GREEN, follow.ORANGE, follow.GREY, follow.PURPLE):
        assert colour_pixels(path, colour) > 50, colour
    assert colour_pixels(path, follow.TEAL) == 0

    results.write_text(json.dumps({"step": 1, "images_seen": 500, "knn_top1": 0.5}) + "\n")
    only_knn = write_plot(results, tmp_path / "knn.png")
    assert colour_pixels(only_knn, follow.BLUE) > 20 and colour_pixels(only_knn, follow.ORANGE) == 0

    results.write_text("")
    with Image.open(write_plot(results, tmp_path / "empty.png")) as empty:
        assert empty.size == follow.PLOT_SIZE_PX


def test_without_matplotlib_results_are_written_and_the_plot_is_skipped(tiny_shards, tmp_path, monkeypatch,
                                                                        caplog):
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)  # an import of matplotlib now fails
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "eval"
    save_tiny_checkpoint(checkpoints, 10, seed=1, loss=7.5)
    assert follow_once(checkpoints, tiny_shards, out) == 0
    assert [r["step"] for r in read_results(out / "results.jsonl")] == [10]
    assert (out / "results.csv").is_file() and not (out / "accuracy.png").exists()
    assert "accuracy.png not drawn: matplotlib is not installed (pip install 'stream-swav[plots]')" in caplog.text


