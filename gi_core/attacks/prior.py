"""Stages shared by the generative-prior attacks (GI-z, GI-w, GI-z/w, GI-z/x).

Variables carry the restart axis first: latents z are (R, B, d); per-image generator copies
w_j are stored per parameter as "w.<name>" with shape (R, B, *param.shape), so one vmapped
functional call renders every image of every restart with its own generator.

Under a gray colour model (attacks.colour) every rendered image is projected to its BT.601
luminance before the victim sees it: the prior keeps rendering colour, the attack sees gray.

Generators run in eval mode (BN uses its running statistics): each copy renders one image, and
a train-mode BN over a batch of one would be degenerate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from gi_core.attacks.colour import project
from gi_core.attacks.engine import BaseConfig, InversionProblem, Stage, Variables, _check
from gi_core.errors import ConfigError
from gi_core.generators import Generator


@dataclass(frozen=True)
class LatentConfig(BaseConfig):
    """Latent-search stage: η_z = 3e-2 (the paper's appendix)."""

    z_iterations: int = 4000
    z_lr: float = 3e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.z_iterations >= 1, "z_iterations", "must be >= 1", self.z_iterations)
        _check(self.z_lr > 0, "z_lr", "must be > 0", self.z_lr)


def require_generator(generator: Generator | None, method: str) -> Generator:
    if generator is None:
        raise ConfigError(f"generator: {method} needs a generative prior (set `generator:`)")
    return generator.eval()


def initial_latents(
    generator: Generator, problem: InversionProblem, *, restarts: int, seed: int
) -> Tensor:
    """(R, B, d) standard-normal latents from a CPU torch.Generator seeded by `seed`."""
    rng = torch.Generator().manual_seed(seed)
    return generator.sample_latents(restarts, problem.batch_size, generator=rng)


def latents_for(
    generator: Generator,
    problem: InversionProblem,
    config: BaseConfig,
    *,
    seed: int,
    init: Tensor | None,
) -> Tensor:
    """`init` (R, B, d) when given, else seeded random latents for every restart."""
    if init is not None:
        return init
    return initial_latents(generator, problem, restarts=config.restarts, seed=seed)


def render_latents(generator: Generator, z: Tensor, colour: str = "rgb") -> Tensor:
    """G(z) for z (R, B, d) -> images (R, B, C, H, W) in [0, 1], one shared generator,
    projected to `colour`."""
    images = generator(z.flatten(0, 1))
    return project(images.unflatten(0, z.shape[:2]), colour)


def latent_stage(generator: Generator, config: LatentConfig) -> Stage:
    return Stage(
        "z",
        config.z_iterations,
        config.z_lr,
        ("z",),
        render=lambda v: render_latents(generator, v["z"], config.colour),
    )


def per_image_stage(
    generator: Generator, *, name: str, iterations: int, lr: float, colour: str = "rgb"
) -> Stage:
    """Search a copy w_j of the generator per image (z fixed): GIAS's second stage, GI-w;
    images projected to `colour`."""
    names = [n for n, _ in generator.named_parameters()]
    buffers = {n: b.detach() for n, b in generator.named_buffers()}
    weights = {n: p.detach() for n, p in generator.named_parameters()}

    def one(w: dict[str, Tensor], z: Tensor) -> Tensor:  # w: one copy, z: (d,)
        return functional_call(generator, {**w, **buffers}, (z[None],))[0]

    def render(v: Variables) -> Tensor:
        z = v["z"]
        w = {n: v["w." + n].flatten(0, 1) for n in names}
        # randomness="different": a prior that draws noise per forward (StyleGAN2 `noise:
        # random`) gets independent noise per copy; deterministic priors draw nothing.
        images = vmap(one, randomness="different")(w, z.flatten(0, 1))
        return project(images.unflatten(0, z.shape[:2]), colour)

    def start(v: Variables) -> Variables:
        r, b = v["z"].shape[:2]
        copies = {"w." + n: weights[n].expand(r, b, *weights[n].shape).clone() for n in names}
        return {"z": v["z"], **copies}

    return Stage(name, iterations, lr, tuple("w." + n for n in names), render=render, start=start)


def untrained_copy(generator: Generator, *, seed: int) -> Generator:
    """The same architecture, freshly initialised from `seed` (GI-w's unsearched start): DCGAN
    init + BN calibration for DCGAN priors, StyleGAN2's own init for StyleGAN2."""
    fresh = copy.deepcopy(generator)
    fresh.initialise_(generator=torch.Generator().manual_seed(seed))
    return fresh.eval()
