"""Speed of one SwAV learner step: our Learner against a classic implementation, same model and loss.

ours:     `Learner.train_step` as the runtime runs it, from uint8 multi-crop batches already on
          the device: photometric augmentation and normalisation on the device, one backbone
          call per crop resolution, Sinkhorn with a full feature queue, swapped loss, backward,
          the finiteness check, LARS (foreach kernels), prototype normalisation, queue push.
          On CUDA: bf16 autocast, channels_last, torch.compile of network and augmentation.
classic:  the same network, loss and LARS written the way SwAV reimplementations usually are
          (the structure of the official main_swav.py): inputs already normalised float32 NCHW
          (no augmentation), views of one resolution concatenated per backbone call, float16
          autocast with a GradScaler, exp-domain Sinkhorn over queue + batch, the swapped loss
          as a loop over crop pairs, LARS as a per-parameter loop on the gradients (trust ratio
          with torch.where, so no host sync per parameter, unlike apex's LARC) followed by
          torch.optim.SGD with momentum. Prototypes normalised at the start of each step.

Both keep a full queue in use (prefilled with random unit vectors) and the same learning rate,
weight decay and LARS settings. cuDNN autotuning is on for both (the official code sets it).
Timing: warm-up steps (compilation included) outside, then CUDA events around the timed steps.
MFU counts the network's forward + backward FLOPs (torch.utils.flop_counter; augmentation,
Sinkhorn and optimiser not counted) against the device's dense bf16 peak.

    PYTHONPATH=. python bench/learner.py                      # ours vs classic, batch 64 and 256
    PYTHONPATH=. python bench/learner.py --levers             # what each speed lever gives
    PYTHONPATH=. python bench/learner.py --tiny               # CPU smoke run (resnet18, 16/8 px)
    PYTHONPATH=. python bench/learner.py --families           # ours per backbone family, at each deploy
                                                              # recipe's crops and batch (CPU: shrunk)

Without a CUDA device, --device auto falls back to the --tiny settings.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from stream_swav.augment import photometric_augment
from stream_swav.config import COMPILE_MODES, Config, config_from_dict, load_config
from stream_swav.data.batch import BatchMeta, CropBatch
from stream_swav.learner import Learner
from stream_swav.model import SwAVModel
from stream_swav.optim import learning_rate_for

from machine import cpu_model  # bench/machine.py, beside this script

FULL = {"arch": "resnet50", "small_stem": False, "global_size": 224, "local_size": 96, "batch_sizes": "64,256",
        "prototypes": 3000, "queue": 3840, "steps": 20, "warmup": 5}
# Small enough for a loaded 2-core machine to finish in about two minutes.
TINY = {"arch": "resnet18", "small_stem": True, "global_size": 16, "local_size": 8, "batch_sizes": "8",
        "prototypes": 300, "queue": 384, "steps": 2, "warmup": 1}
# Dense bf16 tensor-core peaks (no sparsity), by a substring of the device name; the first match wins.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12))
# The deploy recipe of each backbone family, measured by --families at its own crops and batch.
DEPLOY_CONFIGS = Path(__file__).resolve().parents[1] / "deploy" / "configs"
FAMILY_RECIPES = {"resnet": "resnet50-gpu.yaml", "regnet": "regnety-seer-gpu.yaml", "vit": "vit-s16-gpu.yaml"}
# On the CPU (--tiny) each recipe is shrunk to a member of the same class at 16/8 px crops, batch 8.
TINY_FAMILY_SETS = {
    "resnet": ["model.arch=resnet18", "model.small_stem=true"],
    "regnet": ["model.arch=regnet_y_400mf", "model.small_stem=true"],
    "vit": ["model.width=96", "model.vit_layers=4", "model.vit_heads=3", "model.vit_patch_size=4",
            "model.vit_image_size=16"],
}
TINY_RECIPE_SETS = ["crops.global_size=16", "crops.local_size=8", "model.hidden_dim=512", "model.prototypes=300",
                    "swav.queue_length=0"]
LEVERS = ("fp32", "bf16", "channels_last", "compile", "cudagraphs", "no_sync", "host_input", "augment", "classic")
# A relative loss difference below this counts as agreement at bf16 precision (8 mantissa bits: 2^-8 = 0.004).
BF16_LOSS_RTOL = 1e-2


# ----------------------------------------------------------------------------- classic implementation

class ClassicSwAV:
    """One training step of a textbook SwAV reimplementation (see the module docstring)."""

    def __init__(self, model: SwAVModel, cfg: Config, queue: Tensor, half: bool) -> None:
        self.model = model
        self.cfg = cfg
        self.queue = queue.clone()  # (assignment crops, length, dim), newest first
        self.half = half
        self.device = next(model.parameters()).device
        self.adapted = [p for p in model.parameters() if p.ndim > 1]
        excluded = [p for p in model.parameters() if p.ndim <= 1]
        o = cfg.optim
        # Weight decay goes through the LARS loop; SGD only adds momentum.
        self.optimizer = torch.optim.SGD([{"params": self.adapted}, {"params": excluded}], lr=0.0,
                                         momentum=o.momentum)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=half)

    def forward(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        features = []
        for size in dict.fromkeys(v.shape[-1] for v in views):
            features.append(self.model.backbone(torch.cat([v for v in views if v.shape[-1] == size])))
        z = F.normalize(self.model.projection(torch.cat(features)), dim=1)
        return z, self.model.prototypes(z)

    @torch.no_grad()
    def sinkhorn(self, scores: Tensor) -> Tensor:
        s = self.cfg.swav
        plan = torch.exp(scores.float() / s.epsilon).t()
        plan /= plan.sum()
        n_prototypes, n_samples = plan.shape
        for _ in range(s.sinkhorn_iterations):
            plan /= plan.sum(dim=1, keepdim=True) * n_prototypes
            plan /= plan.sum(dim=0, keepdim=True) * n_samples
        return (plan * n_samples).t()

    def loss(self, scores: Tensor, batch: int) -> Tensor:
        s = self.cfg.swav
        n_views = scores.shape[0] // batch
        total = 0.0
        for position, crop in enumerate(s.crops_for_assign):
            with torch.no_grad():
                crop_scores = scores[crop * batch:(crop + 1) * batch].detach()
                queue_scores = self.queue[position] @ self.model.prototypes.weight.t()
                codes = self.sinkhorn(torch.cat([crop_scores.float(), queue_scores.float()]))[:batch]
            crop_loss = 0.0
            for view in range(n_views):
                if view != crop:
                    log_p = F.log_softmax(scores[view * batch:(view + 1) * batch] / s.temperature, dim=1)
                    crop_loss = crop_loss - torch.mean(torch.sum(codes * log_p, dim=1))
            total = total + crop_loss / (n_views - 1)
        return total / len(s.crops_for_assign)

    @torch.no_grad()
    def lars(self) -> None:
        o = self.cfg.optim
        for p in self.adapted:
            if p.grad is None:
                continue
            w_norm, g_norm = torch.norm(p), torch.norm(p.grad)
            trust = torch.where((w_norm > 0) & (g_norm > 0),
                                o.trust_coefficient * w_norm / (g_norm + o.weight_decay * w_norm),
                                torch.ones_like(w_norm))
            p.grad.add_(p, alpha=o.weight_decay).mul_(trust)

    def step(self, views: list[Tensor], lr: float) -> Tensor:
        batch = views[0].shape[0]
        with torch.no_grad():
            self.model.prototypes.weight.copy_(F.normalize(self.model.prototypes.weight, dim=1))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half):
            z, scores = self.forward(views)
            loss = self.loss(scores, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        self.lars()
        self.scaler.step(self.optimizer)  # skipped (host sync) when the scaled gradients overflowed
        self.scaler.update()
        with torch.no_grad():
            newest = torch.stack([z[c * batch:(c + 1) * batch].float() for c in self.cfg.swav.crops_for_assign])
            self.queue = torch.cat([newest, self.queue[:, :-batch]], dim=1)
        return loss.detach()


def make_classic(cfg: Config, device: torch.device, half: bool, queue: Tensor,
                 weights: dict[str, Tensor] | None = None) -> ClassicSwAV:
    """A classic step on a contiguous NCHW copy of the network, from `weights` if given."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = SwAVModel(cfg.model).to(device)
    if weights is not None:
        model.load_state_dict(weights)
    return ClassicSwAV(model.to(memory_format=torch.contiguous_format), cfg, queue, half)


def as_views(crops: list[Tensor], batch: int) -> list[Tensor]:
    """Per-resolution (n * B, 3, H, W) crops -> one contiguous NCHW float32 tensor per view."""
    return [view.float().contiguous() for group in crops for view in group.split(batch)]


# ----------------------------------------------------------------------------- set-up

@dataclass
class Result:
    name: str
    batch: int
    images_per_s: float | None = None
    step_ms: float | None = None
    peak_gib: float | None = None
    mfu: float | None = None
    warmup_s: float | None = None
    nonfinite_steps: int = 0
    error: str = ""


def bench_config(args: argparse.Namespace, batch: int, *, precision: str, channels_last: bool,
                 compile_network: bool, compile_mode: str = "default") -> Config:
    return config_from_dict({
        "model": {"arch": args.arch, "small_stem": args.small_stem, "prototypes": args.prototypes},
        "crops": {"global_size": args.global_size, "global_count": args.global_count,
                  "local_size": args.local_size, "local_count": args.local_count},
        # Steady state: queue full and in use, pushed every step, prototypes trained, no warmup.
        "swav": {"queue_length": args.queue, "queue_start_images": 0, "freeze_prototypes_steps": 0},
        "optim": {"warmup_images": 0},
        "train": {"batch_size": batch, "precision": precision, "channels_last": channels_last,
                  "compile": compile_network, "compile_mode": compile_mode},
    })


def random_queue(cfg: Config) -> Tensor:
    """A full queue of random unit vectors, (assignment crops, length, dim)."""
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(len(cfg.swav.crops_for_assign), cfg.swav.queue_length, cfg.model.output_dim,
                           generator=generator)
    return F.normalize(features, dim=2)


def make_learner(cfg: Config, device: torch.device, learner_type: type[Learner] = Learner) -> Learner:
    """A learner in steady state: its queue, if it has one, full of random unit vectors."""
    learner = learner_type(cfg, device)
    if learner.queue is not None:
        learner.queue.load_state_dict({"features": random_queue(cfg), "fill": cfg.swav.queue_length, "next": 0})
    return learner


def device_batch(cfg: Config, batch: int, device: torch.device) -> CropBatch:
    """Random uint8 crops already on the device (augmentation and network cost do not depend on content)."""
    generator = torch.Generator(device=device).manual_seed(0)
    c = cfg.crops

    def stack(count: int, size: int) -> Tensor:
        return torch.randint(0, 256, (count, batch, size, size, 3), dtype=torch.uint8, device=device,
                             generator=generator)

    return CropBatch(global_crops=stack(c.global_count, c.global_size), local_crops=stack(c.local_count, c.local_size),
                     meta=BatchMeta(keys=[str(i) for i in range(batch)]))


def host_batch(batch: CropBatch) -> CropBatch:
    """The same crops as read-only numpy arrays, the way they arrive from Ray's object store."""
    arrays = []
    for stack in (batch.global_crops, batch.local_crops):
        array = stack.cpu().numpy()
        array.flags.writeable = False
        arrays.append(array)
    return CropBatch(global_crops=arrays[0], local_crops=arrays[1], meta=batch.meta)


def classic_views(cfg: Config, batch: CropBatch) -> list[Tensor]:
    """The classic path's input: the crops augmented and normalised once, float32 NCHW per view."""
    crops = []
    for stack, blur_prob in ((batch.global_crops, cfg.augment.blur_prob_global),
                             (batch.local_crops, cfg.augment.blur_prob_local)):
        if stack.shape[0]:
            n, b, h, w, c = stack.shape
            images = stack.reshape(n * b, h, w, c).permute(0, 3, 1, 2)
            crops.append(photometric_augment(images, cfg.augment, blur_prob))
    return as_views(crops, batch.global_crops.shape[1])


class UncheckedLearner(Learner):
    """Measurement only: no finiteness check, hence no host sync after backward; a non-finite
    step would update the weights. Shows what removing that sync could gain."""

    def _all_finite(self, loss: Tensor) -> bool:
        return True


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Start the next case clean: no compiled graphs, cached blocks or peak memory left from the last."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(step: Callable[[], bool], device: torch.device, warmup: int, steps: int, batch: int, name: str,
          flops_per_image: float, peak: float | None) -> Result:
    """Warm-up steps (compilation, cuDNN autotuning, CUDA graph capture), then `steps` timed ones
    (on CUDA all together between two events, on CPU one by one, keeping the median).
    `step` returns whether its update was skipped as non-finite."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    nonfinite = 0
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps):
            nonfinite += step()
        end.record()
        end.synchronize()
        seconds = begin.elapsed_time(end) / 1000.0
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        # The median step: on a shared CPU other jobs make single steps several times slower.
        durations = []
        for _ in range(steps):
            start = time.perf_counter()
            nonfinite += step()
            durations.append(time.perf_counter() - start)
        seconds = statistics.median(durations) * steps
        peak_gib = None
    images_per_s = batch * steps / seconds
    mfu = flops_per_image * images_per_s / peak if peak and flops_per_image else None
    return Result(name, batch, images_per_s, 1000.0 * seconds / steps, peak_gib, mfu, warmup_s, nonfinite)


def guarded(report: dict[str, Any], section: str, name: str, batch: int, case: Callable[[], list[Result]]) -> None:
    """Run one case; a failure (out of memory, a compiler error) is reported and the next case still runs."""
    try:
        results = case()
    except Exception as error:  # noqa: BLE001 - any failure of one case is a figure to report, not a crash
        traceback.print_exc()
        first_line = (str(error).strip().splitlines() or [""])[0]
        results = [Result(name, batch, error=f"{type(error).__name__}: {first_line[:200]}")]
    for result in results:
        emit(report, section, result)


def ours_step(learner: Learner, batch: CropBatch) -> Callable[[], bool]:
    return lambda: learner.train_step(batch).nonfinite


def classic_step(classic: ClassicSwAV, views: list[Tensor], lr: float) -> Callable[[], bool]:
    def step() -> bool:
        classic.step(views, lr)
        return False  # GradScaler skips overflowing steps itself; counting them would cost another sync

    return step


def flops_per_image(args: argparse.Namespace, device: torch.device) -> float:
    """Forward + backward FLOPs of the network for one image's crops (linear in the batch size)."""
    return network_flops(bench_config(args, 2, precision="fp32", channels_last=False, compile_network=False), device)


def network_flops(cfg: Config, device: torch.device) -> float:
    """Forward + backward FLOPs of `cfg`'s network for one image's crops."""
    model = SwAVModel(cfg.model).to(device)
    c = cfg.crops
    crops = [torch.randn(2 * c.global_count, 3, c.global_size, c.global_size, device=device),
             torch.randn(2 * c.local_count, 3, c.local_size, c.local_size, device=device)]
    with FlopCounterMode(display=False) as counter:
        _, scores = model([group for group in crops if group.shape[0]])
        scores.sum().backward()
    return counter.get_total_flops() / 2


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (given with --peak-tflops)"
    if device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16:
        if key in name:
            return value, f"{value / 1e12:g} TFLOP/s dense bf16 (assumed for '{key}')"
    return None, f"unknown for '{name}' (pass --peak-tflops)"


def environment(device: torch.device) -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), memory_gib=f"{props.total_memory / 2**30:.0f}",
                    capability=f"{props.major}.{props.minor}", cuda=str(torch.version.cuda),
                    cudnn=str(torch.backends.cudnn.version()))
    else:
        info.update(device=f"CPU: {cpu_model()}", threads=str(torch.get_num_threads()))
    return info


# ----------------------------------------------------------------------------- measurements

def count_syncs(step: Callable[[], Any], device: torch.device) -> list[str]:
    """Where one step makes the host wait for the GPU, as torch.cuda's sync debug mode reports it."""
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """No TF32 in convolutions and matmuls (cuDNN convolutions use it by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def loss_match(learner: Learner, batch: CropBatch, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Ours and classic from the same weights and queue on the same augmented crops, one step each.

    Ours runs its whole step (bf16 on CUDA); the classic path gets ours' augmented, normalised
    crops as its float32 input, once with float16 autocast + GradScaler (on CUDA) and once in
    strict float32 (no TF32), the reference.
    """
    batch_size = batch.global_crops.shape[1]
    generator_state = learner.generator.get_state()
    views = as_views(learner.augment(batch), batch_size)
    learner.generator.set_state(generator_state)
    half = device.type == "cuda"
    weights = learner.model.state_dict()
    classic = make_classic(cfg, device, half, learner.queue.buffer, weights)
    reference = make_classic(cfg, device, False, learner.queue.buffer, weights)
    stats = learner.train_step(batch)
    losses = {"ours": stats.loss.item(), "classic": classic.step(views, stats.lr).item()}
    with strict_float32():
        losses["float32 reference"] = reference.step(views, stats.lr).item()
    ref = losses["float32 reference"]
    return {
        "batch": batch_size,
        "ours_precision": "bf16" if learner.autocast_dtype == torch.bfloat16 else "fp32",
        "classic_precision": "fp16 + GradScaler" if half else "fp32",
        "losses": losses,
        "ours_vs_classic": abs(losses["ours"] - losses["classic"]) / abs(losses["classic"]),
        "ours_vs_fp32": abs(losses["ours"] - ref) / abs(ref),
        "classic_vs_fp32": abs(losses["classic"] - ref) / abs(ref),
    }


def classic_case(args: argparse.Namespace, device: torch.device, batch: int, name: str, flops: float,
                 peak: float | None, report: dict[str, Any] | None = None) -> list[Result]:
    cfg = bench_config(args, batch, precision="fp32", channels_last=False, compile_network=False)
    views = classic_views(cfg, device_batch(cfg, batch, device))
    classic = make_classic(cfg, device, device.type == "cuda", random_queue(cfg).to(device))
    step = classic_step(classic, views, learning_rate_for(cfg, batch))
    result = timed(step, device, args.warmup, args.steps, batch, name, flops, peak)
    if report is not None and device.type == "cuda":
        report["syncs_per_step"]["classic"] = count_syncs(step, device)
    return [result]


def run_main(args: argparse.Namespace, device: torch.device, report: dict[str, Any], flops: float,
             peak: float | None) -> None:
    cuda = device.type == "cuda"
    compiled = f"compiled ({args.compile_mode})" if args.compile_on else "eager"
    ours_name = f"ours: {'bf16' if cuda else 'float32'}, channels_last, {compiled}, augmentation on device"
    classic_name = "classic: fp16 + GradScaler, NCHW, eager, no augmentation" if cuda else \
        "classic: float32 on CPU, NCHW, eager, no augmentation"
    for batch in args.batch_list:
        # The loss match and the sync count run once, at the smallest batch (float32 references are
        # heavy), whatever the order: the GPU proof run measures 256 first so a cut-off keeps it.
        first = batch == min(args.batch_list)

        def ours() -> list[Result]:
            cfg = bench_config(args, batch, precision="auto", channels_last=True, compile_network=args.compile_on,
                               compile_mode=args.compile_mode)
            crops = device_batch(cfg, batch, device)
            learner = make_learner(cfg, device)
            result = timed(ours_step(learner, crops), device, args.warmup, args.steps, batch, ours_name, flops,
                           peak)
            if first and cuda:
                report["syncs_per_step"]["ours"] = count_syncs(ours_step(learner, crops), device)
            if first:
                report["loss_match"] = loss_match(learner, crops, cfg, device)
            return [result]

        release(device)
        guarded(report, "results", ours_name, batch, ours)
        release(device)
        guarded(report, "results", classic_name, batch,
                lambda: classic_case(args, device, batch, classic_name, flops, peak, report if first else None))


def run_levers(args: argparse.Namespace, device: torch.device, report: dict[str, Any], flops: float,
               peak: float | None) -> None:
    """Levers added one at a time, then variations of the compiled configuration."""
    batch = args.levers_batch
    cuda = device.type == "cuda"
    chain = [
        ("fp32", "eager, float32 (TF32 convolutions on CUDA), NCHW",
         dict(precision="fp32", channels_last=False, compile_network=False)),
        ("bf16", "+ bf16 autocast", dict(precision="bf16", channels_last=False, compile_network=False)),
        ("channels_last", "+ channels_last", dict(precision="bf16", channels_last=True, compile_network=False)),
        ("compile", "+ torch.compile (network + augmentation)",
         dict(precision="bf16", channels_last=True, compile_network=True)),
        ("cudagraphs", "+ CUDA graphs (compile mode reduce-overhead)",
         dict(precision="bf16", channels_last=True, compile_network=True, compile_mode="reduce-overhead")),
    ]
    best = dict(precision="auto", channels_last=True, compile_network=cuda)
    variations = [
        ("no_sync", "best, without the finite-check sync [unsafe, measurement only]", best),
        ("host_input", "best, fed host numpy arrays (pinned copy + H2D in the step)", best),
    ]
    for key, name, options in chain + variations:
        if key not in args.lever_keys:
            continue
        if not cuda and (options["compile_network"] or options["precision"] == "bf16"):
            # Inductor's CPU compilation takes minutes, and most CPUs emulate bf16 matmuls slowly.
            print(f"  {name}: skipped (measured on CUDA only)", flush=True)
            continue

        def case() -> list[Result]:
            cfg = bench_config(args, batch, **options)
            crops = device_batch(cfg, batch, device)
            if key == "host_input":
                crops = host_batch(crops)
            learner = make_learner(cfg, device, UncheckedLearner if key == "no_sync" else Learner)
            results = [timed(ours_step(learner, crops), device, args.warmup, args.steps, batch, name, flops, peak)]
            if "augment" in args.lever_keys and key in ("channels_last", "compile"):
                def augment() -> bool:
                    learner.augment(crops)
                    return False

                label = "  augmentation alone, " + ("compiled" if key == "compile" else "eager")
                results.append(timed(augment, device, args.warmup, args.steps, batch, label, 0.0, None))
            return results

        release(device)
        guarded(report, "levers", name, batch, case)
    if "classic" in args.lever_keys:
        release(device)
        name = "classic (fp16 + GradScaler, NCHW, no augmentation)" if cuda else "classic (float32 on CPU)"
        guarded(report, "levers", name, batch, lambda: classic_case(args, device, batch, name, flops, peak))


def family_config(args: argparse.Namespace, family: str, device: torch.device) -> Config:
    """A family's deploy recipe for one learner on `device` in steady state (no warm-up, prototypes
    trained, the queue, if any, full and in use); shrunk for the CPU with --tiny."""
    sets = [f"train.device={device.type}", "train.learners=1", "model.sync_batchnorm=false",
            f"train.compile={'true' if args.compile_on else 'false'}", f"train.compile_mode={args.compile_mode}",
            "swav.freeze_prototypes_steps=0", "swav.queue_start_images=0", "optim.warmup_images=0"]
    if args.tiny:
        sets += TINY_RECIPE_SETS + TINY_FAMILY_SETS[family] + ["train.batch_size=8"]
    if args.family_batch:
        sets.append(f"train.batch_size={args.family_batch}")
    return load_config(DEPLOY_CONFIGS / FAMILY_RECIPES[family], sets)


def run_families(args: argparse.Namespace, device: torch.device, report: dict[str, Any],
                 peak: float | None) -> None:
    """Our learner step for each family's recipe; the ResNet-50 recipe, when measured, is the baseline."""
    for family in args.family_list:
        cfg = family_config(args, family, device)
        c = cfg.crops
        name = (f"{family}: {cfg.model.arch}, {c.global_count}x{c.global_size} + {c.local_count}x{c.local_size}, "
                f"{cfg.optimizer}")

        def case() -> list[Result]:
            flops = network_flops(cfg, device)
            learner = make_learner(cfg, device)
            crops = device_batch(cfg, cfg.train.batch_size, device)
            result = timed(ours_step(learner, crops), device, args.warmup, args.steps, cfg.train.batch_size, name,
                           flops, peak)
            report.setdefault("family_flops_per_image", {})[family] = flops
            return [result]

        release(device)
        guarded(report, "families", name, cfg.train.batch_size, case)


# ----------------------------------------------------------------------------- output

def emit(report: dict[str, Any], section: str, result: Result) -> None:
    report.setdefault(section, []).append(asdict(result))
    if result.error:
        print(f"  {result.name} (batch {result.batch}): FAILED {result.error}", flush=True)
    else:
        print(f"  {result.name} (batch {result.batch}): {result.images_per_s:.1f} images/s, "
              f"{result.step_ms:.1f} ms/step, warm-up {result.warmup_s:.1f} s", flush=True)
    write_json(report)


def write_json(report: dict[str, Any]) -> None:
    path = report["settings"].get("json_out")
    if path:
        Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]], baseline: dict[int, float], title: str) -> None:
    print(f"\n{title}")
    print(f"{'batch':>5}  {'path':<68} {'images/s':>9} {'step ms':>8} {'peak GiB':>8} {'MFU':>6} "
          f"{'vs classic':>10} {'warm-up s':>9}")
    for row in rows:
        if row["error"]:
            print(f"{row['batch']:>5}  {row['name']:<68} {row['error']}")
            continue
        comparable = row["batch"] in baseline and not row["name"].strip().startswith("augmentation")
        ratio = row["images_per_s"] / baseline[row["batch"]] if comparable else None
        mfu = None if row["mfu"] is None else 100 * row["mfu"]
        skipped = f"  ({row['nonfinite_steps']} non-finite steps)" if row["nonfinite_steps"] else ""
        print(f"{row['batch']:>5}  {row['name']:<68} {row['images_per_s']:>9.1f} {row['step_ms']:>8.1f} "
              f"{fmt(row['peak_gib'], '.1f'):>8} {fmt(mfu, '.1f') + ('%' if mfu is not None else ''):>6} "
              f"{fmt(ratio, '.2f') + ('x' if ratio is not None else ''):>10} {row['warmup_s']:>9.1f}{skipped}")


def print_families(rows: list[dict[str, Any]]) -> None:
    """Each family's figures beside the ResNet recipe's, measured in the same run."""
    baseline = next((r for r in rows if r["name"].startswith("resnet:") and not r["error"]), None)
    print("\nOurs per backbone family (each at its recipe's crops and batch)")
    print(f"{'path':<62} {'batch':>5} {'images/s':>9} {'step ms':>8} {'peak GiB':>8} {'MFU':>6} {'vs resnet':>9}")
    for row in rows:
        if row["error"]:
            print(f"{row['name']:<62} {row['batch']:>5} {row['error']}")
            continue
        ratio = row["images_per_s"] / baseline["images_per_s"] if baseline else None
        mfu = None if row["mfu"] is None else 100 * row["mfu"]
        print(f"{row['name']:<62} {row['batch']:>5} {row['images_per_s']:>9.1f} {row['step_ms']:>8.1f} "
              f"{fmt(row['peak_gib'], '.1f'):>8} {fmt(mfu, '.1f') + ('%' if mfu is not None else ''):>6} "
              f"{fmt(ratio, '.2f') + ('x' if ratio is not None else ''):>9}")


def summarise(report: dict[str, Any]) -> None:
    classic = {r["batch"]: r["images_per_s"] for section in ("results", "levers") for r in report.get(section, [])
               if r["name"].startswith("classic") and not r["error"]}
    if report.get("results"):
        print_table(report["results"], classic, "Ours (augmentation included) vs classic (no augmentation)")
        for row in report["results"]:
            if row["name"].startswith("ours") and not row["error"] and row["batch"] in classic:
                print(f"ours / classic at batch {row['batch']}: {row['images_per_s'] / classic[row['batch']]:.2f}x "
                      f"images/s (target at batch 256 on an H100: >= 2.0x)")
    if report.get("levers"):
        print_table(report["levers"], classic, f"Levers, batch {report['settings']['levers_batch']}")
    if report.get("families"):
        print_families(report["families"])
    match = report.get("loss_match")
    if match:
        losses = match["losses"]
        verdict = "OK" if match["ours_vs_classic"] < BF16_LOSS_RTOL and match["ours_vs_fp32"] < BF16_LOSS_RTOL \
            else "CHECK"
        print(f"\nLoss on the same weights, queue and augmented crops (batch {match['batch']}): "
              f"ours ({match['ours_precision']}) {losses['ours']:.6f}, classic ({match['classic_precision']}) "
              f"{losses['classic']:.6f}, float32 reference {losses['float32 reference']:.6f}")
        print(f"relative difference: ours vs classic {match['ours_vs_classic']:.2e}, ours vs float32 "
              f"{match['ours_vs_fp32']:.2e}, classic vs float32 {match['classic_vs_fp32']:.2e} "
              f"[{verdict}: bf16 tolerance {BF16_LOSS_RTOL:g}]")
    syncs = report.get("syncs_per_step")
    if syncs:
        for path, where in syncs.items():
            print(f"host syncs in one {path} step: {len(where)}" + (f" ({', '.join(where)})" if where else ""))


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu with --tiny), cpu, cuda")
    parser.add_argument("--tiny", action="store_true", help="CPU-friendly settings: resnet18 small stem, 16/8 px, "
                        "batch 8, 300 prototypes, queue 384, 1 + 2 steps")
    parser.add_argument("--arch", help=f"backbone (default {FULL['arch']}; tiny {TINY['arch']})")
    parser.add_argument("--small-stem", action=argparse.BooleanOptionalAction,
                        help="3x3 stride-1 stem without max-pool (default off; tiny on)")
    parser.add_argument("--batch-sizes", help="per-device batch sizes, comma separated, run in this order "
                        "(default 64,256; tiny 8); the loss match and sync count run at the smallest")
    parser.add_argument("--global-size", type=int, help="default 224; tiny 16")
    parser.add_argument("--local-size", type=int, help="default 96; tiny 8")
    parser.add_argument("--global-count", type=int, default=2)
    parser.add_argument("--local-count", type=int, default=6)
    parser.add_argument("--prototypes", type=int, help="default 3000; tiny 300")
    parser.add_argument("--queue", type=int, help="feature queue length, kept full (default 3840; tiny 384)")
    parser.add_argument("--steps", type=int, help="timed steps per case (default 20; tiny 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, compilation included (default 5; tiny 1)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile in ours (auto: on for CUDA)")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="train.compile_mode for ours")
    parser.add_argument("--levers", nargs="?", const="all", default="",
                        help=f"run the lever ablation instead: all, or a comma list of {', '.join(LEVERS)}")
    parser.add_argument("--levers-batch", type=int, default=0,
                        help="batch size of the ablation (default 128 on CUDA: float32 eager at 256 needs ~90 GB)")
    parser.add_argument("--families", nargs="?", const=",".join(FAMILY_RECIPES), default="",
                        help="measure our step for each backbone family's deploy recipe instead: all, or a comma "
                        f"list of {', '.join(FAMILY_RECIPES)} (with --tiny: shrunk to CPU size)")
    parser.add_argument("--family-batch", type=int, default=0,
                        help="batch size for --families (default: each recipe's own; tiny 8)")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP/s for MFU, in TFLOP/s (default: by device name)")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads on CPU (default 1: on a shared machine more threads make steps erratic)")
    parser.add_argument("--json-out", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu" and not args.tiny:
            print("no CUDA device: running the --tiny settings", flush=True)
            args.tiny = True
    profile = TINY if args.tiny else FULL
    for key, value in profile.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.batch_list = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if not args.batch_list or min(args.batch_list) < 2:
        parser.error("--batch-sizes: give batch sizes >= 2")
    args.lever_keys = set(LEVERS) if args.levers == "all" else {k.strip() for k in args.levers.split(",") if k}
    unknown = args.lever_keys - set(LEVERS)
    if unknown:
        parser.error(f"--levers: unknown {', '.join(sorted(unknown))}; choose from {', '.join(LEVERS)}")
    if not args.levers_batch:
        args.levers_batch = 128 if args.device == "cuda" else max(args.batch_list)
    args.compile_on = args.compile == "on" or (args.compile == "auto" and args.device == "cuda")
    args.family_list = list(FAMILY_RECIPES) if args.families == "all" else \
        [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(args.family_list) - set(FAMILY_RECIPES)
    if unknown:
        parser.error(f"--families: unknown {', '.join(sorted(unknown))}; choose from {', '.join(FAMILY_RECIPES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        torch.set_num_threads(args.cpu_threads)
    peak, peak_text = peak_flops(device, args.peak_tflops)
    settings = {k: v for k, v in vars(args).items() if k not in ("lever_keys", "batch_list", "family_list")}
    if args.family_list:
        report: dict[str, Any] = {"environment": environment(device), "settings": settings, "peak_flops": peak}
        print(" | ".join(f"{k} {v}" for k, v in report["environment"].items()), flush=True)
        print(f"backbone families {', '.join(args.family_list)}: compile {'on' if args.compile_on else 'off'}; "
              f"{args.warmup} warm-up + {args.steps} timed steps each; peak {peak_text}", flush=True)
        run_families(args, device, report, peak)
        summarise(report)
        write_json(report)
        return
    flops = flops_per_image(args, device)
    report = {"environment": environment(device), "settings": settings, "syncs_per_step": {},
              "flops_per_image": flops, "peak_flops": peak}
    env = report["environment"]
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    print(f"{args.arch}{' (small stem)' if args.small_stem else ''}, {args.global_count}x{args.global_size} + "
          f"{args.local_count}x{args.local_size} crops, {args.prototypes} prototypes, queue {args.queue}; "
          f"network fwd+bwd {flops / 1e9:.1f} GFLOP per image; peak {peak_text}", flush=True)
    if args.lever_keys:
        print(f"lever ablation at batch {args.levers_batch}, {args.warmup} warm-up + {args.steps} timed steps",
              flush=True)
        run_levers(args, device, report, flops, peak)
    else:
        print(f"ours: compile {'on (' + args.compile_mode + ')' if args.compile_on else 'off'}; "
              f"{args.warmup} warm-up + {args.steps} timed steps per case", flush=True)
        run_main(args, device, report, flops, peak)
    summarise(report)
    write_json(report)


if __name__ == "__main__":
    main()
