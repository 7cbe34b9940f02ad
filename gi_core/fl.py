"""Federated-learning simulation: FedSGD (the source of GIML's inversion tasks) and FedAvg
training of a victim along rounds (the grid's trained victims, decision 270).

M clients hold disjoint local batches of B images. In every round r each client computes the
gradient of its batch at the current global θ_r (eq. 2), the defense acts on it exactly as in
an evaluation grid (`apply_defense`), and the server takes one FedSGD step with the reports it
received: θ_{r+1} = θ_r − lr · (1/M) Σ_i ĝ_{r,i} (McMahan et al. 2017, FedSGD). Every report
(θ_r, ĝ_{r,i}, labels) is one inversion task for GIML (Jeon et al. 2021, Sec. 4.2).

`train_fedavg` is FedAvg (McMahan et al. 2017, Alg. 1, every client in every round, server
learning rate 1): each client starts from θ_r, runs its local SGD steps on its own data
(`fedavg.client_update`, the update a FedAvg client really sends) and the server takes the mean
of the updates, θ_{r+1} = θ_r − (1/M) Σ_i Δθ_i.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gi_core.defenses import DefendedGradient, Defense, apply_defense
from gi_core.errors import ConfigError
from gi_core.fedavg import LocalTraining, aggregate, client_update
from gi_core.gradients import prepare_victim

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
    return _round_seed(config.seed, round=round, client=client, clients=clients)


def _round_seed(seed: int, *, round: int, client: int, clients: int) -> int:
    return (seed * 1_000_003 + round) * max(clients, 1) + client


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


@dataclass(frozen=True)
class FedAvgTraining:
    """`rounds` rounds of FedAvg; every client runs `local` each round on its own data, in an
    order drawn afresh per (seed, round, client), so round r depends on θ_r alone and training
    can resume from any stored round (the schedule does not depend on `rounds`)."""

    rounds: int
    local: LocalTraining = LocalTraining()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ConfigError(f"train.rounds: must be >= 0 (got {self.rounds})")


def train_fedavg(
    victim: nn.Module,
    clients: Sequence[ClientBatch],
    config: FedAvgTraining,
    *,
    start_round: int = 0,
) -> nn.Module:
    """A copy of `victim` trained from round `start_round` (θ of `victim`) to `config.rounds`.

    Clients hold equal shares (their plain mean is FedAvg's n_k / n weighting). BatchNorm uses
    batch statistics (`gradients.prepare_victim`, as every client here), so running statistics
    are neither updated nor aggregated. The caller's victim is not modified."""
    if not clients or len({c.labels.shape[0] for c in clients}) != 1:
        raise ConfigError("train.clients: need at least one client, all with equal shares")
    if not 0 <= start_round <= config.rounds:
        raise ConfigError(f"train: cannot start at round {start_round} of {config.rounds}")
    model = copy.deepcopy(victim)
    for r in range(start_round, config.rounds):
        updates = [
            client_update(model, *_round_order(batch, config, r, i, len(clients)), config.local)
            for i, batch in enumerate(clients)
        ]
        with torch.no_grad():  # θ_{r+1} = θ_r − mean_i Δθ_i (parameters() order)
            for p, delta in zip(model.parameters(), aggregate(updates), strict=True):
                p.sub_(delta)
    return model


def _round_order(
    batch: ClientBatch, config: FedAvgTraining, r: int, client: int, clients: int
) -> tuple[Tensor, Tensor]:
    """The client's images (n, C, H, W) and labels (n,) in this round's seeded order: its
    local steps take consecutive mini-batches of it (`fedavg.client_update`)."""
    seed = _round_seed(config.seed, round=r, client=client, clients=clients)
    order = torch.randperm(batch.labels.shape[0], generator=torch.Generator().manual_seed(seed))
    order = order.to(batch.labels.device)
    return batch.images[order], batch.labels[order]


def training_loss(victim: nn.Module, clients: Sequence[ClientBatch]) -> float:
    """Mean cross-entropy of `victim` over every client's data (batch-statistics BN, as in
    training): what FedAvg lowers."""
    model = prepare_victim(victim)
    with torch.no_grad():
        losses = [F.cross_entropy(model(c.images), c.labels) for c in clients]
    return float(torch.stack(losses).mean())
