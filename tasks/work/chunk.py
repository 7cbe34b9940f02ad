"""One job-array element: its cells as units (one cell, or a group of one batch key), run
in sequence; a failing cell is recorded and the rest still run.
"""

from __future__ import annotations

import logging
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from gi_core.attacks.batched import batchable
from storage.run import RunDir, open_run
from storage.tables import record_failure
from tasks.batching import cell_bytes, device_budget, group_by_key, group_cells
from tasks.cells import GradientCell, InversionCell
from tasks.errors import ExecutionError
from tasks.work.cache import device, generator_for, victim_for
from tasks.work.gradient import generate_gradient
from tasks.work.inversion import invert, invert_group
from tasks.work.resume import NoPreemption, Preemption

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    """One job-array element's work: cells of one kind, run in sequence."""

    run_dir: str
    kind: str  # "gradients" | "inversions"
    cells: tuple[dict[str, Any], ...]  # cell.describe() dicts: small and picklable
    keep_restarts: bool = False
    threads: int | None = None  # torch threads of the job (None: leave the process default)
    snapshots: tuple[int, ...] = ()  # iterations at which to store images (storage.snapshots)
    # Cells of one batch key run as one unit, one after another (decision 101: a batched solve
    # is not bit-identical to a cell's own); see tasks.batching and execution.batch_cells.
    batch_cells: bool = False
    memory_budget_gb: float | None = None


def run_chunk(chunk: Chunk, preemption: Preemption | None = None) -> int:
    """Run every cell of the chunk that is not committed yet; returns how many it ran."""
    run, preemption = open_run(chunk.run_dir), preemption or NoPreemption()
    if chunk.threads is not None:
        torch.set_num_threads(chunk.threads)
    ran, failed = 0, []
    for unit in _units(run, chunk):
        try:
            ran += _run_unit(run, chunk, unit, preemption)
        except Exception:  # noqa: BLE001 - re-raised below as one error naming every failed cell
            # One failing cell must not hide the others: finish the chunk, then fail it.
            log.exception("cell(s) %s failed", ", ".join(d["id"] for d in unit))
            for d in unit:
                failed.append(d["id"])
                _record_failure(run, d)
    if failed:
        raise ExecutionError(
            f"{len(failed)} cell(s) failed: {', '.join(failed)} (tracebacks in "
            "this job's log); the other cells of the chunk are committed"
        )
    return ran


def _units(run: RunDir, chunk: Chunk) -> list[list[dict[str, Any]]]:
    """The chunk's cells as units of work: one cell each, or groups of inversion cells of one
    batch key (sized under the memory budget; tasks.batching) run one after another."""
    if chunk.kind != "inversions" or not chunk.batch_cells:
        return [[d] for d in chunk.cells]
    by_id = {d["id"]: d for d in chunk.cells}
    cells = [InversionCell.from_dict(d) for d in chunk.cells]
    budget = device_budget(device(), chunk.memory_budget_gb)
    units: list[list[dict[str, Any]]] = []
    for group in group_by_key(cells):
        if not batchable(group[0].method, group[0].config):
            units.extend([[by_id[c.id]] for c in group])
            continue
        per_cell = _cell_bytes(run, group[0])
        for part in group_cells(group, per_cell_bytes=per_cell, budget=budget):
            units.append([by_id[c.id] for c in part])
    return units


def _cell_bytes(run: RunDir, cell: InversionCell) -> int:
    victim = victim_for(cell.gradient, run)
    generator = generator_for(cell)
    per_image_copies = cell.method.startswith(("gi-w", "gi-z/w"))
    copies = sum(p.numel() for p in generator.parameters()) if generator and per_image_copies else 0
    return cell_bytes(
        params=sum(p.numel() for p in victim.parameters()),
        image_numel=3 * cell.gradient.image_size**2,
        batch=len(cell.gradient.indices),
        restarts=cell.config.restarts,
        copies=copies,
    )


def _run_unit(run: RunDir, chunk: Chunk, unit: list[dict[str, Any]], preemption: Preemption) -> int:
    if len(unit) == 1:
        return _run_cell(run, chunk, unit[0], preemption)
    return invert_group(
        run,
        [InversionCell.from_dict(d) for d in unit],
        preemption=preemption,
        keep_restarts=chunk.keep_restarts,
        snapshots=chunk.snapshots,
    )


def _run_cell(run: RunDir, chunk: Chunk, d: dict[str, Any], preemption: Preemption) -> int:
    if chunk.kind == "gradients":
        return generate_gradient(run, GradientCell.from_dict(d))
    return invert(
        run,
        InversionCell.from_dict(d),
        preemption=preemption,
        keep_restarts=chunk.keep_restarts,
        snapshots=chunk.snapshots,
    )


def _record_failure(run: RunDir, d: dict[str, Any]) -> None:
    """Keep the error's last line for run.cells() (the traceback is in the job's log)."""
    error = sys.exc_info()[1]
    reason = traceback.format_exception_only(error)[-1].strip() if error else "unknown error"
    record_failure(run, d["id"], method=d.get("method", ""), reason=reason)
