"""make-shards: real images in, real WebDataset tar shards out, locally and on a moto S3 server."""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stream_swav import cli
from stream_swav.apps import make_shards
from stream_swav.apps.make_shards import ShardSample, SkippedSample, ShardsExistError, resume_index, write_shards
from stream_swav import storage
from stream_swav.config import StorageConfig
from stream_swav.data.decode import DecodeLimits, decode_image
from stream_swav.data.shards import ShardReport, read_samples

LIMITS = DecodeLimits(max_pixels=10_000_000, min_side=8, max_bytes=1 << 20)


def photo(seed: int, size: tuple[int, int] = (48, 36)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    pixels = base + 2 * x[..., None] + y[..., None] + rng.normal(0, 5, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ImageFolder layout: cat/ has 3 JPEGs and a PNG, dog/ 3 PNGs, plus broken and stray files."""
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "puppies").mkdir(parents=True)
    for i in range(3):
        (root / "cat" / f"c{i}.jpg").write_bytes(encoded(photo(i), "JPEG"))
    (root / "cat" / "c3.PNG").write_bytes(encoded(photo(3, (20, 60)), "PNG"))
    for i in range(2):
        (root / "dog" / f"d{i}.png").write_bytes(encoded(photo(10 + i), "PNG"))
    (root / "dog" / "puppies" / "p0.jpeg").write_bytes(encoded(photo(20), "JPEG"))
    (root / "dog" / "text.jpg").write_bytes(b"plain text, not a JPEG\n")
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


def read_shards(folder: Path) -> list[tuple[str, str, dict[str, bytes]]]:
    """(shard name, key, {ext: bytes}) of every sample in every shard, in order."""
    found = []
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        found.extend((shard.name, key, fields) for key, fields in members.items())
    return found


def run_cli(*argv: str) -> int:
    return cli.main(["make-shards", *argv, "--no-progress"])


def test_folder_to_local_shards_with_labels_and_counted_skips(image_folder, tmp_path, capsys):
    dest = tmp_path / "shards"
    assert run_cli(str(image_folder), str(dest), "--max-count", "3", "--class-dirs", "--json") == 0
    summary = json.loads(capsys.readouterr().out)

    samples = read_shards(dest)
    assert [name for name, _, _ in samples] == ["shard-000000.tar"] * 3 + ["shard-000001.tar"] * 3 + \
        ["shard-000002.tar"]
    # Keys are source positions in sorted-path order; broken files keep their position, so gaps appear.
    files = make_shards.folder_files(image_folder)
    by_key = {key: fields for _, key, fields in samples}
    for index, path in enumerate(files):
        relative = path.relative_to(image_folder).as_posix()
        fields = by_key.get(f"{index:09d}")
        if relative in ("dog/text.jpg", "dog/empty.png", "notes.txt"):
            assert fields is None
            continue
        assert fields is not None, relative
        # Original bytes kept, extension normalised, label from the top-level folder.
        image_ext = "png" if path.suffix.lower() == ".png" else "jpg"
        assert fields[image_ext] == path.read_bytes()
        assert fields["cls"] == (b"0" if relative.startswith("cat/") else b"1")

    assert summary["samples"] == 7 and summary["shards_written"] == 3 and summary["shards_kept"] == 0
    assert summary["skipped"] == {"not-an-image": 1, "empty": 1, "outside-class-folder": 1}
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["complete"] and [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert oct(os.stat(dest / "shard-000000.tar").st_mode & 0o777) == "0o644"
    # No temporary files left behind.
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar",
                                                      "shard-000002.tar"]


def test_shards_are_readable_by_the_stream_reader(image_folder, tmp_path):
    dest = tmp_path / "shards"
    assert run_cli(str(image_folder), str(dest), "--class-dirs") == 0
    errors: Counter = Counter()
    with open(dest / "shard-000000.tar", "rb") as f:
        samples = list(read_samples(f, 1 << 20, errors, ShardReport()))
    assert not errors and len(samples) == 7
    sizes = sorted(decode_image(s.image, LIMITS, 10_000).size for s in samples)
    assert (20, 60) in sizes and sizes.count((48, 36)) == 6


def test_rerun_keeps_finished_shards_and_rewrites_only_missing_ones(image_folder, tmp_path, capsys):
    dest = tmp_path / "shards"
    args = (str(image_folder), str(dest), "--max-count", "2", "--class-dirs", "--json")
    assert run_cli(*args) == 0
    first = {p.name: p.read_bytes() for p in dest.glob("shard-*.tar")}
    stats = {p.name: os.stat(p) for p in dest.glob("shard-*.tar")}
    capsys.readouterr()

    # Complete: nothing to do, nothing touched.
    assert run_cli(*args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["shards_written"] == 0 and again["shards_kept"] == 4 and again["samples"] == 0

    # A lost shard in the middle: it and everything after it is rewritten, identically.
    (dest / "shard-000002.tar").unlink()
    assert run_cli(*args) == 0
    redone = json.loads(capsys.readouterr().out)
    assert redone["shards_kept"] == 2 and redone["shards_written"] == 2
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert os.stat(dest / name).st_ino == stats[name].st_ino
        assert os.stat(dest / name).st_mtime_ns == stats[name].st_mtime_ns
    assert {p.name: p.read_bytes() for p in dest.glob("shard-*.tar")} == first


def test_interrupted_run_resumes_after_the_last_published_shard(tmp_path):
    dest = tmp_path / "shards"
    prepared: list[int] = []

    def source(start: int, fail_at: int | None = None):
        for index in range(start, 10):
            if index == fail_at:
                raise RuntimeError("source went away")
            prepared.append(index)
            if index == 4:
                yield SkippedSample(index, "broken.jpg", "truncated")
                continue
            yield ShardSample(index, f"{index:09d}", {"png": encoded(photo(index, (8, 8)), "PNG"),
                                                      "cls": str(index % 3).encode()})

    with pytest.raises(RuntimeError, match="source went away"):
        write_shards(source(0, fail_at=8), dest, 3, 1 << 20, StorageConfig(), settings={"source": "test"})
    manifest = json.loads((dest / "manifest.json").read_text())
    assert not manifest["complete"]
    # Shards of indices 0-2 and 3,5,6 were published; 7 was in the discarded temporary shard.
    assert [(s["first_index"], s["next_index"], s["samples"]) for s in manifest["shards"]] == [(0, 3, 3), (3, 7, 3)]
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]

    start = resume_index(dest, 3, 1 << 20, StorageConfig(), {"source": "test"})
    assert start == 7
    prepared.clear()
    summary = write_shards(source(start), dest, 3, 1 << 20, StorageConfig(), settings={"source": "test"})
    assert prepared == [7, 8, 9]
    assert summary.shards_kept == 2 and summary.shards_written == 1 and summary.samples == 3

    fresh = tmp_path / "fresh"
    write_shards(source(0), fresh, 3, 1 << 20, StorageConfig(), settings={"source": "test"})
    assert [f.read_bytes() for f in sorted(dest.glob("*.tar"))] == [f.read_bytes() for f in sorted(fresh.glob("*.tar"))]
    assert json.loads((fresh / "manifest.json").read_text())["shards"][0]["skipped"] == {}
    assert json.loads((fresh / "manifest.json").read_text())["shards"][1]["skipped"] == {"truncated": 1}


class Terminal(io.StringIO):
    """An in-memory stream that says it is a terminal, as stderr is for an interactive user."""

    def isatty(self) -> bool:
        return True


def progress_samples() -> list[ShardSample | SkippedSample]:
    samples: list[ShardSample | SkippedSample] = [
        ShardSample(i, f"{i:09d}", {"png": encoded(photo(i, (8, 8)), "PNG")}) for i in range(5)]
    return samples + [SkippedSample(5, "broken.jpg", "truncated")]


def test_progress_line_on_a_terminal_counts_samples_shards_and_skips(tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    write_shards(progress_samples(), tmp_path / "shards", 2, 1 << 20, StorageConfig(), settings={"source": "test"},
                 total=6, progress=True)
    drawn = terminal.getvalue()
    assert drawn.startswith("\r") and drawn.endswith("\x1b[K\n") and drawn.count("\n") == 1
    final = drawn.rsplit("\r", 1)[-1]
    assert final.startswith("[" + "#" * 30 + "] 100.0% | 6/6 samples | ")
    assert "| 3 shard(s) | " in final and " MB | skipped 1" in final


def test_progress_off_a_terminal_writes_no_redrawn_line(tmp_path, capsys):
    summary = write_shards(progress_samples(), tmp_path / "shards", 2, 1 << 20, StorageConfig(),
                           settings={"source": "test"}, total=6, progress=True)
    assert summary.samples == 5 and summary.shards_written == 3
    assert "\r" not in capsys.readouterr().err


def test_other_settings_or_foreign_shards_are_refused(image_folder, tmp_path, capsys):
    dest = tmp_path / "shards"
    assert run_cli(str(image_folder), str(dest), "--max-count", "3") == 0
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert run_cli(str(image_folder), str(dest), "--max-count", "4") == 2
    assert "other settings" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-000000.tar").write_bytes(b"somebody else's data")
    with pytest.raises(ShardsExistError, match="no manifest.json"):
        write_shards([], foreign, 3, 1 << 20, StorageConfig())
    assert (foreign / "shard-000000.tar").read_bytes() == b"somebody else's data"


def test_reencode_and_max_side(image_folder, tmp_path):
    dest = tmp_path / "shards"
    assert run_cli(str(image_folder), str(dest), "--reencode", "png", "--max-side", "24") == 0
    samples = read_shards(dest)
    assert len(samples) == 7
    for _, _, fields in samples:
        assert set(fields) == {"png"}
        image = Image.open(io.BytesIO(fields["png"]))
        assert image.format == "PNG" and max(image.size) == 24


def test_max_bytes_bounds_shard_size(image_folder, tmp_path):
    dest = tmp_path / "shards"
    assert run_cli(str(image_folder), str(dest), "--max-bytes", "6000") == 0
    shards = sorted(dest.glob("shard-*.tar"))
    assert len(shards) > 1
    manifest = json.loads((dest / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"]) == 7
    for entry in manifest["shards"]:
        # The bound covers member data and headers; tar's end-of-archive padding comes on top.
        assert entry["samples"] == 1 or entry["bytes"] <= 6000 + 10240


def test_tar_source_keeps_labels_and_counts_bad_samples(tmp_path, make_shard):
    good = [(f"sample{i}", {"jpg": encoded(photo(i), "JPEG"), "cls": str(i).encode()}) for i in range(4)]
    bad = [("broken", {"jpg": encoded(photo(9), "JPEG")[:200]}), ("textonly", {"txt": b"caption"})]
    src = make_shard(str(tmp_path / "in.tar"), good[:2] + bad + good[2:])
    dest = tmp_path / "shards"
    assert run_cli(src, str(dest), "--reencode", "jpeg") == 0
    samples = read_shards(dest)
    assert [fields["cls"] for _, _, fields in samples] == [b"0", b"1", b"2", b"3"]
    assert [key for _, key, _ in samples] == ["000000000", "000000001", "000000004", "000000005"]
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["shards"][0]["skipped"] == {"truncated": 1, "no-image": 1}


def test_missing_source_is_a_clean_error(tmp_path, capsys):
    assert run_cli(str(tmp_path / "nothing"), str(tmp_path / "out")) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_s3_destination_and_rerun(image_folder, s3_bucket, capsys):
    dest = s3_bucket.url("datasets/pets")
    args = (str(image_folder), dest, "--max-count", "4", "--class-dirs", "--endpoint-url", s3_bucket.endpoint,
            "--json")
    assert run_cli(*args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards_written"] == 2 and summary["samples"] == 7
    assert storage.listdir(dest, s3_bucket.storage) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]
    data = storage.read_bytes(f"{dest}/shard-000001.tar", s3_bucket.storage)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    assert len([n for n in names if n.endswith(".cls")]) == 3

    assert run_cli(*args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["shards_written"] == 0 and again["shards_kept"] == 2


def test_a_source_without_a_readable_image_writes_nothing_and_blocks_no_later_run(tmp_path, capsys):
    """It said "wrote 0 shards", exit 0, and left a complete manifest of nothing: the next run, with
    images added, believed it was done and wrote nothing either."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    assert cli.main(["make-shards", str(src), str(dest)]) == 2
    assert "holds no files" in capsys.readouterr().err
    (src / "a.jpg").write_bytes(b"not a jpeg")
    assert cli.main(["make-shards", str(src), str(dest)]) == 2
    err = capsys.readouterr().err
    assert "no image in" in err and "(skipped: not-an-image 1)" in err
    assert not (dest / "manifest.json").exists()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(src / "b.png")
    assert cli.main(["make-shards", str(src), str(dest)]) == 0
    assert json.loads((dest / "manifest.json").read_text())["shards"][0]["samples"] == 1
