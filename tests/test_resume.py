"""The trainer as a process: killed with SIGKILL and restarted, or stopped with SIGTERM.

Each run is a real `stream-swav train` process with its own local Ray (kept under a private
RAY_TMPDIR, so its processes can be told apart from any other Ray on the machine). The SIGKILL
test runs the CLI through tests/runtime_helpers.py, which logs every trained sample with its
step and pass, so the restart can be checked sample by sample.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import colour_samples, tar_bytes
from runtime_helpers import (KEYS_LOG_ENV, TESTS, object_url, pass_counts, processes_with_env, read_trained,
                             resumed_step, sample_keys, write_config, write_shard)

from stream_swav import storage
from stream_swav.data.cursor import StreamCursor
from stream_swav.model import BackboneSpec, load_backbone
from stream_swav import checkpoint as ckpt
from stream_swav.runtime.lease import LEASE_FILE, Holder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

RUNNER = Path(__file__).with_name("runtime_helpers.py")
BATCH = 8


# Ray's agents notice that their raylet died by polling, then report it to a GCS that is gone
# too; they exit on their own, but only a minute or two later.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


@pytest.fixture
def ray_tmpdir() -> Iterator[str]:
    """A short private RAY_TMPDIR (Ray's socket paths must stay under 108 bytes); on the way out,
    any process of that Ray still alive after a grace period is a failure, and is ended."""
    path = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield path
    leftovers = wait_until_gone(path, timeout_s=150)
    for pid, _ in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(path, ignore_errors=True)
    assert not leftovers, f"Ray processes left running: {leftovers}"


def wait_until_gone(ray_tmp: str, timeout_s: float, agents_too: bool = True) -> list[tuple[int, str]]:
    """Processes of the Ray kept under `ray_tmp` still alive after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [(pid, cmd) for pid, cmd in processes_with_env("RAY_TMPDIR", ray_tmp)
                 if agents_too or not cmd.startswith(RAY_AGENTS)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def driver_env(ray_tmp: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray workers import the recording learner from tests/.
    env.update(RAY_TMPDIR=ray_tmp, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p), **extra)
    return env


def start_driver(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).parent.parent)


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, log_path: Path, what: str,
             timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"driver exited ({process.returncode}) before {what}:\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {what} after {timeout_s}s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.2)


def latest_step(dir_url: str, storage_cfg) -> int:
    latest = ckpt.read_latest(dir_url, storage_cfg)
    return -1 if latest is None else latest["step"]


def test_driver_killed_mid_run_resumes_from_latest_checkpoint(s3_bucket, tmp_path, ray_tmpdir):
    keys: set[str] = set()
    for index in range(4):
        samples = colour_samples(16, prefix=f"s{index}", start=16 * index)
        url = write_shard(s3_bucket.url(f"shards/shard-{index}.tar"), tar_bytes(samples), s3_bucket.storage)
        keys |= sample_keys(url, samples)
    ckpt_dir = s3_bucket.url("checkpoints")
    # One reader on one shard at a time: the stream order is fixed, so a resumed run must replay
    # exactly what the killed one trained after its last checkpoint.
    config = write_config(tmp_path / "train.yaml", {
        "data": {"shards": s3_bucket.url("shards/"), "open_shards_per_actor": 1},
        "train": {"batch_size": BATCH, "image_budget": len(keys)},
        "checkpoint": {"dir": ckpt_dir, "every_steps": 2}})
    command = [sys.executable, str(RUNNER), "train", "--config", str(config)]
    total_steps = len(keys) // BATCH

    first_log, first_keys = tmp_path / "first.log", tmp_path / "first-keys.log"
    first = start_driver(command, driver_env(ray_tmpdir, **{KEYS_LOG_ENV: str(first_keys)}), first_log)
    try:
        wait_for(lambda: latest_step(ckpt_dir, s3_bucket.storage) >= 2, first, first_log, "checkpoint at step >= 2")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
    # The driver's Ray goes with it: head processes and actors at once, agents later (checked on the way out).
    assert wait_until_gone(ray_tmpdir, timeout_s=60, agents_too=False) == []

    # latest.json names a complete checkpoint, loadable with weights_only=True.
    latest = ckpt.read_latest(ckpt_dir, s3_bucket.storage)
    resume_step = latest["step"]
    assert 2 <= resume_step < total_steps, "the driver was killed too late to test a resume"
    step_url = storage.join_url(ckpt_dir, ckpt.step_dir_name(resume_step))
    assert storage.exists(storage.join_url(step_url, ckpt.META), s3_bucket.storage)
    state = ckpt.load_checkpoint(ckpt_dir, s3_bucket.storage)
    assert state["step"] == resume_step and state["images_seen"] == latest["images_seen"] == resume_step * BATCH
    StreamCursor(0).load_state_dict(state["stream_cursor"])
    load_backbone(ckpt.load_backbone_state(ckpt_dir, s3_bucket.storage), BackboneSpec("resnet18", small_stem=True, width=16))

    second_log, second_keys = tmp_path / "second.log", tmp_path / "second-keys.log"
    second = start_driver(command, driver_env(ray_tmpdir, **{KEYS_LOG_ENV: str(second_keys)}), second_log)
    try:
        assert second.wait(timeout=300) == 0, second_log.read_text()[-4000:]
    finally:
        second.kill()
    log_text = second_log.read_text()
    assert resumed_step(log_text) == resume_step, log_text[-4000:]
    assert "stopped (budget reached)" in log_text
    # The killed driver never gave its lease up; its restart on the same machine takes it at once
    # (the lease's process is gone), then gives it up at its end.
    assert "waiting up to checkpoint.lease_s" not in log_text
    lease = Holder.from_json(storage.read_json(storage.join_url(ckpt_dir, LEASE_FILE), s3_bucket.storage))
    assert lease.released and lease.pid == second.pid
    final = ckpt.read_latest(ckpt_dir, s3_bucket.storage)
    assert final["step"] == total_steps and final["images_seen"] == len(keys) and final["final"] is True

    killed_run, resumed_run = read_trained(first_keys), read_trained(second_keys)
    kept = [s for s in killed_run if s.step <= resume_step]
    redone = [s for s in killed_run if s.step > resume_step]
    assert len(kept) == resume_step * BATCH
    assert [s.step for s in resumed_run][:1] == [resume_step + 1]
    # The checkpointed cursor picks the stream up where the checkpoint left it: what the killed run
    # trained after its checkpoint comes again first, in the same order.
    assert [s.key for s in resumed_run[:len(redone)]] == [s.key for s in redone]
    # Counting only what the checkpoints kept, every sample of the pass is trained exactly once.
    assert all(s.pass_index == 0 for s in kept + resumed_run)
    assert pass_counts(kept + resumed_run, 0) == {key: 1 for key in keys}
    # Counting everything, only the window trained after the last checkpoint was trained twice.
    twice = {key for key, count in Counter(s.key for s in killed_run + resumed_run).items() if count > 1}
    assert twice == {s.key for s in redone}
    assert max(Counter(s.key for s in killed_run + resumed_run).values()) <= 2


def test_sigterm_writes_a_final_checkpoint_and_exits_zero(tmp_path, ray_tmpdir):
    for index in range(2):
        samples = colour_samples(16, prefix=f"s{index}", start=16 * index)
        write_shard(object_url(str(tmp_path / "shards"), f"shard-{index}.tar"), tar_bytes(samples))
    ckpt_dir = tmp_path / "checkpoints"
    # No budget: only the signal ends this run. Steps are logged at every chunk's end (not once a
    # second), so the first one after the checkpoint is seen as soon as it is trained.
    config = write_config(tmp_path / "train.yaml", {
        "data": {"shards": str(tmp_path / "shards")}, "train": {"batch_size": BATCH, "log_interval_s": 0.1},
        "checkpoint": {"dir": str(ckpt_dir), "every_steps": 3}})
    log_path = tmp_path / "driver.log"
    driver = start_driver([sys.executable, "-m", "stream_swav", "train", "--config", str(config)],
                          driver_env(ray_tmpdir), log_path)
    try:
        def trained_past_a_checkpoint() -> bool:
            text = log_path.read_text()
            saved = [int(s) for s in re.findall(r"checkpoint step (\d+) ", text)]
            logged = [int(s) for s in re.findall(r"INFO step (\d+) \|", text)]
            return bool(saved) and max(logged, default=0) > saved[0]

        wait_for(trained_past_a_checkpoint, driver, log_path, "a step logged after the first checkpoint")
        previous = ckpt.read_latest(str(ckpt_dir), storage.StorageConfig())["step"]
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=120) == 0, log_path.read_text()[-4000:]
    finally:
        driver.kill()
    text = log_path.read_text()
    assert "received SIGTERM" in text
    stopped = re.search(r"stopped \(SIGTERM\) at step (\d+) after (\d+) images", text)
    assert stopped, text[-4000:]
    final = ckpt.read_latest(str(ckpt_dir), storage.StorageConfig())
    # Everything trained before the stop is in the last checkpoint, marked final. (It is newer than
    # the one that was latest when the signal came unless a save of the same step came between.)
    assert final["step"] == int(stopped.group(1)) >= previous
    assert final["images_seen"] == int(stopped.group(2)) and final["final"] is True
    ckpt.load_checkpoint(str(ckpt_dir), storage.StorageConfig())
