"""The job process's device and its models: the victim and generator of a cell, built once
per process (tasks.models) and reused by every cell of the element.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from gi_core.datasets import dataset_info
from gi_core.generators import Generator
from gi_core.stylegan2 import StyleGAN2Generator
from tasks.cells import GeneratorSpec, GradientCell, InversionCell
from tasks.models import generator_model, victim_model
from tasks.spec import VictimSpec


def device() -> torch.device:
    """The one place that chooses a device: the GPU of the element when Slurm gave it one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=8)
def _victim(spec: VictimSpec, num_classes: int, image_size: int) -> nn.Module:
    """The victim of `spec` on this job's device, built once per job (tasks.models)."""
    return victim_model(spec, num_classes=num_classes, image_size=image_size).to(device())


def victim_for(cell: GradientCell) -> nn.Module:
    classes = dataset_info(cell.dataset, image_size=cell.image_size).num_classes
    return _victim(cell.victim, classes, cell.image_size)


@functools.lru_cache(maxsize=4)
def _generator(spec: GeneratorSpec, output_size: int) -> Generator:
    """The prior of `spec` on this job's device, built once per job (tasks.models)."""
    return generator_model(spec, output_size=output_size).to(device())


def generator_for(cell: InversionCell) -> Generator | None:
    if cell.generator is None:
        return None
    gen = _generator(cell.generator, cell.gradient.image_size)
    if isinstance(gen, StyleGAN2Generator) and gen.options.noise == "fixed":
        # fixed noise maps are drawn from the cell's seed: a cell is deterministic on its own
        return _with_noise_seed(cell.generator, cell.gradient.image_size, cell.seed)
    return gen


@functools.lru_cache(maxsize=4)
def _with_noise_seed(spec: GeneratorSpec, output_size: int, seed: int) -> Generator:
    # One object per (prior, seed): cells of one seed share it (and its noise maps).
    gen = _generator(spec, output_size)
    assert isinstance(gen, StyleGAN2Generator)
    return gen.with_noise_seed(seed)
