"""What only a GPU runs: bf16 autocast, channels_last on cuDNN, the augmentation on the device,
pinned host-to-device copies of read-only arrays, and the state of a GPU learner (resumed on the
GPU, loaded without one). The optimised-vs-plain float32 equivalence on CUDA is in
test_learner_equivalence.py, the augmentation's CUDA-vs-CPU check in test_augment.py.

Every test here is marked `cuda` (the GPU proof run selects them with `pytest -m cuda`) and is
skipped where there is no CUDA device.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from stream_swav.augment import photometric_augment
from stream_swav.config import AugmentConfig, Config, config_from_dict
from stream_swav.data.batch import BatchMeta, CropBatch
from stream_swav.learner import Learner
from stream_swav.model import SwAVModel
from test_learner_equivalence import strict_float32

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")
BATCH = 8
# bf16 keeps 8 significant bits (2^-8 = 0.004): a loss within 2% of float32 is rounding, not a bug.
BF16_LOSS_RTOL = 2e-2


def small_config(**train: Any) -> Config:
    return config_from_dict({
        "model": {"arch": "resnet18", "small_stem": True, "hidden_dim": 64, "output_dim": 32, "prototypes": 48},
        "crops": {"global_size": 32, "global_count": 2, "local_size": 16, "local_count": 2},
        "swav": {"queue_length": 2 * BATCH, "queue_start_images": 0, "freeze_prototypes_steps": 0},
        "optim": {"warmup_images": 0},
        "train": {"batch_size": BATCH, "seed": 5, **train},
    })


def host_batch(cfg: Config, seed: int = 0) -> CropBatch:
    """Random uint8 crops as read-only numpy arrays, the way they arrive from Ray's object store."""
    rng = np.random.default_rng(seed)
    c = cfg.crops
    stacks = []
    for count, size in ((c.global_count, c.global_size), (c.local_count, c.local_size)):
        stack = rng.integers(0, 256, (count, BATCH, size, size, 3), dtype=np.uint8)
        stack.flags.writeable = False
        stacks.append(stack)
    return CropBatch(global_crops=stacks[0], local_crops=stacks[1], meta=BatchMeta(keys=[f"k{i}" for i in range(BATCH)]))


def on_device(batch: CropBatch) -> CropBatch:
    return CropBatch(global_crops=torch.from_numpy(batch.global_crops.copy()).to(CUDA),
                     local_crops=torch.from_numpy(batch.local_crops.copy()).to(CUDA), meta=batch.meta)


def flat_parameters(learner: Learner) -> Tensor:
    return torch.cat([p.detach().float().flatten() for p in learner.model.parameters()])


def tensors_in(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def test_default_precision_on_cuda_is_bf16_autocast_over_float32_channels_last_weights():
    cfg = small_config()
    learner = Learner(cfg, CUDA)
    assert learner.autocast_dtype == torch.bfloat16
    convolutions = [p for p in learner.model.backbone.parameters() if p.ndim == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    for seed in range(3):
        stats = learner.train_step(host_batch(cfg, seed))
        assert not stats.nonfinite and torch.isfinite(stats.loss)
    # Autocast computes in bf16; the weights, their updates and the optimiser state stay float32.
    for p in learner.model.parameters():
        assert p.dtype == torch.float32 and p.is_cuda and torch.isfinite(p).all()
    for state in learner.optimizer.state.values():
        assert state["momentum_buffer"].dtype == torch.float32
    assert learner.queue.is_full and learner.queue.buffer.dtype == torch.float32


def test_bf16_step_agrees_with_float32_step():
    bf16, fp32 = Learner(small_config(precision="auto"), CUDA), Learner(small_config(precision="fp32"), CUDA)
    assert torch.equal(flat_parameters(bf16), flat_parameters(fp32))
    before = flat_parameters(fp32)
    batch = host_batch(bf16.cfg)
    bf16_stats = bf16.train_step(batch)
    with strict_float32():
        fp32_stats = fp32.train_step(batch)
    assert not bf16_stats.nonfinite and not fp32_stats.nonfinite
    relative = abs(bf16_stats.loss.item() - fp32_stats.loss.item()) / abs(fp32_stats.loss.item())
    assert relative < BF16_LOSS_RTOL, (bf16_stats.loss.item(), fp32_stats.loss.item())
    # Same augmentation draws (same seed), so the two updates point the same way up to rounding: about
    # 0.95 for this random network on random pixels (layers 0.92-0.99; bf16 on the CPU measured the same),
    # where a wrong update would be near 0.
    update_bf16, update_fp32 = flat_parameters(bf16) - before, flat_parameters(fp32) - before
    cosine = torch.nn.functional.cosine_similarity(update_bf16, update_fp32, dim=0).item()
    assert cosine > 0.9, cosine


def test_read_only_host_arrays_and_device_tensors_train_alike():
    cfg = small_config(precision="fp32")
    from_host, from_device = Learner(cfg, CUDA), Learner(cfg, CUDA)
    batch = host_batch(cfg)
    pixels = batch.global_crops.copy()
    with strict_float32():
        host_stats = from_host.train_step(batch)  # pinned copy, then a non-blocking upload
        device_stats = from_device.train_step(on_device(batch))
    torch.testing.assert_close(host_stats.loss, device_stats.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flat_parameters(from_host), flat_parameters(from_device), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batch.global_crops, pixels)


def test_channels_last_network_matches_contiguous_on_cuda():
    cfg = small_config()
    model = SwAVModel(cfg.model).to(CUDA).eval()
    generator = torch.Generator(device=CUDA).manual_seed(2)
    crops = [torch.randn(2 * BATCH, 3, 32, 32, device=CUDA, generator=generator),
             torch.randn(2 * BATCH, 3, 16, 16, device=CUDA, generator=generator)]
    with torch.no_grad(), strict_float32():
        z_ref, scores_ref = model(crops)
        model.to(memory_format=torch.channels_last)
        z, scores = model([c.contiguous(memory_format=torch.channels_last) for c in crops])
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, scores_ref, rtol=1e-4, atol=1e-5)


def test_augmentation_on_cuda_is_float32_under_autocast_and_keeps_channels_last():
    cfg = AugmentConfig()
    generator = torch.Generator(device=CUDA).manual_seed(1)
    nhwc = torch.randint(0, 256, (12, 24, 24, 3), dtype=torch.uint8, device=CUDA, generator=generator)
    images = nhwc.permute(0, 3, 1, 2)  # how the learner hands crops over: channels_last strides, no copy
    assert images.is_contiguous(memory_format=torch.channels_last)
    with strict_float32():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = photometric_augment(images, cfg, 1.0, generator=torch.Generator(device=CUDA).manual_seed(3))
        reference = photometric_augment(images.contiguous(), cfg, 1.0,
                                        generator=torch.Generator(device=CUDA).manual_seed(3))
    assert out.dtype == torch.float32 and out.is_cuda
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def test_cuda_learner_state_resumes_on_cuda_and_loads_without_a_gpu():
    cfg = small_config()
    learner = Learner(cfg, CUDA)
    for seed in range(2):
        learner.train_step(host_batch(cfg, seed))
    state = learner.state_dict()
    # Checkpoints must load on machines without a GPU (evaluators, export): every tensor on the CPU.
    assert all(t.device.type == "cpu" for t in tensors_in(state))
    assert "cuda_rng" in state
    saved = io.BytesIO()
    torch.save(state, saved)

    next_batch = host_batch(cfg, 7)
    original = learner.train_step(next_batch)
    saved.seek(0)
    resumed = Learner(cfg, CUDA)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert (resumed.step, resumed.images_seen) == (2, 2 * BATCH)
    again = resumed.train_step(next_batch)
    # Same weights, queue and augmentation draws; the forward pass repeats (cuDNN's backward may not).
    torch.testing.assert_close(again.loss, original.loss, rtol=1e-5, atol=1e-6)

    saved.seek(0)
    on_cpu = SwAVModel(cfg.model)
    on_cpu.load_state_dict(torch.load(saved, weights_only=True, map_location="cpu")["model"])
    reference = {k: v.cpu() for k, v in state["model"].items()}
    for key, value in on_cpu.state_dict().items():
        assert torch.equal(value, reference[key]), key


# A RegNetY and a ViT at their real sizes (the recipes' families), on small crops.
CUDA_FAMILIES = {"regnet": {"arch": "regnet_y_400mf"},
                 "vit": {"arch": "vit_s_16", "vit_image_size": 32, "small_stem": False}}


@pytest.mark.parametrize("family", CUDA_FAMILIES)
def test_regnet_and_vit_train_in_bf16_with_their_optimisers_and_agree_with_float32(family):
    model = {"arch": "resnet18", "small_stem": False, "hidden_dim": 64, "output_dim": 32, "prototypes": 48,
             **CUDA_FAMILIES[family]}
    cfg = config_from_dict({
        "model": model,
        "crops": {"global_size": 32, "global_count": 2, "local_size": 16, "local_count": 2},
        "swav": {"queue_length": 0, "freeze_prototypes_steps": 0},
        "optim": {"warmup_images": 0},
        "train": {"batch_size": BATCH, "seed": 5},
    })
    assert cfg.optimizer == ("adamw" if family == "vit" else "lars")
    bf16, fp32 = Learner(cfg, CUDA), Learner(config_from_dict({**cfg.to_dict(), "train": {
        **cfg.to_dict()["train"], "precision": "fp32"}}), CUDA)
    assert bf16.autocast_dtype == torch.bfloat16 and fp32.autocast_dtype is None
    batch = host_batch(cfg)
    with strict_float32():
        reference = fp32.train_step(batch)
    stats = bf16.train_step(batch)
    assert not stats.nonfinite and torch.isfinite(stats.loss)
    torch.testing.assert_close(stats.loss.float(), reference.loss.float(), rtol=BF16_LOSS_RTOL, atol=0)
    for seed in range(1, 4):
        assert not bf16.train_step(host_batch(cfg, seed)).nonfinite
    assert all(torch.isfinite(p).all() for p in bf16.model.parameters())
