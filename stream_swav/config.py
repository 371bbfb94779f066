"""One typed configuration object, validated at start-up.

Sources, later overriding earlier: the defaults embedded here, a YAML file,
then ``--set section.key=value`` pairs from the command line. Every error
names the offending key, e.g. ``optim.base_lr: must be > 0, got -1``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclass
class StorageConfig:
    """fsspec options shared by shard reading and checkpoint writing.

    Anything left empty falls back to the standard environment (AWS_*,
    FSSPEC_S3_ENDPOINT_URL, AWS_ENDPOINT_URL), so MinIO, Ceph or R2 work.
    """

    endpoint_url: str = ""
    region: str = ""
    anon: bool = False
    retries: int = 5
    retry_backoff_s: float = 0.5
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


@dataclass
class DataConfig:
    # Brace pattern, folder/prefix to list, or a .txt file of URLs (local, file:// or s3://).
    shards: str = ""
    follow: bool = False
    relist_interval_s: float = 30.0
    seed: int = 0
    shuffle_buffer: int = 512
    open_shards_per_actor: int = 2
    # 0 means: every CPU the cluster offers minus what the learners reserve.
    decode_actors: int = 0
    inflight_batches_per_actor: int = 2
    max_pixels: int = 40_000_000
    min_side: int = 8
    max_sample_bytes: int = 32 * 1024 * 1024
    shard_read_retries: int = 4
    shard_retry_backoff_s: float = 1.0


@dataclass
class CropsConfig:
    global_size: int = 224
    global_count: int = 2
    global_scale: tuple[float, float] = (0.14, 1.0)
    local_size: int = 96
    local_count: int = 6
    local_scale: tuple[float, float] = (0.05, 0.14)
    hflip_prob: float = 0.5


@dataclass
class AugmentConfig:
    color_jitter_prob: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    grayscale_prob: float = 0.2
    blur_prob_global: float = 0.5
    blur_prob_local: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.228, 0.224, 0.225)


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    # CIFAR-style stem (3x3 conv, stride 1, no max-pool) for 28-64 px images.
    small_stem: bool = False
    # 2 halves the small stem's output resolution: 4x cheaper, for CPU runs.
    stem_stride: int = 1
    # Channels of the first residual stage (torchvision: 64); later stages double it.
    width: int = 64
    hidden_dim: int = 2048
    output_dim: int = 128
    prototypes: int = 3000
    sync_batchnorm: bool = False


@dataclass
class SwAVConfig:
    temperature: float = 0.1
    # One of: sinkhorn (equal partition), relaxed, lower-bound.
    codes: str = "sinkhorn"
    epsilon: float = 0.05
    # Also the iteration count of `relaxed` and `lower-bound`.
    sinkhorn_iterations: int = 3
    crops_for_assign: tuple[int, ...] = (0, 1)
    # Queue length per learner; 0 disables it.
    queue_length: int = 0
    # SwAV starts its queue after 15 ImageNet epochs; counted here in images.
    queue_start_images: int = 15 * 1_281_167
    freeze_prototypes_steps: int = 313
    # `relaxed`: KL strength on the prototype marginal, annealed from
    # relaxed_lambda_start to relaxed_lambda over relaxed_anneal_images.
    relaxed_lambda: float = 1.0
    relaxed_lambda_start: float = 100.0
    relaxed_anneal_images: int = 1_000_000
    # `relaxed` and `lower-bound`: no prototype gets less than gamma/K of the mass.
    mass_floor_gamma: float = 0.2
    mass_momentum: float = 0.99
    # `lower-bound`: 1 is the exact dual step; lower values damp it (average over batches).
    dual_step: float = 0.5


@dataclass
class OptimConfig:
    optimizer: str = "lars"
    # Learning rate for a global batch of 256; scaled linearly with the batch.
    base_lr: float = 0.6
    final_lr: float = 0.0006
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coefficient: float = 0.001
    # warmup-constant (endless streams) or warmup-cosine (to final_lr over cosine_images).
    schedule: str = "warmup-constant"
    warmup_images: int = 10 * 1_281_167
    cosine_images: int = 400 * 1_281_167


@dataclass
class TrainConfig:
    batch_size: int = 64
    learners: int = 1
    # auto: cuda when the learner got a GPU, else cpu.
    device: str = "auto"
    # auto: bf16 autocast on CUDA, float32 on CPU.
    precision: str = "auto"
    channels_last: bool = True
    # torch.compile the network and the photometric augmentation. Meant for CUDA learners: the
    # first steps take minutes to compile, and every new batch size compiles again.
    compile: bool = False
    # torch.compile mode; reduce-overhead and max-autotune also replay the network as CUDA graphs.
    compile_mode: str = "default"
    image_budget: int = 0
    time_budget_s: float = 0.0
    max_nonfinite_in_row: int = 20
    log_interval_s: float = 5.0
    progress_bar: bool = True
    seed: int = 0
    gpus_per_learner: float = 1.0
    cpus_per_learner: float = 1.0
    # Intra-op threads of a learner that trains on the CPU; 0: cpus_per_learner rounded up. Ray
    # pins every worker to one thread, so without this a CPU learner uses a single core whatever
    # it reserved; more threads than reserved CPUs are allowed when decoders are light.
    cpu_threads: int = 0


@dataclass
class CheckpointConfig:
    dir: str = "runs/checkpoints"
    every_steps: int = 1000
    every_seconds: float = 600.0
    keep_last: int = 3
    milestone_every: int = 10


@dataclass
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9400
    perplexity_window_steps: int = 50
    collapse_perplexity: float = 0.0  # 0: max(2, K/50)
    collapse_after_images: int = 0  # 0: after warmup


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

    @property
    def total_crops(self) -> int:
        return self.crops.global_count + self.crops.local_count

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def validate(self) -> "Config":
        _validate(self)
        return self


ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CODES = ("sinkhorn", "relaxed", "lower-bound")
SCHEDULES = ("warmup-constant", "warmup-cosine")
OPTIMIZERS = ("lars", "sgd")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Turn a YAML/CLI value into the annotated type, or raise naming the key."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    number = float(value)
                except ValueError:
                    number = math.nan
                if number.is_integer():
                    return int(number)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        args = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v for v in value.strip("[]() ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    raise ConfigError(f"{key}: unsupported type {annotation!r}")  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class OverrideText:
    """A --set value as typed and as YAML reads it: string keys take the text as typed, so
    `metrics.host=010` stays "010" and `checkpoint.dir=no` stays "no"."""

    text: str
    parsed: Any


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
        if not sep or not key.strip():
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
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        layers.append(loaded)
    if overrides:
        layers.append(parse_overrides(overrides))
    for layer in layers:
        _apply(cfg, "", layer)
    return cfg.validate()


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = Config()
    _apply(cfg, "", values)
    return cfg.validate()


def _check(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}, got {value!r}")


def _validate(cfg: Config) -> None:
    def positive(key: str, value: float, allow_zero: bool = False) -> None:
        bad = value < 0 if allow_zero else value <= 0
        _check(not bad and math.isfinite(value), key, "must be >= 0" if allow_zero else "must be > 0", value)

    def prob(key: str, value: float) -> None:
        _check(0.0 <= value <= 1.0, key, "must be a probability in [0, 1]", value)

    def choice(key: str, value: str, options: tuple[str, ...]) -> None:
        _check(value in options, key, f"must be one of {', '.join(options)}", value)

    def scale(key: str, value: tuple[float, float]) -> None:
        _check(0.0 < value[0] <= value[1] <= 1.0, key, "must be (min, max) with 0 < min <= max <= 1", value)

    d, c, a, m, s, o, t, k, mt, st = (cfg.data, cfg.crops, cfg.augment, cfg.model, cfg.swav, cfg.optim,
                                      cfg.train, cfg.checkpoint, cfg.metrics, cfg.storage)
    positive("data.relist_interval_s", d.relist_interval_s)
    positive("data.shuffle_buffer", d.shuffle_buffer)
    positive("data.open_shards_per_actor", d.open_shards_per_actor)
    positive("data.decode_actors", d.decode_actors, allow_zero=True)
    positive("data.inflight_batches_per_actor", d.inflight_batches_per_actor)
    positive("data.max_pixels", d.max_pixels)
    positive("data.min_side", d.min_side)
    positive("data.max_sample_bytes", d.max_sample_bytes)
    positive("data.shard_read_retries", d.shard_read_retries, allow_zero=True)
    positive("data.shard_retry_backoff_s", d.shard_retry_backoff_s, allow_zero=True)
    positive("storage.retries", st.retries, allow_zero=True)
    positive("storage.retry_backoff_s", st.retry_backoff_s, allow_zero=True)
    positive("storage.connect_timeout_s", st.connect_timeout_s)
    positive("storage.read_timeout_s", st.read_timeout_s)

    positive("crops.global_size", c.global_size)
    positive("crops.local_size", c.local_size)
    positive("crops.global_count", c.global_count, allow_zero=True)
    positive("crops.local_count", c.local_count, allow_zero=True)
    _check(c.global_count + c.local_count >= 2, "crops.global_count", "global_count + local_count must be >= 2",
           c.global_count)
    scale("crops.global_scale", c.global_scale)
    scale("crops.local_scale", c.local_scale)
    prob("crops.hflip_prob", c.hflip_prob)

    for name in ("color_jitter_prob", "grayscale_prob", "blur_prob_global", "blur_prob_local"):
        prob(f"augment.{name}", getattr(a, name))
    for name in ("brightness", "contrast", "saturation"):
        positive(f"augment.{name}", getattr(a, name), allow_zero=True)
    _check(0.0 <= a.hue <= 0.5, "augment.hue", "must be in [0, 0.5]", a.hue)
    _check(0.0 < a.blur_sigma[0] <= a.blur_sigma[1], "augment.blur_sigma", "must be (min, max) with 0 < min <= max",
           a.blur_sigma)
    _check(all(v > 0 for v in a.std), "augment.std", "must be > 0", a.std)

    choice("model.arch", m.arch, ARCHS)
    _check(m.stem_stride in (1, 2), "model.stem_stride", "must be 1 or 2", m.stem_stride)
    _check(m.stem_stride == 1 or m.small_stem, "model.stem_stride", "can be 2 only with model.small_stem: true",
           m.stem_stride)
    positive("model.width", m.width)
    positive("model.hidden_dim", m.hidden_dim)
    positive("model.output_dim", m.output_dim)
    positive("model.prototypes", m.prototypes)

    positive("swav.temperature", s.temperature)
    choice("swav.codes", s.codes, CODES)
    positive("swav.epsilon", s.epsilon)
    positive("swav.sinkhorn_iterations", s.sinkhorn_iterations)
    _check(len(s.crops_for_assign) >= 1 and len(set(s.crops_for_assign)) == len(s.crops_for_assign)
           and all(0 <= i < cfg.total_crops for i in s.crops_for_assign), "swav.crops_for_assign",
           f"must be distinct crop indices in [0, {cfg.total_crops})", s.crops_for_assign)
    positive("swav.queue_length", s.queue_length, allow_zero=True)
    positive("swav.queue_start_images", s.queue_start_images, allow_zero=True)
    positive("swav.freeze_prototypes_steps", s.freeze_prototypes_steps, allow_zero=True)
    positive("swav.relaxed_lambda", s.relaxed_lambda)
    positive("swav.relaxed_lambda_start", s.relaxed_lambda_start)
    positive("swav.relaxed_anneal_images", s.relaxed_anneal_images, allow_zero=True)
    _check(0.0 <= s.mass_floor_gamma <= 1.0, "swav.mass_floor_gamma", "must be in [0, 1]", s.mass_floor_gamma)
    _check(0.0 <= s.mass_momentum < 1.0, "swav.mass_momentum", "must be in [0, 1)", s.mass_momentum)
    _check(0.0 < s.dual_step <= 1.0, "swav.dual_step", "must be in (0, 1]", s.dual_step)

    choice("optim.optimizer", o.optimizer, OPTIMIZERS)
    positive("optim.base_lr", o.base_lr)
    positive("optim.final_lr", o.final_lr, allow_zero=True)
    _check(0.0 <= o.momentum < 1.0, "optim.momentum", "must be in [0, 1)", o.momentum)
    positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    positive("optim.trust_coefficient", o.trust_coefficient)
    choice("optim.schedule", o.schedule, SCHEDULES)
    positive("optim.warmup_images", o.warmup_images, allow_zero=True)
    positive("optim.cosine_images", o.cosine_images)

    positive("train.batch_size", t.batch_size)
    positive("train.learners", t.learners)
    choice("train.device", t.device, DEVICES)
    choice("train.precision", t.precision, PRECISIONS)
    choice("train.compile_mode", t.compile_mode, COMPILE_MODES)
    positive("train.image_budget", t.image_budget, allow_zero=True)
    positive("train.time_budget_s", t.time_budget_s, allow_zero=True)
    positive("train.max_nonfinite_in_row", t.max_nonfinite_in_row)
    positive("train.log_interval_s", t.log_interval_s)
    positive("train.gpus_per_learner", t.gpus_per_learner, allow_zero=True)
    positive("train.cpus_per_learner", t.cpus_per_learner, allow_zero=True)
    positive("train.cpu_threads", t.cpu_threads, allow_zero=True)
    _check(t.batch_size >= 2 or t.learners > 1, "train.batch_size", "must be >= 2 for Sinkhorn", t.batch_size)

    _check(bool(k.dir), "checkpoint.dir", "must be a folder or s3:// URL", k.dir)
    positive("checkpoint.every_steps", k.every_steps, allow_zero=True)
    positive("checkpoint.every_seconds", k.every_seconds, allow_zero=True)
    positive("checkpoint.keep_last", k.keep_last)
    positive("checkpoint.milestone_every", k.milestone_every, allow_zero=True)

    _check(0 <= mt.port <= 65535, "metrics.port", "must be a TCP port in [0, 65535]", mt.port)
    positive("metrics.perplexity_window_steps", mt.perplexity_window_steps)
    positive("metrics.collapse_perplexity", mt.collapse_perplexity, allow_zero=True)
    positive("metrics.collapse_after_images", mt.collapse_after_images, allow_zero=True)


def scaled_learning_rate(cfg: Config, lr: float) -> float:
    """Linear scaling rule: rates in the config are for a global batch of 256."""
    return lr * cfg.train.batch_size * cfg.train.learners / 256.0


__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "parse_overrides", "scaled_learning_rate",
           "StorageConfig", "DataConfig", "CropsConfig", "AugmentConfig", "ModelConfig", "SwAVConfig",
           "OptimConfig", "TrainConfig", "CheckpointConfig", "MetricsConfig", "ARCHS", "CODES", "COMPILE_MODES"]
