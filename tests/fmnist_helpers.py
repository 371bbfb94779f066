"""Real Fashion-MNIST subsets for tests: the first images of ../shared's IDX files, re-written as IDX."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from stream_swav.apps import datasets as fashion_mnist

REPO = Path(__file__).resolve().parents[1]
SHARED_FMNIST = REPO.parent / "shared" / "data" / "fashion-mnist"

needs_fmnist = pytest.mark.skipif(not fashion_mnist.has_idx_files(SHARED_FMNIST),
                                  reason=f"Fashion-MNIST IDX files not found in {SHARED_FMNIST}")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fmnist_subset(folder: Path, train: int, test: int) -> Path:
    """The first `train` and `test` images of each split, with their labels, as IDX files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        images, labels = fashion_mnist.load_split(SHARED_FMNIST, split)
        image_stem, label_stem = fashion_mnist.SPLIT_FILES[split]
        write_idx(folder / f"{image_stem}.gz", images[:count])
        write_idx(folder / f"{label_stem}.gz", labels[:count])
    return folder
