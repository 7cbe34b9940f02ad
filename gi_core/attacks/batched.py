"""Batched cells: several attacks of one method and config solved in one optimisation.

Every variable of the engine has a row dimension; P problems with R restarts each become
P × R rows (problem-major) with per-problem victim parameters, targets, labels, masks and BN
targets (vmap over problems on the `vmap` path, one row at a time on the `loop` path), and
stacked per-image generator copies for GI-z/w. Each problem's rows get the updates they would
get alone (Adam is elementwise), but not bit for bit: measured on CPU, the vmapped kernels block
over problems and round differently, and Adam amplifies that over a run (issue 20: up to 5.6 dB
PSNR on one image). Per-cell results equal each cell alone within float tolerance after a few
steps (tests/unit/test_batching.py); on the `loop` path they are bit-identical where the cell
alone also takes the loop path. So the pipeline does not use this module to solve cells
(docs/decisions/101): it is a library function for throughput experiments.

How: each attack's `describe` returns its stages, problem, config and initial variables (a
`StagesCall`, nothing optimised); `solve_together` checks that the descriptions share one layout
and hands them to `engine.solve_batch`. No global state: single cells never pass through here.

    from gi_core.attacks.batched import reconstruct_batch
    results = reconstruct_batch("gi-x", problems, config, seeds=[0, 1, 2])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gi_core.attacks.engine import (
    AttackResult,
    BaseConfig,
    InversionProblem,
    Progress,
    StagesCall,
    solve_batch,
)
from gi_core.attacks.registry import describer, describes
from gi_core.errors import ConfigError
from gi_core.generators import Generator


def batchable(method: str, config: BaseConfig) -> bool:
    """Whether cells of `method` can share one optimisation. GI-w from an untrained start
    draws its own generator per seed (a different render per cell); plateau stopping ends
    each cell at its own iteration. A method without `describe` (GGL) runs alone."""
    if not describes(method) or getattr(config, "plateau_window", 0) > 0:
        return False
    return not (method == "gi-w" and getattr(config, "start", "untrained") == "untrained")


def reconstruct_batch(
    method: str,
    problems: Sequence[InversionProblem],
    config: BaseConfig,
    *,
    seeds: Sequence[int],
    generator: Generator | None = None,
    progress: Sequence[Callable[[Progress], None] | None] | None = None,
    should_stop: Sequence[Callable[[], bool] | None] | None = None,
    path: str = "auto",
) -> list[AttackResult]:
    """`method` on every problem (seed per problem), solved together; one result per problem."""
    if not batchable(method, config):
        raise ConfigError(f"method: {method} with these params cannot be batched")
    describe = describer(method)
    n = len(problems)
    progress = progress or [None] * n
    should_stop = should_stop or [None] * n
    calls = [
        describe(
            problems[i],
            config,
            seed=seeds[i],
            generator=generator,
            progress=progress[i],
            should_stop=should_stop[i],
        )
        for i in range(n)
    ]
    return solve_together(calls, path=path)


def solve_together(calls: Sequence[StagesCall], *, path: str = "auto") -> list[AttackResult]:
    """Attack descriptions of one layout (e.g. several `describe` results of one method and
    config) solved as one batch; one result per description, in order."""
    _check_compatible(calls)
    return solve_batch(calls, path=path)


def _check_compatible(calls: Sequence[StagesCall]) -> None:
    """Same config, stage layout, image shape and victim architecture in every call."""
    first = calls[0]
    for c in calls[1:]:
        same = (
            c.config == first.config
            and _layout(c) == _layout(first)
            and c.problem.image_shape == first.problem.image_shape
            and c.problem.batch_size == first.problem.batch_size
            and _architecture(c.problem) == _architecture(first.problem)
            and c.state is None
        )
        if not same:
            raise ConfigError("cells of one batch must share method, params, shapes and victim")


def _layout(call: StagesCall) -> list[tuple[Any, ...]]:
    shapes = {k: tuple(v.shape[1:]) for k, v in call.initial.items()}
    stages = [(s.name, s.iterations, s.lr, s.trainable) for s in call.stages]
    return [*stages, tuple(sorted(shapes.items()))]


def _architecture(problem: InversionProblem) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in problem.victim.named_parameters()]
