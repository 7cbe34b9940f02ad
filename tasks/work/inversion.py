"""The inversion job: attack one stored gradient (resuming from its checkpoint), then commit
reconstruction, curve and metrics rows, metrics last.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gi_core.attacks import InversionProblem, reconstruct, rgap
from gi_core.generators import Generator
from gi_core.gradients import ParamIndex
from gi_core.labels import attack_labels
from gi_core.metrics import closest_rows, evaluate_batch, lpips_model
from storage.checkpoints import delete_checkpoint, load_checkpoint
from storage.run import RunDir
from storage.tables import write_curve
from storage.zarr_store import (
    StoredGradient,
    StoredReconstruction,
    read_gradient,
    write_reconstruction,
)
from tasks.cells import InversionCell
from tasks.errors import ExecutionError
from tasks.work.cache import device, generator_for, victim_for, victim_sha256_for
from tasks.work.resume import Preemption, Trace, _checkpointer
from tasks.work.rows import _rows, _schedule_columns


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
    victim_sha256: str | None = None  # the weights attacked (a metrics column, decision 270)


def _prepare(
    run: RunDir, cell: InversionCell, snapshots: Sequence[int], group_size: int = 1
) -> _Prepared:
    dev = device()
    stored = read_gradient(run.gradient_path(cell.gradient_id))
    protocol = cell.gradient.protocol
    victim_sha256 = _same_victim(run, cell, stored)
    problem = _problem(stored, victim_for(cell.gradient, run), dev)
    # label recovery reads the last layer of what was sent, as a mean gradient (decision 194)
    scale = protocol.label_scale()
    readable = problem.target if scale == 1.0 else [t / scale for t in problem.target]
    labels, label_acc = attack_labels(readable, problem.labels, mode=cell.config.labels)
    problem = dataclasses.replace(
        problem, labels=labels, protocol=None if protocol.is_fedsgd else protocol
    )
    checkpoint_path = run.checkpoint_path(cell.id)
    state = load_checkpoint(checkpoint_path)
    failed_before = run.failure_path(cell.id).is_file()
    trace = Trace.resume(state, snapshots, failed_before=failed_before)
    return _Prepared(
        cell,
        stored,
        problem,
        label_acc,
        generator_for(cell),
        checkpoint_path,
        state,
        trace,
        group_size,
        victim_sha256,
    )


def _same_victim(run: RunDir, cell: InversionCell, stored: StoredGradient) -> str:
    """The sha256 of the victim the attacker is given, which must be the one the gradient was
    taken at (recorded with it since decision 271; older gradients record none)."""
    sha = victim_sha256_for(cell.gradient, run)
    taken_at = stored.attrs.get("victim_sha256")
    if taken_at is not None and taken_at != sha:
        raise ExecutionError(
            f"cell {cell.id}: gradient {cell.gradient_id} was taken at victim weights {taken_at}, "
            f"the run's victim now hashes to {sha}; delete the gradient to recompute it"
        )
    return sha


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
        invert(
            run,
            cell,
            preemption=preemption,
            keep_restarts=keep_restarts,
            snapshots=snapshots,
            group_size=len(cells),
        )
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
    recon, truth, known = scored_client(cell, result.images, truth, known)
    scores = evaluate_batch(recon, truth, labels=known, lpips=lpips_model())
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
    rows = _rows(cell, stored, result, scores, wall, dev, label_acc, _schedule_columns(p))
    rows = [{**r, "victim_sha256": p.victim_sha256} for r in rows]
    errors = _layer_errors(problem, truth, result)
    run.commit_metrics([{**r, "layer_errors": errors} for r in rows] if errors else rows)
    delete_checkpoint(checkpoint_path)
    return 1


def scored_client(
    cell: InversionCell, recon: torch.Tensor, truth: torch.Tensor, known: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The attacked client's share of an aggregate (client 0, decision 194): its B truth
    images, and the B reconstructions scored against them: with given labels the first B
    (they were optimised for its labels), with recovered labels (a sorted set over all
    clients) the B that match its images best (rectangular Hungarian assignment on PSNR)."""
    b = cell.gradient.batch_size
    if cell.gradient.protocol.n_clients == 1:
        return recon, truth, known
    truth = truth[:b]
    if known is not None:
        return recon[:b], truth, known[:b]
    return recon[closest_rows(recon, truth)], truth, None


def _layer_errors(problem: InversionProblem, truth: torch.Tensor, result: Any) -> str | None:
    """R-GAP's per-layer errors as JSON (storage.metrics `layer_errors`): the attack returns
    each layer's recovered input, the job body compares them with the true ones (no attack
    reads the ground truth)."""
    recovered = result.extras.get("layer_inputs")
    if recovered is None:
        return None
    true = rgap.layer_inputs(problem.victim, truth)
    return json.dumps(rgap.layer_errors(recovered, true))


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
