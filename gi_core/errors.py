"""The root of the project's exception hierarchy and the errors gi_core itself raises.

    GIError
    ├── ConfigError (also ValueError)  gi_core.errors     a spec, config or argument is invalid
    ├── WeightsMissingError            gi_core.errors     pretrained weights are not installed
    ├── StorageError                   storage.errors     a run directory is unreadable/unwritable
    ├── EnvironmentProblem             storage.errors     disk full, read-only, run held (exit 3)
    ├── ExecutionError                 tasks.errors       jobs ended without their cells
    ├── RunCancelled                   tasks.errors       `gi-eval cancel` stopped the run
    └── DegenerateInputError           tasks.errors       an input that can only mean nothing

Each layer defines the errors it raises; pipelines.cli maps every one to an exit code.
"""


class GIError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(GIError, ValueError):
    """A spec, method config or argument is invalid; the message names the field."""


class WeightsMissingError(GIError):
    """Pretrained weights are not installed; the message names the package to install."""
