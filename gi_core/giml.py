"""GIML: learn a generative prior from gradients alone (Jeon et al. 2021, Sec. 4.2, Algorithm 2).

Algorithm 2, one meta step (line numbers of the paper's listing):
  3  sample N tasks (θ_i, g_i, y_i) from the task set (FL reports, `gi_core.fl`)
  4  w' ← w
  5  z*_i = argmin_z c(G_w'(z); θ_i, g_i) + λ Σ_j ‖z_ij‖₂       for every task i
  6  repeat τ times: w' ← w' − α ∇_w' Σ_i c(G_w'(z*_i); θ_i, g_i)
  8  w ← (1 − β) w + β w'                                      (Reptile, Nichol et al. 2018)

The N latent searches of line 5 run as ONE vectorised pass: every task has its own victim
parameters θ_i, so the cost is `torch.func.vmap` over tasks of a function that takes the
victim's gradient with `torch.func.grad` at θ_i; the sum of the N independent costs is
differentiated, which gives each task's latents exactly their own gradient (as the restart axis
of the attacks). The inner optimiser is SGD as in Algorithm 2; `inner_optimizer="adam"` is the
official code's choice (Adam, fresh for every meta step).

The generator runs in eval mode throughout (as in every attack, docs/decisions/003): its
BN running statistics are fixed buffers; w are its parameters. Everything a meta step needs
(w, RNG state, task-sampling permutation and cursor, step) is in `MetaState`, which exports to
plain tensors/ints/lists (torch.load(weights_only=True)-safe) and resumes bit-exactly on the
same device and thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from gi_core.errors import ConfigError
from gi_core.generators import Generator
from gi_core.gradients import gradient_fn, prepare_victim
from gi_core.objectives import DISTANCES, gradient_distance, total_variation

Weights = dict[str, Tensor]  # generator parameter name -> tensor
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class GIMLConfig:
    """Every quantity of Algorithm 2. Defaults follow the official code where it has one
    (λ = z_norm = 1e-3, η_z = 3e-2, α = 1e-3, TV 1e-4); N, τ, β are the paper's symbols."""

    tasks_per_step: int = 4  # N
    meta_steps: int = 1000
    latent_iterations: int = 500  # iterations of the argmin in line 5
    latent_lr: float = 3e-2  # η_z
    latent_optimizer: str = "adam"  # adam (as every GI-z search) | sgd
    latent_penalty: float = 1e-3  # λ of Σ_j ‖z_ij‖₂ (not squared)
    inner_steps: int = 10  # τ
    inner_lr: float = 1e-3  # α
    inner_optimizer: str = "sgd"  # sgd (Algorithm 2) | adam (official code)
    meta_lr: float = 0.5  # β of the Reptile interpolation
    distance: str = "cosine"
    tv: float = 1e-4
    seed: int = 0  # seeds the task order and the latent initialisations

    def __post_init__(self) -> None:
        for name in ("tasks_per_step", "meta_steps", "latent_iterations"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        _require(self.inner_steps >= 0, "inner_steps", "must be >= 0")
        for name in ("latent_lr", "inner_lr"):
            _require(getattr(self, name) > 0, name, "must be > 0")
        for name in ("latent_penalty", "tv"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(0.0 < self.meta_lr <= 1.0, "meta_lr", "must be in (0, 1]")
        for name in ("latent_optimizer", "inner_optimizer"):
            _require(getattr(self, name) in OPTIMIZERS, name, f"must be one of {OPTIMIZERS}")
        _require(self.distance in DISTANCES, "distance", f"must be one of {DISTANCES}")


def _require(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise ConfigError(f"giml.{name}: {rule}")


@dataclass(frozen=True)
class GIMLTask:
    """One FL report as an inversion task: victim parameters θ_i, observed gradient g_i (in
    θ's parameter order), labels (B,), and the sparsity masks when the defense dropped entries."""

    theta: dict[str, Tensor]
    target: list[Tensor]
    labels: Tensor
    masks: list[Tensor] | None = None


@dataclass(frozen=True)
class TaskStack:
    """N tasks stacked on a leading task axis: θ {name: (N, *shape)}, target [(N, *shape)],
    labels (N, B), masks [(N, *shape)] or None."""

    theta: dict[str, Tensor]
    target: list[Tensor]
    labels: Tensor
    masks: list[Tensor] | None

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def stack_tasks(tasks: Sequence[GIMLTask]) -> TaskStack:
    if not tasks:
        raise ConfigError("giml: no tasks to stack")
    if len({int(t.labels.shape[0]) for t in tasks}) != 1:
        raise ConfigError("giml: the tasks of one meta step must share the batch size B")
    with_masks = [t.masks is not None for t in tasks]
    if any(with_masks) and not all(with_masks):
        raise ConfigError("giml: either every task has sparsity masks or none has")
    masks = None
    if all(with_masks):
        masks = [torch.stack(m) for m in zip(*(t.masks or [] for t in tasks), strict=True)]
    return TaskStack(
        theta={k: torch.stack([t.theta[k] for t in tasks]) for k in tasks[0].theta},
        target=[torch.stack(g) for g in zip(*(t.target for t in tasks), strict=True)],
        labels=torch.stack([t.labels for t in tasks]),
        masks=masks,
    )


class TaskCost:
    """c(G_w(z_i); θ_i, g_i) = d(∇θ ℓ(f_θi(G_w(z_i)), y_i), g_i) + tv·TV(G_w(z_i)), for N tasks
    at once (vmapped over the task axis, each task with its own θ_i)."""

    def __init__(self, victim: nn.Module, generator: Generator, config: GIMLConfig) -> None:
        self.grad_of = gradient_fn(prepare_victim(victim))
        self.generator = generator.eval()
        self.buffers = {n: b.detach() for n, b in generator.named_buffers()}
        self.config = config

    def images(self, w: Weights, z: Tensor) -> Tensor:
        """G_w(z) for z (N, B, d) -> (N, B, C, H, W) in [0, 1]."""
        x = functional_call(self.generator, {**w, **self.buffers}, (z.flatten(0, 1),))
        return x.unflatten(0, z.shape[:2])

    def costs(self, tasks: TaskStack, images: Tensor) -> Tensor:
        """(N,) costs of images (N, B, C, H, W) against each task's gradient."""
        kind, tv = self.config.distance, self.config.tv

        def one(
            theta: dict[str, Tensor],
            target: list[Tensor],
            labels: Tensor,
            x: Tensor,
            masks: list[Tensor] | None,
        ) -> Tensor:
            grads, _ = self.grad_of(theta, x, labels)
            cost = gradient_distance(list(grads.values()), target, kind=kind, masks=masks)
            return cost + tv * total_variation(x) if tv > 0 else cost

        if tasks.masks is None:
            return vmap(lambda th, g, y, x: one(th, g, y, x, None))(
                tasks.theta, tasks.target, tasks.labels, images
            )
        return vmap(one)(tasks.theta, tasks.target, tasks.labels, images, tasks.masks)


def latent_penalty(z: Tensor) -> Tensor:
    """Σ_j ‖z_ij‖₂ per task for z (N, B, d) -> (N,): the norm itself, not its square."""
    return torch.linalg.vector_norm(z, dim=-1).sum(-1)


def latent_search(
    cost: Callable[[Tensor], Tensor], z0: Tensor, config: GIMLConfig
) -> tuple[Tensor, Tensor]:
    """Line 5 for N tasks at once: minimise c_i(z_i) + λ Σ_j ‖z_ij‖₂ from z0 (N, B, d).

    `cost` maps z (N, B, d) to (N,) task costs; the summed objective's gradient w.r.t. z_i is
    task i's own, and both optimisers act elementwise, so this equals N separate searches.
    Returns the last iterate z* (N, B, d) and its objective (N,).
    """
    z = z0.detach().clone().requires_grad_(True)
    opt = _optimizer(config.latent_optimizer, [z], lr=config.latent_lr)
    for _ in range(config.latent_iterations):
        opt.zero_grad(set_to_none=True)
        objective = cost(z) + config.latent_penalty * latent_penalty(z)
        objective.sum().backward()
        opt.step()
    with torch.enable_grad():  # the cost differentiates the victim, not z
        final = cost(z.detach()) + config.latent_penalty * latent_penalty(z.detach())
    return z.detach(), final.detach()


def adapt(
    w: Weights, loss: Callable[[Weights], Tensor], *, steps: int, lr: float, optimizer: str
) -> tuple[Weights, list[float]]:
    """Line 6: τ steps of w' ← w' − α ∇ loss(w') from w' = w (line 4); w is not modified.

    Returns w' and the loss before each step (for the meta-training log)."""
    w_prime = {k: v.detach().clone().requires_grad_(True) for k, v in w.items()}
    opt = _optimizer(optimizer, list(w_prime.values()), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        value = loss(w_prime)
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    return {k: v.detach() for k, v in w_prime.items()}, losses


def reptile_update(w: Weights, w_prime: Weights, *, beta: float) -> Weights:
    """Line 8: w ← (1 − β) w + β w'."""
    return {k: (1.0 - beta) * w[k] + beta * w_prime[k] for k in w}


def _optimizer(kind: str, params: list[Tensor], *, lr: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


@dataclass
class MetaState:
    """Everything needed to continue meta-training bit-exactly after `step` meta steps."""

    step: int
    weights: Weights  # the generator's parameters w (buffers stay those of the module)
    rng: Tensor  # torch.Generator state (uint8): task permutations and latent inits
    order: Tensor  # (num_tasks,) int64 current task permutation
    cursor: int  # tasks of `order` already used
    log: list[dict[str, float]] = field(default_factory=list)  # one entry per meta step

    def export(self) -> dict[str, Any]:
        """Plain tensors, ints, floats, lists: loadable with torch.load(weights_only=True)."""
        return {
            "step": self.step,
            "weights": {k: v.detach().cpu().clone() for k, v in self.weights.items()},
            "rng": self.rng.clone(),
            "order": self.order.clone(),
            "cursor": self.cursor,
            "log": [dict(e) for e in self.log],
        }

    @classmethod
    def restore(cls, data: dict[str, Any], *, device: torch.device) -> MetaState:
        return cls(
            step=int(data["step"]),
            weights={k: v.to(device) for k, v in data["weights"].items()},
            rng=data["rng"].clone(),
            order=data["order"].clone(),
            cursor=int(data["cursor"]),
            log=[dict(e) for e in data["log"]],
        )


def initial_state(generator: Generator, *, num_tasks: int, config: GIMLConfig) -> MetaState:
    """Step 0: w = the (untrained) generator's parameters, a seeded task permutation."""
    if num_tasks < config.tasks_per_step:
        raise ConfigError(
            f"giml.tasks_per_step: {config.tasks_per_step} tasks per step but the task set "
            f"has only {num_tasks}; simulate more clients/rounds or lower tasks_per_step"
        )
    rng = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(num_tasks, generator=rng)
    weights = {n: p.detach().clone() for n, p in generator.named_parameters()}
    return MetaState(0, weights, rng.get_state(), order, 0, [])


def sample_tasks(state: MetaState, *, n: int, rng: torch.Generator) -> list[int]:
    """Line 3: the next n tasks of a seeded permutation; a fresh permutation when it runs out
    (every task is used once per pass). Mutates state.order / state.cursor."""
    if state.cursor + n > len(state.order):
        state.order = torch.randperm(len(state.order), generator=rng)
        state.cursor = 0
    picked = state.order[state.cursor : state.cursor + n].tolist()
    state.cursor += n
    return [int(i) for i in picked]


def meta_step(
    state: MetaState,
    *,
    cost: TaskCost,
    load: Callable[[list[int]], Sequence[GIMLTask]],
    config: GIMLConfig,
) -> MetaState:
    """One meta step of Algorithm 2 (lines 3-8); returns the state after it."""
    rng = torch.Generator()
    rng.set_state(state.rng)
    new = MetaState(
        state.step, state.weights, state.rng, state.order.clone(), state.cursor, list(state.log)
    )
    picked = sample_tasks(new, n=config.tasks_per_step, rng=rng)
    tasks = stack_tasks(load(picked))
    device = next(iter(state.weights.values())).device
    dim = cost.generator.latent_dim
    z0 = torch.randn((tasks.size, int(tasks.labels.shape[1]), dim), generator=rng).to(device)
    w = {k: v.detach() for k, v in state.weights.items()}
    z_star, searched = latent_search(lambda z: cost.costs(tasks, cost.images(w, z)), z0, config)
    w_prime, inner = adapt(
        w,
        lambda wp: cost.costs(tasks, cost.images(wp, z_star)).sum(),
        steps=config.inner_steps,
        lr=config.inner_lr,
        optimizer=config.inner_optimizer,
    )
    new.weights = reptile_update(w, w_prime, beta=config.meta_lr)
    new.rng, new.step = rng.get_state(), state.step + 1
    new.log.append(_log_entry(new.step, picked, searched, inner))
    return new


def _log_entry(step: int, picked: list[int], searched: Tensor, inner: list[float]) -> dict:
    n = max(len(picked), 1)
    return {
        "step": float(step),
        "latent_objective": float(searched.mean()),
        "inner_first": inner[0] / n if inner else float("nan"),
        "inner_last": inner[-1] / n if inner else float("nan"),
    }


def meta_train(
    state: MetaState,
    *,
    cost: TaskCost,
    load: Callable[[list[int]], Sequence[GIMLTask]],
    config: GIMLConfig,
    on_step: Callable[[MetaState], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> MetaState:
    """Meta steps from `state` until config.meta_steps; `on_step` sees each new state (to
    checkpoint and snapshot), `should_stop` is checked before every step."""
    while state.step < config.meta_steps:
        if should_stop is not None and should_stop():
            return state
        state = meta_step(state, cost=cost, load=load, config=config)
        if on_step is not None:
            on_step(state)
    return state


def generator_state(generator: Generator, weights: Weights) -> dict[str, Tensor]:
    """A plain state_dict of `generator` with parameters w (what a snapshot stores)."""
    state = {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}
    state.update({k: v.detach().cpu().clone() for k, v in weights.items()})
    return state
