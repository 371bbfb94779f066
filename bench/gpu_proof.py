"""The GPU proof run: every GPU figure of this project from one command, within nine minutes.

`bash bench/gpu_proof.sh` (on the GPU machine) and `bash bench/gpu_proof.sh --dry-run` (the same
steps on the CPU with tiny settings) run `python bench/gpu_proof.py run`. `plan` is the table of
steps: each has a command, a time cap and a function that reads its figures from the files its
tool wrote. A step starts as soon as the steps it needs have ended (the profile says which those
are, and so which steps overlap), under its cap cut to the time left before the run's deadline; a
step that fails or times out is recorded and the others go on. The summary lives in this process
and is written to $OUT/summary.json, atomically, whenever a step starts or ends. Standard library
only: the GPU machine's python3 runs this before anything is unpacked.

    python bench/gpu_proof.py e2e-shards --dest DIR ...   # the e2e step's JPEG shards (a step's command)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gpu_pack import git_commit  # bench/gpu_pack.py, beside this file

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / ".gpuproof"
# Where the GPU run unpacks the bundle's packages: outside the working tree, whose copy may come back.
SITE = Path("/tmp/gpuproof-site")
# What the device tool brings back from $OUT: at most 8 files, 16 MiB each, none deeper than $OUT/a/b/file.
OUT_FILE_LIMIT = 8
OUT_FILE_BYTES = 16 * 2**20
OUT_DEPTH = 3
LOG_MAX_BYTES = 15 * 2**20
PROMISED_FILES = ("summary.json", "gpu_proof.log", "learner.json", "e2e_metrics.jsonl", "demo_summary.json",
                  "demo_accuracy.png", "demo_results.jsonl", "pytest.txt")
DEMO_FILES = {"summary.json": "demo_summary.json", "accuracy.png": "demo_accuracy.png",
              "results.jsonl": "demo_results.jsonl"}
KILL_GRACE_S = 10  # after the TERM at a step's cap, KILL
MIN_STEP_S = 10    # a step with less time than this before the deadline is skipped, not started
POLL_S = 0.2
FORCED_NOTE = "forced failure (GPU_PROOF_FAIL_STEP)"
FORCED_RC = 3
DEMO_VERDICT_NOTE = "demo exit 1: its verdict, learned features did not beat random init"


# ------------------------------------------------------------------------------------------ profiles

@dataclass(frozen=True)
class StepSettings:
    cap_s: float
    after: tuple[str, ...] = ()    # steps that must have ended (in any way) before this one starts
    args: tuple[str, ...] = ()     # the tool's arguments that differ between the profiles


@dataclass(frozen=True)
class Profile:
    """What differs between the GPU run and the dry run."""
    budget_s: int
    steps: dict[str, StepSettings]
    demo_minutes: tuple[float, float]  # the demo's training minutes when on time, and the least when behind
    demo_reserve_s: float              # the demo's time besides training: start-up, final checkpoint, evaluation
    scrape_interval_s: float


def sets(*assignments: str) -> tuple[str, ...]:
    return tuple(arg for assignment in assignments for arg in ("--set", assignment))


GPU = Profile(
    budget_s=530,  # 8 min 50 s: inside the 9 minutes, with the summary written
    steps={
        "setup": StepSettings(90),
        # The shards are made on the CPUs while the GPU runs the learner benchmark.
        "demo-shards": StepSettings(240, ("setup",), ("--eval-train", "60000", "--eval-test", "10000")),
        "e2e-shards": StepSettings(150, ("setup",), ("--count", "40000", "--size", "256", "--per-shard", "1000",
                                                     "--workers", "4")),
        # torch.compile warms up once per batch size (a minute or more for ResNet-50), so 3 warm-up + 15
        # timed steps; 256 first, so that a cut-off at the cap loses batch 64, not the headline figure.
        "learner": StepSettings(200, ("setup",), ("--batch-sizes", "256,64", "--warmup", "3", "--steps", "15")),
        # Eager: compiling two more networks would take minutes; 3 warm-up steps cover cuDNN's autotuning.
        "families": StepSettings(75, ("learner",), ("--families", "regnet,vit", "--compile", "off", "--warmup", "3",
                                                    "--steps", "10")),
        # The train budget includes Ray's start (~6 s here); ~30 s of it are steady state.
        "e2e": StepSettings(100, ("families", "e2e-shards"),
                            sets("train.time_budget_s=45", "train.cpus_per_learner=2")),
        # The CUDA tests are small: they share the GPU with the demo's first minute (Ray start-up and the
        # first steps) instead of taking time of their own; that only makes the demo's figures conservative.
        "tests": StepSettings(120, ("e2e", "demo-shards")),
        "demo": StepSettings(math.inf, ("e2e", "demo-shards"), sets("metrics.port=0")),
    },
    # Too little reserve would cut the evaluation of the last checkpoint, which runs last: cheaper to
    # train a few seconds less.
    demo_minutes=(4.0, 1.0), demo_reserve_s=60, scrape_interval_s=1.0)

# Two cores, and most of a step's time is Python importing torch or Ray starting: every step that
# needs neither the setup's data nor Ray starts at once, and the two Ray steps run side by side once
# pytest has started (Ray waits a fixed 30 s for its own processes, and pytest's start beside Ray's
# once pushed it past that). Their Ray starts come apart by themselves: the demo makes or reads its
# shards first. Tiny settings everywhere: the dry run checks behaviour, not speed.
DRY_RUN = Profile(
    budget_s=330,
    steps={
        "setup": StepSettings(90),
        "demo-shards": StepSettings(120, ("setup",), ("--eval-train", "500", "--eval-test", "200")),
        # 256 images, read from Fashion-MNIST wherever the demo would find it: no need to wait for the subset.
        "e2e-shards": StepSettings(60, (), ("--count", "256", "--size", "64", "--per-shard", "64", "--workers", "1")),
        "learner": StepSettings(120, (), ("--tiny", "--arch", "resnet10", "--no-small-stem", "--batch-sizes", "4",
                                          "--local-count", "2", "--prototypes", "32", "--queue", "32",
                                          "--warmup", "1", "--steps", "1")),
        "families": StepSettings(120, (), ("--families", "regnet,vit", "--tiny", "--family-batch", "4",
                                           "--warmup", "1", "--steps", "1")),
        "tests": StepSettings(120),
        # An image budget, not a time budget: on a loaded 2-core machine Ray's start alone can take 30 s
        # of a time budget, whose clock starts before it, and leave no step trained. The tiny net trains
        # the budget (4 passes over the 256 images) in a few seconds: reports every 0.25 s, scraped as
        # often, so that the scrapes see the counters move before the run ends and takes its /metrics
        # with it. 192 images once trained between two scrapes beside the demo step (0 steps seen).
        "e2e": StepSettings(150, ("e2e-shards", "tests"), sets(
            "train.image_budget=1024", "train.report_interval_s=0.25", "train.time_budget_s=0", "train.device=cpu",
            "train.cpus_per_learner=1", "train.batch_size=8", "data.decode_actors=1", "data.shuffle_buffer=64",
            "model.arch=resnet10", "model.width=8", "model.small_stem=true", "model.stem_stride=2",
            "model.hidden_dim=64", "model.output_dim=32", "model.prototypes=32", "crops.global_size=16",
            "crops.local_size=8", "crops.local_count=2")),
        # 16 steps of 32 images, a checkpoint every 8: two evaluations.
        "demo": StepSettings(math.inf, ("demo-shards", "tests"),
                             ("--images", "512", "--eval-train", "500", "--eval-test", "200",
                              *sets("metrics.port=0", "train.batch_size=32", "checkpoint.every_steps=8"))),
    },
    demo_minutes=(1.0, 0.5), demo_reserve_s=40, scrape_interval_s=0.25)

PROFILES = {"gpu": GPU, "dry-run": DRY_RUN}


# ------------------------------------------------------------------------------------------ the steps

@dataclass(frozen=True)
class Run:
    """One run's settings, from the command line and the GPU_PROOF_* variables."""
    mode: str
    python: str
    out: Path
    work: Path
    started: float       # unix time
    deadline: float      # unix time
    fail_step: str = ""
    e2e_compile: str = "false"
    metrics_port: int = 0

    @property
    def profile(self) -> Profile:
        return PROFILES[self.mode]

    @property
    def budget_s(self) -> int:
        return round(self.deadline - self.started)

    @property
    def gpu_csv(self) -> Path:
        return self.work / "gpu.csv"


@dataclass(frozen=True)
class Step:
    name: str
    # The tool's command line; a callable when it depends on the time it starts at.
    command: Sequence[str] | Callable[[], list[str]]
    cap_s: float
    after: tuple[str, ...] = ()
    # After the step: its figures, read from what the tool wrote (and its files copied into $OUT
    # where the tool writes elsewhere).
    collect: Callable[[], dict[str, Any]] | None = None
    # Where the step's own output goes besides the log (the log has every step's, stamped).
    output: Path | None = None
    # Runs beside the step, from its start to its end (the e2e step's /metrics scraper).
    alongside: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    # A non-zero exit that is the tool's verdict rather than a failure to measure: the note, or None.
    accept: Callable[[int], str | None] | None = None


def plan(run: Run) -> list[Step]:
    """The table of steps, in the order the summary lists them and ready steps start."""
    py, out, work, profile = run.python, run.out, run.work, run.profile

    def step(name: str, command: Sequence[str] | Callable[[], list[str]], **kwargs: Any) -> Step:
        settings = profile.steps[name]
        return Step(name, command, settings.cap_s, settings.after, **kwargs)

    def args(name: str) -> list[str]:
        return list(profile.steps[name].args)

    figures_json = work / "setup.json"
    if run.mode == "gpu":
        setup = [py, "bench/gpu_pack.py", "unpack", "--bundle", str(BUNDLE), "--site", str(SITE)]
    else:  # the unpacked copy's stand-in: a few thousand Fashion-MNIST images, read through the same variable
        setup = [py, "bench/gpu_pack.py", "stand-in"]
    setup += ["--fmnist", str(work / "fmnist"), "--json", str(figures_json)]
    e2e_data = work / "e2e-data.json"
    metrics = out / "e2e_metrics.jsonl"
    demo_out = work / "demo"
    cuda_tests = [str(p.relative_to(REPO)) for p in sorted((REPO / "tests").glob("test_*.py"))
                  if "pytest.mark.cuda" in p.read_text()]
    tests = ([py, "-m", "pytest", "-m", "cuda", "-rA", "-p", "no:cacheprovider", "--timeout", "120",
              f"--junitxml={work / 'pytest.xml'}", *cuda_tests] if cuda_tests
             else failing_command("no test file marks a test with pytest.mark.cuda", 1))

    def demo_command() -> list[str]:
        minutes = demo_minutes(run.deadline - time.time(), profile.demo_reserve_s, *profile.demo_minutes)
        return [py, "-m", "stream_swav", "demo", "--out", str(demo_out), "--fresh", "--minutes", f"{minutes:.1f}",
                *args("demo")]

    steps = [
        step("setup", setup, collect=lambda: read_json(figures_json) or {}),
        step("demo-shards", [py, "-m", "stream_swav", "demo", "--out", str(demo_out), "--prepare-only",
                             *args("demo-shards")]),
        step("e2e-shards", [py, "bench/gpu_proof.py", "e2e-shards", "--dest", str(work / "e2e-shards"),
                            *args("e2e-shards"), "--json", str(e2e_data)],
             collect=lambda: read_json(e2e_data) or {}),
        step("learner", [py, "bench/learner.py", *args("learner"), "--json-out", str(out / "learner.json")],
             collect=lambda: learner_figures(read_json(out / "learner.json") or {})),
        # Its JSON stays in the scratch folder ($OUT holds 8 files already): the summary carries its figures.
        step("families", [py, "bench/learner.py", *args("families"), "--json-out", str(work / "families.json")],
             collect=lambda: families_figures(read_json(work / "families.json") or {})),
        step("e2e", [py, "-m", "stream_swav", "train", "--config", "deploy/configs/resnet50-gpu.yaml",
                     *sets(f"data.shards={work / 'e2e-shards'}", "data.follow=false", "train.learners=1",
                           "train.log_interval_s=5", f"train.compile={run.e2e_compile}",
                           f"checkpoint.dir={work / 'e2e-checkpoints'}", "checkpoint.keep_last=1",
                           "metrics.host=127.0.0.1", f"metrics.port={run.metrics_port}"), *args("e2e")],
             alongside=lambda: Scraper(f"http://127.0.0.1:{run.metrics_port}/metrics", metrics,
                                       profile.scrape_interval_s),
             collect=lambda: e2e_figures(read_jsonl(metrics), read_json(e2e_data), gpu_samples(run.gpu_csv))),
        # Only the files that hold CUDA tests: the others import what the GPU machine lacks (moto).
        step("tests", tests, output=out / "pytest.txt", collect=lambda: tests_figures(work / "pytest.xml")),
        step("demo", demo_command, collect=lambda: collect_demo(demo_out, out),
             accept=lambda rc: DEMO_VERDICT_NOTE if rc == 1 and (demo_out / "eval" / "summary.json").exists()
             else None),
    ]
    names = {s.name for s in steps}
    unknown = {a for s in steps for a in s.after} - names
    if unknown or names != set(profile.steps):
        raise ValueError(f"profile and plan disagree: {sorted(unknown)} / {sorted(names ^ set(profile.steps))}")
    return steps


def failing_command(message: str, rc: int) -> list[str]:
    return [sys.executable, "-c", f"import sys; print({message!r}); sys.exit({rc})"]


def demo_minutes(seconds_left: float, reserve_s: float, most: float, least: float) -> float:
    """Training minutes for the demo: `most` when the time left allows it, less otherwise, never
    under `least`; in tenths, as `stream-swav demo --minutes` takes it."""
    available = (seconds_left - reserve_s) / 60.0
    return max(least, min(most, math.floor(available * 10) / 10))


# ------------------------------------------------------------------------------------------ the runner

class Log:
    """gpu_proof.log: every line of every step and of the runner, stamped with the time and a tag."""

    def __init__(self, path: Path) -> None:
        self.file: IO[str] = open(path, "w", encoding="utf-8", errors="replace")
        self.lock = threading.Lock()

    def write(self, tag: str, text: str, echo: bool = False) -> None:
        line = f"{time.strftime('%H:%M:%S')} {tag:<11} {text}"
        with self.lock:
            if not self.file.closed:  # a lingering child of a step may still write after the end
                self.file.write(line + "\n")
                self.file.flush()
        if echo:
            print(line, flush=True)

    def say(self, text: str) -> None:
        self.write("gpu-proof", text, echo=True)

    def close(self) -> None:
        with self.lock:
            self.file.close()


class Summary:
    """summary.json, kept here and written whole (atomically) after every change."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.save()

    def step(self, name: str, **fields: Any) -> None:
        self.data["steps"][name].update({k: v for k, v in fields.items() if v is not None})
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


class Scraper:
    """/metrics scraped every `interval_s` while a step runs: one JSON line per answered scrape."""

    def __init__(self, url: str, path: Path, interval_s: float) -> None:
        self.url, self.path, self.interval_s = url, path, interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def loop(self) -> None:
        with open(self.path, "w") as out:
            while True:
                stopping = self.stop.is_set()  # one scrape more after the step's end
                try:
                    with urllib.request.urlopen(self.url, timeout=2) as response:
                        values = parse_metrics(response.read().decode())
                    out.write(json.dumps({"t": round(time.time(), 3), "values": values}) + "\n")
                    out.flush()
                except OSError:
                    pass  # not up yet, or gone
                if stopping:
                    return
                self.stop.wait(self.interval_s)


@dataclass
class Running:
    step: Step
    process: subprocess.Popen[bytes]
    started: float   # unix time
    budget_s: int
    note: str
    reader: threading.Thread
    alongside: contextlib.ExitStack
    signalled: int = 0           # the last signal sent at the cap (TERM), then after the grace (KILL)
    signalled_at: float = 0.0    # monotonic


@dataclass
class Runner:
    run: Run
    log: Log
    summary: Summary
    min_step_s: float = MIN_STEP_S
    kill_grace_s: float = KILL_GRACE_S
    running: list[Running] = field(default_factory=list)

    def run_all(self, steps: list[Step]) -> None:
        pending, ended = list(steps), set()
        while pending or self.running:
            for step in [s for s in pending if set(s.after) <= ended]:
                pending.remove(step)
                started = self.start(step)
                if started:
                    self.running.append(started)
                else:
                    ended.add(step.name)
            time.sleep(POLL_S)
            for running in list(self.running):
                self.enforce_cap(running)
                if running.process.poll() is not None:
                    self.running.remove(running)
                    self.finish(running)
                    ended.add(running.step.name)

    def start(self, step: Step) -> Running | None:
        left = self.run.deadline - time.time()
        budget = int(min(step.cap_s, left))
        if budget < self.min_step_s:
            self.log.say(f"{step.name}: skipped, {left:.0f}s left before the deadline")
            self.summary.step(step.name, status="skipped", note=f"not started: {left:.0f}s left before the deadline")
            return None
        command = step.command() if callable(step.command) else list(step.command)
        note = ""
        if step.name == self.run.fail_step:
            command, note = failing_command("failing on purpose: GPU_PROOF_FAIL_STEP names this step",
                                            FORCED_RC), FORCED_NOTE
        self.log.say(f"{step.name}: start, budget {budget}s: {shlex.join(command)}")
        started = time.time()
        self.summary.step(step.name, status="running", budget_s=budget, started_unix=started,
                          command=shlex.join(command))
        alongside = contextlib.ExitStack()
        if step.alongside:
            alongside.enter_context(step.alongside())
        # A session of its own, so that the cap stops the step's whole process tree.
        process = subprocess.Popen(command, cwd=REPO, env=self.step_env(), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        reader = threading.Thread(target=self.copy_output, args=(process, step), name=step.name, daemon=True)
        reader.start()
        return Running(step, process, started, budget, note, reader, alongside)

    def step_env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               # Offline machine: no usage-statistics upload attempts from Ray.
               "RAY_USAGE_STATS_ENABLED": "0"}
        # Ray workers inherit this environment: the repository (and the bundle), no pip install needed.
        paths = [str(REPO)] + ([str(SITE)] if self.run.mode == "gpu" else [])
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        fmnist = self.run.work / "fmnist"
        if (fmnist / "train-images-idx3-ubyte").exists():  # the setup step's Fashion-MNIST, once it wrote it
            env["STREAM_SWAV_FMNIST"] = str(fmnist)
        return env

    def copy_output(self, process: subprocess.Popen[bytes], step: Step) -> None:
        assert process.stdout is not None
        with contextlib.ExitStack() as stack:
            own = stack.enter_context(open(step.output, "wb")) if step.output else None
            for raw in process.stdout:
                if own:
                    own.write(raw)
                self.log.write(step.name, raw.decode(errors="replace").rstrip("\r\n"))

    def enforce_cap(self, running: Running) -> None:
        now = time.monotonic()
        over = time.time() - running.started >= running.budget_s
        if over and not running.signalled:
            self.signal(running, signal.SIGTERM)
        elif running.signalled == signal.SIGTERM and now - running.signalled_at >= self.kill_grace_s:
            self.signal(running, signal.SIGKILL)

    def signal(self, running: Running, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(running.process.pid, sig)
        running.signalled, running.signalled_at = sig, time.monotonic()

    def stop_all(self) -> None:
        for running in self.running:
            self.signal(running, signal.SIGKILL)

    def finish(self, running: Running) -> None:
        step, seconds = running.step, time.time() - running.started
        rc = running.process.returncode
        rc = 128 - rc if rc < 0 else rc  # killed by signal N: 128 + N, as a shell says
        note = running.note
        if running.signalled:
            # As `timeout` says it: 124 when the TERM ended the step, 137 when it took the KILL.
            status, rc = "timeout", 137 if running.signalled == signal.SIGKILL else 124
        elif rc == 0:
            status = "ok"
        elif step.accept and not note and (verdict := step.accept(rc)):
            status, note = "ok", verdict
        else:
            status = "failed"
        # Output that grandchildren still write (Ray's processes ending) is not waited for long.
        running.reader.join(timeout=5)
        running.alongside.close()
        figures = None
        if step.collect:
            try:
                figures = step.collect()
            except Exception as error:  # a figure's bug must not cost the run its other figures
                note = f"{note}; " if note else ""
                note += f"figures failed: {error!r}"
        self.summary.step(step.name, status=status, rc=rc, seconds=round(seconds, 1), note=note or None,
                          figures=figures or None)
        self.log.say(f"{step.name}: {status} (rc {rc}) after {seconds:.1f}s" + (f" [{note}]" if note else ""))


# ------------------------------------------------------------------------------------------ the run

def new_summary(run: Run) -> dict[str, Any]:
    pack = read_json(BUNDLE / "pack.json") if run.mode == "gpu" else None
    return {
        "mode": run.mode,
        "started": now_iso(),
        "budget_s": run.budget_s,
        "commit": git_commit() or "unknown (no git in this copy)",
        "pack": {k: pack.get(k) for k in ("made", "commit", "required")} if pack else None,
        "machine": machine_info(),
        "steps": {name: {"status": "pending"} for name in run.profile.steps},
        "targets": {},
    }


def describe_budget(run: Run) -> str:
    parts = [f"all done within {run.budget_s}s"]
    for name, settings in run.profile.steps.items():
        cap = "the rest" if math.isinf(settings.cap_s) else f"<={settings.cap_s:.0f}s"
        parts.append(f"{name} {cap}" + (f" after {'+'.join(settings.after)}" if settings.after else ""))
    most, least = run.profile.demo_minutes
    parts.append(f"demo trains {most:g} min (fewer when behind, not under {least:g}) "
                 f"+ ~{run.profile.demo_reserve_s:.0f}s")
    return "budget: " + "; ".join(parts)


def finish_summary(summary: Summary, run: Run) -> None:
    data = summary.data
    samples = gpu_samples(run.gpu_csv)
    for step in data["steps"].values():
        if samples and "started_unix" in step and "seconds" in step:
            window = gpu_window(samples, step["started_unix"], step["started_unix"] + step["seconds"])
            if window:
                step["gpu"] = window
    data["finished"] = now_iso()
    data["wall_s"] = round(time.time() - run.started, 1)
    data["targets"] = targets(data)
    data["failed_steps"] = [name for name, step in data["steps"].items() if step.get("status") != "ok"]
    data["files"] = sorted({str(p.relative_to(run.out)) for p in run.out.rglob("*") if p.is_file()}
                           | {summary.path.name})
    summary.save()


def run_proof(run: Run) -> int:
    run.out.mkdir(parents=True, exist_ok=True)
    # A rerun into the same folder must not mix an earlier run's files into this one's figures.
    for name in PROMISED_FILES:
        (run.out / name).unlink(missing_ok=True)
    log = Log(run.out / "gpu_proof.log")
    summary = Summary(run.out / "summary.json", new_summary(run))
    runner = Runner(run, log, summary)
    log.say(f"GPU proof run ({run.mode}), commit {summary.data['commit']}, python {run.python}; results in "
            f"{run.out}, scratch in {run.work}")
    log.say(describe_budget(run))
    sampler = None
    if run.mode == "gpu" and shutil.which("nvidia-smi"):
        with open(run.gpu_csv, "w") as csv:
            sampler = subprocess.Popen(["nvidia-smi", "-i", "0", "--query-gpu=timestamp,utilization.gpu,memory.used",
                                        "--format=csv,noheader,nounits", "-lms", "500"],
                                       stdout=csv, stderr=subprocess.DEVNULL)
    try:
        runner.run_all(plan(run))
    finally:
        runner.stop_all()
        if sampler:
            sampler.terminate()
            sampler.wait()
    log.say(f"done in {time.time() - run.started:.0f}s")
    finish_summary(summary, run)
    for line in verdict_lines(summary.data):
        log.say(line)
    log.close()
    cap_file(run.out / "gpu_proof.log", LOG_MAX_BYTES)
    problems = check_out(run.out)
    with open(run.out / "gpu_proof.log", "a") as appended:
        for problem in problems:
            print(f"OUT check: {problem}", file=sys.stderr)
            appended.write(f"OUT check: {problem}\n")
    return 0 if not summary.data["failed_steps"] and not problems else 1


def cmd_run(args: argparse.Namespace) -> int:
    started = time.time()
    profile = PROFILES[args.mode]
    work_named = os.environ.get("GPU_PROOF_WORK", "")
    work = Path(work_named) if work_named else Path(tempfile.mkdtemp(prefix="gpuproof."))
    work.mkdir(parents=True, exist_ok=True)
    run = Run(mode=args.mode, python=sys.executable,
              out=Path(os.environ.get("OUT") or REPO / "runs" / f"gpu-proof-{args.mode}").resolve(),
              work=work.resolve(), started=started,
              deadline=started + int(os.environ.get("GPU_PROOF_BUDGET_S") or profile.budget_s),
              fail_step=os.environ.get("GPU_PROOF_FAIL_STEP", ""),
              e2e_compile=os.environ.get("GPU_PROOF_E2E_COMPILE") or "false", metrics_port=free_port())
    # The device tool's own timeout and Ctrl-C end the run through `finally`: no step outlives it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return run_proof(run)
    finally:
        if not work_named and os.environ.get("GPU_PROOF_KEEP", "0") != "1":
            shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------ figures

def learner_figures(report: dict[str, Any]) -> dict[str, Any]:
    """bench/learner.py's report: per batch, ours and classic; ours / classic; loss match; host syncs."""
    by_batch: dict[str, dict[str, Any]] = {}
    for row in report.get("results", []):
        path = "ours" if row["name"].startswith("ours") else "classic"
        by_batch.setdefault(str(row["batch"]), {})[path] = {
            k: row.get(k) for k in ("images_per_s", "step_ms", "peak_gib", "mfu", "warmup_s", "nonfinite_steps",
                                    "error") if row.get(k) not in (None, "")}
    ratios = {}
    for batch, paths in by_batch.items():
        ours, classic = paths.get("ours", {}).get("images_per_s"), paths.get("classic", {}).get("images_per_s")
        if ours and classic:
            ratios[batch] = round(ours / classic, 3)
    match = report.get("loss_match") or {}
    return {
        "environment": report.get("environment"),
        "batches": by_batch,
        "ours_vs_classic": ratios,
        "loss_match": {k: match.get(k) for k in ("batch", "losses", "ours_vs_classic", "ours_vs_fp32",
                                                 "classic_vs_fp32", "ours_precision", "classic_precision")}
        if match else None,
        "host_syncs_per_step": {path: len(where) for path, where in (report.get("syncs_per_step") or {}).items()},
        "host_sync_sites": report.get("syncs_per_step"),
        "flops_per_image": report.get("flops_per_image"),
    }


def families_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Per backbone family (bench/learner.py --families): its recipe's network and our step's figures."""
    flops = report.get("family_flops_per_image") or {}
    figures: dict[str, Any] = {"environment": report.get("environment"), "families": {}}
    for row in report.get("families", []):
        family, _, recipe = row["name"].partition(": ")
        figures["families"][family] = {
            "recipe": recipe, "batch": row["batch"], "flops_per_image": flops.get(family),
            **{k: row.get(k) for k in ("images_per_s", "step_ms", "peak_gib", "mfu", "warmup_s", "nonfinite_steps",
                                       "error") if row.get(k) not in (None, "")}}
    return figures


METRIC_LINE = re.compile(r"^(stream_swav_[a-z_]+)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """stream_swav_* samples of a Prometheus text page; labelled families are summed over labels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line.strip())
        if match and not match[1].endswith("_created"):
            values[match[1]] = values.get(match[1], 0.0) + float(match[3])
    return values


def steps_of(scrape: dict[str, Any]) -> float:
    return scrape["values"].get("stream_swav_steps_total", 0.0)


def steady_window(scrapes: list[dict[str, Any]], skip_s: float) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """First and last scrapes of the steady part of a run: from `skip_s` after the first trained
    step was seen (cuDNN autotuning and the decoders' start behind us) to the first scrape that
    saw the final step (after it the driver only drains, checkpoints and stops)."""
    trained = [s for s in scrapes if steps_of(s) >= 1]
    if len(trained) < 2:
        return None
    end = next(s for s in trained if steps_of(s) == steps_of(trained[-1]))
    running = [s for s in trained if s["t"] <= end["t"]]
    window = [s for s in running if s["t"] >= trained[0]["t"] + skip_s]
    if len(window) < 2:
        # A short run (the dry run): its second half.
        window = running[len(running) // 2:]
    if len(window) < 2 or window[-1]["t"] <= window[0]["t"]:
        return None
    return window[0], window[-1]


def window_input_wait(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """The pacing learner's share of time waiting for batches between scrapes a and b, from the
    wait and busy counters the learners add to after every chunk (None when they did not move)."""
    wait, busy = (b["values"].get(name, 0.0) - a["values"].get(name, 0.0)
                  for name in ("stream_swav_input_wait_seconds_total", "stream_swav_learner_busy_seconds_total"))
    return round(wait / (wait + busy), 4) if wait + busy > 0 else None


def e2e_figures(scrapes: list[dict[str, Any]], shards: dict[str, Any] | None,
                gpu: list[tuple[float, float, float]], skip_s: float = 10.0) -> dict[str, Any]:
    """The e2e run's figures from its /metrics scrapes (and the GPU samples of its steady window)."""
    figures: dict[str, Any] = {"scrapes": len(scrapes)}
    if scrapes:
        last = scrapes[-1]["values"]
        figures.update(
            # Gauges of the actors up: their most over the run (they fall to 0 as the run stops).
            learners=int(max(s["values"].get("stream_swav_learners", 0) for s in scrapes)),
            decode_actors=int(max(s["values"].get("stream_swav_decode_actors_up", 0) for s in scrapes)),
            steps=int(last.get("stream_swav_steps_total", 0)),
            images_trained=int(last.get("stream_swav_images_trained_total", 0)),
            images_per_s_gauge=last.get("stream_swav_images_per_second"),
            loss=last.get("stream_swav_loss"),
            input_wait_ratio_whole_run=window_input_wait({"values": {}}, scrapes[-1]),
            decode_errors=int(last.get("stream_swav_decode_errors_total", 0)),
            gpu_memory_reserved_gib=round(last.get("stream_swav_gpu_memory_reserved_bytes", 0) / 2**30, 2) or None,
        )
    window = steady_window(scrapes, skip_s)
    if window:
        a, b = window
        seconds = b["t"] - a["t"]
        images = b["values"]["stream_swav_images_trained_total"] - a["values"]["stream_swav_images_trained_total"]
        figures["steady"] = {"from_unix": a["t"], "to_unix": b["t"], "seconds": round(seconds, 1),
                             "steps": int(steps_of(b) - steps_of(a))}
        figures["images_per_s_steady"] = round(images / seconds, 1)
        figures["input_wait_ratio_steady"] = window_input_wait(a, b)
        in_flight = [s["values"]["stream_swav_object_store_batches_in_flight"] for s in scrapes
                     if a["t"] <= s["t"] <= b["t"] and "stream_swav_object_store_batches_in_flight" in s["values"]]
        if in_flight:
            figures["batches_in_flight_mean"] = round(statistics.fmean(in_flight), 1)
        steady_gpu = gpu_window(gpu, a["t"], b["t"])
        if steady_gpu:
            figures["steady"].update(steady_gpu)
    if shards:
        figures["shards"] = shards
    return figures


def collect_demo(demo_out: Path, out: Path) -> dict[str, Any]:
    """The demo's summary, results and plot into $OUT; its figures from them and its last checkpoint."""
    eval_dir = demo_out / "eval"
    for source, dest in DEMO_FILES.items():
        if (eval_dir / source).is_file():
            shutil.copyfile(eval_dir / source, out / dest)
    return demo_figures(read_jsonl(eval_dir / "results.jsonl"), read_json(eval_dir / "summary.json"),
                        read_json(demo_out / "checkpoints" / "latest.json"))


def demo_figures(rows: list[dict[str, Any]], summary: dict[str, Any] | None,
                 latest: dict[str, Any] | None) -> dict[str, Any]:
    """From the demo's evaluation rows (one per checkpoint), its summary and its last checkpoint's record."""
    rows = sorted(rows, key=lambda r: r.get("step", 0))
    figures: dict[str, Any] = {"checkpoints_evaluated": len(rows)}
    train = ((latest or {}).get("config") or {}).get("train") or {}
    if train:
        figures.update(minutes=round(train["time_budget_s"] / 60, 2), image_budget=train["image_budget"],
                       batch_size=train["batch_size"])
    if rows:
        last = rows[-1]
        best = max(rows, key=lambda r: r.get("knn_top1") or 0.0)
        figures.update(
            knn_top1_last=last.get("knn_top1"), knn_top1_best=best.get("knn_top1"),
            best_at_images=best.get("images_seen"), images_seen=last.get("images_seen"), steps=last.get("step"),
            pixels_knn_top1=last.get("pixels_knn_top1"), random_knn_top1=last.get("random_knn_top1"),
            random_bn_knn_top1=last.get("random_bn_knn_top1"), probe_top1_last=last.get("probe_top1"),
            pixels_probe_top1=last.get("pixels_probe_top1"), random_probe_top1=last.get("random_probe_top1"),
            eval_split=f"{last.get('train_count')}/{last.get('test_count')}",
            beats_random_init=bool((last.get("knn_top1") or 0) > (last.get("random_knn_top1") or 1)),
            beats_pixels=bool((last.get("knn_top1") or 0) > (last.get("pixels_knn_top1") or 1)),
        )
    if len(rows) >= 2:
        # Training speed between the first and the last checkpoint: past Ray's start and warm-up.
        first, last = rows[0], rows[-1]
        seconds = (dt.datetime.fromisoformat(last["checkpoint_time"])
                   - dt.datetime.fromisoformat(first["checkpoint_time"])).total_seconds()
        if seconds > 0:
            figures["train_images_per_s"] = round((last["images_seen"] - first["images_seen"]) / seconds, 1)
    if summary:
        figures["dataset"] = summary.get("dataset")
    return figures


def tests_figures(junit_xml: Path) -> dict[str, Any]:
    """pytest's JUnit XML report: counts, and which tests failed, passed and were skipped (with why)."""
    try:
        root = ElementTree.parse(junit_xml).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed, passed, skipped = [], [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            passed.append(name)
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skipped.append(f"{name}: {outcome.get('message', '')}")
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            failed.append(name)
    return {"counts": counts, "failed": failed, "passed": passed, "skipped": skipped}


def gpu_samples(path: Path) -> list[tuple[float, float, float]]:
    """(unix time, utilisation %, memory used MiB) rows of `nvidia-smi --query-gpu=timestamp,...`."""
    rows = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 3:
                continue
            try:
                stamp = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                rows.append((stamp, float(parts[1]), float(parts[2])))
            except ValueError:
                continue
    return rows


def gpu_window(samples: list[tuple[float, float, float]], start: float, end: float) -> dict[str, Any] | None:
    inside = [s for s in samples if start <= s[0] <= end]
    if not inside:
        return None
    return {"gpu_util_mean_pct": round(statistics.fmean(s[1] for s in inside), 1),
            "gpu_memory_max_mib": max(s[2] for s in inside), "gpu_samples": len(inside)}


def figure(summary: dict[str, Any], step: str, *keys: str) -> Any:
    value: Any = summary["steps"].get(step, {}).get("figures", {})
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """The proof's three targets, each with the measured value and whether it was met (None: no figure).
    A dry run's figures come from tiny CPU settings: the verdicts say nothing there."""
    ratio = figure(summary, "learner", "ours_vs_classic", "256")
    knn = figure(summary, "demo", "knn_top1_last")
    best = figure(summary, "demo", "knn_top1_best")
    split = figure(summary, "demo", "eval_split")
    pixels = figure(summary, "demo", "pixels_knn_top1")
    wait, wait_source = figure(summary, "e2e", "input_wait_ratio_steady"), "steady window"
    if wait is None:
        wait, wait_source = figure(summary, "e2e", "input_wait_ratio_whole_run"), "whole run"

    def verdict(value: Any, ok: bool) -> bool | None:
        return None if value is None else bool(ok)

    return {
        "applies": summary.get("mode") == "gpu",
        "learner_ours_vs_classic_at_256": {"value": ratio, "target": ">= 2.0",
                                           "met": verdict(ratio, ratio is not None and ratio >= 2.0)},
        "demo_knn_top1": {"value": knn, "best": best, "split": split,
                          "pixels": pixels, "target": "> raw pixels (the same run's weighted kNN, full 60k/10k split)",
                          "met": verdict(knn, knn is not None and pixels is not None and knn > pixels
                                         and split == "60000/10000")},
        "e2e_input_wait": {"value": wait, "source": wait_source, "target": "< 0.05",
                           "met": verdict(wait, wait is not None and wait < 0.05)},
    }


def verdict_lines(summary: dict[str, Any]) -> Iterator[str]:
    yield f"GPU proof ({summary.get('mode')}): {summary.get('wall_s')} s of {summary.get('budget_s')} s budget"
    for name, step in summary["steps"].items():
        rc = f" rc {step['rc']}" if "rc" in step else ""
        note = f"  [{step['note']}]" if step.get("note") else ""
        yield f"  {name:<12} {step.get('status', '?'):<8} {step.get('seconds', 0):>6} s{rc}{note}"
    applies = summary["targets"].get("applies")
    for name, target in summary["targets"].items():
        if name == "applies":
            continue
        met = {True: "MET", False: "NOT MET", None: "no figure"}[target["met"]]
        yield (f"  target {name}: {target['value']} (target {target['target']}): "
               f"{met if applies else met + ' (dry run: tiny CPU settings, not a verdict)'}")


# ------------------------------------------------------------------------------------------ files

def finite_json(value: Any) -> Any:
    """NaN and infinities as null: JSON has no spelling for them (Python's NaN is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(finite_json(value), indent=2, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines file (a line cut by a kill is left out)."""
    rows = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def check_out(out: Path) -> list[str]:
    """What breaks the device tool's limits on $OUT (count, depth, size, links), one line each."""
    files = sorted(p for p in out.rglob("*") if p.is_file() or p.is_symlink())
    problems = []
    if len(files) > OUT_FILE_LIMIT:
        problems.append(f"{len(files)} files, the limit is {OUT_FILE_LIMIT}")
    for path in files:
        relative = path.relative_to(out)
        if len(relative.parts) > OUT_DEPTH:
            problems.append(f"{relative}: deeper than $OUT/a/b/file")
        if path.is_symlink():
            problems.append(f"{relative}: a link does not come back")
        elif path.stat().st_size > OUT_FILE_BYTES:
            problems.append(f"{relative}: {path.stat().st_size:,} bytes, over 16 MiB")
    return problems


def cap_file(path: Path, max_bytes: int) -> None:
    """Keep a log under the size that comes back: its head and tail, with a marker between."""
    if not path.exists() or path.stat().st_size <= max_bytes:
        return
    data = path.read_bytes()
    keep = max_bytes // 2 - 1024
    marker = f"\n[... {len(data) - 2 * keep:,} bytes cut to stay under {max_bytes:,} ...]\n".encode()
    path.write_bytes(data[:keep] + marker + data[-keep:])


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine_info() -> dict[str, Any]:
    """What the figures depend on, without importing torch."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    for dist in ("torch", "torchvision", "numpy", "pillow", "ray"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[dist] = importlib.metadata.version(dist)
    with contextlib.suppress(OSError):
        meminfo = Path("/proc/meminfo").read_text()
        info["memory_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", meminfo)[1]) / 2**20, 1)
    with contextlib.suppress(OSError):
        model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        info["cpu_model"] = model[1].strip() if model else "?"
    with contextlib.suppress(OSError):
        shm = os.statvfs("/dev/shm")
        # Ray's object store lives in /dev/shm when it is big enough, else in /tmp (slower).
        info["dev_shm_gib"] = round(shm.f_frsize * shm.f_blocks / 2**30, 1)
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True)
        info["gpus"] = [line.strip() for line in query.stdout.splitlines() if line.strip()]
    return info


# ------------------------------------------------------------------------------------------ e2e data

_SPLIT: tuple[Any, Any] | None = None  # (images, labels), shared with forked workers


def _write_part(dest: str, indices: list[int], size: int, per_shard: int) -> dict[str, Any]:
    from stream_swav.apps.make_shards import array_samples, write_shards

    assert _SPLIT is not None
    images, labels = _SPLIT
    samples = array_samples(images, labels, size=size, image_format="jpeg", indices=indices)
    return write_shards(samples, dest, per_shard, 1 << 40,
                        settings={"source": "gpu-proof", "size": size, "first": indices[0]}).to_dict()


def cmd_e2e_shards(args: argparse.Namespace) -> int:
    """`--count` images upscaled to `--size` px JPEG (quality 90) in shards of `--per-shard`,
    written by `--workers` processes into dest/part-NN/ (the e2e step reads the whole folder)."""
    global _SPLIT
    import numpy as np

    from stream_swav.apps import datasets as fashion_mnist

    started = time.monotonic()
    folder = fashion_mnist.find_fashion_mnist()
    if folder is not None:
        images, labels = fashion_mnist.load_split(folder, "train")
        source = f"Fashion-MNIST train split ({folder})"
    else:
        images, labels = fashion_mnist.procedural_dataset(args.count, seed=0)
        source = "procedural 10-class shapes (Fashion-MNIST not found)"
    count = min(args.count, len(images))
    _SPLIT = (images, labels)
    parts = [chunk.tolist() for chunk in np.array_split(np.arange(count), args.workers) if len(chunk)]
    dests = [str(Path(args.dest) / f"part-{n:02d}") for n in range(len(parts))]
    jobs = (dests, parts, [args.size] * len(parts), [args.per_shard] * len(parts))
    if len(parts) == 1:
        summaries = list(map(_write_part, *jobs))
    else:
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(max_workers=len(parts), mp_context=context) as pool:
            summaries = list(pool.map(_write_part, *jobs))
    shards = sum(s["shards_written"] + s["shards_kept"] for s in summaries)
    total_bytes = sum(s["bytes"] for s in summaries)
    print(f"{count:,} images of {source} as {args.size} px JPEG in {shards} shards "
          f"({total_bytes / 1e6:.0f} MB, {total_bytes / max(count, 1) / 1e3:.1f} kB per sample) under {args.dest} "
          f"in {time.monotonic() - started:.1f} s", flush=True)
    Path(args.json).write_text(json.dumps({"images": count, "source": source, "size": args.size,
                                           "shards": shards, "bytes": total_bytes}))
    return 0


# ------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the proof run (bench/gpu_proof.sh calls this; settings from GPU_PROOF_*)")
    p.add_argument("--mode", choices=sorted(PROFILES), required=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("e2e-shards", help="Fashion-MNIST upscaled to JPEG shards for the e2e step")
    p.add_argument("--dest", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--per-shard", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--json", required=True, help="the step's figures")
    p.set_defaults(func=cmd_e2e_shards)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
