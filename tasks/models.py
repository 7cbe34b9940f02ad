"""The one place a spec becomes a model: the victim of a `VictimSpec`, the prior of a
`GeneratorSpec` (issue 17). Grids, GIML, multigrad, preflight and the memory check all build
through here, so a spec field (e.g. `victim.normalize`) is honoured everywhere or nowhere.

Models are built on the CPU from the spec alone; callers move them to their device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from gi_core.generators import Generator, build_generator, load_generator_checkpoint
from gi_core.stylegan2 import build_stylegan2
from gi_core.victims import build_victim
from tasks.spec import GeneratorSpec, VictimSpec


def victim_model(
    spec: VictimSpec,
    *,
    num_classes: int,
    image_size: int,
    weights: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """θ of the attacked client: the spec's architecture, seed, checkpoint and normalisation.

    `weights` (a state_dict) replace the seed's or checkpoint's: a trained victim's stored
    weights (tasks.work.training). Without them a spec with `train` gives the victim *before*
    training, which is what training starts from and what shape-only callers need."""
    state = weights
    if state is None and spec.checkpoint:
        state = torch.load(spec.checkpoint, map_location="cpu", weights_only=True)
    extra = {"width": spec.width} if spec.width is not None else {}
    return build_victim(
        spec.arch,
        num_classes=num_classes,
        image_size=image_size,
        seed=spec.seed,
        state_dict=state,
        normalize=spec.normalisation(),
        **extra,
    )


def generator_model(spec: GeneratorSpec, *, output_size: int) -> Generator:
    """The prior of the spec: a random-init StyleGAN2 architecture, or a kind with its weights."""
    if spec.kind == "stylegan2" and spec.stylegan2 is not None:
        arch = spec.stylegan2
        return build_stylegan2(
            arch.config(),
            output_size=output_size,
            options=spec.stylegan2_options(),
            seed=arch.seed,
        )
    state = load_generator_checkpoint(spec.checkpoint) if spec.checkpoint else None
    options = spec.stylegan2_options() if spec.kind == "stylegan2" else None
    return build_generator(spec.kind, output_size=output_size, state_dict=state, options=options)
