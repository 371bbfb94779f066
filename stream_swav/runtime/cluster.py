"""Where the run executes: joining or starting Ray, and what the cluster can host.

`plan_cluster` is pure: from the configuration and the cluster's resources it
decides how many decode actors run and what each learner asks for, scaling
decode actors down (with a warning) to what fits, and refusing plainly what
can never fit. Placement itself (which may wait for an autoscaler) happens in
the learner group and the decode pool, always with a deadline.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import ray
from ray._private import ray_constants

from stream_swav.config import Config, UsageError
from stream_swav.runtime import private_ray

log = logging.getLogger("stream_swav.cluster")


class StartupError(UsageError):
    """The cluster cannot host the run as configured; the message names what is missing."""


# Where storage is, not who may read it: credentials stay in each node's environment (a local
# cluster inherits the driver's; KubeRay pods get them from a Secret), since Ray shows a job's
# runtime environment on its dashboard.
FORWARDED_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "FSSPEC_S3_ENDPOINT_URL", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                 "AWS_EC2_METADATA_DISABLED")


_CLUSTER_MODE_ENV = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
# What starting a private local Ray changed, to undo on shutdown.
_LOOPBACK_ONLY: dict[str, object] = {}


def init_ray() -> str:
    """Join the cluster RAY_ADDRESS names, else start a private local one bound to loopback.

    A local Ray started by `ray start` is never joined by accident: without RAY_ADDRESS the run
    gets a cluster of its own (address "local"), which it shuts down at the end. Returns a line
    saying which, for the log."""
    if ray.is_initialized():
        return "Ray already initialised in this process"
    env_vars = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # Decoders and learners read the same storage as the driver: pass its S3 settings on.
    env_vars.update({k: v for k, v in os.environ.items() if k in FORWARDED_ENV})
    runtime_env = {"env_vars": env_vars}
    address = os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return f"joined the Ray cluster at {address} (RAY_ADDRESS)"
    # One machine, one run: every Ray service of this private cluster (GCS, raylet, workers,
    # agents) listens on loopback only. Ray binds to loopback exactly when the node's address is
    # loopback, and on Linux it takes the routable address unless cluster mode is off, which is
    # what this setting of Ray's (named for Windows and macOS, where it is the default) does. Its
    # processes read it from the environment; this one has read it already.
    _LOOPBACK_ONLY.update(env=os.environ.get(_CLUSTER_MODE_ENV), constant=ray_constants.ENABLE_RAY_CLUSTER)
    os.environ[_CLUSTER_MODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    private_ray.reap()
    ray.init(address="local", include_dashboard=False, runtime_env=runtime_env, log_to_driver=True,
             num_cpus=os.cpu_count() or 1)
    private_ray.record()
    return ("started a private local Ray on 127.0.0.1 (set RAY_ADDRESS to join an existing cluster, "
            "e.g. RAY_ADDRESS=auto for one started with `ray start` on this machine)")


def shutdown_ray() -> None:
    """Shut down this process's Ray, and undo what starting a private one changed."""
    if ray.is_initialized():
        ray.shutdown()
    if _LOOPBACK_ONLY:
        private_ray.forget()
        previous = _LOOPBACK_ONLY.pop("env")
        if previous is None:
            os.environ.pop(_CLUSTER_MODE_ENV, None)
        else:
            os.environ[_CLUSTER_MODE_ENV] = previous
        ray_constants.ENABLE_RAY_CLUSTER = _LOOPBACK_ONLY.pop("constant")


@dataclass(frozen=True)
class ClusterPlan:
    learners: int
    gpus_per_learner: float
    cpus_per_learner: float
    decode_actors: int
    warnings: tuple[str, ...] = field(default=())

    @property
    def learner_bundle(self) -> dict[str, float]:
        return {k: v for k, v in (("CPU", self.cpus_per_learner), ("GPU", self.gpus_per_learner)) if v > 0}


def plan_cluster(cfg: Config, resources: dict[str, float], learners: int | None = None) -> ClusterPlan:
    """Learners' requests and the number of decode actors, from the cluster's total resources, for
    `learners` learners (default train.learners)."""
    train = cfg.train
    gpus = resources.get("GPU", 0.0)
    cpus = resources.get("CPU", 0.0)
    learners = learners or train.learners
    use_gpu = train.device == "cuda" or (train.device == "auto" and train.gpus_per_learner > 0
                                         and gpus >= learners * train.gpus_per_learner)
    gpus_per_learner = train.gpus_per_learner if use_gpu else 0.0
    warnings = []
    spare = cpus - learners * train.cpus_per_learner
    if spare < 0 or gpus < learners * gpus_per_learner:
        # The learners themselves do not fit the cluster as it is now (a node lost for good, an
        # autoscaler yet to add one). Their placement waits up to train.startup_timeout_s and, if it
        # times out, says what the learners asked for; the decode actors are planned for then.
        wanted = cfg.data.decode_actors or learners
        actors = max(learners, wanted - wanted % learners)
        warnings.append(f"train.learners: {learners} learner(s) of {train.cpus_per_learner:g} CPU"
                        + (f" and {gpus_per_learner:g} GPU" if gpus_per_learner else "")
                        + f" each do not fit the cluster's {cpus:g} CPUs and {gpus:g} GPUs now; waiting up to "
                        f"train.startup_timeout_s={train.startup_timeout_s:g} s for room")
        return ClusterPlan(learners=learners, gpus_per_learner=gpus_per_learner,
                           cpus_per_learner=train.cpus_per_learner, decode_actors=actors, warnings=tuple(warnings))
    if spare < learners:
        raise StartupError(
            f"data.decode_actors: no CPU left for decode actors: {learners} learner(s) reserve "
            f"{learners * train.cpus_per_learner:g} of the cluster's {cpus:g} CPUs and each learner needs at "
            f"least one decode actor (1 CPU); lower train.cpus_per_learner or add CPUs")
    wanted = cfg.data.decode_actors or int(spare)
    room = int(math.floor(spare))
    fitting = min(wanted, room)
    # Each learner pulls from its own decode actors: the same number for each keeps them in step.
    actors = max(learners, fitting - fitting % learners)
    if actors != wanted:
        why = (f"only {room} fit beside the learners' {learners * train.cpus_per_learner:g} of {cpus:g} CPUs"
               if wanted > room else "at least one per learner" if actors > wanted
               else f"a multiple of the {learners} learners")
        warnings.append(f"data.decode_actors: {wanted} wanted, running {actors} ({why})")
    return ClusterPlan(learners=learners, gpus_per_learner=gpus_per_learner,
                       cpus_per_learner=train.cpus_per_learner, decode_actors=actors, warnings=tuple(warnings))


def describe_shortfall(plan: ClusterPlan, resources: dict[str, float]) -> str:
    """What the learners asked for against what the cluster has, e.g. "2 GPUs requested for
    learners, cluster has 0"."""
    parts = []
    for name, each in plan.learner_bundle.items():
        needed = each * plan.learners
        have = resources.get(name, 0.0)
        if needed > have:
            parts.append(f"{needed:g} {name}s requested for {plan.learners} learner(s), cluster has {have:g}")
    return "; ".join(parts) or (f"{plan.learners} learner(s) of {plan.learner_bundle} each could not be placed "
                                f"(resources are taken, or split over nodes)")


__all__ = ["StartupError", "ClusterPlan", "plan_cluster", "describe_shortfall", "init_ray", "shutdown_ray",
           "FORWARDED_ENV"]
