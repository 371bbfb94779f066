"""Images per CPU core through decode + multi-crop: our worker path against a classic CPU pipeline.

ours:     JPEG draft decode (1/2..1/8 scale while the short side stays >= the
          largest crop) + random-resized-crop geometry and flips done as one
          box-resize per crop; uint8 out, photometric augmentation left to the GPU.
classic:  full decode + torchvision RandomResizedCrop, flip, ColorJitter
          (0.8, 0.8, 0.8, 0.2) with p 0.8, RandomGrayscale 0.2, GaussianBlur p 0.5
          on global crops, ToTensor + Normalize, all in PIL/torch on the CPU.
Both make 2 x 224 + 6 x 96 crops per image (the default CropsConfig) from the
same photographs, in one process on one thread, and are timed in CPU seconds
so other load on the machine matters less. Each photo size runs twice: as
stored, and re-encoded with its longer side at 640 px (JPEG quality 90).

    python bench/decode.py --photos /usr/share/backgrounds --seconds 10
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from stream_swav.config import AugmentConfig, CropsConfig, DataConfig
from stream_swav.data.decode import DecodeLimits, decode_image
from stream_swav.data.multicrop import MultiCropGeometry, crop_image, min_decode_side, stack_crops
from stream_swav.imaging import pillow_flavour

from machine import cpu_model  # bench/machine.py, beside this script

PHOTO_SUFFIXES = (".jpg", ".jpeg")
BATCH = 16


def find_photos(folder: Path) -> list[Path]:
    photos = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        sys.exit(
            f"no JPEG photographs (*.jpg, *.jpeg) under {folder}. Pass --photos DIR, or on Debian/Ubuntu "
            "install some: apt-get install mate-backgrounds (its nature/ folder holds photographs)."
        )
    return photos


def shrink(data: bytes, longer_side: int) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((longer_side, longer_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def classic_transforms(crops: CropsConfig, augment: AugmentConfig) -> tuple[Callable, Callable]:
    def for_crop(size: int, scale: tuple[float, float], blur_prob: float) -> Callable:
        steps = [
            transforms.RandomResizedCrop(size, scale=scale),
            transforms.RandomHorizontalFlip(crops.hflip_prob),
            transforms.RandomApply(
                [transforms.ColorJitter(augment.brightness, augment.contrast, augment.saturation, augment.hue)],
                p=augment.color_jitter_prob,
            ),
            transforms.RandomGrayscale(augment.grayscale_prob),
        ]
        if blur_prob > 0:
            # Kernel about a tenth of the crop, odd, as in SimCLR/BYOL.
            kernel = size // 10 | 1
            steps.append(transforms.RandomApply([transforms.GaussianBlur(kernel, augment.blur_sigma)], p=blur_prob))
        steps += [transforms.ToTensor(), transforms.Normalize(augment.mean, augment.std)]
        return transforms.Compose(steps)

    return (
        for_crop(crops.global_size, crops.global_scale, augment.blur_prob_global),
        for_crop(crops.local_size, crops.local_scale, augment.blur_prob_local),
    )


def classic_pipeline(crops: CropsConfig, augment: AugmentConfig) -> Callable[[list[bytes]], int]:
    global_transform, local_transform = classic_transforms(crops, augment)

    def run(batch: list[bytes]) -> int:
        for data in batch:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            for _ in range(crops.global_count):
                global_transform(image)
            for _ in range(crops.local_count):
                local_transform(image)
        return len(batch)

    return run


def our_pipeline(crops: CropsConfig, limits: DecodeLimits, use_draft: bool) -> Callable[[list[bytes]], int]:
    geometry = MultiCropGeometry.from_config(crops)
    target_side = min_decode_side(crops) if use_draft else 1 << 30
    rng = np.random.default_rng(0)

    def run(batch: list[bytes]) -> int:
        per_image = [crop_image(decode_image(data, limits, target_side), geometry, rng) for data in batch]
        stack_crops(per_image, geometry)
        return len(batch)

    return run


def images_per_cpu_second(run: Callable[[list[bytes]], int], photos: list[bytes], seconds: float) -> float:
    """Whole passes over `photos` until `seconds` of CPU time are spent, so every photo weighs the same."""
    run(photos[:2])  # warm-up: plugin imports, first allocations
    images = 0
    start = time.process_time()
    while time.process_time() - start < seconds:
        for first in range(0, len(photos), BATCH):
            images += run(photos[first : first + BATCH])
    return images / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=Path("/usr/share/backgrounds"),
                        help="folder searched recursively for *.jpg / *.jpeg photographs")
    parser.add_argument("--seconds", type=float, default=20.0, help="CPU seconds per pipeline and size")
    parser.add_argument("--small-side", type=int, default=640, help="longer side of the resized copies")
    args = parser.parse_args()

    torch.set_num_threads(1)
    crops, augment = CropsConfig(), AugmentConfig()
    limits = DecodeLimits.from_config(DataConfig())
    paths = find_photos(args.photos)
    originals = [p.read_bytes() for p in paths]
    sizes = [Image.open(io.BytesIO(d)).size for d in originals]
    cases = {"full": originals, f"{args.small_side}px": [shrink(d, args.small_side) for d in originals]}

    pipelines = {
        "classic: full decode + torchvision augmentation": classic_pipeline(crops, augment),
        "ours without draft: full decode + box-resize": our_pipeline(crops, limits, use_draft=False),
        "ours: draft decode + box-resize": our_pipeline(crops, limits, use_draft=True),
        # The draft side the decode workers used before 2026-12-08 (small crops upsampled).
        "ours: draft decode to 224 (decode_side 224)": our_pipeline(dataclasses.replace(crops, decode_side=224),
                                                                    limits, use_draft=True),
    }
    print(f"CPU: {cpu_model()}, 1 thread | {pillow_flavour()} | torch {torch.__version__} | "
          f"torchvision {torchvision.__version__} | numpy {np.__version__}")
    print(f"photos: {len(paths)} JPEGs under {args.photos}, median {statistics.median(w * h for w, h in sizes) / 1e6:.1f} "
          f"Mpx (largest {max(sizes, key=lambda s: s[0] * s[1])}); crops {crops.global_count}x{crops.global_size} + "
          f"{crops.local_count}x{crops.local_size}; {args.seconds:g} CPU-s per row")
    print(f"{'size':<7} {'pipeline':<50} {'img/s/core':>10} {'ms/img':>8} {'vs classic':>10}")
    for case, photos in cases.items():
        baseline = 0.0
        for name, run in pipelines.items():
            rate = images_per_cpu_second(run, photos, args.seconds)
            baseline = baseline or rate
            print(f"{case:<7} {name:<50} {rate:>10.1f} {1000 / rate:>8.1f} {rate / baseline:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
