"""GI-z: search the latent z of a pretrained generator (Jeon et al. 2021, Sec. 3);
with `bn > 0` it is GI-z+BN."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gi_core.attacks.engine import AttackResult, InversionProblem, Progress, StagesCall, solve
from gi_core.attacks.prior import LatentConfig, latent_stage, latents_for, require_generator
from gi_core.generators import Generator


@dataclass(frozen=True)
class GIZConfig(LatentConfig):
    pass


def describe(
    problem: InversionProblem,
    config: GIZConfig | None = None,
    *,
    seed: int = 0,
    generator: Generator | None = None,
    init: Tensor | None = None,
    state: dict[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> StagesCall:
    """The latent search as one stage; `init` (R, B, d) overrides the random latents."""
    config = config or GIZConfig()
    gen = require_generator(generator, "gi-z")
    z = latents_for(gen, problem, config, seed=seed, init=init)
    stages = [latent_stage(gen, config)]
    return StagesCall(stages, problem, config, {"z": z}, state, progress, should_stop)


def reconstruct(
    problem: InversionProblem, config: GIZConfig | None = None, **kwargs: Any
) -> AttackResult:
    """GI-z solved alone (arguments as `describe`)."""
    return solve(describe(problem, config, **kwargs))
