"""WebDataset interoperability both ways, with the webdataset library itself (a test dependency only;
stream-swav's shard reader and writer are its own):

- shards written by `webdataset.ShardWriter` / `TarWriter`, plain and gzipped, are read by our reader
  and stream through a real training run, every sample trained;
- shards written by `stream-swav make-shards` read with `webdataset.WebDataset(...).decode("pil")`
  give the keys, labels and images of the source.
"""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import badsamples
import pytest
import ray
import webdataset
from conftest import colour_samples
from PIL import Image
from runtime_helpers import RAY_ENV, pass_counts, run_to_end, tiny_config

from stream_swav import cli
from stream_swav.data.shards import ShardReport, parse_label, read_samples

MAX_SAMPLE_BYTES = 1 << 20


def webdataset_sample(key: str, members: dict[str, bytes]) -> dict[str, object]:
    """A sample as webdataset writers take it: bytes kept as they are, the class as an int."""
    sample: dict[str, object] = {"__key__": key}
    for ext, data in members.items():
        sample[ext] = int(data) if ext == "cls" else data
    return sample


def write_with_webdataset(folder: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Two plain shards from ShardWriter and one gzipped shard from TarWriter; returns every sample."""
    plain = colour_samples(16, prefix="plain")
    with webdataset.ShardWriter(str(folder / "wds-%06d.tar"), maxcount=8, verbose=0) as writer:
        for key, members in plain:
            writer.write(webdataset_sample(key, members))
    gzipped = colour_samples(8, prefix="gz", start=16)
    with webdataset.TarWriter(str(folder / "wds-gz.tar.gz")) as writer:
        for key, members in gzipped:
            writer.write(webdataset_sample(key, members))
    return plain + gzipped


def our_reader(path: Path) -> list[tuple[str, str, bytes, int | None]]:
    """(key, image extension, image bytes, label) of every sample our reader gives, in archive order."""
    errors: Counter = Counter()
    with open(path, "rb") as f:
        samples = [(s.key, s.image_ext, s.image, parse_label(s.meta.get("cls")))
                   for s in read_samples(f, MAX_SAMPLE_BYTES, errors, ShardReport())]
    assert not errors, (path, errors)
    return samples


def test_our_reader_reads_webdataset_shards_plain_and_gzipped(tmp_path):
    written = write_with_webdataset(tmp_path)
    shards = sorted(tmp_path.iterdir())
    assert [p.name for p in shards] == ["wds-000000.tar", "wds-000001.tar", "wds-gz.tar.gz"]
    assert shards[-1].read_bytes()[:2] == b"\x1f\x8b"
    read = [sample for shard in shards for sample in our_reader(shard)]
    expected = []
    for key, members in written:
        ext = "png" if "png" in members else "jpg"
        expected.append((key, ext, members[ext], int(members["cls"])))
    assert sorted(read) == sorted(expected)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=3, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             runtime_env=RAY_ENV, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_webdataset_shards_stream_through_a_training_run(local_ray, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    written = write_with_webdataset(shards)
    # The trainer names a sample <shard URL>/<key>; the member lists come from the standard library.
    keys = set()
    for shard in shards.iterdir():
        with tarfile.open(shard) as tar:
            keys |= {f"{shard.resolve()}/{name.split('.', 1)[0]}" for name in tar.getnames()}
    assert len(keys) == len(written) == 24
    cfg = tiny_config({"data": {"shards": str(shards)}, "checkpoint": {"dir": str(tmp_path / "ckpt")},
                       "train": {"image_budget": 2 * len(keys)}})
    trainer = run_to_end(cfg, tmp_path / "trained.jsonl")
    assert trainer.stop_reason == "budget reached"
    assert pass_counts(trainer.trained, 0) == {key: 1 for key in keys}


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """ImageFolder layout of real JPEG and PNG files of different sizes."""
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    for i in range(3):
        (root / "cat" / f"c{i}.jpg").write_bytes(badsamples.jpeg(40 + i, 30, seed=i))
    for i in range(2):
        buffer = io.BytesIO()
        badsamples.photo_like(24, 36 + i, seed=10 + i).save(buffer, "PNG")
        (root / "dog" / f"d{i}.png").write_bytes(buffer.getvalue())
    (root / "dog" / "d2.jpeg").write_bytes(badsamples.jpeg(50, 20, seed=20))
    return root


def test_make_shards_output_reads_with_webdataset(class_folder, tmp_path):
    dest = tmp_path / "shards"
    assert cli.main(["make-shards", str(class_folder), str(dest), "--class-dirs", "--max-count", "4",
                     "--no-progress"]) == 0
    urls = sorted(str(p) for p in dest.glob("shard-*.tar"))
    assert len(urls) == 2

    dataset = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    theirs = []
    for sample in dataset:
        ext = next(e for e in ("jpg", "png") if e in sample)
        assert isinstance(sample[ext], Image.Image)
        theirs.append((sample["__key__"], sample["cls"], sample[ext].size))

    # The source in make-shards' order: sorted relative paths, class = index of the folder name.
    files = sorted(p.relative_to(class_folder).as_posix() for p in class_folder.rglob("*") if p.is_file())
    source = []
    for index, name in enumerate(files):
        with Image.open(class_folder / name) as image:
            source.append((f"{index:09d}", ["cat", "dog"].index(name.split("/")[0]), image.size))
    assert theirs == source
    ours = [(key, label) for url in urls for key, _, _, label in our_reader(Path(url))]
    assert ours == [(key, label) for key, label, _ in theirs]
