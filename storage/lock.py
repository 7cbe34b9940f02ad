"""One driver per run directory: <run>/driver.lock, held by the `gi-eval run` driving it.

The lock is an exclusive `flock` on the file, which the kernel releases when the holder dies, so
a killed driver never blocks the next one. The file also names its holder (host, pid, process
start time, since when); a driver that exits cleanly empties it. Finding the flock free but the
file still naming a holder therefore means the previous driver was killed: that stale lock is
reported and taken over.

Where the filesystem has no working flock (some NFS/Lustre mounts return ENOLCK/EOPNOTSUPP;
docs/slurm.md), the holder record alone decides: a holder on this host counts only while its
very process (pid and start time) is alive; a holder on another host counts until it clears
the file (check that it is gone, then delete driver.lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from storage.errors import EnvironmentProblem

LOCK_FILE = "driver.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


class RunLocked(EnvironmentProblem):
    """Another live driver holds the run directory."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    process: str | None  # process_identity(pid) when it took the lock
    since: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.since}"

    def alive_here(self) -> bool:
        return self.host == socket.gethostname() and process_identity(self.pid) == self.process


def process_identity(pid: int) -> str | None:
    """"<host>/<boot id>/<start ticks>" of a live, non-zombie process on this host; else None.

    A pid alone is reused once pids wrap; with its start time (field 22 of /proc/<pid>/stat)
    and the boot id it names one process for good."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":  # ended, not yet reaped
        return None
    return f"{socket.gethostname()}/{boot}/{fields[19]}"


@contextlib.contextmanager
def driver_lock(
    root: Path,
    *,
    wait: bool,
    poll_s: float = 1.0,
    on_wait: Callable[[Holder | None], None] | None = None,
) -> Iterator[Holder | None]:
    """Hold <root>/driver.lock; yields the stale holder it replaced (None if none).

    Raises RunLocked when another live driver holds it and `wait` is False; with `wait`, polls
    until it is free (calling `on_wait` once with the holder)."""
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        flock = _acquire(fd, path, wait=wait, poll_s=poll_s, on_wait=on_wait)
        stale = read_holder(path)
        _write_holder(fd)
        try:
            yield stale
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder: only a killed driver does
            if flock:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(
    fd: int,
    path: Path,
    *,
    wait: bool,
    poll_s: float,
    on_wait: Callable[[Holder | None], None] | None,
) -> bool:
    """Take the lock; True if it is a real flock, False on filesystems without flock."""
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = read_holder(path)
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            holder = read_holder(path)
            if holder is None or (holder.host == socket.gethostname() and not holder.alive_here()):
                return False
        if not wait:
            who = holder.describe() if holder else "another process"
            raise RunLocked(
                f"{path.parent} is being driven by another `gi-eval run` ({who}); wait for it "
                "to finish, pass --wait to queue behind it, or stop it (`gi-eval cancel` stops "
                "its jobs too)"
            )
        if not told and on_wait is not None:
            on_wait(holder)
            told = True
        time.sleep(poll_s)


def read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    # A damaged file (garbage, wrong-shaped JSON) names no holder; the next driver rewrites it.
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
        return None
    process = data.get("process")
    return Holder(str(data.get("host")), data["pid"], process if isinstance(process, str) else None,
                  str(data.get("since")))


def _write_holder(fd: int) -> None:
    pid = os.getpid()
    record = {
        "host": socket.gethostname(),
        "pid": pid,
        "process": process_identity(pid),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing), waiting for it. On filesystems
    without flock it proceeds unlocked: the callers publish atomically, so two holders at once
    cost work twice, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
