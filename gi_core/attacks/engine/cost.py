"""The cost of all rows, on one of two paths chosen per configuration by a measured
`PathPolicy`: `vmap` (torch.func: vmap over rows of grad of the victim's loss) or `loop` (plain
autograd, one row at a time, with a custom autograd Function that frees each row's graph).
BN statistics are captured only when a BN term is on. Rows are problem-major: P problems ×
R rows each; a row's cost is gradient distance (eq. 3) + TV (eq. 4) + BN prior, as in
gi_core.objectives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gi_core.attacks.engine.types import PATHS, BaseConfig, CostFn, InversionProblem, _check
from gi_core.errors import ConfigError
from gi_core.fedavg import simulate
from gi_core.gradients import BNStats, forward_with_bn_stats, prepare_victim, victim_params
from gi_core.objectives import bn_regulariser, gradient_distance, total_variation


@dataclass(frozen=True)
class PathPolicy:
    """Which cost path pays, from benchmarks/performance.py (docs/results/performance.md).

    Measured on CPU (torch 2.14.1, 1 thread, GI-x; vmap with the exact primitive-op BN): the
    plain autograd loop wins at 1–2 rows (vmap 0.6–0.9x) and on ResNet18 (vmap 0.7–0.85x at
    B = 1); on convnet vmap wins from 4 rows on (B = 1: 1.3x at 4 rows, 1.5x at 8, 2x at 16;
    B = 4: 1.2x at 4, 2.1x at 16, one 0.97x at 8). B > 4 is unmeasured and stays on the loop.
    On CUDA vectorising is expected to pay from 2 rows on (not measured: no GPU was lent)."""

    cpu_vmap_max_batch: int = 4
    cpu_vmap_min_rows: int = 4
    cpu_vmap_max_params: int = 1_000_000
    cuda_vmap_min_rows: int = 2

    def choose(self, *, device: torch.device, batch: int, rows: int, params: int) -> str:
        if device.type == "cuda":
            return "vmap" if rows >= self.cuda_vmap_min_rows else "loop"
        small = batch <= self.cpu_vmap_max_batch and params <= self.cpu_vmap_max_params
        return "vmap" if small and rows >= self.cpu_vmap_min_rows else "loop"


DEFAULT_POLICY = PathPolicy()


def choose_path(problems: Sequence[InversionProblem], restarts: int, path: str = "auto") -> str:
    """`path` itself unless "auto"; then DEFAULT_POLICY for the problems' shape and device."""
    _check(path in PATHS, "path", f"must be one of {PATHS}", path)
    if any(p.simulated for p in problems):
        return "loop"  # FedAvg / aggregate simulation is written for plain autograd (194)
    if path != "auto":
        return path
    first = problems[0]
    return DEFAULT_POLICY.choose(
        device=first.labels.device,
        batch=first.batch_size,
        rows=len(problems) * restarts,
        params=sum(p.numel() for p in first.victim.parameters()),
    )


def make_batch_cost(
    problems: Sequence[InversionProblem], config: BaseConfig, *, path: str
) -> CostFn:
    """The cost of P problems at once: rows are problem-major (P × rows per problem)."""
    if config.bn > 0 and any(p.bn_target is None for p in problems):
        raise ConfigError("params.bn: the BN prior needs the batch's BN statistics (bn_target)")
    if path == "vmap" and not any(p.simulated for p in problems):
        return _vmap_cost(problems, config)
    return _loop_cost(problems, config)


def _row_cost(
    grads: Sequence[Tensor],
    x: Tensor,
    stats: BNStats,
    problem: InversionProblem,
    config: BaseConfig,
) -> Tensor:
    """The scalar cost of one candidate batch x (B, C, H, W) given its parameter gradient."""
    cost = gradient_distance(grads, problem.target, kind=config.distance, masks=problem.masks)
    if config.tv > 0:
        cost = cost + config.tv * total_variation(x, form=config.tv_form)
    if config.bn > 0:
        cost = cost + config.bn * bn_regulariser(stats, problem.bn_target or [])
    return cost


def _loop_cost(problems: Sequence[InversionProblem], config: BaseConfig) -> CostFn:
    """Plain autograd, one row at a time: the victim's parameters are leaves and
    ∇θ ℓ is taken with create_graph=True (the double backward of Geiping et al.)."""
    victims: dict[int, tuple[nn.Module, dict[str, Tensor]]] = {}
    for p in problems:
        if id(p.victim) not in victims:
            v = prepare_victim(p.victim)
            victims[id(p.victim)] = (
                v,
                {n: t.requires_grad_(True) for n, t in v.named_parameters()},
            )
    n_problems = len(problems)

    def one(x: Tensor, problem: InversionProblem) -> Tensor:  # x: (B, C, H, W)
        victim, params = victims[id(problem.victim)]
        stats: BNStats = []
        if problem.simulated:
            # what the server sees under FedAvg / aggregation, simulated differentiably (194);
            # the BN prior compares statistics of the whole candidate batch at θ_0
            if config.bn > 0:
                _, stats = forward_with_bn_stats(victim, params, x)
            assert problem.protocol is not None
            sent = simulate(victim, params, x, problem.labels, problem.protocol)
            return _row_cost(sent, x, stats, problem, config)
        if config.bn > 0:  # BN statistics hooks only when the BN term is on
            logits, stats = forward_with_bn_stats(victim, params, x)
        else:
            logits = victim(x)
        loss = F.cross_entropy(logits, problem.labels)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        return _row_cost(grads, x, stats, problem, config)

    def cost(xs: Tensor) -> Tensor:
        per = xs.shape[0] // n_problems
        if not xs.requires_grad:  # the final evaluation: nothing will differentiate the rows
            return torch.stack([one(x, problems[i // per]) for i, x in enumerate(xs.unbind(0))])
        return _RowByRow.apply(xs, lambda i, x: one(x, problems[i // per]))

    return cost


class _RowByRow(torch.autograd.Function):
    """Row costs whose gradients w.r.t. the rows are taken row by row, inside the forward.

    Stacking the rows' costs and differentiating their sum kept every row's double-backward
    graph alive at once: R graphs of ResNet18 made R restarts 5-9 % slower than R separate
    runs (docs/results/performance.md). Here each row's graph is freed before the next row
    is built. The gradients are the same numbers: autograd.grad of a row's cost starts from
    1.0, as the sum's backward did, and backward multiplies by the incoming 1.0 exactly."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, xs: Tensor, one_row: Callable[[int, Tensor], Tensor]
    ) -> Tensor:
        costs, grads = [], []
        for i in range(xs.shape[0]):
            with torch.enable_grad():
                # A non-leaf input: module-tracking hooks (FlopCounterMode's) refuse a leaf
                # passed to autograd.grad.
                x = xs[i].detach().requires_grad_(True).clone()
                c = one_row(i, x)
                (g,) = torch.autograd.grad(c, x)
            costs.append(c.detach())
            grads.append(g)
        ctx.save_for_backward(torch.stack(grads))
        return torch.stack(costs)

    @staticmethod
    def backward(ctx: Any, grad_costs: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (grads,) = ctx.saved_tensors
        return grad_costs.view(-1, *([1] * (grads.dim() - 1))) * grads, None


RowCost = Callable[[Tensor, dict[str, Tensor], dict[str, Any]], Tensor]


def _vmap_cost(problems: Sequence[InversionProblem], config: BaseConfig) -> CostFn:
    """torch.func: vmap over the rows of each problem (and over problems, with per-problem
    victim parameters, targets, labels, masks and BN targets) of grad of the victim's loss."""
    template, first = exact_batchnorm_(prepare_victim(problems[0].victim)), problems[0]
    one = _functional_row_cost(template, first.image_shape, config)
    if len(problems) == 1:
        params, data = victim_params(template), _problem_data(first)
        rows = vmap(one, in_dims=(0, None, None))
        return lambda xs: rows(xs, params, data)
    shared = all(p.victim is first.victim for p in problems)
    # Parameter values are those of each problem's own victim (no copy per problem needed).
    params = (
        victim_params(template) if shared else _stack([victim_params(p.victim) for p in problems])
    )
    data = _stack(
        [_problem_data(p, masks=any(q.masks is not None for q in problems)) for p in problems]
    )
    both = vmap(vmap(one, in_dims=(0, None, None)), in_dims=(0, None if shared else 0, 0))
    n = len(problems)
    return lambda xs: both(xs.unflatten(0, (n, -1)), params, data).flatten()


def _functional_row_cost(
    template: nn.Module, image_shape: tuple[int, int, int], config: BaseConfig
) -> RowCost:
    """The cost of one row x (B, C, H, W) as a pure function of the victim's parameters and
    the problem's data (target, labels, masks, BN target), for vmap over rows and problems."""

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, BNStats]:
        if config.bn > 0:
            logits, stats = forward_with_bn_stats(template, params, x)
        else:
            logits, stats = functional_call(template, params, (x,)), []
        return F.cross_entropy(logits, y), stats

    grad_of = grad(loss, has_aux=True)

    def one(x: Tensor, params: dict[str, Tensor], data: dict[str, Any]) -> Tensor:
        grads, stats = grad_of(params, x, data["labels"])
        problem = InversionProblem(
            template,
            data["target"],
            data["labels"],
            image_shape,
            masks=data.get("masks"),
            bn_target=data.get("bn"),
        )
        return _row_cost(list(grads.values()), x, stats, problem, config)

    return one


class _ExactBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch-statistics BN written in primitive ops. Under torch.func.vmap the native
    batch_norm's batching rule gives an inexact double backward (torch 2.14.1: the image
    gradient of the GI cost is off by ~0.1-0.3 % against finite differences in float64, which
    the plain-autograd path matches); with primitive ops vmap is exact and no slower."""

    def _check_input_dim(self, x: Tensor) -> None:
        return None

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, *spatial)
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).pow(2).mean(dims, keepdim=True)  # biased, as BN in training
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def exact_batchnorm_(module: nn.Module) -> nn.Module:
    """Swap every BN layer of a prepared victim (batch statistics only) for _ExactBatchNorm,
    keeping parameter names, so functional_call and the BN-statistics hooks still apply."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            exact = _ExactBatchNorm(
                child.num_features,
                eps=child.eps,
                affine=child.affine,
                track_running_stats=False,
            )
            if child.affine:
                exact.weight, exact.bias = child.weight, child.bias
            setattr(module, name, exact)
        else:
            exact_batchnorm_(child)
    return module


def _problem_data(problem: InversionProblem, *, masks: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {"target": list(problem.target), "labels": problem.labels}
    if problem.masks is not None or masks:
        data["masks"] = list(problem.masks or [torch.ones_like(t) for t in problem.target])
    if problem.bn_target is not None:
        data["bn"] = list(problem.bn_target)
    return data


def _stack(trees: Sequence[Any]) -> Any:
    """Stack matching pytrees (dicts / lists / tuples of tensors) along a new leading dim."""
    head = trees[0]
    if isinstance(head, Tensor):
        return torch.stack(list(trees))
    if isinstance(head, dict):
        return {k: _stack([t[k] for t in trees]) for k in head}
    return type(head)(_stack([t[i] for t in trees]) for i in range(len(head)))
