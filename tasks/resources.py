"""Resources per array kind and per method (issue 18; docs/slurm.md, "Resources per array").

`execution.slurm` is the default of every job array; `execution.slurm.gradients`, `.giml`,
`.driver` and `.methods[<label or method>]` override single fields of it. Memory that nobody
set is sized by the caller's memory model (pipelines.memory.sized_mem_gb) of the array's
largest cell.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tasks.cells import InversionCell
from tasks.executors import ExecutorConfig
from tasks.spec import GridSpec, SlurmResources, SlurmSpec

ArrayKind = Literal["gradients", "giml"]

# Gradient generation is one forward/backward pass per cell: seconds. A short time limit lets
# the backfill scheduler start it in gaps long GPU jobs cannot use.
GRADIENT_TIMEOUT_MIN = 30
GRADIENT_MEM_GB = 4.0
# The driver only plans, submits and polls (squeue every few seconds): one CPU, no GPU; no
# time limit of its own (the partition's), as it lives as long as the grid.
DRIVER = SlurmResources(mem_gb=2, cpus_per_task=1, gpus_per_task=0)
# Sized memory: the estimate x 1.5 (allocator fragmentation, the model's roughness) + 1 GiB
# (Python, torch and data loading), never below 2 GiB.
MEM_HEADROOM, MEM_BASE_GB, MEM_MIN_GB = 1.5, 1.0, 2.0


def kind_resources(slurm: SlurmSpec, kind: ArrayKind) -> SlurmResources:
    """The overrides of one array kind, with the project's defaults for fields left unset."""
    own = getattr(slurm, kind)
    if kind == "gradients":
        base = SlurmResources(
            timeout_min=min(slurm.timeout_min, GRADIENT_TIMEOUT_MIN),
            mem_gb=None if "mem_gb" in slurm.model_fields_set else GRADIENT_MEM_GB,
        )
    else:
        base = SlurmResources()
    return merge(base, own)


def driver_resources(slurm: SlurmSpec) -> SlurmResources:
    """The detached driver's job: DRIVER, then execution.slurm's partition and qos, then
    execution.slurm.driver."""
    return merge(merge(DRIVER, SlurmResources(partition=slurm.partition, qos=slurm.qos)),
                 slurm.driver)


def method_resources(slurm: SlurmSpec, cell: InversionCell) -> tuple[str, SlurmResources]:
    """(override key or "default", overrides) of an inversion cell: its entry's label wins
    over its method name."""
    for key in (cell.variant, cell.method):
        if key in slurm.methods:
            return key, slurm.methods[key]
    return "default", SlurmResources()


def merge(base: SlurmResources, over: SlurmResources) -> SlurmResources:
    """`over`'s set fields on top of `base`."""
    return base.model_copy(update=over.model_dump(exclude_none=True))


def apply(
    base: ExecutorConfig, slurm: SlurmSpec, over: SlurmResources, *, sized_gb: float | None
) -> ExecutorConfig:
    """`base` (the spec-wide config) with `over` applied; memory nobody set is `sized_gb`."""
    update: dict[str, Any] = over.model_dump(exclude_none=True, exclude={"mem_gb"})
    if over.mem_gb is not None:
        update["mem_gb"] = over.mem_gb
    elif "mem_gb" not in slurm.model_fields_set and sized_gb is not None:
        update["mem_gb"] = sized_gb
    if update.get("gpus_per_task") == 0:
        update["gpus_per_task"] = None  # ExecutorConfig: None = no GPU option at all
    return base.model_copy(update=update)


@dataclass(frozen=True)
class ArrayGroup:
    """Inversion cells that share one resource request, hence one run of job arrays."""

    key: str  # "default" or the execution.slurm.methods key
    config: ExecutorConfig
    cells: tuple[InversionCell, ...]

    @property
    def tag(self) -> str:
        """The key as it may appear in a job name and a file name ("gi-z/w" -> "gi-z-w")."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.key).strip("-") or "method"


def inversion_groups(
    spec: GridSpec,
    base: ExecutorConfig,
    cells: Sequence[InversionCell],
    *,
    size: Callable[[Sequence[InversionCell]], float | None],
) -> list[ArrayGroup]:
    """Group cells by resolved resources, in a stable order (default first, then keys).
    `size` gives a group's memory from its cells (pipelines.memory.sized_mem_gb: the memory
    model lives with the planner, above this layer)."""
    slurm = spec.execution.slurm
    by_key: dict[str, list[InversionCell]] = {}
    overrides: dict[str, SlurmResources] = {}
    for cell in cells:
        key, over = method_resources(slurm, cell)
        by_key.setdefault(key, []).append(cell)
        overrides[key] = over
    sizing = base.kind == "slurm" and "mem_gb" not in slurm.model_fields_set
    groups = [
        ArrayGroup(
            key,
            apply(base, slurm, overrides[key], sized_gb=size(group) if sizing else None),
            tuple(group),
        )
        for key, group in by_key.items()
    ]
    return sorted(groups, key=lambda g: (g.key != "default", g.key))


def kind_config(spec: Any, base: ExecutorConfig, kind: ArrayKind) -> ExecutorConfig:
    """The executor config of the gradient, GIML or driver jobs (`spec`: any spec with an
    `execution` section: a grid, GIML or pretraining spec)."""
    slurm = spec.execution.slurm
    return apply(base, slurm, kind_resources(slurm, kind), sized_gb=None)
