"""A short calibration for `gi-eval plan`: seconds per iteration of each method, measured on
the first gradient cell of the grid with 3 iterations per stage (in memory, nothing stored)."""

from __future__ import annotations

import dataclasses
import time

from gi_core.attacks import InversionProblem, reconstruct
from gi_core.datasets import load_images
from gi_core.gradients import client_gradient
from tasks.cells import InversionCell, Plan
from tasks.work import generator_for, victim_for

STEPS = 3


def seconds_per_iteration(plan: Plan) -> dict[str, float]:
    timings: dict[str, float] = {}
    for cell in plan.inversion_cells:
        if cell.method not in timings:
            timings[cell.method] = _time_cell(cell)
    return timings


def _time_cell(cell: InversionCell) -> float:
    g = cell.gradient
    images, labels = load_images(g.dataset, g.indices, image_size=g.image_size)
    victim = victim_for(g)
    device = next(victim.parameters()).device
    images, labels = images.to(device), labels.to(device)
    problem = InversionProblem(
        victim, client_gradient(victim, images, labels), labels, tuple(images.shape[1:])
    )  # type: ignore[arg-type]
    short = {
        f.name: STEPS for f in dataclasses.fields(cell.config) if f.name.endswith("iterations")
    }
    config = dataclasses.replace(cell.config, **short, bn=0.0)  # type: ignore[type-var]
    start = time.perf_counter()
    reconstruct(cell.method, problem, config, seed=0, generator=generator_for(cell))
    return (time.perf_counter() - start) / (STEPS * len(short))
