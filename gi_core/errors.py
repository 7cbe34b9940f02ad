"""The project's small exception hierarchy (shared by every layer; gi_core is the root)."""


class GIError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(GIError, ValueError):
    """A spec, method config or argument is invalid; the message names the field."""


class WeightsMissingError(GIError):
    """Pretrained weights are not installed; the message names the package to install."""


class StorageError(GIError):
    """A run directory is unreadable, inconsistent or not writable."""


class ExecutionError(GIError):
    """A job failed or cells are missing after their jobs finished (a retry may fix it)."""


class EnvironmentProblem(GIError):
    """The machine, not the input, is at fault (read-only or full disk, a run directory another
    driver holds); the message names the path and what to do. `gi-eval` exits 3."""


class RunCancelled(GIError):
    """`gi-eval cancel` stopped the run's jobs: nothing is retried; rerunning resumes."""


class DegenerateInputError(GIError):
    """An input that could only give a meaningless number (a zero or non-finite client
    gradient, ...): its cell fails with this reason instead of committing a result."""
