"""Labelled images from shards as the evaluation and the reference of `curation.balance_signal:
reference` need them: decoded with the training path's decoder, resized (shorter side) and centre-cropped
to one size, in shard and archive order, with what was skipped counted by reason."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from stream_swav import storage
from stream_swav.config import DataConfig, StorageConfig
from stream_swav.curation import perceptual_hash
from stream_swav.data.decode import DecodeLimits, SampleError, decode_image
from stream_swav.data.shards import ShardReport, iter_shard, parse_label
from stream_swav.data.sources import ShardSource


# The label of an image kept without one (`load_labeled_images(..., unlabelled=True)`).
NO_LABEL = -1


class NoShardsFound(FileNotFoundError):
    """A shard spec that lists no shard (as opposed to storage that cannot be reached)."""


@dataclass
class LabeledImages:
    # (N, S, S, 3) uint8, resized and centre-cropped.
    images: Tensor
    # (N,) int64; NO_LABEL for images kept without a label.
    labels: Tensor
    # Samples left out, by reason (decode failures, missing or malformed labels...).
    skipped: Counter = field(default_factory=Counter)
    # With hashes=True: the perceptual hash of each image as decoded, before resizing, as the decode
    # worker hashes it for curation.dedup.
    hashes: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side to `size` (bicubic), then the central size x size square, as (S, S, 3) uint8.
    Only that square's window of the image is resampled, so an image far longer than wide (an
    8 x 5,000,000 PNG) costs what its square does, not its whole length scaled up first."""
    width, height = image.size
    if min(width, height) == size:
        left, top = (width - size) // 2, (height - size) // 2
        return np.asarray(image.crop((left, top, left + size, top + size)))
    scale = size / min(width, height)
    scaled_width, scaled_height = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (scaled_width - size) // 2, (scaled_height - size) // 2
    # The window, in the image's own coordinates, that becomes the square of the scaled image.
    x, y = width / scaled_width, height / scaled_height
    box = (left * x, top * y, (left + size) * x, (top + size) * y)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


def load_labeled_images(spec: str, image_size: int, storage_cfg: StorageConfig | None = None,
                        data_cfg: DataConfig | None = None, limit: int = 0, *, unlabelled: bool = False,
                        hashes: bool = False, key: str = "data.shards") -> LabeledImages:
    """Every labelled image of the shards `spec` names (folder/prefix, brace pattern or .txt list),
    in shard and archive order, at most `limit` (0: all). `unlabelled` also keeps images without a
    label (as NO_LABEL); `hashes` records each image's perceptual hash; a malformed spec's error
    names `key`, the setting it came from."""
    storage_cfg = storage_cfg or StorageConfig()
    data_cfg = data_cfg or DataConfig()
    limits = DecodeLimits.from_config(data_cfg)
    shards = ShardSource(spec, storage_cfg, key=key).list_shards()
    if not shards:
        raise NoShardsFound(f"{spec}: no shards found")
    images: list[np.ndarray] = []
    labels: list[int] = []
    image_hashes: list[int] = []
    skipped: Counter = Counter()
    for url in shards:
        fs, _ = storage.filesystem_for(url, storage_cfg)
        report = ShardReport()
        # A shuffle buffer of one keeps archive order.
        for _, sample in iter_shard(url, fs, seed=0, buffer_size=1, max_sample_bytes=limits.max_bytes,
                                    read_retries=data_cfg.shard_read_retries,
                                    retry_backoff_s=data_cfg.shard_retry_backoff_s, report=report,
                                    max_shard_bytes=data_cfg.max_shard_bytes, max_expansion=data_cfg.max_expansion):
            if limit and len(labels) >= limit:
                break
            if sample.error is not None or sample.image is None:
                skipped[sample.error or "no-image"] += 1
                continue
            label = parse_label(sample.meta.get("cls"))
            if label is None and not unlabelled:
                skipped["no-label"] += 1
                continue
            try:
                image = decode_image(sample.image, limits, image_size)
            except SampleError as error:
                skipped[error.reason] += 1
                continue
            images.append(resize_center_crop(image, image_size))
            labels.append(NO_LABEL if label is None else label)
            if hashes:
                image_hashes.append(perceptual_hash(image))
        skipped.update(report.errors)
        if limit and len(labels) >= limit:
            break
    if not labels:
        wanted = ("images (samples need a decodable image)" if unlabelled
                  else "labelled images (samples need a decodable image and a <key>.cls)")
        raise ValueError(f"{spec}: no {wanted}; skipped: {dict(skipped)}")
    return LabeledImages(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), skipped,
                         image_hashes)


def normalized_batches(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...], batch_size: int,
                       device: torch.device) -> Iterator[Tensor]:
    """(N, S, S, 3) uint8 images as float (B, 3, S, S) batches on `device`, scaled to [0, 1] and
    normalised with the training mean and std; channels_last on CUDA."""
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        batch = (batch / 255.0 - mean_t) / std_t
        yield batch.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else batch


__all__ = ["NO_LABEL", "LabeledImages", "NoShardsFound", "load_labeled_images", "normalized_batches", "resize_center_crop"]
