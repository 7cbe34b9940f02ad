"""Solving stage descriptions: one attack alone (`solve`), several of one layout together
(`solve_batch`, rows = P problems × R restarts), or stages under a cost the caller builds
(`optimise`, e.g. multi-gradient inversion)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from gi_core.attacks.engine.cost import choose_path, make_batch_cost
from gi_core.attacks.engine.loop import Run
from gi_core.attacks.engine.types import (
    AttackResult,
    BaseConfig,
    CostFn,
    InversionProblem,
    Progress,
    Stage,
    StagesCall,
    Variables,
)


def solve(call: StagesCall, *, path: str = "auto") -> AttackResult:
    """One attack's stages under the cost of its problem; resumes `call.state` when set."""
    return solve_batch([call], path=path)[0]


def run_stages(
    stages: Sequence[Stage],
    problem: InversionProblem,
    config: BaseConfig,
    initial: Variables,
    *,
    state: dict[str, Any] | None,
    progress: Callable[[Progress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> AttackResult:
    """`solve` of the description these arguments make (for attacks without a `describe`)."""
    return solve(StagesCall(stages, problem, config, initial, state, progress, should_stop))


def solve_batch(calls: Sequence[StagesCall], *, path: str = "auto") -> list[AttackResult]:
    """Solve calls with identical stages and config together (rows = P problems × R restarts);
    one result per call, equal to solving it alone within float tolerance. A single call with
    a `state` resumes it."""
    first = calls[0]
    problems = [c.problem for c in calls]
    config = first.config
    chosen = choose_path(problems, config.restarts, path)
    run = Run(
        first.stages,
        make_batch_cost(problems, config, path=chosen),
        config,
        problems=len(calls),
        progress=[c.progress for c in calls],
        should_stop=[c.should_stop for c in calls],
    )
    initial = {k: torch.cat([c.initial[k] for c in calls]) for k in first.initial}
    results = run.execute(initial, first.state if len(calls) == 1 else None)
    for r in results:
        r.extras["path"] = chosen
    return results


def optimise(
    stages: Sequence[Stage],
    cost: CostFn,
    initial: Variables,
    *,
    curve_every: int,
    state: dict[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    signed_grad: bool = False,
) -> AttackResult:
    """Run `stages` in order from `initial` (or from an exported `state`) with a given cost."""
    config = BaseConfig(restarts=1, curve_every=curve_every, signed_grad=signed_grad)
    run = Run(stages, cost, config, problems=1, progress=[progress], should_stop=[should_stop])
    return run.execute(initial, state)[0]
