"""What a driver checks before it submits anything, and what it tidies when it resumes.

Before submission (`check_before_submission`): every victim and generator checkpoint loads into
its architecture with the right shapes; the run directory is writable; its filesystem has room
for the cells still to do (sizes per cell measured on the run's own committed cells, else
estimated from the victim's parameter count and the image shapes). A job that would fail on any
of these fails only after queueing, model loading and three attempts.

On resume (`prepare_resume`, under the driver lock): temp files of crashed writers are removed
(all of them when no earlier job can still be writing, else those older than an hour), and the
quick storage self-check moves unreadable metrics files, committed cells without a
reconstruction group, stray copies and damaged records to quarantine, so that this run
recomputes (or rebuilds) them; the gradients the remaining cells will read are checked in full
(every CRC), so a damaged one is regenerated before its cells are submitted.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gi_core.datasets import dataset_info
from gi_core.errors import ConfigError
from gi_core.generators import build_generator, load_generator_checkpoint
from storage import verify
from storage.errors import EnvironmentProblem
from storage.run import RunDir
from tasks.cells import GradientCell, InversionCell, Plan, expand
from tasks.jobs import active_records
from tasks.models import victim_model
from tasks.spec import spec_from_yaml

# What torch.load / load_state_dict raise on a file that is not a matching state_dict (a text
# file gives KeyError, a truncated zip RuntimeError, a foreign pickle UnpicklingError, ...).
_LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    zipfile.BadZipFile,
)
HEADROOM = 1.2  # free space must exceed the estimate by 20 %: logs, checkpoints, compaction
_CELL_OVERHEAD = 64 * 1024  # metrics part, zip directory, loss curve, attrs
_STALE_TEMP_S = 3600.0


@dataclass(frozen=True)
class SpaceEstimate:
    bytes_needed: int
    bytes_free: int
    where: Path


def check_before_submission(
    run_path: Path,
    inversions: Sequence[InversionCell],
    gradients: Sequence[GradientCell],
    *,
    keep_restarts: bool,
) -> SpaceEstimate:
    """Raise ConfigError (bad checkpoint) or EnvironmentProblem (read-only or too small
    filesystem) naming the file and what to do; returns the space estimate."""
    problems = checkpoint_problems([*inversions], [c.gradient for c in inversions] + [*gradients])
    if problems:
        raise ConfigError("\n".join(problems))
    check_writable(run_path)
    estimate = estimate_space(run_path, inversions, gradients, keep_restarts=keep_restarts)
    if estimate.bytes_needed * HEADROOM > estimate.bytes_free:
        raise EnvironmentProblem(
            f"{estimate.where} has {_mb(estimate.bytes_free)} free, the cells to do need about "
            f"{_mb(estimate.bytes_needed)} (+{HEADROOM - 1:.0%} headroom); free space or choose "
            "another run directory with --out"
        )
    return estimate


def checkpoint_problems(
    inversions: Sequence[InversionCell], gradients: Sequence[GradientCell]
) -> list[str]:
    """One line per victim/generator checkpoint that does not load into its architecture."""
    problems: dict[str, str] = {}
    for g in {g.id: g for g in gradients}.values():
        v = g.victim
        if v.checkpoint is None or v.checkpoint in problems:
            continue
        problem = _victim_problem(g)
        if problem:
            problems[v.checkpoint] = f"victim.checkpoint: {v.checkpoint}: {problem}"
    for c in inversions:
        gen = c.generator
        if gen is None or gen.checkpoint is None or gen.checkpoint in problems:
            continue
        problem = _generator_problem(gen.kind, gen.checkpoint, c.gradient.image_size)
        if problem:
            problems[gen.checkpoint] = f"generator.checkpoint: {gen.checkpoint}: {problem}"
    return list(problems.values())


# How a file that torch.save wrote begins: a zip archive (torch >= 1.6) or a pickle (older
# torch, and the stylegan2-ada .pkl network pickles).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def checkpoint_file_problem(path: Path | str) -> str | None:
    """Why `path` cannot be a PyTorch checkpoint at all, judged from its first bytes, else None.
    torch.load of a text file fails with whatever its unpickler meets first (IndexError: pop
    from empty list, UnpicklingError: invalid load key, ...); this says what the file is."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not head:
        return "is an empty file, not a PyTorch checkpoint"
    if head.startswith(_TORCH_MAGIC):
        return None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "is not a PyTorch checkpoint (neither a torch.save zip nor a pickle)"
    return "is a text file, not a PyTorch checkpoint (torch.save writes a zip or a pickle)"


def _victim_problem(cell: GradientCell) -> str | None:
    v = cell.victim
    bad_file = checkpoint_file_problem(v.checkpoint) if v.checkpoint else None
    if bad_file:
        return f"{bad_file}; save one with torch.save(model.state_dict(), path)"
    classes = dataset_info(cell.dataset, image_size=cell.image_size).num_classes
    what = f"a {v.arch} state_dict for {classes} classes at {cell.image_size} px"
    try:
        victim_model(v, num_classes=classes, image_size=cell.image_size)
    except (*_LOAD_ERRORS, ConfigError) as e:
        return f"is not {what} ({type(e).__name__}: {_short(e)}); save one with " \
               "torch.save(model.state_dict(), path)"
    return None


def _generator_problem(kind: str, checkpoint: str, image_size: int) -> str | None:
    bad_file = checkpoint_file_problem(checkpoint)
    if bad_file:
        return f"{bad_file}; give the generator's torch.save(state_dict) file"
    try:
        state = load_generator_checkpoint(checkpoint)
        build_generator(kind, output_size=image_size, state_dict=state)
    except (*_LOAD_ERRORS, ConfigError) as e:
        return f"is not a {kind} generator state_dict ({type(e).__name__}: {_short(e)}); " \
               "give the generator's torch.save(state_dict) file"
    return None


def check_writable(run_path: Path) -> None:
    """The run directory (or the nearest existing parent it would be created in) is writable."""
    where = _existing(run_path)
    if not os.access(where, os.W_OK):
        raise EnvironmentProblem(
            f"cannot write {where} (read-only filesystem or no permission); choose a writable "
            "run directory with --out"
        )


def estimate_space(
    run_path: Path,
    inversions: Sequence[InversionCell],
    gradients: Sequence[GradientCell],
    *,
    keep_restarts: bool,
) -> SpaceEstimate:
    """Bytes the remaining cells will write: measured per cell on this run's committed cells
    when it has some, else from the image shapes, restarts and victim parameter counts."""
    measured = _measured_per_cell(run_path)
    if measured is not None and inversions:
        needed = int(measured * len(inversions))
    else:
        needed = sum(_inversion_bytes(c, keep_restarts=keep_restarts) for c in inversions)
    needed += sum(_gradient_bytes(g) for g in gradients)
    where = _existing(run_path)
    return SpaceEstimate(needed, shutil.disk_usage(where).free, where)


def _inversion_bytes(cell: InversionCell, *, keep_restarts: bool) -> int:
    g = cell.gradient
    images = g.batch_size * 3 * g.image_size**2 * 4
    restarts = int(getattr(cell.config, "restarts", 1)) if keep_restarts else 1
    return images * (restarts + 1) + _CELL_OVERHEAD


def _gradient_bytes(cell: GradientCell) -> int:
    # dense float32 gradient (+1 bit mask) and the ground-truth batch
    params = _param_count(cell)
    return params * 4 + params // 8 + cell.batch_size * 3 * cell.image_size**2 * 4 + _CELL_OVERHEAD


_PARAMS: dict[str, int] = {}


def _param_count(cell: GradientCell) -> int:
    v = cell.victim
    classes = dataset_info(cell.dataset, image_size=cell.image_size).num_classes
    key = f"{v.arch}/{v.width}/{classes}/{cell.image_size}"
    if key not in _PARAMS:
        shape_only = v.model_copy(update={"checkpoint": None})
        try:
            with torch.device("meta"):  # shapes only: no memory, no initialisation cost
                model = victim_model(shape_only, num_classes=classes, image_size=cell.image_size)
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            # a user model that cannot be built on the meta device: its gradient is left out
            # of the estimate (the job builds it for real and reports any real problem)
            _PARAMS[key] = 0
        else:
            _PARAMS[key] = sum(p.numel() for p in model.parameters())
    return _PARAMS[key]


def _measured_per_cell(run_path: Path) -> float | None:
    groups = RunDir(run_path).reconstructions_dir
    if not groups.is_dir():
        return None
    sizes = [e.stat().st_size for e in os.scandir(groups) if e.name.endswith(".zarr.zip")]
    return sum(sizes) / len(sizes) + _CELL_OVERHEAD if sizes else None


def prepare_resume(run: RunDir, plan: Plan | None = None) -> list[str]:
    """Sweep temp files and quarantine what readers cannot use; returns lines to show.
    `plan`: the run's expanded cells when the caller holds them (else expanded from grid.yaml)."""
    earlier_jobs = bool(active_records(run))
    removed = run.sweep_temp_files(older_than_s=_STALE_TEMP_S if earlier_jobs else 0.0)
    report = verify.scan(run)
    # The gradients this run's cells will read get the deep check (every CRC) now, so that a
    # damaged one is regenerated before its cells are submitted instead of failing them.
    plan = plan or expand(spec_from_yaml(run.spec_text()))
    deep = verify.gradient_findings(run, _gradients_to_read(run, plan), deep=True)
    report = verify.repair(run, verify.with_findings(report, deep))
    lines = []
    if removed:
        lines.append(f"removed {removed} temp file(s) of interrupted writers")
    if report.findings:
        lines.append(report.describe())
    return lines


def _gradients_to_read(run: RunDir, plan: Plan) -> set[str]:
    """Stored gradients that the run's uncommitted cells need."""
    committed = run.committed_cells()
    needed = {c.gradient_id for c in plan.inversion_cells if c.id not in committed}
    return needed & run.stored_gradients()


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _short(e: BaseException) -> str:
    # load_state_dict puts the useful part ("size mismatch for 0.weight ...") on later lines
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text if len(text) <= 300 else text[:297] + "..."
