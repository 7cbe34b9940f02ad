"""GI-z/x: search the latent z, then search pixels starting from G(z) (Jeon et al. 2021,
Table 1's "z then x" column). Pixels use the box [0, 1] projection; under a gray colour model
they are one luminance channel started from G(z)'s luminance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gi_core.attacks.colour import luma, render_pixels
from gi_core.attacks.engine import (
    AttackResult,
    InversionProblem,
    Progress,
    Stage,
    StagesCall,
    Variables,
    _check,
    solve,
)
from gi_core.attacks.prior import (
    LatentConfig,
    latent_stage,
    latents_for,
    render_latents,
    require_generator,
)
from gi_core.generators import Generator


@dataclass(frozen=True)
class GIZXConfig(LatentConfig):
    x_iterations: int = 4000
    x_lr: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.x_iterations >= 1, "x_iterations", "must be >= 1", self.x_iterations)
        _check(self.x_lr > 0, "x_lr", "must be > 0", self.x_lr)


def pixels_from_latents(gen: Generator, config: GIZXConfig) -> Stage:
    """The pixel stage, started from G(z) (its luminance under gray), boxed to [0, 1]."""

    def from_latents(v: Variables) -> Variables:
        with torch.no_grad():
            images = render_latents(gen, v["z"])
            return {"x": luma(images) if config.colour == "gray" else images}

    def box(v: Variables) -> None:
        v["x"].clamp_(0.0, 1.0)

    return Stage(
        "x",
        config.x_iterations,
        config.x_lr,
        ("x",),
        render=lambda v: render_pixels(v["x"], config.colour),
        start=from_latents,
        project=box,
    )


def describe(
    problem: InversionProblem,
    config: GIZXConfig | None = None,
    *,
    seed: int = 0,
    generator: Generator | None = None,
    init: Tensor | None = None,
    state: dict[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> StagesCall:
    """The latent stage, then a pixel stage started from G(z); `init` (R, B, d) overrides the
    random latents."""
    config = config or GIZXConfig()
    gen = require_generator(generator, "gi-z/x")
    z = latents_for(gen, problem, config, seed=seed, init=init)
    stages = [latent_stage(gen, config), pixels_from_latents(gen, config)]
    return StagesCall(stages, problem, config, {"z": z}, state, progress, should_stop)


def reconstruct(
    problem: InversionProblem, config: GIZXConfig | None = None, **kwargs: Any
) -> AttackResult:
    """GI-z/x solved alone (arguments as `describe`)."""
    return solve(describe(problem, config, **kwargs))
