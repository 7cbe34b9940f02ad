"""Atomic publication of files: write under a hidden temp name, fsync, rename into place.

Every object in a run directory is published this way, so a reader (or a resume scan) sees
either nothing or the complete object, never a torn one. Temp names start with "." (pyarrow,
pandas and zarr listings skip dot-files), never end in ".parquet" (duckdb globs skip them), and
carry pid + uuid so concurrent writers of the same object never share a temp file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from storage.errors import EnvironmentProblem

TEMP_MARK = ".tmp-"
# OSErrors that are the machine's fault, not a bug: reported with the path and what to do.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "the disk is full; free space or choose another run directory",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose another run directory",
    errno.EROFS: "the filesystem is read-only; choose a writable run directory",
    errno.EACCES: "permission denied; fix the permissions or choose another run directory",
    errno.EPERM: "permission denied; fix the permissions or choose another run directory",
}


def temp_path(final: Path) -> Path:
    """A unique sibling of `final` (same directory, so the rename stays on one filesystem)."""
    return final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def fsync_file(path: Path) -> None:
    # Without fsync a node crash after the rename can leave a renamed-but-empty file.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def publishing(final: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success fsync it and os.replace it onto `final`.

    os.replace is atomic on POSIX: an existing `final` is swapped out whole, and readers that
    already opened the old file keep reading the old inode. On error the temp file is removed.
    """
    tmp = temp_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
    except OSError as e:
        problem = environment_problem(e, final)
        if problem is None:
            raise
        raise problem from e
    finally:
        with contextlib.suppress(OSError):  # a read-only directory cannot hold a temp file
            tmp.unlink(missing_ok=True)


def environment_problem(error: OSError, path: Path) -> EnvironmentProblem | None:
    """`error` as an EnvironmentProblem naming `path` (a full disk's OSError names no file),
    or None when it is not an environment errno (then it is a bug and propagates as is)."""
    code = error.errno
    if code is None and "No space left on device" in str(error):  # pyarrow sets no errno
        code = errno.ENOSPC
    advice = _ENVIRONMENT_ERRNOS.get(code or 0)
    if advice is None:
        return None
    reason = error.strerror or os.strerror(code or 0)
    return EnvironmentProblem(f"cannot write {path}: {reason}; {advice}")


def write_bytes_atomic(final: Path, data: bytes) -> None:
    with publishing(final) as tmp:
        tmp.write_bytes(data)


def sweep_temp_files(directory: Path, *, older_than_s: float = 3600.0) -> int:
    """Remove temp files left under `directory` by crashed writers; returns how many.

    Only files older than `older_than_s` go, so a writer that is still running keeps its file.
    """
    cutoff = time.time() - older_than_s
    removed = 0
    for dirpath, _, names in os.walk(directory):
        for name in names:
            path = Path(dirpath, name)
            if is_temp_name(name) and _mtime(path) < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # removed concurrently: treat as fresh so it is left alone
        return float("inf")
