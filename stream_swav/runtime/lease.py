"""One run at a time per checkpoint folder: a lease held in `lease.json`, renewed by a heartbeat.

Two live runs on one checkpoint.dir (a job submitted twice, or a driver taken for dead while its
process lived on) would overwrite each other's latest.json, and each one's retention would delete
the other's steps. So a run takes the folder's lease before it reads a checkpoint, renews it every
quarter of `checkpoint.lease_s`, renews it again before each save (and rank 0 reads it again before
it moves latest.json and prunes), and gives it up when it ends.

Who holds a lease is judged without comparing clocks across machines:

- a lease given up (`released`), or held by a process of this machine that is gone (same host name,
  boot and PID namespace; its PID absent, a zombie, or started at another time), is free at once: a
  driver killed with SIGKILL and started again on its machine waits for nothing;
- one held by a live process of this machine is held: the run is refused at once;
- one held elsewhere (another machine or container, or where /proc tells nothing) is watched for
  `lease_s` on this machine's clock: renewed meanwhile, it is held; unrenewed, its holder is taken
  to be gone and the lease is taken over.

A run that cannot write its lease when it starts is refused. A holder saves only while a read
found the file its own under half a term ago, and, if the store has stopped answering the renewals'
writes, while its last renewal is under half a term old too; a renewal whose write fails otherwise
(a full disk, which the save's retention mends) holds nothing back. Lease reads and writes are given
up after `lease_s / 8` each, without retries (the next renewal is the retry). A holder that finds another run's lease in
the file stops without saving. Nothing makes the write of a lease exclusive (S3 has no portable
create-if-absent, and a shared filesystem is not trusted with one), so two runs starting within one
read of each other can both take the lease; the one whose write landed first finds the other's at
its next renewal or save, and stops.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stream_swav import storage
from stream_swav.config import StorageConfig, UsageError
from stream_swav.runtime.private_ray import alive, start_ticks

log = logging.getLogger("stream_swav.lease")

LEASE_FILE = "lease.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class LeaseHeld(UsageError):
    """Another live run holds the checkpoint folder's lease."""


class LeaseLost(UsageError):
    """Another run took the lease over while this one ran: it must stop without saving."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lease, as `lease.json` records it."""

    run: str
    host: str
    # The kernel's boot id and this process's PID namespace: a PID names the same process only
    # within both (two containers of one node share the boot id, and may share a host name).
    boot: str
    pid: int
    pid_ticks: int | None  # the process's start time (PIDs are reused)
    renewals: int = 0
    released: bool = False

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: Any) -> Holder:
        """ValueError when `data` is not a lease record."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            holder = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        except KeyError as missing:
            raise ValueError(f"no {missing.args[0]!r}") from None
        kinds = {"run": str, "host": str, "boot": str, "pid": int, "renewals": int, "released": bool}
        for name, kind in kinds.items():
            if not isinstance(getattr(holder, name), kind):
                raise ValueError(f"{name!r} is not of type {kind.__name__}")
        if holder.pid_ticks is not None and not isinstance(holder.pid_ticks, int):
            raise ValueError("'pid_ticks' is not an integer")
        return holder

    def describe(self) -> str:
        return f"run {self.run} (pid {self.pid} on {self.host})"


def read_holder(url: str, storage_cfg: StorageConfig) -> Holder | None:
    """The holder the lease file at `url` records; None when there is no file; ValueError when it
    is no lease record. Read, not looked up first: a filesystem's "exists" answers False for a mount
    that dropped out, which must not pass for "no lease"."""
    try:
        raw = storage.read_bytes(url, storage_cfg)
    except FileNotFoundError:
        return None
    return Holder.from_json(storage.parse_json(raw, url))


def this_process(run: str) -> Holder:
    try:
        boot = f"{BOOT_ID.read_text().strip()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        boot = ""  # not Linux: PIDs tell nothing, and a lease of this host is watched like another's
    pid = os.getpid()
    return Holder(run=run, host=socket.gethostname(), boot=boot, pid=pid, pid_ticks=start_ticks(pid))


def boot_clock() -> float:
    """Seconds on a clock that, unlike time.monotonic, goes on while the machine is suspended (a
    holder asleep longer than a term has let its lease lapse)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


def standing(holder: Holder, me: Holder, running: Callable[[int, int], bool] = alive) -> str:
    """What a lease's holder is to `me`: "ours"; "free" (given up, or its process of this machine
    is gone, or it is another run of this very process: an earlier one, as in a notebook or a test,
    or one running beside it there, which this one takes the lease from); "live" (a
    process of this machine that runs); "unknown" (another machine's or container's, or one whose
    liveness this machine cannot read)."""
    if holder.run == me.run:
        return "ours"
    if holder.released:
        return "free"
    if not (holder.host == me.host and holder.boot and holder.boot == me.boot and holder.pid_ticks is not None):
        return "unknown"
    if holder.pid == me.pid:
        return "free"  # a run of this process that ended without giving it up (it is not running)
    return "live" if running(holder.pid, holder.pid_ticks) else "free"


class Lease:
    """This run's hold on `dir_url`'s lease: `acquire` once, `check` before each write into the
    folder, `release` at the end. A thread renews it every `term_s / 4` seconds."""

    def __init__(self, dir_url: str, storage_cfg: StorageConfig, term_s: float, run: str | None = None,
                 clock: Callable[[], float] = boot_clock) -> None:
        self.dir_url = dir_url
        self.url = storage.join_url(dir_url, LEASE_FILE)
        # A renewal that hangs (on the store's retries, on a dead mount) would land after another run
        # took the lease: each read or write is given up after term_s / 8 (S3's own timeouts a
        # sixteenth each, no retries; a local or shared filesystem's call is waited for in a thread).
        self.io_timeout_s = term_s / 8
        self.storage_cfg = dataclasses.replace(storage_cfg, retries=0,
                                               connect_timeout_s=min(storage_cfg.connect_timeout_s, term_s / 16),
                                               read_timeout_s=min(storage_cfg.read_timeout_s, term_s / 16))
        self.term_s = term_s
        self.me = this_process(run or uuid.uuid4().hex[:12])
        self.clock = clock
        self.renewed_at = 0.0
        # When a read last found the lease this run's: a save needs that to be under half a term old.
        self.confirmed_at = 0.0
        # The holder that took the lease over from this run, once found.
        self.lost_to: Holder | None = None
        # The holder this run took the lease over from: its release landing late is not a takeover.
        self.displaced: Holder | None = None
        # The last renewal's error, None once one succeeds.
        self.failing: BaseException | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        # A lease call given up on that has not returned yet.
        self._stuck: threading.Thread | None = None

    # ---------------------------------------------------------------- storage
    def _bounded(self, call: Callable[[], Any]) -> Any:
        """`call()`'s result, or TimeoutError after io_timeout_s. The call may still finish later, in
        a daemon thread that neither holds the lock nor keeps the process from exiting; while it has
        not, later calls fail at once (on a hung mount, one stuck thread, not one per renewal)."""
        if self._stuck is not None and self._stuck.is_alive():
            raise TimeoutError(f"an earlier call on {self.url} has not returned")
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["value"] = call()
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                outcome["error"] = err

        worker = threading.Thread(target=run, name="lease-io", daemon=True)
        worker.start()
        worker.join(self.io_timeout_s)
        if worker.is_alive():
            self._stuck = worker
            raise TimeoutError(f"no answer within {self.io_timeout_s:g}s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def read(self) -> Holder | None:
        """The recorded holder; None when there is none, or the file is not a lease record (no run
        can be named as holding it, so it is taken, with a warning)."""
        try:
            return self._bounded(lambda: read_holder(self.url, self.storage_cfg))
        except ValueError as err:
            log.warning("%s is not a lease record (%s); taking it over", self.url, err)
            return None

    def _write(self, holder: Holder) -> None:
        data = holder.to_json()
        self._bounded(lambda: storage.write_bytes_atomic(self.url, data, self.storage_cfg))

    def _unusable(self, doing: str, err: BaseException) -> UsageError:
        what = ("check that the storage answers" if storage.is_unavailable(err)
                else f"check that {self.dir_url} is reachable and writable, with space free, and that {self.url} "
                     f"is a file or absent")
        return UsageError(f"checkpoint.dir: cannot {doing} its lease {self.url} ({err}); {what}")

    # ---------------------------------------------------------------- taking it
    def acquire(self, stop: threading.Event) -> bool:
        """Take the lease: True once held, False when `stop` was set while waiting for another
        machine's holder to lapse. LeaseHeld (one line) when another live run holds it; UsageError
        (one line) when the lease cannot be read or written."""
        watched: tuple[Holder, float] | None = None  # another machine's holder, and since when
        poll_s = max(0.25, self.term_s / 8)
        first_error: float | None = None
        while True:
            doing = "read"
            try:
                holder = self.read()
                state = "free" if holder is None else standing(holder, self.me)
                if state == "unknown" and watched is not None and watched[0].run == holder.run \
                        and holder.renewals == watched[0].renewals and self.clock() - watched[1] >= self.term_s:
                    log.warning("%s's lease on %s went unrenewed for checkpoint.lease_s=%gs; taking it over",
                                holder.describe(), self.url, self.term_s)
                    state = "free"
                if state in ("free", "ours"):
                    self.displaced = holder if state == "free" else self.displaced
                    doing = "write"
                    self._write(self.me)
                    taken = self.read()
                    if taken is not None and taken.run != self.me.run:
                        if taken.released:  # the displaced run's release landed over this run's write
                            continue
                        raise self._held(taken, "it took the lease while this run took it")
                    break
            except storage.TRANSIENT_ERRORS as err:
                # A run that others cannot see would let the next one take the folder beside it: one
                # that cannot write its lease does not start. A store that does not answer is tried
                # again for a while; a folder or a FIFO named lease.json, a full disk, no permission
                # are refused at once.
                first_error = self.clock() if first_error is None else first_error
                if not storage.is_unavailable(err) or self.clock() - first_error >= 4 * self.term_s:
                    raise self._unusable(doing, err) from None
                log.warning("reaching the lease %s failed (%s); trying again", self.url, err)
                if stop.wait(poll_s):
                    return False
                continue
            first_error = None
            if state == "live":
                raise self._held(holder, "a live process of this machine")
            if watched is None or watched[0].run != holder.run:
                if watched is not None:
                    raise self._held(holder, "it took the lease while this run waited")
                watched = (holder, self.clock())
                log.warning("checkpoint.dir %s is leased by %s; waiting up to checkpoint.lease_s=%gs for it "
                            "to be renewed (a live run: this one stops) or to lapse (taken over)",
                            self.url, holder.describe(), self.term_s)
            elif holder.renewals != watched[0].renewals:
                raise self._held(holder, "renewed while this run waited, so it is live")
            if stop.wait(poll_s):
                return False
        self.renewed_at = self.confirmed_at = self.clock()
        self._thread = threading.Thread(target=self._renew_until_done, name="lease-renewal", daemon=True)
        self._thread.start()
        return True

    def _held(self, holder: Holder, how: str) -> LeaseHeld:
        return LeaseHeld(f"checkpoint.dir: {self.dir_url} is in use by another run, {holder.describe()} ({how}); "
                         f"stop that run (if it hangs, kill it, or remove {self.url} once it is surely gone), or "
                         f"give this one another checkpoint.dir")

    # ---------------------------------------------------------------- holding it
    def _renew_until_done(self) -> None:
        while not self._done.wait(self.term_s / 4):
            try:
                self.renew()
            except Exception as err:  # noqa: BLE001 - the thread must outlive what nothing foresaw
                log.exception("renewing the lease on %s raised", self.url)
                self.failing = err

    def renew(self) -> None:
        """One renewal: read the lease, and write it with one more renewal if it is still ours."""
        with self._lock:
            self._renew()

    def _renew(self) -> None:
        if self.lost_to is not None or self._done.is_set():
            return
        try:
            holder = self.read()
        except storage.TRANSIENT_ERRORS as err:
            self._failed(err)
            return
        if holder is not None and holder.run == self.me.run:
            self.confirmed_at = self.clock()
        elif holder is not None and not late_release(holder, self.displaced.run if self.displaced else None):
            self.lost_to = holder
            log.error("%s took over the lease on %s from this run", holder.describe(), self.url)
            return
        try:
            self.me = dataclasses.replace(self.me, renewals=self.me.renewals + 1)
            self._write(self.me)
        except storage.TRANSIENT_ERRORS as err:
            self._failed(err)
            return
        if self.failing is not None:
            log.info("the lease on %s is renewed again", self.url)
        self.failing = None
        self.renewed_at = self.clock()

    def _failed(self, err: BaseException) -> None:
        if self.failing is None:
            log.warning("renewing the lease on %s failed (%s)%s", self.url, err,
                        "; no checkpoint is saved until a renewal succeeds" if storage.is_unavailable(err) else "")
        self.failing = err

    def check(self, last_step: int) -> bool:
        """Before writing into the folder, a renewal, then: True while a read found the lease this
        run's under half a term ago and, if the store has stopped answering the renewals' writes,
        the last renewal is under half a term old too (another run could take the lease half a term
        later); False otherwise (the write should wait); LeaseLost (one line) once another run holds
        it. A renewal's write that failed otherwise (a full disk, which the save's retention may
        mend) does not hold a save back."""
        with self._lock:
            self._renew()
        self.raise_if_lost(last_step)
        now = self.clock()
        unreachable = self.failing is not None and storage.is_unavailable(self.failing)
        half = self.term_s / 2
        return now - self.confirmed_at < half and (not unreachable or now - self.renewed_at < half)

    def raise_if_lost(self, last_step: int) -> None:
        """LeaseLost (one line) once a renewal found another run holding the lease."""
        if self.lost_to is not None:
            raise LeaseLost(f"checkpoint.dir: {self.lost_to.describe()} took {self.dir_url} over "
                            f"while this run's lease went unrenewed (storage out of reach, or this process stalled, "
                            f"for checkpoint.lease_s={self.term_s:g}s); this run stops without saving so as not to "
                            f"overwrite that run's checkpoints; the last checkpoint it saved is step {last_step}")

    def release(self) -> None:
        """Stop renewing and, if the lease is still this run's, record it as given up."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=self.term_s)
        with self._lock:
            if self._thread is None or self.lost_to is not None:
                return
            try:
                holder = self.read()
                if holder is not None and holder.run == self.me.run:
                    self._write(dataclasses.replace(self.me, released=True))
            except Exception as err:  # noqa: BLE001 - the run is ending; a next run waits at worst
                log.warning("could not give up the lease on %s (%s); a next run on another machine waits up to "
                            "checkpoint.lease_s=%gs for it", self.url, err, self.term_s)


def late_release(holder: Holder, displaced: str | None) -> bool:
    """Whether `holder` is the release of `displaced`, the run this one took the folder from,
    landed late over this run's record (which the next renewal writes again): no takeover. Any other
    run's release is a run that took the folder over from this one and has since ended."""
    return holder.released and displaced is not None and holder.run == displaced


def confirm_holder(dir_url: str, run: str, storage_cfg: StorageConfig,
                   outcome: str = "this run's checkpoint is not made the latest there",
                   displaced: str | None = None) -> None:
    """For the writer of a checkpoint (rank 0), before it moves latest.json and before it prunes:
    LeaseLost when another run's lease is in the folder, so that a save that outlasted this run's
    lease (a long upload, a stalled driver) does not move the other run's latest.json or delete
    its steps. A folder without a lease (none taken, or removed by hand) is no other run's, nor is
    one whose record is the `late_release` of `displaced`, the run this one took the folder from."""
    try:
        holder = read_holder(storage.join_url(dir_url, LEASE_FILE), storage_cfg)
    except ValueError:  # no lease record: no run can be named as holding the folder
        holder = None
    if holder is not None and holder.run != run and not late_release(holder, displaced):
        raise LeaseLost(f"checkpoint.dir: {holder.describe()} holds {dir_url} now; {outcome}")


__all__ = ["Lease", "LeaseHeld", "LeaseLost", "Holder", "standing", "this_process", "confirm_holder", "LEASE_FILE"]
