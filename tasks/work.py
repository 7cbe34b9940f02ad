"""What one job-array element does: run a chunk of cells in sequence, idempotently.

Each function is load -> one gi_core call -> save. Victims, generators and the LPIPS network
are loaded once per element (cached per process) and reused by every cell of the chunk. A cell
whose outputs are committed does nothing, so a requeued or resubmitted element only finishes
what is missing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from gi_core.attacks import InversionProblem, Progress, reconstruct
from gi_core.attacks.batched import batchable
from gi_core.datasets import dataset_info, load_images
from gi_core.defenses import apply_defense
from gi_core.generators import (
    Generator,
    weights_source,
)
from gi_core.gradients import ParamIndex, bn_statistics
from gi_core.labels import attack_labels
from gi_core.metrics import evaluate_batch, lpips_model
from gi_core.stylegan2 import StyleGAN2Generator
from storage.checkpoints import delete_checkpoint, load_checkpoint, save_checkpoint
from storage.run import RunDir, open_run
from storage.tables import FAILURES_DIR, record_failure, write_curve
from storage.zarr_store import (
    StoredGradient,
    StoredReconstruction,
    read_gradient,
    write_gradient,
    write_reconstruction,
)
from tasks.batching import cell_bytes, device_budget, group_by_key, group_cells
from tasks.cells import GeneratorSpec, GradientCell, InversionCell
from tasks.errors import DegenerateInputError, ExecutionError
from tasks.executors import job_environment
from tasks.models import generator_model, victim_model
from tasks.spec import VictimSpec

log = logging.getLogger(__name__)
# Periodic saves also cover SIGTERM preemption and node failures. GI_CHECKPOINT_EVERY_S (read in
# the job process; sbatch and local jobs inherit the submitting environment) overrides it.
CHECKPOINT_EVERY_S = float(os.environ.get("GI_CHECKPOINT_EVERY_S", "120"))
TRACE_KEY = "gi_eval_trace"  # our own entry in a checkpoint beside the engine's state


class Preemption(Protocol):
    """Deferred preemption (tasks.executors.DeferredPreemption or `NoPreemption`)."""

    requested: bool

    def safe_point(self) -> None: ...


class NoPreemption:
    requested = False

    def safe_point(self) -> None:
        return None


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
        per_cell = _cell_bytes(group[0])
        for part in group_cells(group, per_cell_bytes=per_cell, budget=budget):
            units.append([by_id[c.id] for c in part])
    return units


def _cell_bytes(cell: InversionCell) -> int:
    victim = victim_for(cell.gradient)
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


def _run_unit(
    run: RunDir, chunk: Chunk, unit: list[dict[str, Any]], preemption: Preemption
) -> int:
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


def device() -> torch.device:
    """The one place that chooses a device: the GPU of the element when Slurm gave it one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=8)
def _victim(spec: VictimSpec, num_classes: int, image_size: int) -> nn.Module:
    """The victim of `spec` on this job's device, built once per job (tasks.models)."""
    return victim_model(spec, num_classes=num_classes, image_size=image_size).to(device())


def victim_for(cell: GradientCell) -> nn.Module:
    classes = dataset_info(cell.dataset, image_size=cell.image_size).num_classes
    return _victim(cell.victim, classes, cell.image_size)


@functools.lru_cache(maxsize=4)
def _generator(spec: GeneratorSpec, output_size: int) -> Generator:
    """The prior of `spec` on this job's device, built once per job (tasks.models)."""
    return generator_model(spec, output_size=output_size).to(device())


def generate_gradient(run: RunDir, cell: GradientCell) -> int:
    """Client gradient of the cell's batch under its defense -> store.zarr/gradients/<id>."""
    if run.has_gradient(cell.id):
        return 0
    images, labels = load_images(cell.dataset, cell.indices, image_size=cell.image_size)
    images, labels = images.to(device()), labels.to(device())
    victim = victim_for(cell)
    noise = torch.Generator().manual_seed(int(cell.id[:12], 16))  # deterministic per cell
    defended = apply_defense(cell.defense, victim, images, labels, generator=noise)
    index = ParamIndex.of(victim)
    _refuse_degenerate(cell, index.flatten(defended.grads))
    mask = index.flatten(defended.masks).bool() if defended.masks is not None else None
    write_gradient(
        run.gradient_path(cell.id),
        StoredGradient(
            gradient=index.flatten(defended.grads).cpu().numpy(),
            param_names=index.names,
            param_shapes=index.shapes,
            images=images.cpu().numpy(),
            labels=labels.cpu().numpy(),
            bn_stats=tuple(
                (m.cpu().numpy(), v.cpu().numpy()) for m, v in bn_statistics(victim, images)
            ),
            mask=None if mask is None else mask.cpu().numpy(),
            attrs={"cell": cell.describe(), "defense_info": _json_safe(defended.info)},
        ),
    )
    return 1


def invert(
    run: RunDir,
    cell: InversionCell,
    *,
    preemption: Preemption,
    keep_restarts: bool,
    snapshots: Sequence[int] = (),
    group_size: int = 1,
) -> int:
    """Attack one stored gradient, resuming from a checkpoint; commit curve, then metrics last.
    `group_size` (cells of its unit) is provenance only: it never changes the numbers."""
    if run.is_committed(cell.id, cell.method):
        return 0
    start = time.perf_counter()
    p = _prepare(run, cell, snapshots, group_size)
    result = reconstruct(
        cell.method,
        p.problem,
        cell.config,
        seed=cell.seed,
        generator=p.generator,
        state=p.state,
        progress=p.trace.around(_checkpointer(p.checkpoint_path, preemption, p.trace)),
    )
    return _commit_inversion(run, p, result, time.perf_counter() - start, keep_restarts)


@dataclass
class _Prepared:
    """One inversion cell loaded and ready to attack (shared by `invert` and `invert_group`)."""

    cell: InversionCell
    stored: StoredGradient
    problem: InversionProblem
    label_acc: float
    generator: Generator | None
    checkpoint_path: Any
    state: dict[str, Any] | None
    trace: Trace
    group_size: int = 1


def _prepare(
    run: RunDir, cell: InversionCell, snapshots: Sequence[int], group_size: int = 1
) -> _Prepared:
    dev = device()
    stored = read_gradient(run.gradient_path(cell.gradient_id))
    problem = _problem(stored, victim_for(cell.gradient), dev)
    labels, label_acc = attack_labels(problem.target, problem.labels, mode=cell.config.labels)
    problem = dataclasses.replace(problem, labels=labels)
    checkpoint_path = run.checkpoint_path(cell.id)
    state = load_checkpoint(checkpoint_path)
    failed_before = (run.root / FAILURES_DIR / f"{cell.id}.json").is_file()
    trace = Trace.resume(state, snapshots, failed_before=failed_before)
    return _Prepared(
        cell, stored, problem, label_acc, generator_for(cell), checkpoint_path, state, trace,
        group_size,
    )


def invert_group(
    run: RunDir,
    cells: Sequence[InversionCell],
    *,
    preemption: Preemption,
    keep_restarts: bool,
    snapshots: Sequence[int] = (),
) -> int:
    """Cells of one batch key (tasks.batching), one after another in this job: they share the
    cached victim, generator and LPIPS network. Not one batched solve (gi_core.attacks.batched):
    measured on CPU, a batched cell's bits depend on its group (decision 101), and a resume
    regroups the cells that are left, so results would depend on grouping and interruptions."""
    return sum(
        invert(run, cell, preemption=preemption, keep_restarts=keep_restarts,
               snapshots=snapshots, group_size=len(cells))
        for cell in cells
    )


def _commit_inversion(
    run: RunDir, p: _Prepared, result: Any, wall: float, keep_restarts: bool
) -> int:
    cell, stored, problem, trace, dev = p.cell, p.stored, p.problem, p.trace, device()
    label_acc, checkpoint_path = p.label_acc, p.checkpoint_path
    truth = torch.as_tensor(stored.images, device=dev)
    # given labels keep positions; recovered ones are a sorted set: match by Hungarian assignment
    known = problem.labels if cell.config.labels == "given" else None
    scores = evaluate_batch(result.images, truth, labels=known, lpips=lpips_model())
    write_reconstruction(
        run.reconstruction_path(cell.id),
        dataclasses.replace(_stored_result(cell, result, wall, dev), **trace.snapshot_arrays()),
        keep_restarts=keep_restarts,
    )
    iterations = result.curve_iterations.numpy()
    write_curve(
        run,
        cell.id,
        method=cell.method,
        costs=result.loss_curve.double().numpy(),
        iterations=iterations,
        stages=[trace.stage_of(int(i)) for i in iterations],
    )
    run.commit_metrics(
        _rows(cell, stored, result, scores, wall, dev, label_acc, _schedule_columns(p))
    )
    delete_checkpoint(checkpoint_path)
    return 1


def generator_for(cell: InversionCell) -> Generator | None:
    if cell.generator is None:
        return None
    gen = _generator(cell.generator, cell.gradient.image_size)
    if isinstance(gen, StyleGAN2Generator) and gen.options.noise == "fixed":
        # fixed noise maps are drawn from the cell's seed: a cell is deterministic on its own
        return _with_noise_seed(cell.generator, cell.gradient.image_size, cell.seed)
    return gen


@functools.lru_cache(maxsize=4)
def _with_noise_seed(spec: GeneratorSpec, output_size: int, seed: int) -> Generator:
    # One object per (prior, seed): cells of one seed share it (and its noise maps).
    gen = _generator(spec, output_size)
    assert isinstance(gen, StyleGAN2Generator)
    return gen.with_noise_seed(seed)


def _problem(stored: StoredGradient, victim: nn.Module, dev: torch.device) -> InversionProblem:
    index = ParamIndex(stored.param_names, stored.param_shapes)
    grads = index.unflatten(torch.as_tensor(stored.gradient, device=dev))
    masks = None
    if stored.mask is not None:
        masks = [
            m.to(torch.float32) for m in index.unflatten(torch.as_tensor(stored.mask, device=dev))
        ]
    labels = torch.as_tensor(stored.labels, device=dev)
    stats = [
        (torch.as_tensor(m, device=dev), torch.as_tensor(v, device=dev)) for m, v in stored.bn_stats
    ]
    shape = tuple(stored.images.shape[1:])
    return InversionProblem(
        victim,
        grads,
        labels,
        shape,
        masks=masks,  # type: ignore[arg-type]
        bn_target=stats or None,
    )


@dataclass
class Trace:
    """What the progress callback sees and the attack result does not keep: the stage of each
    iteration (for run.curves()) and every restart's images at the snapshot iterations. Saved
    inside the checkpoint under TRACE_KEY, so a resumed cell keeps what it saw before."""

    snapshot_at: frozenset[int]
    stage_starts: dict[str, int]  # stage name -> first global iteration (0-based step index)
    snapshots: dict[int, torch.Tensor]  # iteration -> (R, B, C, H, W) in [0, 1], on the CPU
    # Schedule provenance (issue 20): this attempt's number, counting earlier attempts that left
    # a trace (a checkpoint, or a failure record); the global iteration the state resumes after.
    attempts: int = 1
    resumed_from: int | None = None

    @classmethod
    def resume(
        cls, state: dict[str, Any] | None, snapshots: Sequence[int], *, failed_before: bool = False
    ) -> Trace:
        saved = state.pop(TRACE_KEY, {}) if state is not None else {}
        starts = dict(saved.get("stage_starts", {}))
        earlier = int(saved.get("attempts", 1)) if state is not None else int(failed_before)
        resumed = None
        if state is not None:
            resumed = saved.get("iteration", _global_iteration(state, starts))
        return cls(frozenset(snapshots), starts, dict(saved.get("snapshots", {})),
                   attempts=earlier + 1, resumed_from=resumed)

    def around(self, inner: Callable[[Progress], None]) -> Callable[[Progress], None]:
        def on_progress(p: Progress) -> None:
            self.stage_starts.setdefault(p.stage, p.iteration - 1)
            if p.iteration in self.snapshot_at and p.render is not None:
                self.snapshots[p.iteration] = p.render().cpu()
            inner(p)

        return on_progress

    def saved(self, iteration: int) -> dict[str, Any]:
        """What a checkpoint taken after global `iteration` keeps of the trace."""
        return {"stage_starts": dict(self.stage_starts), "snapshots": dict(self.snapshots),
                "attempts": self.attempts, "iteration": iteration}

    def stage_of(self, iteration: int) -> str:
        """The stage whose first step is the latest one at or before `iteration`."""
        started = [(start, name) for name, start in self.stage_starts.items() if start <= iteration]
        return max(started)[1] if started else ""

    def snapshot_arrays(self) -> dict[str, Any]:
        if not self.snapshots:
            return {}
        its = sorted(self.snapshots)
        return {
            "snapshots": torch.stack([self.snapshots[i] for i in its]).numpy(),
            "snapshot_iterations": np.asarray(its, dtype=np.int64),
        }


def _global_iteration(state: dict[str, Any], stage_starts: dict[str, int]) -> int:
    """A checkpoint written before its trace kept the iteration: its stage's first global step
    plus the step within that stage."""
    starts = sorted(stage_starts.values())
    stage = int(state.get("stage", 0))
    return (starts[stage] if stage < len(starts) else 0) + int(state.get("iteration", 0))


def _checkpointer(path: Any, preemption: Preemption, trace: Trace) -> Callable[[Progress], None]:
    """Save the attack state every CHECKPOINT_EVERY_S and when preemption is requested, then
    let the deferred preemption through (at an iteration boundary: the state is consistent)."""
    last = [time.monotonic()]

    def on_progress(p: Progress) -> None:
        due = time.monotonic() - last[0] >= CHECKPOINT_EVERY_S
        if (due or preemption.requested) and p.iteration < p.total:
            save_checkpoint(path, {**p.export_state(), TRACE_KEY: trace.saved(p.iteration)})
            last[0] = time.monotonic()
        preemption.safe_point()

    return on_progress


def _stored_result(
    cell: InversionCell, result: Any, wall: float, dev: torch.device
) -> StoredReconstruction:
    return StoredReconstruction(
        images=result.images.cpu().numpy(),
        restart_costs=result.restart_costs.double().numpy(),
        loss_curve=result.loss_curve.float().numpy(),
        curve_iterations=result.curve_iterations.numpy(),
        status=result.status,
        iterations=result.iterations,
        wall_seconds=wall,
        device=str(dev),
        best_restart=result.best_restart,
        restart_images=result.restart_images.cpu().numpy(),
        attrs={"cell": cell.describe()},
    )


def _refuse_degenerate(cell: GradientCell, gradient: torch.Tensor) -> None:
    """A zero or non-finite gradient can only give meaningless reconstructions (e.g. a victim
    with one class has a constant loss): fail the cell with the reason, store nothing."""
    norm = float(torch.linalg.vector_norm(gradient.double()))
    if norm == 0.0 or not math.isfinite(norm):
        raise DegenerateInputError(
            f"gradient cell {cell.id}: the client gradient's norm is {norm} (batch "
            f"{cell.batch_index} of {cell.dataset!r}, defense {cell.defense.kind}); a zero or "
            "non-finite gradient cannot be inverted meaningfully. Check the data set's classes "
            "and the defense level"
        )


def _config_columns(cell: InversionCell, stored: StoredGradient) -> dict[str, Any]:
    """Columns that identify weights and privacy budget: checkpoint sha256s, DP (eps, delta)."""
    info = stored.attrs.get("defense_info", {}) or {}
    generator = cell.generator
    return {
        "victim_checkpoint_sha256": _sha256(cell.gradient.victim.checkpoint),
        "generator_checkpoint_sha256": (
            _sha256(generator.checkpoint or weights_source(generator.kind)) if generator else None
        ),
        "dp_epsilon": info.get("epsilon") if cell.gradient.defense.kind == "dp" else None,
        "dp_delta": info.get("delta") if cell.gradient.defense.kind == "dp" else None,
    }


@functools.lru_cache(maxsize=32)
def _sha256(path: str | None) -> str | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rows(
    cell: InversionCell,
    stored: StoredGradient,
    result: Any,
    scores: Any,
    wall: float,
    dev: torch.device,
    label_acc: float,
    schedule: dict[str, Any],
) -> list[dict[str, Any]]:
    axes = {**cell.metric_axes(), **_config_columns(cell, stored)}
    cost = (
        float(result.restart_costs[result.best_restart])
        if result.best_restart >= 0
        else float("nan")
    )
    return [
        {
            **axes,
            "image_index": i,
            "sample_index": int(cell.gradient.indices[i]),
            "label": int(stored.labels[i]),
            "labels": cell.config.labels,
            "label_accuracy": label_acc,
            "psnr": float(scores.psnr[i]),
            "ssim": float(scores.ssim[i]),
            "lpips": float(scores.lpips[i]),
            "best_psnr_in_batch": bool(scores.best_psnr[i]),
            "best_ssim_in_batch": bool(scores.best_ssim[i]),
            "best_lpips_in_batch": bool(scores.best_lpips[i]),
            "final_cost": cost,
            "status": result.status,
            "iterations": result.iterations,
            "wall_seconds": wall,
            "device": str(dev),
            **_where(dev),
            **schedule,
        }
        for i in range(len(stored.labels))
    ]


def _schedule_columns(p: _Prepared) -> dict[str, Any]:
    """How the cell was scheduled (issue 20; storage.metrics "schedule provenance"): none of it
    may change the numbers, and `gi-eval verify --recompute` names it when a cell differs."""
    return {
        "attempts": p.trace.attempts,
        "resumed_from_iteration": p.trace.resumed_from,
        "batch_group_size": p.group_size,
        "threads": torch.get_num_threads(),
    }


def _where(dev: torch.device) -> dict[str, Any]:
    """Slurm job id, array index, host and device model of this cell (metrics columns)."""
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {**job_environment(), "device_name": name}


def _json_safe(info: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf (e.g. epsilon of DP without noise) are not JSON: store them as null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in info.items()
    }
