"""Errors of the job layer: what happens to cells once they are submitted."""

from __future__ import annotations

from gi_core.errors import GIError


class ExecutionError(GIError):
    """A job failed or cells are missing after their jobs finished (a retry may fix it)."""


class RunCancelled(GIError):
    """`gi-eval cancel` stopped the run's jobs: nothing is retried; rerunning resumes."""


class DegenerateInputError(GIError):
    """An input that could only give a meaningless number (a zero or non-finite client
    gradient, ...): its cell fails with this reason instead of committing a result."""
