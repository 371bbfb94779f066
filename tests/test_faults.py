"""Faults found by hostile probing, each reproduced as it was tried.

1. A failed final checkpoint (a full disk: a real tmpfs where the system allows mounting one).
2. A corrupt newest checkpoint, and one the learners refuse, beside a good older one; a changed model.
3. A shard whose file name is not valid UTF-8.
4. Compressed bombs in .tar.gz shards.
5. A stream whose every read fails.
6. The local Ray of `stream-swav train` listening beyond loopback.
7. A step folder that is a symbolic link to somewhere else.
8. A driver that started a private local Ray killed with SIGKILL.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import torch
from stream_swav.runtime import private_ray
from conftest import colour_samples, tar_bytes
from runtime_helpers import RAY_ENV, TESTS, processes_with_env, run_to_end, tiny_config, write_config

from stream_swav import checkpoint as ckpt
from stream_swav import cli
from stream_swav.config import DataConfig, StorageConfig
from stream_swav.data.shards import SHARD_BYTES_LIMIT, ShardReport, iter_shard
from stream_swav.runtime import driver
from stream_swav.storage import filesystem_for

# Small enough that a checkpoint is about a megabyte, so a few-megabyte tmpfs holds exactly one.
SMALL_MODEL = {"arch": "resnet10", "width": 8, "small_stem": True, "hidden_dim": 32, "output_dim": 16,
               "prototypes": 16}


def shards(folder: Path, names: list[str], size: int = 16) -> set[str]:
    """Shards named `names` (bytes names allowed) in `folder`; the keys the decoders give their samples."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = set()
    for index, name in enumerate(names):
        samples = colour_samples(size, prefix=f"s{index}", start=100 * index)
        path = os.path.join(os.fsencode(folder), os.fsencode(name))
        with open(path, "wb") as f:
            f.write(tar_bytes(samples))
        url = os.fsdecode(path)
        keys |= {f"{url}/{key}" for key, _ in samples}
    return keys


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module's runs (`driver.train` leaves a Ray its caller started alone)."""
    ray.init(address="local", num_cpus=3, include_dashboard=False, runtime_env=RAY_ENV, log_to_driver=False)
    yield
    ray.shutdown()


# ------------------------------------------------------------------------------ 1. full disk


@pytest.fixture
def tmpfs(tmp_path):
    """A real tmpfs of 64 MiB (resized by the test), or a skip where mounting is not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_final_checkpoint_that_cannot_be_written_fails_the_run_and_names_the_last_saved_step(tmp_path, tmpfs,
                                                                                             local_ray, caplog):
    keys = shards(tmp_path / "shards", ["a.tar", "b.tar"])
    ckpt_dir = tmpfs / "checkpoints"
    cfg = tiny_config({"model": SMALL_MODEL, "data": {"shards": str(tmp_path / "shards")},
                       "checkpoint": {"dir": str(ckpt_dir), "every_steps": 2, "keep_last": 1},
                       "train": {"image_budget": 16}})
    assert driver.train(cfg) == 0
    used = sum(f.stat().st_size for f in ckpt_dir.rglob("*") if f.is_file())
    # Room for the one checkpoint there is and half another: every later save runs out of space.
    subprocess.run(["mount", "-o", f"remount,size={int(1.5 * used)}", str(tmpfs)], check=True)
    caplog.set_level(logging.INFO, logger="stream_swav")
    trainer = driver.Trainer(tiny_config({**{"model": SMALL_MODEL}, "data": {"shards": str(tmp_path / "shards")},
                                          "checkpoint": {"dir": str(ckpt_dir), "every_steps": 2, "keep_last": 1},
                                          "train": {"image_budget": 2 * len(keys)}}))
    assert driver.train(trainer.cfg, trainer) == driver.EXIT_FINAL_CHECKPOINT_FAILED
    last = caplog.records[-1].getMessage()
    assert "final checkpoint at step" in last and "the last checkpoint saved is step 2" in last
    failures = trainer.metrics.registry.get_sample_value("stream_swav_checkpoint_failures_total")
    assert failures >= 2
    # Failed saves left nothing behind; the checkpoint of step 2 still loads.
    assert sorted(ckpt.list_step_dirs(str(ckpt_dir), StorageConfig())) == [2]
    assert ckpt.load_checkpoint(str(ckpt_dir), StorageConfig())["step"] == 2


# ------------------------------------------------------------------------------ 2. corrupt newest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_skips_checkpoints_that_do_not_load_or_that_the_learners_refuse_and_stops_in_one_line(
        tmp_path, local_ray, caplog, capsys):
    """The newest checkpoint is cut short (it does not load); the one before holds a momentum
    buffer of another shape (it loads, the learners refuse it: before, every recovery loaded it
    again until train.max_failures ran out). The run resumes from the oldest, latest.json is
    pointed at it, and its saves of the skipped steps replace them. A changed model is refused by
    the learners at every checkpoint: one line, exit 2."""
    shards(tmp_path / "shards", ["a.tar", "b.tar"])
    overrides = {"data": {"shards": str(tmp_path / "shards")},
                 "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 2, "keep_last": 3}}
    trainer = run_to_end(tiny_config(merge_budget(overrides, 48)), tmp_path / "first.jsonl")
    steps = sorted(ckpt.list_step_dirs(str(tmp_path / "ckpt"), StorageConfig()))
    assert steps == [2, 4, 6]
    newest = tmp_path / "ckpt" / "step-000000006" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    refused = tmp_path / "ckpt" / "step-000000004" / "state.pt"
    state = torch.load(refused, weights_only=True)
    index, buffers = next((i, b) for i, b in state["optimizer"]["state"].items() if "momentum_buffer" in b)
    buffers["momentum_buffer"] = torch.zeros(3, 3)
    torch.save(state, refused)

    caplog.set_level(logging.INFO, logger="stream_swav")
    # A schedule changed as well (as when a run is extended): a learner's refusal is still the
    # damage's, so the damaged checkpoint is skipped, not blamed on the new rate.
    again = run_to_end(tiny_config({**merge_budget(overrides, 64), "optim": {"base_lr": 0.125}}),
                       tmp_path / "second.jsonl")
    assert "skipped checkpoint" in caplog.text and "step-000000006" in caplog.text
    assert f"the learners refuse checkpoint {tmp_path / 'ckpt' / 'step-000000004'}" in caplog.text
    assert f"momentum_buffer of parameter {index} has shape (3, 3)" in caplog.text
    assert f"resumed from {tmp_path / 'ckpt' / 'step-000000002'}: step 2" in caplog.text
    assert "settings changed since checkpoint step 2 was saved: optim.base_lr " in caplog.text
    assert " -> 0.125; train.image_budget 48 -> 64" in caplog.text
    assert "learner failure" not in caplog.text and "checkpoint at step" not in caplog.text
    assert again.restarts == 0 and again.last_checkpoint_step == 8
    for step in (4, 6, 8):  # saved again over the skipped ones
        assert ckpt.load_checkpoint(str(tmp_path / "ckpt" / f"step-{step:09d}"), StorageConfig())["step"] == step
    assert ckpt.read_latest(str(tmp_path / "ckpt"), StorageConfig())["step"] == 8

    # Another model than the one the checkpoints hold, and an older checkpoint of that model beside
    # them (left by an earlier run): the refusal is the changed setting's, named in one line, exit
    # 2. Falling back to the older checkpoint, as for a damaged one, quietly threw away (and then
    # overwrote) everything trained since it.
    changed = {**overrides, "model": {"prototypes": 24}}
    other = {**changed, "checkpoint": {"dir": str(tmp_path / "other"), "every_steps": 2}}
    run_to_end(tiny_config(merge_budget(other, 16)), tmp_path / "other.jsonl")
    shutil.copytree(tmp_path / "other" / "step-000000002", tmp_path / "ckpt" / "step-000000002")
    capsys.readouterr()
    config = write_config(tmp_path / "changed.yaml", merge_budget(changed, 80))
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stream-swav: configuration error: model.prototypes: checkpoint step 8 was saved with "
                          "16, this run has 24") and "\n" not in err
    assert "the learners refuse it (" in err and "point checkpoint.dir elsewhere" in err
    assert ckpt.read_latest(str(tmp_path / "ckpt"), StorageConfig())["step"] == 8

    # No checkpoint loads: one line, exit 2, before any training.
    for folder in (tmp_path / "ckpt").glob("step-*"):
        (folder / "state.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    config = write_config(tmp_path / "train.yaml", merge_budget(overrides, 64))
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stream-swav: error: checkpoint.dir: no checkpoint in") and "\n" not in err


def merge_budget(overrides: dict, images: int) -> dict:
    return {**overrides, "train": {"image_budget": images}}


# ------------------------------------------------------------------------------ 3. odd file names


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_shard_whose_name_is_not_utf8_trains_checkpoints_and_resumes(tmp_path, local_ray):
    odd = b"shard-\xff\xfe.tar"
    keys = shards(tmp_path / "shards", [odd, b"plain.tar"])
    cfg = {"data": {"shards": str(tmp_path / "shards"), "open_shards_per_actor": 1},
           "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 2}}
    trainer = run_to_end(tiny_config({**cfg, "train": {"image_budget": len(keys)}}), tmp_path / "trained.jsonl")
    assert {s.key for s in trainer.trained} == keys
    # The checkpointed cursor names the shard as it is on disk, and a resumed run goes on from it.
    again = run_to_end(tiny_config({**cfg, "train": {"image_budget": 2 * len(keys)}}), tmp_path / "more.jsonl")
    cursor = again.ledger.cursor
    assert any(os.fsencode(cursor.url(n)).endswith(odd) for n in range(cursor.n_shards))
    assert Counter(s.key for s in again.trained) == {key: 1 for key in keys}


# ------------------------------------------------------------------------------ 4. compression bombs


def gzipped_tar(members: list[tuple[str, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=9)


def read_all(path: Path, **limits) -> tuple[list[str], ShardReport, float]:
    fs, _ = filesystem_for(str(path), StorageConfig())
    report = ShardReport()
    started = time.monotonic()
    keys = [s.key for _, s in iter_shard(str(path), fs, 0, 1, max_sample_bytes=1 << 20, read_retries=0,
                                         retry_backoff_s=0, report=report, **limits)]
    return keys, report, time.monotonic() - started


def test_a_compression_bomb_costs_a_bounded_read_and_is_counted(tmp_path):
    before = [(f"{key}.{ext}", data) for key, members in colour_samples(3, "before") for ext, data in members.items()]
    after = [(f"{key}.{ext}", data) for key, members in colour_samples(3, "after") for ext, data in members.items()]
    bomb = tmp_path / "bomb.tar.gz"
    # 256 MiB of zeros inside: about 250 kB compressed, an expansion of about 1000x.
    bomb.write_bytes(gzipped_tar(before + [("zzz.bin", bytes(256 << 20))] + after))
    assert bomb.stat().st_size < 1 << 20
    defaults = DataConfig()
    keys, report, seconds = read_all(bomb, max_shard_bytes=defaults.max_shard_bytes,
                                     max_expansion=defaults.max_expansion)
    # What came before the bomb is kept; the rest of the shard is one counted skip.
    assert keys == [f"before-{n:05d}" for n in range(3)]
    assert report.errors == Counter({SHARD_BYTES_LIMIT: 1})
    # At most 50x the compressed size was inflated, not the 256 MiB.
    assert report.bytes_read <= bomb.stat().st_size and seconds < 10
    # Without limits the whole shard is read.
    keys, report, _ = read_all(bomb)
    assert keys == [f"before-{n:05d}" for n in range(3)] + ["zzz"] + [f"after-{n:05d}" for n in range(3)]
    assert not report.errors


def test_the_absolute_limit_holds_for_plain_tars_too(tmp_path):
    shard = tmp_path / "big.tar"
    shard.write_bytes(tar_bytes(colour_samples(40, "x")))
    keys, report, _ = read_all(shard, max_shard_bytes=8 * 1024)
    assert 0 < len(keys) < 40 and report.errors == Counter({SHARD_BYTES_LIMIT: 1})


# ------------------------------------------------------------------------------ 5. every read fails


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stream_whose_reads_all_fail_pauses_between_passes(tmp_path, local_ray, caplog):
    # Shards that are there but cannot be read (folders named like shards); missing ones would be
    # retired at their first read.
    for n in range(3):
        (tmp_path / f"unreadable-{n}.tar").mkdir()
    listing = tmp_path / "shards.txt"
    listing.write_text("".join(f"{tmp_path}/unreadable-{n}.tar\n" for n in range(3)))
    cfg = tiny_config({"data": {"shards": str(listing), "decode_actors": 2},
                       "checkpoint": {"dir": str(tmp_path / "ckpt")},
                       "train": {"time_budget_s": 8, "report_interval_s": 0.3}})
    caplog.set_level(logging.INFO, logger="stream_swav")
    trainer = run_to_end(cfg, tmp_path / "trained.jsonl")
    pauses = [r.getMessage() for r in caplog.records if "without a single sample read" in r.getMessage()]
    # Pauses of 1, 2, 4 s...: a handful of passes in 8 s, not one pass after another as fast as reads fail.
    # (Two pauses need two failed passes and 1 s of waiting, about 2 s here; a fifth would need 15 s.)
    assert 2 <= len(pauses) <= 4, pauses
    assert "waiting 1s" in pauses[0] and "waiting 2s" in pauses[1]
    assert all(f"waiting {2 ** n}s" in pause for n, pause in enumerate(pauses)), pauses
    assert trainer.ledger.cursor.pass_index <= 5
    assert trainer.metrics.registry.get_sample_value("stream_swav_decode_errors_total",
                                                      {"reason": "shard-read-error"}) >= 3


# ------------------------------------------------------------------------------ 6. loopback


# One driver that started a private local Ray serves this section and section 8 (a driver killed
# with SIGKILL): a private Ray costs seconds of CPU to start and to stop. With a worker process up
# too, the driver reports which addresses the processes of its Ray listen on, says "up" and sleeps
# until it is killed.
PRIVATE_DRIVER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import ray
    from stream_swav.runtime.cluster import init_ray

    init_ray()
    ray.get(ray.remote(lambda: 1).remote())  # a worker process up too
    tmp = os.environ["RAY_TMPDIR"].encode()
    mine = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"RAY_TMPDIR=" + tmp in (proc / "environ").read_bytes().split(b"\\0"):
                mine.add(proc)
        except OSError:
            pass
    inodes = set()
    for proc in mine:
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    listening = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                listening.append(fields[1].split(":")[0])
    print(json.dumps({"processes": len(mine), "listening": listening}), flush=True)
    print("up", flush=True)
    time.sleep(600)
""")


@dataclass
class PrivateDriver:
    process: subprocess.Popen
    # Its TMPDIR, where it records the processes of its private Ray (`private_ray.records_dir`).
    tmp: Path
    # The lines it printed up to "up", its listeners' report among them (no "up" where it failed: `errors`).
    printed: list[str]
    stderr: Path

    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def private_driver(tmp_path_factory) -> Iterator[PrivateDriver]:
    tmp = tmp_path_factory.mktemp("private-driver")
    ray_tmp = f"/tmp/rk{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, TMPDIR=str(tmp))
    stderr = tmp / "stderr.log"
    with open(stderr, "wb") as err:
        process = subprocess.Popen([sys.executable, "-c", PRIVATE_DRIVER], env=env, stdout=subprocess.PIPE,
                                   stderr=err, text=True, cwd=TESTS)
    try:
        printed = []
        for line in process.stdout:  # up to "up", or to the end of its output where it failed
            printed.append(line.strip())
            if printed[-1] == "up":
                break
        yield PrivateDriver(process, tmp, printed, stderr)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        process.stdout.close()
        # Whatever of its Ray section 8 did not kill (all of it when section 8 did not run).
        for pid, _ in processes_with_env("RAY_TMPDIR", ray_tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_private_local_ray_listens_on_loopback_only(private_driver):
    assert private_driver.printed[-1:] == ["up"], private_driver.errors()
    found = json.loads(next(line for line in reversed(private_driver.printed) if line.startswith('{"processes"')))
    assert found["processes"] >= 3 and len(found["listening"]) >= 3
    # /proc/net/tcp writes 127.0.0.1 as 0100007F; tcp6 writes ::ffff:127.0.0.1 and ::1 likewise.
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    assert set(found["listening"]) <= loopback, found["listening"]


# ------------------------------------------------------------------------------ 7. symbolic links


def test_a_step_folder_linked_elsewhere_is_refused_by_export_and_resume(tmp_path, capsys):
    from test_export import save_trained_looking_checkpoint

    save_trained_looking_checkpoint(tmp_path / "checkpoints", {"arch": "resnet18"}, crop_size=32)
    step = tmp_path / "checkpoints" / "step-000000040"
    elsewhere = tmp_path / "elsewhere"
    step.rename(elsewhere)
    step.symlink_to(elsewhere, target_is_directory=True)
    assert cli.main(["export", "--checkpoint", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "leads outside the checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(ckpt.NoLoadableCheckpoint, match="leads outside"):
        ckpt.load_for_resume(str(tmp_path / "checkpoints"), StorageConfig())


def test_a_checkpoint_file_linked_elsewhere_or_to_a_device_is_refused(tmp_path, capsys):
    """A state.pt or backbone.pt linked out of its step folder (another run's) loaded as if it were
    this run's; one linked to /dev/zero was read until memory ran out."""
    from test_export import save_trained_looking_checkpoint

    save_trained_looking_checkpoint(tmp_path / "checkpoints", {"arch": "resnet18"}, crop_size=32)
    step = tmp_path / "checkpoints" / "step-000000040"
    for name in ("state.pt", "backbone.pt"):
        (step / name).rename(tmp_path / name)
        (step / name).symlink_to(tmp_path / name)
    assert cli.main(["export", "--checkpoint", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "leads outside the checkpoint folder" in capsys.readouterr().err
    with pytest.raises(ckpt.NoLoadableCheckpoint, match="state.pt leads outside"):
        ckpt.load_for_resume(str(tmp_path / "checkpoints"), StorageConfig())
    (step / "state.pt").unlink()
    (step / "state.pt").symlink_to("/dev/zero")
    with pytest.raises(ckpt.NoLoadableCheckpoint, match="leads outside"):
        ckpt.load_for_resume(str(tmp_path / "checkpoints"), StorageConfig())
    # A FIFO in its place (a file that is not one): refused before any read, which would block.
    (step / "state.pt").unlink()
    os.mkfifo(step / "state.pt")
    with pytest.raises(ckpt.NoLoadableCheckpoint, match="not a regular file"):
        ckpt.load_for_resume(str(tmp_path / "checkpoints"), StorageConfig())


# ------------------------------------------------------------------ 8. a driver killed with SIGKILL

# Ray's agents outlive a driver killed with SIGKILL (they exit on their own a minute or two later).
RAY_AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")


def ray_agent(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().startswith(RAY_AGENTS)
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_killed_drivers_private_ray_is_reaped_by_the_next_start(private_driver, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(private_driver.tmp))  # this driver's records only
    driver = private_driver.process
    processes: list[list[int]] = []
    try:
        assert private_driver.printed[-1:] == ["up"], private_driver.errors()
        record = json.loads((private_ray.records_dir() / f"{driver.pid}.json").read_text())
        processes = record["processes"]
        assert len(processes) >= 3  # GCS, raylet and its agents at least
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        # What shares the driver's fate goes, and is reaped (a zombie still counts below); what
        # outlives it stays. Waited for (up to 30 s, as long as it takes) rather than slept on.
        deadline = time.monotonic() + 30
        while (any(private_ray.start_ticks(pid) == ticks and not ray_agent(pid) for pid, ticks in processes)
               and time.monotonic() < deadline):
            time.sleep(0.1)
        left = [pid for pid, ticks in processes if private_ray.start_ticks(pid) == ticks]

        reaped = private_ray.reap()

        assert reaped == len(left)
        deadline = time.monotonic() + 10
        while any(private_ray.start_ticks(pid) == ticks for pid, ticks in processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid, ticks in processes if private_ray.start_ticks(pid) == ticks]
        assert not list(private_ray.records_dir().glob("*.json"))
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid, ticks in processes:
            if private_ray.start_ticks(pid) == ticks:
                os.kill(pid, signal.SIGKILL)


def test_a_record_of_a_live_driver_is_left_alone_and_a_torn_one_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = private_ray.records_dir()
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = [os.getpid(), private_ray.start_ticks(os.getpid())]
        (folder / "live.json").write_text(json.dumps({"driver": me, "processes": [
            [sleeper.pid, private_ray.start_ticks(sleeper.pid)]]}))
        (folder / "torn.json").write_text('{"driver": [1')
        # A dead driver whose process PID was reused: the start time differs, so it is not killed.
        (folder / "reused.json").write_text(json.dumps({"driver": [2**22 + 7, 1], "processes": [
            [sleeper.pid, private_ray.start_ticks(sleeper.pid) + 1]]}))

        assert private_ray.reap() == 0

        assert sleeper.poll() is None
        assert sorted(p.name for p in folder.glob("*.json")) == ["live.json"]
    finally:
        sleeper.kill()
