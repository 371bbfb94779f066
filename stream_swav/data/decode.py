"""Untrusted image bytes -> RGB PIL image, or a `SampleError` saying why not.

Every sample comes from a stream we do not control, so each check runs before
the work it protects: byte count before parsing, header size before pixels
are allocated, and only web image formats are parsed at all (EPS, for one,
would hand the bytes to Ghostscript). Nothing here touches Pillow's global
settings: truncated files stay errors and ``Image.MAX_IMAGE_PIXELS`` is left
alone.

JPEGs are decoded at reduced scale (libjpeg's DCT scaling, 1/2, 1/4 or 1/8)
whenever the shorter side stays at least as long as the largest crop; for
large photos that is most of the decode cost saved.
"""
from __future__ import annotations

import functools
import io
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from stream_swav.config import DataConfig
from stream_swav.imaging import log_pillow_flavour, pillow_flavour

SKIP_REASONS = (
    "empty",
    "too-many-bytes",
    "not-an-image",
    "too-large",
    "too-small",
    "truncated",
    "unsupported",
    "read-error",
    "too-many-scans",
    "too-many-segments",
)

# Scans (SOS markers) a progressive JPEG may hold: it has about ten (libjpeg's script: 10 for
# colour). Each scan decodes the whole image again, so a file that repeats one a thousand times
# (195 KB) takes 20 s at 36 MP, even in draft mode; past this it is refused before decoding.
MAX_JPEG_SCANS = 64

# Steps Pillow's Python parsers may take outside an image's compressed data (`header_segments`:
# JPEG markers, padding and junk bytes before the first scan, PNG chunks, GIF blocks and sub-blocks
# before the first image): a photograph needs tens (an ICC profile split over APP2 segments, at
# most 255). A file of a million empty ones (4 MB of JPEG comments) takes seconds and hundreds of MB
# to open, and passes every other check; past this it is refused before Pillow sees it.
MAX_HEADER_SEGMENTS = 4096

# Formats a web crawl actually contains (JPEG includes multi-picture MPO). A
# file in any other format counts as not-an-image: its parser never sees the bytes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

# Transparent pixels are composited over mid grey: an arbitrary but constant
# colour, close to the dataset mean, rather than whatever RGB values the
# encoder left under alpha 0.
TRANSPARENT_BACKGROUND = (128, 128, 128)

# Exceptions Pillow's parsers and decoders raise on malformed input besides OSError.
_MALFORMED = (SyntaxError, ValueError, TypeError, IndexError, KeyError, struct.error, zlib.error)

_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_JPEG_FORMATS = ("JPEG", "MPO")


class SampleError(Exception):
    """A sample that cannot become training pixels; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {', '.join(SKIP_REASONS)}")
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass(frozen=True)
class DecodeLimits:
    # Header width * height above this is refused before any pixel is decoded.
    max_pixels: int
    # Shorter side, in the file's own pixels, below this is refused.
    min_side: int
    # Encoded sample size above this is refused before parsing.
    max_bytes: int

    @classmethod
    def from_config(cls, data: DataConfig) -> "DecodeLimits":
        return cls(max_pixels=data.max_pixels, min_side=data.min_side, max_bytes=data.max_sample_bytes)


def decode_image(data: bytes, limits: DecodeLimits, min_target_side: int) -> Image.Image:
    """Decode one untrusted sample to an upright RGB image.

    JPEGs may come back smaller than stored (by 2, 4 or 8), never with a
    shorter side below `min_target_side` unless the file itself is smaller.
    Animated files give their first frame. The effective pixel limit is the
    lower of `limits.max_pixels` and Pillow's ``Image.MAX_IMAGE_PIXELS``.
    Raises `SampleError` for anything that cannot be used.
    """
    if min_target_side < 1:
        raise ValueError(f"min_target_side must be >= 1, got {min_target_side}")
    if not data:
        raise SampleError("empty")
    if len(data) > limits.max_bytes:
        raise SampleError("too-many-bytes", f"{len(data)} bytes, limit {limits.max_bytes}")

    segments = header_segments(data, MAX_HEADER_SEGMENTS)
    if segments > MAX_HEADER_SEGMENTS:
        raise SampleError("too-many-segments", f"over {MAX_HEADER_SEGMENTS} header segments")

    # catch_warnings restores the filters on exit; inside, Pillow's bomb
    # warning (between MAX_IMAGE_PIXELS and twice that) becomes an exception,
    # and its other warnings (a broken EXIF tag, a malformed MPO) are dropped:
    # the damage they report costs nothing or is raised, and a crawl repeats
    # them thousands of times an hour (catch_warnings also resets Python's
    # show-once memory). The filters are process-wide, so decode from one
    # thread per process.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # A freshly opened file sits on its first frame; nothing here seeks further.
            image = Image.open(io.BytesIO(data), formats=_openable_formats())
            width, height = image.size
            if width * height > limits.max_pixels:
                raise SampleError("too-large", f"{width}x{height} pixels, limit {limits.max_pixels}")
            if min(width, height) < limits.min_side:
                raise SampleError("too-small", f"{width}x{height} pixels, min side {limits.min_side}")
            if image.format in _JPEG_FORMATS:
                if image.info.get("progressive"):
                    # Entropy-coded data stuffs every 0xFF with 0x00, so FF DA is a marker (or part of
                    # a metadata segment, which only counts more): an upper bound on the scans. Only
                    # progressive files (a baseline one with a repeated scan is a read error), so a
                    # baseline photograph is not scanned (~1 ms per MB).
                    scans = data.count(b"\xff\xda")
                    if scans > MAX_JPEG_SCANS:
                        raise SampleError("too-many-scans", f"{scans} scans, limit {MAX_JPEG_SCANS}")
                scale = _jpeg_draft_scale(min(width, height), min_target_side)
                if scale > 1:
                    # Asking for exactly size // scale makes Pillow pick that scale.
                    image.draft("RGB", (width // scale, height // scale))
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise SampleError("too-large", str(exc)) from None
        except UnidentifiedImageError:
            raise SampleError("not-an-image", f"not one of {', '.join(_openable_formats())}") from None
        except OSError as exc:
            raise _classify_os_error(exc, data) from None
        except EOFError as exc:
            raise SampleError("truncated", str(exc)) from None
        except _MALFORMED as exc:
            raise SampleError("read-error", f"{type(exc).__name__}: {exc}") from None

        orientation = _exif_orientation(image)
        try:
            rgb = _to_rgb(image)
        except ValueError as exc:
            raise SampleError("unsupported", f"mode {image.mode}: {exc}") from None
    transpose = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    return rgb.transpose(transpose) if transpose is not None else rgb


@functools.cache
def _openable_formats() -> tuple[str, ...]:
    # A build without a codec (Pillow-SIMD has no AVIF) has no plugin to name.
    Image.init()
    return tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)


def header_segments(data: bytes, limit: int) -> int:
    """How many steps Pillow's Python parsers take through a JPEG, PNG or GIF outside its
    compressed image data, counted up to `limit` + 1 (0 for other formats): JPEG markers up to the
    first scan, and each byte of padding or junk between them (Pillow steps over those one at a
    time); PNG chunks up to IEND, image data chunks of under 1 KB counting a sixteenth each (one
    encoder writes one per row); GIF extension blocks and their sub-blocks up to the first image,
    and each junk byte between them. Only lengths are read. Where the structure stops making sense
    the count stops: Pillow then says what is wrong."""
    count, end = 0, len(data)
    if data[:2] == b"\xff\xd8":  # JPEG
        pos = 2
        while count <= limit and pos + 1 < end:
            count += 1
            if data[pos] != 0xFF:  # junk between segments
                pos += 1
                continue
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
            elif marker == 0xDA:  # the first scan: the rest is the scan limit's business
                return count
            elif marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
                pos += 2
            elif pos + 3 >= end:
                return count
            else:
                pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        return count
    if data[:8] == b"\x89PNG\r\n\x1a\n":  # PNG: length, type, data, CRC
        pos, small_data = 8, 0
        while count + small_data // 16 <= limit and pos + 8 <= end:
            length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
            if kind != b"IDAT":
                count += 1
            elif length < 1024:
                small_data += 1
            if kind == b"IEND":
                break
            pos += 12 + length
        return count + small_data // 16
    if data[:6] in (b"GIF87a", b"GIF89a") and end >= 13:
        flags = data[10]
        pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
        while count <= limit and pos < end and data[pos] not in (0x2C, 0x3B):  # an image, the trailer
            count += 1
            if data[pos] != 0x21:  # junk between blocks
                pos += 1
                continue
            pos += 2
            while count <= limit and pos < end and data[pos]:
                count += 1
                pos += 1 + data[pos]
            pos += 1
        return count
    return 0


def _jpeg_draft_scale(short_side: int, min_target_side: int) -> int:
    """Largest DCT scale-down whose shorter side keeps at least `min_target_side` pixels."""
    for scale in (8, 4, 2):
        # libjpeg rounds scaled sizes up; flooring here keeps the guarantee exact.
        if short_side // scale >= min_target_side:
            return scale
    return 1


def _classify_os_error(exc: OSError, data: bytes) -> SampleError:
    message = str(exc)
    lowered = message.lower()
    if "truncated" in lowered or _riff_declares_more_bytes(data):
        return SampleError("truncated", message)
    # Pillow's wording for codecs it lacks and for BMP/TIFF variants it cannot decode.
    if "unsupported" in lowered or "not available" in lowered:
        return SampleError("unsupported", message)
    return SampleError("read-error", message)


def _riff_declares_more_bytes(data: bytes) -> bool:
    """True for a WebP/RIFF file shorter than its header says; libwebp only reports a failure."""
    return data[:4] == b"RIFF" and len(data) >= 8 and len(data) < 8 + int.from_bytes(data[4:8], "little")


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except (OSError, *_MALFORMED):
        # A broken EXIF block costs the orientation, not the image.
        return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    has_transparency = "transparency" in image.info
    if mode == "RGB" and not has_transparency:
        return image
    if mode.startswith("I;16"):
        return _sixteen_bit_to_rgb(image)
    if mode in ("I", "F"):
        return _stretch_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or has_transparency:
        rgba = image.convert("RGBA")
        flattened = Image.new("RGB", rgba.size, TRANSPARENT_BACKGROUND)
        flattened.paste(rgba, mask=rgba)
        return flattened
    return image.convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's own conversion clips 16-bit values at 255 instead of scaling them.
    values = np.asarray(image).astype(np.uint32)
    gray = ((values + 128) // 257).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _stretch_to_rgb(image: Image.Image) -> Image.Image:
    # 32-bit integer and float images declare no range: map the observed one onto 0..255.
    values = np.asarray(image).astype(np.float32)
    finite = np.isfinite(values)
    gray = np.zeros(values.shape, np.uint8)
    if finite.any():
        low = float(values[finite].min())
        span = float(values[finite].max()) - low
        if span > 0:
            scaled = np.where(finite, (values - low) * (255.0 / span), 0.0)
            gray = np.rint(scaled).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


__all__ = [
    "SKIP_REASONS",
    "ACCEPTED_FORMATS",
    "TRANSPARENT_BACKGROUND",
    "SampleError",
    "DecodeLimits",
    "decode_image",
    "header_segments",
    "pillow_flavour",
    "log_pillow_flavour",
]
