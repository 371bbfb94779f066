"""The runtime end to end, in-process: real Ray (one local cluster for the module), real decode
and learner actors, real tar shards on disk or on the moto S3 server, real checkpoints and metrics.

Every test trains a tiny ResNet-18 on CPU for a few steps. Sample-level claims ("each sample of a
pass trained exactly once") use the RecordingLearner, which logs every trained key with its pass.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import badsamples
import pytest
import ray
import torch
from conftest import colour_samples, tar_bytes, use_fake_credentials
from prometheus_client.parser import text_string_to_metric_families
from runtime_helpers import (RAY_ENV, WatchedTrainer, close_trainer, learner_replicas, object_url, parameters_digest,
                             pass_counts, read_replays, run_to_end, sample_keys, tiny_config, write_shard)

from stream_swav import storage
from stream_swav.config import StorageConfig
from stream_swav.curation import SeenSet
from stream_swav.model import BackboneSpec, load_backbone
from stream_swav import checkpoint as ckpt
from stream_swav.runtime import driver
from stream_swav.runtime.metrics import TRAINER_METRIC_NAMES
from stream_swav.runtime.decode_pool import DecodePool
from stream_swav.runtime.cluster import StartupError, plan_cluster
from stream_swav.runtime.learner_group import LearnerFailure, LearnerGroup, LearnersLost
from stream_swav.runtime.lease import LEASE_FILE, Holder, LeaseHeld, LeaseLost, this_process
from stream_swav.runtime.ledger import StreamLedger
from stream_swav.runtime.private_ray import start_ticks
from stream_swav.runtime.reports import ChunkSummary, StepReport

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BAD_SAMPLE_REASONS = {"empty", "not-an-image", "truncated", "too-small"}


@pytest.fixture(scope="module", autouse=True)
def local_ray(moto_endpoint: str):
    """One local Ray for the module. Its workers inherit this environment, S3 settings included."""
    env = pytest.MonkeyPatch()
    use_fake_credentials(env, moto_endpoint)
    # Four logical CPUs on any machine: two decode actors and a learner fit however small it is.
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             runtime_env=RAY_ENV, log_to_driver=False)
    yield
    ray.shutdown()
    env.undo()


def shards_on_disk(folder, sizes: list[int]) -> tuple[str, set[str]]:
    """Shards of flat-colour images under `folder`; returns the folder and every sample key."""
    keys: set[str] = set()
    for index, size in enumerate(sizes):
        samples = colour_samples(size, prefix=f"s{index}", start=100 * index)
        url = write_shard(object_url(str(folder), f"shard-{index}.tar"), tar_bytes(samples))
        keys |= sample_keys(url, samples)
    return str(folder), keys


def bad_samples() -> list[tuple[str, dict[str, bytes]]]:
    """Samples the decoders must skip, one per reason in BAD_SAMPLE_REASONS."""
    chosen = {}
    for name, ext, data, (verdict, reason) in badsamples.all_samples():
        if verdict == "skip" and reason in BAD_SAMPLE_REASONS and reason not in chosen:
            chosen[reason] = (f"bad-{name}-{ext}", {ext: data})
    assert set(chosen) == BAD_SAMPLE_REASONS
    return list(chosen.values())


def scrape(port: int) -> dict[str, list]:
    """Sample name -> [(labels, value)] from a live /metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def metric(samples: dict[str, list], name: str) -> float:
    return sum(value for _, value in samples[name])


def test_readmes_state_diagram_is_the_drivers():
    """README's failure model shows the driver's docstring diagram: one had drifted from the other
    (missing transitions) unnoticed."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    shown = re.search(r"```\n(STARTING   -> RUNNING.*?)```", readme, re.S).group(1)
    documented = re.search(r"\n(  STARTING   -> RUNNING.*?)\n\n", driver.__doc__, re.S).group(1)
    assert shown.rstrip("\n").split("\n") == [line[2:] for line in documented.split("\n")]
    assert {state.name for state in driver.RunState} <= set(re.findall(r"^([A-Z]+) +->", shown, re.M)) | {"FAILED", "DONE"}


def test_end_to_end_on_s3_with_metrics_and_checkpoints(s3_bucket, tmp_path):
    good = colour_samples(24, prefix="a") + colour_samples(20, prefix="b", start=24)
    shard_a = s3_bucket.url("shards/shard-a.tar")
    shard_b = s3_bucket.url("shards/shard-b.tar")
    write_shard(shard_a, tar_bytes(good[:24]), s3_bucket.storage)
    write_shard(shard_b, tar_bytes(good[24:] + bad_samples()), s3_bucket.storage)
    good_keys = sample_keys(shard_a, good[:24]) | sample_keys(shard_b, good[24:])
    ckpt_dir = s3_bucket.url("checkpoints")
    cfg = tiny_config({"data": {"shards": s3_bucket.url("shards/")}, "checkpoint": {"dir": ckpt_dir, "every_steps": 2},
                       "train": {"image_budget": 80}})
    scraped: dict[str, list] = {}
    at_scrape: dict[str, int] = {}

    def scrape_once_pass_zero_is_trained(trainer: WatchedTrainer) -> None:
        # After pass 0 every bad sample has been met, and a checkpoint has been written.
        if not scraped and trainer.ledger.cursor.pass_index >= 1 and trainer.last_checkpoint_step > 0:
            scraped.update(scrape(trainer.metrics_port))
            at_scrape.update(steps=trainer.step, images=trainer.images_seen)

    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", after_chunk=scrape_once_pass_zero_is_trained)

    assert trainer.stop_reason == "budget reached"
    assert trainer.images_seen == len(trainer.trained) >= 80
    assert pass_counts(trainer.trained, 0) == {key: 1 for key in good_keys}

    assert scraped, "the run never finished pass 0 with a checkpoint behind it"
    missing = [name for name in TRAINER_METRIC_NAMES if name not in scraped]
    assert not missing, f"families missing from /metrics: {missing}"
    assert metric(scraped, "stream_swav_images_trained_total") == at_scrape["images"] > 0
    assert metric(scraped, "stream_swav_steps_total") == at_scrape["steps"] > 0
    assert metric(scraped, "stream_swav_images_seen") == at_scrape["images"]
    assert math.isfinite(metric(scraped, "stream_swav_loss"))
    assert 0 < metric(scraped, "stream_swav_feature_spread") <= 2
    assert 0 < metric(scraped, "stream_swav_prototype_score_spread") <= 1
    assert metric(scraped, "stream_swav_bytes_read_total") > 0
    assert metric(scraped, "stream_swav_shards_completed_total") >= 2
    assert metric(scraped, "stream_swav_last_checkpoint_step") >= 2
    assert metric(scraped, "stream_swav_checkpoint_age_seconds") >= 0
    assert metric(scraped, "stream_swav_learner_restarts_total") == 0
    errors = {labels["reason"]: value for labels, value in scraped["stream_swav_decode_errors_total"]}
    assert BAD_SAMPLE_REASONS <= set(errors) and all(errors[r] >= 1 for r in BAD_SAMPLE_REASONS)

    latest = ckpt.read_latest(ckpt_dir, s3_bucket.storage)
    assert latest["step"] == trainer.step and latest["images_seen"] == trainer.images_seen
    assert latest["final"] is True and latest["state_url"].startswith("s3://")
    state = ckpt.load_checkpoint(ckpt_dir, s3_bucket.storage)
    assert state["step"] == trainer.step and state["stream_cursor"]["current_pass"] >= 1
    # Saved every 2 steps; the newest 3 are kept (no milestones below 2 * 10 steps).
    steps = ckpt.list_step_dirs(ckpt_dir, s3_bucket.storage)
    assert len(steps) == 3 and max(steps) == trainer.step
    assert all(storage.exists(storage.join_url(url, ckpt.META), s3_bucket.storage) for url in steps.values())
    backbone = load_backbone(ckpt.load_backbone_state(ckpt_dir, s3_bucket.storage),
                             BackboneSpec("resnet18", small_stem=True, width=16))
    backbone.eval()
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, 16, 16))
    assert features.shape == (2, 128) and torch.isfinite(features).all()


def test_killed_decode_actor_loses_and_repeats_nothing(tmp_path):
    shards, keys = shards_on_disk(tmp_path, [24, 24, 24, 24])
    # Little read-ahead, so pass 0 is still being read when the first chunk ends. The run stops once
    # pass 0 is trained; its time budget is only a backstop: an image budget could be trained by the
    # surviving actor before the replacement is up on a fast machine (as in test_failover's node loss).
    cfg = tiny_config({"data": {"shards": shards, "decode_actors": 2, "inflight_batches_per_actor": 1},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 0},
                       "train": {"image_budget": 0, "time_budget_s": 120, "report_interval_s": 0.2}})
    killed: dict[str, int] = {}

    def kill_mid_shard_then_stop_after_pass_zero(trainer: WatchedTrainer) -> None:
        # Kill an actor part-way through a shard of pass 0: its successor must pick that shard
        # up right after the last sample trained, neither before nor after it.
        for slot, handle in trainer.pool.actors.items():
            started = [key for key in trainer.ledger.holders.get(slot, ())
                       if key[0] == 0 and trainer.ledger.cursor.position(key) > 0]
            if not killed and started:
                pid = ray.get(handle.ready.remote())
                killed.update(slot=slot, pid=pid, step=trainer.step)
                os.kill(pid, signal.SIGKILL)
        if trainer.ledger.cursor.pass_index >= 1:
            trainer.request_stop("pass 0 trained")

    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", after_chunk=kill_mid_shard_then_stop_after_pass_zero)

    assert killed, "no decode actor held a part-read shard of pass 0 at the end of a chunk"
    assert trainer.metrics.registry.get_sample_value("stream_swav_decode_actor_restarts_total") == 1
    assert trainer.stop_reason == "pass 0 trained"
    # Pass 0 exactly once; what of pass 1 got in before the stop, at most once.
    assert pass_counts(trainer.trained, 0) == {key: 1 for key in keys}
    later = [(s.pass_index, s.key) for s in trainer.trained if s.pass_index > 0]
    assert len(later) == len(set(later)) and {key for _, key in later} <= keys


def test_two_cpu_learners_stay_identical(tmp_path):
    shards, keys = shards_on_disk(tmp_path, [24, 24])
    # One reader per learner, one shard at a time: the first 48 samples are exactly pass 0.
    cfg = tiny_config({"data": {"shards": shards, "open_shards_per_actor": 1, "decode_actors": 2},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 2},
                       "train": {"learners": 2, "image_budget": 48}})
    trainer = WatchedTrainer(cfg, tmp_path / "trained.jsonl")
    try:
        assert trainer.run() == 0
        replicas = learner_replicas(trainer)
        state = ckpt.load_checkpoint(cfg.checkpoint.dir, cfg.storage)
    finally:
        close_trainer(trainer)

    assert [(world, rank) for world, rank, *_ in replicas] == [(2, 0), (2, 1)]
    (_, _, digest_0, names, augment_rng_0), (_, _, digest_1, _, augment_rng_1) = replicas
    assert digest_0 == digest_1, "data-parallel replicas diverged"
    # Each step takes one batch per learner: 16 images, counted once per step on every rank.
    assert trainer.step == 3 and trainer.images_seen == 48
    trained = trainer.trained
    assert sorted(s.key for s in trained) == sorted(keys)
    assert {s.rank for s in trained} == {0, 1}
    # The final checkpoint holds those weights, and each rank's own augmentation stream.
    assert parameters_digest(state["model"], names) == digest_0
    assert torch.equal(state["augment_rng"], augment_rng_0)
    assert len(state["other_ranks"]) == 1 and torch.equal(state["other_ranks"][0]["augment_rng"], augment_rng_1)
    assert not torch.equal(augment_rng_0, augment_rng_1)

    # Resumed by three learners (the budget is spent, so none trains): each of the first two takes
    # its own rank's weights and augmentation stream back, and the third, new to the checkpoint,
    # the weights with a stream of its own.
    shards_on_disk(tmp_path, [24, 24, 8])  # a third shard, for the third learner's decode actor
    grown = tiny_config({"data": {"shards": shards, "open_shards_per_actor": 1, "decode_actors": 3},
                         "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 2},
                         "train": {"learners": 3, "image_budget": 48, "cpus_per_learner": 0.25, "cpu_threads": 1}})
    trainer = WatchedTrainer(grown, tmp_path / "resumed.jsonl")
    try:
        assert trainer.run() == 0 and trainer.step == 3
        resumed = learner_replicas(trainer)
    finally:
        close_trainer(trainer)
    assert [digest for _, _, digest, *_ in resumed] == [digest_0] * 3
    assert torch.equal(resumed[0][4], augment_rng_0) and torch.equal(resumed[1][4], augment_rng_1)
    assert not any(torch.equal(resumed[2][4], rng) for rng in (augment_rng_0, augment_rng_1))


def test_backpressure_bounds_batches_waiting(tmp_path):
    shards, _ = shards_on_disk(tmp_path, [16, 16, 16])
    cfg = tiny_config({"data": {"shards": shards, "decode_actors": 2, "inflight_batches_per_actor": 2},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 0},
                       "train": {"image_budget": 0, "time_budget_s": 120, "report_interval_s": 0.2}})
    # Each learner asks each of its decode actors for at most 2 batches ahead of training. The run
    # stops after 8 samples of the gauge, however fast the machine (a budget of 96 images was trained
    # in 4 chunks on an idle machine: too few samples); its time budget is only a backstop.
    capacity = 2 * 2
    held: list[float] = []

    def sample_state(trainer: WatchedTrainer) -> None:
        held.append(trainer.metrics.registry.get_sample_value("stream_swav_object_store_batches_in_flight"))
        if len(held) >= 8:
            trainer.request_stop("gauge sampled")

    run_to_end(cfg, tmp_path / "trained.jsonl", after_chunk=sample_state)

    assert len(held) >= 8
    assert max(held) <= capacity
    # The decoders outran the learner, so the bound is what held them back.
    assert max(held) == capacity


def test_follow_mode_trains_a_shard_that_appears_during_the_run(tmp_path):
    folder = tmp_path / "shards"
    shards, first_keys = shards_on_disk(folder, [16])
    new_samples = colour_samples(16, prefix="late", start=50)
    new_url = object_url(str(folder), "shard-late.tar")
    new_keys = sample_keys(new_url, new_samples)
    cfg = tiny_config({"data": {"shards": shards, "follow": True, "relist_interval_s": 1.0},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 0},
                       "train": {"image_budget": 400}})

    def add_shard_then_stop_once_trained(trainer: WatchedTrainer) -> None:
        if trainer.step >= 1 and not os.path.exists(new_url):
            write_shard(new_url, tar_bytes(new_samples))
        if any(s.key in new_keys for s in trainer.trained):
            trainer.request_stop("new shard trained")

    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", after_chunk=add_shard_then_stop_once_trained)

    assert trainer.stop_reason == "new shard trained"
    assert new_url in [trainer.ledger.cursor.url(i) for i in range(trainer.ledger.cursor.n_shards)]
    trained = {s.key for s in trainer.trained}
    assert first_keys <= trained and trained & new_keys


def test_a_shard_retired_while_a_listing_ran_is_not_brought_back_by_it(tmp_path, caplog):
    """Follow mode lists on a thread of its own, for as long as a big bucket takes: a shard deleted
    after the listing passed it, found gone by a reader meanwhile and retired, is still in that
    listing, which must not bring it back. A listing begun after the retirement still may."""
    shards, _ = shards_on_disk(tmp_path / "shards", [4, 4, 4])
    trainer = driver.Trainer(tiny_config({"data": {"shards": shards, "follow": True},
                                          "checkpoint": {"dir": str(tmp_path / "ckpt")}}))
    listed = trainer.source.list_shards()
    trainer.ledger.rewind(None, 0, listed)
    gone = listed[1]

    def apply_next_listing() -> None:
        deadline = time.monotonic() + 10
        while trainer.retired_since_listing:  # cleared when a listing is applied
            assert time.monotonic() < deadline, "no listing was applied"
            trainer.follow_new_shards()
            time.sleep(0.01)

    caplog.set_level(logging.INFO, logger="stream_swav")
    # A listing that saw the shard begins; the shard is deleted and a reader finds it gone.
    trainer.relisting = driver.Relisting(lambda: list(listed), interval_s=0)
    trainer.follow_new_shards()
    os.remove(gone)
    trainer.retire_gone([gone])
    assert gone not in trainer.ledger.cursor.live_urls() and trainer.retired_since_listing
    apply_next_listing()
    assert gone not in trainer.ledger.cursor.live_urls()
    assert "follow: 1 new shard(s)" not in caplog.text
    # Uploaded again, it is listed by a listing begun after it was retired: it comes back.
    trainer.retired_since_listing = {gone: time.monotonic()}
    time.sleep(0.01)
    trainer.relisting = driver.Relisting(trainer.source.relist, interval_s=0)
    write_shard(gone, tar_bytes(colour_samples(4, prefix="back")))
    apply_next_listing()
    assert gone in trainer.ledger.cursor.live_urls() and "follow: 1 new shard(s)" in caplog.text


def test_a_shard_deleted_between_a_checkpoint_and_a_resume_is_retired_and_the_rest_trained_once(tmp_path, caplog):
    """Bucket retention on an endless stream: a shard gone for good was handed out, failed and logged
    in every pass for ever. Resumed without follow mode, the store is asked and the shard retired."""
    shards, keys = shards_on_disk(tmp_path / "shards", [24, 24, 24, 24])
    base = {"data": {"shards": shards, "open_shards_per_actor": 1},
            "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 0}}
    first = run_to_end(tiny_config({**base, "train": {"image_budget": 32}}), tmp_path / "first.jsonl")
    cursor = first.ledger.cursor
    unfinished = [cursor.url(n) for n in range(cursor.n_shards) if not cursor.is_finished((0, n))]
    gone = unfinished[0]
    os.remove(gone)
    caplog.set_level(logging.INFO, logger="stream_swav")

    def stop_after_pass_one(trainer: WatchedTrainer) -> None:
        if trainer.ledger.cursor.pass_index >= 2:
            trainer.request_stop("two passes trained")

    second = run_to_end(tiny_config({**base, "train": {"image_budget": 10_000}}), tmp_path / "second.jsonl",
                        after_chunk=stop_after_pass_one)

    assert second.stop_reason == "two passes trained"
    assert f"1 shard(s) gone from storage, retired: not read in this pass or later ones unless listed again ({gone})" \
        in caplog.text
    assert second.metrics.registry.get_sample_value("stream_swav_decode_errors_total",
                                                    {"reason": "shard-read-error"}) in (None, 0.0)
    remaining = {key for key in keys if not key.startswith(gone + "/")}
    trained = first.trained + second.trained
    assert {k: n for k, n in pass_counts(trained, 0).items() if k in remaining} == {k: 1 for k in remaining}
    assert pass_counts(trained, 1) == {k: 1 for k in remaining}


def test_the_checkpoint_writer_commits_nothing_into_a_folder_another_run_took_over(tmp_path, caplog):
    """Rank 0 reads the lease itself before it moves latest.json: a save under way when the folder is
    taken over (a long upload, a stalled driver) must not move the new holder's latest.json or prune
    its steps. The driver is made blind to the takeover here, so only rank 0's check stands."""
    shards, _ = shards_on_disk(tmp_path / "shards", [32, 32])
    ckpt_dir = tmp_path / "ckpt"
    cfg = tiny_config({"data": {"shards": shards}, "train": {"image_budget": 48},
                       "checkpoint": {"dir": str(ckpt_dir), "every_steps": 2}})
    taken_at: list[int] = []
    caplog.set_level(logging.INFO, logger="stream_swav")

    def take_over_unseen(trainer: WatchedTrainer) -> None:
        if trainer.last_checkpoint_step > 0 and not taken_at:
            taken_at.append(trainer.last_checkpoint_step)
            trainer.lease.check = lambda last_step: True
            trainer.lease.raise_if_lost = lambda last_step: None
            successor = Holder(run="successor", host="another-host", boot="b", pid=7, pid_ticks=1)
            (ckpt_dir / LEASE_FILE).write_bytes(successor.to_json())

    run_to_end(cfg, tmp_path / "run.jsonl", after_chunk=take_over_unseen, expect=driver.EXIT_FINAL_CHECKPOINT_FAILED)
    assert taken_at
    assert ckpt.read_latest(str(ckpt_dir), StorageConfig())["step"] == taken_at[0]
    assert max(ckpt.list_step_dirs(str(ckpt_dir), StorageConfig())) == taken_at[0]
    assert "holds " + str(ckpt_dir) + " now; this run's checkpoint is not made the latest there" in caplog.text


@pytest.mark.parametrize("follow", [True, False])
def test_a_shard_found_gone_by_its_reader_is_counted_and_retired_when_following(tmp_path, caplog, follow):
    """A listed shard that is not there (deleted after the listing, or a list line naming nothing)
    was an ERROR and a shard-read-error in every pass. Following the listing, it is retired at once
    (the next listing naming it brings it back); without, a shard missing for a while (a mount that
    dropped out) must not be dropped for the rest of the run: it is counted shard-gone each pass."""
    folder, keys = shards_on_disk(tmp_path / "shards", [24, 24, 24])
    missing = object_url(folder, "shard-9.tar")
    listing = tmp_path / "shards.txt"
    listing.write_text("".join(f"{object_url(folder, f'shard-{n}.tar')}\n" for n in (0, 1, 2)) + missing + "\n")
    caplog.set_level(logging.INFO, logger="stream_swav")

    def stop_after_pass_two(trainer: WatchedTrainer) -> None:
        if trainer.ledger.cursor.pass_index >= 3:
            trainer.request_stop("three passes trained")

    trainer = run_to_end(tiny_config({"data": {"shards": str(listing), "open_shards_per_actor": 1,
                                               "follow": follow, "relist_interval_s": 3600},
                                      "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 0},
                                      "train": {"image_budget": 10_000}}),
                         tmp_path / "run.jsonl", after_chunk=stop_after_pass_two)

    assert trainer.stop_reason == "three passes trained"
    errors = trainer.metrics.registry.get_sample_value
    gone = errors("stream_swav_decode_errors_total", {"reason": "shard-gone"})
    assert gone == 1.0 if follow else gone >= 3.0  # once per pass (a fourth may have opened by the stop)
    assert errors("stream_swav_decode_errors_total", {"reason": "shard-read-error"}) in (None, 0.0)
    assert caplog.text.count(f"1 shard(s) gone from storage, retired: not read in this pass or later ones unless "
                             f"listed again ({missing})") == (1 if follow else 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    for pass_index in (0, 1, 2):
        assert pass_counts(trainer.trained, pass_index) == {key: 1 for key in keys}


def test_a_run_on_a_checkpoint_dir_that_a_live_run_holds_is_refused_before_reading_it(tmp_path):
    """A job submitted twice: the second would overwrite the first's latest.json and prune its steps."""
    shards, _ = shards_on_disk(tmp_path / "shards", [16, 16])
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    # Checkpoints that do not load: read before the lease, they would end the run in another line.
    (ckpt_dir / "latest.json").write_text("{damaged")
    (ckpt_dir / "step-000000004").mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        holder = dataclasses.replace(this_process("first-job"), pid=sleeper.pid, pid_ticks=start_ticks(sleeper.pid))
        (ckpt_dir / LEASE_FILE).write_bytes(holder.to_json())
        trainer = WatchedTrainer(tiny_config({"data": {"shards": shards}, "checkpoint": {"dir": str(ckpt_dir)}}),
                                 tmp_path / "second.jsonl")
        try:
            refusal = rf"^checkpoint.dir: {re.escape(str(ckpt_dir))} is in use by another run, run first-job \(pid "
            with pytest.raises(LeaseHeld, match=refusal + rf"{sleeper.pid} on "):
                trainer.run()
        finally:
            close_trainer(trainer)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert trainer.pool is None and not trainer.trained  # nothing started, nothing trained
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest.json", LEASE_FILE, "step-000000004"]
    assert Holder.from_json(json.loads((ckpt_dir / LEASE_FILE).read_text())).run == "first-job"


def test_a_run_whose_lease_is_taken_over_stops_before_its_next_save(tmp_path):
    """A driver taken for dead (its storage out of reach for a term) while another run took the folder
    over: once it finds the other run's lease, it saves nothing more and ends in one line."""
    shards, _ = shards_on_disk(tmp_path / "shards", [64, 64])
    ckpt_dir = tmp_path / "ckpt"
    cfg = tiny_config({"data": {"shards": shards}, "train": {"image_budget": 10_000},
                       "checkpoint": {"dir": str(ckpt_dir), "every_steps": 2}})
    taken_at: list[int] = []

    def take_over_after_the_first_checkpoint(trainer: WatchedTrainer) -> None:
        if trainer.last_checkpoint_step > 0 and not taken_at:
            taken_at.append(trainer.last_checkpoint_step)
            successor = Holder(run="successor", host="another-host", boot="b", pid=7, pid_ticks=1)
            (ckpt_dir / LEASE_FILE).write_bytes(successor.to_json())

    with pytest.raises(LeaseLost, match=r"^checkpoint.dir: run successor \(pid 7 on another-host\) took .* this run "
                                        r"stops without saving .* the last checkpoint it saved is step \d+$"):
        run_to_end(cfg, tmp_path / "run.jsonl", after_chunk=take_over_after_the_first_checkpoint)
    assert taken_at
    assert ckpt.read_latest(str(ckpt_dir), StorageConfig())["step"] == taken_at[0]
    assert max(ckpt.list_step_dirs(str(ckpt_dir), StorageConfig())) == taken_at[0]
    assert Holder.from_json(json.loads((ckpt_dir / LEASE_FILE).read_text())).run == "successor"


def test_a_run_that_trains_nothing_says_why_and_trains_once_a_shard_appears(tmp_path, caplog):
    folder = tmp_path / "shards"
    folder.mkdir()
    samples = colour_samples(16, prefix="late")
    url = object_url(str(folder), "shard-0.tar")
    keys = sample_keys(url, samples)
    cfg = tiny_config({"data": {"shards": str(folder), "follow": True, "relist_interval_s": 1.0},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 0},
                       "train": {"stall_warning_s": 1.0}})
    caplog.set_level(logging.INFO, logger="stream_swav")

    def write_the_shard_once_warned_then_stop_once_trained(trainer: WatchedTrainer) -> None:
        if "no step trained for" in caplog.text and not os.path.exists(url):
            write_shard(url, tar_bytes(samples))
        if keys <= {s.key for s in trainer.trained}:
            trainer.request_stop("shard trained")

    trainer = run_to_end(cfg, tmp_path / "trained.jsonl",
                         after_chunk=write_the_shard_once_warned_then_stop_once_trained)

    warnings = [r.getMessage() for r in caplog.records if "no step trained for" in r.getMessage()]
    assert warnings and "no shard listed yet (data.follow waits for new ones)" in warnings[0]
    assert trainer.stop_reason == "shard trained"


class NoWaitEvent(threading.Event):
    """A stop flag whose waits (the driver's back-off between recoveries) return at once."""

    def wait(self, timeout: float | None = None) -> bool:
        return self.is_set()


def test_learners_that_do_not_start_within_the_timeout_after_placement_are_refused_in_one_line(tmp_path):
    """The start deadline covers placement and start-up: learners placed in time whose start runs
    past it (here the decode actors' launch takes the rest) are refused naming the setting, where
    the wait's GetTimeoutError had escaped as a traceback."""
    cfg = tiny_config({"data": {"shards": str(tmp_path)}, "train": {"learners": 2, "startup_timeout_s": 4}})
    group = LearnerGroup(cfg, plan_cluster(cfg, ray.cluster_resources()))
    try:
        with pytest.raises(StartupError, match=r"^train\.startup_timeout_s: the learners were placed but did not "
                                               r"start within 4s of asking for them; raise it$"):
            group.start(threading.Event(), while_starting=lambda: time.sleep(5))
    finally:
        group.shutdown()


def test_a_storage_blip_while_recovering_is_a_counted_failure_not_a_traceback(tmp_path, caplog):
    """Recovery lists the shards and the checkpoints when nodes or the network are unwell: a listing
    that times out is one more failure, tried again within train.max_failures, and a spent budget
    ends the run in one line (exit 1), where the TimeoutError had escaped as a traceback."""
    cfg = tiny_config({"data": {"shards": str(tmp_path)}, "checkpoint": {"dir": str(tmp_path / "ckpt")},
                       "train": {"max_failures": 2}})
    trainer = driver.Trainer(cfg)
    trainer.stop = NoWaitEvent()
    listings = []

    def timing_out() -> list[str]:
        listings.append(1)
        raise TimeoutError("ListObjectsV2 read timeout")

    trainer.source.list_shards = timing_out
    trainer.state, trainer.failure_cause = driver.RunState.RECOVERING, "learner 0: ActorDiedError: node lost"
    assert trainer.run() == driver.EXIT_FAILED
    assert len(listings) == 2 and trainer.restarts == 3
    assert ("learners failed 3 time(s), more than train.max_failures=2; last cause: listing the shards or the "
            "checkpoints failed: TimeoutError: ListObjectsV2 read timeout") in caplog.text


def test_a_store_that_does_not_answer_when_the_run_looks_for_its_checkpoint_is_a_counted_failure(tmp_path, caplog):
    """At the start, the checkpoint folder read times out (the pre-start checks had reached it): no
    traceback and no fallback to an older checkpoint, but a counted failure tried again, and the
    budget's one line."""
    (tmp_path / "shard-0.tar").write_bytes(tar_bytes(colour_samples(2)))
    cfg = tiny_config({"data": {"shards": str(tmp_path)}, "checkpoint": {"dir": str(tmp_path / "ckpt")},
                       "train": {"max_failures": 1}})
    trainer = driver.Trainer(cfg)
    trainer.stop = NoWaitEvent()

    def timing_out():
        raise TimeoutError("GetObject read timeout")

    trainer.resume_point = timing_out
    assert trainer.run() == driver.EXIT_FAILED
    assert trainer.restarts == 2
    assert "reading the checkpoints failed: TimeoutError: GetObject read timeout" in caplog.text
    assert ("more than train.max_failures=1; last cause: listing the shards or the checkpoints failed: "
            "TimeoutError: GetObject read timeout") in caplog.text


def test_the_reading_settings_of_a_checkpoint_come_from_its_saved_configuration():
    saved = {"shuffle_buffer": 100, "shuffle_buffer_bytes": 0, "max_sample_bytes": 1 << 20, "max_shard_bytes": 0,
             "max_expansion": 0.0}
    assert driver.saved_read_order({"data": saved}) == driver.ReadOrder(100, 0, 1 << 20, 0, 0.0)
    assert driver.saved_read_order(None) is None and driver.saved_read_order({"data": None}) is None
    assert driver.saved_read_order({"data": {**saved, "shuffle_buffer": "many"}}) is None  # edited: this run's


class SavingGroup:
    """A learner group whose rank 0 raises each of `failures` in turn from its saves, then saves."""

    actors = ["rank 0"]

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures, self.saves = list(failures), 0

    def save(self, directory, extra, info, lease_run=None, displaced_run=None) -> ckpt.CheckpointInfo:
        self.saves += 1
        if self.failures:
            raise ray.exceptions.RayTaskError("save_checkpoint", "Traceback: ...", self.failures.pop(0))
        return ckpt.CheckpointInfo(step=120, images_seen=960, step_url=f"{directory}/step-000000120", state_url="",
                                   backbone_url="", latest_url="", bytes_written=1, duration_s=0.1,
                                   wall_time=time.time(), deleted=())

    def shutdown(self) -> None:
        pass


def stopping_trainer(tmp_path, group) -> driver.Trainer:
    """A Trainer at step 120 (100 saved) told to stop, with `group` as its learners."""
    cfg = tiny_config({"data": {"shards": str(tmp_path)}, "checkpoint": {"dir": str(tmp_path / "ckpt")}})
    trainer = driver.Trainer(cfg)
    trainer.group, trainer.pool = group, DecodePool(cfg, learners=1)
    trainer.step, trainer.images_seen, trainer.last_checkpoint_step = 120, 960, 100
    trainer.request_stop("SIGTERM")
    trainer.state = driver.RunState.STOPPING
    return trainer


def test_a_final_checkpoint_the_store_did_not_answer_is_tried_again(tmp_path, monkeypatch, caplog):
    """A storage blip at the end of a days-long run: the final save is tried again (pauses doubling)
    while the store does not answer, and the run ends saved, exit 0, where it used to exit 4."""
    monkeypatch.setattr(driver, "FINAL_SAVE_FIRST_PAUSE_S", 0.01)
    group = SavingGroup([TimeoutError("PutObject: read timeout"), ConnectionError("connection reset")])
    trainer = stopping_trainer(tmp_path, group)
    assert trainer.run() == 0
    assert group.saves == 3 and trainer.last_checkpoint_step == 120
    assert caplog.text.count("failed because the store did not answer; trying again") == 2
    assert "trying again in 0.01s" in caplog.text and "trying again in 0.02s" in caplog.text
    assert trainer.metrics.registry.get_sample_value("stream_swav_checkpoint_failures_total") == 2


def test_a_final_checkpoint_refused_otherwise_is_not_tried_again(tmp_path, monkeypatch, caplog):
    """A full disk (the save already made what room it could) or a bug: another try would fail
    the same way. And a store that stays silent is given up on after FINAL_SAVE_RETRY_S."""
    monkeypatch.setattr(driver, "FINAL_SAVE_FIRST_PAUSE_S", 0.01)
    group = SavingGroup([OSError(28, "No space left on device")])
    assert stopping_trainer(tmp_path, group).run() == driver.EXIT_FINAL_CHECKPOINT_FAILED
    assert group.saves == 1 and "trying again" not in caplog.text
    assert "final checkpoint at step 120 failed; the last checkpoint saved is step 100" in caplog.text
    monkeypatch.setattr(driver, "FINAL_SAVE_RETRY_S", 0.1)
    group = SavingGroup([TimeoutError("PutObject: read timeout")] * 100)
    assert stopping_trainer(tmp_path, group).run() == driver.EXIT_FINAL_CHECKPOINT_FAILED
    assert 2 <= group.saves <= 5  # pauses of 0.01, 0.02, 0.04 (0.08 would end past the 0.1 s)


def test_a_final_save_that_reported_a_failure_after_it_was_committed_is_not_written_again(tmp_path, monkeypatch,
                                                                                          caplog):
    """The store stopped answering after latest.json named the new step (the retention pass, the
    reply): a second save of that step would be refused ("not overwriting"); the retry marks it
    final instead, and the run ends saved at that step."""
    monkeypatch.setattr(driver, "FINAL_SAVE_FIRST_PAUSE_S", 0.01)
    caplog.set_level(logging.INFO, logger="stream_swav")

    class CommittedThenFailed(SavingGroup):
        def save(self, directory, extra, info, lease_run=None, displaced_run=None) -> ckpt.CheckpointInfo:
            self.saves += 1
            ckpt.save_checkpoint(directory, step=120, images_seen=960, state={"step": 120}, backbone={},
                                 info=info, storage_cfg=StorageConfig())
            raise ray.exceptions.RayTaskError("save_checkpoint", "Traceback: ...", TimeoutError("read timeout"))

    trainer = stopping_trainer(tmp_path, CommittedThenFailed([]))
    assert trainer.run() == 0
    assert trainer.group.saves == 1 and trainer.last_checkpoint_step == 120
    assert "checkpoint step 120 was saved by the try that reported a failure" in caplog.text
    assert ckpt.read_latest(str(tmp_path / "ckpt"), StorageConfig())["final"] is True


def test_marking_the_final_checkpoint_is_tried_again_while_the_store_does_not_answer(tmp_path, monkeypatch,
                                                                                      caplog):
    """Stopped right after a periodic save: only latest.json's `final` is left to write; a read
    of latest.json (or the lease) that timed out is tried again, not an exit 4 for a saved run."""
    monkeypatch.setattr(driver, "FINAL_SAVE_FIRST_PAUSE_S", 0.01)
    answers: list[BaseException | bool] = [TimeoutError("GetObject: read timeout"), True]

    def mark_final(*args, **kwargs) -> bool:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(ckpt, "mark_final", mark_final)
    trainer = stopping_trainer(tmp_path, SavingGroup([]))
    trainer.last_checkpoint_step = 120
    assert trainer.run() == 0
    assert not answers and trainer.group.saves == 0
    assert "could not mark checkpoint step 120 as final: TimeoutError" in caplog.text
    assert "trying again in 0.01s" in caplog.text


def test_a_stop_whose_final_checkpoint_loses_every_elastic_learner_exits_4(tmp_path, caplog):
    """SIGTERM; the final save fails because the node holding both learners of an elastic group is
    gone. New learners from the latest checkpoint could only save that again: the run ends with exit
    4 naming what was lost, where it had restarted the group, met the stop and exited 0."""
    cfg = tiny_config({"data": {"shards": str(tmp_path)}, "checkpoint": {"dir": str(tmp_path / "ckpt")},
                       "train": {"learners": 2, "min_learners": 1, "max_failures": 5}})
    saves, starts = [], []

    class LostGroup:
        actors = ["rank 0", "rank 1"]

        def save(self, *args):
            saves.append(args)
            raise LearnerFailure("checkpoint: ActorDiedError: the actor died (node lost)")

        def losses(self) -> LearnersLost:
            return LearnersLost({0: "node lost", 1: "node lost"})

        def shutdown(self) -> None:
            pass

    trainer = driver.Trainer(cfg)
    trainer.group, trainer.pool = LostGroup(), DecodePool(cfg, learners=2)
    trainer.start_actors = lambda: starts.append(1)
    trainer.step, trainer.images_seen, trainer.last_checkpoint_step = 120, 960, 100
    trainer.request_stop("SIGTERM")
    trainer.state = driver.RunState.STOPPING
    assert trainer.run() == driver.EXIT_FINAL_CHECKPOINT_FAILED
    assert len(saves) == 1 and not starts
    assert "the last checkpoint saved is step 100, of 120 trained" in caplog.text


def test_a_stall_names_the_shards_each_learners_decode_actors_hold(tmp_path, caplog, monkeypatch):
    """The arrangement of a stall the learners cannot leave by themselves: one learner's decode
    actor holds every shard left, the other's none (no Ray needed: the driver's own bookkeeping)."""
    cfg = tiny_config({"data": {"shards": str(tmp_path)}, "train": {"stall_warning_s": 0.2}})
    # The driver's clock moved by hand: a sleep on a loaded machine can overshoot the warning's limit.
    now = [time.monotonic()]
    monkeypatch.setattr(driver, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    trainer = driver.Trainer(cfg)
    trainer.ledger.follow_listing([f"{tmp_path}/shard-{n}.tar" for n in range(4)])
    trainer.ledger.top_up([0])
    trainer.pool = DecodePool(cfg, learners=2)
    trainer.pool.actors, trainer.pool.rank_of = {0: "handle", 1: "handle"}, {0: 0, 1: 1}
    caplog.set_level(logging.INFO, logger="stream_swav")
    idle = ChunkSummary.merge([StepReport(rank=0), StepReport(rank=1)])

    def chunk(summary: ChunkSummary = idle, seconds: float = 0.15) -> None:
        started = now[0]
        now[0] += seconds
        trainer.watch_for_stall(summary, started)

    chunk()
    assert "no step trained" not in caplog.text  # not yet
    chunk()
    assert re.search(r"no step trained for \d+s: the learners wait for batches", caplog.text)
    assert "shards held for each learner: learner 0: 4, learner 1: 0" in caplog.text
    caplog.clear()
    chunk(dataclasses.replace(idle, steps=1))
    chunk()
    assert "no step trained" not in caplog.text  # a step started the count again
    trainer.ledger.paused_until = now[0] + 30  # passes that read nothing hold shards back
    chunk()
    assert re.search(r"no shard handed out for another \d+s: the last pass read nothing", caplog.text)


def test_non_finite_losses_in_a_row_take_the_run_from_running_to_failed(tmp_path, caplog):
    """The RUNNING handler's verdict, on a stand-in learner group whose every step is non-finite:
    FAILED after train.max_nonfinite_in_row of them, exit 3, no checkpoint asked for."""
    # A checkpoint would be due at step 3, the step that ends the run.
    cfg = tiny_config({"data": {"shards": str(tmp_path)},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 3},
                       "train": {"max_nonfinite_in_row": 3}})

    class NonFiniteGroup:
        step = 0

        def run_chunk(self, max_steps: int, max_seconds: float) -> list[StepReport]:
            self.step += 1
            return [StepReport(rank=0, steps=1, step=self.step, images=8, images_seen=8 * self.step,
                               prototype_counts=[0] * cfg.model.prototypes, nonfinite=1, nonfinite_in_row=self.step)]

        def save(self, *args):
            raise AssertionError("no checkpoint after non-finite steps")

    class IdlePool:
        def up(self) -> int:
            return 1

        def poll(self, ledger, regain: bool = True) -> dict:
            return {}  # no decode actor launched again

        def top_up(self, ledger) -> None:
            pass

    trainer = driver.Trainer(cfg)
    trainer.group, trainer.pool, trainer.started = NonFiniteGroup(), IdlePool(), 0.0
    trainer.state = driver.RunState.RUNNING
    states = []
    handle_chunk = trainer.train_chunk

    def watched_chunk() -> driver.RunState:
        states.append(handle_chunk())
        return states[-1]

    trainer.train_chunk = watched_chunk
    assert trainer.run() == driver.EXIT_NONFINITE
    assert states == [driver.RunState.RUNNING, driver.RunState.RUNNING, driver.RunState.FAILED]
    assert trainer.state is driver.RunState.FAILED and trainer.step == 3
    assert trainer.metrics.registry.get_sample_value("stream_swav_nonfinite_loss_total") == 3
    assert "3 non-finite losses in a row (train.max_nonfinite_in_row=3)" in caplog.records[-1].getMessage()


def test_a_learner_lost_while_given_decode_actors_is_left_to_the_next_chunk(tmp_path, caplog):
    """A learner that dies between chunks fails the attach of its relaunched or replaced decode
    actors: the driver logs it and goes on (the others took theirs), and the chunk that follows
    meets the loss as any other, RECOVERING here (a fixed group); it does not escape the run loop."""
    cfg = tiny_config({"data": {"shards": str(tmp_path)}})
    attached: list[dict] = []

    class DyingGroup:
        chunks = 0

        def attach(self, feeders: dict) -> None:
            attached.append(feeders)
            raise LearnerFailure("attaching decode actors: the actor died unexpectedly")

        def run_chunk(self, max_steps: int, max_seconds: float) -> list[StepReport]:
            self.chunks += 1
            if self.chunks == 2:
                raise LearnerFailure("learner 1: the actor died unexpectedly")
            return [StepReport(rank=rank, steps=1, step=1, images=8, images_seen=8, failed_feeders=[rank],
                               prototype_counts=[0] * cfg.model.prototypes) for rank in (0, 1)]

    class RelaunchingPool:
        def up(self) -> int:
            return 2

        def poll(self, ledger, regain: bool = True) -> dict:
            return {1: {1: "relaunched"}}

        def top_up(self, ledger) -> None:
            pass

        def replace(self, slots, ledger) -> dict:
            return {rank: {slot: "replacement"} for rank, slot in enumerate(slots)}

    trainer = driver.Trainer(cfg)
    trainer.group, trainer.pool, trainer.started = DyingGroup(), RelaunchingPool(), 0.0
    caplog.set_level(logging.WARNING, logger="stream_swav")
    assert trainer.train_chunk() is driver.RunState.RUNNING  # both attaches failed, the chunk ran
    assert attached == [{1: {1: "relaunched"}}, {0: {0: "replacement"}, 1: {1: "replacement"}}]
    assert trainer.step == 1 and caplog.text.count("the next chunk deals with the learner") == 2
    assert trainer.train_chunk() is driver.RunState.RECOVERING
    assert trainer.failure_cause == "learner 1: the actor died unexpectedly"


from test_curation import hashes_of  # noqa: E402 - beside the helpers of the dedup test below


def scene_jpeg(seed: int) -> bytes:
    """A textured JPEG, distinct per seed (flat colours would all hash alike)."""
    from test_curation import scene

    buffer = io.BytesIO()
    scene(seed, size=32).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def shards_with_repeats(folder, shards: int = 4) -> dict[str, int]:
    """Shards of ten textured images each, then byte copies of five of the next shard's (whatever
    the pass order, copies of some images come after their originals, some before); returns the
    scene of every sample key."""
    scene_of: dict[str, int] = {}
    os.makedirs(folder, exist_ok=True)
    for index in range(shards):
        own = [(f"s{index}-{n}", 10 * index + n) for n in range(10)]
        copies = [(f"s{index}-copy{n}", 10 * ((index + 1) % shards) + n) for n in range(5)]
        url = object_url(str(folder), f"shard-{index}.tar")
        write_shard(url, tar_bytes([(key, {"jpg": scene_jpeg(seed)}) for key, seed in own + copies]))
        scene_of.update({f"{url}/{key}": seed for key, seed in own + copies})
    return scene_of


def test_dedup_trains_each_image_once_per_pass_through_a_checkpoint_and_resume(tmp_path):
    """curation.dedup: byte copies of images read earlier (some by then trained, some only read) are
    dropped; the seen-set saved with a checkpoint holds exactly the trained images, so a resumed
    run neither trains a repeat of something trained before nor drops an image it re-reads."""
    scene_of = shards_with_repeats(tmp_path / "shards")
    overrides = {"data": {"shards": str(tmp_path / "shards")}, "curation": {"dedup": True},
                 "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 2},
                 "train": {"image_budget": 10_000, "report_interval_s": 0.2}}
    log = tmp_path / "trained.jsonl"

    def stop_mid_pass_zero(trainer: WatchedTrainer) -> None:
        if trainer.step >= 3:
            trainer.request_stop("mid pass 0")

    first = run_to_end(tiny_config(overrides), log, after_chunk=stop_mid_pass_zero)
    assert first.ledger.cursor.pass_index == 0
    trained_first = {scene_of[s.key] for s in first.trained}
    saved = ckpt.load_checkpoint(str(tmp_path / "ckpt"), first.cfg.storage)["seen_set"]
    # Cut back to the cursor: the hashes of what was trained, none of what was only read ahead.
    assert len(hashes_of(saved)) == len(trained_first) and 0 < len(trained_first) < 40

    def stop_after_pass_zero(trainer: WatchedTrainer) -> None:
        if trainer.ledger.cursor.pass_index >= 1:
            trainer.request_stop("pass 0 trained")

    second = run_to_end(tiny_config(overrides), log, after_chunk=stop_after_pass_zero)
    pass_zero = collections.Counter(scene_of[s.key] for s in second.trained if s.pass_index == 0)
    assert pass_zero == {seed: 1 for seed in range(40)}
    dropped = second.metrics.registry.get_sample_value("stream_swav_curation_dropped_total",
                                                       {"reason": "duplicate"})
    assert dropped and dropped >= 1


def test_decode_actors_starting_together_get_the_seen_set_packed_once(tmp_path):
    """Packing the union takes seconds at the default capacity and its state is ~10 MB: actors that
    start together share one packing and one object (that each absorbs it, the dedup tests below
    show through what they train)."""
    union = SeenSet(100)
    for position in range(20):
        union.admit(1_000 + position, (0, 0), position)
    packed: list[int] = []

    def seen_source() -> dict:
        packed.append(1)
        return union.state_dict()

    cfg = tiny_config({"data": {"shards": str(tmp_path)}, "curation": {"dedup": True}})
    pool = DecodePool(cfg, learners=1, seen_source=seen_source)
    try:
        pool.launch(3)
        pool.wait_started(threading.Event())
        assert len(pool.actors) == 3 and len(packed) == 1
    finally:
        pool.shutdown()


def test_a_replacement_decode_actor_lost_while_starting_is_launched_again(tmp_path):
    """A decode actor's replacement whose process or node is lost before it is up (a preempted CPU
    node) may start on the next try, as one not placed in time may: a learner's only decode actor is
    launched again, where the run had ended in a misleading one-line StartupError; only an actor
    whose constructor raised is given up on."""
    cfg = tiny_config({"data": {"shards": str(tmp_path)}, "train": {"startup_timeout_s": 60}})
    pool = DecodePool(cfg, learners=1)
    ledger = StreamLedger(0, 2)
    try:
        pool.launch(1)
        pool.wait_started(threading.Event())
        pool.replace([0], ledger)
        lost = pool.actors[0]
        ray.kill(lost, no_restart=True)
        relaunched = pool.poll(ledger)
        deadline = time.monotonic() + 30
        while not relaunched and time.monotonic() < deadline:  # until the kill is seen
            time.sleep(0.2)
            relaunched = pool.poll(ledger)
        assert list(relaunched) == [0] and relaunched[0][0] is pool.actors[0] is not lost
        assert not pool.dropped
        ray.get(pool.actors[0].ready.remote(), timeout=60)
    finally:
        pool.shutdown()


def test_dedup_with_two_decode_actors_and_one_killed_loses_no_image(tmp_path):
    """Two decode actors, each with its own seen-set, meeting at checkpoints; one is killed mid-pass
    and its replacement starts from the union. Every sample is still trained at most once and every
    image at least once in pass 0; a repeat is admitted at most once per actor that reads it (two
    actors, and the killed one's replacement, which forgot what its predecessor admitted)."""
    scene_of = shards_with_repeats(tmp_path / "shards", shards=6)
    cfg = tiny_config({"data": {"shards": str(tmp_path / "shards"), "decode_actors": 2,
                                "inflight_batches_per_actor": 1},
                       "curation": {"dedup": True}, "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 2},
                       "train": {"image_budget": 10_000, "report_interval_s": 0.2}})
    killed: dict[str, int] = {}

    def kill_one_after_a_checkpoint_then_stop(trainer: WatchedTrainer) -> None:
        if not killed and trainer.last_checkpoint_step > 0 and trainer.ledger.cursor.pass_index == 0:
            slot, handle = next(iter(trainer.pool.actors.items()))
            killed.update(slot=slot, pid=ray.get(handle.ready.remote()))
            os.kill(killed["pid"], signal.SIGKILL)
        if trainer.ledger.cursor.pass_index >= 1:
            trainer.request_stop("pass 0 trained")

    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", after_chunk=kill_one_after_a_checkpoint_then_stop)
    assert killed, "no checkpoint was written while pass 0 was read"
    assert trainer.metrics.registry.get_sample_value("stream_swav_decode_actor_restarts_total") == 1
    keys = [s.key for s in trainer.trained if s.pass_index == 0]
    assert len(keys) == len(set(keys))  # the cursor: no sample twice
    scenes = collections.Counter(scene_of[key] for key in keys)
    assert set(scenes) == set(range(60)) and max(scenes.values()) <= 3


def write_nine_to_one_stream(tmp_path: Path) -> tuple[str, dict[str, bool]]:
    """Two shards of 40 JPEGs each, every tenth of class 1 (rare), the rest of class 0: their folder,
    and whether each sample key is rare."""
    shards = str(tmp_path / "shards")
    rare: dict[str, bool] = {}
    for index in range(2):
        samples = [(f"s{index}-{n}", {"jpg": scene_jpeg(40 * index + n), "cls": b"1" if n % 10 == 3 else b"0"})
                   for n in range(40)]
        url = write_shard(object_url(shards, f"shard-{index}.tar"), tar_bytes(samples))
        rare.update({f"{url}/{key}": members["cls"] == b"1" for key, members in samples})
    return shards, rare


def stop_after_two_passes(trainer: WatchedTrainer) -> None:
    if trainer.ledger.cursor.pass_index >= 2:
        trainer.request_stop("passes 0 and 1 trained")


def test_resampling_shows_rare_images_again_and_reads_every_image_once(tmp_path):
    """curation.balance_mode resample by the labels on a 9:1 stream: the learner asks its decode actor
    for the rare class's images again, which trains them again with fresh crops, never the common
    class's (the batch's reference); every image is still read and trained exactly once per pass,
    and the replays are counted apart from what was read."""
    shards, rare = write_nine_to_one_stream(tmp_path)
    cfg = tiny_config({"data": {"shards": shards},
                       "curation": {"balance": 1.0, "balance_signal": "label", "balance_momentum": 0.5,
                                    "balance_mode": "resample"},
                       "checkpoint": {"dir": str(tmp_path / "ckpt")},
                       "train": {"image_budget": 10_000, "report_interval_s": 0.2}})
    log = tmp_path / "trained.jsonl"
    trainer = run_to_end(cfg, log, after_chunk=stop_after_two_passes)
    for pass_index in (0, 1):
        assert pass_counts(trainer.trained, pass_index) == {key: 1 for key in rare}
    replays = read_replays(log)
    assert replays and all(rare[key] for key in replays)
    assert trainer.metrics.registry.get_sample_value("stream_swav_curation_replays_total",
                                                     {"outcome": "trained"}) == len(replays)


def test_skipping_drops_over_represented_images_before_training_and_consumes_them_once(tmp_path):
    """curation.resample_min_shows below 1 on a 9:1 stream, the 95th-percentile weight (the rare
    class's) shown once: the common class is trained about a ninth of a time, the rare class every
    time; what is skipped is never trained, is counted as dropped for balance, and counts as read, so
    each pass reads every image once and trains none twice."""
    shards, rare = write_nine_to_one_stream(tmp_path)
    cfg = tiny_config({"curation": {"balance": 1.0, "balance_signal": "label", "balance_momentum": 0.5,
                                    "balance_mode": "resample", "resample_min_shows": 0.1,
                                    "resample_quantile": 0.95},
                       "checkpoint": {"dir": str(tmp_path / "ckpt")},
                       # Batches of 20 in the shards' order: each holds 2 rare images, 18 common ones
                       # (one shard open at a time: two read at once interleave, and a batch holding one
                       # rare image puts it above the batch's quantile weight, which asks for a replay).
                       "data": {"shards": shards, "shuffle_buffer": 1, "open_shards_per_actor": 1},
                       "train": {"image_budget": 10_000, "report_interval_s": 0.2, "batch_size": 20}})
    log = tmp_path / "trained.jsonl"
    trainer = run_to_end(cfg, log, after_chunk=stop_after_two_passes)
    skipped = 0
    for pass_index in (0, 1):
        trained = pass_counts(trainer.trained, pass_index)
        assert set(trained) <= set(rare) and set(trained.values()) == {1}
        assert all(key in trained for key, is_rare in rare.items() if is_rare)
        common = [key for key in trained if not rare[key]]
        assert 0 < len(common) < 0.4 * 72
        skipped += len(rare) - len(trained)
    assert not read_replays(log)
    # Passes 0 and 1 are read whole; a third may have begun, its skipped images counted too.
    dropped = trainer.metrics.registry.get_sample_value("stream_swav_curation_dropped_total", {"reason": "balance"})
    assert skipped <= dropped <= skipped + len([s for s in trainer.trained if s.pass_index == 2]) * 9 + 72


@pytest.mark.parametrize("mode", ["replays", "skipping"])
def test_two_learners_resample_by_their_own_decode_actors_and_stay_identical(tmp_path, mode):
    """Resampling with two data-parallel learners, each fed by its own decode actor: a replay is
    asked of the actor that made the batch, so it comes back to the learner that read the image;
    skipping thins each rank's batch on its own (the step's vote counts what each trains). Either
    way the replicas stay identical and each pass reads every image once."""
    shards, rare = write_nine_to_one_stream(tmp_path)
    curation = {"balance": 1.0, "balance_signal": "label", "balance_momentum": 0.5, "balance_mode": "resample"}
    if mode == "skipping":
        curation.update(resample_min_shows=0.1, resample_quantile=0.95)
    cfg = tiny_config({"curation": curation, "checkpoint": {"dir": str(tmp_path / "ckpt")},
                       "data": {"shards": shards, "shuffle_buffer": 1, "decode_actors": 2,
                                "open_shards_per_actor": 1},
                       "train": {"learners": 2, "image_budget": 10_000, "report_interval_s": 0.2,
                                 "batch_size": 20}})
    log = tmp_path / "trained.jsonl"
    trainer = WatchedTrainer(cfg, log, after_chunk=stop_after_two_passes)
    try:
        assert trainer.run() == 0
        replicas = learner_replicas(trainer)
    finally:
        close_trainer(trainer)

    assert [(world, rank) for world, rank, *_ in replicas] == [(2, 0), (2, 1)]
    assert replicas[0][2] == replicas[1][2], "data-parallel replicas diverged"
    assert {s.rank for s in trainer.trained} == {0, 1}
    for pass_index in (0, 1):
        trained = pass_counts(trainer.trained, pass_index)
        assert set(trained.values()) == {1} and all(key in trained for key, is_rare in rare.items() if is_rare)
        if mode == "replays":
            assert set(trained) == set(rare)
        else:
            assert 0 < sum(not rare[key] for key in trained) < 0.4 * 72
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    replays = [(line["rank"], line["step"], key) for line in lines for key in line["replays"]]
    if mode == "replays":
        # Each replay is of a rare image this rank read at an earlier step.
        first_read = {}
        for line in lines:
            for _, key in line["samples"]:
                first_read.setdefault((line["rank"], key), line["step"])
        assert replays and all(rare[key] and first_read.get((rank, key), step) < step for rank, step, key in replays)
    else:
        assert not replays
        assert trainer.metrics.registry.get_sample_value("stream_swav_curation_dropped_total", {"reason": "balance"})
