"""Real tmpfs mounts for tests of read-only and full file systems, by the mount(2) and umount2(2)
system calls (what mount(8) does), so that a unit test starts no process (decision 223).
Root only, as in CI; callers skip without it."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

_MS_RDONLY, _MS_REMOUNT, _MNT_DETACH = 1, 32, 2
_LIBC = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str, path: Path) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what} {path}: {os.strerror(errno)}")


def mount_tmpfs(path: Path, size: str) -> None:
    """`mount -t tmpfs -o size=SIZE tmpfs PATH`."""
    _check(_LIBC.mount(b"tmpfs", str(path).encode(), b"tmpfs", 0, f"size={size}".encode()),
           "mount tmpfs on", path)


def remount_read_only(path: Path) -> None:
    """`mount -o remount,ro PATH`."""
    _check(_LIBC.mount(None, str(path).encode(), None, _MS_REMOUNT | _MS_RDONLY, None),
           "remount read-only", path)


def unmount(path: Path) -> None:
    """`umount -l PATH` (errors ignored, as with check=False)."""
    _LIBC.umount2(str(path).encode(), _MNT_DETACH)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A fresh tmpfs of `size` at `path` (created), unmounted on exit."""
    path.mkdir(parents=True, exist_ok=True)
    mount_tmpfs(path, size)
    try:
        if read_only:
            remount_read_only(path)
        yield path
    finally:
        unmount(path)
