"""Appendix D work (docs/giml.md): one cell = (T, setting, batch, seed) -> one JSON result.

<run>/grid.yaml                      the multigrad spec
<run>/multigrad/<cell id>.json       PSNR per image, final cost (atomic; presence = commit)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from gi_core.datasets import batch_indices, dataset_info, load_images
from gi_core.errors import ConfigError
from gi_core.metrics import psnr
from gi_core.multigrad import MultiGradConfig, observe, reconstruct
from storage.atomic import write_bytes_atomic
from storage.run import RunDir
from tasks.cells import cell_hash
from tasks.models import victim_model
from tasks.spec import DataSpec, ExecutionSpec, Ints, VictimSpec, _Model, untrained_only
from tasks.work import device


class MultiGradSpec(_Model):
    name: str
    data: DataSpec
    victim: VictimSpec
    batch_size: int = Field(default=4, ge=1)
    gradients: Ints = (1, 2, 4, 8)  # the T axis
    settings: tuple[Literal["reinit", "trained"], ...] = ("reinit", "trained")
    params: dict[str, Any] = Field(default_factory=dict)  # MultiGradConfig (GI-x) fields
    seeds: Ints = (0,)
    execution: ExecutionSpec = ExecutionSpec()

    @field_validator("victim")
    @classmethod
    def _untrained(cls, v: VictimSpec) -> VictimSpec:
        return untrained_only(v, "a multigrad grid")

    @model_validator(mode="after")
    def _valid(self) -> MultiGradSpec:
        for t in self.gradients:
            for s in self.settings:
                try:
                    MultiGradConfig(**{**self.params, "gradients": t, "setting": s})
                except TypeError as e:
                    raise ValueError(f"params: {e}") from e
                except ConfigError as e:
                    raise ValueError(str(e)) from e
        return self


def cells(spec: MultiGradSpec) -> list[dict[str, Any]]:
    """Every (setting, T, batch, seed) as a JSON-able dict with its content-hash id."""
    out = []
    for setting in spec.settings:
        for t in spec.gradients:
            for b in range(spec.data.num_batches):
                for seed in spec.seeds:
                    cell = {
                        "kind": "multigrad",
                        "dataset": spec.data.dataset,
                        "image_size": spec.data.image_size,
                        "batch_size": spec.batch_size,
                        "batch_index": b,
                        "victim": spec.victim.model_dump(mode="json"),
                        "config": {**spec.params, "gradients": t, "setting": setting},
                        "seed": seed,
                    }
                    out.append({**cell, "id": cell_hash(cell)})
    return out


def result_path(run: RunDir, cell_id: str) -> Path:
    return run.multigrad_result(cell_id)


@dataclass(frozen=True)
class MultiGradJob:
    run_dir: str
    cells: tuple[dict[str, Any], ...]
    threads: int | None = None


def run_cells(job: MultiGradJob) -> int:
    """Run every cell of the job without a result; returns how many ran."""
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    run, ran = RunDir(Path(job.run_dir)), 0
    for cell in job.cells:
        if not result_path(run, cell["id"]).is_file():
            _run_cell(run, cell)
            ran += 1
    return ran


def _run_cell(run: RunDir, cell: dict[str, Any]) -> None:
    size, dev = cell["image_size"], device()
    indices = batch_indices(
        cell["dataset"],
        batch_size=cell["batch_size"],
        batch_index=cell["batch_index"],
        image_size=size,
    )
    images, labels = load_images(cell["dataset"], indices, image_size=size)
    images, labels = images.to(dev), labels.to(dev)
    classes = dataset_info(cell["dataset"], image_size=size).num_classes
    victim = VictimSpec.model_validate(cell["victim"])

    def build(seed: int) -> torch.nn.Module:
        spec = victim.model_copy(update={"seed": seed})
        return victim_model(spec, num_classes=classes, image_size=size).to(dev)

    config = MultiGradConfig(**cell["config"])
    observations = observe(build, images, labels, config, seed=victim.seed)
    _, c, h, w = images.shape
    result = reconstruct(build(victim.seed), observations, labels, (c, h, w), config,
                         seed=cell["seed"])  # fmt: skip
    best = result.best_restart
    body = {
        "cell": cell,
        "psnr": psnr(result.images, images).tolist(),
        "final_cost": float(result.restart_costs[best]) if best >= 0 else None,
        "status": result.status,
    }
    write_bytes_atomic(result_path(run, cell["id"]), json.dumps(body).encode())
