"""Shared parts of the runtime tests: a tiny CPU configuration, shards, and a Trainer that
records which pass every trained sample came from.

Run as a script (``python tests/runtime_helpers.py train --config ...``) it is the
`stream-swav` CLI with that recording Trainer in place; with STREAM_SWAV_TEST_KEYS_LOG set,
each trained sample is appended to that file as ``<step> <pass> <key>``, one line per sample,
written before the next step is taken, so a SIGKILL of the driver loses nothing already trained.
"""
from __future__ import annotations

import collections
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stream_swav import storage
from stream_swav.config import Config, StorageConfig, load_config
from stream_swav.data.cursor import parse_shard_id
from stream_swav.runtime import driver

KEYS_LOG_ENV = "STREAM_SWAV_TEST_KEYS_LOG"

# A backbone, crops and batch small enough to train a few steps per second on one shared CPU core.
TINY: dict[str, Any] = {
    "model": {"arch": "resnet18", "small_stem": True, "hidden_dim": 64, "output_dim": 32, "prototypes": 16},
    "crops": {"global_size": 16, "local_size": 12, "local_count": 2},
    "swav": {"queue_length": 0, "freeze_prototypes_steps": 2},
    "optim": {"warmup_images": 64},
    "train": {"batch_size": 8, "device": "cpu", "log_interval_s": 1.0, "progress_bar": False},
    "checkpoint": {"every_steps": 5, "every_seconds": 0, "keep_last": 3},
    "metrics": {"port": 0},
    "data": {"decode_actors": 1, "shuffle_buffer": 16},
}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_config(overrides: dict[str, Any]) -> Config:
    return load_config(base=merge(TINY, overrides))


def write_config(path: Path, overrides: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(merge(TINY, overrides)))
    return path


def sample_keys(url: str, samples: list[tuple[str, dict[str, bytes]]]) -> set[str]:
    """Keys the decoders give these samples: ``<shard url>/<member key>``."""
    return {f"{url}/{key}" for key, _ in samples}


def object_url(base: str, name: str) -> str:
    """`name` under a local folder or an s3:// prefix, as the shard source lists it."""
    return f"{base.rstrip('/')}/{name}" if "://" in base else str(Path(base).resolve() / name)


def write_shard(url: str, shard_bytes: bytes, storage_cfg: StorageConfig | None = None) -> str:
    storage.write_bytes_atomic(url, shard_bytes, storage_cfg or StorageConfig())
    return url


@dataclass(frozen=True)
class TrainedSample:
    step: int
    pass_index: int
    key: str


class RecordingTrainer(driver.Trainer):
    """Records (step, pass, key) of every trained sample, in training order.

    The pass comes from the batches' bookkeeping (keys alone do not name it): batches are
    captured as they are handed to the learners, and matched to the keys the driver reports
    as trained, step by step, in submission order.
    """

    def __init__(self, cfg: Config, after_step: Callable[["RecordingTrainer"], None] | None = None) -> None:
        super().__init__(cfg)
        self.trained: list[TrainedSample] = []
        self.after_step = after_step
        self.submitted_passes: collections.deque[list[tuple[int, str]]] = collections.deque()
        self.keys_log = os.environ.get(KEYS_LOG_ENV, "")

    def submit_steps(self) -> None:
        before = list(self.ready)
        super().submit_steps()
        # submit_steps only takes batches from the left of `ready`.
        taken = [meta for meta, _ in before[:len(before) - len(self.ready)] if meta.size]
        world = len(self.learners)
        for first in range(0, len(taken), world):
            self.submitted_passes.append([(pass_of(meta, key), key) for meta in taken[first:first + world]
                                          for key in meta.keys])

    def trained_keys_hook(self, keys: list[str]) -> None:
        tagged = self.submitted_passes.popleft()
        if [key for _, key in tagged] != keys:
            raise AssertionError("trained keys do not match the batches submitted for that step")
        now = [TrainedSample(self.step, pass_index, key) for pass_index, key in tagged]
        self.trained.extend(now)
        if self.keys_log:
            with open(self.keys_log, "a") as log_file:
                log_file.write("".join(f"{s.step} {s.pass_index} {s.key}\n" for s in now))
        if self.after_step is not None:
            self.after_step(self)


def pass_of(meta: Any, key: str) -> int:
    url = key.rsplit("/", 1)[0]
    passes = {p for shard, p in meta.passes.items() if parse_shard_id(shard)[1] == url}
    if len(passes) != 1:
        raise AssertionError(f"batch bookkeeping names {len(passes)} passes for {key}")
    return passes.pop()


def read_keys_log(path: Path) -> list[TrainedSample]:
    samples = []
    for line in path.read_text().splitlines():
        step, pass_index, key = line.split(" ", 2)
        samples.append(TrainedSample(int(step), int(pass_index), key))
    return samples


def pass_counts(trained: list[TrainedSample], pass_index: int) -> collections.Counter:
    return collections.Counter(s.key for s in trained if s.pass_index == pass_index)


def resumed_step(log_text: str) -> int | None:
    match = re.search(r"resumed from \S+: step (\d+)", log_text)
    return int(match.group(1)) if match else None


def processes_with_env(name: str, value: str) -> list[tuple[int, str]]:
    """(pid, command line) of live processes started with environment variable name=value.

    Ray's workers and agents rename themselves ("ray::...") but keep the environment they
    inherited, so this finds every process of a Ray started with its own RAY_TMPDIR.
    """
    wanted = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if wanted in environ and "(zombie)" not in status:
            found.append((int(entry.name), cmdline.strip()))
    return found


def close_trainer(trainer: driver.Trainer) -> None:
    """What `train()` does at the end, short of shutting Ray down: the module's tests share one Ray."""
    import ray

    trainer.metrics.stop_server()
    for handle in [*trainer.learners, *(slot.handle for slot in trainer.slots)]:
        if handle is not None:
            ray.kill(handle, no_restart=True)


def run_to_end(cfg: Config, after_step: Callable[[RecordingTrainer], None] | None = None) -> RecordingTrainer:
    """Run a RecordingTrainer until it stops, check it exited 0 and release its actors."""
    trainer = RecordingTrainer(cfg, after_step=after_step)
    try:
        assert trainer.run() == 0
    finally:
        close_trainer(trainer)
    return trainer


def main() -> int:
    """`stream-swav` with the recording Trainer in place of the plain one."""
    from stream_swav import cli

    driver.Trainer = RecordingTrainer
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
