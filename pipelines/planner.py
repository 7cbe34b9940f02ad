"""Planning: what a grid needs, what is done, and how the rest is shaped into job arrays."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from gi_core.errors import ConfigError
from storage.run import RunDir, create_run, open_run, replace_damaged_spec, update_spec
from tasks.cells import GradientCell, InversionCell, Plan, expand
from tasks.spec import (
    EXECUTOR_KINDS,
    ExecutorKind,
    GridSpec,
    read_spec_text,
    spec_from_yaml,
)
from tasks.work import Chunk

T = TypeVar("T")
DEFAULT_RUNS = Path("runs")
# Elements per job array = per Prefect task run; below Slurm's default MaxArraySize (1001), and the
# executor adapter splits further if a cluster's MaxArraySize is smaller.
ARRAY_ELEMENTS = 1000


@dataclass(frozen=True)
class GridStatus:
    """Where a grid stands: every count a user asks for before launching."""

    plan: Plan
    committed: frozenset[str]
    gradients_stored: frozenset[str]
    in_queue: frozenset[str]  # cells whose jobs are still queued or running (not resubmitted)

    @property
    def todo(self) -> list[InversionCell]:
        skip = self.committed | self.in_queue
        return [c for c in self.plan.inversion_cells if c.id not in skip]

    @property
    def gradients_todo(self) -> list[GradientCell]:
        needed = {c.gradient_id for c in self.todo}
        return [
            g
            for g in self.plan.gradient_cells
            if g.id in needed and g.id not in self.gradients_stored
        ]

    @property
    def done(self) -> int:
        return sum(c.id in self.committed for c in self.plan.inversion_cells)


def resolve_executor(spec: Any, flag: str | None) -> ExecutorKind:
    """The executor a command targets: the CLI's --executor over the spec's
    execution.executor. Every command resolves it here once and passes the result down
    (`spec`: any spec with an `execution` section: a grid, GIML, pretraining or multigrad spec.)"""
    if flag is None:
        return cast(ExecutorKind, spec.execution.executor)
    if flag not in EXECUTOR_KINDS:
        raise ConfigError(f"executor: unknown {flag!r}; choose one of {', '.join(EXECUTOR_KINDS)}")
    return cast(ExecutorKind, flag)


def read_spec(path: Path | str) -> tuple[GridSpec, str]:
    text = read_spec_text(path)
    return spec_from_yaml(text), text


def run_dir_for(spec: GridSpec, out: Path | str | None) -> Path:
    return Path(out) if out else DEFAULT_RUNS / spec.name


def prepare_run(spec: GridSpec, text: str, out: Path | str | None) -> RunDir:
    """Create the run directory (or reopen it: the frozen grid.yaml must describe this grid)."""
    path = run_dir_for(spec, out)
    if (path / "grid.yaml").is_file():
        replace_damaged_spec(open_run(path), text)  # a damaged frozen spec is rebuilt from this
        frozen = spec_from_yaml((path / "grid.yaml").read_text())
        if frozen.name != spec.name:
            raise ConfigError(
                f"--out: {path} holds the run of grid {frozen.name!r}, not "
                f"{spec.name!r}; choose another --out"
            )
        run = open_run(path)
        update_spec(run, text)  # an extended grid resumes: committed cells keep their ids
        return run
    return create_run(path, text)


def grid_status(spec: GridSpec, run: RunDir | None, *, queued: Iterable[str] = ()) -> GridStatus:
    plan = expand(spec)
    if run is None:
        return GridStatus(plan, frozenset(), frozenset(), frozenset())
    return GridStatus(
        plan, frozenset(run.committed_cells()), frozenset(run.stored_gradients()), frozenset(queued)
    )


def batched(items: Sequence[T], size: int) -> list[tuple[T, ...]]:
    return [tuple(items[i : i + size]) for i in range(0, len(items), size)]


def inversion_chunks(
    run: RunDir,
    cells: Sequence[InversionCell],
    *,
    per_job: int,
    keep_restarts: bool,
    threads: int | None = None,
) -> list[Chunk]:
    """K cells per element, grouped so that one element loads one victim and one generator."""
    ordered = sorted(cells, key=_loading_key)
    return [
        Chunk(
            str(run.root), "inversions", tuple(c.describe() for c in group), keep_restarts, threads
        )
        for group in batched(ordered, per_job)
    ]


def gradient_chunks(
    run: RunDir, cells: Sequence[GradientCell], *, per_job: int, threads: int | None = None
) -> list[Chunk]:
    ordered = sorted(cells, key=lambda g: json.dumps(g.victim.model_dump(), sort_keys=True))
    return [
        Chunk(str(run.root), "gradients", tuple(c.describe() for c in group), False, threads)
        for group in batched(ordered, per_job)
    ]


def _loading_key(cell: InversionCell) -> tuple[str, str, str]:
    victim = json.dumps(cell.gradient.victim.model_dump(), sort_keys=True)
    generator = json.dumps(cell.generator.model_dump(), sort_keys=True) if cell.generator else ""
    return victim, generator, cell.method


@dataclass(frozen=True)
class SubmissionShape:
    arrays: int
    elements: int
    cells_per_element: int
    sbatch_calls: int

    def describe(self) -> str:
        return (
            f"{self.arrays} job array(s), {self.elements} elements, <= "
            f"{self.cells_per_element} cells per element, {self.sbatch_calls} sbatch call(s)"
        )


def submission_shape(
    n_cells: int, *, per_job: int, max_array: int = ARRAY_ELEMENTS
) -> SubmissionShape:
    """One sbatch per job array; an array holds at most `max_array` elements of K cells."""
    elements = math.ceil(n_cells / per_job) if n_cells else 0
    arrays = math.ceil(elements / max_array) if elements else 0
    return SubmissionShape(arrays, elements, per_job, arrays)


def stored_timings(run: RunDir | None) -> dict[str, float]:
    """Seconds per iteration of each method, from the run's committed metrics (if any)."""
    if run is None or not run.committed_cells():
        return {}
    df = run.metrics(columns=["method", "cell_id", "wall_seconds", "iterations"])
    per_cell = df.groupby(["method", "cell_id"])[["wall_seconds", "iterations"]].first()
    per_it = per_cell["wall_seconds"] / per_cell["iterations"].clip(lower=1)
    return {str(m): float(v) for m, v in per_it.groupby(level="method").mean().items()}
