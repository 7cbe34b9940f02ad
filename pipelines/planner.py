"""Planning: what a grid needs, what is done, and how the rest is shaped into job arrays."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from gi_core.errors import ConfigError
from storage.run import RunDir, create_run, existing_run, replace_damaged_spec, update_spec
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


@dataclass(frozen=True)
class Overrides:
    """Deployment parameters that override the spec (stored in the run's grid.yaml)."""

    partition: str | None = None  # execution.slurm.partition
    max_parallel: int | None = None  # execution.max_parallel and execution.slurm.array_parallelism
    budget_scale: float | None = None  # budgets.iterations_scale (new cell ids: a new budget)

    def apply_text(self, text: str) -> str:
        """The spec's YAML with these overrides (unchanged without any, or when it is no YAML
        mapping: parsing it then reports the problem)."""
        if self == Overrides():
            return text
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        if not isinstance(data, dict):
            return text
        execution = data.setdefault("execution", {}) or {}
        data["execution"] = execution
        if self.partition is not None:
            execution.setdefault("slurm", {})["partition"] = self.partition
        if self.max_parallel is not None:
            execution["max_parallel"] = self.max_parallel
            execution.setdefault("slurm", {})["array_parallelism"] = self.max_parallel
        if self.budget_scale is not None:
            data.setdefault("budgets", {})["iterations_scale"] = self.budget_scale
        return yaml.safe_dump(data, sort_keys=False)


@dataclass(frozen=True)
class GridPlan:
    """One command's grid, worked out once (decision 221): the spec read and validated, the
    executor resolved (flag over spec), the run directory located and (`opened`) prepared, the
    cells expanded. Cost model, memory check, preflight, flow and report read this object
    instead of reading the spec again.

    `cells` is expanded on first use, so a command's cheap checks (--out, Slurm commands)
    still come before expansion's data checks, as they did."""

    spec_path: Path
    spec: GridSpec
    text: str  # the spec's YAML, overrides applied: what the run's grid.yaml freezes
    executor: ExecutorKind
    layout: RunDir  # where the run lives (it may not exist yet)
    run: RunDir | None = field(default=None, compare=False)  # set by `opened()`

    @property
    def run_path(self) -> Path:
        return self.layout.root

    @cached_property
    def cells(self) -> Plan:
        return expand(self.spec)

    @cached_property
    def cell_ids(self) -> frozenset[str]:
        return frozenset(c.id for c in self.cells.inversion_cells)

    def existing(self) -> RunDir | None:
        """The run directory if it already holds a run (the opened one once opened)."""
        return self.run or existing_run(self.run_path)

    def status(self, *, queued: Iterable[str] = ()) -> GridStatus:
        """Committed, stored and queued cells of this grid, from its run directory now."""
        return grid_status(self.cells, self.existing(), queued=queued)

    def opened(self) -> GridPlan:
        """This plan with its run directory created or reopened (see prepare_run)."""
        opened = replace(self, run=prepare_run(self.spec, self.text, self.run_path))
        if "cells" in self.__dict__:  # keep the expansion: replace() builds a new object
            opened.__dict__["cells"] = self.cells
        return opened


def build_plan(
    spec_path: Path | str,
    *,
    executor: str | None = None,
    out: Path | str | None = None,
    overrides: Overrides | None = None,
) -> GridPlan:
    """Read and validate the spec (overrides applied) and resolve the executor, once."""
    text = (overrides or Overrides()).apply_text(read_spec_text(spec_path))
    spec = spec_from_yaml(text)
    kind = resolve_executor(spec, executor)
    return GridPlan(Path(spec_path), spec, text, kind, RunDir(run_dir_for(spec, out)))


# The plan a command hands to the Prefect flow it starts in this process (decision 221). Flow
# parameters stay what a deployment passes (paths and strings: a plan in them would be
# serialised into every flow-run record); a flow started by a deployment builds its own plan.
_HANDED: list[GridPlan] = []


@contextmanager
def handing_over(plan: GridPlan) -> Iterator[None]:
    """While open, a flow started here with this plan's spec path, executor and run directory
    (and no overrides) uses `plan` instead of reading the spec again."""
    _HANDED.append(plan)
    try:
        yield
    finally:
        _HANDED.remove(plan)


def handed_over(
    spec_path: Path | str, executor: str | None, out: Path | str | None, overrides: Overrides
) -> GridPlan | None:
    """The plan handed over for exactly these flow parameters, if any."""
    for plan in reversed(_HANDED):
        same = (
            plan.spec_path == Path(spec_path)
            and executor == plan.executor
            and out is not None
            and Path(out) == plan.run_path
        )
        if same and overrides == Overrides():
            return plan
    return None


def read_spec(path: Path | str) -> tuple[GridSpec, str]:
    text = read_spec_text(path)
    return spec_from_yaml(text), text


def run_dir_for(spec: GridSpec, out: Path | str | None) -> Path:
    return Path(out) if out else DEFAULT_RUNS / spec.name


def prepare_run(spec: GridSpec, text: str, out: Path | str | None) -> RunDir:
    """Create the run directory (or reopen it: the frozen grid.yaml must describe this grid)."""
    path = run_dir_for(spec, out)
    run = existing_run(path)
    if run is None:
        return create_run(path, text)
    replace_damaged_spec(run, text)  # a damaged frozen spec is rebuilt from this
    frozen = run.spec_name()
    if frozen != spec.name:
        raise ConfigError(
            f"--out: {path} holds the run of grid {frozen!r}, not "
            f"{spec.name!r}; choose another --out"
        )
    update_spec(run, text)  # an extended grid resumes: committed cells keep their ids
    return run


def grid_status(plan: Plan, run: RunDir | None, *, queued: Iterable[str] = ()) -> GridStatus:
    """Where the expanded cells `plan` stand in `run` (None: nothing done yet)."""
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
    # one victim per element; a trained victim's rounds ascending, so that a longer training
    # resumes from a shorter one of the same lineage (tasks.work.training)
    ordered = sorted(cells, key=lambda g: (g.victim_stage.lineage_id, g.victim.rounds))
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
