"""The messy-stream benchmark (pipelines/messy_stream.py): its composition, what each kind of entry
looks like, and the shards it writes, read back through stream-swav's own reader and decoder."""
from __future__ import annotations

import io
import json
import re
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fmnist_helpers import needs_fmnist, write_fmnist_subset
from PIL import Image

from pipelines import messy_stream
from pipelines.messy_stream import (JUNK_VARIANTS, NEAR_VARIANTS, Entry, MessySpec, composition, entry_fields,
                                    deduped_entries, oracle_entries, plan_messy_stream)
from stream_swav.data.decode import DecodeLimits, decode_image
from stream_swav.data.shards import ShardReport, parse_label, read_samples

LIMITS = DecodeLimits(max_pixels=1 << 20, min_side=8, max_bytes=1 << 20)


def labels_like_fashion_mnist(per_class: int = 300) -> np.ndarray:
    return np.random.default_rng(0).permutation(np.repeat(np.arange(10), per_class))


def test_the_plan_has_the_stated_shares_each_distinct_image_once_and_follows_its_seed():
    labels = labels_like_fashion_mnist()
    spec = MessySpec(imbalance_ratio=10, duplicate_fraction=0.4, pool_fraction=0.02, near_fraction=0.5,
                     junk_fraction=0.1, seed=3)
    entries = plan_messy_stream(labels, spec)
    made = composition(entries, labels)
    kinds = made["kinds"]
    assert kinds["exact"] + kinds["near"] == round(len(entries) * 0.4)
    assert kinds["junk"] == pytest.approx(len(entries) * 0.1, abs=1)
    assert kinds["unique"] == made["distinct_images"] == pytest.approx(len(entries) * 0.5, abs=1)
    assert abs(kinds["near"] - kinds["exact"]) < 0.15 * (kinds["near"] + kinds["exact"])
    # Distinct images once each, Zipf over the classes (head / tail = the ratio, within rounding).
    unique = [e.source for e in entries if e.kind == "unique"]
    assert len(set(unique)) == len(unique)
    per_class = made["distinct_per_class"]
    assert per_class[0] == 300 and 9 <= per_class[0] / per_class[-1] <= 11
    # The copies come from a pool of 2% of the distinct images, all of them distinct images too.
    copied = {e.source for e in entries if e.kind in ("exact", "near")}
    assert copied <= set(unique) and made["pool_images"] == len(copied) <= round(0.02 * len(unique))
    assert {e.variant for e in entries if e.kind == "near"} == set(NEAR_VARIANTS)
    assert {e.variant for e in entries if e.kind == "junk"} == set(JUNK_VARIANTS)
    assert all(e.source == -1 for e in entries if e.kind == "junk")
    # Mixed, not in blocks: the first tenth of the stream already holds every kind.
    assert {e.kind for e in entries[:len(entries) // 10]} == set(messy_stream.KINDS)
    assert plan_messy_stream(labels, spec) == entries
    assert plan_messy_stream(labels, MessySpec(seed=4, pool_fraction=0.02)) != entries


def test_the_oracle_stream_balances_the_distinct_images_by_their_labels_and_nothing_else():
    labels = labels_like_fashion_mnist()
    messy = plan_messy_stream(labels, MessySpec(imbalance_ratio=10, pool_fraction=0.02, seed=3))
    oracle = oracle_entries(messy, labels, seed=3)
    unique = [e.source for e in messy if e.kind == "unique"]
    # Every distinct image, once as itself, the rest byte-identical repeats; no pool copies, no junk.
    assert sorted(e.source for e in oracle if e.kind == "unique") == sorted(unique)
    assert {e.kind for e in oracle} == {"unique", "exact"} and {e.variant for e in oracle} == {""}
    # Each class as often as the largest (300 distinct images), within the drawn fractions.
    per_class = np.bincount(labels[[e.source for e in oracle]], minlength=10)
    assert per_class[0] == 300 and all(abs(n - 300) < 0.15 * 300 for n in per_class)
    # An image of the rarest class (~30 distinct) repeats ~10 times; one of the largest, once.
    repeats = Counter(e.source for e in oracle)
    assert {repeats[s] for s in unique if labels[s] == 0} == {1}
    assert 9 <= statistics.mean(repeats[s] for s in unique if labels[s] == 9) <= 11
    # Mixed, and drawn from its seed.
    assert set(labels[[e.source for e in oracle[:len(oracle) // 10]]]) == set(range(10))
    assert oracle_entries(messy, labels, seed=3) == oracle != oracle_entries(messy, labels, seed=4)


def test_the_deduped_stream_is_the_messy_one_with_every_repeat_removed_and_nothing_else():
    labels = labels_like_fashion_mnist()
    messy = plan_messy_stream(labels, MessySpec(imbalance_ratio=10, pool_fraction=0.02, seed=3))
    deduped = deduped_entries(messy)
    real = [e.source for e in deduped if e.source >= 0]
    # Each training-split image once (the first of its occurrences, whatever its kind), all the junk,
    # in the messy stream's order.
    assert len(real) == len(set(real)) == len({e.source for e in messy if e.source >= 0})
    assert [e for e in deduped if e.kind == "junk"] == [e for e in messy if e.kind == "junk"]
    position = {id(entry): n for n, entry in enumerate(messy)}
    assert [position[id(e)] for e in deduped] == sorted(position[id(e)] for e in deduped)
    first = {}
    for entry in messy:
        first.setdefault(entry.source, entry)
    assert all(first[e.source] is e for e in deduped if e.source >= 0)
    # The pool's images are there once, some of them as the copy that came first.
    assert {e.kind for e in deduped} >= {"unique", "junk"} and len(deduped) < len(messy) * 0.65


@pytest.mark.parametrize("knobs, message", [
    ({"duplicate_fraction": 0.7, "junk_fraction": 0.3}, "must be below 1"),
    ({"pool_fraction": 0.0}, "pool_fraction"),
    ({"near_fraction": 1.5}, "near_fraction"),
    ({"imbalance_ratio": 0.5}, "imbalance_ratio"),
])
def test_impossible_knobs_are_refused_naming_the_knob(knobs, message):
    with pytest.raises(ValueError, match=message):
        MessySpec(**knobs)


def decoded(fields: dict[str, bytes]) -> np.ndarray:
    data = fields.get("png", fields.get("jpg"))
    return np.asarray(decode_image(data, LIMITS, 8).convert("L").resize((28, 28)), dtype=np.float32)


def test_copies_are_the_original_or_close_to_it_and_junk_is_a_valid_image_of_nothing():
    # Smooth shapes on black, as in Fashion-MNIST (a shirt-like block, a bag-like bar): a copy must
    # stay close to its original, and further from the other image.
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[0, 4:24, 8:20] = np.linspace(120, 250, 20, dtype=np.uint8)[:, None]
    images[1, 3:12, 2:26] = np.linspace(250, 120, 24, dtype=np.uint8)[None, :]
    labels = np.array([4, 7])
    original = entry_fields(Entry("unique", 0), images, labels, 28)
    assert entry_fields(Entry("exact", 0), images, labels, 28)["png"] == original["png"]
    reference, other = decoded(original), decoded(entry_fields(Entry("unique", 1), images, labels, 28))

    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    for variant in NEAR_VARIANTS:
        for param in range(5):
            fields = entry_fields(Entry("near", 0, variant, param), images, labels, 28)
            assert fields.get("png") != original["png"] and parse_label(fields["cls"]) == 4
            assert json.loads(fields["json"]) == {"kind": "near", "source": 0, "variant": variant}
            copy = decoded(fields)
            assert correlation(copy, reference) > correlation(copy, other) + 0.3, (variant, param)
    for variant in JUNK_VARIANTS:
        for param in range(3):
            fields = entry_fields(Entry("junk", -1, variant, param), images, labels, 28)
            assert "cls" not in fields and json.loads(fields["json"])["kind"] == "junk"
            assert decoded(fields).shape == (28, 28)
    text = np.asarray(Image.open(io.BytesIO(entry_fields(Entry("junk", -1, "text", 0), images, labels,
                                                         28)["png"])).convert("L"))
    assert len(np.unique(text)) >= 2  # ink on a background


@needs_fmnist
def test_the_pipeline_writes_both_streams_that_read_back_as_stated(tmp_path: Path, capsys):
    data = write_fmnist_subset(tmp_path / "fmnist", train=1000, test=10)
    out = tmp_path / "messy"
    assert messy_stream.main(["--out", str(out), "--data-dir", str(data), "--pool-fraction", "0.05",
                              "--oracle", "--deduped"]) == 0
    report = json.loads((out / "stream.json").read_text())
    assert report == {**json.loads(capsys.readouterr().out), "spec": report["spec"], "size": 28}

    def read(folder: Path) -> list:
        samples = []
        for shard in sorted(folder.glob("*.tar")):
            with open(shard, "rb") as f:
                samples += list(read_samples(f, 1 << 20, Counter(), ShardReport()))
        return samples

    messy, clean, oracle = read(out / "messy"), read(out / "clean"), read(out / "oracle")
    assert len(messy) == report["messy"]["images"] and len(clean) == report["clean"]["images"]
    assert len(oracle) == report["oracle"]["images"] and report["oracle"]["kinds"].keys() == {"unique", "exact"}
    deduped = [json.loads(s.meta["json"]) for s in read(out / "deduped")]
    assert len(deduped) == report["deduped"]["images"] == len({r["source"] for r in deduped if r["source"] >= 0}) \
        + report["messy"]["kinds"]["junk"]
    records = [json.loads(s.meta["json"]) for s in messy]
    assert dict(Counter(r["kind"] for r in records)) == report["messy"]["kinds"]
    for sample in messy + clean:  # every image decodes through the training path's decoder
        assert decode_image(sample.image, LIMITS, 8).size[0] >= 8
    # The clean reference: as many distinct images (rounded to the classes), balanced, nothing else.
    assert report["clean"]["images"] == report["messy"]["distinct_images"] // 10 * 10
    assert len(set(report["clean"]["distinct_per_class"])) == 1
    by_source = {r["source"]: s.image for r, s in zip(records, messy) if r["kind"] == "unique"}
    assert all(s.image == by_source[r["source"]] for r, s in zip(records, messy) if r["kind"] == "exact")
    # A second run finds both streams complete and leaves them as they are.
    before = {p: p.read_bytes() for p in (out / "messy").glob("*.tar")}
    assert messy_stream.main(["--out", str(out), "--data-dir", str(data), "--pool-fraction", "0.05"]) == 0
    assert {p: p.read_bytes() for p in (out / "messy").glob("*.tar")} == before
    # A knob out of range: one line, exit 2.
    capsys.readouterr()
    assert messy_stream.main(["--out", str(out), "--data-dir", str(data), "--junk-fraction", "0.9"]) == 2
    assert capsys.readouterr().err.startswith("messy_stream: error: duplicate_fraction + junk_fraction")


@needs_fmnist
def test_the_dedup_study_drops_exact_copies_and_keeps_every_distinct_image_at_distance_zero(tmp_path, capsys):
    from pipelines import dedup_study
    from stream_swav.curation import SeenSet

    data = write_fmnist_subset(tmp_path / "fmnist", train=1000, test=10)
    out = tmp_path / "messy"
    assert messy_stream.main(["--out", str(out), "--data-dir", str(data), "--pool-fraction", "0.05"]) == 0
    hashes = dedup_study.stream_hashes(out / "messy", min_side=28)
    stream = json.loads((out / "stream.json").read_text())
    assert len(hashes) == stream["messy"]["images"]
    exact = dedup_study.score(hashes, SeenSet(10_000, max_distance=0))
    # A copy that comes before its original is kept and the original dropped: nearly all, not all.
    assert exact["exact_dropped"] > 0.8 and exact["distinct_lost"] == 0.0
    # Fashion-MNIST items of one kind look alike: a loose match loses distinct images.
    assert exact["distinct_lost"] <= dedup_study.score(hashes, SeenSet(10_000, max_distance=8))["distinct_lost"]
    assert dedup_study.main(["--stream", str(out / "messy"), "--distances", "0,4"]) == 0
    table = capsys.readouterr().out
    assert table.count("\n| ") == 3 and "| 0 |" in table and "| 4 |" in table
    assert dedup_study.main(["--stream", str(tmp_path / "nothing")]) == 2


def test_copies_are_told_from_first_occurrences_and_compared_only_with_the_window_before_them():
    from pipelines import dedup_study

    records = [{"source": 5}, {"source": -1}, {"source": 7}, {"source": 5}, {"source": -1}, {"source": 7}]
    assert dedup_study.copy_categories(records).tolist() == ["first", "junk", "first", "copy", "junk", "copy"]
    a, b, c = torch.eye(3)
    features = torch.stack([a, b, a, c, a])
    # Row 2 (a) finds row 0 (a) with a window of 2, only row 1 (b) with a window of 1.
    assert dedup_study.highest_earlier_similarity(features, window=2, chunk=2).tolist() == [-1, 0, 1, 0, 1]
    assert dedup_study.highest_earlier_similarity(features, window=1).tolist() == [-1, 0, 0, 0, 0]


@needs_fmnist
def test_the_dedup_study_says_what_a_checkpoints_embedding_would_catch_of_what_the_hash_keeps(tmp_path, capsys):
    from test_gallery import save_learner_checkpoint

    from pipelines import dedup_study
    from stream_swav.curation import SeenSet

    data = write_fmnist_subset(tmp_path / "fmnist", train=1000, test=10)
    out = tmp_path / "messy"
    assert messy_stream.main(["--out", str(out), "--data-dir", str(data), "--pool-fraction", "0.05"]) == 0
    checkpoint = save_learner_checkpoint(tmp_path / "checkpoint")
    categories, highest = dedup_study.embedding_copies(checkpoint, out / "messy", 28, window=100, capacity=10_000)
    # What the hash keeps at distance 0, told apart by the stream's records: near copies it missed too.
    kept = dedup_study.score(dedup_study.stream_hashes(out / "messy", 28), SeenSet(10_000, max_distance=0))
    assert len(categories) == kept["images_kept"] and (categories == "copy").sum() > 0
    sources = len({r["source"] for _, r in dedup_study.stream_hashes(out / "messy", 28) if r["source"] >= 0})
    assert (categories == "first").sum() == sources - round(kept["distinct_lost"] * sources)
    assert set(highest) == {"projected feature", "backbone feature"}
    middle = float(highest["backbone feature"].median())
    capsys.readouterr()
    assert dedup_study.main(["--stream", str(out / "messy"), "--distances", "0", "--checkpoint", checkpoint,
                             "--window", "100", f"--similarities=-1,{middle},1.01"]) == 0
    table = capsys.readouterr().out
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in table.splitlines()
            if line.startswith("| projected") or line.startswith("| backbone")}
    assert len(rows) == 6
    assert "| 0.0% | 0.00% | 0.0% |" in rows[("projected feature", "1.01")]
    # At the median similarity, each column is the share of its category at or above it.
    similarity = highest["backbone feature"].numpy()
    expected = [f"{(similarity[categories == c] >= middle).mean():.{2 if c == 'first' else 1}%}"
                for c in dedup_study.COPY_CATEGORIES]
    assert rows[("backbone feature", f"{middle:g}")].endswith("| " + " | ".join(expected) + " |")
    copies = int(re.search(r"Kept by the hash: ([\d,]+) copies", table).group(1).replace(",", ""))
    assert copies == (categories == "copy").sum()
    with pytest.raises(SystemExit):  # argparse's one-line refusal, exit 2
        dedup_study.main(["--stream", str(out / "messy"), "--checkpoint", checkpoint, "--window", "0"])
