"""GIFD (Fang et al., ICCV 2023, "GIFD: A Generative Gradient Inversion Method with Feature
Domain Optimization"): a GIAS-like latent search, then the intermediate feature maps of the
generator, layer by layer (Sec. 3.2): stage k optimises the output f_k of the generator's
first k blocks, started from what the previous stage ends with, and renders through the
remaining blocks. After each step f_k is projected onto the l1 ball of radius r_k around its
start (Eq. 6, r_k = r_1 + (k − 1)·Δr), which keeps the image in the generator's range. The
result is the best stage end, latent stage included, by the attack's own cost (Sec. 3.3, the
official code's `choose_optimal` per layer): the engine's `candidate` stages, never the
ground truth.

Variables (restart axis first): z (R, B, d); in feature stage k, "f" (R, B, C_k, H_k, W_k) and
its start "f0" (not trained). The ball is per image (the official code projects the batch's
feature tensor as one vector; it attacks B = 1). Needs a prior with a block trunk (the DCGAN
kinds); a StyleGAN2 prior is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gi_core.attacks.colour import project
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
from gi_core.attacks.prior import LatentConfig, latent_stage, latents_for, require_generator
from gi_core.errors import ConfigError
from gi_core.generators import Generator


@dataclass(frozen=True)
class GIFDConfig(LatentConfig):
    """The official configs (configs_stylegan2.yml): 1000 latent iterations and 1000 per
    feature layer for K = 4 layers, learning rate 0.1 everywhere, 4 restarts, TV 1e-4, radii
    r_1 = 2000, Δr = 1000. `f_iterations` is the feature stages' total, split evenly over the
    `layers` stages (the first ones take the remainder), so budgets scale it as one stage."""

    z_iterations: int = 1000
    z_lr: float = 0.1
    f_iterations: int = 4000
    f_lr: float = 0.1
    layers: int = 4
    radius: float = 2000.0
    radius_step: float = 1000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.layers >= 1, "layers", "must be >= 1", self.layers)
        _check(
            self.f_iterations >= self.layers,
            "f_iterations",
            "must be >= layers (one iteration per feature stage at least)",
            self.f_iterations,
        )
        _check(self.f_lr > 0, "f_lr", "must be > 0", self.f_lr)
        _check(self.radius > 0, "radius", "must be > 0", self.radius)
        _check(self.radius_step >= 0, "radius_step", "must be >= 0", self.radius_step)

    def layer_iterations(self) -> list[int]:
        share, extra = divmod(self.f_iterations, self.layers)
        return [share + (1 if k < extra else 0) for k in range(self.layers)]


def project_l1_ball(v: Tensor, radius: float) -> Tensor:
    """Euclidean projection of each row of v (N, D) onto {w : ‖w‖₁ ≤ radius} (Duchi et al.
    2008, Fig. 1: sort, find the threshold θ, soft-threshold); rows inside stay unchanged."""
    magnitude = v.abs()
    mu = magnitude.sort(dim=1, descending=True).values
    excess = mu.cumsum(dim=1) - radius
    index = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    rho = (mu - excess / index > 0).sum(dim=1, keepdim=True).clamp(min=1)  # a prefix holds
    theta = excess.gather(1, rho - 1) / rho.to(v.dtype)
    shrunk = v.sign() * (magnitude - theta).clamp(min=0)
    inside = magnitude.sum(dim=1, keepdim=True) <= radius
    return torch.where(inside, v, shrunk)


def feature_stage(
    gen: Generator, config: GIFDConfig, *, layer: int, iterations: int
) -> Stage:
    """Stage `layer` (1-based): search f_layer inside its l1 ball of radius r_layer (Eq. 6)."""
    radius = config.radius + (layer - 1) * config.radius_step

    def start(v: Variables) -> Variables:
        with torch.no_grad():
            if "f" in v:  # the previous feature stage's f_{layer-1}, through one more block
                f = _per_image(v["f"], lambda x: gen.next_features(x, layer - 1))
            else:
                f = _per_image(v["z"], lambda z: gen.features(z, layer))
        return {"z": v["z"], "f": f, "f0": f.clone()}

    def render(v: Variables) -> Tensor:
        return project(_per_image(v["f"], lambda f: gen.from_features(f, layer)), config.colour)

    def ball(v: Variables) -> None:
        deviation = (v["f"] - v["f0"]).flatten(2)
        rows = project_l1_ball(deviation.flatten(0, 1), radius).view_as(deviation)
        v["f"].copy_(v["f0"] + rows.view_as(v["f"]))

    return Stage(
        f"f{layer}",
        iterations,
        config.f_lr,
        ("f",),
        render=render,
        start=start,
        project=ball,
        candidate=True,
    )


def _per_image(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """fn over (R, B, ...) flattened to (R × B, ...) and back."""
    out = fn(x.flatten(0, 1))
    return out.unflatten(0, x.shape[:2])


def describe(
    problem: InversionProblem,
    config: GIFDConfig | None = None,
    *,
    seed: int = 0,
    generator: Generator | None = None,
    init: Tensor | None = None,
    state: dict[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> StagesCall:
    """The latent stage, then `layers` feature stages; every stage end is a candidate for the
    result. `init` (R, B, d) overrides the random latents."""
    config = config or GIFDConfig()
    gen = require_generator(generator, "gifd")
    if config.layers > gen.feature_layers:
        raise ConfigError(
            f"params.layers: gifd searches {config.layers} feature layers but the "
            f"{gen.kind} prior exposes {gen.feature_layers} (a DCGAN-kind prior has 4; "
            "StyleGAN2's feature domain is not implemented)"
        )
    z = latents_for(gen, problem, config, seed=seed, init=init)
    first = latent_stage(gen, config)
    stages = [Stage(first.name, first.iterations, first.lr, first.trainable, first.render,
                    candidate=True)]  # fmt: skip
    stages += [
        feature_stage(gen, config, layer=k + 1, iterations=n)
        for k, n in enumerate(config.layer_iterations())
    ]
    return StagesCall(stages, problem, config, {"z": z}, state, progress, should_stop)


def reconstruct(
    problem: InversionProblem, config: GIFDConfig | None = None, **kwargs: Any
) -> AttackResult:
    """GIFD solved alone (arguments as `describe`)."""
    return solve(describe(problem, config, **kwargs))
