"""The checkpoint folder's lease: one run at a time per checkpoint.dir, on local folders and S3."""
from __future__ import annotations

import dataclasses
import errno
import json
import subprocess
import sys
import threading
import time

import pytest

from stream_swav import storage
from stream_swav.config import StorageConfig, UsageError
from stream_swav.runtime.lease import LEASE_FILE, Holder, Lease, LeaseHeld, LeaseLost, standing, this_process
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


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


# ------------------------------------------------------------------ who holds it


def test_standing_tells_our_own_a_given_up_a_dead_a_live_and_an_unknown_holder(sleeper):
    me = this_process("mine")
    assert standing(me, me) == "ours"
    assert standing(dataclasses.replace(other_machine(), released=True), me) == "free"
    assert standing(other_machine(), me) == "unknown"
    live = dataclasses.replace(me, run="theirs", pid=sleeper.pid, pid_ticks=start_ticks(sleeper.pid))
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
    lease = Lease(str(tmp_path), CFG, term_s=60)
    assert lease.acquire(threading.Event())
    try:
        assert recorded(tmp_path).run == lease.me.run and recorded(tmp_path).renewals == 0
        lease.renew()
        assert recorded(tmp_path).renewals == 1
        assert lease.check(last_step=0)
        assert recorded(tmp_path).renewals == 2  # a check renews
    finally:
        lease.release()
    assert recorded(tmp_path).released
    assert Lease(str(tmp_path), CFG, term_s=60).acquire(threading.Event())  # the next run takes it at once


def test_a_live_run_of_this_machine_refuses_the_next_at_once(tmp_path, sleeper):
    record(tmp_path, dataclasses.replace(this_process("theirs"), pid=sleeper.pid, pid_ticks=start_ticks(sleeper.pid)))
    started = time.monotonic()
    with pytest.raises(LeaseHeld) as refused:
        Lease(str(tmp_path), CFG, term_s=60).acquire(threading.Event())
    assert time.monotonic() - started < 5
    message = str(refused.value)
    assert message.startswith(f"checkpoint.dir: {tmp_path} is in use by another run, run theirs (pid {sleeper.pid}")
    assert "\n" not in message and "checkpoint.lease_s=60s" in message
    assert recorded(tmp_path).run == "theirs"  # left as it was


def test_a_run_of_this_machine_that_died_is_taken_over_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    ticks = start_ticks(dead.pid)
    dead.wait()
    record(tmp_path, dataclasses.replace(this_process("killed"), pid=dead.pid, pid_ticks=ticks or 1))
    lease = Lease(str(tmp_path), CFG, term_s=60)
    started = time.monotonic()
    assert lease.acquire(threading.Event())
    lease.release()
    assert time.monotonic() - started < 5


def test_another_machines_lease_left_unrenewed_for_a_term_is_taken_over(tmp_path, monkeypatch, caplog):
    record(tmp_path, other_machine())
    clock = Clock()
    lease = Lease(str(tmp_path), CFG, term_s=8, clock=clock)
    stop = threading.Event()
    # Each wait between looks moves the clock on by a second, as if it had waited that long.
    monkeypatch.setattr(stop, "wait", lambda timeout: setattr(clock, "now", clock.now + 1.0) or False)
    assert lease.acquire(stop)
    lease.release()
    assert clock.now - 1000.0 >= 8
    assert "is leased by run elsewhere (pid 4242 on another-host); waiting up to checkpoint.lease_s=8s" in caplog.text
    assert "went unrenewed for checkpoint.lease_s=8s; taking it over" in caplog.text


def test_another_machines_lease_renewed_while_waiting_refuses_the_run(tmp_path, monkeypatch):
    record(tmp_path, other_machine())
    clock = Clock()
    lease = Lease(str(tmp_path), CFG, term_s=8, clock=clock)
    stop = threading.Event()

    def renewed_by_its_holder(timeout: float) -> bool:
        clock.now += 1.0
        if clock.now - 1000.0 >= 3:
            record(tmp_path, other_machine(renewals=1))
        return False

    monkeypatch.setattr(stop, "wait", renewed_by_its_holder)
    with pytest.raises(LeaseHeld, match=r"run elsewhere \(pid 4242 on another-host\) \(renewed while this run waited"):
        lease.acquire(stop)
    assert recorded(tmp_path).run == "elsewhere"


def test_a_stop_while_waiting_for_another_machines_lease_gives_up_without_taking_it(tmp_path):
    record(tmp_path, other_machine())
    stop = threading.Event()
    stop.set()
    assert not Lease(str(tmp_path), CFG, term_s=60).acquire(stop)
    assert recorded(tmp_path).run == "elsewhere"


def test_a_file_that_is_no_lease_is_taken_with_a_warning(tmp_path, caplog):
    (tmp_path / LEASE_FILE).write_text("{not json")
    lease = Lease(str(tmp_path), CFG, term_s=60)
    assert lease.acquire(threading.Event())
    lease.release()
    assert "is not a lease record" in caplog.text


def test_a_store_that_never_answers_is_refused_in_one_line(tmp_path, monkeypatch):
    def unreachable(url, cfg):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(storage, "read_json", unreachable)
    clock = Clock()
    lease = Lease(str(tmp_path), CFG, term_s=8, clock=clock)
    stop = threading.Event()
    monkeypatch.setattr(stop, "wait", lambda timeout: setattr(clock, "now", clock.now + 4.0) or False)
    with pytest.raises(UsageError, match=r"^checkpoint.dir: cannot read its lease .*connection refused"):
        lease.acquire(stop)


# ------------------------------------------------------------------ holding it


def test_a_lease_taken_over_stops_the_run_before_its_next_save_and_is_left_to_the_new_holder(tmp_path):
    lease = Lease(str(tmp_path), CFG, term_s=60)
    assert lease.acquire(threading.Event())
    try:
        record(tmp_path, other_machine("successor"))
        with pytest.raises(LeaseLost) as lost:
            lease.check(last_step=40)
        message = str(lost.value)
        assert message.startswith(f"checkpoint.dir: run successor (pid 4242 on another-host) took {tmp_path} over")
        assert message.endswith("the last checkpoint it saved is step 40") and "\n" not in message
        with pytest.raises(LeaseLost):
            lease.raise_if_lost(40)
    finally:
        lease.release()
    assert recorded(tmp_path).run == "successor" and not recorded(tmp_path).released


def test_the_renewal_thread_finds_a_takeover_by_itself(tmp_path):
    lease = Lease(str(tmp_path), CFG, term_s=4)  # renewed every second
    assert lease.acquire(threading.Event())
    try:
        record(tmp_path, other_machine("successor"))
        deadline = time.monotonic() + 10
        while lease.lost_to is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lease.lost_to is not None and lease.lost_to.run == "successor"
        assert recorded(tmp_path).run == "successor"  # not written over by a later renewal
    finally:
        lease.release()


def test_no_save_while_renewals_fail_for_half_a_term_and_saves_again_once_one_succeeds(tmp_path, monkeypatch, caplog):
    clock = Clock()
    lease = Lease(str(tmp_path), CFG, term_s=60, clock=clock)
    assert lease.acquire(threading.Event())
    # Renewed by hand here: the thread's first renewal is a quarter of a term (15 s) away.
    real_write = storage.write_bytes_atomic

    def failing(url, data, cfg):
        raise ConnectionError("storage out of reach")

    monkeypatch.setattr(storage, "write_bytes_atomic", failing)
    clock.now += 20
    assert lease.check(last_step=5)  # renewed 20 s ago: within half a term
    clock.now += 15
    assert not lease.check(last_step=5)
    assert "renewing the lease on" in caplog.text and "no checkpoint is saved until a renewal succeeds" in caplog.text
    monkeypatch.setattr(storage, "write_bytes_atomic", real_write)
    assert lease.check(last_step=5)
    lease.release()


def test_a_full_disk_neither_refuses_the_run_nor_holds_its_saves_back(tmp_path, monkeypatch, caplog):
    """Retention makes room at the next save: a lease that cannot be written must not stop it."""
    record(tmp_path, dataclasses.replace(other_machine(), released=True))
    real_write = storage.write_bytes_atomic

    def disk_full(url, data, cfg):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "write_bytes_atomic", disk_full)
    clock = Clock()
    lease = Lease(str(tmp_path), CFG, term_s=60, clock=clock)
    assert lease.acquire(threading.Event())
    assert "could not write the lease" in caplog.text
    clock.now += 40
    # The file still holds the run this one replaced: not a takeover, and the save goes ahead.
    assert lease.check(last_step=3)
    monkeypatch.setattr(storage, "write_bytes_atomic", real_write)
    assert lease.check(last_step=3)
    assert recorded(tmp_path).run == lease.me.run
    record(tmp_path, other_machine("successor"))  # from now on, another run's record is a takeover
    with pytest.raises(LeaseLost):
        lease.check(last_step=3)
    lease.release()


def test_the_lease_works_on_s3(s3_bucket, sleeper):
    folder = f"s3://{s3_bucket.name}/lease-ckpt"
    url = f"{folder}/{LEASE_FILE}"
    live = dataclasses.replace(this_process("theirs"), pid=sleeper.pid, pid_ticks=start_ticks(sleeper.pid))
    cfg = s3_bucket.storage
    storage.write_bytes_atomic(url, live.to_json(), cfg)
    with pytest.raises(LeaseHeld):
        Lease(folder, cfg, term_s=60).acquire(threading.Event())
    sleeper.kill()
    sleeper.wait()
    lease = Lease(folder, cfg, term_s=60)
    assert lease.acquire(threading.Event())
    lease.renew()
    assert Holder.from_json(storage.read_json(url, cfg)).renewals == 1
    lease.release()
    assert Holder.from_json(storage.read_json(url, cfg)).released
