"""Peak memory of one inversion cell, estimated from parameter counts before anything runs.

Used by `gi-eval plan` (shown) and `gi-eval run` (refused when a cell cannot fit the job's
memory, exit 2). A rough upper estimate in float32 bytes, per stage, the largest stage wins:

* victim: its weights, plus per restart the parameter gradient and the gradient of that
  gradient (the cost differentiates ∇θ ℓ): P_v (1 + 2R); activations of the double backward:
  3 R B A_v, A_v = the victim's activation elements per image (counted on the meta device).
* generator: its weights P_g; a per-image stage (GI-w, GI-z/w) holds R B copies of the
  searched parameters with their gradient and Adam's two moments: 4 R B P_s; activations of
  rendering R B images with autograd and their gradients: 3 R B A_g.
* pixels / latents: 4 (value, gradient, two moments) R B x their size; negligible.
* a fixed 1.5 GiB for the interpreter, torch, LPIPS and the loaded data.

The per-image copies dominate for a StyleGAN2 prior: at 64 px (~24 M synthesis parameters),
R = 4 and B = 4 they alone are 4 x 16 x 24 M x 4 B ~ 6 GiB.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gi_core.datasets import dataset_info
from gi_core.errors import ConfigError
from gi_core.generators import LATENT_DIM, dcgan32, dcgan64
from gi_core.stylegan2 import StyleGAN2Config, load_stylegan2_checkpoint, parameter_counts
from gi_core.victims import build_victim
from tasks.cells import InversionCell
from tasks.resources import MEM_BASE_GB, MEM_HEADROOM, MEM_MIN_GB
from tasks.spec import GeneratorSpec, GridSpec, VictimSpec

BASE_BYTES = int(1.5 * 2**30)
FLOAT = 4
_PER_IMAGE = ("gi-w", "gi-z/w", "gi-z/w+bn")


@dataclass(frozen=True)
class MemoryEstimate:
    cell_id: str
    method: str
    bytes: int

    @property
    def gib(self) -> float:
        return self.bytes / 2**30


def estimate_cell(cell: InversionCell) -> MemoryEstimate:
    g = cell.gradient
    restarts, batch = int(getattr(cell.config, "restarts", 1)), g.batch_size
    p_v, a_v = _victim_size(g.victim, g.dataset, g.image_size)
    total = BASE_BYTES + FLOAT * (p_v * (1 + 2 * restarts) + 3 * restarts * batch * a_v)
    total += FLOAT * 4 * restarts * batch * 3 * g.image_size**2  # pixels / rendered images
    if cell.generator is not None:
        p_all, p_searched, a_g = _generator_size(cell.generator, g.image_size)
        copies = 4 * restarts * batch * p_searched if cell.method in _PER_IMAGE else 0
        total += FLOAT * (p_all + copies + 3 * restarts * batch * a_g)
    return MemoryEstimate(cell.id, cell.method, int(total))


def job_memory_limit(spec: GridSpec, executor: str) -> int | None:
    """Bytes one job may use: slurm.mem_gb for CPU Slurm jobs, the machine's RAM for local and
    inline runs; None for GPU jobs (the spec does not state the device memory)."""
    if executor == "slurm":
        slurm = spec.execution.slurm
        return None if slurm.gpus_per_task > 0 else int(slurm.mem_gb * 2**30)
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return int(pages * size)


def memory_problems(spec: GridSpec, cells: Sequence[InversionCell], *, executor: str) -> list[str]:
    """One line per (method, generator) whose largest cell does not fit its job's limit."""
    if not cells:
        return []
    worst: dict[tuple[str, str], tuple[MemoryEstimate, InversionCell]] = {}
    for cell in cells:
        est = estimate_cell(cell)
        key = (cell.method, cell.generator.kind if cell.generator else "-")
        if key not in worst or est.bytes > worst[key][0].bytes:
            worst[key] = (est, cell)
    problems = []
    for (method, _), (est, cell) in sorted(worst.items()):
        limit, where = cell_memory_limit(spec, cell, executor)
        if limit is not None and est.bytes > limit:
            problems.append(
                f"methods: {method} needs ~{est.gib:.1f} GiB per cell (estimate from parameter "
                f"counts, docs/paper-scale.md), more than {where} ({limit / 2**30:.1f} GiB); "
                "lower restarts or batch_sizes, raise mem_gb, or run on GPUs"
            )
    return problems


def cell_memory_limit(
    spec: GridSpec, cell: InversionCell, executor: str
) -> tuple[int | None, str]:
    """(bytes the job of `cell` may use, where that limit is set). On Slurm: the cell's
    execution.slurm.methods override (tasks.resources), else an explicit execution.slurm.mem_gb;
    None for GPU jobs and for memory sized from this very estimate (it fits by construction)."""
    if executor != "slurm":
        return job_memory_limit(spec, executor), "this machine's memory"
    from tasks.resources import method_resources

    slurm = spec.execution.slurm
    key, over = method_resources(slurm, cell)
    gpus = slurm.gpus_per_task if over.gpus_per_task is None else over.gpus_per_task
    if gpus > 0:
        return None, "GPU jobs"
    if over.mem_gb is not None:
        return int(over.mem_gb * 2**30), f"execution.slurm.methods.{key}.mem_gb"
    if "mem_gb" in slurm.model_fields_set:
        return int(slurm.mem_gb * 2**30), "execution.slurm.mem_gb"
    return None, "memory sized from the estimate"


def check_memory(spec: GridSpec, cells: Sequence[InversionCell], *, executor: str) -> None:
    problems = memory_problems(spec, cells, executor=executor)
    if problems:
        raise ConfigError("\n".join(problems))


# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _victim_size(victim: VictimSpec, dataset: str, image_size: int) -> tuple[int, int]:
    """(parameters, activation elements per image), built and run on the meta device."""
    classes = dataset_info(dataset, image_size=image_size).num_classes
    extra: dict[str, Any] = {"width": victim.width} if victim.width is not None else {}
    with torch.device("meta"):
        model = build_victim(
            victim.arch, num_classes=classes, image_size=image_size, seed=None, **extra
        )
        params = sum(p.numel() for p in model.parameters())
        acts = _activations(model, torch.empty(1, 3, image_size, image_size))
    return params, acts


def _activations(model: nn.Module, x: torch.Tensor) -> int:
    """Output elements of every leaf module for one input (what autograd keeps, roughly)."""
    counted = [0]

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            counted[0] += out.numel()

    model.eval()  # BN in train mode refuses one image with 1x1 maps (ResNet at 32 px)
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return counted[0]


@functools.lru_cache(maxsize=16)
def _generator_size(spec: GeneratorSpec, image_size: int) -> tuple[int, int, int]:
    """(all parameters incl. frozen mapping, searched parameters, activations per image)."""
    if spec.kind == "stylegan2":
        config = _stylegan2_config(spec)
        mapping, synthesis = parameter_counts(config)
        return mapping + synthesis, synthesis, _stylegan2_activations(config)
    # the bare architecture: build_generator would also load weights or calibrate BN, which
    # cannot run on the meta device (Tensor.item() / copies into meta parameters)
    main = dcgan32 if spec.kind == "dcgan32" else dcgan64
    with torch.device("meta"):
        trunk = main()
        params = sum(p.numel() for p in trunk.parameters())
        acts = _activations(trunk, torch.empty(1, LATENT_DIM, 1, 1))
    return params, params, acts


def _stylegan2_config(spec: GeneratorSpec) -> StyleGAN2Config:
    if spec.stylegan2 is not None:
        return spec.stylegan2.config()
    assert spec.checkpoint is not None  # the spec requires one of the two
    config, _ = load_stylegan2_checkpoint(spec.checkpoint)
    return config


def _stylegan2_activations(config: StyleGAN2Config) -> int:
    # per 3x3 layer ~6 maps of C x r x r kept for backward (scaled input, conv, blur, noise,
    # bias + lrelu, demodulation), torgb and the skip ~4 x 3 x r x r per block
    total = 0
    for i, channels in enumerate(config.channels):
        r = 4 * 2**i
        layers = 1 if i == 0 else 2
        total += layers * 6 * channels * r * r + 4 * 3 * r * r
    return int(math.ceil(total))


def memory_lines(
    spec: GridSpec, cells: Sequence[InversionCell], *, executor: str
) -> list[str]:
    """`gi-eval plan` lines: the largest per-cell estimate and the limit of a job of the
    resolved `executor` (planner.resolve_executor) it must fit."""
    if not cells:
        return []
    worst = max((estimate_cell(c) for c in cells), key=lambda e: e.bytes)
    limit = job_memory_limit(spec, executor)
    fits = "no job limit checked (GPU jobs)" if limit is None else f"limit {limit / 2**30:.1f} GiB"
    lines = [f"memory: up to ~{worst.gib:.1f} GiB per cell ({worst.method}); {fits}"]
    return lines + memory_problems(spec, cells, executor=executor)


def sized_mem_gb(cells: Sequence[InversionCell]) -> float | None:
    """Memory (GB) to request for a job of these cells: the largest estimate x headroom + base
    (tasks.resources' constants), at least MEM_MIN_GB."""
    if not cells:
        return None
    peak = max(estimate_cell(c).gib for c in cells)
    return float(max(MEM_MIN_GB, math.ceil(peak * MEM_HEADROOM + MEM_BASE_GB)))
