"""GI-z/w = GIAS (Jeon et al. 2021, Alg. 1): search the latent z of a pretrained generator,
then give each image its own copy w_j of the generator and search the w_j with z fixed.
With `bn > 0` it is GI-z/w+BN."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gi_core.attacks.engine import (
    AttackResult,
    InversionProblem,
    Progress,
    StagesCall,
    _check,
    solve,
)
from gi_core.attacks.prior import (
    LatentConfig,
    latent_stage,
    latents_for,
    per_image_stage,
    require_generator,
)
from gi_core.generators import Generator


@dataclass(frozen=True)
class GIASConfig(LatentConfig):
    w_iterations: int = 4000
    w_lr: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.w_iterations >= 1, "w_iterations", "must be >= 1", self.w_iterations)
        _check(self.w_lr > 0, "w_lr", "must be > 0", self.w_lr)


def describe(
    problem: InversionProblem,
    config: GIASConfig | None = None,
    *,
    seed: int = 0,
    generator: Generator | None = None,
    init: Tensor | None = None,
    state: dict[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> StagesCall:
    """Alg. 1's two stages (z, then the per-image w_j); `init` (R, B, d) overrides the random
    latents of the first stage."""
    config = config or GIASConfig()
    gen = require_generator(generator, "gi-z/w")
    z = latents_for(gen, problem, config, seed=seed, init=init)
    stages = [
        latent_stage(gen, config),
        per_image_stage(
            gen, name="w", iterations=config.w_iterations, lr=config.w_lr, colour=config.colour
        ),
    ]
    return StagesCall(stages, problem, config, {"z": z}, state, progress, should_stop)


def reconstruct(
    problem: InversionProblem, config: GIASConfig | None = None, **kwargs: Any
) -> AttackResult:
    """GIAS solved alone (arguments as `describe`)."""
    return solve(describe(problem, config, **kwargs))
