"""Which cells of a chunk form a group, and how many fit in memory (issue 12).

A group's cells run one after another in one job unit (tasks.work.invert_group), never as one
batched solve: grouping must not change a result (issue 20, docs/decisions/101).

Cells join one batch when they share method, resolved config, generator, image size, batch size
and victim architecture (victim seeds, data and defenses may differ: the engine takes
per-problem victim parameters, targets, masks and BN targets). A group holds as many cells as fit
a memory budget (the device's free memory, or `execution.memory_budget_gb`), capped at
`MAX_GROUP`. Cells with a checkpoint resume alone, from their own state.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from tasks.cells import InversionCell, canonical_json

T = TypeVar("T")
MAX_GROUP = 64
# Bytes per float32 element, and the activation memory of one image's forward + double backward
# through a small victim in units of its input size: fitted to docs/results/performance.md
# ("peak memory per group size": 16 -> 64 convnet-32 cells added ~630 MiB, ~13 MiB per cell at
# R = 4, which this factor reproduces; the process baseline is not part of a group's budget).
FLOAT = 4
ACTIVATION_FACTOR = 192
CPU_BUDGET_FRACTION = 0.25  # of physical memory: several jobs may share a node
GPU_BUDGET_FRACTION = 0.8  # of the free memory of the job's GPU


@dataclass(frozen=True)
class GroupBudget:
    bytes: int
    max_cells: int = MAX_GROUP


def cell_bytes(*, params: int, image_numel: int, batch: int, restarts: int, copies: int) -> int:
    """Rough peak memory of one cell inside a batch. Per restart row: the victim's gradient
    graph (∇θ with create_graph keeps ~3 parameter-sized tensors), activations of the forward
    and double backward (ACTIVATION_FACTOR × images), and the optimised variables with their
    gradient and two Adam moments (4 × (pixels or latents + per-image generator copies))."""
    variables = batch * (image_numel + copies)
    per_row = 3 * params + ACTIVATION_FACTOR * batch * image_numel + 4 * variables
    return FLOAT * restarts * per_row


def group_cells(items: Sequence[T], *, per_cell_bytes: int, budget: GroupBudget) -> list[list[T]]:
    """Consecutive groups of at most budget.bytes // per_cell_bytes items (>= 1: a cell larger
    than the budget still runs, alone) and at most budget.max_cells."""
    size = max(1, min(budget.max_cells, budget.bytes // max(1, per_cell_bytes)))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def device_budget(device: torch.device, memory_budget_gb: float | None) -> GroupBudget:
    """The spec's budget if set, else a fraction of the device's free (GPU) or total (CPU)
    memory."""
    if memory_budget_gb is not None:
        return GroupBudget(int(memory_budget_gb * 2**30))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return GroupBudget(int(free * GPU_BUDGET_FRACTION))
    return GroupBudget(int(_physical_memory() * CPU_BUDGET_FRACTION))


def _physical_memory() -> int:
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def batch_key(cell: InversionCell) -> str:
    """Cells with equal keys can be solved in one batch."""
    g = cell.gradient
    victim = g.victim.model_dump(mode="json")
    victim.pop("seed", None)  # per-problem victim parameters are supported
    return canonical_json(
        {
            "method": cell.method,
            "config": dataclasses.asdict(cell.config),
            "generator": cell.generator.model_dump(mode="json") if cell.generator else None,
            "image_size": g.image_size,
            "batch_size": len(g.indices),
            "dataset": g.dataset,
            "victim": json.dumps(victim, sort_keys=True),
        }
    )


def group_by_key(cells: Sequence[InversionCell]) -> list[list[InversionCell]]:
    """Cells partitioned by batch_key, in first-seen order (the chunk's order is kept within)."""
    groups: dict[str, list[InversionCell]] = {}
    for cell in cells:
        groups.setdefault(batch_key(cell), []).append(cell)
    return list(groups.values())
