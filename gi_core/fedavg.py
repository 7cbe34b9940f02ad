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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from gi_core.errors import ConfigError
from gi_core.gradients import prepare_victim, victim_params


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
