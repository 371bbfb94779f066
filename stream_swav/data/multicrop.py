"""Multi-crop geometry on the CPU: random resized crops and flips, as uint8.

Only geometry happens here; colour jitter, grayscale, blur and normalisation
run on the learner's device. Each crop is cut and resized in one Pillow call
(``resize`` with a source ``box``), so no intermediate crop image is made,
and all randomness comes from the `numpy.random.Generator` passed in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stream_swav.config import CropsConfig

# Pillow first box-averages by an integer factor while the source box stays
# over this many times the output size, then resamples; from 3 on the result
# is visually the same as a full-support resample and much cheaper.
REDUCING_GAP = 3.0
# Attempts at a box inside the image before falling back to a centred one.
CROP_ATTEMPTS = 10

PerImageCrops = tuple[list[np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class CropBox:
    """A source rectangle in image pixels and whether its crop is mirrored."""

    left: int
    top: int
    width: int
    height: int
    flip: bool

    @property
    def pil_box(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.left + self.width, self.top + self.height)


@dataclass(frozen=True)
class MultiCropGeometry:
    global_size: int
    global_count: int
    global_scale: tuple[float, float]
    local_size: int
    local_count: int
    local_scale: tuple[float, float]
    hflip_prob: float
    # Aspect ratio (width / height) range of the source box.
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @classmethod
    def from_config(cls, crops: CropsConfig) -> "MultiCropGeometry":
        return cls(
            global_size=crops.global_size,
            global_count=crops.global_count,
            global_scale=tuple(crops.global_scale),
            local_size=crops.local_size,
            local_count=crops.local_count,
            local_scale=tuple(crops.local_scale),
            hflip_prob=crops.hflip_prob,
        )


def min_decode_side(crops: CropsConfig) -> int:
    """Shortest side an image may be decoded at (JPEG draft mode): `crops.decode_side` where set;
    else the side from which the smallest crop of each kind in use (a square of `scale[0]` of the
    image's area) has at least its output size in pixels, so that no crop is upsampled from a
    decode made smaller than the photograph (SwAV crops full-resolution images; a 4032 x 3024 phone
    photo drafted to 504 x 378 would cut the default smallest global crop from 163 px, stretched
    to 224)."""
    if crops.decode_side:
        return crops.decode_side
    kinds = ([(crops.global_size, crops.global_scale)] if crops.global_count else []) + (
        [(crops.local_size, crops.local_scale)] if crops.local_count else [])
    return max(math.ceil(size / math.sqrt(scale[0])) for size, scale in kinds)


def largest_crop_side(crops: CropsConfig) -> int:
    """The largest crop size in use."""
    return crops.global_size if crops.global_count > 0 else crops.local_size


def sample_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip_prob: float,
    rng: np.random.Generator,
) -> CropBox:
    """Random-resized-crop box: area fraction in `scale`, aspect ratio log-uniform in `ratio`.

    A draw whose box does not fit is redrawn, up to `CROP_ATTEMPTS` times;
    then the largest centred box with an allowed aspect ratio is used.
    """
    image_area = width * height
    log_ratio_low, log_ratio_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_ATTEMPTS):
        area = image_area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio_low, log_ratio_high))
        box_width = round(math.sqrt(area * aspect))
        box_height = round(math.sqrt(area / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = int(rng.integers(0, height - box_height + 1))
            left = int(rng.integers(0, width - box_width + 1))
            return CropBox(left, top, box_width, box_height, bool(rng.random() < hflip_prob))
    image_aspect = width / height
    if image_aspect < ratio[0]:
        box_width, box_height = width, round(width / ratio[0])
    elif image_aspect > ratio[1]:
        box_width, box_height = round(height * ratio[1]), height
    else:
        box_width, box_height = width, height
    left, top = (width - box_width) // 2, (height - box_height) // 2
    return CropBox(left, top, box_width, box_height, bool(rng.random() < hflip_prob))


def sample_crop_boxes(
    width: int, height: int, geometry: MultiCropGeometry, rng: np.random.Generator
) -> tuple[list[CropBox], list[CropBox]]:
    """Boxes for one image of this size: (global boxes, local boxes), globals drawn first."""
    global_boxes = [
        sample_crop_box(width, height, geometry.global_scale, geometry.ratio, geometry.hflip_prob, rng)
        for _ in range(geometry.global_count)
    ]
    local_boxes = [
        sample_crop_box(width, height, geometry.local_scale, geometry.ratio, geometry.hflip_prob, rng)
        for _ in range(geometry.local_count)
    ]
    return global_boxes, local_boxes


def render_crop(image: Image.Image, box: CropBox, size: int) -> np.ndarray:
    """(size, size, 3) uint8 pixels of `box`, bilinear; a flipped crop is a mirrored view, not a copy."""
    resized = image.resize((size, size), Image.Resampling.BILINEAR, box=box.pil_box, reducing_gap=REDUCING_GAP)
    pixels = np.asarray(resized)
    return pixels[:, ::-1] if box.flip else pixels


def crop_image(image: Image.Image, geometry: MultiCropGeometry, rng: np.random.Generator) -> PerImageCrops:
    """All crops of one RGB image: (global crops, local crops), each (size, size, 3) uint8."""
    if image.mode != "RGB":
        raise ValueError(f"crop_image needs an RGB image, got mode {image.mode}")
    global_boxes, local_boxes = sample_crop_boxes(image.width, image.height, geometry, rng)
    return (
        [render_crop(image, box, geometry.global_size) for box in global_boxes],
        [render_crop(image, box, geometry.local_size) for box in local_boxes],
    )


def stack_crops(per_image: list[PerImageCrops], geometry: MultiCropGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Crop-major batches: (global_count, B, S, S, 3) and (local_count, B, s, s, 3), contiguous uint8.

    Each crop is copied exactly once, into its slot of a preallocated array.
    """
    batch = len(per_image)
    global_crops = np.empty((geometry.global_count, batch, geometry.global_size, geometry.global_size, 3), np.uint8)
    local_crops = np.empty((geometry.local_count, batch, geometry.local_size, geometry.local_size, 3), np.uint8)
    for index, (image_globals, image_locals) in enumerate(per_image):
        if len(image_globals) != geometry.global_count or len(image_locals) != geometry.local_count:
            raise ValueError(
                f"image {index} has {len(image_globals)} global and {len(image_locals)} local crops, "
                f"expected {geometry.global_count} and {geometry.local_count}"
            )
        for crop_index, crop in enumerate(image_globals):
            global_crops[crop_index, index] = crop
        for crop_index, crop in enumerate(image_locals):
            local_crops[crop_index, index] = crop
    return global_crops, local_crops


__all__ = [
    "CropBox",
    "MultiCropGeometry",
    "PerImageCrops",
    "min_decode_side",
    "sample_crop_box",
    "sample_crop_boxes",
    "render_crop",
    "crop_image",
    "stack_crops",
    "REDUCING_GAP",
    "CROP_ATTEMPTS",
]
