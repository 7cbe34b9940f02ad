"""GI-x: search the pixels x directly (Geiping et al. 2020, "Inverting Gradients"); with
`bn > 0` it is GI-x+BN (Yin et al. 2021, "See through Gradients").

Parametrisation: `box` (default, as Geiping et al.) optimises x itself and projects it onto
[0, 1] after every step; `sigmoid` optimises an unconstrained u with x = sigmoid(u).
With `colour: gray` x has ONE channel, broadcast to the victim's three (attacks.colour).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gi_core.attacks.colour import pixels, render_pixels
from gi_core.attacks.engine import (
    AttackResult,
    BaseConfig,
    InversionProblem,
    Progress,
    Stage,
    StagesCall,
    Variables,
    _check,
    solve,
)

PARAMETRISATIONS = ("box", "sigmoid")


@dataclass(frozen=True)
class GIXConfig(BaseConfig):
    iterations: int = 4000
    lr: float = 0.1
    parametrisation: str = "box"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.iterations >= 1, "iterations", "must be >= 1", self.iterations)
        _check(self.lr > 0, "lr", "must be > 0", self.lr)
        _check(
            self.parametrisation in PARAMETRISATIONS,
            "parametrisation",
            f"must be one of {PARAMETRISATIONS}",
            self.parametrisation,
        )


def initial_images(
    problem: InversionProblem,
    *,
    restarts: int,
    seed: int,
    device: torch.device | None = None,
    colour: str = "rgb",
) -> Tensor:
    """(R, B, C, H, W) uniform in [0, 1], drawn on the CPU (a seed means the same anywhere);
    C = 1 under a gray colour model."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = problem.image_shape
    shape = (restarts, problem.batch_size, 1 if colour == "gray" else c, h, w)
    return torch.rand(shape, generator=gen).to(device or problem.labels.device)


def pixel_stage(config: GIXConfig, *, name: str = "x", iterations: int | None = None) -> Stage:
    """A stage that optimises pixels, in the configured parametrisation."""
    if config.parametrisation == "sigmoid":
        return Stage(
            name,
            iterations or config.iterations,
            config.lr,
            ("u",),
            render=lambda v: render_pixels(torch.sigmoid(v["u"]), config.colour),
            start=lambda v: {"u": torch.logit(v["x"].clamp(1e-4, 1 - 1e-4))},
        )

    def box(v: Variables) -> None:
        v["x"].clamp_(0.0, 1.0)

    return Stage(
        name,
        iterations or config.iterations,
        config.lr,
        ("x",),
        render=lambda v: render_pixels(v["x"], config.colour),
        project=box,
    )


def describe(
    problem: InversionProblem,
    config: GIXConfig | None = None,
    *,
    seed: int = 0,
    init: Tensor | None = None,
    state: dict[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    **_: Any,
) -> StagesCall:
    """The pixel search of the batch as one stage; `init` (R, B, C, H, W) overrides the random
    start (an RGB init of a gray attack starts from its luminance)."""
    config = config or GIXConfig()
    if init is None:
        init = initial_images(problem, restarts=config.restarts, seed=seed, colour=config.colour)
    initial = {"x": pixels(init, config.colour)}
    return StagesCall([pixel_stage(config)], problem, config, initial, state, progress, should_stop)


def reconstruct(
    problem: InversionProblem, config: GIXConfig | None = None, **kwargs: Any
) -> AttackResult:
    """Reconstruct the batch by pixel search (arguments as `describe`)."""
    return solve(describe(problem, config, **kwargs))
