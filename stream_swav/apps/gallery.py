"""`stream-swav gallery`: a picture of what a checkpoint's prototypes hold and of what curation drops.

Curation is trusted when it can be looked at. The command reads images from shards (labels are
not needed), resizes and centre-crops them to the run's crops.global_size, normalises them with
its augment.mean/std and scores them with the checkpoint's whole SwAV model in eval mode, without
augmentation. The prototypes are not in backbone.pt: the model comes from the state.pt beside it,
its configuration from the checkpoint's record. Each image goes to the prototype it scores
highest; a prototype's usage is its share of the images read (dropped repeats included: the
picture is of the data, not of what trained).

The PNG has a row per prototype for the `--prototypes` most used and the `--prototypes` least
used of those given an image (each prototype once, in order of usage, most used first), showing
up to `--per-row` of its images, those it scores highest. Each row is labelled with the
prototype's usage and, when the run had curation.balance > 0, the loss weight concept balance
gives an image of that prototype at that usage (`stream_swav.balance.raw_weights`: before a
batch's weights are rescaled to mean 1).

The section "dropped as repeats" replays curation.dedup on the same images when the run's
configuration has it on: each image is hashed as decoded, before resizing (as the decode worker
hashes it), and offered in shard order to a `SeenSet` configured as the run's. Up to `--per-row`
dropped images are shown, each beside the earlier kept image whose hash is nearest. The replay is
one reader's single pass; a run with several decode actors pools their hashes only at checkpoints,
so it may have let through a few repeats that the replay drops. With dedup off, the section is one
line saying so.
"""
from __future__ import annotations

import argparse
import importlib.util
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from stream_swav import logs, plotting, storage
from stream_swav.apps.evaluate import embed, pick_device
from stream_swav.data.labelled import load_labeled_images
from stream_swav.balance import raw_weights
from stream_swav.checkpoint import STATE, ResolvedCheckpoint, load_checkpoint, resolve_checkpoint
from stream_swav.config import Config, CurationConfig, StorageConfig, UsageError, config_from_dict
from stream_swav.curation import SeenSet, hamming
from stream_swav.model import SwAVModel, check_state_dict
from stream_swav.runtime.metrics import usage_perplexity

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Images per scoring batch.
BATCH_SIZE = 256
CHECKPOINT_HINT = "give the checkpoint folder of a training run (with latest.json) or one of its step folders"
OUT_HINT = "give a PNG path in a writable folder, or an s3:// URL"
SHARDS_HINT = "give a folder or s3:// prefix of .tar shards, a brace pattern or a .txt list of shard URLs"
# Every image is drawn this wide, whatever its size; white space between images, as a share of that.
THUMB_PX = 96
GAP = 1 / 12
FRAME_GREY = 190
# Heights besides the images: a row's title, a caption line under a row, a section's heading, the
# figure's title; and the narrowest figure (longer titles wrap at its edge).
ROW_TITLE_PX = 26
CAPTION_PX = 18
HEADING_PX = 50
TITLE_PX = 60
MIN_WIDTH_PX = 640
SIDE_MARGINS_PX = 40


@dataclass
class GallerySummary:
    """What `make_gallery` found and where it drew it."""

    out: str
    images_read: int
    prototypes: int
    # Share of the images read assigned to each prototype (K,).
    usage: list[float]
    # None when curation.dedup is off in the run's configuration.
    repeats_dropped: int | None
    # Samples left out while reading, by reason.
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def prototypes_used(self) -> int:
        return sum(1 for share in self.usage if share > 0)

    @property
    def perplexity(self) -> float:
        return usage_perplexity(np.asarray(self.usage))

    def describe(self) -> str:
        skipped = f" ({sum(self.skipped.values()):,} skipped: {self.skipped})" if self.skipped else ""
        repeats = "" if self.repeats_dropped is None else f"; {self.repeats_dropped:,} dropped as repeats"
        return (f"{self.out}: {self.images_read:,} images read{skipped}; {self.prototypes_used} of "
                f"{self.prototypes} prototypes used, usage perplexity {self.perplexity:.1f}{repeats}")


# ---- model --------------------------------------------------------------------------------------------


class PrototypeScores(nn.Module):
    """A SwAV model as a module from one batch of images to their prototype scores (N, K), which
    `evaluate.embed` runs like a backbone."""

    def __init__(self, model: SwAVModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model([images])[1]


def load_swav_model(resolved: ResolvedCheckpoint, storage_cfg: StorageConfig) -> tuple[Config, SwAVModel]:
    """The run's configuration and its whole model (backbone, projection head, prototypes) from the
    state.pt beside the checkpoint's backbone.pt."""
    if not resolved.config:
        raise ValueError(f"{resolved.url} records no training configuration (an exported backbone has no "
                         f"prototypes)")
    cfg = config_from_dict(resolved.config)
    folder = resolved.backbone_url.rsplit("/", 1)[0] if "/" in resolved.backbone_url else "."
    state_url = storage.join_url(folder, STATE)
    state = load_checkpoint(state_url, storage_cfg)
    model = SwAVModel(cfg.model)
    check_state_dict(state.get("model"), model, f"{state_url}: model")
    model.load_state_dict(state["model"])
    return cfg, model


# ---- what the picture shows ---------------------------------------------------------------------------


def prototype_rows(counts: np.ndarray, rows: int) -> tuple[list[int], list[int]]:
    """The `rows` most used prototypes and the `rows` least used of those given an image, each
    prototype once, both in order of usage (most used first; ties by prototype number)."""
    used = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] > 0]
    return used[:rows], used[max(rows, len(used) - rows):]


def best_images(scores: Tensor, assigned: Tensor, prototype: int, count: int) -> list[int]:
    """The indices of up to `count` images assigned to `prototype`, those it scores highest first."""
    members = (assigned == prototype).nonzero().squeeze(1)
    order = scores[members, prototype].argsort(descending=True)
    return members[order[:count]].tolist()


@dataclass(frozen=True)
class Repeat:
    # Positions in reading order: the dropped image, and the earlier kept image with the nearest hash.
    dropped: int
    kept: int
    distance: int


def replay_dedup(hashes: list[int], curation: CurationConfig, shown: int) -> tuple[int, list[Repeat]]:
    """How many of the images hashed `hashes`, offered in this order in one pass, curation.dedup drops;
    and for the first `shown` of them, the earlier kept image each repeats."""
    seen = SeenSet(curation.seen_capacity, curation.dedup_max_distance, curation.max_repeats)
    kept: list[int] = []
    dropped: list[int] = []
    for position, h in enumerate(hashes):
        (kept if seen.admit(h, (0, 0), position) else dropped).append(position)
    repeats = []
    for position in dropped[:shown]:
        # A drop matched an occurrence admitted before it, so an earlier kept image exists.
        earlier = kept[:bisect_left(kept, position)]
        nearest = min(earlier, key=lambda k: hamming(hashes[position], hashes[k]))
        repeats.append(Repeat(position, nearest, hamming(hashes[position], hashes[nearest])))
    return len(dropped), repeats


# ---- drawing ------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One strip of the picture: images side by side under a title, and optionally a caption under
    each group of consecutive images (len(tiles) / len(captions) of them)."""

    title: str
    tiles: list[np.ndarray]
    captions: list[str] = field(default_factory=list)

    @property
    def height_px(self) -> int:
        return THUMB_PX + ROW_TITLE_PX + CAPTION_PX * bool(self.captions)


@dataclass
class Section:
    """A heading over rows of images; with no rows, the heading is the whole section."""

    heading: str
    rows: list[Row]

    @property
    def height_px(self) -> int:
        return HEADING_PX + sum(row.height_px for row in self.rows)


def prototype_sections(images: Tensor, scores: Tensor, assigned: Tensor, counts: np.ndarray, balance: float,
                       rows: int, per_row: int) -> list[Section]:
    """The most and the least used prototypes (`prototype_rows`), a row of their best images each;
    `balance` is the run's curation.balance."""
    usage = counts / len(images)
    weights = raw_weights(torch.as_tensor(usage), balance).tolist()

    def prototype_row(k: int) -> Row:
        title = f"prototype {k}: {100 * usage[k]:.1f}% of images"
        if balance > 0:
            title += f", loss weight {weights[k]:.2f}"
        return Row(title, [images[i].numpy() for i in best_images(scores, assigned, k, per_row)])

    most, least = prototype_rows(counts, rows)
    sections = [Section(f"the {len(most)} most used prototypes", [prototype_row(k) for k in most])]
    if least:
        sections.append(Section(f"the {len(least)} least used prototypes (of those given an image)",
                                [prototype_row(k) for k in least]))
    return sections


def repeats_section(images: Tensor, dropped: int, repeats: list[Repeat], curation: CurationConfig,
                    per_row: int) -> Section:
    """The repeats shown as pairs, dropped image then the kept one it repeats, `per_row // 2` pairs a row."""
    pairs_per_row = max(1, per_row // 2)
    chunks = [repeats[i:i + pairs_per_row] for i in range(0, len(repeats), pairs_per_row)]
    rows = [Row("", [images[i].numpy() for r in chunk for i in (r.dropped, r.kept)],
                [f"#{r.dropped} repeats #{r.kept} ({r.distance} bits)" for r in chunk]) for chunk in chunks]
    return Section(f"dropped as repeats: {dropped:,} of {len(images):,} images (curation.dedup: max_repeats "
                   f"{curation.max_repeats}, max distance {curation.dedup_max_distance} bits)\n"
                   f"each beside the earlier kept image it repeats (#n: position n in reading order, from 0)", rows)


def mosaic(tiles: list[np.ndarray], cells: int, gap: int) -> np.ndarray:
    """(S, S, 3) uint8 tiles side by side on white, `gap` px apart, in a strip of `cells` places, so
    that every strip is drawn at one scale however many tiles it has. Each tile gets a one-pixel grey
    frame in the gap around it: a white or blank image must still show where it is."""
    size = tiles[0].shape[0]
    strip = np.full((size + 2, cells * size + (cells - 1) * gap + 2, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        left = 1 + i * (size + gap)
        strip[:, left - 1:left + size + 1] = FRAME_GREY
        strip[1:size + 1, left:left + size] = tile
    return strip


def draw_gallery(title: str, sections: list[Section], cells: int) -> Figure:
    """The figure: `title` over each section's heading and rows, every row `cells` images wide."""
    width = max(MIN_WIDTH_PX, round(cells * THUMB_PX * (1 + GAP)) + SIDE_MARGINS_PX)
    figure = plotting.new_figure(width, TITLE_PX + sum(section.height_px for section in sections), "gallery")
    assert figure is not None  # make_gallery checked for matplotlib first
    # Wrapped at the figure's edge: a long checkpoint or shard URL must not run off a narrow picture.
    figure.suptitle(title, wrap=True)
    subfigures = figure.subfigures(len(sections), 1, squeeze=False,
                                   height_ratios=[section.height_px for section in sections])[:, 0]
    for subfigure, section in zip(subfigures, sections):
        subfigure.suptitle(section.heading, fontsize=11, wrap=True)
        if not section.rows:
            continue
        for axes, row in zip(subfigure.subplots(len(section.rows), 1, squeeze=False)[:, 0], section.rows):
            size = row.tiles[0].shape[0]
            gap = max(2, round(GAP * size))
            axes.imshow(mosaic(row.tiles, cells, gap))
            axes.set_title(row.title, loc="left", fontsize=9)
            axes.set_yticks([])
            axes.set_xticks([])
            if row.captions:
                group = len(row.tiles) // len(row.captions)
                pitch = size + gap
                # Under the middle of each group (the strip starts with a frame pixel); pixel j of the
                # strip spans [j - 0.5, j + 0.5].
                axes.set_xticks([1 + i * group * pitch + (group * pitch - gap) / 2 - 0.5
                                 for i in range(len(row.captions))], row.captions, fontsize=8)
                axes.tick_params(length=0)
            for spine in axes.spines.values():
                spine.set_visible(False)
    return figure


# ---- the command --------------------------------------------------------------------------------------


def _usage_error(error: Exception, option: str, url: str, hint: str, storage_cfg: StorageConfig
                 ) -> UsageError | None:
    """`error`, met reading what `option` names, as one line naming the option and what to do; None
    for an error that is no fault of the input (a bug keeps its traceback)."""
    if isinstance(error, (FileNotFoundError, ValueError)):
        # A shard spec's own errors name the training configuration's key; here the spec is `option`.
        detail = logs.error_line(error).removeprefix("data.shards: ")
        return UsageError(f"{option}: {detail}; {hint}")
    return storage.usage_error(error, option, url, storage_cfg)


def make_gallery(checkpoint: str, shards: str, out: str, *, max_images: int, prototypes: int, per_row: int,
                 storage_cfg: StorageConfig | None = None, device: torch.device | None = None
                 ) -> GallerySummary:
    """Score up to `max_images` images (0: all) of `shards` with `checkpoint`'s prototypes, replay
    dedup on them when the run had it on, and draw the picture into `out` (local or s3://)."""
    storage_cfg = storage_cfg or StorageConfig()
    device = device or pick_device()
    # The picture is the product: refuse before minutes of reading, not after.
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"gallery draws with matplotlib, which is not installed: {plotting.INSTALL_HINT}")
    try:
        resolved = resolve_checkpoint(checkpoint, storage_cfg)
        cfg, model = load_swav_model(resolved, storage_cfg)
    except Exception as error:
        usage = _usage_error(error, "--checkpoint", checkpoint, CHECKPOINT_HINT, storage_cfg)
        if usage is None:
            raise
        raise usage from error
    try:
        read = load_labeled_images(shards, cfg.crops.global_size, storage_cfg, cfg.data, max_images,
                                   unlabelled=True, hashes=cfg.curation.dedup)
    except Exception as error:
        usage = _usage_error(error, "--shards", shards, SHARDS_HINT, storage_cfg)
        if usage is None:
            raise
        raise usage from error

    scores = embed(PrototypeScores(model), read.images, cfg.augment.mean, cfg.augment.std, BATCH_SIZE, device)
    assigned = scores.argmax(dim=1)
    counts = torch.bincount(assigned, minlength=cfg.model.prototypes).numpy()
    # The loss weights balance gave these prototypes: only where the run balanced by them.
    balance = cfg.curation.balance if cfg.curation.balance_signal == "prototypes" else 0.0
    sections = prototype_sections(read.images, scores, assigned, counts, balance, prototypes, per_row)
    repeats_dropped = None
    if cfg.curation.dedup:
        repeats_dropped, repeats = replay_dedup(read.hashes, cfg.curation, per_row)
        sections.append(repeats_section(read.images, repeats_dropped, repeats, cfg.curation, per_row))
    else:
        sections.append(Section("dropped as repeats: none, curation.dedup is off in this run's configuration", []))
    summary = GallerySummary(out=out, images_read=len(read), prototypes=cfg.model.prototypes,
                             usage=(counts / len(read)).tolist(), repeats_dropped=repeats_dropped,
                             skipped=dict(read.skipped))
    title = (f"{checkpoint} (step {resolved.step}): {len(read):,} images of {shards} at {cfg.crops.global_size} px\n"
             f"{summary.prototypes_used} of {summary.prototypes} prototypes used, usage perplexity "
             f"{summary.perplexity:.1f}")
    # A pair of a repeat and its original takes two places.
    figure = draw_gallery(title, sections, cells=max(per_row, 2))
    try:
        storage.write_bytes_atomic(out, plotting.png_bytes(figure), storage_cfg)
    except OSError as error:
        usage = storage.usage_error(error, "--out", out, storage_cfg)
        raise usage or UsageError(f"--out: cannot write {out} ({error.strerror or error}); {OUT_HINT}") from error
    return summary


def run(args: argparse.Namespace) -> int:
    if args.prototypes < 1 or args.per_row < 1 or args.max_images < 0:
        raise UsageError("gallery: need --prototypes >= 1, --per-row >= 1, --max-images >= 0")
    summary = make_gallery(args.checkpoint, args.shards, args.out, max_images=args.max_images,
                           prototypes=args.prototypes, per_row=args.per_row,
                           storage_cfg=StorageConfig(endpoint_url=args.endpoint_url), device=pick_device(args.device))
    print(summary.describe())
    return 0
