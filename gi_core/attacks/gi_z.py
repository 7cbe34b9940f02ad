"""GI-z: search the latent z of a pretrained generator (Jeon et al. 2021, Sec. 3);
with `bn > 0` it is GI-z+BN."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gi_core.attacks.engine import AttackResult, InversionProblem, Progress, make_cost, optimise
from gi_core.attacks.prior import LatentConfig, initial_latents, latent_stage, require_generator
from gi_core.generators import Generator


@dataclass(frozen=True)
class GIZConfig(LatentConfig):
    pass


def reconstruct(
    problem: InversionProblem,
    config: GIZConfig | None = None,
    *,
    seed: int = 0,
    generator: Generator | None = None,
    init: Tensor | None = None,
    state: dict[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AttackResult:
    """`init` (R, B, d) overrides the random latents."""
    config = config or GIZConfig()
    gen = require_generator(generator, "gi-z")
    z = (
        init
        if init is not None
        else initial_latents(gen, problem, restarts=config.restarts, seed=seed)
    )
    return optimise(
        [latent_stage(gen, config)],
        make_cost(problem, config),
        {"z": z},
        curve_every=config.curve_every,
        state=state,
        progress=progress,
        should_stop=should_stop,
    )
