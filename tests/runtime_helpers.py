"""Shared parts of the runtime tests: a tiny CPU configuration, shards, a learner that records
what it trains, and a Trainer whose chunks can be watched.

`RecordingLearner` is the real Learner; after each step it appends one JSON line per trained
batch to a file: its rank, the step, and (pass, key) of every sample. It runs inside the learner
actors (given to the Trainer as `build_learner`), so it records what was really trained, also by
a learner that is killed afterwards. Run as a script (``python tests/runtime_helpers.py train
--config ...``) this module is the `stream-swav` CLI with that learner in place, logging to the
file named by STREAM_SWAV_TEST_KEYS_LOG.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml

from stream_swav import storage
from stream_swav.config import Config, StorageConfig, load_config
from stream_swav.learner import Learner
from stream_swav.runtime import driver

KEYS_LOG_ENV = "STREAM_SWAV_TEST_KEYS_LOG"
TESTS = str(Path(__file__).resolve().parent)
# Ray workers must import this module to unpickle RecordingLearner.
RAY_ENV = {"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}}

# A backbone, crops and batch small enough to train several steps per second on one shared CPU core
# (at its own width, 64, a ResNet-18 step takes ~1 s here: ten times longer).
TINY: dict[str, Any] = {
    "model": {"arch": "resnet18", "width": 16, "small_stem": True, "hidden_dim": 64, "output_dim": 32, "prototypes": 16},
    "crops": {"global_size": 16, "local_size": 12, "local_count": 2},
    "swav": {"queue_length": 0, "freeze_prototypes_steps": 2},
    "optim": {"warmup_images": 64},
    "train": {"batch_size": 8, "device": "cpu", "log_interval_s": 1.0, "progress_bar": False,
              "report_interval_s": 0.5, "startup_timeout_s": 60},
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
    rank: int
    step: int
    pass_index: int
    key: str
    # Line of the log: one per trained batch.
    line: int = 0


class RecordingLearner(Learner):
    """The real Learner, appending (rank, step, pass, key) of what each step trained to a file.

    With `die_after_step`, the learner of rank `die_rank` kills its own process (SIGKILL, as the
    out-of-memory killer would) right after recording that step; with `die_once_marker` only the
    first time (the marker file remembers), so the learner that replaces it lives on. With
    `die_after_own_steps` it dies after that many steps of its own (a learner that joined a group
    later starts at the group's step); with `die_in_group_of` after its first step in a group of
    that many learners. With `die_while_starting` it dies so as soon as it is built, before any
    step (a node lost while the run starts). The rank is the one it is built with."""

    def __init__(self, cfg: Config, device: Any, rank: int, world_size: int, *, log_path: str,
                 die_after_step: int = 0, die_rank: int = 0, die_once_marker: str = "",
                 die_while_starting: bool = False, die_after_own_steps: int = 0, die_in_group_of: int = 0) -> None:
        super().__init__(cfg, device, rank=rank, world_size=world_size)
        self.log_path = log_path
        self.die_after_step = die_after_step if rank == die_rank else 0
        self.die_after_own_steps = die_after_own_steps if rank == die_rank else 0
        self.die_in_group_of = die_in_group_of if rank == die_rank else 0
        self.own_steps = 0
        self.die_once_marker = die_once_marker
        if die_while_starting and rank == die_rank:
            self.die_once()

    def die_once(self) -> None:
        """SIGKILL this process, unless the once-marker says it happened already."""
        if self.die_once_marker and os.path.exists(self.die_once_marker):
            return
        if self.die_once_marker:
            Path(self.die_once_marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)

    def train_step(self, batch: Any, step_images: int | None = None) -> Any:
        stats = super().train_step(batch, step_images)
        meta = batch.meta
        pass_of = {url: pass_index for (pass_index, _), url in meta.urls.items()}
        # Replays (curation.balance_mode resample), the batch's last rows, were not read from the stream.
        read = len(meta.keys) - meta.replayed
        line = json.dumps({"rank": self.rank, "step": self.step,
                           "samples": [[pass_of[key.rsplit("/", 1)[0]], key] for key in meta.keys[:read]],
                           "replays": meta.keys[read:]})
        # One write per step, flushed before the next step starts: a SIGKILL loses nothing trained.
        with open(self.log_path, "a") as f:
            f.write(line + "\n")
        self.own_steps += 1
        if (self.step == self.die_after_step or self.own_steps == self.die_after_own_steps
                or 0 < self.die_in_group_of <= self.world_size):
            self.die_once()
        return stats


def recording_learner(log_path: Path, **dying: Any) -> Callable[..., Any]:
    return functools.partial(RecordingLearner, log_path=str(log_path), **dying)


def runs(trained: list[TrainedSample]) -> list[list[TrainedSample]]:
    """The log split where a learner group restarted (some rank's step went back)."""
    segments: list[list[TrainedSample]] = [[]]
    last: dict[int, tuple[int, int]] = {}  # rank -> (line, step)
    for sample in trained:
        line, step = last.get(sample.rank, (-1, 0))
        if sample.line != line and sample.step <= step:
            segments.append([])
            last = {}
        last[sample.rank] = (sample.line, sample.step)
        segments[-1].append(sample)
    return segments


def read_trained(log_path: Path) -> list[TrainedSample]:
    if not Path(log_path).exists():
        return []
    trained = []
    for number, line in enumerate(Path(log_path).read_text().splitlines()):
        row = json.loads(line)
        trained += [TrainedSample(row["rank"], row["step"], p, key, number) for p, key in row["samples"]]
    return trained


def read_replays(log_path: Path) -> list[str]:
    """The keys of every replay trained (curation.balance_mode resample), in order."""
    if not Path(log_path).exists():
        return []
    return [key for line in Path(log_path).read_text().splitlines() for key in json.loads(line).get("replays", [])]


def parameters_digest(model_state: dict[str, Any], names: list[str]) -> str:
    """SHA-256 of these tensors of a model's state, in this order."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(model_state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _replica(actor: Any) -> tuple[int, int, str, list[str], Any]:
    # Runs inside a learner actor.
    import torch.distributed as dist

    names = [name for name, _ in actor.learner.model.named_parameters()]
    return (dist.get_world_size(), dist.get_rank(), parameters_digest(actor.learner.model.state_dict(), names),
            names, actor.learner.generator.get_state())


def learner_replicas(trainer: driver.Trainer) -> list[tuple[int, int, str, list[str], Any]]:
    """Per learner of the trainer's group: (world size, rank, digest of its parameters, their names,
    its augmentation generator's state)."""
    return ray.get([learner.__ray_call__.remote(_replica) for learner in trainer.group.actors])


def pass_counts(trained: list[TrainedSample], pass_index: int) -> collections.Counter:
    return collections.Counter(s.key for s in trained if s.pass_index == pass_index)


class WatchedTrainer(driver.Trainer):
    """A Trainer that records its samples and calls `after_chunk(trainer)` after each chunk."""

    def __init__(self, cfg: Config, log_path: Path, after_chunk: Callable[["WatchedTrainer"], None] | None = None,
                 dying: dict[str, Any] | None = None, grow_from_steps: list[int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(cfg, build_learner=recording_learner(log_path, **(dying or {})), **kwargs)
        self.log_path = log_path
        self.after_chunk = after_chunk
        # An elastic group's n-th growth waits for step grow_from_steps[n]; its joiners start meanwhile.
        self.grow_from_steps = list(grow_from_steps or [])

    @property
    def trained(self) -> list[TrainedSample]:
        return read_trained(self.log_path)

    def tend_joiners(self) -> None:
        ready = self.ready_joiners()
        if not ready or (self.grow_from_steps and self.step < self.grow_from_steps[0]):
            return  # the joiners start and wait; the take-in is held back to its step
        self.take_in_joiners(ready)
        if self.grow_from_steps:
            self.grow_from_steps.pop(0)

    def train_chunk(self) -> driver.RunState:
        next_state = super().train_chunk()
        if self.after_chunk is not None and next_state is driver.RunState.RUNNING:
            self.after_chunk(self)
        return next_state


def close_trainer(trainer: driver.Trainer) -> None:
    """What `train()` does at the end, short of shutting Ray down: the module's tests share one Ray."""
    trainer.metrics.stop_server()
    trainer.shutdown_actors()


def run_to_end(cfg: Config, log_path: Path, after_chunk: Callable[[WatchedTrainer], None] | None = None,
               expect: int = 0, dying: dict[str, Any] | None = None,
               grow_from_steps: list[int] | None = None) -> WatchedTrainer:
    """Run a WatchedTrainer until it stops, check its exit status and release its actors."""
    trainer = WatchedTrainer(cfg, log_path, after_chunk=after_chunk, dying=dying, grow_from_steps=grow_from_steps)
    try:
        assert trainer.run() == expect
    finally:
        close_trainer(trainer)
    return trainer


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


def main() -> int:
    """`stream-swav` with the recording learner in place (log: $STREAM_SWAV_TEST_KEYS_LOG)."""
    from stream_swav import cli

    log_path = os.environ[KEYS_LOG_ENV]
    plain = driver.Trainer

    class Recording(plain):  # type: ignore[misc, valid-type]
        def __init__(self, cfg: Config, **kwargs: Any) -> None:
            super().__init__(cfg, build_learner=recording_learner(Path(log_path)), **kwargs)

    driver.Trainer = Recording
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
