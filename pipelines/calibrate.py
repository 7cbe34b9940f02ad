"""`gi-eval plan --calibrate`: seconds per iteration of each method, measured by ONE job on the
grid's target executor and partition (never on the login node), on the first cell of each
method with a few iterations per stage (in memory, nothing stored in the run).

The job writes its timings to a JSON file (Slurm accounting may be off, so the job's return
value is not relied on); the planner waits for the job, then reads the file.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from gi_core.attacks import InversionProblem, reconstruct
from gi_core.datasets import load_images
from gi_core.gradients import bn_statistics, client_gradient
from tasks.cells import InversionCell, Plan
from tasks.errors import ExecutionError
from tasks.executors import ExecutorConfig, submit_array, wait_for_jobs
from tasks.work import device, generator_for, victim_for

STEPS = 3  # timed iterations per stage, after one warm-up call


def calibrate_on_executor(
    plan: Plan, config: ExecutorConfig, *, log_dir: Path, poll_s: float = 2.0
) -> dict[str, float]:
    """Submit one calibration element to `config`'s executor and wait for its timings."""
    cells = _first_cell_per_method(plan)
    if not cells:
        return {}
    with tempfile.TemporaryDirectory(dir=log_dir if log_dir.is_dir() else None) as tmp:
        out = Path(tmp) / "calibration.json"
        job = _CalibrationJob(tuple(c.describe() for c in cells), str(out))
        handles = submit_array(job, [None], config=config, log_dir=log_dir, name="gi-calibrate")
        wait_for_jobs(handles, poll_s=poll_s)
        if not out.is_file():
            raise ExecutionError(f"calibration job wrote no timings (its log is in {log_dir})")
        timings: dict[str, float] = json.loads(out.read_text())["seconds_per_iteration"]
        return timings


@dataclasses.dataclass(frozen=True)
class _CalibrationJob:
    """Picklable job element: time each cell's method and write the timings to `out`."""

    cells: tuple[dict[str, Any], ...]
    out: str

    def __call__(self, _: Any) -> None:
        cells = [InversionCell.from_dict(d) for d in self.cells]
        timings = {c.method: time_cell(c) for c in cells}
        result = {"device": str(device()), "seconds_per_iteration": timings}
        Path(self.out).write_text(json.dumps(result))


def _first_cell_per_method(plan: Plan) -> list[InversionCell]:
    first: dict[str, InversionCell] = {}
    for cell in plan.inversion_cells:
        first.setdefault(cell.method, cell)
    return list(first.values())


def time_cell(cell: InversionCell) -> float:
    """Seconds per iteration of the cell's method on its own problem (B, R as in the cell)."""
    g = cell.gradient
    # a trained victim is timed before training: its weights do not change the time per step
    victim = victim_for(dataclasses.replace(g, victim=g.victim.model_copy(update={"train": None})))
    dev = next(victim.parameters()).device
    images, labels = load_images(g.dataset, g.indices, image_size=g.image_size)
    images, labels = images.to(dev), labels.to(dev)
    problem = InversionProblem(
        victim,
        client_gradient(victim, images, labels),
        labels,
        tuple(images.shape[1:]),  # type: ignore[arg-type]
        bn_target=bn_statistics(victim, images),
    )
    counts = [f.name for f in dataclasses.fields(cell.config) if f.name.endswith("iterations")]
    generator = generator_for(cell)

    def run(steps: int) -> float:
        config = dataclasses.replace(cell.config, **{n: steps for n in counts})  # type: ignore[arg-type]
        start = time.perf_counter()
        reconstruct(cell.method, problem, config, seed=cell.seed, generator=generator)
        return time.perf_counter() - start

    run(1)  # warm-up: first-call allocations and dispatch caches are not per-iteration cost
    return max(run(STEPS + 1) - run(1), 1e-9) / (STEPS * len(counts))
