"""The deployment path for real: `ray start --head`, `deploy/submit.sh` with the CPU smoke config,
then the stop command it prints.

The head is a private Ray: its own RAY_TMPDIR (so that its processes can be told apart from any
other Ray on the machine and ended without `ray stop`, which ends every Ray here), every service on
loopback, free ports, 2 CPUs. It runs with token authentication, as every head started on a
machine where a local `ray.init()` once ran does (that creates ~/.ray/auth_token); its token is a
file of the test's own (RAY_AUTH_TOKEN_PATH), so the machine's token neither matters nor changes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import colour_samples, free_port, tar_bytes
from prometheus_client.parser import text_string_to_metric_families
from runtime_helpers import processes_with_env, write_shard

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "deploy" / "submit.sh"
# The venv's bin: `ray`, `python3`, and the job's entrypoint `stream-swav`, which the head must find
# on its PATH.
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


@dataclass(frozen=True)
class RayHead:
    dashboard: str
    token: str
    # For every command run against this head: its PATH, RAY_TMPDIR and token.
    env: dict[str, str]

    def api(self, path: str) -> Any:
        request = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.load(reply)


def end_ray(ray_tmp: str, grace_s: float = 30) -> list[tuple[int, str]]:
    """End the Ray kept under `ray_tmp` the way `ray stop` ends every Ray: SIGTERM to the raylet, then
    to the other processes, then to the GCS, each group given `grace_s` to exit (signalled all at
    once, the GCS and the autoscaler monitor wait for ever). Returns the processes that did not
    exit, which are then killed."""
    def program(command: str) -> str:
        return os.path.basename(command.split(" ", 1)[0])

    def ends(group: Callable[[str], bool]) -> None:
        for pid, command in processes_with_env("RAY_TMPDIR", ray_tmp):
            if group(program(command)):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        while (any(group(program(command)) for _, command in processes_with_env("RAY_TMPDIR", ray_tmp))
               and time.monotonic() < deadline):
            time.sleep(0.2)

    for group in (lambda name: name == "raylet", lambda name: name not in ("raylet", "gcs_server"),
                  lambda name: name == "gcs_server"):
        ends(group)
    left = processes_with_env("RAY_TMPDIR", ray_tmp)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[RayHead]:
    # Short: Ray's socket paths under it must stay below 108 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    token = uuid.uuid4().hex
    token_file = tmp_path / "ray-auth-token"
    token_file.write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=os.pathsep.join([str(BIN), env.get("PATH", "/usr/bin:/bin")]), RAY_TMPDIR=ray_tmp,
               RAY_AUTH_TOKEN_PATH=str(token_file), OMP_NUM_THREADS="1",
               # Ray binds to loopback only when the node's address is loopback, and on Linux takes the
               # routable one unless cluster mode is off (as in init_ray, stream_swav/runtime/cluster.py).
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    dashboard_port = free_port()
    started = subprocess.run(
        [RAY, "start", "--head", "--temp-dir", ray_tmp, "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
         "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
         "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield RayHead(dashboard=f"http://127.0.0.1:{dashboard_port}", token=token, env=env)
    finally:
        left = end_ray(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes of the test's Ray still running after SIGTERM: {left}"


def wait_while_running(head: RayHead, submission_id: str, condition: Callable[[], bool], what: str,
                       timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        status = head.api(f"/api/jobs/{submission_id}")["status"]
        late = time.monotonic() > deadline
        if status not in ("PENDING", "RUNNING") or late:
            logs = head.api(f"/api/jobs/{submission_id}/logs")["logs"]
            raise AssertionError(f"job {status}, {'still ' if late else ''}no {what}:\n{logs[-4000:]}")
        time.sleep(1)


def scrape(port: int) -> dict[str, float]:
    """The unlabelled samples the trainer serves, or {} while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def test_submitted_smoke_run_checkpoints_serves_metrics_and_stops_with_a_final_checkpoint(ray_head, tmp_path):
    shards = tmp_path / "shards"
    for index in range(2):
        samples = colour_samples(16, prefix=f"s{index}", start=16 * index)
        write_shard(str(shards / f"shard-{index}.tar"), tar_bytes(samples))
    ckpt_dir = tmp_path / "checkpoints"
    metrics_port = free_port()
    overrides = {
        "data.shards": shards, "checkpoint.dir": ckpt_dir, "metrics.port": metrics_port,
        # No budget: only the stop ends the run. Saves go by time, 3 s apart: the first is waited
        # for, and the stop comes after a later step (a stop right after a periodic save marks that
        # save final, so the final checkpoint is past the first either way).
        "train.image_budget": 0, "train.time_budget_s": 0, "checkpoint.every_steps": 0,
        "checkpoint.every_seconds": 3, "train.progress_bar": "false",
        # Small enough to step several times a second on a shared core.
        "model.arch": "resnet10", "model.width": 8, "model.hidden_dim": 32, "model.output_dim": 16,
        "model.prototypes": 16, "train.batch_size": 8}
    submission_id = f"stream-swav-test-{uuid.uuid4().hex[:8]}"
    submitted = subprocess.run(
        ["bash", str(SUBMIT), "--config", "deploy/configs/cpu-smoke.yaml", "--no-wait", "--",
         *[arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]],
        env={**ray_head.env, "RAY_ADDRESS": ray_head.dashboard, "SUBMISSION_ID": submission_id},
        capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    stop_command = re.search(r"^stop it cleanly with: (.+)$", submitted.stdout, re.MULTILINE).group(1)
    # The head requires its token, and so does every job command sent to it.
    assert stop_command == f"RAY_AUTH_MODE=token ray job stop --address {ray_head.dashboard} {submission_id}"

    latest = ckpt_dir / "latest.json"
    wait_while_running(ray_head, submission_id, latest.exists, "checkpoint")
    first = json.loads(latest.read_text())
    assert first["final"] is False
    wait_while_running(ray_head, submission_id,
                       lambda: scrape(metrics_port).get("stream_swav_steps_total", 0) > first["step"],
                       "step after the first checkpoint on the metrics endpoint")
    served = scrape(metrics_port)
    assert served["stream_swav_last_checkpoint_step"] >= first["step"] and served["stream_swav_learners"] == 1

    # The same job submitted again, as happens: refused for the checkpoint folder the first one holds
    # (not for the metrics port they share), in one line, while the first trains on.
    again = subprocess.run(
        ["bash", str(SUBMIT), "--config", "deploy/configs/cpu-smoke.yaml", "--",
         *[arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]],
        env={**ray_head.env, "RAY_ADDRESS": ray_head.dashboard, "SUBMISSION_ID": f"{submission_id}-again"},
        capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    assert ray_head.api(f"/api/jobs/{submission_id}-again")["status"] == "FAILED"
    refusal = ray_head.api(f"/api/jobs/{submission_id}-again/logs")["logs"]
    assert re.search(rf"^stream-swav: error: checkpoint.dir: {re.escape(str(ckpt_dir))} is in use by another run, "
                     r"run \w+ \(pid \d+ on .+\) \(a live process of this machine\); stop that run", refusal,
                     re.MULTILINE), refusal
    assert "Traceback" not in refusal and "cannot serve metrics" not in refusal
    assert ray_head.api(f"/api/jobs/{submission_id}")["status"] == "RUNNING"
    # The smoke config asks for 2 decode actors; beside the learner's CPU only 1 fits on this head.
    logs = ray_head.api(f"/api/jobs/{submission_id}/logs")["logs"]
    assert "data.decode_actors: 2 wanted, running 1" in logs, logs[-4000:]

    stopped = subprocess.run(["bash", "-c", stop_command], env=ray_head.env, capture_output=True, text=True,
                             timeout=360)
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert ray_head.api(f"/api/jobs/{submission_id}")["status"] == "STOPPED"
    final = json.loads(latest.read_text())
    assert final["final"] is True and final["step"] > first["step"], final
    assert json.loads((ckpt_dir / "lease.json").read_text())["released"] is True
