"""FedAvg's client update, simulated differentiably (issue 19, protocol `fedavg`).

Under FedAvg (McMahan et al. 2017) a client does not send a gradient: it runs `local_steps` SGD
steps on its data in mini-batches of `local_batch_size` at `local_lr` and sends its weight
update Δθ = θ_0 − θ_K. An attacker that knows these local hyperparameters (the threat model
grants them) simulates the same K steps on its candidate images with every step kept in the
autograd graph, so that a distance between its simulated Δθ and the observed one can be
minimised over the images (the "multi-step" attacks of Geiping et al. 2020, Sec. 5, and
breaching's `local_updates`). With the true images the simulation *is* the client's update
(tested against a real `torch.optim.SGD` loop).

Mini-batches are taken in order (step k uses batch k mod ceil(B / local_batch_size)), the
shuffle-free schedule of the published multi-step attacks; BatchNorm uses batch statistics
(`gradients.prepare_victim`), as in every other protocol here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from gi_core.errors import ConfigError
from gi_core.gradients import client_gradient, prepare_victim, victim_params


@dataclass(frozen=True)
class LocalTraining:
    """What the client does between two server rounds (and the attacker is told)."""

    local_steps: int = 1
    local_batch_size: int | None = None  # None: the whole batch at each step
    local_lr: float = 0.1

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ConfigError(f"local_steps: must be >= 1 (got {self.local_steps})")
        if self.local_batch_size is not None and self.local_batch_size < 1:
            raise ConfigError(f"local_batch_size: must be >= 1 (got {self.local_batch_size})")
        if not self.local_lr > 0:
            raise ConfigError(f"local_lr: must be > 0 (got {self.local_lr})")


def _batches(n: int, size: int | None) -> list[slice]:
    size = n if size is None else min(size, n)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def simulated_update(
    victim: nn.Module, images: Tensor, labels: Tensor, local: LocalTraining
) -> list[Tensor]:
    """Δθ = θ_0 − θ_K after K plain SGD steps on mean cross-entropy, in parameter order.

    Differentiable w.r.t. `images` (create_graph on every step): (B, C, H, W) -> list of
    parameter-shaped tensors. `victim` is not modified."""
    model = prepare_victim(victim)
    # θ_0 as leaves that require grad: each step differentiates the loss w.r.t. the current θ.
    start = {n: p.clone().requires_grad_(True) for n, p in victim_params(model).items()}
    return local_update(model, start, images, labels, local)


def local_update(
    model: nn.Module,
    start: dict[str, Tensor],
    images: Tensor,
    labels: Tensor,
    local: LocalTraining,
) -> list[Tensor]:
    """θ_0 − θ_K of a prepared victim (`gradients.prepare_victim`) from parameters `start` that
    require grad; every step stays in the graph, so the result is differentiable in `images`."""
    params = dict(start)
    order = _batches(images.shape[0], local.local_batch_size)
    for step in range(local.local_steps):
        part = order[step % len(order)]
        logits = functional_call(model, params, (images[part],))
        loss = F.cross_entropy(logits, labels[part])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {
            name: p - local.local_lr * g for (name, p), g in zip(params.items(), grads, strict=True)
        }
    return [start[name] - params[name] for name in start]


def client_update(
    victim: nn.Module, images: Tensor, labels: Tensor, local: LocalTraining
) -> list[Tensor]:
    """What the client really sends under FedAvg: Δθ from a `torch.optim.SGD` loop on a copy of
    its model (detached). The attacker never calls this; tests compare it with the simulation."""
    model = prepare_victim(victim)
    for p in model.parameters():
        p.requires_grad_(True)
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=local.local_lr)
    order = _batches(images.shape[0], local.local_batch_size)
    for step in range(local.local_steps):
        part = order[step % len(order)]
        opt.zero_grad()
        F.cross_entropy(model(images[part]), labels[part]).backward()
        opt.step()
    return [s - p.detach() for s, p in zip(start, model.parameters(), strict=True)]


def aggregate(updates: list[list[Tensor]]) -> list[Tensor]:
    """The server's view of N clients (protocol `aggregate`): the mean of their updates."""
    if not updates:
        raise ConfigError("aggregate: needs at least one client's update")
    return [torch.stack(parts).mean(0) for parts in zip(*updates, strict=True)]


# --------------------------------------------------------------------------------------------
# The protocol axis (decision 194): what one round of federated training shows the server.

PROTOCOL_KINDS = ("fedsgd", "fedavg", "aggregate")


@dataclass(frozen=True)
class Protocol:
    """What the server observes in one round, and so what the attacker matches.

    fedsgd     one client's gradient g (eq. 2; the paper's setting; `local` is None).
    fedavg     one client's weight update θ_0 − θ_K after `local` training.
    aggregate  the mean over `n_clients` clients of what each sends: gradients when `local` is
               None (FedSGD aggregation), weight updates otherwise (FedAvg aggregation).
    The images of an aggregate are the clients' batches concatenated, client 0 first
    ((n_clients · B, C, H, W)); the attacked, scored client is client 0."""

    kind: str = "fedsgd"
    local: LocalTraining | None = None
    n_clients: int = 1

    def __post_init__(self) -> None:
        if self.kind not in PROTOCOL_KINDS:
            raise ConfigError(f"protocol.kind: unknown {self.kind!r}; known: {PROTOCOL_KINDS}")
        if self.kind != "aggregate" and (self.kind == "fedavg") != (self.local is not None):
            need = "needs" if self.kind == "fedavg" else "does not take"
            raise ConfigError(f"protocol.local: {self.kind} {need} local training")
        if self.n_clients < 1 or (self.kind != "aggregate" and self.n_clients != 1):
            raise ConfigError(
                f"protocol.n_clients: {self.kind} needs 1 client, aggregate >= 1 "
                f"(got {self.n_clients})"
            )

    @property
    def is_fedsgd(self) -> bool:
        """One client's plain gradient: the engine's native (vectorisable) cost path."""
        return self.kind == "fedsgd"

    def clients(self, images: Tensor) -> list[slice]:
        """Each client's rows of the concatenated batch (equal shares, client 0 first)."""
        n = images.shape[0]
        if n % self.n_clients:
            raise ConfigError(f"protocol: {n} images do not split into {self.n_clients} clients")
        size = n // self.n_clients
        return [slice(j * size, (j + 1) * size) for j in range(self.n_clients)]

    def label_scale(self) -> float:
        """What the last layer's part of a sent update is divided by to read it as a mean
        gradient (label recovery): local_lr · local_steps for weight updates, 1 for gradients."""
        return 1.0 if self.local is None else self.local.local_lr * self.local.local_steps


def client_sends(
    victim: nn.Module, images: Tensor, labels: Tensor, protocol: Protocol
) -> list[list[Tensor]]:
    """What each client really sends (detached, parameter order): its gradient (eq. 2) or its
    torch.optim.SGD weight update. The defenses act on these (decision 194)."""
    out = []
    for part in protocol.clients(images):
        if protocol.local is None:
            out.append(client_gradient(victim, images[part], labels[part]))
        else:
            out.append(client_update(victim, images[part], labels[part], protocol.local))
    return out


def simulate(
    model: nn.Module,
    params: dict[str, Tensor],
    images: Tensor,
    labels: Tensor,
    protocol: Protocol,
) -> list[Tensor]:
    """The attacker's differentiable view of what the server observes for candidate `images`:
    the mean over clients of each client's gradient or simulated update, from the prepared
    victim `model` at parameters `params` (leaves that require grad)."""
    sent: list[Sequence[Tensor]] = []
    for part in protocol.clients(images):
        if protocol.local is None:
            loss = F.cross_entropy(functional_call(model, params, (images[part],)), labels[part])
            sent.append(torch.autograd.grad(loss, list(params.values()), create_graph=True))
        else:
            sent.append(local_update(model, params, images[part], labels[part], protocol.local))
    if len(sent) == 1:
        return list(sent[0])
    return [torch.stack(parts).mean(0) for parts in zip(*sent, strict=True)]
