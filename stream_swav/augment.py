"""Photometric augmentation of uint8 crops, batched on the learner's device.

Decode workers only cut and flip (geometry); colour, grayscale and blur run here
on whole batches with independent random parameters per crop. Everything is
tensor ops with shapes fixed by the input, so there is no per-sample Python
loop, no host synchronisation and nothing that stops `torch.compile`.

The steps follow SwAV's torchvision pipeline: colour jitter (probability
`color_jitter_prob`), random grayscale, Gaussian blur, normalisation. As in
torchvision's ColorJitter the four jitter operations run in a random order; here
the order is drawn per crop, and each of the four slots applies whichever
operation that crop drew, selected with masks. Arithmetic is float32 on [0, 1]
without the uint8 rounding PIL does between steps.

For `torch.compile`, compile `apply_params` and call `sample_params` eagerly:
dynamo cannot trace `torch.rand` with an explicit generator.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stream_swav.config import AugmentConfig

# ITU-R 601 luma weights, the ones torchvision's rgb_to_grayscale uses.
LUMA = (0.2989, 0.587, 0.114)

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
JITTER_OPS = 4
# Columns of the single uniform draw every call makes (see `sample_params`).
_DRAWS = 8 + JITTER_OPS


@dataclass
class PhotometricParams:
    """Per-crop random parameters of one augmentation call; all tensors have N rows."""

    jitter: Tensor  # bool: colour jitter applied
    brightness: Tensor  # multiplicative factor
    contrast: Tensor  # blend factor towards the mean gray level
    saturation: Tensor  # blend factor towards the pixel's gray level
    hue: Tensor  # shift in turns, in [-0.5, 0.5]
    order: Tensor  # int64 (N, 4): jitter operation applied in each slot
    grayscale: Tensor  # bool
    blur: Tensor  # bool
    sigma: Tensor  # Gaussian blur standard deviation in pixels


def _uniform(u: Tensor, low: float, high: float) -> Tensor:
    return low + (high - low) * u


def sample_params(n: int, cfg: AugmentConfig, blur_prob: float, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> PhotometricParams:
    """Draw parameters for `n` crops with one `torch.rand` call on `device`.

    The draw is the same size whatever the configuration, so a seeded generator
    gives the same stream position after every call.
    """
    u = torch.rand(n, _DRAWS, generator=generator, device=device)
    return PhotometricParams(
        jitter=u[:, 0] < cfg.color_jitter_prob,
        brightness=_uniform(u[:, 1], max(0.0, 1.0 - cfg.brightness), 1.0 + cfg.brightness),
        contrast=_uniform(u[:, 2], max(0.0, 1.0 - cfg.contrast), 1.0 + cfg.contrast),
        saturation=_uniform(u[:, 3], max(0.0, 1.0 - cfg.saturation), 1.0 + cfg.saturation),
        hue=_uniform(u[:, 4], -cfg.hue, cfg.hue),
        grayscale=u[:, 5] < cfg.grayscale_prob,
        blur=u[:, 6] < blur_prob,
        sigma=_uniform(u[:, 7], cfg.blur_sigma[0], cfg.blur_sigma[1]),
        # Sorting i.i.d. uniform keys gives a uniformly random permutation per row.
        order=torch.argsort(u[:, 8:], dim=1),
    )


def _per_sample(values: Tensor) -> Tensor:
    return values.reshape(-1, 1, 1, 1)


def rgb_to_gray(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return LUMA[0] * r + LUMA[1] * g + LUMA[2] * b


def _blend(x: Tensor, reference: Tensor, factor: Tensor) -> Tensor:
    """factor * x + (1 - factor) * reference, kept in [0, 1]; factor 1 returns x exactly."""
    f = _per_sample(factor)
    return (f * x + (1.0 - f) * reference).clamp(0.0, 1.0)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> HSV with hue in turns [0, 1)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    value, _ = x.max(dim=1, keepdim=True)
    chroma = value - x.min(dim=1, keepdim=True).values
    gray = chroma == 0
    saturation = chroma / torch.where(value == 0, torch.ones_like(value), value)
    safe_chroma = torch.where(gray, torch.ones_like(chroma), chroma)
    # Hue in sixths of a turn, measured from whichever channel is largest (red wins ties, then green).
    sixths = torch.where(
        value == r, (g - b) / safe_chroma,
        torch.where(value == g, 2.0 + (b - r) / safe_chroma, 4.0 + (r - g) / safe_chroma))
    hue = torch.where(gray, torch.zeros_like(sixths), torch.remainder(sixths / 6.0, 1.0))
    return torch.cat([hue, saturation, value], dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of `rgb_to_hsv`, branch-free: channel n is v - v*s*clamp(min(k, 4 - k), 0, 1),
    k = (n + 6h) mod 6 with n = 5, 3, 1 for red, green, blue."""
    hue, saturation, value = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    offsets = torch.arange(5.0, 0.0, -2.0, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(offsets + 6.0 * hue, 6.0)
    return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by `shift` turns per sample (torchvision's convention)."""
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0:1] + _per_sample(shift), 1.0)
    return hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1))


def color_jitter(x: Tensor, params: PhotometricParams, with_hue: bool = True) -> Tensor:
    """Apply brightness, contrast, saturation and hue in each crop's own order.

    Brightness, contrast and saturation are all blends (towards black, the mean
    gray level, the pixel's gray level), so one blend per slot serves whichever of
    the three a crop drew; crops whose slot holds hue, or that skip jitter, blend
    with factor 1, which is exact identity. Hue is computed for the whole batch in
    each slot and kept where drawn; `with_hue=False` (a zero hue range) skips it,
    as the HSV round trip is exact only up to rounding.
    """
    one = torch.ones_like(params.brightness)
    for slot in range(JITTER_OPS):
        op = params.order[:, slot]
        factor = torch.where(op == BRIGHTNESS, params.brightness,
                             torch.where(op == CONTRAST, params.contrast,
                                         torch.where(op == SATURATION, params.saturation, one)))
        factor = torch.where(params.jitter, factor, one)
        gray = rgb_to_gray(x)
        reference = torch.where(_per_sample(op == BRIGHTNESS), torch.zeros_like(gray),
                                torch.where(_per_sample(op == CONTRAST), gray.mean(dim=(1, 2, 3), keepdim=True),
                                            gray))
        x = _blend(x, reference, factor)
        if with_hue:
            x = torch.where(_per_sample((op == HUE) & params.jitter), adjust_hue(x, params.hue), x)
    return x


def blur_kernel_size(side: int) -> int:
    """About 10% of the side, odd (23 for 224 px), at least 3 and small enough for reflect padding."""
    size = max(3, int(0.1 * side)) | 1
    return 2 * min(size // 2, side - 1) + 1


def _gaussian_taps(sigma: Tensor, size: int) -> Tensor:
    """(N,) sigmas -> (N, size) normalised 1-D Gaussian kernels."""
    offsets = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - size // 2
    # The floor keeps a near-zero sigma a clean delta (identity) instead of 0/0.
    taps = torch.exp(-0.5 * (offsets / sigma.clamp_min(1e-6).unsqueeze(1)) ** 2)
    return taps / taps.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma and reflect padding.

    Every (sample, channel) plane becomes one group of a depthwise convolution,
    so the whole batch is two `conv2d` calls.
    """
    n, c, h, w = x.shape
    planes = x.reshape(1, n * c, h, w)
    size_w, size_h = blur_kernel_size(w), blur_kernel_size(h)
    taps_w = _gaussian_taps(sigma, size_w).repeat_interleave(c, dim=0).reshape(n * c, 1, 1, size_w)
    taps_h = _gaussian_taps(sigma, size_h).repeat_interleave(c, dim=0).reshape(n * c, 1, size_h, 1)
    planes = F.conv2d(F.pad(planes, (size_w // 2, size_w // 2, 0, 0), mode="reflect"), taps_w, groups=n * c)
    planes = F.conv2d(F.pad(planes, (0, 0, size_h // 2, size_h // 2), mode="reflect"), taps_h, groups=n * c)
    return planes.reshape(n, c, h, w)


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """Mean and std as (1, 3, 1, 1) tensors on `device`, made once: copying them from the host
    on every call would make the host wait for the GPU each step."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).reshape(1, 3, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).reshape(1, 3, 1, 1))


def apply_params(images: Tensor, params: PhotometricParams, cfg: AugmentConfig, blur_prob: float) -> Tensor:
    """Augment uint8 (N, 3, H, W) crops with given parameters; float32, normalised.

    `blur_prob` must be the value the parameters were drawn with; 0 skips the blur.

    Steps whose configuration makes them a no-op are skipped (a decision on the
    config, never on the data). The result keeps channels_last layout if the
    input had it.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    # Autocast would run the blur convolution in bf16; colour maths wants float32.
    with torch.autocast(device_type=images.device.type, enabled=False):
        x = images.float() / 255.0
        if cfg.color_jitter_prob > 0:
            x = color_jitter(x, params, with_hue=cfg.hue > 0)
        if cfg.grayscale_prob > 0:
            x = torch.where(_per_sample(params.grayscale), rgb_to_gray(x).expand_as(x), x)
        if blur_prob > 0:
            x = torch.where(_per_sample(params.blur), gaussian_blur(x, params.sigma), x)
        mean, std = _normalisation(tuple(cfg.mean), tuple(cfg.std), x.device)
        x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def photometric_augment(images: Tensor, cfg: AugmentConfig, blur_prob: float,
                        generator: torch.Generator | None = None) -> Tensor:
    """Colour jitter, random grayscale, Gaussian blur (probability `blur_prob`) and
    normalisation with `cfg.mean`/`cfg.std`, independently per crop.

    `images`: uint8 (N, 3, H, W) in any memory format. `generator` must live on
    `images.device`; None uses torch's default generator for that device.
    """
    params = sample_params(images.shape[0], cfg, blur_prob, generator, images.device)
    return apply_params(images, params, cfg, blur_prob)


__all__ = ["photometric_augment", "PhotometricParams", "sample_params", "apply_params", "color_jitter",
           "adjust_hue", "rgb_to_gray", "rgb_to_hsv", "hsv_to_rgb", "gaussian_blur", "blur_kernel_size"]
