"""In-flight attack state: <run>/checkpoints/<cell id>.pt, written atomically.

The state is gi_core's attack export (nested dicts/lists of tensors, ints, floats, strings),
saved with torch.save and loaded with weights_only=True so a checkpoint can never run code.
"""

from __future__ import annotations

import errno
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from storage.atomic import environment_problem, publishing
from storage.errors import StorageError

# torch.save reports a full disk as RuntimeError("... unexpected pos ..."), without errno: below
# this much free space after such a failure we call it what it is.
_NEARLY_FULL_BYTES = 64 * 1024 * 1024
# What torch.load raises on a truncated, overwritten or foreign file.
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError,
                IndexError, TypeError, AttributeError)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Replace the checkpoint at `path` atomically: a crash mid-save keeps the previous one."""
    with publishing(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:
            if shutil.disk_usage(path.parent).free >= _NEARLY_FULL_BYTES:
                raise
            problem = environment_problem(OSError(errno.ENOSPC, "No space left on device"), path)
            raise problem or e from e


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The saved state, on CPU; None when there is no checkpoint."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None  # deleted by the cell's commit, or quarantined, since the check above
    except _LOAD_ERRORS as e:
        # Atomic writes rule out torn files, so this is a foreign or corrupt file: say which.
        raise StorageError(f"unreadable checkpoint {path}: {e}") from e
    if not isinstance(state, dict):
        raise StorageError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot resume its cell (None: it loads, or is gone)."""
    try:
        load_checkpoint(path)
    except StorageError as e:
        return f"damaged checkpoint ({' '.join(str(e).split())[:200]}); the cell restarts"
    return None


def delete_checkpoint(path: Path) -> None:
    """Called after the cell commits; a missing checkpoint is fine (the cell never paused)."""
    path.unlink(missing_ok=True)
