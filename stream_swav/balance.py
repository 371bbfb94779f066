"""Concept balance from the model's own view of the stream (curation.balance): images of what the
stream over-represents weigh less, so that what the model is trained on moves towards balanced, as
DINOv2's retrieval-based balancing does offline. A weight counts twice: in the loss, and as the
image's share of the mass in the codes' transport (`stream_swav.swav.sinkhorn`), so that the
prototypes are shared out over the weighted batch, as over a batch drawn balanced. Nothing is
dropped (the stream cursor is untouched); the weights are rescaled to mean 1 over the batch, so
the loss keeps its scale, and each stays within MAX_RATIO either way. Four signals
(curation.balance_signal):

- `PrototypeBalance` ("prototypes"): a running estimate of how often the network prefers each
  prototype (the argmax of its scores, also the collapse monitor's signal); an image weighs
  (K * usage[its prototype]) ** -strength. The premise was that a flooded concept skews those
  preferences. Measured on the messy-stream benchmark it barely does: SwAV's equal-partition codes
  spread the prototypes over a flooded concept too, and these weights leave the classes' shares
  almost as they were (docs/curation.md).
- `DensityBalance` ("density"): a kernel density estimate of each image's projected feature among
  those of the last `bank` images (von Mises-Fisher kernel of bandwidth `bandwidth`, a ring
  buffer); an image weighs (its density / the batch's mean density) ** -strength. A concept that
  floods the stream is dense there whatever the prototypes do; measured offline it takes the
  classes about half the way to balanced (docs/curation.md).
- `LabelBalance` ("label"): the running share of the class each sample carries in its `cls`
  member, where the stream has one (a tag, a source, a curated class); unlabelled samples weigh 1.
  On the benchmark's labelled classes it is the perfect signal, what the others approximate.
- `ReferenceBalance` ("reference"): the running share of the stream nearest to each image of a
  curated reference (shards of images drawn balanced over the concepts wanted), embedded by the
  model as it trains: DINOv2's retrieval around curated sets, online. Images near no reference
  image (junk, for a reference of real concepts) are left alone.

With curation.balance_mode resample, the same weights decide instead how many times each image is
shown (`resample_shows`): the learner asks the decode actor that made the batch for those images
again, cropped afresh, and trains the step unweighted. Measured on the benchmark, resampling by the
labels recovers what weighing by them does not (docs/curation.md).

All but the reference read only what the step has anyway (scores, projected features, the batch's
labels; the density costs one (B x bank) product); the reference costs a (B x anchors) product and,
every curation.balance_reference_refresh steps, a forward pass over the reference. Pure state in torch, no I/O or process group: each learner
keeps its own estimate from its own batches (rank-local, saved per rank like the feature queue),
which needs no collective per step.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from stream_swav.config import CurationConfig
from stream_swav.swav import FeatureQueue

# A sample's weight before the batch rescaling stays within [1/MAX_RATIO, MAX_RATIO] (1 at uniform
# usage): an image of a prototype almost never picked must not carry a step.
MAX_RATIO = 10.0
# The least share a group once seen keeps: a share that only decays (momentum 0.99 a step) would
# underflow float32 to 0 after ~9,000 steps without the group, and read as never seen (weight 1).
# A group at the floor (~6,000 steps away at 0.99) no longer counts among the groups present.
SEEN_FLOOR = 1e-30


# The strongest exponent: the density signal compresses the imbalance it sees, so it needs more than 1.
MAX_STRENGTH = 2.0


def raw_weights(usage: Tensor, strength: float) -> Tensor:
    """The weight of an image of each prototype at these usage shares (K,), before a batch's weights
    are rescaled to mean 1: (K * usage) ** -strength within [1/MAX_RATIO, MAX_RATIO]."""
    return relative_weights(usage.shape[0] * usage, strength)


def relative_weights(relative: Tensor, strength: float) -> Tensor:
    """relative ** -strength within [1/MAX_RATIO, MAX_RATIO], for how over-represented (> 1) or
    under-represented (< 1) each image or group is."""
    return relative.clamp_min(1e-6).pow(-strength).clamp(1.0 / MAX_RATIO, MAX_RATIO)


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= MAX_STRENGTH:
        raise ValueError(f"strength must be in [0, {MAX_STRENGTH:g}], got {strength}")


class UsageBalance:
    """A running estimate of how often each of `groups` groups turns up (shares, momentum per step),
    and an image's weight from its group's: (groups seen * share) ** -strength. An image of no
    group (-1, or beyond `groups`), or of a group not seen yet, weighs 1; the former is not counted."""

    def __init__(self, groups: int, strength: float, momentum: float, start: float,
                 device: torch.device | str | None = None) -> None:
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        _check_strength(strength)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.strength = strength
        self.momentum = momentum
        # Each group's share before any step: `start` (0 = not seen yet).
        self.usage = torch.full((groups,), start, device=device)

    def lookup(self, groups: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) bool, which of these groups (B,) int the estimate holds (not -1, not beyond it), and
        (B,) the groups clamped into range, for indexing without a host-device sync."""
        return (groups >= 0) & (groups < len(self.usage)), groups.clamp(0, len(self.usage) - 1)

    def seen(self, groups: Tensor) -> Tensor:
        """(B,) bool: which of these groups (B,) the estimate holds and has seen."""
        known, index = self.lookup(groups)
        return known & (self.usage[index] > 0)

    def group_weights(self, groups: Tensor) -> Tensor:
        """(B,) weights, mean 1, for images of these groups (B,) int."""
        known, index = self.lookup(groups)
        # Relative to the groups seen so far, so a stream of 10 classes of 1,000 possible is not
        # read as 100 times under-represented; no host-side check, so no device sync.
        shares = self.usage / self.usage.sum().clamp_min(1e-12)
        # A group not seen yet has no estimate: it weighs 1 until it has one. Groups long gone (at
        # the floor) are not counted, so that a stream whose concepts drift keeps its scale.
        present = torch.count_nonzero(self.usage > 2 * SEEN_FLOOR)
        relative = torch.where(self.usage > 0, shares * present, 1.0)
        of_group = relative_weights(relative, self.strength)[index]
        weights = torch.where(known, of_group, torch.ones_like(shares[:1]))
        return weights / weights.mean()

    def placed(self, scores: Tensor, z: Tensor, labels: Tensor) -> Tensor | None:
        """(B,) bool: which samples the signal can say anything about (None: all)."""
        return None

    def fold_groups(self, groups: Tensor) -> None:
        """Fold in one step's images by their groups (B,) int (-1 and groups beyond the estimate are
        not counted)."""
        # A masked count with a fixed shape: no host-device sync on a GPU, as boolean indexing has.
        known, index = self.lookup(groups)
        self.fold(torch.zeros_like(self.usage).index_add_(0, index, known.to(self.usage.dtype)))

    def fold(self, counts: Tensor) -> None:
        """Fold in one step's counts per group (K,); a step that counted none changes nothing."""
        counts = counts.to(self.usage.dtype)
        share = counts / counts.sum().clamp_min(1.0)
        momentum = torch.where(counts.sum() > 0, self.momentum, 1.0)
        seen = self.usage > 0
        self.usage.mul_(momentum).add_(share * (1.0 - momentum))
        self.usage.copy_(torch.where(seen, self.usage.clamp_min(SEEN_FLOOR), self.usage))

    def state_dict(self) -> dict[str, Tensor]:
        return {"usage": self.usage.detach().cpu().clone()}

    # Whether a saved estimate of another number of groups loads (see `load_state_dict`): not for
    # groups that are the model's own prototypes, whose number a checkpoint of this model fixes.
    RESIZABLE = False

    def check_state(self, state: object) -> None:
        """Raise ValueError unless `state` is a `state_dict()` of this balance: shares, 1-D, finite,
        >= 0, of as many groups unless RESIZABLE."""
        usage = state.get("usage") if isinstance(state, dict) else None
        if (not isinstance(usage, Tensor) or usage.dim() != 1 or not usage.is_floating_point()
                or not torch.isfinite(usage).all() or (usage < 0).any()
                or not (self.RESIZABLE or usage.shape == self.usage.shape)):
            shape = "" if self.RESIZABLE else f" of shape {tuple(self.usage.shape)}"
            raise ValueError(f"balance state: usage must be a 1-D float tensor of finite shares >= 0{shape}")

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a saved estimate. One of another number of groups (curation.balance_classes changed
        at a resume) keeps the shares of the groups both have, by index; the others are not seen yet."""
        self.check_state(state)
        saved = state["usage"]
        common = min(len(saved), len(self.usage))
        self.usage.zero_()
        self.usage[:common] = saved[:common].to(self.usage.device, self.usage.dtype)


class PrototypeBalance(UsageBalance):
    STATE_KEY = "balance"

    def __init__(self, prototypes: int, strength: float, momentum: float = 0.99,
                 device: torch.device | str | None = None) -> None:
        # Share of argmax assignments per prototype; starts uniform (every weight 1).
        super().__init__(prototypes, strength, momentum, 1.0 / max(prototypes, 1), device)

    def weights(self, scores: Tensor, z: Tensor, labels: Tensor) -> Tensor:
        """(B,) loss weights, mean 1, for samples with these prototype scores (B, K)."""
        return self.group_weights(scores.argmax(dim=1))

    def update(self, counts: Tensor, z: Tensor, labels: Tensor) -> None:
        """Fold in one step's argmax counts (K,) (`swav.prototype_counts`)."""
        self.fold(counts)


class LabelBalance(UsageBalance):
    """Balance by the class a stream's samples carry (their `cls` member: a tag, a source, a
    curated class), where there is one: the signal a model's own view approximates."""

    STATE_KEY = "balance_label"
    RESIZABLE = True

    def __init__(self, classes: int, strength: float, momentum: float = 0.99,
                 device: torch.device | str | None = None) -> None:
        # Nothing seen yet: every weight 1 until the first labelled step.
        super().__init__(classes, strength, momentum, 0.0, device)

    def weights(self, scores: Tensor, z: Tensor, labels: Tensor) -> Tensor:
        """(B,) loss weights, mean 1, for samples of these classes (B,) (-1: none)."""
        return self.group_weights(labels)

    def placed(self, scores: Tensor, z: Tensor, labels: Tensor) -> Tensor:
        """(B,) bool: which samples the estimate has an opinion on (a class it has seen). The rest
        weigh 1 when weighed, and are shown once when resampled: nothing says they are rare."""
        return self.seen(labels)

    def update(self, counts: Tensor, z: Tensor, labels: Tensor) -> None:
        """Fold in one step's labels (B,) (-1 and classes beyond the estimate are not counted)."""
        self.fold_groups(labels)


class ReferenceBalance(UsageBalance):
    """Balance against a curated reference: DINOv2's retrieval-based balancing, online. The groups
    are the reference's images (a set drawn balanced over concepts, given as shards), embedded by
    the current model (`set_anchors`, refreshed as it trains); a stream image belongs to the anchor
    its projected feature is most similar to, if at least `min_similarity`, and weighs (anchors seen
    * its anchor's running share) ** -strength. Anchors spread evenly over concepts, so an anchor's
    share of the stream says how over-represented its concept is, where the prototypes (shared out
    equally by Sinkhorn) and the density (high for a tight concept, frequent or not) do not. An
    image near no anchor (junk, for a reference of real concepts) is not placed: it weighs 1, is
    shown once, and is not counted. The estimate is saved with the reference's `fingerprint`, so a
    resume with other reference images starts it afresh instead of reading another set's shares."""

    STATE_KEY = "balance_reference"
    RESIZABLE = True

    def __init__(self, anchors: int, strength: float, momentum: float = 0.99, min_similarity: float = -1.0,
                 device: torch.device | str | None = None, fingerprint: Tensor | None = None) -> None:
        # Nothing seen yet: every weight 1 until the first step with anchors.
        super().__init__(anchors, strength, momentum, 0.0, device)
        if not -1.0 <= min_similarity <= 1.0:
            raise ValueError(f"min_similarity must be in [-1, 1], got {min_similarity}")
        self.min_similarity = min_similarity
        # `reference_fingerprint` of the images the anchors embed (None: unknown).
        self.fingerprint = fingerprint
        # (anchors, dim) unit rows: the reference as the model now sees it; None until set.
        self.anchors: Tensor | None = None

    def set_anchors(self, features: Tensor) -> None:
        """The reference's projected features (anchors, dim), in the reference's order."""
        if features.dim() != 2 or len(features) != len(self.usage):
            raise ValueError(f"anchors: expected ({len(self.usage)}, dim) features, got {tuple(features.shape)}")
        self.anchors = torch.nn.functional.normalize(features.detach().float(), dim=1).to(self.usage.device)

    def nearest(self, z: Tensor) -> Tensor:
        """(B,) the anchor each projected feature (B, dim) belongs to; -1 where none is similar enough
        (or no anchors are set yet)."""
        if self.anchors is None:
            return torch.full((len(z),), -1, dtype=torch.int64, device=z.device)
        best = (z.float() @ self.anchors.t()).max(dim=1)
        return torch.where(best.values >= self.min_similarity, best.indices, -1)

    def weights(self, scores: Tensor, z: Tensor, labels: Tensor) -> Tensor:
        """(B,) loss weights, mean 1, for samples with these projected features z (B, dim)."""
        return self.group_weights(self.nearest(z))

    def placed(self, scores: Tensor, z: Tensor, labels: Tensor) -> Tensor:
        """(B,) bool: samples near an anchor the estimate has seen."""
        return self.seen(self.nearest(z))

    def update(self, counts: Tensor, z: Tensor, labels: Tensor) -> None:
        """Fold in one step's projected features (B, dim) by their anchors (images near none are
        not counted)."""
        self.fold_groups(self.nearest(z))

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        if self.fingerprint is not None:
            state["reference_fingerprint"] = self.fingerprint.clone()
        return state

    def check_state(self, state: object) -> None:
        """A saved estimate of another reference (another number of anchors, or other images) is not
        an error: `load_state_dict` starts afresh then."""
        super().check_state(state)
        saved = state.get("reference_fingerprint")
        if saved is not None and (not isinstance(saved, Tensor) or saved.dtype != torch.uint8 or saved.dim() != 1):
            raise ValueError("balance state: reference_fingerprint must be a 1-D uint8 tensor")

    def same_reference(self, state: dict[str, Tensor]) -> bool:
        """Whether a saved estimate is of this balance's reference: as many anchors, and the same
        fingerprint (or neither side has one)."""
        saved = state.get("reference_fingerprint")
        if state["usage"].shape != self.usage.shape or (saved is None) != (self.fingerprint is None):
            return False
        return saved is None or torch.equal(saved.cpu(), self.fingerprint.cpu())

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.check_state(state)
        if self.same_reference(state):
            self.usage.copy_(state["usage"])
        else:
            # Anchors are images, not indices: another reference's shares say nothing of these.
            self.usage.zero_()


class DensityBalance:
    STATE_KEY = "balance_density"

    def __init__(self, dim: int, strength: float, bandwidth: float = 0.2, bank: int = 4096,
                 device: torch.device | str | None = None) -> None:
        _check_strength(strength)
        if not bandwidth > 0.0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        if bank < 1:
            raise ValueError(f"bank must be >= 1, got {bank}")
        self.strength = strength
        self.bandwidth = bandwidth
        # The last `bank` images' projected features (unit rows): the sample the density is taken on.
        self.bank = FeatureQueue(1, bank, dim, device=device)

    def weights(self, scores: Tensor, z: Tensor, labels: Tensor) -> Tensor:
        """(B,) loss weights, mean 1, for samples with these projected features z (B, dim), unit
        rows; all 1 until the bank is full."""
        stored = self.bank.features()
        if stored is None:
            return torch.ones(len(z), device=z.device)
        # Each image's density over the batch's mean density, in logs: exp((cos - 1) / bandwidth)
        # underflows to 0 for every image at a narrow bandwidth, which would make every weight 0 / 0.
        log_density = torch.logsumexp((z.float() @ stored[0].t() - 1.0) / self.bandwidth, dim=1)
        log_mean = torch.logsumexp(log_density, dim=0) - math.log(len(z))
        weights = relative_weights(torch.exp(log_density - log_mean), self.strength)
        return weights / weights.mean()

    def placed(self, scores: Tensor, z: Tensor, labels: Tensor) -> Tensor | None:
        """Every sample has a density (None: all placed)."""
        return None

    def update(self, counts: Tensor, z: Tensor, labels: Tensor) -> None:
        """Store one step's projected features (B, dim) over the bank's oldest."""
        self.bank.push(z.unsqueeze(0))

    def state_dict(self) -> dict[str, Tensor | int]:
        return self.bank.state_dict()

    def check_state(self, state: object) -> None:
        """Raise ValueError unless `state` is a `state_dict()` of a density balance: finite features of
        this dimension (a bank of another size is not an error: `load_state_dict` starts afresh)."""
        features = state.get("features") if isinstance(state, dict) else None
        dim = self.bank.buffer.shape[2]
        if (not isinstance(features, Tensor) or features.dim() != 3 or features.shape[0] != 1
                or features.shape[2] != dim or not torch.isfinite(features).all()):
            raise ValueError(f"balance state: the density's bank must be finite features of shape (1, bank, {dim})")
        if features.shape[1] == self.bank.length:
            FeatureQueue(1, self.bank.length, dim).load_state_dict(state)

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        self.check_state(state)
        if state["features"].shape[1] == self.bank.length:
            self.bank.load_state_dict(state)
        else:
            # curation.balance_bank changed at a resume: the bank fills again from the next steps.
            self.bank = FeatureQueue(1, self.bank.length, self.bank.buffer.shape[2], device=self.bank.buffer.device)


Balance = PrototypeBalance | DensityBalance | LabelBalance | ReferenceBalance


def reference_fingerprint(images: Tensor) -> Tensor:
    """(32,) uint8: the SHA-256 of a reference's images (N, S, S, 3) uint8 in their order, which
    `ReferenceBalance` saves with its estimate."""
    digest = hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).digest()
    return torch.frombuffer(bytearray(digest), dtype=torch.uint8)

# In `resample` mode, by default, the densest tenth of a batch is shown once and every image in
# proportion to its weight relative to them: a quantile, not the batch's one heaviest, so a single
# outlier (a flooded repeat) does not make every other image look rare.
RESAMPLE_REFERENCE_QUANTILE = 0.1


# With skipping, what the signal cannot place is skipped only in a batch it places at least this
# share of: a signal that cannot yet place the stream (a model at its start) has no opinion to skip by.
PLACED_TO_SKIP = 0.5


# Bisection steps that fit a batch's shows to its replay budget: the scale to 2**-30 of its start.
BUDGET_ITERATIONS = 30


def expected_shows(weights: Tensor, max_shows: int, placed: Tensor | None = None,
                   mean_shows: float | None = None, min_shows: float = 1.0,
                   quantile: float = RESAMPLE_REFERENCE_QUANTILE) -> Tensor:
    """How many times each image of a batch with these weights (B,) is to be trained on average: its
    weight over the `quantile` weight of the batch's images the signal `placed` (B,) bool (default:
    all), within [min_shows, max_shows]. Below 1, an image is skipped (not trained at all) that
    often: the most over-represented, and what the signal cannot place, as DINOv2's retrieval keeps
    only what it finds near curated data; but only in a batch the signal places at least
    PLACED_TO_SKIP of: an image not placed is shown `min_shows` times there, once elsewhere. With
    `mean_shows`, a batch that would ask for more shows than that on average has its weights scaled
    down together until it does not, so that what is rarest keeps the most shows."""
    if max_shows < 1:
        raise ValueError(f"max_shows must be >= 1, got {max_shows}")
    if mean_shows is not None and mean_shows < 1:
        raise ValueError(f"mean_shows must be >= 1, got {mean_shows}")
    if not 0.0 < min_shows <= 1.0:
        raise ValueError(f"min_shows must be in (0, 1], got {min_shows}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    weights = weights.float()
    unplaced = torch.tensor(min_shows, device=weights.device)
    if placed is not None:
        # NaN rather than a boolean index: no device sync; a batch with none placed has no reference.
        weights = torch.where(placed, weights, torch.nan)
        # Why: a model at its start places hardly any image near the reference's anchors; skipping
        # all it cannot place then thinned its batches to a tenth, and the model collapsed
        # (docs/curation.md, "Skipping").
        unplaced = torch.where(placed.float().mean() >= PLACED_TO_SKIP, unplaced, 1.0)
    reference = torch.nanquantile(weights, quantile).nan_to_num(1.0).clamp_min(1e-12)

    def shows_at(scale: Tensor) -> Tensor:
        return torch.where(weights.isnan(), unplaced, (weights * scale).clamp(min_shows, float(max_shows)))

    scale = 1.0 / reference
    shows = shows_at(scale)
    if mean_shows is not None:
        # Why: a flood that fills more than the quantile of a batch (junk the reference places on one
        # anchor, copies of one image) sets the reference at its capped weight, and then every other
        # image asks for max_shows, more than the replays can hold, which evens out the shows
        # instead of balancing. Bisection with fixed steps, so no device sync.
        low, high = torch.zeros_like(scale), scale
        for _ in range(BUDGET_ITERATIONS):
            middle = (low + high) / 2
            fits = shows_at(middle).mean() <= mean_shows
            low, high = torch.where(fits, middle, low), torch.where(fits, high, middle)
        shows = torch.where(shows.mean() <= mean_shows, shows, shows_at(low))
    return shows


def resample_shows(weights: Tensor, max_shows: int, generator: torch.Generator | None = None,
                   placed: Tensor | None = None, mean_shows: float | None = None, min_shows: float = 1.0,
                   quantile: float = RESAMPLE_REFERENCE_QUANTILE) -> Tensor:
    """How many times to train each image (B,) int: `expected_shows` rounded up or down at random,
    so that each count's expectation is the ratio (0: skipped, when `min_shows` < 1). Resampling by
    these counts moves what is trained towards what the weights would make of it, with every show a
    fresh view instead of a scaled gradient."""
    ratio = expected_shows(weights, max_shows, placed, mean_shows, min_shows, quantile)
    whole = ratio.floor()
    draw = torch.rand(ratio.shape, device=ratio.device, generator=generator)
    return (whole + (draw < ratio - whole).to(whole.dtype)).to(torch.int64).clamp_max(max_shows)


def build_balance(cfg: CurationConfig, prototypes: int, feature_dim: int,
                  device: torch.device | str | None = None, reference_images: Tensor | None = None) -> Balance | None:
    """The `curation.balance_signal` balance at `curation.balance` (None when it is 0), with its state
    on `device`; `prototypes` and `feature_dim` are the model's (scores and projected features),
    `reference_images` (N, S, S, 3) uint8 the reference's (the "reference" signal's anchors)."""
    if cfg.balance == 0:
        return None
    if cfg.balance_signal == "prototypes":
        return PrototypeBalance(prototypes, cfg.balance, cfg.balance_momentum, device)
    if cfg.balance_signal == "density":
        return DensityBalance(feature_dim, cfg.balance, cfg.balance_bandwidth, cfg.balance_bank, device)
    if cfg.balance_signal == "label":
        return LabelBalance(cfg.balance_classes, cfg.balance, cfg.balance_momentum, device)
    if cfg.balance_signal == "reference":
        if reference_images is None or len(reference_images) < 1:
            raise ValueError("curation.balance_reference: the reference signal needs reference images")
        return ReferenceBalance(len(reference_images), cfg.balance, cfg.balance_momentum,
                                cfg.balance_reference_similarity, device, reference_fingerprint(reference_images))
    raise ValueError(f"curation.balance_signal: unknown signal {cfg.balance_signal!r}")


__all__ = ["build_balance", "expected_shows", "resample_shows", "Balance", "DensityBalance", "LabelBalance",
           "PrototypeBalance", "ReferenceBalance", "UsageBalance", "MAX_RATIO", "MAX_STRENGTH",
           "PLACED_TO_SKIP", "RESAMPLE_REFERENCE_QUANTILE", "raw_weights", "reference_fingerprint", "relative_weights"]
