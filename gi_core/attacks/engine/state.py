"""Export and restore of the loop state at an iteration boundary: stage, iteration, variables,
optimiser and scheduler state, loss curve, pruning and plateau state. A restored state
continues bit for bit; in a batch each problem exports its own single-problem state."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gi_core.attacks.engine.types import AttackResult, Stage, Variables

if TYPE_CHECKING:
    from gi_core.attacks.engine.loop import Optimiser, Run, Scheduler


def renderer(run: Run, stage: Stage, variables: Variables, problem: int) -> Callable[[], Tensor]:
    """Renders problem `problem`'s current images (R, B, C, H, W) on demand."""

    def render() -> Tensor:
        with torch.no_grad():
            images = stage.render(run.assemble(variables)).detach()
        return images[problem * run.restarts : (problem + 1) * run.restarts]

    return render


def exporter(
    run: Run,
    index: int,
    it: int,
    variables: Variables,
    opt: Optimiser,
    sched: Scheduler,
    problem: int,
) -> Callable[[], dict[str, Any]]:
    """A closure that snapshots problem `problem` at the boundary *before* iteration `it` of a
    stage, as the state of a single-problem run (a batch exports one state per cell)."""

    def export() -> dict[str, Any]:
        n_problems, n_active = run.active.shape
        rows = slice(problem * n_active, (problem + 1) * n_active)
        full = slice(problem * run.restarts, (problem + 1) * run.restarts)
        local = torch.arange(rows.start, rows.stop)
        return {
            "stage": index,
            "iteration": it,
            "variables": {k: v.detach()[rows].clone() for k, v in variables.items()},
            "optimizer": select_rows(opt.state_dict(), local, n_problems * n_active),
            "scheduler": pack_sched(sched.state_dict()),
            "curve": [c[full].clone() for c in run.curve],
            "curve_at": list(run.curve_at),
            "restarts": run.restarts,
            "active": run.active[problem : problem + 1].clone(),
            "parked": None
            if run.parked is None
            else {k: v[full].clone() for k, v in run.parked.items()},
            "plateau": dict(run.plateau),
            "restart_iterations": run.restart_iterations,
            # candidate stages' best so far (GIFD); absent for every other method
            **_kept(run, full),
        }

    return export


def _kept(run: Run, full: slice) -> dict[str, Any]:
    if run.kept is None:
        return {}
    return {"kept": {k: v[full].clone() for k, v in run.kept.items()}}


def select_rows(obj: Any, index: Tensor, rows: int) -> Any:
    """A copy of an optimiser state dict keeping rows `index` of every per-row tensor (those
    whose first dimension is `rows`); scalars such as Adam's step are copied whole."""
    if isinstance(obj, Tensor):
        if obj.dim() > 0 and obj.shape[0] == rows:
            return obj.detach()[index.to(obj.device)].clone()
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: select_rows(v, index, rows) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(select_rows(v, index, rows) for v in obj)
    return obj


def pack_sched(sd: dict[str, Any]) -> dict[str, Any]:
    # MultiStepLR keeps its milestones in a Counter, which weights_only loading refuses.
    return {**sd, "milestones": dict(sd["milestones"])}


def unpack_sched(sd: dict[str, Any]) -> dict[str, Any]:
    return {**sd, "milestones": collections.Counter(sd["milestones"])}


def restore(run: Run, state: dict[str, Any]) -> tuple[int, int, Variables]:
    """Set `run`'s curve, rows and pruning/plateau state from an exported single-problem state;
    returns the stage, iteration and variables to continue from."""
    first, start_it, variables = state["stage"], state["iteration"], state["variables"]
    run.curve, run.curve_at = list(state["curve"]), list(state["curve_at"])
    rows = int(next(iter(variables.values())).shape[0])
    run.restarts = int(state.get("restarts", rows))
    default_active = torch.arange(run.restarts).expand(run.problems, -1).clone()
    run.active = state.get("active", default_active)
    run.parked = state.get("parked")
    run.plateau = dict(state.get("plateau", run.plateau))
    run.kept = state.get("kept")  # candidate stages' best images so far (GIFD)
    done = sum(s.iterations for s in run.stages[:first]) + start_it
    run.restart_iterations = int(state.get("restart_iterations", done * rows))
    return first, start_it, variables


def interrupted(
    run: Run, index: int, it: int, variables: Variables, opt: Optimiser, sched: Scheduler
) -> list[AttackResult]:
    """One "interrupted" result per problem, each carrying its state to resume from before
    iteration `it` of stage `index`."""
    with torch.no_grad():
        images = run.stages[index].render(run.assemble(variables)).detach()
    done = sum(s.iterations for s in run.stages[:index]) + it
    results = []
    for p, sl in enumerate(run.slices()):
        empty = torch.full((run.restarts,), torch.nan)
        curve = torch.stack(run.curve)[:, sl].cpu() if run.curve else empty[None]
        results.append(
            AttackResult(
                images=images[sl][0],
                restart_images=images[sl],
                restart_costs=empty,
                best_restart=-1,
                loss_curve=curve,
                curve_iterations=torch.tensor(run.curve_at),
                status="interrupted",
                iterations=done,
                state=exporter(run, index, it, variables, opt, sched, p)(),
                extras={"restart_iterations": run.restart_iterations},
            )
        )
    return results
