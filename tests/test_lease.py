"""The checkpoint folder's lease: one run at a time per checkpoint.dir, on local folders and S3."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from runtime_helpers import tiny_config

from stream_swav import storage
from stream_swav.checkpoint import read_latest, save_checkpoint
from stream_swav.config import StorageConfig, UsageError
from stream_swav.runtime.driver import Trainer
from stream_swav.runtime.lease import (LEASE_FILE, Holder, Lease, LeaseHeld, LeaseLost, confirm_holder, standing,
                                       this_process)
from stream_swav.runtime.private_ray import start_ticks

CFG = StorageConfig()


class Clock:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(folder, holder: Holder) -> None:
    (folder / LEASE_FILE).write_bytes(holder.to_json())


def recorded(folder) -> Holder:
    return Holder.from_json(json.loads((folder / LEASE_FILE).read_text()))


def other_machine(run: str = "elsewhere", renewals: int = 0) -> Holder:
    return Holder(run=run, host="another-host", boot="another-boot", pid=4242, pid_ticks=77, renewals=renewals)


@contextlib.contextmanager
def held(lease: Lease, stop: threading.Event | None = None) -> Iterator[Lease]:
    """The lease taken, and given up (its renewal thread ended) however the test ends."""
    try:
        assert lease.acquire(stop or threading.Event())
        yield lease
    finally:
        lease.release()


def clock_moved_by_waits(monkeypatch, stop: threading.Event, clock: Clock, step_s: float) -> None:
    """Each wait between looks moves the clock on by `step_s`, as if it had waited that long."""
    monkeypatch.setattr(stop, "wait", lambda timeout: setattr(clock, "now", clock.now + step_s) or False)


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def live_record(proc: subprocess.Popen, run: str = "theirs") -> Holder:
    return dataclasses.replace(this_process(run), pid=proc.pid, pid_ticks=start_ticks(proc.pid))


# ------------------------------------------------------------------ who holds it


def test_standing_tells_our_own_a_given_up_a_dead_a_live_and_an_unknown_holder(sleeper):
    me = this_process("mine")
    assert standing(me, me) == "ours"
    assert standing(dataclasses.replace(other_machine(), released=True), me) == "free"
    assert standing(other_machine(), me) == "unknown"
    live = live_record(sleeper)
    assert standing(live, me) == "live"
    # The same PID started at another time is another process: the holder is gone.
    assert standing(dataclasses.replace(live, pid_ticks=live.pid_ticks + 1), me) == "free"
    # Another boot of the same host: its PIDs say nothing now.
    assert standing(dataclasses.replace(live, boot="earlier-boot"), me) == "unknown"
    # Another container of this node (same boot, maybe the same host name): its PIDs are not ours.
    other_namespace = me.boot.split(" ")[0] + " pid:[1]"
    assert standing(dataclasses.replace(live, boot=other_namespace), me) == "unknown"
    # An earlier run of this very process that did not give the lease up is not running.
    assert standing(dataclasses.replace(me, run="earlier"), me) == "free"


def test_a_holder_that_exited_but_was_not_reaped_is_gone():
    """A zombie keeps its PID and start time in /proc until its parent reaps it."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        record_of_it = live_record(zombie)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{zombie.pid}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] == "Z":
                    break
            time.sleep(0.05)
        assert standing(record_of_it, this_process("mine")) == "free"
    finally:
        zombie.wait()


def test_a_record_that_is_not_a_lease_is_refused_by_name():
    good = json.loads(other_machine().to_json())
    assert Holder.from_json(good) == other_machine()
    with pytest.raises(ValueError, match="'pid'"):
        Holder.from_json({k: v for k, v in good.items() if k != "pid"})
    with pytest.raises(ValueError, match="'pid' is not of type int"):
        Holder.from_json({**good, "pid": "12"})
    with pytest.raises(ValueError, match="not a JSON object"):
        Holder.from_json([1, 2])


# ------------------------------------------------------------------ taking it


def test_a_free_folder_is_leased_renewed_and_given_up(tmp_path):
    with held(Lease(str(tmp_path), CFG, term_s=60)) as lease:
        assert recorded(tmp_path).run == lease.me.run and recorded(tmp_path).renewals == 0
        lease.renew()
        assert recorded(tmp_path).renewals == 1
        assert lease.check(last_step=0)
        assert recorded(tmp_path).renewals == 2  # a check renews
    assert recorded(tmp_path).released
    with held(Lease(str(tmp_path), CFG, term_s=60)) as next_run:  # the next run takes it at once
        assert recorded(tmp_path).run == next_run.me.run


def test_a_live_run_of_this_machine_refuses_the_next_at_once(tmp_path, sleeper):
    record(tmp_path, live_record(sleeper))
    started = time.monotonic()
    with pytest.raises(LeaseHeld) as refused:
        Lease(str(tmp_path), CFG, term_s=60).acquire(threading.Event())
    assert time.monotonic() - started < 5
    message = str(refused.value)
    assert message == (f"checkpoint.dir: {tmp_path} is in use by another run, run theirs (pid {sleeper.pid} on "
                       f"{this_process('x').host}) (a live process of this machine); stop that run (if it hangs, kill "
                       f"it, or remove {tmp_path}/{LEASE_FILE} once it is surely gone), or give this one another "
                       f"checkpoint.dir")
    assert recorded(tmp_path).run == "theirs"  # left as it was


def test_a_run_of_this_machine_that_died_is_taken_over_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    ticks = start_ticks(dead.pid)
    dead.wait()
    record(tmp_path, dataclasses.replace(this_process("killed"), pid=dead.pid, pid_ticks=ticks or 1))
    started = time.monotonic()
    with held(Lease(str(tmp_path), CFG, term_s=60)):
        assert time.monotonic() - started < 5


def test_a_live_run_in_another_pid_namespace_of_this_machine_is_not_taken_for_dead(tmp_path):
    """Two containers of one node share the boot id, and with host networking the host name: the
    holder's PID (1, say) means another process here, or none."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "-Urpf", "--kill-child", "--mount-proc", "true"],
                           capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot make a PID namespace here (unshare -Urpf)")
    holder = subprocess.Popen(
        [unshare, "-Urpf", "--kill-child", "--mount-proc", sys.executable, "-c",
         "import sys, threading, time\n"
         "from stream_swav.config import StorageConfig\n"
         "from stream_swav.runtime.lease import Lease\n"
         f"lease = Lease({str(tmp_path)!r}, StorageConfig(), 60)\n"
         "assert lease.acquire(threading.Event())\n"
         "print(lease.me.pid, flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"  # PID 1 of its namespace
        stop = threading.Event()
        threading.Timer(2.0, stop.set).start()
        lease = Lease(str(tmp_path), CFG, term_s=60)
        assert not lease.acquire(stop)  # watched, as another machine's, until stopped: not taken
        assert recorded(tmp_path).pid == 1
    finally:
        holder.kill()
        holder.wait()


def test_another_machines_lease_left_unrenewed_for_a_term_is_taken_over(tmp_path, monkeypatch, caplog):
    record(tmp_path, other_machine())
    clock, stop = Clock(), threading.Event()
    clock_moved_by_waits(monkeypatch, stop, clock, 1.0)
    with held(Lease(str(tmp_path), CFG, term_s=8, clock=clock), stop):
        assert clock.now - 1000.0 >= 8
    assert "is leased by run elsewhere (pid 4242 on another-host); waiting up to checkpoint.lease_s=8s" in caplog.text
    assert "went unrenewed for checkpoint.lease_s=8s; taking it over" in caplog.text


def test_another_machines_lease_renewed_while_waiting_refuses_the_run(tmp_path, monkeypatch):
    record(tmp_path, other_machine())
    clock, stop = Clock(), threading.Event()

    def renewed_by_its_holder(timeout: float) -> bool:
        clock.now += 1.0
        if clock.now - 1000.0 >= 3:
            record(tmp_path, other_machine(renewals=1))
        return False

    monkeypatch.setattr(stop, "wait", renewed_by_its_holder)
    with pytest.raises(LeaseHeld, match=r"run elsewhere \(pid 4242 on another-host\) \(renewed while this run waited"):
        Lease(str(tmp_path), CFG, term_s=8, clock=clock).acquire(stop)
    assert recorded(tmp_path).run == "elsewhere"


def test_a_stop_while_waiting_for_another_machines_lease_gives_up_without_taking_it(tmp_path):
    record(tmp_path, other_machine())
    stop = threading.Event()
    stop.set()
    assert not Lease(str(tmp_path), CFG, term_s=60).acquire(stop)
    assert recorded(tmp_path).run == "elsewhere"


@pytest.mark.parametrize("content", ["{not json", "[" * 200_000, '{"run": 1}'])
def test_a_file_that_is_no_lease_is_taken_with_a_warning(tmp_path, caplog, content):
    (tmp_path / LEASE_FILE).write_text(content)
    with held(Lease(str(tmp_path), CFG, term_s=60)) as lease:
        assert recorded(tmp_path).run == lease.me.run
    assert "is not a lease record" in caplog.text


def test_a_lease_that_is_a_folder_is_refused_at_once_in_one_line(tmp_path):
    (tmp_path / LEASE_FILE).mkdir()
    with pytest.raises(UsageError, match=rf"^checkpoint.dir: cannot read its lease {tmp_path}/{LEASE_FILE} \(.*\); "
                                         rf"check that .* is reachable and writable, with space free, and that "
                                         rf".*{LEASE_FILE} is a file or absent$"):
        Lease(str(tmp_path), CFG, term_s=60).acquire(threading.Event())


def test_a_store_that_never_answers_is_refused_in_one_line(tmp_path, monkeypatch):
    def unreachable(url, cfg):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(storage, "read_bytes", unreachable)
    clock, stop = Clock(), threading.Event()
    clock_moved_by_waits(monkeypatch, stop, clock, 4.0)
    with pytest.raises(UsageError, match=r"^checkpoint.dir: cannot read its lease .*connection refused.*storage "
                                         r"answers"):
        Lease(str(tmp_path), CFG, term_s=8, clock=clock).acquire(stop)


def test_a_lease_that_cannot_be_written_refuses_the_run(tmp_path, monkeypatch):
    """Running unseen, a run would let the next one take the folder beside it (a full disk: neither
    can renew, so each looks gone to the other)."""
    def disk_full(url, data, cfg):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "write_bytes_atomic", disk_full)
    with pytest.raises(UsageError, match=r"^checkpoint.dir: cannot write its lease .*No space left on device.*with "
                                         r"space free"):
        Lease(str(tmp_path), CFG, term_s=60).acquire(threading.Event())


def test_a_write_the_store_did_not_answer_is_tried_again(tmp_path, monkeypatch):
    real_write, calls = storage.write_bytes_atomic, []

    def first_times_out(url, data, cfg):
        calls.append(url)
        if len(calls) == 1:
            raise TimeoutError("timed out")
        real_write(url, data, cfg)

    monkeypatch.setattr(storage, "write_bytes_atomic", first_times_out)
    clock, stop = Clock(), threading.Event()
    clock_moved_by_waits(monkeypatch, stop, clock, 1.0)
    with held(Lease(str(tmp_path), CFG, term_s=8, clock=clock), stop) as lease:
        assert recorded(tmp_path).run == lease.me.run and len(calls) == 2


def test_lease_io_waits_at_most_an_eighth_of_a_term_without_retries(tmp_path, monkeypatch):
    """A renewal hanging in the store's retries, or on a dead mount, would land after another run
    took the lease over, and would hold the driver up meanwhile."""
    lease = Lease("s3://bucket/ckpt", StorageConfig(retries=5, read_timeout_s=60, connect_timeout_s=10), term_s=16)
    assert (lease.storage_cfg.retries, lease.storage_cfg.read_timeout_s, lease.storage_cfg.connect_timeout_s) == \
        (0, 1.0, 1.0)
    real_write = storage.write_bytes_atomic
    with held(Lease(str(tmp_path), CFG, term_s=8)) as local:
        def hung_mount(url, data, cfg):
            time.sleep(3)
            real_write(url, data, cfg)

        monkeypatch.setattr(storage, "write_bytes_atomic", hung_mount)
        started = time.monotonic()
        assert local.check(last_step=0)  # renewed and read just now: the hung write holds nothing back
        assert time.monotonic() - started < 2.5
        assert isinstance(local.failing, TimeoutError)
        # While the hung call has not returned, no second one is started beside it.
        threads = threading.active_count()
        local.renew()
        assert threading.active_count() == threads and "has not returned" in str(local.failing)


# ------------------------------------------------------------------ holding it


def test_a_lease_taken_over_stops_the_run_before_its_next_save_and_is_left_to_the_new_holder(tmp_path):
    with held(Lease(str(tmp_path), CFG, term_s=60)) as lease:
        record(tmp_path, other_machine("successor"))
        with pytest.raises(LeaseLost) as lost:
            lease.check(last_step=40)
        message = str(lost.value)
        assert message.startswith(f"checkpoint.dir: run successor (pid 4242 on another-host) took {tmp_path} over")
        assert message.endswith("the last checkpoint it saved is step 40") and "\n" not in message
        with pytest.raises(LeaseLost):
            lease.raise_if_lost(40)
    assert recorded(tmp_path).run == "successor" and not recorded(tmp_path).released


def test_the_renewal_thread_finds_a_takeover_by_itself(tmp_path):
    with held(Lease(str(tmp_path), CFG, term_s=4)) as lease:  # renewed every second
        record(tmp_path, other_machine("successor"))
        deadline = time.monotonic() + 10
        while lease.lost_to is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lease.lost_to is not None and lease.lost_to.run == "successor"
        assert recorded(tmp_path).run == "successor"  # not written over by a later renewal


def test_the_release_of_the_run_taken_over_landing_late_is_no_takeover(tmp_path, monkeypatch):
    record(tmp_path, other_machine("taken-for-dead"))
    clock, stop = Clock(), threading.Event()
    clock_moved_by_waits(monkeypatch, stop, clock, 1.0)
    with held(Lease(str(tmp_path), CFG, term_s=8, clock=clock), stop) as lease:
        record(tmp_path, dataclasses.replace(other_machine("taken-for-dead"), released=True))
        assert lease.check(last_step=0) and lease.lost_to is None
        assert recorded(tmp_path).run == lease.me.run


def test_no_save_while_the_store_stops_answering_for_half_a_term_and_saves_again_once_it_does(
        tmp_path, monkeypatch, caplog):
    clock = Clock()
    # Renewed by hand here: the thread's first renewal is a quarter of a term (15 s) away.
    with held(Lease(str(tmp_path), CFG, term_s=60, clock=clock)) as lease:
        real_write = storage.write_bytes_atomic

        def unanswered(url, data, cfg):
            raise ConnectionError("storage out of reach")

        monkeypatch.setattr(storage, "write_bytes_atomic", unanswered)
        clock.now += 20
        assert lease.check(last_step=5)  # renewed 20 s ago: within half a term
        clock.now += 15
        assert not lease.check(last_step=5)
        assert "renewing the lease on" in caplog.text
        assert "no checkpoint is saved until a renewal succeeds" in caplog.text
        monkeypatch.setattr(storage, "write_bytes_atomic", real_write)
        assert lease.check(last_step=5)


def test_no_save_once_the_lease_went_unread_for_half_a_term(tmp_path, monkeypatch):
    """The driver's mount of a shared folder broken while rank 0's is fine: the driver cannot see a
    takeover, so it must not let rank 0 save. One failed read (a slow answer) holds nothing back."""
    clock = Clock()
    with held(Lease(str(tmp_path), CFG, term_s=60, clock=clock)) as lease:
        def broken_mount(url, cfg):  # a FUSE mount gone: reads fail, and "exists" would say False
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

        monkeypatch.setattr(storage, "read_bytes", broken_mount)
        monkeypatch.setattr(storage, "exists", lambda url, cfg: False)
        clock.now += 10
        assert lease.check(last_step=5)  # found ours 10 s ago
        clock.now += 25
        assert not lease.check(last_step=5)


def test_a_full_disk_does_not_hold_the_holders_saves_back(tmp_path, monkeypatch):
    """Retention makes room at the next save; the lease still reads as this run's."""
    clock = Clock()
    with held(Lease(str(tmp_path), CFG, term_s=60, clock=clock)) as lease:
        def disk_full(url, data, cfg):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(storage, "write_bytes_atomic", disk_full)
        clock.now += 40
        assert lease.check(last_step=3)


def test_the_checkpoint_writer_confirms_the_lease_before_it_commits(tmp_path):
    confirm_holder(str(tmp_path), "mine", CFG)  # no lease: no other run's
    record(tmp_path, dataclasses.replace(other_machine("mine")))
    confirm_holder(str(tmp_path), "mine", CFG)
    # The run this one took the folder from, releasing late over this run's record: no takeover.
    record(tmp_path, dataclasses.replace(other_machine("displaced"), released=True))
    confirm_holder(str(tmp_path), "mine", CFG, displaced="displaced")
    # Any other run's release: one that took the folder over from this one (stalled past the lease)
    # and has ended since. Its checkpoints are not to be overwritten or pruned.
    with pytest.raises(LeaseLost, match="run displaced"):
        confirm_holder(str(tmp_path), "mine", CFG)
    record(tmp_path, dataclasses.replace(other_machine("successor"), released=True))
    with pytest.raises(LeaseLost, match="run successor"):
        confirm_holder(str(tmp_path), "mine", CFG, displaced="displaced")
    record(tmp_path, other_machine("successor"))
    with pytest.raises(LeaseLost, match=r"run successor \(pid 4242 on another-host\) holds .* now"):
        confirm_holder(str(tmp_path), "mine", CFG)


def test_the_lease_works_on_s3(s3_bucket, sleeper):
    folder = f"s3://{s3_bucket.name}/lease-ckpt"
    url = f"{folder}/{LEASE_FILE}"
    cfg = s3_bucket.storage
    storage.write_bytes_atomic(url, live_record(sleeper).to_json(), cfg)
    with pytest.raises(LeaseHeld):
        Lease(folder, cfg, term_s=60).acquire(threading.Event())
    sleeper.kill()
    sleeper.wait()
    with held(Lease(folder, cfg, term_s=60)) as lease:
        lease.renew()
        assert Holder.from_json(storage.read_json(url, cfg)).renewals == 1
    assert Holder.from_json(storage.read_json(url, cfg)).released


def test_a_recovery_after_the_lease_was_lost_stops_instead_of_restarting_the_learners(tmp_path):
    """A learner failure found after a takeover would restart every actor from the new holder's
    checkpoint (minutes on a large cluster) and could point its latest.json back."""
    trainer = Trainer(tiny_config({"data": {"shards": str(tmp_path)}, "checkpoint": {"dir": str(tmp_path)}}))
    trainer.lease = Lease(str(tmp_path), CFG, term_s=60)
    trainer.lease.lost_to = other_machine("successor")
    trainer.last_checkpoint_step = 12
    with pytest.raises(LeaseLost, match="the last checkpoint it saved is step 12$"):
        trainer.recover()
    assert trainer.restarts == 0


def test_a_final_stop_at_a_saved_step_does_not_mark_a_successors_latest_final(tmp_path):
    """A successor that took the folder over and resumed from the step this run last saved has a
    latest.json naming that step too; the stop's "mark it final" is not this run's to write."""
    def save(step: int) -> None:
        weights = {"w": torch.zeros(2)}
        save_checkpoint(str(tmp_path), step, 8 * step, {"model": weights}, weights,
                        {"arch": "resnet18", "small_stem": True}, CFG)

    save(12)
    trainer = Trainer(tiny_config({"data": {"shards": str(tmp_path)}, "checkpoint": {"dir": str(tmp_path)}}))
    trainer.lease = Lease(str(tmp_path), CFG, term_s=60)
    trainer.step = trainer.last_checkpoint_step = 12
    record(tmp_path, other_machine("successor"))
    with pytest.raises(LeaseLost, match=r"run successor \(pid 4242 on another-host\) holds .* now; this run stops "
                                        r"without marking its checkpoint step 12 final; the last checkpoint it saved "
                                        r"is step 12$"):
        trainer.checkpoint(final=True)
    assert read_latest(str(tmp_path), CFG).get("final") is not True
    # A successor that has saved a later step since: its lease, not a failed final save, is the reason.
    save(13)
    with pytest.raises(LeaseLost, match=r"run successor \(pid 4242 on another-host\) holds .* now"):
        trainer.checkpoint(final=True)
    assert read_latest(str(tmp_path), CFG)["step"] == 13 and read_latest(str(tmp_path), CFG).get("final") is not True
    trainer.step = trainer.last_checkpoint_step = 13
    record(tmp_path, other_machine(trainer.lease.me.run))
    assert trainer.checkpoint(final=True)  # the folder is this run's: marked
    assert read_latest(str(tmp_path), CFG)["final"] is True
