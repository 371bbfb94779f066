"""`stream-swav gallery` end to end: real shards of textured JPEGs (with byte copies), a real checkpoint
of a tiny learner, the command's PNG and numbers, and its one-line refusals."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tar_bytes
from test_curation import scene
from test_learner import SyntheticStream, tiny_config

from stream_swav import cli
from stream_swav.data.labelled import NO_LABEL, load_labeled_images
from stream_swav.apps.gallery import MIN_WIDTH_PX, make_gallery, prototype_rows, replay_dedup
from stream_swav.checkpoint import save_checkpoint
from stream_swav.config import CurationConfig, StorageConfig
from stream_swav.learner import Learner
from stream_swav.model import BackboneSpec
from stream_swav.runtime.metrics import usage_perplexity

DISTINCT = 30
# Byte-identical copies of these images (positions in reading order) come back in the second shard.
COPIED = (0, 4, 17)
IMAGES = DISTINCT + len(COPIED)


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    scene(seed, size=48).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Two unlabelled shards: 20 distinct scenes, then 10 more and byte copies of three of the first."""
    root = tmp_path_factory.mktemp("gallery-shards")
    originals = [jpeg_bytes(seed) for seed in range(DISTINCT)]
    first = [(f"scene{n:03d}", {"jpg": originals[n]}) for n in range(20)]
    second = [(f"scene{n:03d}", {"jpg": originals[n]}) for n in range(20, DISTINCT)]
    second += [(f"copy{n:03d}", {"jpg": originals[n]}) for n in COPIED]
    (root / "shard-000000.tar").write_bytes(tar_bytes(first))
    (root / "shard-000001.tar").write_bytes(tar_bytes(second))
    return str(root)


def save_learner_checkpoint(root: Path, **curation) -> str:
    """A checkpoint as the driver writes one (state.pt with the configuration, backbone.pt, latest.json
    recording spec and configuration) of a tiny learner after two steps."""
    torch.set_num_threads(1)
    cfg = tiny_config(curation=curation)
    learner = Learner(cfg, torch.device("cpu"))
    stream = SyntheticStream(n_classes=4, image_size=8, seed=3)
    for _ in range(2):
        learner.train_step(stream.batch(cfg))
    info = {"metrics": {}, **BackboneSpec.from_config(cfg.model).to_record(), "final": False,
            "config": cfg.to_dict()}
    save_checkpoint(str(root), learner.step, learner.images_seen, {**learner.state_dict(), "config": cfg.to_dict()},
                    learner.exported_backbone_state_dict(), info, StorageConfig())
    return str(root)


@pytest.fixture(scope="module")
def curated_checkpoint(tmp_path_factory) -> str:
    return save_learner_checkpoint(tmp_path_factory.mktemp("gallery-curated"), dedup=True, balance=0.5)


def summary_numbers(line: str) -> dict[str, float]:
    match = re.search(r"(\d+) images read; (\d+) of (\d+) prototypes used, usage perplexity ([\d.]+); "
                      r"(\d+) dropped as repeats", line)
    assert match, line
    return dict(zip(("read", "used", "prototypes", "perplexity", "dropped"), map(float, match.groups())))


def test_gallery_draws_prototypes_and_the_repeats_dedup_drops(shards, curated_checkpoint, tmp_path, capsys):
    out = tmp_path / "pictures" / "gallery.png"
    assert cli.main(["gallery", "--checkpoint", curated_checkpoint, "--shards", shards, "--out", str(out),
                     "--device", "cpu", "--prototypes", "3", "--per-row", "5"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith(str(out))
    numbers = summary_numbers(printed[0])
    assert numbers["read"] == IMAGES and numbers["prototypes"] == 16
    assert numbers["dropped"] == len(COPIED)
    assert 1 <= numbers["used"] <= 16 and 1.0 <= numbers["perplexity"] <= numbers["used"] + 1e-6
    with Image.open(out) as png:
        assert png.format == "PNG"
        width, height = png.size
        pixels = png.convert("L")
        # Rows of prototypes and of repeats under the titles: tall, and not blank.
        assert width >= MIN_WIDTH_PX and height >= 500
        assert pixels.getextrema()[1] - pixels.getextrema()[0] > 100


def test_the_replay_pairs_each_copy_with_its_original_and_loads_unlabelled_shards(shards, curated_checkpoint):
    read = load_labeled_images(shards, 6, unlabelled=True, hashes=True)
    assert len(read) == IMAGES and read.labels.tolist() == [NO_LABEL] * IMAGES and len(read.hashes) == IMAGES
    dropped, repeats = replay_dedup(read.hashes, CurationConfig(dedup=True), shown=2)
    assert dropped == len(COPIED)
    assert [(r.dropped, r.kept, r.distance) for r in repeats] == [(DISTINCT + i, n, 0) for i, n in
                                                                  enumerate(COPIED[:2])]
    # One repeat allowed: byte copies all pass.
    assert replay_dedup(read.hashes, CurationConfig(dedup=True, max_repeats=1), shown=2) == (0, [])
    # Without unlabelled=True, unlabelled shards are refused as before.
    with pytest.raises(ValueError, match="no labelled images"):
        load_labeled_images(shards, 6)


def test_gallery_without_dedup_returns_usage_that_sums_to_one(shards, tmp_path):
    checkpoint = save_learner_checkpoint(tmp_path / "plain")
    out = tmp_path / "plain.png"
    summary = make_gallery(checkpoint, shards, str(out), max_images=25, prototypes=2, per_row=3,
                           device=torch.device("cpu"))
    assert summary.images_read == 25 and summary.repeats_dropped is None and summary.skipped == {}
    assert len(summary.usage) == 16 and sum(summary.usage) == pytest.approx(1.0)
    assert summary.perplexity == pytest.approx(usage_perplexity([round(25 * u) for u in summary.usage]))
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] >= MIN_WIDTH_PX


def test_prototype_rows_show_the_most_and_least_used_once_each():
    counts = np.array([5, 0, 9, 1, 3, 9, 2])
    assert prototype_rows(counts, 2) == ([2, 5], [6, 3])
    # Fewer used than two sections' worth: each once, most used first.
    assert prototype_rows(counts, 4) == ([2, 5, 0, 4], [6, 3])
    assert prototype_rows(counts, 9) == ([2, 5, 0, 4, 6, 3], [])


def test_gallery_refuses_a_missing_checkpoint_and_unreadable_shards_in_one_line(shards, curated_checkpoint,
                                                                               tmp_path, capsys):
    assert cli.main(["gallery", "--checkpoint", str(tmp_path / "nothing"), "--shards", shards,
                     "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("stream-swav: error: --checkpoint: ") and "no backbone" in error
    assert len(error.splitlines()) == 1

    assert cli.main(["gallery", "--checkpoint", curated_checkpoint, "--shards", str(tmp_path / "no-shards"),
                     "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("stream-swav: error: --shards: ") and "no shards found" in error
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "g.png").exists()

    (tmp_path / "a-file").write_text("not a folder")
    assert cli.main(["gallery", "--checkpoint", curated_checkpoint, "--shards", shards,
                     "--out", str(tmp_path / "a-file" / "g.png"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("stream-swav: error: --out: ") and len(error.splitlines()) == 1
