"""Repeat detection: the perceptual hash on real re-encoded, rescaled and shifted images, and the
bounded, pass-aware seen-set."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from stream_swav.curation import SeenSet, hamming, perceptual_hash


def scene(seed: int, size: int = 64) -> Image.Image:
    """A textured gray scene of random shapes: distinct seeds give unrelated images."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", (size, size), int(rng.integers(0, 256)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 16, 2)
        w, h = rng.integers(8, size // 2, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=int(rng.integers(0, 256)))
    return image.filter(ImageFilter.GaussianBlur(1))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_near_copies_stay_close_and_distinct_images_far_apart():
    originals = [scene(seed) for seed in range(12)]
    for original in originals:
        h = perceptual_hash(original)
        variants = [jpeg(original, 25), original.resize((40, 40)), original.resize((96, 96)), original.convert("RGB")]
        assert max(hamming(h, perceptual_hash(v)) for v in variants) <= 4
        # A shift moves more bits (content leaves at one edge, fill enters at the other): one
        # pixel of 64 moved 2-10 of them here, two pixels 8-16.
        shifted = original.transform(original.size, Image.Transform.AFFINE, (1, 0, 1, 0, 1, 0))
        assert hamming(h, perceptual_hash(shifted)) <= 12
    hashes = [perceptual_hash(image) for image in originals]
    distinct = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert min(distinct) > 12 and 20 < np.mean(distinct) < 44


def test_flat_images_of_any_colour_hash_to_zero():
    for colour in (0, 255, 128, (200, 30, 30)):
        assert perceptual_hash(Image.new("RGB" if isinstance(colour, tuple) else "L", (28, 28), colour)) == 0
    assert perceptual_hash(scene(0)) != 0


def test_repeats_past_the_allowance_are_dropped_and_near_copies_count_as_repeats():
    seen = SeenSet(capacity=100, max_distance=4, max_repeats=1)
    a, b = perceptual_hash(scene(1)), perceptual_hash(scene(2))
    assert [seen.admit(a, 0) for _ in range(3)] == [True, True, False]
    assert seen.admit(a ^ 0b1011, 0) is False  # three bits away: the same image
    assert seen.admit(b, 0) is True and len(seen) == 2
    assert seen.admit(a ^ 0b11111, 0) is True  # five bits away: another image, a new entry
    assert len(seen) == 3


def test_a_new_pass_is_not_taken_for_duplication():
    seen = SeenSet(capacity=10, max_repeats=0)
    h = perceptual_hash(scene(3))
    assert [seen.admit(h, 0), seen.admit(h, 0)] == [True, False]
    assert [seen.admit(h, 1), seen.admit(h, 1)] == [True, False]


def test_capacity_bounds_memory_and_forgets_the_oldest_first():
    seen = SeenSet(capacity=3, max_distance=2)
    hashes = [perceptual_hash(scene(seed)) for seed in range(4)]
    for h in hashes:
        assert seen.admit(h, 0)
    assert len(seen) == 3
    assert seen.admit(hashes[0], 0) is True  # forgotten: admitted again (and hashes[1] evicted)
    assert seen.admit(hashes[3], 0) is False
    assert len(seen._index) <= 3 * 3  # no index slot outlives its entry


def test_state_round_trips_and_makes_the_same_decisions():
    seen = SeenSet(capacity=5, max_distance=3, max_repeats=1)
    stream = [perceptual_hash(scene(seed % 7)) for seed in range(20)]
    for h in stream[:10]:
        seen.admit(h, 0)
    restored = SeenSet(capacity=5, max_distance=3, max_repeats=1)
    restored.load_state_dict(seen.state_dict())
    assert restored.state_dict() == seen.state_dict()
    assert [restored.admit(h, 0) for h in stream[10:]] == [seen.admit(h, 0) for h in stream[10:]]
    with pytest.raises(ValueError, match="differ in length"):
        restored.load_state_dict({"hashes": [1], "counts": [], "passes": [0]})


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"capacity": 1, "max_distance": 32},
                                    {"capacity": 1, "max_repeats": -1}])
def test_impossible_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        SeenSet(**kwargs)
