from __future__ import annotations

import io
import logging
import pickle
import warnings

import numpy as np
import PIL
import pytest
from PIL import Image, ImageFile, ImageOps

import badsamples
from stream_swav import imaging
from stream_swav.config import DataConfig
from stream_swav.data.decode import (
    SKIP_REASONS,
    TRANSPARENT_BACKGROUND,
    DecodeLimits,
    SampleError,
    decode_image,
    header_segments,
    log_pillow_flavour,
    pillow_flavour,
)

LIMITS = DecodeLimits.from_config(DataConfig())
FULL_SCALE = 10**6  # a min_target_side no image reaches: JPEG draft never scales down


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def _close(pixel: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12) -> bool:
    return bool(np.all(np.abs(pixel - np.array(colour)) <= tolerance))


def _reason(data: bytes, limits: DecodeLimits = LIMITS, min_target_side: int = FULL_SCALE) -> str:
    with pytest.raises(SampleError) as caught:
        decode_image(data, limits, min_target_side)
    return caught.value.reason


SAMPLES = badsamples.all_samples()


@pytest.mark.parametrize("name,ext,data,expected", SAMPLES, ids=[f"{s[0]}.{s[1]}" for s in SAMPLES])
def test_every_sample_decodes_or_is_skipped_with_its_reason(name, ext, data, expected):
    verdict, detail = expected
    if verdict == "ok":
        image = decode_image(data, LIMITS, FULL_SCALE)
        assert image.mode == "RGB"
        assert np.asarray(image).shape == (*detail, 3)
        assert np.asarray(image).dtype == np.uint8
    else:
        assert detail in SKIP_REASONS
        assert _reason(data) == detail


def test_sample_set_covers_every_reason_but_the_byte_limit():
    reasons = {expected[1] for _, _, _, expected in SAMPLES if expected[0] == "skip"}
    assert reasons == set(SKIP_REASONS) - {"too-many-bytes"}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_the_exif_standard(orientation):
    quadrants = np.zeros((20, 30, 3), np.uint8)
    quadrants[:10, :15] = badsamples.RED
    quadrants[:10, 15:] = badsamples.GREEN
    quadrants[10:, :15] = badsamples.BLUE
    quadrants[10:, 15:] = badsamples.WHITE
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(quadrants).save(buffer, "PNG", exif=exif.tobytes())
    data = buffer.getvalue()

    decoded = _pixels(decode_image(data, LIMITS, FULL_SCALE))
    reference = _pixels(ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB")))
    assert decoded.shape == reference.shape
    assert np.array_equal(decoded, reference)
    if orientation >= 5:
        assert decoded.shape[:2] == (30, 20)


def test_orientation_6_puts_the_stored_left_half_on_top_and_8_at_the_bottom():
    for orientation, top, bottom in ((6, badsamples.RED, badsamples.BLUE), (8, badsamples.BLUE, badsamples.RED)):
        pixels = _pixels(decode_image(badsamples.exif_rotated_jpeg(orientation), LIMITS, FULL_SCALE))
        assert pixels.shape == (64, 32, 3)
        assert _close(pixels[8, 16], top) and _close(pixels[56, 16], bottom)


def test_draft_and_orientation_together():
    data = badsamples.exif_rotated_jpeg(6, width=1600, height=800)
    image = decode_image(data, LIMITS, min_target_side=150)
    # 800 // 4 = 200 >= 150 but 800 // 8 = 100 < 150: decoded at 1/4, then turned upright.
    assert image.size == (200, 400)
    pixels = _pixels(image)
    assert _close(pixels[50, 100], badsamples.RED) and _close(pixels[350, 100], badsamples.BLUE)


@pytest.mark.parametrize(
    "width,height,target,expected_size",
    [
        (2000, 1500, 224, (500, 375)),
        (2000, 1500, 100, (250, 188)),
        (2000, 1500, 750, (1000, 750)),
        (2000, 1500, 751, (2000, 1500)),
        (1001, 447, 224, (1001, 447)),
        (1001, 448, 224, (501, 224)),
    ],
)
def test_jpeg_draft_decodes_at_the_smallest_scale_that_keeps_the_target(width, height, target, expected_size):
    data = badsamples.jpeg(width, height, quality=80)
    image = decode_image(data, LIMITS, min_target_side=target)
    assert image.size == expected_size
    assert min(image.size) >= target
    assert image.mode == "RGB"
    # Same content as the full decode, only smaller: compare a block average.
    full = decode_image(data, LIMITS, FULL_SCALE).resize(image.size, Image.Resampling.BOX)
    assert np.abs(_pixels(full) - _pixels(image)).mean() < 6


def test_draft_leaves_other_formats_alone():
    buffer = io.BytesIO()
    badsamples.photo_like(900, 600).save(buffer, "PNG")
    assert decode_image(buffer.getvalue(), LIMITS, min_target_side=64).size == (900, 600)


def test_sixteen_bit_gradient_maps_onto_the_full_8_bit_range():
    pixels = np.asarray(decode_image(badsamples.gray16_gradient_png(), LIMITS, FULL_SCALE))
    row = pixels[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    source = np.linspace(0, 65535, 256).round()
    assert np.array_equal(row, np.floor(source / 257 + 0.5).astype(int))


def test_transparency_is_composited_over_the_neutral_background():
    palette = _pixels(decode_image(badsamples.palette_png_with_transparency(), LIMITS, FULL_SCALE))
    assert np.all(palette[:, :20] == TRANSPARENT_BACKGROUND)
    assert np.all(palette[:, 20:] == badsamples.GREEN)
    rgba = _pixels(decode_image(badsamples.rgba_png(), LIMITS, FULL_SCALE))
    assert np.all(rgba[:, :20] == TRANSPARENT_BACKGROUND)
    assert np.all(rgba[:, 20:] == badsamples.BLUE)


def test_colours_survive_mode_conversion():
    assert _close(_pixels(decode_image(badsamples.cmyk_jpeg(), LIMITS, FULL_SCALE))[20, 24], badsamples.RED)
    assert np.all(_pixels(decode_image(badsamples.animated_gif(), LIMITS, FULL_SCALE)) == badsamples.RED)
    assert np.all(_pixels(decode_image(badsamples.la_png(), LIMITS, FULL_SCALE)) == 200)
    bilevel = _pixels(decode_image(badsamples.bilevel_png(), LIMITS, FULL_SCALE))
    assert np.all(bilevel[:, :16] == 0) and np.all(bilevel[:, 16:] == 255)
    webp = _pixels(decode_image(badsamples.webp(), LIMITS, FULL_SCALE))
    assert np.all(webp[:, :30] == badsamples.RED) and np.all(webp[:, 30:] == badsamples.BLUE)
    for data in (badsamples.int32_tiff(), badsamples.float_tiff()):
        row = _pixels(decode_image(data, LIMITS, FULL_SCALE))[0, :, 0]
        assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) >= 0)


def test_byte_limit_is_checked_before_parsing():
    data = badsamples.jpeg(64, 48)
    exact = DecodeLimits(max_pixels=LIMITS.max_pixels, min_side=LIMITS.min_side, max_bytes=len(data))
    assert decode_image(data, exact, FULL_SCALE).size == (64, 48)
    under = DecodeLimits(max_pixels=LIMITS.max_pixels, min_side=LIMITS.min_side, max_bytes=len(data) - 1)
    assert _reason(data, under) == "too-many-bytes"


def test_pixel_and_side_limits_are_inclusive_bounds():
    data = badsamples.jpeg(200, 100)
    assert decode_image(data, DecodeLimits(20_000, 100, LIMITS.max_bytes), FULL_SCALE).size == (200, 100)
    assert _reason(data, DecodeLimits(19_999, 100, LIMITS.max_bytes)) == "too-large"
    assert _reason(data, DecodeLimits(20_000, 101, LIMITS.max_bytes)) == "too-small"


def test_bombs_are_refused_from_the_header_without_touching_global_state():
    filters_before = list(warnings.filters)
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    # 10^10 pixels (Pillow's error), 10^8 (Pillow's warning) and 4.8 * 10^7 (only our limit). Had
    # pixels been allocated, the one-row payloads would have failed as truncated instead.
    for width, height in ((100_000, 100_000), (10_000, 10_000), (8_000, 6_000)):
        assert _reason(badsamples.png_header_only(width, height)) == "too-large"
    generous = DecodeLimits(max_pixels=10**12, min_side=1, max_bytes=LIMITS.max_bytes)
    assert _reason(badsamples.png_header_only(10_000, 10_000), generous) == "too-large"
    assert list(warnings.filters) == filters_before
    assert Image.MAX_IMAGE_PIXELS == max_pixels_before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_a_small_header_only_png_is_truncated_not_too_large():
    # The same crafted file under the limits: it gets decoded and runs out of data.
    assert _reason(badsamples.png_header_only(2_000, 1_000)) == "truncated"


def test_formats_outside_the_accepted_list_are_never_parsed():
    for fmt in ("TGA", "PCX", "ICO"):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), badsamples.RED).save(buffer, fmt)
        assert _reason(buffer.getvalue()) == "not-an-image"


def test_corrupt_entropy_data_is_a_read_error_or_truncation_never_a_crash():
    data = bytearray(badsamples.jpeg(128, 96))
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(40):
        corrupted = bytearray(data)
        start = int(rng.integers(20, len(data) - 64))
        corrupted[start : start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        try:
            outcomes.add(decode_image(bytes(corrupted), LIMITS, FULL_SCALE).mode)
        except SampleError as error:
            outcomes.add(error.reason)
    assert outcomes <= {"RGB", *SKIP_REASONS}


def test_header_segments_count_what_pillows_python_parsers_step_through():
    photo = badsamples.jpeg(64, 48)
    assert 3 <= header_segments(photo, 4096) <= 10  # SOI aside: APP0, DQT, SOF, DHT..., SOS
    assert header_segments(badsamples.with_header_segments("jpg", 100_000), 4096) == 4097  # stops at the cap
    # A progressive JPEG's later scans and what lies between them are the scan limit's business.
    progressive = badsamples.jpeg(64, 48, progressive=True)
    assert header_segments(progressive, 4096) == header_segments(progressive[:progressive.index(b"\xff\xda") + 2],
                                                                 4096)
    assert header_segments(badsamples.webp(), 4096) == 0
    # Padding and junk Pillow steps over byte by byte count byte by byte.
    assert header_segments(photo[:2] + b"\xff" * 5_000 + photo[2:], 4096) == 4097
    assert header_segments(photo[:2] + b"junk" + photo[2:], 4096) == header_segments(photo, 4096) + 4
    # One encoder writes a PNG's image data a row per chunk: small chunks count a sixteenth each.
    png = badsamples.with_header_segments("png", 0)
    start = png.index(b"IDAT") - 4
    small = (10).to_bytes(4, "big") + b"IDAT" + bytes(10 + 4)
    assert header_segments(png[:start] + small * 1_600 + png[start:], 4096) == 2 + 100  # IHDR, IEND


def test_pillows_warnings_about_damage_it_survives_are_not_printed_for_every_image():
    """A crawl's broken EXIF tags (and malformed MPOs) make Pillow warn; decoding thousands an hour,
    that would flood the logs with one line per image (catch_warnings resets show-once)."""
    image = badsamples.photo_like(48, 32, seed=7)
    ifd = (b"II*\x00" + (8).to_bytes(4, "little") + (1).to_bytes(2, "little")
           + (270).to_bytes(2, "little") + (2).to_bytes(2, "little") + (1000).to_bytes(4, "little")
           + (100).to_bytes(4, "little") + bytes(4))  # ImageDescription: 1,000 bytes past the end
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=b"Exif\x00\x00" + ifd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Image.open(io.BytesIO(buffer.getvalue())).getexif()
        assert any("Skipping tag 270" in str(w.message) for w in caught)  # what Pillow says
        caught.clear()
        for _ in range(3):
            assert decode_image(buffer.getvalue(), LIMITS, FULL_SCALE).size == (48, 32)
    assert not caught


def test_sample_error_names_a_known_reason_and_pickles():
    error = SampleError("truncated", "12 bytes short")
    assert str(error) == "truncated: 12 bytes short"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.detail) == ("truncated", "12 bytes short")
    with pytest.raises(ValueError):
        SampleError("gremlins")


def test_min_target_side_must_be_positive():
    with pytest.raises(ValueError):
        decode_image(badsamples.jpeg(32, 32), LIMITS, 0)


def test_limits_come_from_the_data_config():
    data = DataConfig(max_pixels=123, min_side=4, max_sample_bytes=999)
    assert DecodeLimits.from_config(data) == DecodeLimits(max_pixels=123, min_side=4, max_bytes=999)


def test_pillow_flavour_names_the_installed_build_and_is_logged_once(monkeypatch, caplog):
    flavour = pillow_flavour()
    name, version = flavour.split(" ")
    assert name in ("Pillow", "Pillow-SIMD")
    assert version.startswith(PIL.__version__.split(".post")[0])
    monkeypatch.setattr(imaging, "_logged", False)
    logger = logging.getLogger("test-decode-worker")
    with caplog.at_level(logging.INFO, logger="test-decode-worker"):
        log_pillow_flavour(logger)
        log_pillow_flavour(logger)
    assert [r.getMessage() for r in caplog.records] == [f"image decoding with {flavour}"]
