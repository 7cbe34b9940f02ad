"""`gi-eval verify RUN --recompute N [--cells ID,...]`: a reproducibility audit (issue 20).

Recomputes committed inversion cells from their stored descriptions (the client gradient
first, then the attack) in a scratch run directory inside the run (`<run>/scratch/recompute-*`),
and compares the gradient, the reconstruction and every metric value bit for bit with what is
stored (storage.verify.array_difference / row_differences). Committed results are only read.

First version: the cells run inline, in this process, one after another, at the torch thread
count stored in their rows (`threads`). Bits are fixed per device, torch build and
`OMP_NUM_THREADS` at start-up (ARCHITECTURE 63), so run it on the kind of machine and with the
environment the grid ran with; a Slurm grid's cells are not resubmitted as jobs.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from gi_core.errors import ConfigError
from storage.run import GRID_FILE, RunDir, create_run, existing_run
from storage.verify import array_difference, row_differences
from storage.zarr_store import read_gradient, read_reconstruction
from tasks.cells import InversionCell
from tasks.spec import spec_from_yaml
from tasks.work import NoPreemption, generate_gradient, invert

SCRATCH_DIR = "scratch"
EXIT_DIFFERENT = 1  # docs/reproducibility.md: some recomputed cell differs from what is stored
SCHEDULE = ("attempts", "resumed_from_iteration", "batch_group_size", "threads", "slurm_job_id",
            "host")  # fmt: skip


@dataclass(frozen=True)
class CellCheck:
    """One recomputed cell: what differs (empty: bit-identical) and how it was first run."""

    cell_id: str
    label: str
    differences: tuple[str, ...]
    provenance: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in self.provenance.items())
        lines = [f"cell {self.cell_id} ({self.label}) differs; stored with {where or '?'}:"]
        return "\n".join(lines + [f"  {d}" for d in self.differences])


@dataclass(frozen=True)
class RecomputeReport:
    checks: tuple[CellCheck, ...]
    scratch: Path | None  # kept for inspection when a cell differs, else removed

    @property
    def identical(self) -> bool:
        return all(not c.differences for c in self.checks)

    def describe(self) -> str:
        same = sum(not c.differences for c in self.checks)
        lines = [f"{same} of {len(self.checks)} recomputed cells identical"]
        lines += [c.describe() for c in self.checks if c.differences]
        if self.scratch is not None and not self.identical:
            lines.append(f"recomputed cells kept in {self.scratch}")
        return "\n".join(lines)


def choose_cells(committed: Sequence[str], n: int, named: Sequence[str], seed: int) -> list[str]:
    """The named cells, else n committed cells drawn with `seed` (the same n and seed draw the
    same cells)."""
    if named:
        unknown = [c for c in named if c not in set(committed)]
        if unknown:
            raise ConfigError(
                f"--cells: {', '.join(unknown)} is not a committed cell of this run (cell ids "
                "are in the metrics' cell_id column)"
            )
        return list(dict.fromkeys(named))
    if n < 1 or n > len(committed):
        raise ConfigError(
            f"--recompute: asks for {n} cells; the run has {len(committed)} committed cells "
            f"(give 1..{len(committed)})"
        )
    return sorted(random.Random(seed).sample(sorted(committed), n))


def recompute(run_dir: Path, *, n: int, cells: Sequence[str], seed: int = 0) -> RecomputeReport:
    """Recompute the chosen cells in a fresh scratch run and compare them with the stored ones."""
    run = existing_run(run_dir)
    if run is None:
        raise ConfigError(f"run_dir: {run_dir} is not a run directory (no {GRID_FILE})")
    chosen = choose_cells(sorted(run.committed_cells()), n, cells, seed)
    stored = run.metrics()
    stamp = f"recompute-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    scratch_root = run.root / SCRATCH_DIR / stamp
    scratch = create_run(scratch_root, run.spec_text())
    snapshots = spec_from_yaml(run.spec_text()).storage.snapshots
    checks = tuple(
        _check(run, scratch, stored[stored["cell_id"] == c], c, snapshots) for c in chosen
    )
    report = RecomputeReport(checks, scratch_root)
    if report.identical:
        shutil.rmtree(scratch_root, ignore_errors=True)
        with contextlib.suppress(OSError):  # another audit may still be using scratch/
            scratch_root.parent.rmdir()
    return report


def _check(
    run: RunDir, scratch: RunDir, rows: pd.DataFrame, cell_id: str, snapshots: Sequence[int]
) -> CellCheck:
    first = rows.iloc[0].to_dict() if len(rows) else {}
    label = ", ".join(
        f"{k} {first[k]}" for k in ("method", "variant", "defense", "batch_index", "seed")
        if k in first
    )
    provenance = {k: _plain(first.get(k)) for k in SCHEDULE if k in first}
    try:
        description = read_reconstruction(run.reconstruction_path(cell_id)).attrs["cell"]
        cell = InversionCell.from_dict(description)
    except Exception as e:  # noqa: BLE001 - an unreadable stored cell is itself a difference
        return CellCheck(cell_id, label, (f"stored reconstruction unreadable: {e}",), provenance)
    with _threads(first.get("threads")):
        generate_gradient(scratch, cell.gradient)
        invert(scratch, cell, preemption=NoPreemption(), keep_restarts=False, snapshots=snapshots)
    differences = _gradient_differences(run, scratch, cell.gradient_id)
    differences += _reconstruction_differences(run, scratch, cell_id)
    fresh = scratch.metrics()
    differences += row_differences(rows, fresh[fresh["cell_id"] == cell_id])
    return CellCheck(cell_id, label, tuple(differences), provenance)


def _gradient_differences(run: RunDir, scratch: RunDir, gradient_id: str) -> list[str]:
    a, b = read_gradient(run.gradient_path(gradient_id)), read_gradient(
        scratch.gradient_path(gradient_id)
    )
    pairs = [("gradient", a.gradient, b.gradient), ("gradient images", a.images, b.images)]
    return [d for name, x, y in pairs if (d := array_difference(name, x, y)) is not None]


def _reconstruction_differences(run: RunDir, scratch: RunDir, cell_id: str) -> list[str]:
    a = read_reconstruction(run.reconstruction_path(cell_id))
    b = read_reconstruction(scratch.reconstruction_path(cell_id))
    pairs = [
        ("images", a.images, b.images),
        ("restart_costs", a.restart_costs, b.restart_costs),
        ("loss_curve", a.loss_curve, b.loss_curve),
    ]
    return [d for name, x, y in pairs if (d := array_difference(name, x, y)) is not None]


@contextlib.contextmanager
def _threads(stored: Any) -> Iterator[None]:
    """Run at the thread count the cell was computed with (rows from before issue 20 have
    none: then the process default)."""
    before = torch.get_num_threads()
    if stored is not None and not pd.isna(stored):
        torch.set_num_threads(int(stored))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _plain(value: Any) -> Any:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value
