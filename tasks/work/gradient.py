"""The gradient job: a cell's batch through the victim under its protocol and defense (what the
server observes: a gradient, a FedAvg update or an aggregate of clients), stored once."""

from __future__ import annotations

import math
from typing import Any

import torch

from gi_core.datasets import load_images
from gi_core.defenses import apply_defense
from gi_core.gradients import ParamIndex, bn_statistics
from storage.run import RunDir
from storage.zarr_store import StoredGradient, write_gradient
from tasks.cells import GradientCell
from tasks.errors import DegenerateInputError
from tasks.work.cache import device, victim_for, victim_sha256_for


def generate_gradient(run: RunDir, cell: GradientCell) -> int:
    """Client gradient of the cell's batch under its defense -> store.zarr/gradients/<id>."""
    if run.has_gradient(cell.id):
        return 0
    images, labels = load_images(cell.dataset, cell.indices, image_size=cell.image_size)
    images, labels = images.to(device()), labels.to(device())
    victim = victim_for(cell, run)  # a trained victim: the run's stored weights (271)
    noise = torch.Generator().manual_seed(int(cell.id[:12], 16))  # deterministic per cell
    # what the server observes under the cell's protocol, each client's share defended (194)
    defended = apply_defense(
        cell.defense, victim, images, labels, generator=noise, protocol=cell.protocol
    )
    index = ParamIndex.of(victim)
    _refuse_degenerate(cell, index.flatten(defended.grads))
    mask = index.flatten(defended.masks).bool() if defended.masks is not None else None
    write_gradient(
        run.gradient_path(cell.id),
        StoredGradient(
            gradient=index.flatten(defended.grads).cpu().numpy(),
            param_names=index.names,
            param_shapes=index.shapes,
            images=images.cpu().numpy(),
            labels=labels.cpu().numpy(),
            bn_stats=tuple(
                (m.cpu().numpy(), v.cpu().numpy()) for m, v in bn_statistics(victim, images)
            ),
            mask=None if mask is None else mask.cpu().numpy(),
            attrs={
                "cell": cell.describe(),
                "defense_info": _json_safe(defended.info),
                "victim_sha256": victim_sha256_for(cell, run),  # the weights it was taken at
            },
        ),
    )
    return 1


def _refuse_degenerate(cell: GradientCell, gradient: torch.Tensor) -> None:
    """A zero or non-finite gradient can only give meaningless reconstructions (e.g. a victim
    with one class has a constant loss): fail the cell with the reason, store nothing."""
    norm = float(torch.linalg.vector_norm(gradient.double()))
    if norm == 0.0 or not math.isfinite(norm):
        raise DegenerateInputError(
            f"gradient cell {cell.id}: the client gradient's norm is {norm} (batch "
            f"{cell.batch_index} of {cell.dataset!r}, defense {cell.defense.kind}); a zero or "
            "non-finite gradient cannot be inverted meaningfully. Check the data set's classes "
            "and the defense level"
        )


def _json_safe(info: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf (e.g. epsilon of DP without noise) are not JSON: store them as null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in info.items()
    }
