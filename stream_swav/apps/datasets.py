"""Labelled image sets for demos and evaluation: Fashion-MNIST, or a procedural stand-in.

Fashion-MNIST (Zalando Research, MIT licence) is read from its original IDX
gzip files. Where it is absent, `procedural_dataset` generates a 10-class set
whose classes differ in shape and texture while colours are drawn
independently of the class, so pixel colour alone does not give the label away.
Both come as uint8 arrays; `make_shards.array_samples` turns them into shards.
"""
from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np

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
    repo = Path(__file__).resolve().parents[2]
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


def require_fashion_mnist(explicit: str | Path | None = None, hint: str = "") -> Path:
    """`find_fashion_mnist`, or FileNotFoundError naming where it looked (and `hint`, the caller's
    way to point elsewhere)."""
    folder = find_fashion_mnist(explicit)
    if folder is None:
        where = explicit or ", ".join(str(p) for p in candidate_dirs())
        raise FileNotFoundError(f"no Fashion-MNIST IDX files in {where}" + (f" ({hint})" if hint else ""))
    return folder


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
