"""`stream-swav demo` end to end on a real Fashion-MNIST subset: shards with bad samples mixed in,
local Ray, rolling checkpoints, evaluation against the references, summary, plot and exit code."""
from __future__ import annotations

import json
import re

from fmnist_helpers import needs_fmnist, write_fmnist_subset
from stream_swav import cli


@needs_fmnist
def test_demo_runs_from_shards_to_an_evaluated_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STREAM_SWAV_FMNIST", str(write_fmnist_subset(tmp_path / "fmnist", train=400, test=100)))
    out = tmp_path / "demo"
    # 128 images at batch 32: 4 steps and a checkpoint after each (the recipe checkpoints every quarter of
    # the budget at its own batch of 128, so every step here), 4 to evaluate.
    rc = cli.main(["demo", "--out", str(out), "--images", "128", "--minutes", "0.3", "--eval-train", "200",
                   "--eval-test", "100",
                   "--set", "train.batch_size=32", "--set", "metrics.port=0",
                   "--set", "checkpoint.every_seconds=5"])
    printed = capsys.readouterr().out

    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert [name for name, _, _ in summary["rows"]] == [
        "streaming SwAV, last checkpoint", "random-init backbone (same arch)",
        "random-init, BN statistics of the data", "raw pixels"]
    mixed_in = re.search(r"(\d+) train samples \(incl\. (\d+) corrupt/odd-format", summary["dataset"])
    assert mixed_in and int(mixed_in[2]) > 0 and int(mixed_in[1]) == 400 + int(mixed_in[2])
    last = summary["last"]
    assert last["images_seen"] > 0 and (last["train_count"], last["test_count"]) == (200, 100)
    for name, knn, probe in summary["rows"]:
        assert 0.0 <= knn <= 1.0 and 0.0 <= probe <= 1.0
        assert re.search(rf"{re.escape(name)}\s+{100 * knn:6.2f}%\s+{100 * probe:6.2f}%", printed)
    # The margin to raw pixels is printed per probe, signed, as the summary records it.
    margins = summary["margin_to_pixels"]
    assert margins["knn_top1"] == last["knn_top1"] - last["pixels_knn_top1"]
    assert margins["probe_top1"] == last["probe_top1"] - last["pixels_probe_top1"]
    assert re.search(rf"margin to raw pixels \(points\)\s+{100 * margins['knn_top1']:+8.2f}\s+"
                     rf"{100 * margins['probe_top1']:+8.2f}", printed)
    assert ("NOT above raw pixels" in printed) == (min(margins.values()) <= 0)
    # The exit code is the demo's own verdict: 0 only when the learned features beat random init.
    assert rc == (0 if last["knn_top1"] > last["random_knn_top1"] else 1)
    assert (out / "eval" / "accuracy.png").stat().st_size > 0
    checkpoints = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert (checkpoints["arch"], checkpoints["width"], checkpoints["stem_stride"], checkpoints["feature_grid"]) == \
        ("resnet10", 16, 1, 2)
    # Every checkpoint gets kNN; the linear probe runs on the newest only (it costs ~3x a kNN).
    rows = [json.loads(line) for line in (out / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and rows[-1]["probe_top1"] == last["probe_top1"]
    assert all(row["probe_top1"] is None and 0.0 <= row["knn_top1"] <= 1.0 for row in rows[:-1])


def test_demo_recipe_checkpoints_at_every_quarter_of_its_image_budget():
    from stream_swav.apps.demo import demo_config
    from stream_swav.config import config_from_dict

    for images, gpu in ((153_600, False), (4_000_000, True)):
        cfg = config_from_dict(demo_config(images, gpu))
        assert cfg.checkpoint.every_seconds == 0 and cfg.train.image_budget == images
        assert cfg.checkpoint.every_steps * cfg.train.batch_size * 4 <= images
        assert images // (cfg.checkpoint.every_steps * cfg.train.batch_size) == 4
