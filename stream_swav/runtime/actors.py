"""Ray actors: thin shells around DecodeWorker and Learner.

All logic lives in stream_swav.data.worker and stream_swav.learner; these
classes only move data through Ray and report what happened.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from stream_swav import logs
from stream_swav.config import TrainConfig, config_from_dict

log = logging.getLogger("stream_swav.actors")


@dataclass
class BatchMeta:
    """The small half of a decoded batch: what the driver needs without touching pixels."""

    size: int
    keys: list[str]
    progress: dict[str, int]
    finished: list[str]
    passes: dict[str, int]
    errors: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0


class DecodeActorImpl:
    def __init__(self, config: dict[str, Any], worker_index: int) -> None:
        from stream_swav.data.worker import DecodeWorker

        logs.configure()
        from stream_swav.imaging import log_pillow_flavour

        log_pillow_flavour(log)
        self.worker = DecodeWorker(config_from_dict(config), worker_index)

    def pid(self) -> int:
        return os.getpid()

    def assign(self, task: Any) -> None:
        self.worker.assign(task)

    @ray.method(num_returns=2)
    def next_batch(self, batch_size: int) -> tuple[BatchMeta | None, Any]:
        batch = self.worker.next_batch(batch_size)
        if batch is None:
            return None, None
        meta = BatchMeta(size=len(batch), keys=list(batch.keys), progress=dict(batch.progress),
                         finished=list(batch.finished), passes=dict(batch.passes), errors=dict(batch.errors),
                         bytes_read=int(batch.bytes_read))
        return meta, batch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def learner_cpu_threads(train: TrainConfig) -> int:
    return train.cpu_threads or max(1, math.ceil(train.cpus_per_learner))


class LearnerActorImpl:
    """One learner: one GPU (or the CPU), one rank of the data-parallel group."""

    def __init__(self, config: dict[str, Any], rank: int, world_size: int) -> None:
        import torch

        logs.configure()
        self.cfg = config_from_dict(config)
        self.rank = rank
        self.world_size = world_size
        want = self.cfg.train.device
        use_cuda = torch.cuda.is_available() and want in ("auto", "cuda")
        if want == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("train.device: cuda was asked for but this learner has no GPU")
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU it granted, so index 0 is ours.
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(learner_cpu_threads(self.cfg.train))
        self.learner = None
        self.last_step_end: float | None = None
        self.wait_seconds = 0.0
        self.busy_seconds = 0.0

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str | None, master_port: int | None) -> str:
        """Join the process group (when several learners) and build the model."""
        import torch
        import torch.distributed as dist

        from stream_swav.learner import Learner

        if self.world_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
                                    rank=self.rank, world_size=self.world_size)
        torch.manual_seed(self.cfg.train.seed)
        self.learner = Learner(self.cfg, self.device, rank=self.rank, world_size=self.world_size)
        return str(self.device)

    def load_state(self, state: dict[str, Any]) -> int:
        self.learner.load_state_dict(state)
        return self.learner.step

    def train_step(self, batch: Any) -> dict[str, Any]:
        import torch

        start = time.perf_counter()
        if self.last_step_end is not None:
            self.wait_seconds += start - self.last_step_end
        result = self.learner.train_step(batch)
        stats: dict[str, Any] = result.to_floats()
        stats["prototype_counts"] = result.prototype_counts.cpu().tolist()
        end = time.perf_counter()
        self.busy_seconds += end - start
        self.last_step_end = end
        stats["input_wait_ratio"] = self.wait_seconds / max(self.wait_seconds + self.busy_seconds, 1e-9)
        stats["step_seconds"] = end - start
        if self.device.type == "cuda":
            stats["gpu_memory_allocated_bytes"] = float(torch.cuda.memory_allocated(self.device))
            stats["gpu_memory_reserved_bytes"] = float(torch.cuda.memory_reserved(self.device))
        return stats

    def rank_state(self) -> dict[str, Any]:
        """What differs between ranks: queue and random streams."""
        state = self.learner.state_dict()
        return {k: state[k] for k in ("queue", "cpu_rng", "augment_rng", "cuda_rng") if k in state}

    def save_checkpoint(self, directory: str, extra: dict[str, Any], other_ranks: list[Any],
                        info: dict[str, Any]) -> dict[str, Any]:
        """Write a checkpoint of this learner (rank 0), with the other ranks' queues and random states."""
        import dataclasses

        from stream_swav.checkpoint import save_checkpoint

        state = self.learner.state_dict()
        state.update(extra)
        if other_ranks:
            state["other_ranks"] = ray.get(other_ranks)
        saved = save_checkpoint(directory, step=self.learner.step, images_seen=self.learner.images_seen,
                                state=state, backbone=self.learner.model.backbone_state_dict(), info=info,
                                storage_cfg=self.cfg.storage, keep_last=self.cfg.checkpoint.keep_last,
                                milestone_steps=self.cfg.checkpoint.milestone_steps)
        return dataclasses.asdict(saved)


DecodeActor = ray.remote(DecodeActorImpl)
LearnerActor = ray.remote(LearnerActorImpl)
