"""Errors of the storage layer: the run directory and the machine it lives on."""

from __future__ import annotations

from gi_core.errors import GIError


class StorageError(GIError):
    """A run directory is unreadable, inconsistent or not writable; the message names the file."""


class EnvironmentProblem(GIError):
    """The machine, not the input, is at fault (read-only or full disk, a run directory another
    driver holds); the message names the path and what to do. `gi-eval` exits 3."""
