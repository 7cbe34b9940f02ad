"""Multi-gradient inversion (Jeon et al. 2021, Appendix D, Figure A3b).

The attacker observes T gradients of the SAME batch x* at different victim parameters θ_t and
searches one shared pixel batch x:  min_x Σ_t c(x; θ_t, g_t)  (+ TV once, as in GI-x).

Two ways θ_t arises (`setting`):
  reinit   every step re-initialises the victim (θ_t = a fresh init from seed + t);
  trained  the client trains on its batch: θ_{t+1} = θ_t − lr · g_t (SGD on the same data).
T = 1 is plain GI-x (both settings coincide).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap

from gi_core.attacks.engine import AttackResult, _check, optimise
from gi_core.attacks.gi_x import GIXConfig, pixel_stage
from gi_core.gradients import client_gradient, gradient_fn, prepare_victim, victim_params
from gi_core.objectives import gradient_distance, total_variation

SETTINGS = ("reinit", "trained")
Observation = tuple[dict[str, Tensor], list[Tensor]]  # (θ_t, g_t in θ's parameter order)


@dataclass(frozen=True)
class MultiGradConfig(GIXConfig):
    gradients: int = 1  # T
    setting: str = "reinit"
    train_lr: float = 0.1  # client SGD step between observations ("trained")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.gradients >= 1, "gradients", "must be >= 1", self.gradients)
        _check(self.setting in SETTINGS, "setting", f"must be one of {SETTINGS}", self.setting)
        _check(self.train_lr > 0, "train_lr", "must be > 0", self.train_lr)


def observe(
    build: Callable[[int], nn.Module],
    images: Tensor,
    labels: Tensor,
    config: MultiGradConfig,
    *,
    seed: int,
) -> list[Observation]:
    """The T (θ_t, g_t) the attacker sees; `build(seed)` makes a victim on the images' device."""
    model = build(seed)
    out: list[Observation] = []
    for t in range(config.gradients):
        if config.setting == "reinit" and t > 0:
            model = build(seed + t)
        grads = client_gradient(model, images, labels)  # eq. 2 at θ_t
        out.append((victim_params(model), grads))
        if config.setting == "trained":
            model = copy.deepcopy(model)
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads, strict=True):
                    p.sub_(config.train_lr * g)
    return out


def reconstruct(
    victim: nn.Module,
    observations: Sequence[Observation],
    labels: Tensor,
    image_shape: tuple[int, int, int],
    config: MultiGradConfig,
    *,
    seed: int = 0,
) -> AttackResult:
    """Pixel search of one batch against every observation at once (R restarts vectorised)."""
    grad_of = gradient_fn(prepare_victim(victim))

    def one(x: Tensor) -> Tensor:  # x: (B, C, H, W) -> Σ_t c_t(x) + tv·TV(x)
        terms = [
            gradient_distance(list(grad_of(theta, x, labels)[0].values()), g, kind=config.distance)
            for theta, g in observations
        ]
        cost = torch.stack(terms).sum()
        return cost + config.tv * total_variation(x) if config.tv > 0 else cost

    rng = torch.Generator().manual_seed(seed)
    shape = (config.restarts, int(labels.shape[0]), *image_shape)
    init = torch.rand(shape, generator=rng).to(labels.device)  # (R, B, C, H, W) in [0, 1]
    return optimise([pixel_stage(config)], vmap(one), {"x": init}, curve_every=config.curve_every)
