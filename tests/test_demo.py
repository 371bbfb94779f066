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
    rc = cli.main(["demo", "--out", str(out), "--minutes", "0.3", "--eval-train", "200", "--eval-test", "100",
                   "--set", "train.batch_size=32", "--set", "metrics.port=0",
                   "--set", "checkpoint.every_seconds=5"])
    printed = capsys.readouterr().out

    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert [name for name, _ in summary["rows"]] == [
        "streaming SwAV, last checkpoint", "random-init backbone (same arch)",
        "random-init, BN statistics of the data", "raw pixels"]
    mixed_in = re.search(r"(\d+) train samples \(incl\. (\d+) corrupt/odd-format", summary["dataset"])
    assert mixed_in and int(mixed_in[2]) > 0 and int(mixed_in[1]) == 400 + int(mixed_in[2])
    last = summary["last"]
    assert last["images_seen"] > 0 and (last["train_count"], last["test_count"]) == (200, 100)
    for _, accuracy in summary["rows"]:
        assert 0.0 <= accuracy <= 1.0 and f"{100 * accuracy:6.2f}%" in printed
    # The exit code is the demo's own verdict: 0 only when the learned features beat random init.
    assert rc == (0 if last["knn_top1"] > last["random_knn_top1"] else 1)
    assert (out / "eval" / "accuracy.png").stat().st_size > 0
    checkpoints = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert (checkpoints["arch"], checkpoints["width"], checkpoints["stem_stride"]) == ("resnet10", 16, 2)
