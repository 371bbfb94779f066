"""Fashion-MNIST reader on the real IDX files, the procedural stand-in, the long-tail subset, demo shards."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stream_swav import cli
from stream_swav.apps import datasets as fashion_mnist
from stream_swav.apps.datasets import find_fashion_mnist, load_split, procedural_dataset, read_idx
from stream_swav.apps.demo import demo_shards
from stream_swav.apps.make_shards import array_samples
from fmnist_helpers import SHARED_FMNIST, needs_fmnist, write_fmnist_subset
from stream_swav.apps.evaluate import knn_top1
from stream_swav.data.decode import DecodeLimits, SampleError, decode_image
from stream_swav.data.shards import ShardReport, read_samples

LIMITS = DecodeLimits(max_pixels=10_000_000, min_side=8, max_bytes=1 << 20)


@pytest.fixture(scope="module")
def small_fmnist(tmp_path_factory) -> Path:
    """The first 60 train and 40 test images of the real files (a real subset)."""
    return write_fmnist_subset(tmp_path_factory.mktemp("fmnist-small"), train=60, test=40)


def shard_samples(folder: Path):
    samples = []
    for shard in sorted(folder.glob("shard-*.tar")):
        with open(shard, "rb") as f:
            samples.extend(read_samples(f, 1 << 20, Counter(), ShardReport()))
    return samples


@needs_fmnist
def test_real_files_load_with_their_documented_shapes_and_balance():
    assert find_fashion_mnist(SHARED_FMNIST) == SHARED_FMNIST
    train_images, train_labels = load_split(SHARED_FMNIST, "train")
    test_images, test_labels = load_split(SHARED_FMNIST, "test")
    assert train_images.shape == (60_000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (10_000, 28, 28)
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    # The first test image is an ankle boot (class 9): a check that bytes map to the right pixels.
    assert test_labels[0] == 9 and train_labels[0] == 9
    assert 0 < train_images.mean() < 255 and train_images.max() == 255


@needs_fmnist
def test_search_order_finds_shared_beside_the_repo(monkeypatch, tmp_path):
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    assert SHARED_FMNIST in fashion_mnist.candidate_dirs()
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    assert fashion_mnist.candidate_dirs()[0] == tmp_path
    # An empty folder named first is passed over.
    assert find_fashion_mnist() == SHARED_FMNIST


@needs_fmnist
def test_make_shards_from_idx_folder_writes_labelled_pngs(small_fmnist, tmp_path):
    dest = tmp_path / "shards"
    rc = cli.main(["make-shards", str(small_fmnist), str(dest), "--split", "test", "--max-count", "16", "--size", "32",
                           "--no-progress"])
    assert rc == 0
    images, labels = load_split(small_fmnist, "test")
    samples = shard_samples(dest)
    assert len(list(dest.glob("shard-*.tar"))) == 3
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(40)]
    assert [int(s.meta["cls"]) for s in samples] == labels.tolist()
    for sample, original in zip(samples, images):
        assert sample.image_ext == "png"
        decoded = decode_image(sample.image, LIMITS, 32)
        assert decoded.mode == "RGB" and decoded.size == (32, 32)
        # Upscaled, but still the same picture.
        back = np.asarray(decoded.convert("L").resize((28, 28), Image.Resampling.BICUBIC), dtype=np.float32)
        assert np.corrcoef(back.ravel(), original.ravel().astype(np.float32))[0, 1] > 0.95


@needs_fmnist
def test_native_size_png_keeps_pixels_exactly(small_fmnist):
    images, labels = load_split(small_fmnist, "train")
    sample = next(array_samples(images, labels, size=28, image_format="png", start=5))
    assert sample.index == 5 and sample.fields["cls"] == str(labels[5]).encode()
    decoded = np.asarray(decode_image(sample.fields["png"], LIMITS, 28))
    assert (decoded == images[5][..., None]).all()


def test_broken_idx_files_are_refused(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x02" + (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + bytes(11))
    with pytest.raises(ValueError, match="body has 11 bytes"):
        read_idx(path)
    with gzip.open(path, "wb") as f:
        f.write(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read"):
        read_idx(path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_split(tmp_path, "train")


def test_procedural_dataset_is_deterministic_balanced_and_not_a_colour_lookup():
    images, labels = procedural_dataset(400, seed=3, size=24)
    again, again_labels = procedural_dataset(400, seed=3, size=24)
    other, _ = procedural_dataset(400, seed=4, size=24)
    assert images.shape == (400, 24, 24, 3) and images.dtype == np.uint8
    assert (images == again).all() and (labels == again_labels).all() and not (images == other).all()
    assert np.bincount(labels).tolist() == [40] * 10
    # Colours are drawn independently of the class: per-class mean colours are all close to mid-grey.
    class_means = np.stack([images[labels == c].reshape(-1, 3).mean(axis=0) for c in range(10)])
    assert np.abs(class_means - class_means.mean(axis=0)).max() < 20
    # Structure tells the classes apart where colour does not: kNN on translation-invariant
    # spectrum magnitudes is far above chance, kNN on the mean colour is at chance.
    test_images, test_labels = procedural_dataset(200, seed=4, size=24)

    def spectrum(x: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.abs(np.fft.fft2(x.mean(axis=3) / 255.0)).reshape(len(x), -1)).float()

    def mean_colour(x: np.ndarray) -> torch.Tensor:
        return torch.tensor(x.reshape(len(x), -1, 3).mean(axis=1)).float()

    train_y, test_y = torch.tensor(labels), torch.tensor(test_labels)
    assert knn_top1(spectrum(images), train_y, spectrum(test_images), test_y) > 0.3
    assert knn_top1(mean_colour(images), train_y, mean_colour(test_images), test_y) < 0.2


def decode_outcomes(folder: Path) -> Counter:
    outcomes: Counter = Counter()
    for sample in shard_samples(folder):
        try:
            decode_image(sample.image, LIMITS, 8)
            outcomes["ok" if "cls" in sample.meta else "ok-unlabelled"] += 1
        except SampleError as error:
            outcomes[error.reason] += 1
    return outcomes


def test_demo_shards_procedural_with_odd_samples(tmp_path):
    made = demo_shards(tmp_path / "demo", dataset="procedural", procedural_train=100, eval_train=30, eval_test=20,
                       size=16, max_count=50)
    assert made.odd_count == 12 and made.train_count == 112
    assert made.eval_train_count == 30 and made.eval_test_count == 20
    assert "procedural" in made.describe()
    # Broken samples are skipped by the decoder; CMYK, 16-bit and palette files decode fine.
    assert decode_outcomes(Path(made.train)) == Counter({"ok": 106, "empty": 2, "not-an-image": 2, "truncated": 2})
    assert decode_outcomes(Path(made.eval_test)) == Counter({"ok": 20})
    assert decode_outcomes(Path(made.eval_train)) == Counter({"ok": 30})

    again = demo_shards(tmp_path / "demo", dataset="procedural", procedural_train=100, eval_train=30,
                        eval_test=20, size=16, max_count=50)
    assert all(s.shards_written == 0 for s in again.summaries.values())


@needs_fmnist
def test_demo_shards_from_fashion_mnist(small_fmnist, tmp_path):
    made = demo_shards(tmp_path / "demo", data_dir=small_fmnist, eval_train=25, eval_test=15)
    assert made.image_size == 28 and made.train_count == 72 and "Fashion-MNIST" in made.describe()
    train_images, train_labels = load_split(small_fmnist, "train")
    index = shard_samples(Path(made.eval_train))
    assert len(index) == 25
    # The kNN index holds real training images with their labels.
    rows = {train_images[i].tobytes(): int(train_labels[i]) for i in range(len(train_images))}
    for sample in index:
        pixels = np.asarray(decode_image(sample.image, LIMITS, 28).convert("L"))
        assert rows[pixels.tobytes()] == int(sample.meta["cls"])
    manifest = json.loads((Path(made.train) / "manifest.json").read_text())
    assert manifest["settings"]["source"] == "fashion-mnist" and manifest["complete"]
    with tarfile.open(sorted(Path(made.train).glob("*.tar"))[0]) as tar:
        assert any(name.endswith(".jpg") for name in tar.getnames())


def test_missing_fashion_mnist_is_an_error_when_asked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Fashion-MNIST"):
        demo_shards(tmp_path / "demo", data_dir=tmp_path)
    with pytest.raises(ValueError, match="dataset must be"):
        demo_shards(tmp_path / "demo", dataset="imagenet")


def test_odd_images_are_what_they_claim():
    from stream_swav.apps.odd_images import odd_images

    rgb = np.asarray(Image.new("RGB", (20, 20), (200, 40, 90)))
    odd = {o.name: o for o in odd_images(rgb)}
    assert Image.open(io.BytesIO(odd["cmyk-jpeg"].data)).mode == "CMYK"
    assert Image.open(io.BytesIO(odd["gray16-png"].data)).mode.startswith("I;16")
    assert Image.open(io.BytesIO(odd["palette-png"].data)).mode == "P"
    assert odd["zero-bytes"].data == b""
    assert all(o.decodable == (o.name in ("cmyk-jpeg", "gray16-png", "palette-png")) for o in odd.values())
