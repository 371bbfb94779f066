"""One SwAV training step on a batch of uint8 crops: no Ray, no I/O.

Two parts. `LearnerState` builds and owns what one training process holds and a checkpoint
saves: network, optimiser, feature queue, code state, random streams and counters, with
`state_dict()`, `check_state()` and `load_state_dict()`. `Learner` adds the step on top of it:
the network as it runs (DistributedDataParallel, compiled), on-device augmentation, mixed
precision and `train_step`. The runtime's actor feeds a `Learner` `CropBatch`es and saves its
`state_dict()`; with several learners a `torch.distributed` process group must be initialised
first, and every learner must call `train_step` in lockstep. The crops of a batch may be numpy
arrays (as they come out of Ray's object store) or uint8 torch tensors, on the host or already
on the learner's device.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from stream_swav.augment import apply_params, sample_params
from stream_swav.balance import ReferenceBalance, build_balance, resample_shows
from stream_swav.checkpoint import RANK_LOCAL_STATE_KEYS
from stream_swav.codes import build_codes
from stream_swav.config import Config
from stream_swav.data.batch import CropBatch
from stream_swav.data.labelled import normalized_batches
from stream_swav.model import SwAVModel, check_state_dict
from stream_swav.optim import WeightAverage, build_optimizer, learning_rate_for, weight_decay_for
from stream_swav.swav import FeatureQueue, is_distributed, marginal_error, prototype_counts, swav_loss


@dataclass
class StepStats:
    """Outcome of one `train_step`. Tensor fields are detached device scalars, so
    reading them is left to whoever logs (one sync per log line, not per step)."""

    step: int  # steps taken including this one, skipped ones too
    images_seen: int  # global images consumed including this batch
    loss: Tensor
    lr: float
    # How many rows of the assignment crops' scores pick each prototype as their best (K,): the
    # network's own prototype usage, summed over a window for the perplexity and collapse alarm.
    prototype_counts: Tensor
    # Largest relative deviation of the codes' prototype mass from its target.
    marginal_error: Tensor
    # How spread the batch's embeddings are: sqrt(dim) * the per-dimension standard deviation of the
    # assignment crops' unit embeddings over the batch, averaged over dimensions (as SimSiam
    # monitors collapse). About 1 for embeddings spread over the sphere, 0 when every image maps
    # to the same point, whatever the loss or the codes say.
    feature_spread: Tensor
    # How much the assignment crops' scores differ between prototypes: the standard deviation over
    # prototypes of each row's cosine scores, averaged over rows. 0 when no prototype scores an image
    # differently from another (all prototypes alike, or embeddings orthogonal to every prototype,
    # which fewer prototypes than embedding dimensions allows); the loss then sits at ln(K) with no
    # gradient out, while the embeddings may still be spread.
    score_spread: Tensor
    queue_fill: int
    nonfinite: bool
    nonfinite_in_row: int
    # curation.balance_mode resample: how many times each image read from the stream (the batch's
    # first rows, replays excluded) should be trained in all, (fresh,) int64 on the host, being
    # copied from the device until `shows_ready` (a CUDA event; None when already there) has passed.
    # Read a step late, so asking for replays does not stall the device.
    shows: Tensor | None = None
    shows_ready: Any = None

    def figures(self) -> StepFigures:
        """The scalars as Python numbers (synchronises with the device); counts are left out."""
        return StepFigures(step=self.step, images_seen=self.images_seen, loss=self.loss.item(), lr=self.lr,
                           marginal_error=self.marginal_error.item(), feature_spread=self.feature_spread.item(),
                           score_spread=self.score_spread.item(), queue_fill=self.queue_fill,
                           nonfinite=self.nonfinite, nonfinite_in_row=self.nonfinite_in_row)


@dataclass(frozen=True)
class StepFigures:
    """A `StepStats` read on the host: what a learner reports of its last step."""

    step: int
    images_seen: int
    loss: float
    lr: float
    marginal_error: float
    feature_spread: float
    score_spread: float
    queue_fill: int
    nonfinite: bool
    nonfinite_in_row: int


# Without CUDA graphs: the augmentation's output is a fresh input of the network each step.
_AUGMENT_COMPILE_MODE = {"default": "default", "reduce-overhead": "default",
                         "max-autotune": "max-autotune-no-cudagraphs",
                         "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"}
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def _crop_tensor(stack: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """(n, B, H, W, 3) uint8 array or tensor -> (n * B, 3, H, W) on `device`, channels_last strided
    (no pixel shuffle). A tensor already on `device` is used as it is."""
    n, b, h, w, c = stack.shape
    if isinstance(stack, Tensor):
        pixels = stack
    elif stack.flags.writeable:
        pixels = torch.from_numpy(stack)
    else:
        # Arrays mapped from Ray's object store are read-only; torch warns on wrapping
        # them. Nothing here writes to the wrapper, and on CPU it is copied at once.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            pixels = torch.from_numpy(stack)
        if device.type == "cpu":
            pixels = pixels.clone()
    if device.type == "cuda" and pixels.device.type == "cpu" and not pixels.is_pinned():
        # From pageable memory the copy would first wait for the GPU to go idle.
        pixels = pixels.pin_memory()
    pixels = pixels.to(device, non_blocking=True)
    return pixels.reshape(n * b, h, w, c).permute(0, 3, 1, 2)


def _is_crop_stack(stack: Any) -> bool:
    """Whether `stack` is uint8 (n, B, H, W, 3), as a numpy array or a torch tensor."""
    if isinstance(stack, np.ndarray):
        uint8 = stack.dtype == np.uint8
    elif isinstance(stack, Tensor):
        uint8 = stack.dtype == torch.uint8
    else:
        return False
    return uint8 and stack.ndim == 5 and stack.shape[4] == 3


def _cpu_copy(value: Any) -> Any:
    """Detached CPU copies of every tensor in nested dicts/lists: a checkpoint taken
    now must not change as training goes on, and must load on a machine without a GPU."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value


def _take_rows(stack: np.ndarray | Tensor, rows: np.ndarray) -> np.ndarray | Tensor:
    """These images (rows of the batch axis) of a (n, B, H, W, 3) crop stack, as a new stack."""
    return stack[:, torch.from_numpy(rows)] if isinstance(stack, Tensor) else stack[:, rows]


def batch_labels(batch: CropBatch, device: torch.device) -> Tensor:
    """Each image's class from its `cls` member, (B,) int64, -1 where it has none (or where the batch
    carries no labels, as a stand-in batch need not)."""
    size = len(batch)
    labels = batch.meta.labels if len(batch.meta.labels) == size else [-1] * size
    return torch.tensor(labels, dtype=torch.int64).to(device, non_blocking=True)


def _check_batch(batch: CropBatch, cfg: Config) -> int:
    """Batch size, after checking the crops are what this configuration trains on."""
    expected = (("global_crops", cfg.crops.global_count, cfg.crops.global_size),
                ("local_crops", cfg.crops.local_count, cfg.crops.local_size))
    batch_size = None
    for name, count, size in expected:
        stack = getattr(batch, name)
        if not _is_crop_stack(stack):
            shape = tuple(getattr(stack, "shape", ()))
            dtype = getattr(stack, "dtype", type(stack).__name__)
            raise ValueError(f"CropBatch.{name}: expected a uint8 array or tensor (n, B, H, W, 3), "
                             f"got {dtype} {shape}")
        if stack.shape[0] != count:
            raise ValueError(f"CropBatch.{name}: expected {count} crops per image, got {stack.shape[0]}")
        if count and tuple(stack.shape[2:4]) != (size, size):
            raise ValueError(f"CropBatch.{name}: expected {size}x{size} crops, got {stack.shape[2]}x{stack.shape[3]}")
        if count:
            if batch_size is not None and stack.shape[1] != batch_size:
                raise ValueError(f"CropBatch: global and local crops disagree on the batch size "
                                 f"({batch_size} vs {stack.shape[1]})")
            batch_size = stack.shape[1]
    if not batch_size:
        raise ValueError("CropBatch: empty batch")
    return batch_size


def feature_spread(features: Tensor) -> Tensor:
    """sqrt(dim) * mean over dimensions of the standard deviation over the batch of (A, B, dim) unit
    embeddings: ~1 when spread over the sphere, 0 when collapsed to a point."""
    return features.float().std(dim=1).mean() * math.sqrt(features.shape[2])


def score_spread(scores: Tensor) -> Tensor:
    """Mean over the rows of (A, B, K) cosine scores of their standard deviation over prototypes:
    about 1/sqrt(dim) for random unit vectors, 0 when every prototype scores each image alike."""
    return scores.float().std(dim=2).mean()


def check_world_size(cfg: Config, world_size: int) -> None:
    """A fixed group trains with train.learners ranks; an elastic group's members with any number up
    to it (below train.min_learners too: survivors hold their state while the driver waits for
    more, and a joiner is built while the group is that small). The learning rate and the image
    count are scaled by world_size."""
    fewest = 1 if cfg.train.elastic else cfg.train.learners
    if not fewest <= world_size <= cfg.train.learners:
        raise ValueError(f"world_size={world_size} is outside {fewest}..train.learners ({cfg.train.learners})")


class LearnerState:
    """What one training process owns and a checkpoint holds: the network, optimiser, feature
    queue, code state, augmentation generator and counters, built from the configuration; saved by
    `state_dict()`, checked by `check_state()`, restored by `load_state_dict()`."""

    def __init__(self, cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1,
                 reference_images: Tensor | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        distributed = is_distributed()
        if distributed and dist.get_world_size() != world_size:
            raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} processes")
        if not distributed and world_size != 1:
            raise ValueError(f"world_size={world_size} needs an initialised torch.distributed process group")
        check_world_size(cfg, world_size)

        # Same seed on every rank: replicas start identical (DDP also broadcasts rank 0's weights).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            model = SwAVModel(cfg.model)
        # Converted whenever the run may have several learners: an elastic group's first member starts
        # alone, and its BatchNorm must issue the same collectives as that of members joining later
        # (SyncBatchNorm without a process group of several acts as plain BatchNorm).
        if (distributed or cfg.train.learners > 1) and cfg.model.sync_batchnorm:  # refused for ViTs: no BatchNorm
            if self.device.type != "cuda":
                raise ValueError("model.sync_batchnorm: SyncBatchNorm needs CUDA learners; set it to false on CPU")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = build_optimizer(model, cfg)
        # What backbone.pt holds when optim.ema_momentum is set; training never reads it.
        self.average = WeightAverage(model.backbone, cfg.optim.ema_momentum) if cfg.optim.ema_momentum else None
        swav = cfg.swav
        self.queue = None
        if swav.queue_length > 0:
            self.queue = FeatureQueue(len(swav.crops_for_assign), swav.queue_length, cfg.model.output_dim,
                                      start_images=swav.queue_start_images, device=self.device)
        # The code method and what it carries (a running mass, dual variables); identical on every
        # rank since its updates use all-reduced masses.
        self.codes = build_codes(swav, cfg.model.prototypes, self.device)
        # Concept balance (curation.balance): its running estimate, rank-local like the queue. The
        # reference signal's images (N, S, S, 3) uint8, at the global crops' side, are kept on the
        # device to be embedded again as the model trains (`refresh_reference`).
        self.reference_images = None if reference_images is None else reference_images.to(self.device)
        self.balance = build_balance(cfg.curation, cfg.model.prototypes, cfg.model.output_dim, self.device,
                                     reference_images)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.train.seed + rank)
        self.step = 0
        self.images_seen = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit; plain containers of tensors and numbers only."""
        state: dict[str, Any] = {
            "model": _cpu_copy(self.model.state_dict()),
            "optimizer": _cpu_copy(self.optimizer.state_dict()),
            "step": self.step,
            "images_seen": self.images_seen,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_row": self.nonfinite_in_row,
            "codes": self.codes.state_dict(),
        }
        if self.average is not None:
            state["average"] = self.average.state_dict()
        state.update(self.rank_local_state())
        return state

    def exported_backbone_state_dict(self) -> OrderedDict[str, Tensor]:
        """backbone.pt's weights: the moving average with optim.ema_momentum, else the trained backbone."""
        backbone = self.average.module if self.average is not None else self.model.backbone
        return backbone.backbone_state_dict()

    def rank_local_state(self) -> dict[str, Any]:
        """The part of `state_dict()` under RANK_LOCAL_STATE_KEYS, without copying the rest: what a
        rank other than 0 contributes to a checkpoint."""
        state: dict[str, Any] = {"cpu_rng": torch.get_rng_state(), "augment_rng": self.generator.get_state()}
        if self.queue is not None:
            state["queue"] = self.queue.state_dict()
        if self.balance is not None:
            state[self.balance.STATE_KEY] = self.balance.state_dict()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def shared_state(self) -> dict[str, Any]:
        """What every rank holds alike (network, optimiser, code state, counters): `state_dict()`
        without the rank-local part, for a rank that joins or fell a step behind."""
        state = self.state_dict()
        for key in RANK_LOCAL_STATE_KEYS:
            state.pop(key, None)
        return state

    def adopt(self, shared: dict[str, Any]) -> None:
        """Take another rank's `shared_state()`, keeping this rank's queue and random streams."""
        self.load_state_dict({**shared, **self.rank_local_state()})

    def check_state(self, state: Any) -> None:
        """Raise ValueError, naming the part, when `state` is not a `state_dict()` this learner can load."""
        if not isinstance(state, dict):
            raise ValueError(f"learner state must be a dict, got {type(state).__name__}")
        required = ["model", "optimizer", "step", "images_seen", "nonfinite_total", "nonfinite_in_row", "cpu_rng",
                    "augment_rng"]
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"learner state lacks {', '.join(missing)}")
        for key in ("step", "images_seen", "nonfinite_total", "nonfinite_in_row"):
            value = state[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"learner state {key}: expected an int >= 0, got {value!r}")
        for key in ("cpu_rng", "augment_rng"):
            if not isinstance(state[key], Tensor) or state[key].dtype != torch.uint8:
                raise ValueError(f"learner state {key}: expected a uint8 tensor")
        check_state_dict(state["model"], self.model, "learner state model")
        queue = state.get("queue")
        if queue is not None and not (isinstance(queue, dict) and isinstance(queue.get("features"), Tensor)
                                      and queue["features"].dim() == 3):
            raise ValueError("learner state queue: expected features of shape (crops, length, dim)")
        if "codes" in state:
            if not isinstance(state["codes"], dict):
                raise ValueError("learner state codes: expected a dict")
            self.codes.check_state(state["codes"])
        if self.balance is not None and self.balance.STATE_KEY in state:
            self.balance.check_state(state[self.balance.STATE_KEY])
        if self.average is not None and "average" in state:
            self.average.check_state(state["average"])
        saved_groups = state["optimizer"].get("param_groups", []) if isinstance(state["optimizer"], dict) else []
        if [len(g.get("params", [])) for g in saved_groups] != [len(g["params"]) for g in self.optimizer.param_groups]:
            raise ValueError("learner state optimizer: parameter groups do not match this model and optimizer")
        # Per-parameter buffers (momentum, Adam's moments) of another shape would load, and fail the
        # first step after it, at every restart.
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved = state["optimizer"].get("state", {})
        if not isinstance(saved, dict):
            raise ValueError("learner state optimizer: its state is not a dict")
        adamw = isinstance(self.optimizer, torch.optim.AdamW)
        for index, buffers in saved.items():
            if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(buffers, dict):
                raise ValueError(f"learner state optimizer: state of an unknown parameter {index!r}")
            # AdamW keeps moments, LARS and SGD a momentum buffer: the one's state in the other failed
            # the first step at every restart (KeyError 'step'), or was carried along unused for ever.
            if buffers and ("exp_avg" in buffers) != adamw:
                raise ValueError(f"learner state optimizer: saved by {'AdamW' if 'exp_avg' in buffers else 'LARS or SGD'}"
                                 f", this run's is {self.cfg.optimizer}")
            for name, buffer in buffers.items():
                if isinstance(buffer, Tensor) and buffer.dim() > 0 and buffer.shape != params[index].shape:
                    raise ValueError(f"learner state optimizer: {name} of parameter {index} has shape "
                                     f"{tuple(buffer.shape)}, the parameter {tuple(params[index].shape)}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` output. Everything is checked before anything is changed."""
        self.check_state(state)
        # A checkpoint from a run without queue, or with a queue of another shape (swav.queue_length
        # or crops_for_assign changed at a resume: the driver says so), leaves the queue empty; the
        # queue is loaded first because it is the one part still checked while loading.
        if self.queue is not None and "queue" in state and self.queue.same_shape(state["queue"]):
            self.queue.load_state_dict(state["queue"])
        # Without a saved estimate (balance, or this signal, turned on at a resume), it starts afresh.
        if self.balance is not None and self.balance.STATE_KEY in state:
            self.balance.load_state_dict(state[self.balance.STATE_KEY])
        if isinstance(self.balance, ReferenceBalance):
            # Anchors embedded by the weights being replaced: embedded again at the next step.
            self.balance.anchors = None
        if "codes" in state:
            self.codes.load_state_dict(state["codes"])
        self.model.load_state_dict(state["model"])
        if self.average is not None:
            # A checkpoint written without an average starts one from its weights.
            if "average" in state:
                self.average.load_state_dict(state["average"])
            else:
                self.average.restart()
        # Hyperparameters come from the current configuration and device (a
        # checkpoint from a GPU run may say fused=True), state from the checkpoint.
        hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(self.optimizer.param_groups, hyperparameters):
            group.update(values)
        self.step = state["step"]
        self.images_seen = state["images_seen"]
        self.nonfinite_total = state["nonfinite_total"]
        self.nonfinite_in_row = state["nonfinite_in_row"]
        torch.set_rng_state(state["cpu_rng"])
        self.generator.set_state(state["augment_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)


class Learner(LearnerState):
    """The SwAV step on a `LearnerState`: the network as it runs (DistributedDataParallel over the
    ranks, compiled when train.compile), on-device augmentation, mixed precision, and `train_step`."""

    def __init__(self, cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1,
                 reference_images: Tensor | None = None) -> None:
        super().__init__(cfg, device, rank=rank, world_size=world_size, reference_images=reference_images)
        self.network = self._build_network()
        self._apply_params = apply_params
        self._cudagraphs = False
        if cfg.train.compile:
            mode = cfg.train.compile_mode
            # sample_params stays eager: dynamo cannot trace torch.rand with an explicit generator.
            self._apply_params = torch.compile(apply_params, mode=_AUGMENT_COMPILE_MODE[mode], dynamic=False)
            self._cudagraphs = self.device.type == "cuda" and mode in _CUDAGRAPH_MODES
        if self.device.type == "cuda":
            # Crop shapes never change during a run, so cuDNN's algorithm search pays once.
            torch.backends.cudnn.benchmark = True
        precision = cfg.train.precision
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" or (
            precision == "auto" and self.device.type == "cuda") else None
        # BatchNorm running statistics, restored when a step is skipped so a
        # non-finite batch cannot poison them for evaluation.
        self._buffers = list(self.model.buffers())
        self._buffer_snapshot = [b.clone() for b in self._buffers]

    def _build_network(self) -> nn.Module:
        """The model as it runs: DistributedDataParallel over the process group (whose construction
        gives every rank rank 0's weights), compiled when train.compile."""
        network: nn.Module = self.model
        if is_distributed():
            device_ids = [self.device] if self.device.type == "cuda" else None
            network = DistributedDataParallel(self.model, device_ids=device_ids)
        if self.cfg.train.compile:
            # Shapes are fixed per run; dynamic=False keeps the two crop sizes from turning
            # into one slower shape-generic graph after the first recompilation.
            network = torch.compile(network, mode=self.cfg.train.compile_mode, dynamic=False)
        return network

    def release_network(self) -> None:
        """Let go of the network's hold on the process group (DistributedDataParallel's), so that
        the group can be torn down at once; `regroup` wraps the model again."""
        self.network = self.model

    def regroup(self, rank: int, world_size: int) -> None:
        """Train on in a process group formed again (an elastic group that shrank or grew): the
        network is wrapped anew over it; every call of it must be made on all its ranks together."""
        check_world_size(self.cfg, world_size)
        self.rank, self.world_size = rank, world_size
        self.network = self._build_network()

    @torch.no_grad()
    def embed_eval(self, images: Tensor) -> Tensor:
        """Projected features (N, dim) of (N, S, S, 3) uint8 images, normalised as for training, by the
        model as it is now in eval mode (BatchNorm's running statistics, none updated): how the
        reference signal sees its anchors and the stream alike. The undistributed, uncompiled model,
        so no DDP hook, collective or graph is involved."""
        aug = self.cfg.augment
        was_training = self.model.training
        self.model.eval()
        try:
            features = []
            for batch in normalized_batches(images, tuple(aug.mean), tuple(aug.std), self.cfg.train.batch_size,
                                            self.device):
                with self._autocast():
                    z, _ = self.model.head(self.model.embed(batch))
                features.append(z.float())
            return torch.cat(features)
        finally:
            self.model.train(was_training)

    def refresh_reference(self) -> None:
        """Embed the reference's images as the reference signal's anchors (`embed_eval`). Each rank
        embeds its own, alike."""
        if isinstance(self.balance, ReferenceBalance):
            self.balance.set_anchors(self.embed_eval(self.reference_images))

    def _reference_view(self, batch: CropBatch, fresh: int) -> Tensor:
        """The reference signal's features of the batch's fresh images: their first global crops, not
        colour-augmented, by `embed_eval`, as the anchors are embedded. The training forward's
        features (BatchNorm's batch statistics, augmented crops) are not comparable with the anchors:
        on a stream half junk they put 99% of the junk within the similarity threshold of an anchor,
        where the eval-mode view puts about half (docs/curation.md)."""
        first = batch.global_crops[0][:fresh]
        # A copy: arrays mapped from Ray's object store are read-only.
        return self.embed_eval(first if isinstance(first, Tensor) else torch.from_numpy(np.array(first)))

    def _refresh_reference_if_due(self) -> None:
        """The reference signal's anchors move with the model: embedded again every so many steps."""
        if isinstance(self.balance, ReferenceBalance) and (
                self.balance.anchors is None or self.step % self.cfg.curation.balance_reference_refresh == 0):
            self.refresh_reference()

    def _resample_shows(self, weights: Tensor, placed: Tensor | None) -> Tensor:
        """How many times to train each fresh image (`resample_shows`) by the configured curation.
        The rank's own generator: ranks must not round alike, and it is checkpointed. Only what the
        signal can place is shown more than once (unlabelled junk is not rare), and no more shows
        are asked for than the later batches' replays can hold."""
        curation = self.cfg.curation
        return resample_shows(weights, curation.resample_max_shows, self.generator, placed,
                              curation.replay_budget(self.cfg.train.batch_size), curation.resample_min_shows,
                              curation.resample_quantile)

    def select(self, batch: CropBatch) -> CropBatch:
        """With curation.resample_min_shows below 1: decide how many times each image the batch read
        from the stream is trained (`resample_shows`), before any training forward, and return the
        batch without those to be shown 0 times (counted in `meta.dropped["balance"]`; their stream
        positions stay consumed), with the shows of the fresh rows kept in `meta.shows` for
        `train_step`. The signal's estimate takes in every fresh image, skipped or not (it is of the
        stream), whatever becomes of the step. A batch selected already (put back after a lost
        peer) is returned as it is."""
        curation = self.cfg.curation
        if not curation.skipping or batch.meta.shows is not None:
            return batch
        _check_batch(batch, self.cfg)
        fresh = len(batch) - batch.meta.replayed
        if fresh == 0:
            batch.meta.shows = []
            return batch
        self._refresh_reference_if_due()
        labels = batch_labels(batch, self.device)[:fresh]
        view = self._reference_view(batch, fresh) if isinstance(self.balance, ReferenceBalance) else None
        # The batch is in the estimate first, so that a concept seen for the first time is placed
        # (and rare), not skipped as what the signal cannot place.
        self.balance.update(None, view, labels)
        shows = self._resample_shows(self.balance.weights(None, view, labels), self.balance.placed(None, view, labels))
        # One host sync per batch: which rows stay decides the shapes the step trains on.
        shows = shows.cpu()
        kept = torch.cat([torch.nonzero(shows > 0).flatten(), torch.arange(fresh, len(batch))]).numpy()
        meta = batch.meta
        meta.dropped["balance"] += fresh - int((shows > 0).sum())
        meta.shows = shows[shows > 0].tolist()
        meta.keys = [meta.keys[i] for i in kept] if len(meta.keys) == len(batch) else meta.keys
        meta.labels = [meta.labels[i] for i in kept] if len(meta.labels) == len(batch) else meta.labels
        return CropBatch(_take_rows(batch.global_crops, kept), _take_rows(batch.local_crops, kept), meta)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def augment(self, batch: CropBatch) -> list[Tensor]:
        """The batch's crops as the network sees them: one normalised float32 (n * B, 3, H, W) tensor
        per resolution, global first, augmented on this learner's device with draws from its
        augmentation generator, exactly as `train_step` does (so calling this advances that generator)."""
        _check_batch(batch, self.cfg)
        return self._augment(batch)

    def _augment(self, batch: CropBatch) -> list[Tensor]:
        augment = self.cfg.augment
        memory_format = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        crops = []
        for stack, blur_prob in ((batch.global_crops, augment.blur_prob_global),
                                 (batch.local_crops, augment.blur_prob_local)):
            if stack.shape[0]:
                # A uint8 copy here is cheap, and the augmentation keeps whichever layout it is given.
                images = _crop_tensor(stack, self.device).contiguous(memory_format=memory_format)
                params = sample_params(images.shape[0], augment, blur_prob, self.generator, images.device)
                crops.append(self._apply_params(images, params, augment, blur_prob))
        return crops

    def _all_finite(self, loss: Tensor) -> bool:
        """Whether loss and gradients are finite on every learner: the step's one host sync.

        It comes after backward, so the device is busy while the host waits, and
        all learners agree on the outcome, so their replicas stay identical.
        """
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = torch.isfinite(loss)
        if grads:
            finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        finite = finite.to(torch.int32)
        if is_distributed():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _check_collectives(self) -> None:
        """Raise if NCCL's watchdog aborted a collective of this step (a peer lost mid-step): the
        aborted collective returns what it had, and the step must not commit it. gloo raises in
        the collective itself."""
        if not is_distributed() or self.device.type != "cuda":
            return
        from torch._C._distributed_c10d import ErrorType

        backend = dist.distributed_c10d._get_default_group()._get_backend(self.device)
        error = backend.get_error()
        if error != ErrorType.SUCCESS:
            raise dist.DistBackendError(f"NCCL collective failed in this step ({error.name}); a peer is lost")

    def train_step(self, batch: CropBatch, step_images: int | None = None) -> StepStats:
        """One update from one batch; `step_images` is how many images every rank's batch of this
        step holds together (default: this batch's size times the ranks), the count every rank adds
        to images_seen alike; a batch whose loss or gradients are not finite
        is consumed (counted in step and images_seen) without changing any weight,
        optimiser state, BatchNorm statistic or queue entry.

        Every collective of the step comes before the first change of state, so a step that raises
        (a peer lost in a collective) leaves weights, optimiser, code state, queue, counters and
        BatchNorm statistics as they were before it (the random streams have moved on): an elastic
        group's survivors go on from their last whole step."""
        if self._buffers:  # a ViT has none
            torch._foreach_copy_(self._buffer_snapshot, self._buffers)
        try:
            return self._train_step(batch, step_images)
        except BaseException:
            if self._buffers:
                torch._foreach_copy_(self._buffers, self._buffer_snapshot)
            self.optimizer.zero_grad(set_to_none=True)
            raise

    def _train_step(self, batch: CropBatch, step_images: int | None) -> StepStats:
        cfg, swav = self.cfg, self.cfg.swav
        batch_size = _check_batch(batch, cfg)
        images_before = self.images_seen
        # The rate for the images seen once this batch is in, so the first step of a warmup is not wasted.
        # Every rank must count the same, or their schedules (and so their replicas) drift apart.
        images_after = images_before + (step_images if step_images is not None else batch_size * self.world_size)
        # Scaled to the images the step trains on every rank together (the linear scaling rule the
        # configured batch is scaled by), so that a short step (the last batch of a shard; batches
        # that skipping thinned, curation.resample_min_shows) moves the weights as much per image as
        # a full one. Every rank counts the same, so the replicas step alike.
        lr = learning_rate_for(cfg, images_after, images_after - images_before)
        decay = weight_decay_for(cfg, images_after)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["decayed"]:
                group["weight_decay"] = decay

        fresh = batch_size - batch.meta.replayed
        # Shows planned by `select` (skipping): nothing of the signal is left to do here.
        planned = batch.meta.shows is not None
        if not planned:
            self._refresh_reference_if_due()
        # The reference signal's own view of the fresh images, before the training forward, so that
        # nothing runs between a compiled graph's forward and backward.
        reference_view = (self._reference_view(batch, fresh)
                          if isinstance(self.balance, ReferenceBalance) and fresh > 0 and not planned else None)
        crops = self._augment(batch)
        self.network.train()
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast():
            z, scores = self.network(crops)
        # (crops, batch, prototypes) views; the codes come from the assignment crops' scores.
        scores = scores.view(-1, batch_size, scores.shape[1])
        assign_crops = list(swav.crops_for_assign)
        assign_scores = scores.detach()[assign_crops]
        # Everything read from the network's outputs is taken before backward, so nothing
        # depends on how long a compiled graph keeps its output buffers.
        assign_features = z.detach().view(-1, batch_size, z.shape[1])[assign_crops]
        # With curation.balance, the first assignment crop's scores or features weigh the images, in
        # the loss and in the codes (an image's share of the prototypes' mass follows its weight).
        # In resample mode the weights say instead how often each image read from the stream (not
        # its replays, which are the batch's last rows) is shown again, and the step itself is unweighted.
        # A batch can be all replays (its decode actor's shards ended): nothing to weigh or count then.
        weights = labels = shows = None
        if planned:
            shows = torch.tensor(batch.meta.shows, dtype=torch.int64) if fresh > 0 else None
        elif self.balance is not None and fresh > 0:
            labels = batch_labels(batch, self.device)
            signal_features = reference_view if reference_view is not None else assign_features[0, :fresh]
            weights = self.balance.weights(assign_scores[0, :fresh], signal_features, labels[:fresh])
            if cfg.curation.resampling:
                shows = self._resample_shows(weights, self.balance.placed(assign_scores[0, :fresh], signal_features,
                                                                          labels[:fresh]))
                weights = None
        queued = self.queue.features() if self.queue is not None else None
        queued_scores = queued @ self.model.prototypes.weight.detach().t() if queued is not None else None
        codes = self.codes.assign(assign_scores, queued_scores, images_before, weights)
        # Which prototype the network prefers for each assignment crop: the collapse monitor's usage.
        counts = prototype_counts(assign_scores.reshape(-1, assign_scores.shape[2]))
        loss = swav_loss(scores, codes, assign_crops, swav.temperature, weights)
        self.optimizer.zero_grad(set_to_none=True)
        # The loss is a mean over this rank's rows and DDP averages the ranks' gradients evenly:
        # where the ranks' batches differ in size (one cut short at a shard's end, or thinned by
        # skipping), each rank's loss is weighed by its share of the step's rows, so that every
        # image counts alike, as in one batch of them all (and as the step's rate assumes).
        rank_share = batch_size * self.world_size / step_images if step_images else 1.0
        (loss * rank_share).backward()

        nonfinite = not self._all_finite(loss)  # the step's last collective
        self._check_collectives()
        self.step += 1
        self.images_seen = images_after
        if nonfinite:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
            if self._buffers:
                torch._foreach_copy_(self._buffers, self._buffer_snapshot)
        else:
            self.nonfinite_in_row = 0
            self.codes.commit()
            if labels is not None:
                # The estimate is of the stream: replays would count a rare image as common.
                fresh_counts = counts if fresh == batch_size else prototype_counts(
                    assign_scores[:, :fresh].reshape(-1, assign_scores.shape[2]))
                self.balance.update(fresh_counts, signal_features, labels[:fresh])
            if self.step <= swav.freeze_prototypes_steps:
                # Prototypes stay put at first (SwAV's first-epoch freeze); no gradient
                # means no momentum or weight decay either.
                for p in self.model.prototypes.parameters():
                    p.grad = None
            if cfg.optim.clip_grad_norm:
                # The gradients are finite here and identical on every rank (DDP averaged them).
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad_norm, foreach=True)
            self.optimizer.step()
            self.model.normalize_prototypes()
            if self.average is not None:
                self.average.update()
            if self.queue is not None and self.queue.accepts(images_before):
                self.queue.push(assign_features)
        self.optimizer.zero_grad(set_to_none=True)

        return StepStats(
            step=self.step,
            images_seen=self.images_seen,
            loss=loss.detach(),
            lr=lr,
            prototype_counts=counts,
            marginal_error=marginal_error(codes, self.codes.target),
            feature_spread=feature_spread(assign_features),
            score_spread=score_spread(assign_scores),
            queue_fill=self.queue.fill if self.queue is not None else 0,
            nonfinite=nonfinite,
            nonfinite_in_row=self.nonfinite_in_row,
            **self._shows_to_host(shows if not nonfinite else None),
        )

    def _shows_to_host(self, shows: Tensor | None) -> dict[str, Any]:
        """StepStats' shows and shows_ready: a copy started now, finished when its event has passed."""
        if shows is None:
            return {}
        if self.device.type != "cuda":
            return {"shows": shows}
        host = torch.empty(shows.shape, dtype=shows.dtype, pin_memory=True)
        host.copy_(shows, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return {"shows": host, "shows_ready": ready}


__all__ = ["Learner", "LearnerState", "RANK_LOCAL_STATE_KEYS", "StepFigures", "StepStats"]
