"""Result rows: one metrics row per image of an inversion cell, with the columns that
identify its weights, privacy budget, where it ran and how it was scheduled.
"""

from __future__ import annotations

import functools
import hashlib
from typing import TYPE_CHECKING, Any

import torch

from gi_core.generators import weights_source
from storage.zarr_store import StoredGradient
from tasks.cells import InversionCell
from tasks.executors import job_environment

if TYPE_CHECKING:
    from tasks.work.inversion import _Prepared


def _config_columns(cell: InversionCell, stored: StoredGradient) -> dict[str, Any]:
    """Columns that identify weights and privacy budget: checkpoint sha256s, DP (eps, delta)."""
    info = stored.attrs.get("defense_info", {}) or {}
    generator = cell.generator
    return {
        "victim_checkpoint_sha256": _sha256(cell.gradient.victim.checkpoint),
        "generator_checkpoint_sha256": (
            _sha256(generator.checkpoint or weights_source(generator.kind)) if generator else None
        ),
        "dp_epsilon": info.get("epsilon") if cell.gradient.defense.kind == "dp" else None,
        "dp_delta": info.get("delta") if cell.gradient.defense.kind == "dp" else None,
    }


@functools.lru_cache(maxsize=32)
def _sha256(path: str | None) -> str | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rows(
    cell: InversionCell,
    stored: StoredGradient,
    result: Any,
    scores: Any,
    wall: float,
    dev: torch.device,
    label_acc: float,
    schedule: dict[str, Any],
) -> list[dict[str, Any]]:
    axes = {**cell.metric_axes(), **_config_columns(cell, stored)}
    cost = (
        float(result.restart_costs[result.best_restart])
        if result.best_restart >= 0
        else float("nan")
    )
    return [
        {
            **axes,
            "image_index": i,
            "sample_index": int(cell.gradient.indices[i]),  # client 0's under aggregate
            "label": int(stored.labels[i]),
            "labels": cell.config.labels,
            "label_accuracy": label_acc,
            "psnr": float(scores.psnr[i]),
            "ssim": float(scores.ssim[i]),
            "lpips": float(scores.lpips[i]),
            "best_psnr_in_batch": bool(scores.best_psnr[i]),
            "best_ssim_in_batch": bool(scores.best_ssim[i]),
            "best_lpips_in_batch": bool(scores.best_lpips[i]),
            "final_cost": cost,
            "status": result.status,
            "iterations": result.iterations,
            "wall_seconds": wall,
            "device": str(dev),
            **_where(dev),
            **schedule,
        }
        for i in range(cell.gradient.batch_size)  # the attacked client's images
    ]


def _schedule_columns(p: _Prepared) -> dict[str, Any]:
    """How the cell was scheduled (issue 20; storage.metrics "schedule provenance"): none of it
    may change the numbers, and `gi-eval verify --recompute` names it when a cell differs."""
    return {
        "attempts": p.trace.attempts,
        "resumed_from_iteration": p.trace.resumed_from,
        "batch_group_size": p.group_size,
        "threads": torch.get_num_threads(),
    }


def _where(dev: torch.device) -> dict[str, Any]:
    """Slurm job id, array index, host and device model of this cell (metrics columns)."""
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {**job_environment(), "device_name": name}
