"""Reconstruction objectives: gradient distance (eq. 3), total variation (eq. 4), BN prior.

All functions work on one candidate batch (no restart dimension) so that attacks can vmap
them over restarts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gi_core.errors import ConfigError

DISTANCES = ("cosine", "l2")
TV_FORMS = ("interior", "zero_pad")


def gradient_distance(
    pred: Sequence[Tensor],
    target: Sequence[Tensor],
    *,
    kind: str = "cosine",
    masks: Sequence[Tensor] | None = None,
) -> Tensor:
    """d(∇θ ℓ(x), g): `cosine` = 1 − cos over the concatenation of all parameter gradients
    (the paper's default), `l2` = Σ‖a − b‖². With `masks` (sparsity defense) the attacker
    zeroes its own gradient where the observed one was dropped."""
    if masks is not None:
        pred = [p * m for p, m in zip(pred, masks, strict=True)]
    if kind == "cosine":
        dot = torch.stack([(p * t).sum() for p, t in zip(pred, target, strict=True)]).sum()
        pn = torch.stack([p.pow(2).sum() for p in pred]).sum().sqrt()
        tn = torch.stack([t.pow(2).sum() for t in target]).sum().sqrt()
        return 1.0 - dot / (pn * tn + 1e-12)
    if kind == "l2":
        return torch.stack([(p - t).pow(2).sum() for p, t in zip(pred, target, strict=True)]).sum()
    raise ConfigError(f"distance: unknown {kind!r}; known: {', '.join(DISTANCES)}")


def total_variation(x: Tensor, *, form: str = "interior") -> Tensor:
    """Anisotropic TV (eq. 4) over a (B, C, H, W) batch in [0, 1].

    `interior` (Geiping et al.'s code): mean |x[h, w+1] − x[h, w]| + mean |x[h+1, w] − x[h, w]|
    over the (H, W−1) and (H−1, W) interior differences.
    `zero_pad`: the image is padded with one row and one column of zeros (right, bottom) before
    differencing, so the last column and row also pay |x|, and both means run over H × W. This
    anchors global brightness, which the gradient of a batch-statistics BN victim barely
    constrains (measured in docs/results/objective_options.md).
    """
    if form == "interior":
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
        return dx + dy
    if form == "zero_pad":
        padded = torch.nn.functional.pad(x, (0, 1, 0, 1))  # zeros right and bottom
        dx = (padded[..., :-1, 1:] - x).abs().mean()
        dy = (padded[..., 1:, :-1] - x).abs().mean()
        return dx + dy
    raise ConfigError(f"tv_form: unknown {form!r}; known: {', '.join(TV_FORMS)}")


def bn_regulariser(
    stats: Sequence[tuple[Tensor, Tensor]], target: Sequence[tuple[Tensor, Tensor]]
) -> Tensor:
    """Yin et al. (2021): Σ_l ‖μ_l − μ*_l‖₂ + ‖σ²_l − σ²*_l‖₂ over the BN layers."""
    if len(stats) != len(target) or not stats:
        raise ConfigError(
            f"bn: the victim has {len(stats)} BN layers, the target has {len(target)}"
        )
    terms = [
        torch.linalg.vector_norm(m - tm) + torch.linalg.vector_norm(v - tv)
        for (m, v), (tm, tv) in zip(stats, target, strict=True)
    ]
    return torch.stack(terms).sum()
