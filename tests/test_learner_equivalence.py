"""The learner's optimised step computes the same thing as a plain float32 SwAV step.

Optimised: channels_last network and crops, one backbone call per resolution,
photometric augmentation of whole crop stacks at once, log-domain Sinkhorn,
foreach LARS. Plain, written out here: contiguous NCHW copy of the same initial
network, each crop augmented on its own with its own row of the same random
parameters, exp-domain Sinkhorn, the swapped loss as a double loop over crops,
and LARS as a loop over parameters. Both start from the same weights and
queue and must agree on loss, gradients, updated weights, momentum, BatchNorm
statistics and the queue, so speed work cannot quietly change the algorithm.

On CUDA (marked `cuda`) the learner runs on the GPU, with TF32 off, against the same plain
step on the CPU: augmentation on the device, pinned host-to-device copies and cuDNN's kernels
must not change the algorithm either, only rounding.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stream_swav.augment import PhotometricParams, apply_params, sample_params
from stream_swav.config import Config, ConfigError, config_from_dict
from stream_swav.data.batch import BatchMeta, CropBatch
from stream_swav.learner import Learner

BATCH = 4
QUEUE = 8
GLOBAL_SIZE, LOCAL_SIZE = 16, 8

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="needs CUDA")])]


@dataclasses.dataclass(frozen=True)
class Tolerances:
    loss: float
    gradient: float
    step: float
    momentum: float
    buffer: float
    queue: float


# Float32 rounding on the CPU gives about 3e-5 on the gradients (other convolution algorithms, log- vs
# exp-domain Sinkhorn). cuDNN picks its own kernels (benchmark mode) and the GPU's augmentation rounds
# its own way, so CUDA gets about 10x the room; an algorithmic change would still be off by far more.
TOLERANCES = {
    "cpu": Tolerances(loss=1e-5, gradient=3e-4, step=2e-3, momentum=3e-4, buffer=1e-5, queue=2e-5),
    "cuda": Tolerances(loss=1e-4, gradient=2e-3, step=5e-3, momentum=2e-3, buffer=1e-4, queue=1e-4),
}


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """No TF32 in cuDNN convolutions and CUDA matmuls (both may use it by default), and the global
    cuDNN flags the Learner sets restored afterwards."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def small_config() -> Config:
    return config_from_dict({
        "model": {"arch": "resnet18", "small_stem": True, "hidden_dim": 32, "output_dim": 16, "prototypes": 24},
        "crops": {"global_size": GLOBAL_SIZE, "global_count": 2, "local_size": LOCAL_SIZE, "local_count": 2},
        # Every photometric operation on, blur on both resolutions.
        "augment": {"blur_prob_global": 0.5, "blur_prob_local": 0.5},
        "swav": {"queue_length": QUEUE, "queue_start_images": 0, "freeze_prototypes_steps": 0},
        "optim": {"warmup_images": 0, "base_lr": 4.8, "weight_decay": 1e-3},
        "train": {"batch_size": BATCH, "seed": 3, "precision": "fp32", "channels_last": True},
    })


def random_batch(cfg: Config, as_tensor: bool) -> CropBatch:
    rng = np.random.default_rng(11)
    c = cfg.crops
    global_crops = rng.integers(0, 256, (c.global_count, BATCH, c.global_size, c.global_size, 3), dtype=np.uint8)
    local_crops = rng.integers(0, 256, (c.local_count, BATCH, c.local_size, c.local_size, 3), dtype=np.uint8)
    if as_tensor:
        global_crops, local_crops = torch.from_numpy(global_crops), torch.from_numpy(local_crops)
    else:
        # As they come out of Ray's object store.
        global_crops.flags.writeable = False
        local_crops.flags.writeable = False
    return CropBatch(global_crops=global_crops, local_crops=local_crops,
                     meta=BatchMeta(keys=[f"k{i}" for i in range(BATCH)]))


def params_row(params: PhotometricParams, row: int) -> PhotometricParams:
    return PhotometricParams(**{f.name: getattr(params, f.name)[row:row + 1] for f in dataclasses.fields(params)})


def plain_views(batch: CropBatch, cfg: Config, generator: torch.Generator) -> list[Tensor]:
    """One (B, 3, H, W) NCHW tensor per crop on the CPU, each image augmented on its own."""
    views = []
    for stack, blur_prob in ((batch.global_crops, cfg.augment.blur_prob_global),
                             (batch.local_crops, cfg.augment.blur_prob_local)):
        pixels = torch.as_tensor(np.asarray(stack))
        count = pixels.shape[0]
        # The learner draws one parameter row per crop, crop-major, global crops first, with its
        # generator on its device; the parameters are then applied here, on the CPU.
        params = sample_params(count * BATCH, cfg.augment, blur_prob, generator, generator.device)
        params = PhotometricParams(**{f.name: getattr(params, f.name).cpu() for f in dataclasses.fields(params)})
        for view in range(count):
            images = [apply_params(pixels[view, i].permute(2, 0, 1).unsqueeze(0).contiguous(),
                                   params_row(params, view * BATCH + i), cfg.augment, blur_prob)
                      for i in range(BATCH)]
            views.append(torch.cat(images))
    return views


def plain_forward(model: nn.Module, views: list[Tensor]) -> tuple[Tensor, Tensor]:
    # Views of one resolution share a backbone call, as in SwAV's reference code: BatchNorm
    # statistics are per resolution, so a call per view would be a different algorithm.
    features = []
    for size in dict.fromkeys(v.shape[-1] for v in views):
        features.append(model.backbone(torch.cat([v for v in views if v.shape[-1] == size])))
    z = F.normalize(model.projection(torch.cat(features)), dim=1)
    return z, z @ model.prototypes.weight.t()


def plain_sinkhorn(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
    q = torch.exp(scores / epsilon).t()
    q = q / q.sum()
    n_prototypes, n_samples = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / n_prototypes
        q = q / q.sum(dim=0, keepdim=True) / n_samples
    return (q * n_samples).t()


def plain_loss(scores: Tensor, queue: Tensor, prototypes: Tensor, cfg: Config) -> tuple[Tensor, dict[int, Tensor]]:
    s = cfg.swav
    n_views = scores.shape[0] // BATCH
    views = scores.split(BATCH)
    loss = torch.zeros(())
    codes = {}
    for position, crop in enumerate(s.crops_for_assign):
        with torch.no_grad():
            joint = torch.cat([views[crop].detach(), queue[position] @ prototypes.t()])
            codes[crop] = plain_sinkhorn(joint, s.epsilon, s.sinkhorn_iterations)[:BATCH]
        for view in range(n_views):
            if view != crop:
                log_p = F.log_softmax(views[view] / s.temperature, dim=1)
                loss = loss - (codes[crop] * log_p).sum(dim=1).mean() / (n_views - 1)
    return loss / len(s.crops_for_assign), codes


def assert_close_in_norm(actual: Tensor, expected: Tensor, rtol: float, atol: float, what: str) -> None:
    """||actual - expected|| <= rtol * ||expected|| + atol: elementwise tolerances would trip on single
    entries that cancel to about zero (the bias before a BatchNorm has no true gradient at all)."""
    error = (actual.detach().cpu().double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    assert error <= rtol * scale + atol, f"{what}: |difference| {error:.3g} vs |expected| {scale:.3g}"


def plain_lars_step(model: nn.Module, lr: float, cfg: Config) -> dict[str, Tensor]:
    """First step from zero momentum: the momentum buffer equals the update. Returns the buffers."""
    o = cfg.optim
    buffers = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = p.grad
            if p.ndim > 1:
                w_norm, g_norm = p.norm().item(), g.norm().item()
                trust = o.trust_coefficient * w_norm / (g_norm + o.weight_decay * w_norm) \
                    if w_norm > 0 and g_norm > 0 else 1.0
                update = (g + o.weight_decay * p) * trust
            else:
                # Biases and BatchNorm scales/shifts: plain momentum SGD, no weight decay.
                update = g.clone()
            buffers[name] = update
            p -= lr * update
        model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1))
    return buffers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "tensor"])
def test_optimised_step_matches_plain_float32_step(as_tensor, device):
    torch.set_num_threads(1)
    tol = TOLERANCES[device]
    cfg = small_config()
    with strict_float32():
        learner = Learner(cfg, torch.device(device))
        assert next(learner.model.backbone.parameters()).is_contiguous(memory_format=torch.channels_last)
        generator = torch.Generator().manual_seed(5)
        queue = F.normalize(torch.randn(2, QUEUE, cfg.model.output_dim, generator=generator), dim=2)
        learner.queue.load_state_dict({"features": queue, "fill": QUEUE, "next": 0})

        plain = copy.deepcopy(learner.model).to("cpu", memory_format=torch.contiguous_format)
        before = {name: p.detach().clone() for name, p in plain.named_parameters()}
        augment_generator = torch.Generator(device=learner.generator.device)
        augment_generator.set_state(learner.generator.get_state())
        learner_grads: dict[str, Tensor] = {}
        names = {id(p): name for name, p in learner.model.named_parameters()}

        def keep_grads(optimizer, args, kwargs):
            for group in optimizer.param_groups:
                learner_grads.update({names[id(p)]: p.grad.to("cpu", copy=True) for p in group["params"]})

        learner.optimizer.register_step_pre_hook(keep_grads)
        batch = random_batch(cfg, as_tensor)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            stats = learner.train_step(batch)
    assert not stats.nonfinite

    views = plain_views(batch, cfg, augment_generator)
    z, scores = plain_forward(plain, views)
    loss, codes = plain_loss(scores, queue, plain.prototypes.weight.detach(), cfg)
    loss.backward()
    # The queue was in use: codes from the batch alone are measurably different.
    alone = plain_sinkhorn(scores[:BATCH].detach(), cfg.swav.epsilon, cfg.swav.sinkhorn_iterations)
    assert (alone - codes[0]).abs().max() > 1e-3

    torch.testing.assert_close(stats.loss.cpu(), loss.detach(), rtol=tol.loss, atol=1e-6)
    assert learner_grads.keys() == {name for name, _ in plain.named_parameters()}
    for name, p in plain.named_parameters():
        assert_close_in_norm(learner_grads[name], p.grad, rtol=tol.gradient, atol=1e-6, what=f"gradient of {name}")

    buffers = plain_lars_step(plain, stats.lr, cfg)
    params = dict(learner.model.named_parameters())
    for name, p in plain.named_parameters():
        # Compared as steps taken: the steps are small next to the weights.
        assert_close_in_norm(params[name].detach().cpu() - before[name], p.detach() - before[name],
                             rtol=tol.step, atol=1e-7, what=f"step of {name}")
        assert_close_in_norm(learner.optimizer.state[params[name]]["momentum_buffer"], buffers[name],
                             rtol=tol.momentum, atol=1e-6, what=f"momentum of {name}")
    for (name, a), b in zip(learner.model.named_buffers(), plain.buffers()):
        assert_close_in_norm(a, b, rtol=tol.buffer, atol=1e-6, what=f"buffer {name}")
    pushed = torch.stack([z.detach()[c * BATCH:(c + 1) * BATCH] for c in cfg.swav.crops_for_assign])
    # Unit vectors: an absolute tolerance.
    # A ring buffer whose next row is 0: the batch overwrote the first BATCH rows, in place.
    torch.testing.assert_close(learner.queue.buffer.cpu(), torch.cat([pushed, queue[:, BATCH:]], dim=1),
                               rtol=0, atol=tol.queue)


def test_augmentation_compiles_as_one_graph_with_the_same_result():
    # What train.compile relies on: no graph break in apply_params (dynamo only; no code generation).
    cfg = small_config().augment
    images = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    params = sample_params(6, cfg, 0.5, torch.Generator().manual_seed(1))
    compiled = torch.compile(apply_params, fullgraph=True, dynamic=False, backend="eager")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lru_cache")
        out = compiled(images, params, cfg, 0.5)
    torch.testing.assert_close(out, apply_params(images, params, cfg, 0.5), rtol=0, atol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_compile_mode_is_validated():
    with pytest.raises(ConfigError, match="train.compile_mode"):
        config_from_dict({"train": {"compile": True, "compile_mode": "fastest"}})


def test_tensor_batches_are_checked_like_arrays():
    cfg = small_config()
    learner = Learner(cfg, torch.device("cpu"))
    good = random_batch(cfg, as_tensor=True)
    wrong_dtype = CropBatch(global_crops=good.global_crops.float(), local_crops=good.local_crops, meta=good.meta)
    wrong_layout = CropBatch(global_crops=good.global_crops.permute(0, 1, 4, 2, 3), local_crops=good.local_crops,
                             meta=good.meta)
    for bad, message in ((wrong_dtype, "uint8"), (wrong_layout, "uint8")):
        with pytest.raises(ValueError, match=message):
            learner.train_step(bad)
    assert learner.step == 0 and learner.images_seen == 0
