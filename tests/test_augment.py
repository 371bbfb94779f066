import dataclasses

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from stream_swav.augment import (PhotometricParams, adjust_hue, apply_params, blur_kernel_size, gaussian_blur,
                                 hsv_to_rgb, photometric_augment, rgb_to_hsv, sample_params)
from stream_swav.config import AugmentConfig

torch.set_num_threads(1)

MEAN = torch.tensor(AugmentConfig.mean).reshape(1, 3, 1, 1)
STD = torch.tensor(AugmentConfig.std).reshape(1, 3, 1, 1)
OFF = AugmentConfig(color_jitter_prob=0.0, grayscale_prob=0.0, brightness=0.0, contrast=0.0, saturation=0.0,
                    hue=0.0)


def uint8_images(n: int = 6, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def unit_images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return uint8_images(n, size, seed).float() / 255.0


def denormalise(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def test_all_off_is_plain_normalisation():
    images = uint8_images()
    out = photometric_augment(images, OFF, blur_prob=0.0, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == images.shape
    torch.testing.assert_close(out, (images.float() / 255.0 - MEAN) / STD)


def test_jitter_factors_of_one_are_exact_identity():
    cfg = dataclasses.replace(OFF, color_jitter_prob=1.0)
    images = uint8_images()
    out = photometric_augment(images, cfg, blur_prob=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, (images.float() / 255.0 - MEAN) / STD, atol=0, rtol=0)


def test_grayscale_prob_one_gives_equal_channels():
    cfg = dataclasses.replace(AugmentConfig(), grayscale_prob=1.0)
    out = denormalise(photometric_augment(uint8_images(), cfg, blur_prob=0.5,
                                          generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(out[:, 0], out[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 1], out[:, 2], atol=1e-5, rtol=0)


def test_identical_crops_get_independent_parameters():
    cfg = dataclasses.replace(AugmentConfig(), color_jitter_prob=1.0, grayscale_prob=0.0)
    images = uint8_images(n=1).expand(8, -1, -1, -1).contiguous()
    out = photometric_augment(images, cfg, blur_prob=1.0, generator=torch.Generator().manual_seed(0))
    for i in range(1, 8):
        assert (out[0] - out[i]).abs().max() > 1e-2


def test_seeded_generator_is_deterministic():
    images = uint8_images()
    cfg = AugmentConfig()
    a = photometric_augment(images, cfg, 0.5, generator=torch.Generator().manual_seed(7))
    b = photometric_augment(images, cfg, 0.5, generator=torch.Generator().manual_seed(7))
    c = photometric_augment(images, cfg, 0.5, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


def test_sampled_params_ranges_and_orders():
    cfg = AugmentConfig()
    p = sample_params(4000, cfg, blur_prob=0.5, generator=torch.Generator().manual_seed(0))
    assert 0.2 <= p.brightness.min() and p.brightness.max() <= 1.8
    assert -0.2 <= p.hue.min() and p.hue.max() <= 0.2 and p.hue.min() < -0.15 and p.hue.max() > 0.15
    assert 0.1 <= p.sigma.min() and p.sigma.max() <= 2.0
    assert abs(p.jitter.float().mean() - 0.8) < 0.05
    assert abs(p.grayscale.float().mean() - 0.2) < 0.05
    assert abs(p.blur.float().mean() - 0.5) < 0.05
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(4000, 4))
    assert len({tuple(row) for row in p.order.tolist()}) == 24
    # Each op lands in each slot about a quarter of the time.
    for slot in range(4):
        counts = torch.bincount(p.order[:, slot], minlength=4).float() / 4000
        assert (counts - 0.25).abs().max() < 0.04


@pytest.mark.parametrize("shift", [-0.5, -0.2, -0.03, 0.0, 0.11, 0.2, 0.5])
def test_hue_matches_torchvision(shift):
    x = unit_images()
    # Include exact grays and saturated primaries, the edge cases of the HSV conversion.
    x[0, :, 0, :] = 0.5
    x[0, :, 1, :] = 0.0
    x[1, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    x[1, :, 0, 1] = torch.tensor([1.0, 1.0, 0.0])
    x[1, :, 0, 2] = torch.tensor([0.0, 1.0, 1.0])
    out = adjust_hue(x, torch.full((x.shape[0],), shift))
    torch.testing.assert_close(out, TF.adjust_hue(x, shift), atol=1e-5, rtol=0)


def test_hsv_round_trip():
    x = unit_images(n=8)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-6, rtol=0)


def test_blur_kernel_sizes():
    assert blur_kernel_size(224) == 23
    assert blur_kernel_size(96) == 9
    assert blur_kernel_size(64) == 7
    assert blur_kernel_size(32) == 3
    assert blur_kernel_size(2) == 3
    assert blur_kernel_size(1) == 1


@pytest.mark.parametrize("sigma", [0.1, 0.8, 2.0])
def test_blur_matches_torchvision(sigma):
    x = unit_images(n=2, size=40)
    size = blur_kernel_size(40)
    out = gaussian_blur(x, torch.full((2,), sigma))
    torch.testing.assert_close(out, TF.gaussian_blur(x, [size, size], [sigma, sigma]), atol=1e-5, rtol=0)


def test_blur_with_tiny_sigma_is_identity_and_large_sigma_removes_high_frequencies():
    x = unit_images(n=2, size=32)
    torch.testing.assert_close(gaussian_blur(x, torch.full((2,), 1e-3)), x, atol=1e-6, rtol=0)
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float().expand(2, 3, 32, 32)
    blurred = gaussian_blur(checker, torch.tensor([0.1, 2.0]))

    def high_frequency_energy(img: torch.Tensor) -> torch.Tensor:
        return (img[..., 1:, :] - img[..., :-1, :]).pow(2).mean() + (img[..., 1:] - img[..., :-1]).pow(2).mean()

    assert high_frequency_energy(blurred[1]) < 0.01 * high_frequency_energy(checker[1])
    assert high_frequency_energy(blurred[0]) > 0.99 * high_frequency_energy(checker[0])
    # Blurring keeps the mean (normalised kernel, reflect padding).
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), checker.mean(dim=(2, 3)), atol=1e-2, rtol=0)


def reference_augment(images: torch.Tensor, p: PhotometricParams, cfg: AugmentConfig) -> torch.Tensor:
    """One crop at a time with torchvision's functional ops, in each crop's drawn order."""
    out = []
    for i in range(images.shape[0]):
        x = images[i].float() / 255.0
        if p.jitter[i]:
            for op in p.order[i].tolist():
                if op == 0:
                    x = TF.adjust_brightness(x, p.brightness[i].item())
                elif op == 1:
                    x = TF.adjust_contrast(x, p.contrast[i].item())
                elif op == 2:
                    x = TF.adjust_saturation(x, p.saturation[i].item())
                else:
                    x = TF.adjust_hue(x, p.hue[i].item())
        if p.grayscale[i]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if p.blur[i]:
            size = blur_kernel_size(x.shape[-1])
            x = TF.gaussian_blur(x, [size, size], [p.sigma[i].item()] * 2)
        out.append(TF.normalize(x, list(cfg.mean), list(cfg.std)))
    return torch.stack(out)


def test_batched_pipeline_matches_per_crop_torchvision_reference():
    cfg = AugmentConfig()
    images = uint8_images(n=24, size=20, seed=5)
    params = sample_params(24, cfg, blur_prob=0.5, generator=torch.Generator().manual_seed(12))
    assert params.jitter.any() and not params.jitter.all() and params.grayscale.any() and params.blur.any()
    out = apply_params(images, params, cfg, blur_prob=0.5)
    torch.testing.assert_close(out, reference_augment(images, params, cfg), atol=1e-4, rtol=0)


def test_channels_last_input_from_nhwc_permute():
    nhwc = uint8_images().permute(0, 2, 3, 1).contiguous()
    images = nhwc.permute(0, 3, 1, 2)
    assert images.is_contiguous(memory_format=torch.channels_last)
    cfg = AugmentConfig()
    out = photometric_augment(images, cfg, 0.5, generator=torch.Generator().manual_seed(2))
    ref = photometric_augment(images.contiguous(), cfg, 0.5, generator=torch.Generator().manual_seed(2))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_float32_under_autocast():
    images = uint8_images()
    cfg = AugmentConfig()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = photometric_augment(images, cfg, 1.0, generator=torch.Generator().manual_seed(4))
    ref = photometric_augment(images, cfg, 1.0, generator=torch.Generator().manual_seed(4))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        photometric_augment(torch.rand(2, 3, 8, 8), AugmentConfig(), 0.5)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        photometric_augment(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), AugmentConfig(), 0.5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_parameters():
    cfg = AugmentConfig()
    images = uint8_images(n=16, size=32, seed=9)
    params = sample_params(16, cfg, blur_prob=0.5, generator=torch.Generator().manual_seed(1))
    on_gpu = PhotometricParams(**{k: v.cuda() for k, v in dataclasses.asdict(params).items()})
    out = apply_params(images.cuda(), on_gpu, cfg, blur_prob=0.5)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), apply_params(images, params, cfg, blur_prob=0.5), atol=1e-4, rtol=0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    assert photometric_augment(images.cuda(), cfg, 0.5, generator).shape == images.shape
