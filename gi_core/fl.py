"""Federated-learning simulation (FedSGD): the source of GIML's inversion tasks.

M clients hold disjoint local batches of B images. In every round r each client computes the
gradient of its batch at the current global θ_r (eq. 2), the defense acts on it exactly as in
an evaluation grid (`apply_defense`), and the server takes one FedSGD step with the reports it
received: θ_{r+1} = θ_r − lr · (1/M) Σ_i ĝ_{r,i} (McMahan et al. 2017, FedSGD). Every report
(θ_r, ĝ_{r,i}, labels) is one inversion task for GIML (Jeon et al. 2021, Sec. 4.2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gi_core.defenses import DefendedGradient, Defense, apply_defense
from gi_core.errors import ConfigError

Theta = dict[str, Tensor]  # parameter name -> tensor, in the victim's named_parameters order


@dataclass(frozen=True)
class FLConfig:
    """R rounds of FedSGD with server learning rate `lr`; `seed` seeds the defense noise."""

    rounds: int = 4
    lr: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"fl.rounds: must be >= 1 (got {self.rounds})")
        if not self.lr >= 0:
            raise ConfigError(f"fl.lr: must be >= 0 (got {self.lr})")


@dataclass(frozen=True)
class ClientBatch:
    """One client's local data: images (B, C, H, W) in [0, 1] and labels (B,)."""

    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class FLReport:
    """What client `client` sent in round `round`, and the global θ it was computed at."""

    round: int
    client: int
    theta: Theta  # θ_round (shared by all reports of the round; do not mutate)
    observed: DefendedGradient  # the defended gradient the server (and attacker) sees


def theta_of(model: nn.Module) -> Theta:
    """A detached copy of the model's parameters."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def report_seed(config: FLConfig, *, round: int, client: int, clients: int) -> int:
    """Seed of the defense noise of one report: distinct per (seed, round, client)."""
    return (config.seed * 1_000_003 + round) * max(clients, 1) + client


def simulate_fedsgd(
    victim: nn.Module,
    clients: Sequence[ClientBatch],
    config: FLConfig,
    *,
    defense: Defense,
    on_report: Callable[[FLReport], None] | None = None,
) -> list[Theta]:
    """Run R rounds; call `on_report` for every report; return [θ_0, ..., θ_R].

    The caller's victim is not modified (a copy is trained). Reports are streamed through the
    callback so that a paper-scale simulation (200 clients x ResNet18) never holds all of them.
    """
    if not clients:
        raise ConfigError("fl.clients: need at least one client")
    model = copy.deepcopy(victim)
    thetas = [theta_of(model)]
    for r in range(config.rounds):
        grads_sum: list[Tensor] | None = None
        for i, batch in enumerate(clients):
            rng = torch.Generator().manual_seed(
                report_seed(config, round=r, client=i, clients=len(clients))
            )
            observed = apply_defense(defense, model, batch.images, batch.labels, generator=rng)
            if on_report is not None:
                on_report(FLReport(r, i, thetas[-1], observed))
            grads_sum = _add(grads_sum, observed.grads)
        _server_step(model, grads_sum or [], lr=config.lr, clients=len(clients))
        thetas.append(theta_of(model))
    return thetas


def _add(total: list[Tensor] | None, grads: list[Tensor]) -> list[Tensor]:
    if total is None:
        return [g.clone() for g in grads]
    return [t + g for t, g in zip(total, grads, strict=True)]


def _server_step(model: nn.Module, grads_sum: list[Tensor], *, lr: float, clients: int) -> None:
    """θ ← θ − lr · mean_i ĝ_i (grads in named_parameters order)."""
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads_sum, strict=True):
            p.sub_(lr * g / clients)
