"""One typed configuration object, validated once, at the edge.

Sources, later overriding earlier: the defaults embedded here, a YAML file,
then ``--set section.key=value`` pairs from the command line. Each field
declares its constraint beside it (`setting(default, check)`); `validate`
applies them all, plus the few rules that relate several fields. Every error
names the offending key, e.g. ``optim.base_lr: must be > 0, got -1``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class UsageError(ValueError):
    """A mistake the user can fix (a configuration value, the environment, a missing resource).
    Its message is one line naming the key or resource and what to do; the command line prints
    it and exits 2."""


class ConfigError(UsageError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# ------------------------------------------------------------------------------------------ checks


@dataclass(frozen=True)
class Check:
    """A constraint on one field's value: `accepts(value)`, else the error says `message`."""

    accepts: Callable[[Any], bool]
    message: str


def _finite(v: float) -> bool:
    return math.isfinite(v)


POSITIVE = Check(lambda v: v > 0 and _finite(v), "must be > 0")
NON_NEGATIVE = Check(lambda v: v >= 0 and _finite(v), "must be >= 0")
PROBABILITY = Check(lambda v: 0.0 <= v <= 1.0, "must be a probability in [0, 1]")
NOT_EMPTY = Check(bool, "must not be empty")
SCALE = Check(lambda v: 0.0 < v[0] <= v[1] <= 1.0, "must be (min, max) with 0 < min <= max <= 1")
INCREASING_POSITIVE = Check(lambda v: 0.0 < v[0] <= v[1], "must be (min, max) with 0 < min <= max")
ALL_POSITIVE = Check(lambda v: all(x > 0 and _finite(x) for x in v), "must be finite and > 0")
ALL_FINITE = Check(lambda v: all(_finite(x) for x in v), "must be finite")
# Random seeds: what numpy's and torch's generators take.
SEED = Check(lambda v: 0 <= v < 2**32, "must be in [0, 2**32)")
TCP_PORT = Check(lambda v: 0 <= v <= 65535, "must be a TCP port in [0, 65535]")


def _balanced_braces(text: str) -> bool:
    depth = 0
    for char in text:
        depth += (char == "{") - (char == "}")
        if depth < 0:
            return False
    return depth == 0


BALANCED_BRACES = Check(_balanced_braces, "has unbalanced braces; a pattern takes {000..099} ranges or {a,b} lists")


def storage_url(text: str) -> bool:
    """A local path, file://..., or s3://<bucket>/...: what `stream_swav.storage` reads and writes."""
    if "://" not in text:
        return True
    scheme, rest = text.split("://", 1)
    bucket = rest.lstrip("/").split("/", 1)[0]
    return scheme.lower() == "file" or (scheme.lower() in ("s3", "s3a")
                                        and re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?", bucket) is not None)


STORAGE_URL_TEXT = "must be a local path, file://... or s3://<bucket>/..."
STORAGE_URL = Check(lambda v: not v or storage_url(v), STORAGE_URL_TEXT)
_ENDPOINT = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[^\s/?#:\[\]]+)(:[0-9]{1,5})?(/\S*)?")
ENDPOINT_URL = Check(lambda v: not v or _ENDPOINT.fullmatch(v) is not None,
                     "must be empty or an http(s)://host[:port] URL, such as http://minio:9000")
# botocore's own rule for a region name.
REGION = Check(lambda v: not v or re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", v) is not None,
               "must be empty or a region name such as us-east-1")


def one_of(*options: Any) -> Check:
    return Check(lambda v: v in options, f"must be one of {', '.join(str(o) for o in options)}")


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """low <= v <= high, either end open."""
    def shown(x: float) -> str:
        return f"{x:,}" if isinstance(x, int) else f"{x:g}"

    text = f"must be in {'(' if low_open else '['}{shown(low)}, {shown(high)}{')' if high_open else ']'}"
    return Check(lambda v: (low < v if low_open else low <= v) and (v < high if high_open else v <= high), text)


def setting(default: Any, check: Check | None = None) -> Any:
    """A config field with its default and the constraint its value must meet."""
    return field(default=default, metadata={"check": check} if check else {})


# ---------------------------------------------------------------------------------------- sections


RESNET_ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# torchvision's RegNets (Radosavovic et al. 2020), SEER's family.
REGNET_ARCHS = tuple(f"regnet_{kind}_{size}" for kind in ("y", "x")
                     for size in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf")
                     if (kind, size) != ("x", "128gf"))


@dataclass(frozen=True)
class ViTShape:
    """A Vision Transformer's patch size, encoder blocks, attention heads and token width; its
    position embeddings are for 224 px images and its MLPs are 4x the width, as in torchvision."""

    patch_size: int
    layers: int
    heads: int
    width: int
    image_size: int = 224


# torchvision's ViTs (Dosovitskiy et al. 2021) and ViT-S/16, DINO's workhorse (Caron et al. 2021),
# built from the same torchvision class.
VIT_SHAPES = {
    "vit_s_16": ViTShape(16, 12, 6, 384),
    "vit_b_16": ViTShape(16, 12, 12, 768),
    "vit_b_32": ViTShape(32, 12, 12, 768),
    "vit_l_16": ViTShape(16, 24, 16, 1024),
    "vit_l_32": ViTShape(32, 24, 16, 1024),
    "vit_h_14": ViTShape(14, 32, 16, 1280),
}
ARCHS = RESNET_ARCHS + REGNET_ARCHS + tuple(VIT_SHAPES)
OPTIMIZERS = ("auto", "lars", "sgd", "adamw")
# What `optim.optimizer: auto` picks: LARS for convolutional nets (SwAV, SEER), AdamW for ViTs (DINO).
FAMILY_OPTIMIZER = {"resnet": "lars", "regnet": "lars", "vit": "adamw"}
# Defaults of the optim keys a configuration leaves unset when the optimiser is AdamW: DINO's
# ViT-S/16 recipe (lr 5e-4 per 256 images to 1e-6, weight decay 0.04 to 0.4 on a cosine) with
# DINOv2's gradient clipping at norm 3. The other defaults in OptimConfig are SwAV's LARS recipe.
ADAMW_DEFAULTS: dict[str, Any] = {"optim": {
    "base_lr": 5e-4, "final_lr": 1e-6, "weight_decay": 0.04, "weight_decay_end": 0.4,
    "weight_decay_schedule": "cosine", "clip_grad_norm": 3.0}}


def arch_family(arch: str) -> str:
    """resnet, regnet or vit."""
    if arch in VIT_SHAPES:
        return "vit"
    return "regnet" if arch.startswith("regnet_") else "resnet"


def vit_shape(backbone: Any) -> ViTShape:
    """The ViT shape of a model section or backbone spec: its arch's, with each vit_* key and width
    that is not 0 in its place."""
    shape = VIT_SHAPES[backbone.arch]
    return ViTShape(backbone.vit_patch_size or shape.patch_size, backbone.vit_layers or shape.layers,
                    backbone.vit_heads or shape.heads, backbone.width or shape.width,
                    backbone.vit_image_size or shape.image_size)


VIT_KEYS = ("vit_patch_size", "vit_layers", "vit_heads", "vit_image_size")


def backbone_rules(backbone: Any) -> Iterator[Rule]:
    """The rules a backbone's fields (a model section or a BackboneSpec) must meet together."""
    family = arch_family(backbone.arch)
    yield ("model.small_stem", family != "vit" or not backbone.small_stem,
           "applies to ResNets and RegNets; a ViT's stem is its patch size (model.vit_patch_size)",
           backbone.small_stem)
    yield ("model.stem_stride", backbone.stem_stride == 1 or (backbone.small_stem and family == "resnet"),
           "can be 2 only with model.small_stem: true on a ResNet", backbone.stem_stride)
    yield ("model.feature_grid", backbone.feature_grid == 1 or family == "resnet",
           "applies to ResNets only; leave it at 1", backbone.feature_grid)
    yield ("model.width", family != "regnet" or backbone.width == 0,
           "RegNets keep torchvision's widths; leave it at 0", backbone.width)
    for key in VIT_KEYS:
        value = getattr(backbone, key)
        yield (f"model.{key}", family == "vit" or value == 0,
               f"applies to ViTs only (model.arch is {backbone.arch}); leave it at 0", value)
    if family == "vit":
        shape = vit_shape(backbone)
        yield ("model.width", shape.width % shape.heads == 0,
               f"a ViT's width must be a multiple of its heads ({shape.heads})", shape.width)
        yield ("model.vit_image_size", shape.image_size % shape.patch_size == 0,
               f"must be a multiple of the patch size ({shape.patch_size})", shape.image_size)


CODES = ("sinkhorn", "prior", "relaxed")
SCHEDULES = ("warmup-constant", "warmup-cosine")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# A cross-field rule: (key, holds, message, value).
Rule = tuple[str, bool, str, Any]


@dataclass
class StorageConfig:
    """fsspec options shared by shard reading and checkpoint writing.

    Anything left empty falls back to the standard environment (AWS_*,
    FSSPEC_S3_ENDPOINT_URL, AWS_ENDPOINT_URL), so MinIO, Ceph or R2 work.
    """

    endpoint_url: str = setting("", ENDPOINT_URL)
    region: str = setting("", REGION)
    anon: bool = False
    retries: int = setting(5, NON_NEGATIVE)
    retry_backoff_s: float = setting(0.5, NON_NEGATIVE)
    connect_timeout_s: float = setting(10.0, POSITIVE)
    read_timeout_s: float = setting(60.0, POSITIVE)


@dataclass
class DataConfig:
    # Brace pattern, folder/prefix to list, or a .txt file of URLs (local, file:// or s3://).
    shards: str = setting("", BALANCED_BRACES)
    follow: bool = False
    relist_interval_s: float = setting(30.0, POSITIVE)
    seed: int = setting(0, SEED)
    shuffle_buffer: int = setting(512, within(1, 1 << 24))
    # ... and at most this many encoded bytes per open shard (512 large photographs would be GBs).
    shuffle_buffer_bytes: int = setting(256 * 1024 * 1024, POSITIVE)
    open_shards_per_actor: int = setting(2, POSITIVE)
    # 0 means: every CPU the cluster offers minus what the learners reserve.
    decode_actors: int = setting(0, NON_NEGATIVE)
    inflight_batches_per_actor: int = setting(2, POSITIVE)
    max_pixels: int = setting(40_000_000, POSITIVE)
    min_side: int = setting(8, POSITIVE)
    max_sample_bytes: int = setting(32 * 1024 * 1024, POSITIVE)
    # At most this much archive is read from one shard, and of a gzipped shard at most max_expansion
    # times its compressed size: the rest of a shard past either is skipped, counted as
    # shard-bytes-limit (a compression bomb would cost a decoder hours per pass). 0: no limit.
    max_shard_bytes: int = setting(64 * 1024**3, NON_NEGATIVE)
    max_expansion: float = setting(50.0, NON_NEGATIVE)
    shard_read_retries: int = setting(4, NON_NEGATIVE)
    shard_retry_backoff_s: float = setting(1.0, NON_NEGATIVE)

    def rules(self) -> Iterator[Rule]:
        yield ("data.shards", storage_url(self.shards), STORAGE_URL_TEXT, self.shards)


@dataclass
class CropsConfig:
    global_size: int = setting(224, POSITIVE)
    global_count: int = setting(2, NON_NEGATIVE)
    global_scale: tuple[float, float] = setting((0.14, 1.0), SCALE)
    local_size: int = setting(96, POSITIVE)
    local_count: int = setting(6, NON_NEGATIVE)
    local_scale: tuple[float, float] = setting((0.05, 0.14), SCALE)
    hflip_prob: float = setting(0.5, PROBABILITY)
    # JPEG draft decoding keeps the shorter side at least this long (0: the side from which the
    # smallest crop of each kind in use is cut without upsampling, 599 px at these defaults; the
    # largest crop's size, 224, decodes large photographs ~1.4x faster and upsamples small crops).
    decode_side: int = setting(0, NON_NEGATIVE)

    def rules(self) -> Iterator[Rule]:
        yield ("crops.global_count", self.global_count + self.local_count >= 2,
               "global_count + local_count must be >= 2", self.global_count)


@dataclass
class AugmentConfig:
    color_jitter_prob: float = setting(0.8, PROBABILITY)
    brightness: float = setting(0.8, NON_NEGATIVE)
    contrast: float = setting(0.8, NON_NEGATIVE)
    saturation: float = setting(0.8, NON_NEGATIVE)
    hue: float = setting(0.2, within(0.0, 0.5))
    grayscale_prob: float = setting(0.2, PROBABILITY)
    blur_prob_global: float = setting(0.5, PROBABILITY)
    blur_prob_local: float = setting(0.0, PROBABILITY)
    blur_sigma: tuple[float, float] = setting((0.1, 2.0), INCREASING_POSITIVE)
    mean: tuple[float, float, float] = setting((0.485, 0.456, 0.406), ALL_FINITE)
    std: tuple[float, float, float] = setting((0.228, 0.224, 0.225), ALL_POSITIVE)


@dataclass
class ModelConfig:
    # A ResNet (resnet10..resnet152), a RegNet (regnet_y_*, regnet_x_*) or a ViT (vit_s_16, vit_b_16,
    # vit_b_32, vit_l_16, vit_l_32, vit_h_14).
    arch: str = setting("resnet50", one_of(*ARCHS))
    # ResNet: CIFAR-style stem (3x3 conv, stride 1, no max-pool); RegNet: stride-1 stem. For 28-64 px images.
    small_stem: bool = False
    # 2 halves a ResNet's small stem's output resolution: 4x cheaper, for CPU runs.
    stem_stride: int = setting(1, one_of(1, 2))
    # ResNet: the last stage's map is average-pooled to a feature_grid x feature_grid grid and
    # flattened (1: global pooling, torchvision's). A grid keeps the coarse layout that pixels of
    # small, centred images carry (docs/quality.md).
    feature_grid: int = setting(1, within(1, 32))
    # ResNet: channels of the first stage (torchvision: 64), doubled at each later one. ViT: token
    # width (heads x head size). 0: the architecture's own. RegNets keep theirs.
    width: int = setting(0, NON_NEGATIVE)
    # ViT only, 0: the architecture's own. Small values make CPU-sized ViTs of the same class.
    vit_patch_size: int = setting(0, NON_NEGATIVE)
    vit_layers: int = setting(0, NON_NEGATIVE)
    vit_heads: int = setting(0, NON_NEGATIVE)
    # Resolution of the position embeddings the ViT keeps as weights; other crop sizes interpolate them.
    vit_image_size: int = setting(0, NON_NEGATIVE)
    hidden_dim: int = setting(2048, POSITIVE)
    output_dim: int = setting(128, POSITIVE)
    prototypes: int = setting(3000, POSITIVE)
    # Only for nets with BatchNorm (ResNets, RegNets); a ViT and its head have none.
    sync_batchnorm: bool = False

    @property
    def family(self) -> str:
        return arch_family(self.arch)

    def rules(self) -> Iterator[Rule]:
        yield from backbone_rules(self)
        yield ("model.sync_batchnorm", self.family != "vit" or not self.sync_batchnorm,
               "a ViT has no BatchNorm to synchronise; set it to false", self.sync_batchnorm)

    def advice(self) -> Iterator[str]:
        if self.prototypes < self.output_dim:
            yield (f"model.prototypes: {self.prototypes} prototypes span fewer directions than model.output_dim="
                   f"{self.output_dim}; embeddings can settle where no prototype scores them (loss stuck at ln(K), "
                   f"alarm: stream_swav_prototype_score_spread); use at least as many prototypes as dimensions")


@dataclass
class SwAVConfig:
    temperature: float = setting(0.1, POSITIVE)
    # How batches are assigned to prototypes (stream_swav/codes.py): sinkhorn (SwAV's equal
    # partition), prior (Sinkhorn towards a power-law marginal), relaxed (unbalanced Sinkhorn
    # towards a running mass estimate, each prototype >= gamma/K).
    codes: str = setting("sinkhorn", one_of(*CODES))
    epsilon: float = setting(0.05, POSITIVE)
    # Also the iteration count of `prior` and `relaxed`.
    sinkhorn_iterations: int = setting(3, POSITIVE)
    crops_for_assign: tuple[int, ...] = (0, 1)
    # Queue length per learner; 0 disables it.
    queue_length: int = setting(0, NON_NEGATIVE)
    # SwAV starts its queue after 15 ImageNet epochs; counted here in images.
    queue_start_images: int = setting(15 * 1_281_167, NON_NEGATIVE)
    freeze_prototypes_steps: int = setting(313, NON_NEGATIVE)
    # `relaxed`: KL strength on the prototype marginal, annealed from
    # relaxed_lambda_start to relaxed_lambda over relaxed_anneal_images.
    relaxed_lambda: float = setting(1.0, POSITIVE)
    relaxed_lambda_start: float = setting(100.0, POSITIVE)
    relaxed_anneal_images: int = setting(1_000_000, NON_NEGATIVE)
    # `prior`: prototype k's share of each batch is proportional to (k + 1) ** -prior_exponent.
    prior_exponent: float = setting(0.25, NON_NEGATIVE)
    # `relaxed`: no prototype gets less than gamma/K of the mass.
    mass_floor_gamma: float = setting(0.2, within(0.0, 1.0))
    # `relaxed`: momentum of the running prototype mass estimate.
    mass_momentum: float = setting(0.99, within(0.0, 1.0, high_open=True))


@dataclass
class OptimConfig:
    # auto: LARS for ResNets and RegNets, AdamW for ViTs. With AdamW, the keys below that the
    # configuration leaves unset take ADAMW_DEFAULTS (DINO's recipe) instead of SwAV's.
    optimizer: str = setting("auto", one_of(*OPTIMIZERS))
    # Learning rate for a global batch of 256; scaled linearly with the batch.
    base_lr: float = setting(0.6, POSITIVE)
    final_lr: float = setting(0.0006, NON_NEGATIVE)
    # LARS and SGD only.
    momentum: float = setting(0.9, within(0.0, 1.0, high_open=True))
    weight_decay: float = setting(1e-6, NON_NEGATIVE)
    # constant (weight_decay throughout) or cosine (weight_decay to weight_decay_end over cosine_images).
    weight_decay_schedule: str = setting("constant", one_of("constant", "cosine"))
    weight_decay_end: float = setting(0.4, NON_NEGATIVE)
    trust_coefficient: float = setting(0.001, POSITIVE)
    # Gradients are rescaled to at most this global norm before each step; 0 leaves them alone.
    clip_grad_norm: float = setting(0.0, NON_NEGATIVE)
    # warmup-constant (endless streams) or warmup-cosine (to final_lr over cosine_images).
    schedule: str = setting("warmup-constant", one_of(*SCHEDULES))
    warmup_images: int = setting(10 * 1_281_167, NON_NEGATIVE)
    cosine_images: int = setting(400 * 1_281_167, POSITIVE)
    # > 0: checkpoints export (backbone.pt) an exponential moving average of the backbone's weights and
    # BatchNorm statistics with this momentum per step, instead of the trained weights; 0: off.
    ema_momentum: float = setting(0.0, within(0.0, 1.0, high_open=True))

    def rules(self) -> Iterator[Rule]:
        yield ("optim.cosine_images", self.schedule != "warmup-cosine" or self.cosine_images > self.warmup_images,
               "must be > optim.warmup_images for warmup-cosine", self.cosine_images)
        yield ("optim.final_lr", self.schedule != "warmup-cosine" or self.final_lr <= self.base_lr,
               "must be <= optim.base_lr for warmup-cosine", self.final_lr)


@dataclass
class TrainConfig:
    batch_size: int = setting(64, within(1, 1 << 20))
    # The learners wanted (the most the run trains with).
    learners: int = setting(1, POSITIVE)
    # The fewest the run trains with; 0: train.learners (a fixed size). Below train.learners the
    # group is elastic: it starts once min_learners are placed, grows towards train.learners as room
    # appears, and shrinks on a learner's loss without going back to a checkpoint.
    min_learners: int = setting(0, NON_NEGATIVE)
    # After a failed join, how long an elastic group waits before starting learners again (joiners
    # are otherwise started at once and placed by Ray whenever the cluster has room); also how long
    # after a failed try decode actors dropped for want of room are tried again.
    resize_interval_s: float = setting(30.0, POSITIVE)
    # The longest a learner waits in one collective (torch.distributed's timeout): how long survivors
    # can be held by a peer that hangs without dying (a dead peer's gloo connection fails at once).
    collective_timeout_s: float = setting(600.0, POSITIVE)
    # auto: cuda when the learner got a GPU, else cpu.
    device: str = setting("auto", one_of("auto", "cpu", "cuda"))
    # auto: bf16 autocast on CUDA, float32 on CPU.
    precision: str = setting("auto", one_of("auto", "fp32", "bf16"))
    channels_last: bool = True
    # torch.compile the network and the photometric augmentation. Meant for CUDA learners: the
    # first steps take minutes to compile, and every new batch size compiles again.
    compile: bool = False
    # torch.compile mode; reduce-overhead and max-autotune also replay the network as CUDA graphs.
    compile_mode: str = setting("default", one_of(*COMPILE_MODES))
    image_budget: int = setting(0, NON_NEGATIVE)
    time_budget_s: float = setting(0.0, NON_NEGATIVE)
    max_nonfinite_in_row: int = setting(20, POSITIVE)
    log_interval_s: float = setting(5.0, POSITIVE)
    progress_bar: bool = True
    seed: int = setting(0, SEED)
    gpus_per_learner: float = setting(1.0, NON_NEGATIVE)
    cpus_per_learner: float = setting(1.0, NON_NEGATIVE)
    # Intra-op threads of a learner that trains on the CPU; 0: cpus_per_learner rounded up. Ray
    # pins every worker to one thread, so without this a CPU learner uses a single core whatever
    # it reserved; more threads than reserved CPUs are allowed when decoders are light.
    cpu_threads: int = setting(0, NON_NEGATIVE)
    # Learner failures (a dead process, a lost node) the run recovers from, by restarting the learners
    # from the latest checkpoint or, in an elastic group, by going on without the lost ones; counted
    # over the whole run, as Ray Train's FailureConfig.max_failures: -1 unlimited, 0 none.
    max_failures: int = setting(3, within(-1, math.inf))
    # How long to wait for the cluster to place the learners (at start and after a failure) and the
    # decode actors before giving up with a message naming what is missing.
    startup_timeout_s: float = setting(300.0, POSITIVE)
    # Learners train this long (at most) per call and then report to the driver: the driver's work
    # grows with learners / report_interval_s, not with the step rate.
    report_interval_s: float = setting(2.0, POSITIVE)
    # A run that trains no step for this long logs a warning, again each such period, naming what
    # the learners wait for (a step needs a batch on every learner); 0: never.
    stall_warning_s: float = setting(300.0, NON_NEGATIVE)

    @property
    def fewest_learners(self) -> int:
        """The smallest group the run trains with: min_learners, or learners when it is 0."""
        return self.min_learners or self.learners

    @property
    def elastic(self) -> bool:
        """Whether the group may train below train.learners (shrink on a loss, grow back)."""
        return self.fewest_learners < self.learners

    def rules(self) -> Iterator[Rule]:
        yield ("train.batch_size", self.batch_size >= 2 or self.fewest_learners > 1, "must be >= 2 for Sinkhorn",
               self.batch_size)
        yield ("train.min_learners", self.min_learners <= self.learners,
               "must be <= train.learners (0: equal to it)", self.min_learners)


@dataclass
class CheckpointConfig:
    dir: str = setting("runs/checkpoints", Check(lambda v: bool(v) and storage_url(v), STORAGE_URL_TEXT))
    every_steps: int = setting(1000, NON_NEGATIVE)
    every_seconds: float = setting(600.0, NON_NEGATIVE)
    keep_last: int = setting(3, POSITIVE)
    milestone_every: int = setting(10, NON_NEGATIVE)
    # One run at a time per dir: a lease renewed every lease_s / 4 (runtime/lease.py); a run that
    # is gone without giving it up holds it this long for runs on other machines. 0: no lease.
    lease_s: float = setting(60.0, Check(lambda v: v == 0 or 10 <= v <= 86_400,
                                         "must be 0 (no lease) or in [10, 86400]"))

    @property
    def milestone_steps(self) -> int:
        """Milestone interval in steps; 0 (no milestones) when either factor is 0."""
        return self.every_steps * self.milestone_every


@dataclass
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = setting(9400, TCP_PORT)
    perplexity_window_steps: int = setting(50, POSITIVE)
    # The collapse alarm fires after collapse_after_images when the feature spread (see
    # learner.feature_spread) is below collapse_spread, the score spread (learner.score_spread)
    # below collapse_score_spread, or the argmax prototype usage perplexity over the window below
    # collapse_perplexity (0: max(2, K/50)).
    collapse_spread: float = setting(0.05, NON_NEGATIVE)
    collapse_score_spread: float = setting(0.02, NON_NEGATIVE)
    collapse_perplexity: float = setting(0.0, NON_NEGATIVE)
    collapse_after_images: int = setting(0, NON_NEGATIVE)  # 0: after warmup


@dataclass
class CurationConfig:
    # Drop repeats: each decode actor hashes every image it decodes (64-bit DCT perceptual hash)
    # and drops an image whose hash (or one within dedup_max_distance bits) was already admitted
    # more than max_repeats times in the current pass. Measured in docs/curation.md.
    dedup: bool = False
    max_repeats: int = setting(0, NON_NEGATIVE)
    # 0 matches only equal hashes; looser matching also drops distinct images that look alike, and
    # past 4 bits the lookup compares more hashes per image than decoding it costs.
    dedup_max_distance: int = setting(0, within(0, 4))
    # Hashes each decode actor remembers, the oldest forgotten first (~140–220 bytes each at distance 0).
    seen_capacity: int = setting(1_000_000, POSITIVE)
    # Concept balance (stream_swav.balance): images of what the stream over-represents weigh less in
    # the loss and the codes, by how over-represented they look ** -balance; 0 is off. balance_signal says how it
    # looks: "prototypes", the running usage of the image's preferred prototype (1 aims at uniform
    # usage); "density", the image's kernel density among the last balance_bank images' projected
    # features (bandwidth balance_bandwidth), which compresses the imbalance, so 1.5-2 is needed;
    # "label", the running share of the class in the sample's `cls` member (below balance_classes;
    # unlabelled samples weigh 1); "reference", the running share of the stream whose nearest image
    # of a curated reference is the image's own nearest (balance_reference: shards of images drawn
    # balanced over the concepts wanted, as DINOv2 retrieves around curated sets), embedded by the
    # model as it trains.
    balance: float = setting(0.0, within(0.0, 2.0))
    balance_signal: str = setting("prototypes", one_of("prototypes", "density", "label", "reference"))
    # Momentum of each learner's running estimate of prototype, class or reference-anchor usage (per step).
    balance_momentum: float = setting(0.99, within(0.0, 1.0, high_open=True))
    # Bounded: each learner folds an estimate of this many shares every step (ImageNet-21k has 21,841).
    balance_classes: int = setting(1000, within(1, 1_000_000))
    # The density's kernel bandwidth on cosine similarity and its sample ("density").
    balance_bandwidth: float = setting(0.2, POSITIVE)
    # Bounded: every step compares each image with the whole bank (64 MB at 131,072 x 128).
    balance_bank: int = setting(4096, within(1, 131_072))
    # "reference": its shards (folder, s3:// prefix, brace pattern or .txt list), how many of their
    # images are read (each one anchor), how often (steps) the learner embeds them again, and the
    # cosine similarity of projected features under which a stream image is near no anchor (not
    # placed: weighs 1, shown once; -1 places every image). The images stay on the learner's device
    # (1,000 at 224 px: 150 MB), hence the bound.
    balance_reference: str = setting("", STORAGE_URL)
    balance_reference_images: int = setting(1000, within(1, 10_000))
    balance_reference_refresh: int = setting(100, POSITIVE)
    balance_reference_similarity: float = setting(-1.0, within(-1.0, 1.0))
    # How the balance acts: "weigh" scales each image's loss and share of the codes; "resample" shows
    # under-represented images again instead, with fresh crops from their decode actor, each trained
    # about (its weight / the batch's 10th-percentile weight) times, at most resample_max_shows
    # (docs/curation.md: on the benchmark, resampling by the labels recovers what weighing does not).
    balance_mode: str = setting("weigh", one_of("weigh", "resample"))
    resample_max_shows: int = setting(10, within(1, 100))
    # At most this share of each batch is replays (the rest is read from the stream), so the stream
    # keeps moving whatever the signal asks for; requests beyond what fits wait, then are dropped.
    resample_share: float = setting(0.75, within(0.0, 1.0, low_open=True, high_open=True))
    # Decoded images each decode actor keeps for replays: its latest emitted ones, and those waiting
    # to be shown again (each bound separately). A request for an image already forgotten is missed.
    resample_cache: int = setting(1024, POSITIVE)
    # The weight quantile of a batch's placed images that is shown once (resample mode), and the
    # fewest shows an image read may get on average. Below 1 (skipping), images more
    # over-represented than the quantile are skipped that often (not trained: dropped before the
    # training forward, counted as reason "balance", consumed in the cursor), and so is what the
    # signal cannot place (as DINOv2 keeps only what retrieval finds near curated data). Needs a
    # signal known before the forward: label or reference.
    resample_quantile: float = setting(0.1, within(0.0, 1.0, low_open=True, high_open=True))
    resample_min_shows: float = setting(1.0, within(0.0, 1.0, low_open=True))

    @property
    def resampling(self) -> bool:
        """Whether images are resampled (validation refuses resample mode without a balance)."""
        return self.balance_mode == "resample" and self.balance > 0

    @property
    def skipping(self) -> bool:
        """Whether resampling may skip images read (show them 0 times), before the training forward."""
        return self.resampling and self.resample_min_shows < 1.0

    def replay_slots(self, batch_size: int) -> int:
        """The rows of a batch of `batch_size` that replays may take: resample_share of it, rounded down."""
        return int(self.resample_share * batch_size)

    def replays_beside(self, fresh_rows: int) -> int:
        """The most replays a batch with `fresh_rows` images read may hold and keep them within
        resample_share of it (a batch cut short by the end of its shards; none beside no fresh row)."""
        return int(self.resample_share / (1.0 - self.resample_share) * fresh_rows)

    def replay_budget(self, batch_size: int) -> float:
        """The most shows per image read that batches of `batch_size` can give on average, their
        replay slots full: batch_size / (batch_size - replay slots)."""
        return batch_size / (batch_size - self.replay_slots(batch_size))

    def advice(self) -> Iterator[str]:
        if not self.dedup:
            defaults = CurationConfig()
            for key in ("max_repeats", "dedup_max_distance", "seen_capacity"):
                if getattr(self, key) != getattr(defaults, key):
                    yield f"curation.{key}: set to {getattr(self, key)}, but curation.dedup is off, so it does nothing"

    def rules(self) -> Iterator[Rule]:
        yield ("curation.balance_mode", self.balance_mode != "resample" or self.balance > 0,
               "resample needs a signal to resample by: set curation.balance > 0 (1 aims at balanced)",
               self.balance_mode)
        yield ("curation.balance_reference",
               self.balance == 0 or self.balance_signal != "reference" or bool(self.balance_reference),
               "the reference signal needs the shards of a curated reference set (images drawn balanced "
               "over the concepts wanted)", self.balance_reference)
        yield ("curation.resample_min_shows",
               self.resample_min_shows == 1.0 or (self.resampling and self.balance_signal in ("label", "reference")),
               "skipping (below 1) decides before the training forward, so it needs balance_mode resample "
               "with balance_signal label or reference; set it to 1 otherwise", self.resample_min_shows)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)

    @property
    def total_crops(self) -> int:
        return self.crops.global_count + self.crops.local_count

    @property
    def global_batch(self) -> int:
        """Images in one step over all learners."""
        return self.train.batch_size * self.train.learners

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @property
    def optimizer(self) -> str:
        """The optimiser the run uses: optim.optimizer, with auto resolved from the architecture."""
        chosen = self.optim.optimizer
        return FAMILY_OPTIMIZER[self.model.family] if chosen == "auto" else chosen

    def rules(self) -> Iterator[Rule]:
        if self.model.family == "vit":
            patch = vit_shape(self.model).patch_size
            for key, size, count in (("crops.global_size", self.crops.global_size, self.crops.global_count),
                                     ("crops.local_size", self.crops.local_size, self.crops.local_count)):
                yield (key, not count or size % patch == 0,
                       f"a ViT's crops must be a multiple of its patch size ({patch})", size)
        curation = self.curation
        yield ("curation.balance_signal",
               curation.balance == 0 or curation.balance_signal != "reference" or self.crops.global_count >= 1,
               "the reference signal places each image by its first global crop: set crops.global_count >= 1",
               curation.balance_signal)
        if curation.resampling:
            # A replay request reaches the decode actor a step late, behind the requests in flight.
            held = (self.data.inflight_batches_per_actor + 2) * self.train.batch_size
            yield ("curation.resample_cache", curation.resample_cache >= held,
                   f"must hold the images emitted while a replay request comes back, "
                   f"(data.inflight_batches_per_actor + 2) x train.batch_size = {held}", curation.resample_cache)
            yield ("curation.resample_share", curation.replay_slots(self.train.batch_size) >= 1,
                   f"leaves no room for a replay in a batch of train.batch_size={self.train.batch_size}",
                   curation.resample_share)
        assign = self.swav.crops_for_assign
        yield ("swav.crops_for_assign", len(assign) >= 1 and len(set(assign)) == len(assign)
               and all(0 <= i < self.total_crops for i in assign),
               f"must be distinct crop indices in [0, {self.total_crops})", assign)

    def advice(self) -> Iterator[str]:
        if self.optimizer == "adamw" and self.optim.base_lr > 0.01:
            yield (f"optim.base_lr: {self.optim.base_lr} is a LARS rate; AdamW diverges there (DINO trains ViTs "
                   f"at 5e-4 per 256 images, the AdamW default when the key is unset)")

    def warnings(self) -> list[str]:
        """Valid but risky settings, one line each naming the key (logged when a run starts)."""
        parts = [getattr(self, s.name) for s in dataclasses.fields(self)] + [self]
        return [line for part in parts for line in getattr(part, "advice", lambda: ())()]

    def validate(self) -> "Config":
        """Every field's check, then the rules relating fields; raises ConfigError naming the key."""
        for section in dataclasses.fields(self):
            part = getattr(self, section.name)
            for f in dataclasses.fields(part):
                check = f.metadata.get("check")
                value = getattr(part, f.name)
                if check is not None and not check.accepts(value):
                    raise ConfigError(f"{section.name}.{f.name}: {check.message}, got {value!r}")
        for part in [getattr(self, s.name) for s in dataclasses.fields(self)] + [self]:
            for key, holds, message, value in getattr(part, "rules", lambda: ())():
                if not holds:
                    raise ConfigError(f"{key}: {message}, got {value!r}")
        return self


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def changed_settings(saved: Any, cfg: Config, sections: tuple[str, ...] | None = None) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, value now) for each setting of `cfg` (of these `sections`, default
    all) that differs from `saved`, a configuration as `to_dict()` wrote it into a checkpoint's
    record. Settings `saved` lacks (written by older code) or that are not settings there are left
    out: only a value both sides have can be said to have changed."""
    if not isinstance(saved, dict):
        return []
    changes = []
    for section, values in cfg.to_dict().items():
        old_values = saved.get(section)
        if (sections is not None and section not in sections) or not isinstance(old_values, dict):
            continue
        for key, value in values.items():
            if key in old_values and old_values[key] != value:
                changes.append((f"{section}.{key}", old_values[key], value))
    return changes


# ---------------------------------------------------------------------------------------- parsing

_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _as_int(value: Any) -> int | None:
    """int, or an integral float or numeric text ("1e6" from the command line)."""
    if isinstance(value, str):
        try:
            value = float(value) if not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value) if isinstance(value, (int, float, str)) else None
    except ValueError:
        return None


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    return None


def _as_str(value: Any) -> str | None:
    """Text only: YAML reads `dir: 0755` as the number 493 and `shards: 1_000` as 1000, which as
    text would name another folder without a word. (--set keeps the text as typed: OverrideText.)"""
    if value is None:
        return ""
    return value if isinstance(value, str) else None


_SCALARS: dict[type, tuple[Callable[[Any], Any], str]] = {
    int: (_as_int, "an integer"), float: (_as_float, "a number"), bool: (_as_bool, "true/false"),
    str: (_as_str, "a string (in YAML, quote one that reads as a number: '0755')")}


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Turn a YAML/CLI value into the annotated type, or raise naming the key."""
    if annotation in _SCALARS:
        convert, expected = _SCALARS[annotation]
        converted = convert(value)
        if converted is None:
            raise ConfigError(f"{key}: expected {expected}, got {value!r}")
        return converted
    # tuple[X, ...] or tuple[X, Y, ...]: a list, or bare comma-separated text from --set.
    args = typing.get_args(annotation)
    if isinstance(value, str):
        value = [v for v in value.strip("[]() ").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
    return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))


@dataclasses.dataclass(frozen=True)
class OverrideText:
    """A --set value as typed and as YAML reads it: string keys take the text as typed, so
    `metrics.host=010` stays "010" and `checkpoint.dir=no` stays "no"."""

    text: str
    parsed: Any

    def __repr__(self) -> str:  # error messages show the value as typed
        return repr(self.text)


def _apply(obj: Any, prefix: str, values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
        current = getattr(obj, name)
        if isinstance(value, OverrideText):
            value = value.text if hints[name] is str else value.parsed
        if dataclasses.is_dataclass(current):
            if value is None:  # a section whose keys are all commented out
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            _apply(current, f"{key}.", value)
        else:
            setattr(obj, name, _coerce(key, hints[name], value))


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: _nest(rest, value) if rest else value}


def merge_dicts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Nested configuration dicts, b's values winning; the result shares nothing with its inputs."""
    out = {}
    for k in {**a, **b}:  # a's keys in order, then b's new ones
        if k not in b:
            out[k] = copy.deepcopy(a[k])
        elif isinstance(b[k], dict) and isinstance(a.get(k), dict):
            out[k] = merge_dicts(a[k], b[k])
        else:
            out[k] = copy.deepcopy(b[k])
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["optim.base_lr=0.3", "crops.global_scale=[0.2,1]"]`` -> nested dict."""
    merged: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"--set {pair!r}: expected section.key=value")
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            # Not YAML (a brace pattern like {000..009}.tar, an unclosed list): the text itself.
            parsed = raw
        merged = merge_dicts(merged, _nest(key.strip(), OverrideText(raw, parsed)))
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Defaults <- base dict <- YAML file <- --set overrides, then validated."""
    cfg = Config()
    layers: list[dict[str, Any]] = []
    if base:
        layers.append(base)
    if path:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the config file ({error.strerror or error})") from error
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text; a config file is YAML in UTF-8") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.MarkedYAMLError as error:
            where = f" at line {error.problem_mark.line + 1}, column {error.problem_mark.column + 1}" \
                if error.problem_mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {error.problem or error.context}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deep to be a configuration") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        layers.append(loaded)
    if overrides:
        layers.append(parse_overrides(overrides))
    return _build(layers)


def config_from_dict(values: dict[str, Any]) -> Config:
    return _build([values])


def _build(layers: list[dict[str, Any]]) -> Config:
    """Defaults <- layers, validated; the defaults are AdamW's where the layers choose AdamW."""
    cfg = Config()
    for layer in layers:
        _apply(cfg, "", layer)
    if cfg.optimizer == "adamw":
        cfg = Config()
        for layer in [ADAMW_DEFAULTS, *layers]:
            _apply(cfg, "", layer)
    return cfg.validate()


def scaled_learning_rate(cfg: Config, lr: float, global_batch: int | None = None) -> float:
    """Linear scaling rule: rates in the config are for a global batch of 256; the batch is
    cfg.global_batch unless an elastic group trains with fewer learners now."""
    return lr * (global_batch or cfg.global_batch) / 256.0


__all__ = ["Config", "ConfigError", "UsageError", "load_config", "config_from_dict", "parse_overrides", "merge_dicts",
           "changed_settings",
           "scaled_learning_rate", "StorageConfig", "DataConfig", "CropsConfig", "AugmentConfig", "ModelConfig",
           "SwAVConfig", "OptimConfig", "TrainConfig", "CheckpointConfig", "MetricsConfig", "CurationConfig", "ARCHS",
           "CODES", "RESNET_ARCHS", "REGNET_ARCHS", "VIT_SHAPES", "ViTShape", "arch_family", "vit_shape",
           "backbone_rules", "COMPILE_MODES", "SCHEDULES"]
