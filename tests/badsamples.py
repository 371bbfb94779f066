"""Real image bytes, good and bad, for tests that feed the decoder.

Every builder returns the encoded file as ``bytes``. `all_samples()` lists
them as ``(name, ext, data, expected)`` where `expected` is ``("ok", (h, w))``
-- the upright size at full scale, i.e. decoded with a `min_target_side` no
smaller than the image, under the default `DataConfig` limits -- or
``("skip", reason)`` with a reason from `SKIP_REASONS`.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)

Expected = tuple[str, object]
Sample = tuple[str, str, bytes, Expected]


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus mild noise: compresses like a photo, not like flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = 128 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)
    pixels = np.stack([red, green, blue], axis=-1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg(width: int, height: int, seed: int = 0, quality: int = 90, progressive: bool = False) -> bytes:
    return _encode(photo_like(width, height, seed), "JPEG", quality=quality, progressive=progressive)


def halves(width: int, height: int, left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    """RGB image whose left half is `left` and right half `right`: shows flips and rotations."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2 :] = right
    return Image.fromarray(pixels)


def exif_rotated_jpeg(orientation: int, width: int = 64, height: int = 32) -> bytes:
    """Stored `width` x `height`, red left half and blue right half, with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(halves(width, height, RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())


def truncated_jpeg(width: int = 96, height: int = 64) -> bytes:
    data = jpeg(width, height)
    return data[: len(data) * 3 // 5]


def truncated_png(width: int = 96, height: int = 64) -> bytes:
    data = _encode(photo_like(width, height), "PNG")
    return data[: len(data) // 2]


def truncated_webp(width: int = 96, height: int = 64) -> bytes:
    data = _encode(photo_like(width, height), "WEBP", quality=80)
    return data[: len(data) // 2]


def text_named_jpg() -> bytes:
    return b"<html><body>404 Not Found</body></html>\n"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _rgb_png(width: int, height: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG declaring `width` x `height` RGB, with one compressed row of data.

    Its header is valid (CRCs correct), so only a size check made before
    decoding keeps a reader from allocating width * height * 3 bytes.
    """
    return _rgb_png(width, height, zlib.compress(b"\x00" + bytes(3 * min(width, 1024))))


def png_with_broken_idat(width: int = 16, height: int = 16) -> bytes:
    """Valid chunks and CRCs, but the image data is not a zlib stream."""
    return _rgb_png(width, height, b"these bytes are not zlib-compressed pixels")


def cmyk_jpeg(width: int = 48, height: int = 40) -> bytes:
    """Pure red in CMYK (no cyan, full magenta and yellow, no black)."""
    return _encode(Image.new("CMYK", (width, height), (0, 255, 255, 0)), "JPEG", quality=95)


def gray16_gradient_png(width: int = 256, height: int = 16) -> bytes:
    """16-bit grayscale (mode I;16) ramp from 0 at the left to 65535 at the right."""
    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    return _encode(Image.fromarray(np.tile(ramp, (height, 1))), "PNG")


def palette_png_with_transparency(width: int = 40, height: int = 20) -> bytes:
    """Palette image: left half index 0 (fully transparent), right half index 1 (opaque green)."""
    indices = np.zeros((height, width), np.uint8)
    indices[:, width // 2 :] = 1
    image = Image.fromarray(indices).convert("P")
    image.putpalette([0, 0, 0, *GREEN] + [0, 0, 0] * 254)
    return _encode(image, "PNG", transparency=0)


def rgba_png(width: int = 40, height: int = 20) -> bytes:
    """Left half transparent white, right half opaque blue."""
    pixels = np.zeros((height, width, 4), np.uint8)
    pixels[:, : width // 2] = (*WHITE, 0)
    pixels[:, width // 2 :] = (*BLUE, 255)
    return _encode(Image.fromarray(pixels), "PNG")


def la_png(width: int = 30, height: int = 30) -> bytes:
    """Gray 200, fully opaque, in mode LA."""
    return _encode(Image.new("LA", (width, height), (200, 255)), "PNG")


def bilevel_png(width: int = 32, height: int = 16) -> bytes:
    """Mode 1: left half black, right half white."""
    pixels = np.zeros((height, width), bool)
    pixels[:, width // 2 :] = True
    return _encode(Image.fromarray(pixels), "PNG")


def gray_jpeg(width: int = 50, height: int = 30) -> bytes:
    return _encode(Image.new("L", (width, height), 90), "JPEG", quality=95)


def int32_tiff(width: int = 64, height: int = 8) -> bytes:
    """Mode I ramp from -1000 to 3000: no declared range."""
    ramp = np.linspace(-1000, 3000, width).round().astype(np.int32)
    return _encode(Image.fromarray(np.tile(ramp, (height, 1))), "TIFF")


def float_tiff(width: int = 64, height: int = 8) -> bytes:
    """Mode F ramp from 0.0 to 1.0."""
    ramp = np.linspace(0.0, 1.0, width).astype(np.float32)
    return _encode(Image.fromarray(np.tile(ramp, (height, 1))), "TIFF")


def animated_gif(width: int = 32, height: int = 24) -> bytes:
    """Three frames: red, then green, then blue."""
    frames = [Image.new("RGB", (width, height), colour) for colour in (RED, GREEN, BLUE)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def one_pixel_png() -> bytes:
    return _encode(Image.new("RGB", (1, 1), RED), "PNG")


def webp(width: int = 60, height: int = 40) -> bytes:
    """Lossless WebP, red left half, blue right half."""
    return _encode(halves(width, height, RED, BLUE), "WEBP", lossless=True)


def bmp_with_jpeg_compression(width: int = 16, height: int = 16) -> bytes:
    """A BMP whose header says its pixels are JPEG-compressed (BI_JPEG), which Pillow cannot decode."""
    data = bytearray(_encode(Image.new("RGB", (width, height), RED), "BMP"))
    # BITMAPINFOHEADER starts at byte 14; biCompression is its 17th to 20th byte.
    data[30:34] = struct.pack("<I", 4)
    return bytes(data)


def jpeg_with_repeated_scan(repeats: int = 100, width: int = 64, height: int = 48) -> bytes:
    """A progressive JPEG whose last scan comes `repeats` times more: valid, and each repeat makes
    the decoder go over the whole image again."""
    data = jpeg(width, height, seed=4, progressive=True)
    last_scan = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[last_scan:end] * repeats + data[end:]


def with_header_segments(fmt: str, segments: int, junk: bool = False) -> bytes:
    """A valid 64x48 image whose header holds `segments` empty segments more than it needs: JPEG
    comments, PNG text chunks, or one GIF comment of that many one-byte sub-blocks. `junk`: behind
    a junk byte (JPEG, GIF), which Pillow steps over, or after the image data (PNG), which Pillow
    parses too."""
    image = photo_like(64, 48, seed=5)
    if fmt == "jpg":
        data = _encode(image, "JPEG")
        return data[:2] + (b"\xff\xfe\x00\x02\x00" if junk else b"") + b"\xff\xfe\x00\x02" * segments + data[2:]
    if fmt == "png":
        data = _encode(image, "PNG")
        chunk = struct.pack(">I", 0) + b"tEXt" + struct.pack(">I", zlib.crc32(b"tEXt"))
        at = data.index(b"IEND") - 4 if junk else 33  # before IEND, or after the signature and IHDR
        return data[:at] + chunk * segments + data[at:]
    data = _encode(image, "GIF")
    flags = data[10]
    start = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    return data[:start] + (b"\x00" if junk else b"") + b"\x21\xfe" + b"\x01x" * segments + b"\x00" + data[start:]


def jpeg_with_icc_profile(size: int = 150_000) -> bytes:
    """A 64x48 JPEG carrying a large ICC profile (Pillow splits it over APP2 segments) and EXIF."""
    return _encode(photo_like(64, 48, seed=6), "JPEG", icc_profile=b"\0" * size, exif=Image.Exif().tobytes())


def all_samples() -> list[Sample]:
    return [
        ("photo-640x480", "jpg", jpeg(640, 480), ("ok", (480, 640))),
        ("photo-33x17-progressive", "jpg", jpeg(33, 17, seed=1, progressive=True), ("ok", (17, 33))),
        ("photo-120x200", "jpg", jpeg(120, 200, seed=2), ("ok", (200, 120))),
        ("photo-png", "png", _encode(photo_like(70, 50, seed=3), "PNG"), ("ok", (50, 70))),
        ("exif-orientation-6", "jpg", exif_rotated_jpeg(6), ("ok", (64, 32))),
        ("exif-orientation-8", "jpg", exif_rotated_jpeg(8), ("ok", (64, 32))),
        ("exif-orientation-3", "jpg", exif_rotated_jpeg(3), ("ok", (32, 64))),
        ("cmyk", "jpg", cmyk_jpeg(), ("ok", (40, 48))),
        ("gray", "jpg", gray_jpeg(), ("ok", (30, 50))),
        ("gray16-gradient", "png", gray16_gradient_png(), ("ok", (16, 256))),
        ("palette-transparent", "png", palette_png_with_transparency(), ("ok", (20, 40))),
        ("rgba", "png", rgba_png(), ("ok", (20, 40))),
        ("la", "png", la_png(), ("ok", (30, 30))),
        ("bilevel", "png", bilevel_png(), ("ok", (16, 32))),
        ("int32", "tiff", int32_tiff(), ("ok", (8, 64))),
        ("float32", "tiff", float_tiff(), ("ok", (8, 64))),
        ("animated", "gif", animated_gif(), ("ok", (24, 32))),
        ("lossless", "webp", webp(), ("ok", (40, 60))),
        ("empty", "jpg", b"", ("skip", "empty")),
        ("text", "jpg", text_named_jpg(), ("skip", "not-an-image")),
        ("truncated", "jpg", truncated_jpeg(), ("skip", "truncated")),
        ("truncated", "png", truncated_png(), ("skip", "truncated")),
        ("truncated", "webp", truncated_webp(), ("skip", "truncated")),
        ("one-pixel", "png", one_pixel_png(), ("skip", "too-small")),
        ("broken-idat", "png", png_with_broken_idat(), ("skip", "read-error")),
        # Over Pillow's bomb error threshold, over its warning threshold, and only over ours.
        ("bomb-100000x100000", "png", png_header_only(100_000, 100_000), ("skip", "too-large")),
        ("bomb-10000x10000", "png", png_header_only(10_000, 10_000), ("skip", "too-large")),
        ("bomb-8000x6000", "png", png_header_only(8_000, 6_000), ("skip", "too-large")),
        ("bmp-jpeg-compression", "bmp", bmp_with_jpeg_compression(), ("skip", "unsupported")),
        ("repeated-scan", "jpg", jpeg_with_repeated_scan(), ("skip", "too-many-scans")),
        ("a-few-repeated-scans", "jpg", jpeg_with_repeated_scan(repeats=20), ("ok", (48, 64))),
        ("comment-segments", "jpg", with_header_segments("jpg", 5_000), ("skip", "too-many-segments")),
        ("text-chunks", "png", with_header_segments("png", 5_000), ("skip", "too-many-segments")),
        ("comment-sub-blocks", "gif", with_header_segments("gif", 5_000), ("skip", "too-many-segments")),
        ("junk-then-comment-segments", "jpg", with_header_segments("jpg", 5_000, junk=True),
         ("skip", "too-many-segments")),
        ("text-chunks-after-the-image-data", "png", with_header_segments("png", 5_000, junk=True),
         ("skip", "too-many-segments")),
        ("junk-then-comment-sub-blocks", "gif", with_header_segments("gif", 5_000, junk=True),
         ("skip", "too-many-segments")),
        ("junk-then-a-few-comment-segments", "jpg", with_header_segments("jpg", 1_000, junk=True), ("ok", (48, 64))),
        ("a-few-comment-segments", "jpg", with_header_segments("jpg", 1_000), ("ok", (48, 64))),
        ("a-few-text-chunks", "png", with_header_segments("png", 1_000), ("ok", (48, 64))),
        ("a-few-comment-sub-blocks", "gif", with_header_segments("gif", 1_000), ("ok", (48, 64))),
        ("icc-profile-and-exif", "jpg", jpeg_with_icc_profile(), ("ok", (48, 64))),
    ]
