"""How a grid runs, never what it computes: the executor kind and its Slurm resources
(docs/slurm.md). No field here reaches a cell id.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from tasks.spec.base import _Model

# The executor kinds, spelled once (the spec, the CLI flag and the executor adapter read them).
ExecutorKind = Literal["inline", "local", "slurm"]


EXECUTOR_KINDS: tuple[str, ...] = get_args(ExecutorKind)


_SBATCH_WORD = r"[\s#'\"]"


def _one_word(v: str | None) -> str | None:
    # sbatch takes each as one word; a space or '#' would end up as another option.
    if v is not None and (not v or re.search(_SBATCH_WORD, v)):
        raise ValueError(f"must be one non-empty word without spaces or quotes (got {v!r})")
    return v


class SlurmResources(_Model):
    """Resources of one kind of job array (docs/slurm.md, "Resources per array"); every unset
    field falls back to `execution.slurm` (memory: to the memory model's estimate when
    `execution.slurm.mem_gb` is not set either)."""

    mem_gb: float | None = Field(default=None, gt=0)
    timeout_min: int | None = Field(default=None, ge=1)
    gpus_per_task: int | None = Field(default=None, ge=0)
    gpu_type: str | None = None  # e.g. "a100": rendered as --gpus-per-task=a100:N
    cpus_per_task: int | None = Field(default=None, ge=1)
    partition: str | None = None
    qos: str | None = None

    @field_validator("gpu_type", "partition", "qos")
    @classmethod
    def _one_sbatch_word(cls, v: str | None) -> str | None:
        return _one_word(v)


class SlurmSpec(_Model):
    partition: str | None = None
    gpus_per_task: int = Field(default=1, ge=0)
    cpus_per_task: int = Field(default=4, ge=1)
    mem_gb: float = Field(default=16, gt=0)
    timeout_min: int = Field(default=60, ge=1)
    array_parallelism: int = Field(default=64, ge=1)
    account: str | None = None
    qos: str | None = None
    additional: dict[str, Any] = Field(default_factory=dict)
    # Shell lines run before each job (module load, venv activation), extra srun arguments.
    setup: tuple[str, ...] = ()
    srun_args: tuple[str, ...] = ()
    # Requeues after a time-limit hit (each resumes from its checkpoint); preemptions are free.
    max_num_timeout: int = Field(default=3, ge=0)
    signal_delay_s: int = Field(default=90, ge=10)  # USR2 this long before the time limit
    constraint: str | None = None  # node features, e.g. "a100|h100"
    gres: str | None = None  # generic resources, e.g. "gpu:a100:1"
    exclude: str | None = None  # nodes to avoid, e.g. "node[07-08],gpu3"
    gpu_type: str | None = None  # e.g. "a100": --gpus-per-task=a100:N (never with gres)
    # Overrides per kind of array: gradient generation, GIML prior training, and each method
    # entry by its `label` or method name (a label wins); see SlurmResources.
    gradients: SlurmResources = SlurmResources()
    giml: SlurmResources = SlurmResources()
    methods: dict[str, SlurmResources] = Field(default_factory=dict)
    # The detached driver (`gi-eval run --detach`): a small, long, low-priority CPU job.
    driver: SlurmResources = SlurmResources()

    @field_validator("constraint", "gres", "exclude", "gpu_type")
    @classmethod
    def _one_sbatch_word(cls, v: str | None) -> str | None:
        return _one_word(v)

    @model_validator(mode="after")
    def _one_gpu_request(self) -> SlurmSpec:
        # --gres=gpu:... and --gpus-per-task both ask for GPUs; Slurm adds them up or refuses.
        if self.gres is not None and "gpu" in self.gres and self.gpu_type is not None:
            raise ValueError("gres names GPUs and gpu_type is set too; keep one of them")
        return self

    @field_validator("gres")
    @classmethod
    def _gres_form(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[\w.-]+(:[\w.-]+)*(,[\w.-]+(:[\w.-]+)*)*", v):
            raise ValueError(f"write name[:type]:count, e.g. gpu:a100:1 (got {v!r})")
        return v


class ExecutionSpec(_Model):
    executor: ExecutorKind = "local"
    cells_per_job: int = Field(default=4, ge=1)
    max_parallel: int = Field(default=2, ge=1)
    # Prefect task timeout of one job array (submission to last commit); on timeout the array's
    # jobs are cancelled and the run fails (committed cells stay). None: wait as long as it takes.
    array_timeout_h: float | None = Field(default=None, gt=0)
    # Batched cells (issue 12): a job element solves cells of one method, config and victim
    # architecture together where the engine's measured policy says vectorising pays, in
    # groups that fit `memory_budget_gb` (None: a share of the device's memory).
    batch_cells: bool = True
    memory_budget_gb: float | None = Field(default=None, gt=0)
    slurm: SlurmSpec = SlurmSpec()  # frozen, so one shared default is safe
