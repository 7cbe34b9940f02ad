"""Client gradients (the paper's eq. 2), BN batch statistics, and a flat parameter layout.

The victim is used *functionally* (torch.func.functional_call) so that the attacker can
vmap the gradient computation over restarts. BatchNorm always uses the batch's statistics
(the client is training) and running statistics are never touched: `prepare_victim` removes
them, which also makes the model vmap-safe.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

BNStats = list[tuple[Tensor, Tensor]]  # per BN layer: (mean (C,), biased var (C,)) of its input


def prepare_victim(model: nn.Module) -> nn.Module:
    """A copy of `model` in train mode whose BN layers use batch statistics only."""
    victim = copy.deepcopy(model).train()
    torch.func.replace_all_batch_norm_modules_(victim)
    for p in victim.parameters():
        p.requires_grad_(False)
    return victim


def victim_params(victim: nn.Module) -> dict[str, Tensor]:
    """The parameters the client differentiates (all of them), detached, in module order."""
    return {name: p.detach() for name, p in victim.named_parameters()}


def forward_with_bn_stats(
    victim: nn.Module, params: dict[str, Tensor], images: Tensor
) -> tuple[Tensor, BNStats]:
    """Logits (B, K) and the (mean, var) of every BN layer's input, in module order."""
    stats: BNStats = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        stats.append((x.mean(dims), x.var(dims, unbiased=False)))

    bns = [m for m in victim.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_pre_hook(hook) for m in bns]
    try:
        logits = functional_call(victim, params, (images,))
    finally:
        for h in handles:
            h.remove()
    return logits, stats


def gradient_fn(victim: nn.Module) -> Callable[[dict[str, Tensor], Tensor, Tensor], tuple]:
    """params, images (B,C,H,W), labels (B,) -> (grads dict, BN stats); vmap/grad composable."""

    def loss(params: dict[str, Tensor], images: Tensor, labels: Tensor) -> tuple[Tensor, BNStats]:
        logits, stats = forward_with_bn_stats(victim, params, images)
        return F.cross_entropy(logits, labels), stats

    return grad(loss, has_aux=True)


def client_gradient(victim: nn.Module, images: Tensor, labels: Tensor) -> list[Tensor]:
    """g = ∇θ mean_j ℓ(fθ(x_j), y_j) (eq. 2) as a list in parameter order, detached."""
    victim = prepare_victim(victim)
    grads, _ = gradient_fn(victim)(victim_params(victim), images, labels)
    return [g.detach() for g in grads.values()]


def bn_statistics(victim: nn.Module, images: Tensor) -> BNStats:
    """Mean and biased variance of each BN layer's input on the client's batch (for "+BN")."""
    victim = prepare_victim(victim)
    with torch.no_grad():
        _, stats = forward_with_bn_stats(victim, victim_params(victim), images)
    return [(m.detach(), v.detach()) for m, v in stats]


def per_example_gradients(victim: nn.Module, images: Tensor, labels: Tensor) -> list[Tensor]:
    """Per-example gradients [(B, *shape)], each example as a batch of one (DP-SGD)."""
    victim = prepare_victim(victim)
    fn = gradient_fn(victim)
    params = victim_params(victim)

    def one(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return fn(params, x[None], y[None])[0]

    grads = vmap(one)(images, labels)
    return [g.detach() for g in grads.values()]


@dataclass(frozen=True)
class ParamIndex:
    """Flat float32 layout of a list of parameter tensors (names, shapes, offsets)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, victim: nn.Module) -> ParamIndex:
        named = list(victim.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """(numel,) float32 vector, in parameter order."""
        return torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        parts = torch.split(flat, self.sizes)
        return [p.reshape(s) for p, s in zip(parts, self.shapes, strict=True)]
