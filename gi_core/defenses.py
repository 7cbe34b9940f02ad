"""Defenses applied to the client gradient before the attacker sees it.

Batch size is a grid axis, not a defense. Every defense is a frozen value object so that it
can be part of a cell's identity; `apply_defense` returns what the attacker observes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gi_core.errors import ConfigError
from gi_core.fedavg import Protocol, client_sends
from gi_core.gradients import client_gradient, per_example_gradients, prepare_victim

# `disguise` (Jeon et al. 2021, App. F) acts on how the client draws its batch (k distinct
# labels, k < B), not on the gradient: the orchestration samples the batch, and the gradient
# passes through unchanged here.
DEFENSE_KINDS = ("none", "sparsity", "noise", "dp", "quantize", "soteria", "disguise")
# Defenses defined on one plain gradient (per-example clipping, a gradient-based score):
# other protocols refuse them (decision 194).
FEDSGD_ONLY = ("dp",)
DP_DELTA = 1e-5


@dataclass(frozen=True)
class Defense:
    """`kind` plus its parameters: sparsity(p), noise(sigma), dp(clip, sigma), quantize(bits),
    soteria(p: the share of representation features whose gradient is pruned), disguise(k:
    distinct labels per batch)."""

    kind: str = "none"
    p: float | None = None
    sigma: float | None = None
    clip: float | None = None
    bits: int | None = None
    k: int | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def level(self) -> float:
        """The defense's strength as one number (for tables): p, sigma or bits; 0 for none."""
        value = {
            "none": 0.0,
            "sparsity": self.p,
            "soteria": self.p,
            "noise": self.sigma,
            "dp": self.sigma,
            "disguise": self.k,
        }
        return float(value.get(self.kind, self.bits) or 0.0)


def _validate(d: Defense) -> None:
    if d.kind not in DEFENSE_KINDS:
        raise ConfigError(f"defense.kind: unknown {d.kind!r}; known: {', '.join(DEFENSE_KINDS)}")
    needed = {
        "none": (),
        "sparsity": ("p",),
        "noise": ("sigma",),
        "dp": ("clip", "sigma"),
        "quantize": ("bits",),
        "soteria": ("p",),
        "disguise": ("k",),
    }[d.kind]
    for name in ("p", "sigma", "clip", "bits", "k"):
        value = getattr(d, name)
        if (value is None) == (name in needed):
            verb = "needs" if value is None else "does not take"
            raise ConfigError(f"defense.{name}: {d.kind} {verb} {name!r}")
    if d.p is not None and not 0.0 <= d.p < 1.0:
        raise ConfigError(f"defense.p: {d.kind} must be in [0, 1) (got {d.p})")
    for name in ("sigma", "clip"):
        value = getattr(d, name)
        if value is not None and (value < 0 or not math.isfinite(value)):
            raise ConfigError(f"defense.{name}: must be a finite number >= 0 (got {value})")
    if d.bits is not None and not 1 <= d.bits <= 32:
        raise ConfigError(f"defense.bits: must be in 1..32 (got {d.bits})")
    if d.k is not None and d.k < 1:
        raise ConfigError(f"defense.k: must be >= 1 (got {d.k})")


@dataclass(frozen=True)
class DefendedGradient:
    """What the attacker observes: gradients in parameter order, masks for sparsity, info."""

    grads: list[Tensor]
    masks: list[Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def apply_defense(
    defense: Defense,
    victim: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    generator: torch.Generator,
    protocol: Protocol | None = None,
) -> DefendedGradient:
    """What the server observes of (images, labels) under `defense`: the client gradient, or
    under another `protocol` the mean over clients of what each sends, each defended on its
    own (defenses act on what a client sends, decision 194); noise is drawn from `generator`."""
    if protocol is not None and not protocol.is_fedsgd:
        return _defend_protocol(defense, victim, images, labels, generator, protocol)
    if defense.kind == "dp":
        return _dp(defense, victim, images, labels, generator)
    return _defend(defense, victim, images, client_gradient(victim, images, labels), generator)


def _defend(
    defense: Defense,
    victim: nn.Module,
    images: Tensor,
    grads: list[Tensor],
    generator: torch.Generator,
) -> DefendedGradient:
    """`defense` applied to one client's sent tensors `grads` (a gradient or an update)."""
    if defense.kind in ("none", "disguise"):
        return DefendedGradient(grads)
    if defense.kind == "sparsity":
        masks = [topk_mask(g, p=float(defense.p or 0.0)) for g in grads]
        return DefendedGradient([g * m for g, m in zip(grads, masks, strict=True)], masks)
    if defense.kind == "soteria":
        return soteria(victim, images, grads, p=float(defense.p or 0.0))
    if defense.kind == "noise":
        return DefendedGradient(
            add_noise(grads, std=float(defense.sigma or 0.0), generator=generator)
        )
    return DefendedGradient([quantize(g, bits=int(defense.bits or 32)) for g in grads])


def _defend_protocol(
    defense: Defense,
    victim: nn.Module,
    images: Tensor,
    labels: Tensor,
    generator: torch.Generator,
    protocol: Protocol,
) -> DefendedGradient:
    """Each client's update defended, then averaged by the server. A sparsity mask is the
    union of the clients' kept entries: what is non-zero in the mean."""
    if defense.kind in FEDSGD_ONLY:
        raise ConfigError(f"defense.kind: {defense.kind} is defined on one FedSGD gradient")
    parts = protocol.clients(images)
    sent = client_sends(victim, images, labels, protocol)
    defended = [
        _defend(defense, victim, images[part], update, generator)
        for part, update in zip(parts, sent, strict=True)
    ]
    mean = [torch.stack(ts).mean(0) for ts in zip(*(d.grads for d in defended), strict=True)]
    masks = None
    if defended[0].masks is not None:
        masks = [
            torch.stack([m.bool() for m in ms]).any(0)
            for ms in zip(*(d.masks or [] for d in defended), strict=True)
        ]
    info = defended[0].info if len(defended) == 1 else {}
    return DefendedGradient(mean, masks, info)


def soteria(
    victim: nn.Module, images: Tensor, grads: list[Tensor], *, p: float
) -> DefendedGradient:
    """Soteria (Sun et al., CVPR 2021, Alg. 1): prune the representation layer's gradient.

    The representation r (B, F) is the input of the victim's last linear layer. For each feature
    f the client scores how much the input is revealed per unit of that feature,
    s_f = sum_b ||dr_bf/dx_b|| / r_bf, and zeroes the columns of the last layer's weight
    gradient of the floor(p F) features with the smallest |s_f| (the official code thresholds
    at the p-th percentile; the exact count makes the pruned share the documented one). A
    feature that is 0 for some image (a dead ReLU) scores inf and is kept: its column carries
    nothing of that image. `info["pruned"]` is the number of pruned features."""
    model = prepare_victim(victim)
    linear, position = _last_linear(model)
    captured: list[Tensor] = []
    handle = linear.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
    x = images.detach().clone().requires_grad_(True)
    try:
        model(x)
    finally:
        handle.remove()
    rep = captured[0].flatten(1)  # (B, F)
    scores = torch.empty(rep.shape[1], device=rep.device)
    for f in range(rep.shape[1]):
        (dx,) = torch.autograd.grad(rep[:, f].sum(), x, retain_graph=True)
        ratio = dx.flatten(1).norm(dim=1) / rep[:, f].detach()  # (B,): images are independent
        scores[f] = ratio.sum()
    scores = torch.nan_to_num(scores.abs(), nan=math.inf)
    k = math.floor(round(rep.shape[1] * p, 9))
    pruned = torch.argsort(scores)[:k]
    out = [g.clone() for g in grads]
    out[position][:, pruned] = 0.0
    return DefendedGradient(out, info={"pruned": int(k)})


def _last_linear(model: nn.Module) -> tuple[nn.Linear, int]:
    """The victim's last nn.Linear and the index of its weight in parameter order."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("defense.kind: soteria needs a victim that ends with a linear layer")
    last = linears[-1]
    index = next(i for i, q in enumerate(model.parameters()) if q is last.weight)
    return last, index


def topk_mask(g: Tensor, *, p: float) -> Tensor:
    """Bool mask keeping the k = max(1, floor(n (1 - p))) largest-magnitude entries of `g`."""
    n = g.numel()
    # round() first: in floats 900 * (1 - 0.9) = 89.99999999999999, and the spec's p = 0.9
    # means k = 90 (the decimal the user wrote, not its binary neighbour).
    k = max(1, math.floor(round(n * (1.0 - p), 9)))
    mask = torch.zeros(n, dtype=torch.bool, device=g.device)
    mask[g.reshape(-1).abs().topk(k).indices] = True
    return mask.reshape(g.shape)


def add_noise(grads: Sequence[Tensor], *, std: float, generator: torch.Generator) -> list[Tensor]:
    """g + N(0, std²) per entry; drawn on the CPU so a seed gives the same noise on any device."""
    return [g + std * torch.randn(g.shape, generator=generator).to(g) for g in grads]


def quantize(g: Tensor, *, bits: int) -> Tensor:
    """Uniform per-tensor quantisation to 2^bits levels spanning [min(g), max(g)]."""
    lo, hi = g.min(), g.max()
    step = (hi - lo) / (2**bits - 1)
    if step == 0:
        return g.clone()
    return lo + torch.round((g - lo) / step) * step


def _dp(
    d: Defense, victim: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator
) -> DefendedGradient:
    """DP-SGD step (Abadi et al. 2016): clip each example's gradient to `clip`, average, add
    N(0, (sigma·clip/B)²). With BN, each example is normalised by its own statistics."""
    clip, sigma, batch = float(d.clip or 0.0), float(d.sigma or 0.0), images.shape[0]
    per_example = per_example_gradients(victim, images, labels)
    norms = torch.cat([g.reshape(batch, -1) for g in per_example], dim=1).norm(dim=1)  # (B,)
    scale = (clip / (norms + 1e-12)).clamp(max=1.0)
    clipped = [g * scale.view(-1, *[1] * (g.dim() - 1)) for g in per_example]
    mean = [g.mean(0) for g in clipped]
    noisy = add_noise(mean, std=sigma * clip / batch, generator=generator)
    return DefendedGradient(noisy, info={"epsilon": dp_epsilon(sigma), "delta": DP_DELTA})


def dp_epsilon(noise_multiplier: float, *, delta: float = DP_DELTA) -> float:
    """(ε, δ) of one full-batch Gaussian step via Google's dp-accounting RDP accountant."""
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier))
    return float(accountant.get_epsilon(delta))
