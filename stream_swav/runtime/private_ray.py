"""A private local Ray leaves nothing behind when its driver dies.

Ray's GCS server and raylet end with the driver that started them, but the raylet's agents
(DashboardAgent, RuntimeEnvAgent) outlive a driver killed with SIGKILL and pile up with every
crash. So after starting a private Ray the driver records the processes it now has under it (PID
and start time: a PID the kernel reuses later is never taken for one of them) in a file named after
itself, removes the file when it shuts Ray down, and every later private start reaps the files of
drivers that are gone. Linux only (it reads /proc); elsewhere nothing is recorded or reaped.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from pathlib import Path

log = logging.getLogger("stream_swav.cluster")

PROC = Path("/proc")


def records_dir() -> Path:
    # One folder per user: another user's processes are not ours to reap, nor their folder ours to write.
    return Path(tempfile.gettempdir()) / f"stream-swav-private-ray-{os.getuid()}"


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the third (the state) on, None if the process is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    return stat.rpartition(")")[2].split()


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def alive(pid: int, ticks: int) -> bool:
    """Whether the process started at `ticks` still runs: a PID reused since is another process, and
    a zombie (exited, not yet reaped by its parent) runs no more."""
    fields = _stat_fields(pid)
    return fields is not None and int(fields[19]) == ticks and fields[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(parents.get(child, []))
    return found


def record() -> Path | None:
    """Record this driver and the processes under it (call right after starting a private Ray)."""
    if not PROC.is_dir():
        return None
    me = os.getpid()
    processes = [(pid, ticks) for pid in descendants(me) if (ticks := start_ticks(pid)) is not None]
    path = records_dir() / f"{me}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"driver": [me, start_ticks(me)], "processes": processes}))
        os.replace(tmp, path)
    except OSError as error:  # a run is never refused for want of this record
        log.warning("could not record the private Ray's processes in %s (%s); a crash may leave some behind",
                    path.parent, error)
        return None
    return path


def forget() -> None:
    """This driver shut its Ray down itself: nothing of it is left to reap."""
    (records_dir() / f"{os.getpid()}.json").unlink(missing_ok=True)


def reap() -> int:
    """SIGKILL what is left of the private Rays of drivers that died; returns how many processes."""
    folder = records_dir()
    if not PROC.is_dir() or not folder.is_dir():
        return 0
    killed = 0
    for path in folder.glob("*.json"):
        try:
            data = json.loads(path.read_text())
            (driver, driver_ticks), processes = data["driver"], data["processes"]
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # a record cut short by the crash it was written for
            continue
        if alive(driver, driver_ticks):
            continue  # another run, still going
        for pid, ticks in processes:
            if alive(pid, ticks):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except OSError:
                    pass  # gone meanwhile, or not ours to kill
        path.unlink(missing_ok=True)
    if killed:
        log.warning("stopped %d process(es) left behind by the private Ray of a driver that died", killed)
    return killed


__all__ = ["record", "forget", "reap", "records_dir", "descendants", "start_ticks", "alive"]
