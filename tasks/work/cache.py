"""The job process's device and its models: the victim and generator of a cell, built once
per process (tasks.models) and reused by every cell of the element; a trained victim's weights
come from its run (tasks.work.training).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from gi_core.datasets import dataset_info
from gi_core.generators import Generator
from gi_core.stylegan2 import StyleGAN2Generator
from gi_core.victims import victim_state, weights_sha256
from storage.layout import RunLayout
from tasks.cells import GeneratorSpec, GradientCell, InversionCell, VictimStage
from tasks.errors import ExecutionError
from tasks.models import generator_model, victim_model
from tasks.work.training import trained_state


def device() -> torch.device:
    """The one place that chooses a device: the GPU of the element when Slurm gave it one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def victim_for(cell: GradientCell, run: RunLayout | None = None) -> nn.Module:
    """The cell's victim on this job's device, built once per job (tasks.models): the spec's
    weights, or a trained victim's weights stored in `run` (trained there first when missing,
    tasks.work.training). `run` may be None only for an untrained victim."""
    return _victim(cell.victim_stage, _run_root(cell, run))[0]


def victim_sha256_for(cell: GradientCell, run: RunLayout | None = None) -> str:
    """sha256 of the weights `victim_for` gives (gi_core.victims.weights_sha256)."""
    return _victim(cell.victim_stage, _run_root(cell, run))[1]


def _run_root(cell: GradientCell, run: RunLayout | None) -> str | None:
    if cell.victim.train is None:
        return None  # untrained: the same weights in every run
    if run is None:
        raise ExecutionError(
            f"gradient cell {cell.id}: a victim after {cell.victim.rounds} rounds lives in "
            "its run directory; pass the run"
        )
    return str(run.root)


@functools.lru_cache(maxsize=8)
def _victim(stage: VictimStage, run_root: str | None) -> tuple[nn.Module, str]:
    """(victim on this job's device, sha256 of its weights): a trained stage's from its run,
    checked against their record there; an untrained one's hashed here."""
    classes = dataset_info(stage.dataset, image_size=stage.image_size).num_classes
    weights, sha = None, ""
    if run_root is not None:
        weights, sha = trained_state(RunLayout(Path(run_root)), stage, dev=device())
    model = victim_model(
        stage.victim, num_classes=classes, image_size=stage.image_size, weights=weights
    )
    return model.to(device()), sha or weights_sha256(victim_state(model))


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
