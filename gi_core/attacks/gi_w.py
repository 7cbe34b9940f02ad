"""GI-w: search the parameters of an untrained generator, one copy per image, with its
random latents fixed (Jeon et al. 2021, the "w only" ablation of Table 1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gi_core.attacks.engine import (
    AttackResult,
    BaseConfig,
    InversionProblem,
    Progress,
    StagesCall,
    _check,
    solve,
)
from gi_core.attacks.prior import (
    latents_for,
    per_image_stage,
    require_generator,
    untrained_copy,
)
from gi_core.generators import Generator

STARTS = ("untrained", "given")


@dataclass(frozen=True)
class GIWConfig(BaseConfig):
    w_iterations: int = 4000
    w_lr: float = 1e-3
    start: str = "untrained"  # "given" searches from the generator as passed (e.g. pretrained)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.w_iterations >= 1, "w_iterations", "must be >= 1", self.w_iterations)
        _check(self.w_lr > 0, "w_lr", "must be > 0", self.w_lr)
        _check(self.start in STARTS, "start", f"must be one of {STARTS}", self.start)


def describe(
    problem: InversionProblem,
    config: GIWConfig | None = None,
    *,
    seed: int = 0,
    generator: Generator | None = None,
    init: Tensor | None = None,
    state: dict[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> StagesCall:
    """The generator-parameter search as one stage; `init` (R, B, d) overrides the fixed
    random latents."""
    config = config or GIWConfig()
    gen = require_generator(generator, "gi-w")
    if config.start == "untrained":
        gen = untrained_copy(gen, seed=seed)
    z = latents_for(gen, problem, config, seed=seed, init=init)
    stage = per_image_stage(
        gen, name="w", iterations=config.w_iterations, lr=config.w_lr, colour=config.colour
    )
    return StagesCall([stage], problem, config, {"z": z}, state, progress, should_stop)


def reconstruct(
    problem: InversionProblem, config: GIWConfig | None = None, **kwargs: Any
) -> AttackResult:
    """GI-w solved alone (arguments as `describe`)."""
    return solve(describe(problem, config, **kwargs))
