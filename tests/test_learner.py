from __future__ import annotations

import copy
import io
import math
import os
import signal
import time
import warnings
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stream_swav.config import Config, MetricsConfig, config_from_dict
from stream_swav.data.batch import BatchMeta, CropBatch
from stream_swav.learner import RANK_LOCAL_STATE_KEYS, Learner, StepStats, feature_spread, score_spread
from stream_swav.optim import learning_rate_for
from stream_swav.runtime.metrics import usage_perplexity
from conftest import free_port

# The multi-process tests' ranks are forked from a server that imported torch and the learner once
# (each `spawn`ed rank imported them itself: seconds of CPU each, on a shared 2-core box). The server
# starts no threads, so forking it is safe; each rank is still its own process with its own group.
FORKSERVER = mp.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["torch", "torch.distributed", "torchvision", "stream_swav.learner"])

PROTOTYPES = 16


class SyntheticStream:
    """Endless images of a few visual classes: two-colour stripes whose colours,
    orientation and period depend on the class, under pixel noise. Batches are
    random crops (with horizontal flips) of fresh images, as decode workers make them."""

    def __init__(self, n_classes: int, image_size: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.n_classes = n_classes
        self.image_size = image_size
        self.palette = self.rng.integers(0, 256, (n_classes, 2, 3))

    def images(self, n: int) -> np.ndarray:
        rows, cols = np.mgrid[: self.image_size, : self.image_size]
        out = np.empty((n, self.image_size, self.image_size, 3), np.float32)
        for i, cls in enumerate(self.rng.integers(0, self.n_classes, n)):
            period = 2 + cls % 3
            along = cols if cls % 2 else rows
            stripe = ((along + self.rng.integers(0, period)) // max(1, period // 2)) % 2 == 0
            out[i] = np.where(stripe[..., None], self.palette[cls, 0], self.palette[cls, 1])
        out += self.rng.normal(0, 12, out.shape)
        return np.clip(out, 0, 255).astype(np.uint8)

    def crops(self, images: np.ndarray, count: int, size: int) -> np.ndarray:
        out = np.empty((count, len(images), size, size, 3), np.uint8)
        for view in range(count):
            for i, image in enumerate(images):
                top, left = self.rng.integers(0, self.image_size - size + 1, 2)
                crop = image[top:top + size, left:left + size]
                out[view, i] = crop[:, ::-1] if self.rng.random() < 0.5 else crop
        return out

    def batch(self, cfg: Config) -> CropBatch:
        b, c = cfg.train.batch_size, cfg.crops
        images = self.images(b)
        return CropBatch(global_crops=self.crops(images, c.global_count, c.global_size),
                         local_crops=self.crops(images, c.local_count, c.local_size),
                         meta=BatchMeta(keys=[f"synthetic/{i}" for i in range(b)]))


def tiny_config(**sections: dict[str, Any]) -> Config:
    values: dict[str, Any] = {
        "model": {"arch": "resnet18", "small_stem": True, "hidden_dim": 64, "output_dim": 32,
                  "prototypes": PROTOTYPES},
        "crops": {"global_size": 6, "global_count": 2, "local_size": 4, "local_count": 1},
        "augment": {"hue": 0.0, "saturation": 0.2, "brightness": 0.3, "contrast": 0.3, "grayscale_prob": 0.0,
                    "blur_prob_global": 0.5},
        "swav": {"freeze_prototypes_steps": 1, "queue_length": 0, "queue_start_images": 0},
        "optim": {"warmup_images": 0, "base_lr": 4.8},
        "train": {"batch_size": 4, "seed": 7},
    }
    for section, overrides in sections.items():
        values[section] = {**values.get(section, {}), **overrides}
    return config_from_dict(values)


def learner_snapshot(learner: Learner) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in learner.model.parameters()],
        "buffers": [b.detach().clone() for b in learner.model.buffers()],
        # Every tensor of the optimiser's state: LARS' momentum, AdamW's moments and step counts.
        "optimizer": {(i, key): value.clone()
                      for i, state in enumerate(learner.optimizer.state[p] for p in learner.model.parameters())
                      for key, value in state.items() if isinstance(value, torch.Tensor)},
        "queue": learner.queue.buffer.clone() if learner.queue is not None else None,
    }


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("params", "buffers"):
        for x, y in zip(a[key], b[key]):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for key in a["optimizer"]:
        torch.testing.assert_close(a["optimizer"][key], b["optimizer"][key], rtol=0, atol=0)
    if a["queue"] is not None:
        torch.testing.assert_close(a["queue"], b["queue"], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_learner_learns_on_synthetic_stream_without_collapse():
    torch.set_num_threads(1)
    # A narrow resnet10 (0.3 M parameters): the same code path as a full trunk at a tenth of the time.
    cfg = tiny_config(model={"arch": "resnet10", "width": 16},
                      crops={"global_size": 6, "local_count": 0},
                      augment={"blur_prob_global": 0.0},
                      swav={"freeze_prototypes_steps": 1},
                      optim={"base_lr": 1.2, "trust_coefficient": 0.02, "warmup_images": 32},
                      train={"batch_size": 32})
    learner = Learner(cfg, torch.device("cpu"))
    stream = SyntheticStream(n_classes=8, image_size=10)
    steps = 200
    losses, usage = [], torch.zeros(PROTOTYPES, dtype=torch.int64)
    for i in range(steps):
        stats = learner.train_step(stream.batch(cfg))
        assert not stats.nonfinite
        losses.append(stats.loss.item())
        if i >= steps - 10:
            usage += stats.prototype_counts
    assert stats.step == steps and stats.images_seen == steps * 32
    assert stats.lr == pytest.approx(learning_rate_for(cfg, steps * 32))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.6 * math.log(PROTOTYPES), losses
    assert last < 0.5 * first, losses
    # Which prototype the network prefers stays spread over many of them, and so do the embeddings:
    # the collapse alarm stays quiet on a run that learns.
    assert usage_perplexity(usage.numpy()) > PROTOTYPES / 4, usage.tolist()
    assert stats.feature_spread.item() > 2 * MetricsConfig().collapse_spread
    assert stats.score_spread.item() > 2 * MetricsConfig().collapse_score_spread


def test_collapsed_embeddings_have_no_spread():
    """What the collapse alarm reads: the same image everywhere gives (nearly) the same embedding."""
    torch.set_num_threads(1)
    cfg = tiny_config()
    learner = Learner(cfg, torch.device("cpu"))
    varied = learner.train_step(SyntheticStream(n_classes=4, image_size=8, seed=2).batch(cfg))
    batch = SyntheticStream(n_classes=4, image_size=8, seed=2).batch(cfg)
    batch.global_crops[:] = batch.global_crops[:, :1]
    batch.local_crops[:] = batch.local_crops[:, :1]
    learner.cfg.augment.color_jitter_prob = learner.cfg.augment.blur_prob_global = 0.0
    same = learner.train_step(batch)
    assert same.feature_spread.item() < MetricsConfig().collapse_spread < varied.feature_spread.item()


def test_embeddings_orthogonal_to_every_prototype_have_no_score_spread():
    """The other collapse the alarm reads: with fewer prototypes than embedding dimensions, the
    embeddings can move where no prototype scores them (seen in a long-tail run: loss at ln(K),
    embeddings still spread)."""
    generator = torch.Generator().manual_seed(0)
    dim, prototypes = 64, 30
    embeddings = torch.nn.functional.normalize(torch.randn(2, 128, dim, generator=generator), dim=2)
    away = embeddings.clone()
    away[..., :prototypes] = 0  # nothing along the prototypes' directions
    away = torch.nn.functional.normalize(away, dim=2)
    axes = torch.eye(dim)[:prototypes]
    threshold = MetricsConfig().collapse_score_spread
    assert score_spread(away @ axes.T).item() < threshold < score_spread(embeddings @ axes.T).item()
    assert feature_spread(away).item() > 2 * MetricsConfig().collapse_spread


# A small member of each backbone family, for the tiny crops above (a ViT with 2-pixel patches).
FAMILY_MODELS: dict[str, dict[str, Any]] = {
    "resnet": {"arch": "resnet18", "small_stem": True},
    "regnet": {"arch": "regnet_y_400mf", "small_stem": True},
    "vit": {"arch": "vit_s_16", "small_stem": False, "width": 32, "vit_layers": 2, "vit_heads": 2,
            "vit_patch_size": 2, "vit_image_size": 6},
}
# The ViT trains with AdamW (its default), at an AdamW rate; the others with LARS.
FAMILY_OPTIM: dict[str, dict[str, Any]] = {"vit": {"base_lr": 5e-4}}


@pytest.mark.parametrize("family", FAMILY_MODELS)
def test_state_dict_round_trip_resumes_identically(family):
    torch.set_num_threads(1)
    cfg = tiny_config(model=FAMILY_MODELS[family], optim=FAMILY_OPTIM.get(family, {}),
                      swav={"queue_length": 8, "freeze_prototypes_steps": 2})
    assert cfg.optimizer == ("adamw" if family == "vit" else "lars")
    stream = SyntheticStream(n_classes=4, image_size=8, seed=1)
    learner = Learner(cfg, torch.device("cpu"))
    for _ in range(3):
        stats = learner.train_step(stream.batch(cfg))
    assert learner.queue.is_full and stats.queue_fill == 8

    state = learner.state_dict()
    expected = learner_snapshot(learner)
    # What another rank contributes to a checkpoint is exactly the rank-local part of its state.
    local = learner.rank_local_state()
    assert set(local) == {key for key in RANK_LOCAL_STATE_KEYS if key in state} == {"queue", "cpu_rng", "augment_rng"}
    torch.testing.assert_close(local, {key: state[key] for key in local}, rtol=0, atol=0)
    batch = stream.batch(cfg)
    # Training on after taking the state must not alter it (checkpoints are written in the background).
    original_stats = learner.train_step(batch)

    saved = io.BytesIO()
    torch.save(state, saved)
    saved.seek(0)
    resumed = Learner(cfg, torch.device("cpu"))
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert (resumed.step, resumed.images_seen) == (3, 12)
    assert_same(learner_snapshot(resumed), expected)

    resumed_stats = resumed.train_step(batch)
    assert resumed_stats.loss.item() == original_stats.loss.item()
    assert resumed_stats.figures() == original_stats.figures()
    assert_same(learner_snapshot(resumed), learner_snapshot(learner))


def test_load_state_dict_rejects_mismatched_state_and_changes_nothing():
    cfg = tiny_config()
    learner = Learner(cfg, torch.device("cpu"))
    before = learner_snapshot(learner)
    state = learner.state_dict()
    state["model"]["prototypes.weight"] = torch.zeros(3, 32)
    state["step"] = 99
    with pytest.raises(ValueError, match="prototypes.weight"):
        learner.load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        learner.load_state_dict({"model": {}})
    assert learner.step == 0
    assert_same(learner_snapshot(learner), before)
    # Optimiser buffers of another shape loaded before, and failed the first step after every restart.
    learner.train_step(SyntheticStream(n_classes=4, image_size=8).batch(cfg))
    trained = learner_snapshot(learner)
    state = learner.state_dict()
    index, buffers = next((i, b) for i, b in state["optimizer"]["state"].items() if b)
    name = next(k for k, v in buffers.items() if v.dim() > 0)
    buffers[name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=f"optimizer: {name} of parameter {index} has shape \\(3, 3\\)"):
        learner.load_state_dict(state)
    state["optimizer"]["state"] = {10_000: {}}
    with pytest.raises(ValueError, match="state of an unknown parameter 10000"):
        learner.load_state_dict(state)
    assert learner.step == 1
    assert_same(learner_snapshot(learner), trained)


def test_a_resume_with_another_queue_length_or_code_method_loads_and_starts_what_changed_afresh():
    """swav.queue_length, crops_for_assign or codes changed at a resume: the learners refused every
    checkpoint, where the queue can fill again and the relaxed codes' mass start from uniform."""
    torch.set_num_threads(1)
    stream = SyntheticStream(n_classes=4, image_size=8, seed=1)
    cfg = tiny_config(swav={"queue_length": 8})
    learner = Learner(cfg, torch.device("cpu"))
    for _ in range(3):
        learner.train_step(stream.batch(cfg))
    assert learner.queue.is_full
    state = learner.state_dict()
    weights = {name: value.clone() for name, value in learner.model.state_dict().items()}
    for changed, queue_kept in (({"queue_length": 16}, False), ({"queue_length": 8, "crops_for_assign": [0]}, False),
                                ({"queue_length": 8, "codes": "relaxed"}, True)):
        resumed = Learner(tiny_config(swav=changed), torch.device("cpu"))
        resumed.load_state_dict(copy.deepcopy(state))
        assert resumed.step == 3 and resumed.queue.is_full == queue_kept, changed
        torch.testing.assert_close(resumed.model.state_dict(), weights, rtol=0, atol=0)
        resumed.train_step(stream.batch(cfg))  # and it trains on
    relaxed = Learner(tiny_config(swav={"codes": "relaxed"}), torch.device("cpu"))
    relaxed.load_state_dict(copy.deepcopy(state))
    assert torch.equal(relaxed.codes.mass, torch.full_like(relaxed.codes.mass, 1 / len(relaxed.codes.mass)))
    # What is there is still checked: a damaged queue or mass is refused, not taken for a change.
    for part, value, message in (("queue", {"features": "not a tensor"}, "learner state queue"),
                                 ("codes", {"mass": torch.full((16,), -1.0)}, "relaxed codes state")):
        with pytest.raises(ValueError, match=message):
            relaxed.load_state_dict({**copy.deepcopy(state), part: value})


@pytest.mark.parametrize("saved, now, refused", [("lars", "adamw", "saved by LARS or SGD, this run's is adamw"),
                                                  ("adamw", "sgd", "saved by AdamW, this run's is sgd"),
                                                  ("lars", "sgd", None)])
def test_a_state_of_another_kind_of_optimiser_is_refused_where_it_cannot_serve(saved, now, refused):
    """LARS/SGD state in AdamW failed the first step at every restart (KeyError 'step', taken for a
    learner failure); AdamW's moments in LARS were carried along unused. LARS and SGD share theirs."""
    torch.set_num_threads(1)
    cfg = tiny_config(optim={"optimizer": saved})
    learner = Learner(cfg, torch.device("cpu"))
    learner.train_step(SyntheticStream(n_classes=4, image_size=8).batch(cfg))
    resumed = Learner(tiny_config(optim={"optimizer": now}), torch.device("cpu"))
    if refused is None:
        resumed.load_state_dict(learner.state_dict())
        assert resumed.step == 1
    else:
        with pytest.raises(ValueError, match=refused):
            resumed.load_state_dict(learner.state_dict())


def test_learner_count_must_match_world_size():
    with pytest.raises(ValueError, match=r"world_size=1 is outside 2..train.learners \(2\)"):
        Learner(tiny_config(train={"learners": 2}), torch.device("cpu"))


def test_an_elastic_learner_scales_the_learning_rate_with_the_learners_training_now():
    torch.set_num_threads(1)
    # Up to 4 learners, 1 of them training now: the global batch, and so the rate, is a quarter.
    cfg = tiny_config(train={"learners": 4, "min_learners": 1})
    learner = Learner(cfg, torch.device("cpu"))
    stats = learner.train_step(SyntheticStream(n_classes=4, image_size=8).batch(cfg))
    batch = cfg.train.batch_size
    assert stats.images_seen == batch
    assert stats.lr == pytest.approx(learning_rate_for(cfg, batch, global_batch=batch))
    assert stats.lr == pytest.approx(learning_rate_for(cfg, batch) / 4)


def test_every_rank_counts_the_steps_images_alike_even_when_its_own_batch_is_short():
    torch.set_num_threads(1)
    cfg = tiny_config(train={"learners": 4, "min_learners": 1}, optim={"warmup_images": 100})
    learner = Learner(cfg, torch.device("cpu"))
    short = SyntheticStream(n_classes=4, image_size=8).batch(cfg)
    short = CropBatch(global_crops=short.global_crops[:, :2], local_crops=short.local_crops[:, :2], meta=short.meta)
    # Its own batch holds 2 images; the step's batches held 11 together (the vote says so).
    stats = learner.train_step(short, step_images=11)
    assert stats.images_seen == learner.images_seen == 11
    # The rate is scaled to those 11 images, on every rank alike (linear scaling, as a full batch's).
    assert stats.lr == pytest.approx(learning_rate_for(cfg, 11, global_batch=11))
    assert stats.lr != pytest.approx(learning_rate_for(cfg, 11, global_batch=cfg.train.batch_size))


def test_a_step_that_fails_in_a_collective_leaves_the_learner_as_it_was(monkeypatch):
    torch.set_num_threads(1)
    cfg = tiny_config(swav={"queue_length": 8, "queue_start_images": 0})
    learner = Learner(cfg, torch.device("cpu"))
    stream = SyntheticStream(n_classes=4, image_size=8)
    learner.train_step(stream.batch(cfg))
    before, step, images = learner_snapshot(learner), learner.step, learner.images_seen

    def peer_gone(_loss: Any) -> bool:
        raise RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer")

    monkeypatch.setattr(learner, "_all_finite", peer_gone)
    with pytest.raises(RuntimeError, match="gloo"):
        learner.train_step(stream.batch(cfg))
    # The forward pass ran (BatchNorm statistics moved) but nothing of the step stays.
    assert (learner.step, learner.images_seen) == (step, images)
    assert_same(learner_snapshot(learner), before)
    assert all(p.grad is None for p in learner.model.parameters())


def test_a_joining_learner_adopts_the_shared_state_and_keeps_its_own_queue_and_random_streams():
    torch.set_num_threads(1)
    cfg = tiny_config(swav={"queue_length": 8, "queue_start_images": 0})
    stream = SyntheticStream(n_classes=4, image_size=8)
    leader = Learner(cfg, torch.device("cpu"))
    for _ in range(2):
        leader.train_step(stream.batch(cfg))
    joiner = Learner(cfg, torch.device("cpu"), rank=0)
    own_local = joiner.rank_local_state()
    shared = leader.shared_state()
    assert not set(RANK_LOCAL_STATE_KEYS) & set(shared)
    joiner.adopt(shared)
    assert (joiner.step, joiner.images_seen) == (leader.step, leader.images_seen)
    for mine, theirs in zip(joiner.model.parameters(), leader.model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    led, joined = learner_snapshot(leader), learner_snapshot(joiner)
    assert led["optimizer"].keys() == joined["optimizer"].keys()
    for key in led["optimizer"]:
        torch.testing.assert_close(led["optimizer"][key], joined["optimizer"][key], rtol=0, atol=0)
    # Its queue is its own (still empty), not the leader's.
    assert joiner.queue.fill == 0 < leader.queue.fill
    torch.testing.assert_close(joiner.generator.get_state(), own_local["augment_rng"], rtol=0, atol=0)


def test_nonfinite_loss_skips_update_and_counts_in_a_row():
    torch.set_num_threads(1)
    cfg = tiny_config(swav={"queue_length": 8})
    stream = SyntheticStream(n_classes=4, image_size=8, seed=2)
    learner = Learner(cfg, torch.device("cpu"))
    assert not learner.train_step(stream.batch(cfg)).nonfinite

    weight = learner.model.projection[0].weight
    good_value = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    before = learner_snapshot(learner)
    for in_row in (1, 2):
        stats = learner.train_step(stream.batch(cfg))
        assert stats.nonfinite and stats.nonfinite_in_row == in_row
        assert not math.isfinite(stats.figures().loss)
        # Parameters, momentum, BatchNorm statistics and queue are exactly as before.
        assert_same(learner_snapshot(learner), before)
    assert learner.nonfinite_total == 2 and stats.queue_fill == 4
    assert (stats.step, stats.images_seen) == (3, 12)

    with torch.no_grad():
        weight[0, 0] = good_value
    stats = learner.train_step(stream.batch(cfg))
    assert not stats.nonfinite and stats.nonfinite_in_row == 0 and learner.nonfinite_total == 2
    weight_before = before["params"][[id(p) for p in learner.model.parameters()].index(id(weight))]
    assert torch.isfinite(weight).all() and not torch.equal(weight, weight_before)


def test_queue_is_filled_from_start_images_and_used_only_when_full():
    torch.set_num_threads(1)
    cfg = tiny_config(swav={"queue_length": 8, "queue_start_images": 4})
    stream = SyntheticStream(n_classes=4, image_size=8, seed=3)
    learner = Learner(cfg, torch.device("cpu"))
    seen_queues = []
    assign = learner.codes.assign

    def recording_assign(scores, queued, images_seen, weights):
        seen_queues.append(None if queued is None else queued.clone())
        return assign(scores, queued, images_seen, weights)

    learner.codes.assign = recording_assign
    fills = [learner.train_step(stream.batch(cfg)).queue_fill for _ in range(4)]
    # The first batch came before queue_start_images; the next two fill the queue.
    assert fills == [0, 4, 8, 8]
    assert seen_queues[:3] == [None, None, None]
    # Once full, the queued features, scored against the prototypes, join the assignment.
    assert seen_queues[3] is not None and seen_queues[3].shape == (2, 8, PROTOTYPES)


@pytest.mark.parametrize("method", ["relaxed"])
def test_long_tail_code_methods_train_and_carry_their_state(method):
    torch.set_num_threads(1)
    cfg = tiny_config(swav={"codes": method, "mass_floor_gamma": 0.5})
    stream = SyntheticStream(n_classes=4, image_size=8, seed=5)
    learner = Learner(cfg, torch.device("cpu"))
    initial = {k: v.clone() for k, v in learner.codes.state_dict().items()}
    for _ in range(3):
        stats = learner.train_step(stream.batch(cfg))
        assert torch.isfinite(stats.loss)
    state = learner.codes.state_dict()
    # The running mass estimate has moved off its start.
    assert any(not torch.equal(state[k], initial[k]) for k in state)

    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    restored = Learner(cfg, torch.device("cpu"))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in learner.codes.state_dict().items():
        torch.testing.assert_close(restored.codes.state_dict()[key], value)


def test_prototypes_stay_frozen_for_the_first_steps():
    torch.set_num_threads(1)
    cfg = tiny_config(swav={"freeze_prototypes_steps": 2})
    stream = SyntheticStream(n_classes=4, image_size=8, seed=4)
    learner = Learner(cfg, torch.device("cpu"))
    initial = learner.model.prototypes.weight.detach().clone()
    projection = learner.model.projection[3].weight.detach().clone()
    for _ in range(2):
        learner.train_step(stream.batch(cfg))
    torch.testing.assert_close(learner.model.prototypes.weight, initial, rtol=0, atol=1e-6)
    assert not torch.equal(learner.model.projection[3].weight, projection)
    learner.train_step(stream.batch(cfg))
    assert (learner.model.prototypes.weight - initial).abs().max() > 1e-5
    torch.testing.assert_close(learner.model.prototypes.weight.norm(dim=1), torch.ones(PROTOTYPES))


def test_bad_batches_are_rejected_before_anything_changes():
    cfg = tiny_config()
    stream = SyntheticStream(n_classes=2, image_size=8, seed=5)
    learner = Learner(cfg, torch.device("cpu"))
    good = stream.batch(cfg)
    wrong_count = CropBatch(global_crops=good.global_crops[:1], local_crops=good.local_crops, meta=good.meta)
    wrong_dtype = CropBatch(global_crops=good.global_crops.astype(np.float32), local_crops=good.local_crops,
                            meta=good.meta)
    wrong_batch = CropBatch(global_crops=good.global_crops, local_crops=good.local_crops[:, :2], meta=good.meta)
    for bad, message in ((wrong_count, "crops per image"), (wrong_dtype, "uint8"), (wrong_batch, "batch size")):
        with pytest.raises(ValueError, match=message):
            learner.train_step(bad)
    assert learner.step == 0 and learner.images_seen == 0


def test_read_only_arrays_from_the_object_store_are_accepted_silently():
    cfg = tiny_config()
    batch = SyntheticStream(n_classes=2, image_size=8, seed=6).batch(cfg)
    batch.global_crops.flags.writeable = False
    batch.local_crops.flags.writeable = False
    learner = Learner(cfg, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = learner.train_step(batch)
    assert isinstance(stats, StepStats) and not stats.nonfinite



def _distributed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        cfg = tiny_config(train={"batch_size": 4, "learners": world_size})
        learner = Learner(cfg, torch.device("cpu"), rank=rank, world_size=world_size)
        stream = SyntheticStream(n_classes=4, image_size=8, seed=10 + rank)
        results = {"nonfinite": []}
        results["nonfinite"].append(learner.train_step(stream.batch(cfg)).nonfinite)
        if rank == 1:
            with torch.no_grad():
                learner.model.projection[0].weight[0, 0] = float("nan")
        before = [p.detach().clone() for p in learner.model.parameters()]
        stats = learner.train_step(stream.batch(cfg))
        results["nonfinite"].append(stats.nonfinite)
        results["unchanged"] = all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
                                   for a, b in zip(before, learner.model.parameters()))
        results["images_seen"] = stats.images_seen
        results["params"] = [p.detach().clone() for p in learner.model.parameters()]
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_learners_stay_in_sync_and_skip_together(tmp_path):
    mp.start_processes(_distributed_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="forkserver")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:
        # A NaN on one learner makes both skip, so DDP never waits on a missing backward.
        assert result["nonfinite"] == [False, True]
        assert result["images_seen"] == 2 * 4 * 2
        assert result["unchanged"]
    # Replicas trained on different data still hold identical weights (rank 1's NaN aside).
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        finite = torch.isfinite(b)
        torch.testing.assert_close(a[finite], b[finite], rtol=0, atol=0)


def _uneven_batches_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One step of two ranks whose batches hold 2 and 6 rows: each rank's gradient of its own mean
    loss (taken beside the step's, before DDP averages them), and the gradient the step applied."""
    import stream_swav.learner as learner_module

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        cfg = tiny_config(train={"batch_size": 6, "learners": world_size}, swav={"freeze_prototypes_steps": 0})
        learner = Learner(cfg, torch.device("cpu"), rank=rank, world_size=world_size)
        params = [p for p in learner.model.parameters() if p.requires_grad]
        own: list[torch.Tensor] = []
        plain_loss = learner_module.swav_loss

        def loss_and_own_gradient(*args, **kwargs):
            loss = plain_loss(*args, **kwargs)
            own.extend(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
            return loss

        learner_module.swav_loss = loss_and_own_gradient
        applied: list[torch.Tensor] = []
        optimiser_step = learner.optimizer.step

        def step_seeing_the_gradient(*args, **kwargs):  # LARS rescales the gradients in place
            applied.extend(p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params)
            return optimiser_step(*args, **kwargs)

        learner.optimizer.step = step_seeing_the_gradient
        batch = SyntheticStream(n_classes=4, image_size=8, seed=20 + rank).batch(cfg)
        rows = 2 if rank == 0 else 6
        batch = CropBatch(global_crops=batch.global_crops[:, :rows], local_crops=batch.local_crops[:, :rows],
                          meta=batch.meta)
        learner.train_step(batch, step_images=8)
        torch.save({"own": [g if g is not None else torch.zeros_like(p) for g, p in zip(own, params)],
                    "applied": applied},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ranks_with_uneven_batches_weigh_every_image_alike(tmp_path):
    """A short batch (a shard's end, skipping's thinning) on one rank: the step's gradient is the
    mean over every image of the step, each rank's mean weighed by its rows (2/8 and 6/8), not the
    ranks' means averaged evenly (which would give each of the short rank's images 3x the weight)."""
    mp.start_processes(_uneven_batches_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="forkserver")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected = [0.25 * a + 0.75 * b for a, b in zip(ranks[0]["own"], ranks[1]["own"])]
    evenly = [0.5 * a + 0.5 * b for a, b in zip(ranks[0]["own"], ranks[1]["own"])]
    for rank in ranks:
        for applied, want in zip(rank["applied"], expected):
            torch.testing.assert_close(applied, want, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(expected, evenly))


def test_weight_average_is_what_the_learner_exports_and_resumes():
    cfg = tiny_config(optim={"ema_momentum": 0.9})
    stream = SyntheticStream(n_classes=4, image_size=8, seed=2)
    learner = Learner(cfg, torch.device("cpu"))
    for _ in range(3):
        learner.train_step(stream.batch(cfg))
    exported = learner.exported_backbone_state_dict()
    live = learner.model.backbone_state_dict()
    assert exported.keys() == live.keys() and exported._metadata == live._metadata
    # Trained weights moved past their average; the exported file holds the average.
    assert not torch.equal(exported["conv1.weight"], live["conv1.weight"])
    torch.testing.assert_close(exported["conv1.weight"], learner.average.module.conv1.weight, rtol=0, atol=0)
    assert learner.average.updates == 3

    state = learner.state_dict()
    resumed = Learner(cfg, torch.device("cpu"))
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.exported_backbone_state_dict(), exported, rtol=0, atol=0)
    # A checkpoint from a run without the average starts one from its trained weights.
    del state["average"]
    restarted = Learner(cfg, torch.device("cpu"))
    restarted.load_state_dict(state)
    assert restarted.average.updates == 0
    torch.testing.assert_close(restarted.exported_backbone_state_dict(), live, rtol=0, atol=0)
    # Without the option the trained backbone is exported and no average is kept.
    plain = Learner(tiny_config(), torch.device("cpu"))
    assert plain.average is None and "average" not in plain.state_dict()
    torch.testing.assert_close(plain.exported_backbone_state_dict(), plain.model.backbone_state_dict())


def _peer_loss_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of an elastic group whose last rank dies after the first step."""
    from stream_swav.runtime.actors import is_peer_loss, leave_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=45))
    cfg = tiny_config(train={"batch_size": 4, "learners": world_size, "min_learners": 1})
    learner = Learner(cfg, torch.device("cpu"), rank=rank, world_size=world_size)
    stream = SyntheticStream(n_classes=4, image_size=8, seed=rank)
    learner.train_step(stream.batch(cfg))
    if rank == world_size - 1:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    started = time.monotonic()
    peer_loss = None
    try:
        learner.train_step(stream.batch(cfg))
    except RuntimeError as err:
        peer_loss = is_peer_loss(err)
    if peer_loss:
        leave_process_group(learner, broken=True)
    torch.save({"peer_loss": peer_loss, "seconds": time.monotonic() - started, "step": learner.step,
                "left": not dist.is_initialized()}, f"{out_dir}/rank{rank}.pt")
    # Alive until every survivor has failed: none may learn of the loss from another's exit.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not all(os.path.exists(f"{out_dir}/rank{r}.pt")
                                                  for r in range(world_size - 1)):
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_survivors_of_a_dead_rank_all_fail_their_step_promptly_not_at_the_timeout(tmp_path):
    # Four ranks, the last killed: gloo's ring collectives tell only its neighbours (ranks 0 and 2);
    # rank 1 learns of it because they tear their group down at once, long before the 45 s timeout.
    world_size = 4
    port = free_port()
    workers = [FORKSERVER.Process(target=_peer_loss_worker, args=(rank, world_size, port, str(tmp_path)))
               for rank in range(world_size)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=150)
    assert workers[-1].exitcode == -signal.SIGKILL
    for rank in range(world_size - 1):
        assert workers[rank].exitcode == 0, f"rank {rank} exited with {workers[rank].exitcode}"
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["peer_loss"] and result["left"], (rank, result)
        # The step that failed left the learner at its last whole step.
        assert result["step"] == 1
        assert result["seconds"] < 20, (rank, result)
