"""What a grid will cost, without running attacks (issue 12).

Seconds per iteration of each cell come from, in order of preference:
1. the run's own committed cells (wall seconds / iterations per method): *measured (this run)*;
2. `--calibrate`: a one-element job on the target executor timing each method: *calibrated*;
2b. a price learned from an earlier run's cells of exactly this kind on this device and thread
   count (pipelines.learned_costs, the user-level learned-cost file): *learned from RUN*;
3. the committed table `docs/results/performance.json` (written by benchmarks/performance.py):
   the row of the same method family, victim, image size and device, scaled linearly in
   B × R, and by the images of a FedAvg client's local steps (`tasks.pricing.local_work`):
   *measured (table)*;
4. the nearest row of the same family and device scaled by the victim's forward FLOPs per image
   and by B × R: *scaled by FLOPs*.
Closed-form cells (R-GAP, no iterations) are counted, not priced.
Per-iteration cost is dominated by the victim's forward + double backward for every restart and
image, which is why FLOPs × B × R is the scaling variable. Gradient cells cost ~1 iteration each
and are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.learned_costs import LearnedPrices
from pipelines.planner import resolve_executor
from tasks.cells import InversionCell
from tasks.pricing import (  # noqa: F401  (re-exported: the cost model's public names)
    PIXEL_METHODS,
    TABLE,
    CellCost,
    cell_cost,
    family_of,
    forward_gflop,
    iterations,
    load_table,
)
from tasks.spec import GridSpec


@dataclass(frozen=True)
class Estimate:
    device: str  # cpu | cuda: where the cells will run
    seconds: float  # device-seconds of attack time over all cells
    wall_seconds: float  # at the spec's parallelism
    parallel: int
    cores_per_job: int
    sources: dict[str, str] = field(default_factory=dict)  # method -> source
    unknown: int = 0  # cells without any number (no table row for their device)
    cell_seconds: dict[str, float] = field(default_factory=dict)  # cell id -> attack seconds
    closed_form: dict[str, int] = field(default_factory=dict)  # method -> cells not priced

    def lines(self) -> list[str]:
        if self.seconds <= 0 and self.unknown:
            return [
                f"estimate: n/a on {self.device} ({self.unknown} cells: no {self.device} "
                "measurement in docs/results/performance.json; pass --calibrate)"
            ]
        hours = self.seconds / 3600
        usage = (
            f"{hours:.2f} GPU-hours"
            if self.device == "cuda"
            else f"{hours * self.cores_per_job:.2f} CPU core-hours"
        )
        out = [
            f"estimate ({self.device}): {usage}; wall time ~{duration(self.wall_seconds)} at "
            f"{self.parallel} parallel job(s)",
            "  seconds/iteration: "
            + "; ".join(f"{m}: {s}" for m, s in sorted(self.sources.items())),
        ]
        if self.unknown:
            out.append(f"  {self.unknown} cells have no number (not in the total)")
        for method, n in sorted(self.closed_form.items()):
            out.append(
                f"  {n} {method} cells are closed form (no iterations): not priced, not in the "
                "total; a run's report shows their measured seconds"
            )
        return out


def target_device(spec: GridSpec, executor: str | None) -> str:
    """cuda when the cells will get a GPU: Slurm with gpus_per_task > 0, else this machine's."""
    kind = resolve_executor(spec, executor)
    if kind == "slurm":
        return "cuda" if spec.execution.slurm.gpus_per_task > 0 else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def parallelism(spec: GridSpec, executor: str | None) -> tuple[int, int]:
    """(jobs running at once, cores per job) for the target executor."""
    kind = resolve_executor(spec, executor)
    if kind == "slurm":
        return spec.execution.slurm.array_parallelism, spec.execution.slurm.cpus_per_task
    if kind == "inline":
        return 1, max(1, torch.get_num_threads())
    cores = max(1, (_cpu_count() or 1) // spec.execution.max_parallel)
    return spec.execution.max_parallel, cores


def _cpu_count() -> int | None:
    import os

    return os.cpu_count()


def estimate(
    spec: GridSpec,
    cells: Sequence[InversionCell],
    *,
    executor: str | None = None,
    run_timings: Mapping[str, float] | None = None,
    calibrated: Mapping[str, float] | None = None,
    table: Sequence[Mapping[str, Any]] | None = None,
    learned: LearnedPrices | None = None,
) -> Estimate:
    """Attack seconds of `cells` on the target device and the wall time at its parallelism;
    `learned`: prices measured by earlier runs, preferred over the table where one matches."""
    device = target_device(spec, executor)
    rows = load_table() if table is None else table
    parallel, cores = parallelism(spec, executor)
    total, unknown = 0.0, 0
    sources: dict[str, str] = {}
    per_cell: dict[str, float] = {}

    def learned_price(cell: Any) -> CellCost | None:
        return learned.price(cell, device=device, threads=cores) if learned else None

    closed_form: dict[str, int] = {}
    for cell in cells:
        if iterations(cell.config) == 0:  # R-GAP: one closed-form solve per layer
            closed_form[cell.method] = closed_form.get(cell.method, 0) + 1
            continue
        cost = cell_cost(
            cell,
            device=device,
            table=rows,
            run=run_timings or {},
            calibrated=calibrated or {},
            learned=learned_price,
        )
        sources.setdefault(cell.method, _label(cost))
        if cost.source == "none":
            unknown += 1
            continue
        per_cell[cell.id] = cost.seconds_per_iteration * iterations(cell.config)
        total += per_cell[cell.id]
    wall = total / max(1, min(parallel, max(1, len(cells))))
    return Estimate(device, total, wall, parallel, cores, sources, unknown, per_cell, closed_form)


def _label(cost: CellCost) -> str:
    if cost.source == "none":
        return "none"
    return f"{cost.seconds_per_iteration * 1000:.1f} ms ({cost.source})"


def duration(seconds: float) -> str:
    """Seconds as '45 s', '12.5 min' or '3.2 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
