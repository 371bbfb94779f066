"""Labelled image sets for demos and evaluation: Fashion-MNIST, or a procedural stand-in.

Fashion-MNIST (Zalando Research, MIT licence) is read from its original IDX
gzip files. Where it is absent, `procedural_dataset` generates a 10-class set
whose classes differ in shape and texture while colours are drawn
independently of the class, so pixel colour alone does not give the label away.

`demo_shards` turns either into the shards the demo trains and evaluates on;
`zipf_subset` picks a long-tailed subset for imbalanced-stream experiments.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.make_shards import ShardSample, Summary, write_shards
from pipelines.odd_images import odd_images
from stream_swav.config import StorageConfig

ENV_VAR = "STREAM_SWAV_FMNIST"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
NUM_CLASSES = 10
PROCEDURAL_CLASS_NAMES = ("disc", "ring", "square", "triangle", "cross", "horizontal-stripes", "vertical-stripes",
                          "diagonal-stripes", "checkerboard", "dot-grid")
# IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions.
IDX_UBYTE = 0x08
JPEG_QUALITY = 90
DEMO_DATASETS = ("auto", "fashion-mnist", "procedural")
# Corrupt and odd-format samples the demo's train shards carry, spread over the stream.
DEMO_ODD_COPIES = 2


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def has_idx_files(folder: Path) -> bool:
    """Whether `folder` holds all four Fashion-MNIST files (gzipped or not)."""
    return all(_idx_path(Path(folder), stem) is not None for pair in SPLIT_FILES.values() for stem in pair)


def candidate_dirs() -> list[Path]:
    """Where Fashion-MNIST is looked for, in order."""
    repo = Path(__file__).resolve().parents[1]
    found = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    found += [repo.parent / "shared" / "data" / "fashion-mnist",
              Path.cwd().parent / "shared" / "data" / "fashion-mnist",
              SYSTEM_DIR]
    return found


def find_fashion_mnist(explicit: str | Path | None = None) -> Path | None:
    """The first folder holding the four IDX files: `explicit`, $STREAM_SWAV_FMNIST,
    ../shared/data/fashion-mnist beside the repository and beside the working
    directory, /usr/share/datasets/fashion-mnist. None when none does."""
    folders = [Path(explicit)] if explicit else candidate_dirs()
    return next((f for f in folders if f.is_dir() and has_idx_files(f)), None)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes as an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: cannot read: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != IDX_UBYTE:
        raise ValueError(f"{path}: IDX element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: IDX header truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape)
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX body has {len(data) - header} bytes, header says {expected} {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_split(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the "train" or "test" split."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be train or test, got {split!r}")
    folder = Path(folder)
    paths = [_idx_path(folder, stem) for stem in SPLIT_FILES[split]]
    missing = [stem for stem, path in zip(SPLIT_FILES[split], paths) if path is None]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}[.gz]")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{folder}: {split} labels exceed {NUM_CLASSES - 1}")
    return images, labels.astype(np.int64)


def encode_array(pixels: np.ndarray, size: int, image_format: str) -> tuple[str, bytes]:
    """A (H, W) or (H, W, 3) uint8 array as RGB PNG or JPEG bytes, resized to size x size if needed.
    Returns the field extension and the bytes."""
    image = Image.fromarray(pixels).convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
        return "png", buffer.getvalue()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return "jpg", buffer.getvalue()
    raise ValueError(f"image format must be png or jpeg, got {image_format!r}")


def array_samples(images: np.ndarray, labels: np.ndarray, *, size: int, image_format: str = "png",
                  indices: np.ndarray | None = None, start: int = 0) -> Iterator[ShardSample]:
    """Shard samples for `images[indices]` (all by default), keyed by stream position, labels in .cls."""
    order = np.arange(len(images)) if indices is None else np.asarray(indices)
    for position in range(start, len(order)):
        i = int(order[position])
        ext, data = encode_array(images[i], size, image_format)
        yield ShardSample(position, f"{position:09d}", {ext: data, "cls": str(int(labels[i])).encode("ascii")})


# ---- procedural stand-in -------------------------------------------------------------------------------


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _class_mask(label: int, u: np.ndarray, v: np.ndarray, radius: float, frequency: float) -> np.ndarray:
    """Foreground mask of class `label` in rotated, centred coordinates u, v."""
    distance = np.hypot(u, v)
    if label == 0:
        return distance < radius
    if label == 1:
        return (distance < radius) & (distance > 0.55 * radius)
    if label == 2:
        return np.maximum(np.abs(u), np.abs(v)) < 0.8 * radius
    if label == 3:
        return (v > -0.6 * radius) & (np.abs(u) < 0.75 * (0.8 * radius - v)) & (v < 0.8 * radius)
    if label == 4:
        arm = 0.28 * radius
        return ((np.abs(u) < arm) & (np.abs(v) < radius)) | ((np.abs(v) < arm) & (np.abs(u) < radius))
    if label in (5, 6, 7):
        # u runs along the stripes' normal; the orientation is set by the caller's rotation.
        return np.sin(u * frequency) > 0
    if label == 8:
        return np.sin(u * frequency) * np.sin(v * frequency) > 0
    if label == 9:
        return (np.cos(u * frequency) > 0.55) & (np.cos(v * frequency) > 0.55)
    raise ValueError(f"procedural classes are 0..9, got {label}")


def _stripe_angle(label: int, rng: np.random.Generator) -> float:
    jitter = rng.uniform(-0.25, 0.25)
    if label == 5:
        return math.pi / 2 + jitter
    if label == 6:
        return jitter
    # Diagonal either way, so a horizontal flip keeps the class.
    return rng.choice([math.pi / 4, 3 * math.pi / 4]) + jitter


def procedural_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One (size, size, 3) uint8 image of class `label` (see PROCEDURAL_CLASS_NAMES)."""
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    if label in (5, 6, 7):
        angle = _stripe_angle(label, rng)
        cx = cy = 0.0
    else:
        angle = rng.uniform(0, 2 * math.pi)
        cx, cy = rng.uniform(-0.25, 0.25, size=2)
    u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)
    v = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)
    mask = _class_mask(label, u, v, radius=rng.uniform(0.45, 0.75), frequency=rng.uniform(7.0, 12.0))

    background = rng.uniform(0, 255, size=3)
    foreground = rng.uniform(0, 255, size=3)
    while abs(_luma(foreground) - _luma(background)) < 60:
        foreground = rng.uniform(0, 255, size=3)
    # A smooth brightness gradient and pixel noise, so no class is a clean template.
    gradient = (rng.uniform(-30, 30) * x + rng.uniform(-30, 30) * y)[..., None]
    image = np.where(mask[..., None], foreground, background) + gradient + rng.normal(0, 12, (size, size, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def procedural_dataset(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`n` generated RGB images (n, size, size, 3) uint8 and labels (n,) int64, classes balanced
    and shuffled; the same seed gives the same set."""
    if n < 0 or size < 8:
        raise ValueError(f"need n >= 0 and size >= 8, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i] = procedural_image(int(label), rng, size)
    return images, labels


# ---- long tail -----------------------------------------------------------------------------------------


def zipf_class_counts(available: np.ndarray, imbalance_ratio: float) -> np.ndarray:
    """Per-class sample counts n_c proportional to 1/(c+1)^a, with a chosen so that
    n_0 / n_{C-1} == imbalance_ratio and n_0 the largest count every class can afford."""
    classes = len(available)
    if classes < 2:
        return available.copy()
    exponent = math.log(imbalance_ratio) / math.log(classes)
    shares = 1.0 / np.arange(1, classes + 1) ** exponent
    head = int(np.min(available / shares))
    return np.maximum(1, np.floor(head * shares + 1e-9)).astype(np.int64)


def zipf_subset(labels: np.ndarray, imbalance_ratio: float = 100.0, seed: int = 0,
                class_order: Sequence[int] | None = None) -> np.ndarray:
    """Indices of a long-tailed subset: the class of frequency rank r (0 the head) keeps a share
    proportional to 1/(r+1)^a, so the largest class is `imbalance_ratio` times the smallest.
    `class_order` lists the classes from most to least frequent (default: label order).
    Which samples are kept, and their order (as a stream would see them), follow `seed`."""
    labels = np.asarray(labels)
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    classes = np.unique(labels)
    if class_order is not None:
        if sorted(int(c) for c in class_order) != [int(c) for c in classes]:
            raise ValueError(f"class_order must list each class once, got {list(class_order)} "
                             f"for classes {classes.tolist()}")
        classes = np.asarray(class_order)
    available = np.array([(labels == c).sum() for c in classes])
    counts = zipf_class_counts(available, imbalance_ratio)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:count] for c, count in zip(classes, counts)]
    return rng.permutation(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


# ---- demo shards ---------------------------------------------------------------------------------------


@dataclass
class DemoShards:
    dataset: str
    train: str
    eval_train: str
    eval_test: str
    train_count: int
    eval_train_count: int
    eval_test_count: int
    image_size: int
    # Deliberately broken or odd-format samples among the train samples.
    odd_count: int
    summaries: dict[str, Summary]

    def describe(self) -> str:
        return (f"{self.dataset}, {self.image_size} px: {self.train_count:,} train samples (incl. "
                f"{self.odd_count} corrupt/odd-format on purpose) in {self.train}; kNN index "
                f"{self.eval_train_count:,} in {self.eval_train}, queries {self.eval_test_count:,} in "
                f"{self.eval_test}")


def _with_odd_samples(images: np.ndarray, labels: np.ndarray, size: int, image_format: str,
                      copies: int) -> Iterator[ShardSample]:
    """The images as samples, with the odd-image set inserted `copies` times at spread-out positions."""
    base = array_samples(images, labels, size=size, image_format=image_format)
    odd = []
    for copy in range(copies):
        source = int(len(images) * (copy + 0.5) / copies) if len(images) else 0
        pixels = np.asarray(Image.fromarray(images[source]).convert("RGB").resize((size, size)))
        odd.append((source, odd_images(pixels), int(labels[source])))
    position = 0
    for sample in base:
        while odd and odd[0][0] == sample.index:
            _, extras, label = odd.pop(0)
            for extra in extras:
                fields = {extra.ext: extra.data}
                if extra.decodable:
                    fields["cls"] = str(label).encode("ascii")
                yield ShardSample(position, f"{position:09d}", fields)
                position += 1
        yield ShardSample(position, f"{position:09d}", sample.fields)
        position += 1


def demo_shards(dest: str | Path, storage_cfg: StorageConfig | None = None, *, eval_train: int = 10_000,
                eval_test: int = 2_000, dataset: str = "auto", data_dir: str | Path | None = None, size: int = 0,
                image_format: str = "png", procedural_train: int = 20_000, max_count: int = 5_000,
                seed: int = 0, progress: bool = False) -> DemoShards:
    """Train shards (every training image plus a few corrupt and odd-format samples) under
    dest/train, and labelled evaluation shards under dest/eval-train (a seeded subset of the
    training images, the kNN index) and dest/eval-test (queries from the test split).

    `dataset`: "fashion-mnist" (from `data_dir`, else searched, see `find_fashion_mnist`),
    "procedural" (`procedural_dataset`), or "auto": Fashion-MNIST when found, else procedural.
    `size` 0 keeps the native size (28 for Fashion-MNIST, 32 procedural). Re-running
    keeps finished shards (see make_shards), so a second call is cheap.
    """
    storage_cfg = storage_cfg or StorageConfig()
    dest = str(dest).rstrip("/")
    if dataset not in DEMO_DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DEMO_DATASETS)}, got {dataset!r}")
    folder = find_fashion_mnist(data_dir) if dataset != "procedural" else None
    if folder is None and (data_dir or dataset == "fashion-mnist"):
        where = data_dir or ", ".join(str(p) for p in candidate_dirs())
        raise FileNotFoundError(f"no Fashion-MNIST IDX files in {where}")
    if folder is not None:
        description = f"Fashion-MNIST ({folder})"
        train_images, train_labels = load_split(folder, "train")
        test_images, test_labels = load_split(folder, "test")
        size = size or train_images.shape[1]
        source = "fashion-mnist"
    else:
        size = size or 32
        description = ("procedural 10-class shapes" if dataset == "procedural"
                       else "procedural 10-class shapes (Fashion-MNIST not found)")
        train_images, train_labels = procedural_dataset(procedural_train, seed, size)
        test_images, test_labels = procedural_dataset(max(eval_test, 1), seed + 1, size)
        source = f"procedural:{procedural_train}"
    eval_train = min(eval_train, len(train_images))
    eval_test = min(eval_test, len(test_images))
    rng = np.random.default_rng(seed)
    eval_train_indices = np.sort(rng.permutation(len(train_images))[:eval_train])
    eval_test_indices = np.sort(rng.permutation(len(test_images))[:eval_test])
    settings = {"source": source, "size": size, "format": image_format, "seed": seed}
    budget = 1 << 40
    odd_count = DEMO_ODD_COPIES * len(odd_images(np.zeros((size, size, 3), np.uint8)))

    summaries = {
        "train": write_shards(_with_odd_samples(train_images, train_labels, size, image_format, DEMO_ODD_COPIES),
                              f"{dest}/train", max_count, budget, storage_cfg,
                              settings={**settings, "odd_copies": DEMO_ODD_COPIES},
                              total=len(train_images) + odd_count, progress=progress),
        "eval-train": write_shards(array_samples(train_images, train_labels, size=size, image_format=image_format,
                                                 indices=eval_train_indices),
                                   f"{dest}/eval-train", max_count, budget, storage_cfg,
                                   settings={**settings, "count": eval_train}, total=eval_train, progress=progress),
        "eval-test": write_shards(array_samples(test_images, test_labels, size=size, image_format=image_format,
                                                indices=eval_test_indices),
                                  f"{dest}/eval-test", max_count, budget, storage_cfg,
                                  settings={**settings, "count": eval_test}, total=eval_test, progress=progress),
    }
    return DemoShards(dataset=description, train=f"{dest}/train", eval_train=f"{dest}/eval-train",
                      eval_test=f"{dest}/eval-test", train_count=len(train_images) + odd_count,
                      eval_train_count=eval_train, eval_test_count=eval_test, image_size=size,
                      odd_count=odd_count, summaries=summaries)


# ---- command line --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dest", help="folder or s3:// prefix for train/, eval-train/ and eval-test/ shards")
    parser.add_argument("--dataset", choices=DEMO_DATASETS, default="auto",
                        help="auto: Fashion-MNIST when found, else the procedural set")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: searched)")
    parser.add_argument("--size", type=int, default=0, help="image side in px (default: 28, or 32 procedural)")
    parser.add_argument("--format", dest="image_format", choices=("png", "jpeg"), default="png")
    parser.add_argument("--eval-train", type=int, default=10_000, help="labelled images in the kNN index")
    parser.add_argument("--eval-test", type=int, default=2_000, help="labelled query images")
    parser.add_argument("--procedural-train", type=int, default=20_000,
                        help="training images generated when Fashion-MNIST is absent")
    parser.add_argument("--max-count", type=int, default=5_000, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--endpoint-url", default="", help="S3 endpoint (default: from the environment)")


def run(args: argparse.Namespace) -> int:
    made = demo_shards(args.dest, StorageConfig(endpoint_url=args.endpoint_url), eval_train=args.eval_train,
                       eval_test=args.eval_test, dataset=args.dataset, data_dir=args.data_dir, size=args.size,
                       image_format=args.image_format, procedural_train=args.procedural_train,
                       max_count=args.max_count, seed=args.seed, progress=True)
    print(made.describe())
    for name, summary in made.summaries.items():
        print(f"{name}: {json.dumps(summary.to_dict())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.fashion_mnist",
                                     description="Make the demo's train and evaluation shards.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
