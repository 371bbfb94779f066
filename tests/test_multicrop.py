from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
from PIL import Image

import badsamples
from stream_swav.config import CropsConfig, DataConfig
from stream_swav.data.decode import DecodeLimits, decode_image
from stream_swav.data.multicrop import (
    CropBox,
    MultiCropGeometry,
    crop_image,
    largest_crop_side,
    min_decode_side,
    render_crop,
    sample_crop_box,
    sample_crop_boxes,
    stack_crops,
)

SMALL = CropsConfig(global_size=32, global_count=2, local_size=16, local_count=3)
GEOMETRY = MultiCropGeometry.from_config(SMALL)
RATIO = (3 / 4, 4 / 3)


def _images() -> list[Image.Image]:
    return [badsamples.photo_like(w, h, seed=i) for i, (w, h) in enumerate(((120, 90), (64, 100), (200, 200)))]


def _crop_batch(images: list[Image.Image], geometry: MultiCropGeometry, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return stack_crops([crop_image(image, geometry, rng) for image in images], geometry)


def test_geometry_comes_from_the_crops_config():
    assert GEOMETRY == MultiCropGeometry(
        global_size=32, global_count=2, global_scale=(0.14, 1.0),
        local_size=16, local_count=3, local_scale=(0.05, 0.14), hflip_prob=0.5,
    )


def test_batches_have_the_documented_shapes_and_layout():
    global_crops, local_crops = _crop_batch(_images(), GEOMETRY, seed=0)
    assert global_crops.shape == (2, 3, 32, 32, 3) and local_crops.shape == (3, 3, 16, 16, 3)
    for stack in (global_crops, local_crops):
        assert stack.dtype == np.uint8
        assert stack.flags.c_contiguous
        assert stack.std() > 10  # real pixels, not an unfilled buffer


def test_zero_local_crops_give_an_empty_local_stack():
    geometry = dataclasses.replace(GEOMETRY, local_count=0)
    global_crops, local_crops = _crop_batch(_images(), geometry, seed=0)
    assert global_crops.shape == (2, 3, 32, 32, 3)
    assert local_crops.shape == (0, 3, 16, 16, 3) and local_crops.dtype == np.uint8


def test_same_seed_same_crops_other_seed_other_crops():
    first = _crop_batch(_images(), GEOMETRY, seed=7)
    again = _crop_batch(_images(), GEOMETRY, seed=7)
    other = _crop_batch(_images(), GEOMETRY, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_stacked_crops_are_the_rendered_boxes_in_draw_order():
    image = _images()[0]
    boxes = sample_crop_boxes(image.width, image.height, GEOMETRY, np.random.default_rng(3))
    image_globals, image_locals = crop_image(image, GEOMETRY, np.random.default_rng(3))
    global_crops, local_crops = stack_crops([(image_globals, image_locals)], GEOMETRY)
    for index, box in enumerate(boxes[0]):
        assert np.array_equal(global_crops[index, 0], render_crop(image, box, 32))
    for index, box in enumerate(boxes[1]):
        assert np.array_equal(local_crops[index, 0], render_crop(image, box, 16))


@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.14)])
def test_box_area_and_aspect_ratio_stay_in_range(scale):
    rng = np.random.default_rng(0)
    width, height = 400, 300
    boxes = [sample_crop_box(width, height, scale, RATIO, 0.5, rng) for _ in range(3000)]
    fractions = np.array([b.width * b.height / (width * height) for b in boxes])
    ratios = np.array([b.width / b.height for b in boxes])
    # Rounding each side to whole pixels moves the area by at most about a pixel per side.
    slack = 0.03
    assert fractions.min() >= scale[0] * (1 - slack) and fractions.max() <= scale[1] * (1 + slack)
    assert ratios.min() >= RATIO[0] * (1 - slack) and ratios.max() <= RATIO[1] * (1 + slack)
    # The whole range gets used (large boxes fit less often, so look at the maximum at the top).
    span = scale[1] - scale[0]
    assert np.quantile(fractions, 0.05) < scale[0] + 0.1 * span and fractions.max() > scale[1] - 0.1 * span
    for b in boxes:
        assert 0 <= b.left and b.left + b.width <= width and 0 <= b.top and b.top + b.height <= height


def test_boxes_that_cannot_fit_fall_back_to_the_central_allowed_box():
    rng = np.random.default_rng(0)
    wide = sample_crop_box(1000, 10, (0.9, 1.0), RATIO, 0.0, rng)
    assert (wide.width, wide.height) == (13, 10) and wide.left == (1000 - 13) // 2 and wide.top == 0
    tall = sample_crop_box(10, 1000, (0.9, 1.0), RATIO, 0.0, rng)
    assert (tall.width, tall.height) == (10, 13) and tall.top == (1000 - 13) // 2 and tall.left == 0


@pytest.mark.parametrize("probability", [0.0, 0.3, 1.0])
def test_flip_frequency_follows_hflip_prob(probability):
    rng = np.random.default_rng(1)
    flips = [sample_crop_box(100, 80, (0.2, 1.0), RATIO, probability, rng).flip for _ in range(4000)]
    # Four binomial standard deviations at p = 0.3, n = 4000.
    assert abs(np.mean(flips) - probability) <= 4 * math.sqrt(0.3 * 0.7 / 4000)


def test_a_flipped_crop_is_the_mirror_image():
    image = badsamples.halves(40, 40, badsamples.RED, badsamples.BLUE)
    whole = CropBox(left=0, top=0, width=40, height=40, flip=False)
    plain = render_crop(image, whole, 20)
    mirrored = render_crop(image, dataclasses.replace(whole, flip=True), 20)
    assert np.array_equal(mirrored, plain[:, ::-1])
    assert np.all(plain[:, :9] == badsamples.RED) and np.all(mirrored[:, :9] == badsamples.BLUE)


def test_box_resize_matches_crop_then_resize():
    image = badsamples.photo_like(300, 200)
    box = CropBox(left=37, top=21, width=150, height=120, flip=False)
    direct = render_crop(image, box, 64).astype(int)
    two_step = np.asarray(image.crop(box.pil_box).resize((64, 64), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(direct - two_step).mean() < 2.0


def test_crops_of_a_draft_decoded_jpeg():
    crops = CropsConfig(global_size=64, local_size=24, decode_side=64)
    geometry = MultiCropGeometry.from_config(crops)
    limits = DecodeLimits.from_config(DataConfig())
    image = decode_image(badsamples.jpeg(1024, 768), limits, min_decode_side(crops))
    assert image.size == (128, 96)  # 768 // 8 = 96 >= 64
    global_crops, local_crops = stack_crops([crop_image(image, geometry, np.random.default_rng(0))], geometry)
    assert global_crops.shape == (2, 1, 64, 64, 3) and local_crops.shape == (6, 1, 24, 24, 3)


def test_the_decode_keeps_enough_pixels_that_no_crop_is_upsampled():
    """The smallest crop of each kind (a square of its least scale of the image's area) is cut from
    at least as many pixels as it has: 224 / sqrt(0.14) = 599 for the global crops, 96 / sqrt(0.05)
    = 430 for the local ones; `decode_side` sets it outright (224: faster, small crops upsampled)."""
    assert min_decode_side(CropsConfig()) == 599
    assert min_decode_side(CropsConfig(global_count=0, local_count=4)) == 430
    assert min_decode_side(CropsConfig(local_count=0)) == 599
    assert min_decode_side(CropsConfig(decode_side=224)) == 224
    assert largest_crop_side(CropsConfig()) == 224 and largest_crop_side(CropsConfig(global_count=0)) == 96
    crops = CropsConfig()
    limits = DecodeLimits.from_config(DataConfig(max_pixels=20_000_000))
    # A phone photograph's size: drafted by 4 (by 8, to 504 x 378, the smallest global crop would be
    # cut from 163 px and stretched to 224).
    buffer = io.BytesIO()
    Image.new("RGB", (4032, 3024), (90, 120, 150)).save(buffer, "JPEG")
    photo = decode_image(buffer.getvalue(), limits, min_decode_side(crops))
    assert photo.size == (1008, 756)
    assert math.sqrt(crops.global_scale[0] * photo.width * photo.height) >= crops.global_size
    assert decode_image(buffer.getvalue(), limits, min_decode_side(CropsConfig(decode_side=224))).size == (504, 378)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="RGB"):
        crop_image(Image.new("L", (50, 50)), GEOMETRY, np.random.default_rng(0))
    image_globals, image_locals = crop_image(_images()[0], GEOMETRY, np.random.default_rng(0))
    with pytest.raises(ValueError, match="expected 2 and 3"):
        stack_crops([(image_globals, image_locals[:2])], GEOMETRY)
