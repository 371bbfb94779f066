"""Deliberately awkward image files for the demo stream.

Uncurated streams carry broken uploads and unusual encodings. The demo shards
mix a few of these in so every demo run exercises the decoder's error path:
the broken ones must be skipped and counted, the odd-but-valid ones decoded.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class OddImage:
    name: str
    # WebDataset field extension the bytes are stored under.
    ext: str
    data: bytes
    # Whether a correct decoder turns the bytes into an RGB image.
    decodable: bool


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def odd_images(rgb: np.ndarray) -> list[OddImage]:
    """Six awkward encodings derived from one (H, W, 3) uint8 image.

    Valid: CMYK JPEG, 16-bit grayscale PNG, palette PNG. Broken: a JPEG cut in
    half, an empty file, and plain text stored under a .jpg name.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    image = Image.fromarray(rgb)
    jpeg = _encode(image, "JPEG", quality=90)
    gray16 = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    return [
        OddImage("cmyk-jpeg", "jpg", _encode(image.convert("CMYK"), "JPEG", quality=90), True),
        OddImage("gray16-png", "png", _encode(gray16, "PNG"), True),
        OddImage("palette-png", "png", _encode(image.quantize(colors=16), "PNG"), True),
        OddImage("truncated-jpeg", "jpg", jpeg[: len(jpeg) // 2], False),
        OddImage("zero-bytes", "jpg", b"", False),
        OddImage("text-as-jpeg", "jpg", b"this is a text file, not an image\n", False),
    ]


__all__ = ["OddImage", "odd_images"]
