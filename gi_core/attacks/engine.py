"""The optimisation engine shared by every attack.

An attack is a sequence of `Stage`s. Each stage optimises some variables with Adam, LR ×0.1 at
3/8, 5/8 and 7/8 of its iterations (the paper's schedule). Every variable carries a *row*
dimension first: the R restarts of one problem, or the P × R restarts of P problems solved
together (`solve_batch`, problem-major). Adam is elementwise, so a row that turns NaN never
leaks into the others, and each problem's rows see exactly the updates they would see alone.

The cost of all rows is computed by one of two paths, chosen per configuration by a measured
`PathPolicy`: `vmap` (torch.func: vmap over rows of grad of the victim's loss) or `loop` (plain
autograd, one row at a time). BN statistics are captured only when a BN term is on.

Options that save compute (off by default): successive-halving restart pruning (`prune_at`) and
plateau stopping (`plateau_window`, `plateau_tol`).

The whole loop state (stage, iteration, variables, optimiser and scheduler state, loss curve,
pruning and plateau state) can be exported at any iteration boundary and restored to continue
bit-for-bit; in a batch each problem exports its own single-problem state.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gi_core.attacks.colour import COLOURS
from gi_core.errors import ConfigError
from gi_core.gradients import BNStats, forward_with_bn_stats, prepare_victim, victim_params
from gi_core.objectives import (
    DISTANCES,
    TV_FORMS,
    bn_regulariser,
    gradient_distance,
    total_variation,
)

Variables = dict[str, Tensor]
LABEL_MODES = ("given", "idlg", "yin", "count")
PATHS = ("auto", "vmap", "loop")
CostFn = Callable[[Tensor], Tensor]  # images (rows, B, C, H, W) in [0, 1] -> costs (rows,)
# Fields that leave a cell's identity unchanged at their default (see tasks.cells): options
# added after cells were stored, which change nothing unless turned on.
OPTIONAL = {"omit_if_default": True}


@dataclass(frozen=True)
class InversionProblem:
    """Everything the attacker knows: θ (the victim), the observed gradient g, the labels, and
    for "+BN" attacks the batch's BN statistics. `masks` come with the sparsity defense."""

    victim: nn.Module
    target: list[Tensor]
    labels: Tensor
    image_shape: tuple[int, int, int]
    masks: list[Tensor] | None = None
    bn_target: BNStats | None = None

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class BaseConfig:
    """Fields every method shares. Regularisers are off unless their weight is set (the BN
    prior is enabled only by the "+bn" methods — never silently).

    `prune_at`: fractions of each stage's iterations at which the worse half of the surviving
    restarts (by current cost) stops being optimised (successive halving; pruned restarts keep
    their images and still compete in the final argmin). `plateau_window` > 0: the last stage
    stops once the best cost has not improved by a relative `plateau_tol` for that many
    iterations. Both are off by default."""

    restarts: int = 4
    distance: str = "cosine"
    tv: float = 1e-4
    tv_form: str = "interior"  # interior (Geiping et al.'s code) | zero_pad (see objectives)
    bn: float = 0.0
    # Adam on sign(∇) instead of ∇, as inversefed and the official GIAS code do for pixels.
    signed_grad: bool = False
    curve_every: int = 10
    labels: str = "given"  # given (the paper's threat model) | idlg (B = 1) | yin | count (repeats)
    # Which preset the values came from (registry.PRESETS); a label stored with the cell so that
    # tuned and paper settings are never mistaken for each other. It changes no computation.
    preset: str = "paper"
    prune_at: tuple[float, ...] = field(default=(), metadata=OPTIONAL)
    plateau_window: int = field(default=0, metadata=OPTIONAL)
    plateau_tol: float = field(default=1e-3, metadata=OPTIONAL)
    # The data's colour model (gi_core.attacks.colour): gray = one-channel reconstructions.
    # Threat-model knowledge the grid sets for every method from `data.colour`.
    colour: str = field(default="rgb", metadata=OPTIONAL)
    # Where tuned values were tuned (canonical JSON: grid, data, victim, budget, and which of
    # those differ from the grid running them; tasks.spec.mark_provenance). It changes no
    # computation; "" for values not tuned (the paper's).
    tuned_on: str = field(default="", metadata=OPTIONAL)

    def __post_init__(self) -> None:
        for name in ("restarts", "curve_every"):
            _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        for name in ("tv", "bn", "plateau_window", "plateau_tol"):
            _check(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        _check(self.distance in DISTANCES, "distance", f"must be one of {DISTANCES}", self.distance)
        _check(self.tv_form in TV_FORMS, "tv_form", f"must be one of {TV_FORMS}", self.tv_form)
        _check(self.labels in LABEL_MODES, "labels", f"must be one of {LABEL_MODES}", self.labels)
        _check(self.colour in COLOURS, "colour", f"must be one of {COLOURS}", self.colour)
        prune = tuple(float(f) for f in self.prune_at)  # YAML gives a list; keep it hashable
        ok = all(0 < f < 1 for f in prune) and list(prune) == sorted(set(prune))
        _check(ok, "prune_at", "must be increasing fractions in (0, 1)", self.prune_at)
        object.__setattr__(self, "prune_at", prune)


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"params.{name}: {rule} (got {value!r})")


@dataclass(frozen=True)
class Stage:
    """One optimisation stage. `start` maps the previous stage's variables to this stage's
    (the first stage gets the attack's initial variables); `render` maps variables to images
    (rows, B, C, H, W) in [0, 1]; `project` runs in place after each step (e.g. box [0, 1])."""

    name: str
    iterations: int
    lr: float
    trainable: tuple[str, ...]
    render: Callable[[Variables], Tensor]
    start: Callable[[Variables], Variables] = lambda v: v
    project: Callable[[Variables], None] | None = None


@dataclass(frozen=True)
class Progress:
    stage: str
    iteration: int  # global, over all stages
    total: int
    best_cost: float
    export_state: Callable[[], dict[str, Any]]  # snapshots the loop when called: call it inside
    # the callback (e.g. to checkpoint every k iterations); the state resumes after `iteration`
    # Renders the current images (R, B, C, H, W) in [0, 1] when called (e.g. intermediate
    # snapshots for figures); rendering costs a generator forward pass, so only on demand.
    render: Callable[[], Tensor] | None = None


@dataclass
class AttackResult:
    """`images` (B, C, H, W) in [0, 1] are the chosen restart's images after the last step."""

    images: Tensor
    restart_images: Tensor  # (R, B, C, H, W)
    restart_costs: Tensor  # (R,) final cost of each restart, evaluated on its final images
    best_restart: int  # -1 when every restart diverged
    loss_curve: Tensor  # (points, R); NaN for restarts pruned before that point
    curve_iterations: Tensor  # (points,) global iteration of each curve point
    status: str  # ok | diverged | interrupted
    iterations: int  # iterations run, over all stages
    state: dict[str, Any] | None = None  # set when interrupted: pass back as `state=` to resume
    extras: dict[str, Any] = field(default_factory=dict)  # restart_iterations, path


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
    if path == "vmap":
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


def _vmap_cost(problems: Sequence[InversionProblem], config: BaseConfig) -> CostFn:
    """torch.func: vmap over the rows of each problem (and over problems, with per-problem
    victim parameters, targets, labels, masks and BN targets) of grad of the victim's loss."""
    template, first = exact_batchnorm_(prepare_victim(problems[0].victim)), problems[0]

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
            first.image_shape,
            masks=data.get("masks"),
            bn_target=data.get("bn"),
        )
        return _row_cost(list(grads.values()), x, stats, problem, config)

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


def run_stages(
    stages: Sequence[Stage],
    problem: InversionProblem,
    config: BaseConfig,
    initial: Variables,
    *,
    state: dict[str, Any] | None,
    progress: Callable[[Progress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> AttackResult:
    """`optimise` with the cost of `problem` under `config`: the body of every attack.
    Inside `capture_stages` (batched cells) the call is handed to the batch instead."""
    call = StagesCall(stages, problem, config, initial, state, progress, should_stop)
    if _INTERCEPT:
        return _INTERCEPT[-1](call)
    return solve_batch([call])[0]


@dataclass(frozen=True)
class StagesCall:
    """The arguments of one attack's `run_stages`: what a batch needs to solve it."""

    stages: Sequence[Stage]
    problem: InversionProblem
    config: BaseConfig
    initial: Variables
    state: dict[str, Any] | None = None
    progress: Callable[[Progress], None] | None = None
    should_stop: Callable[[], bool] | None = None


# A stack of handlers for run_stages (gi_core.attacks.batched sets one while it captures or
# replays an attack); empty: run_stages solves its problem itself.
_INTERCEPT: list[Callable[[StagesCall], AttackResult]] = []


def solve_batch(calls: Sequence[StagesCall], *, path: str = "auto") -> list[AttackResult]:
    """Solve calls with identical stages and config together (rows = P problems × R restarts);
    one result per call, equal to solving it alone within float tolerance. A single call with
    a `state` resumes it."""
    first = calls[0]
    problems = [c.problem for c in calls]
    config = first.config
    chosen = choose_path(problems, config.restarts, path)
    run = _Run(
        first.stages,
        make_batch_cost(problems, config, path=chosen),
        config,
        problems=len(calls),
        progress=[c.progress for c in calls],
        should_stop=[c.should_stop for c in calls],
    )
    initial = {k: torch.cat([c.initial[k] for c in calls]) for k in first.initial}
    results = run.execute(initial, first.state if len(calls) == 1 else None)
    for r in results:
        r.extras["path"] = chosen
    return results


def milestones(iterations: int) -> list[int]:
    return [iterations * k // 8 for k in (3, 5, 7)]


def prune_iterations(iterations: int, fractions: Sequence[float]) -> list[int]:
    """Iterations of a stage after whose step the worse half of the restarts is pruned."""
    return sorted({min(iterations - 1, max(0, round(f * iterations))) for f in fractions})


def optimise(
    stages: Sequence[Stage],
    cost: CostFn,
    initial: Variables,
    *,
    curve_every: int,
    state: dict[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    signed_grad: bool = False,
) -> AttackResult:
    """Run `stages` in order from `initial` (or from an exported `state`) with a given cost."""
    config = BaseConfig(restarts=1, curve_every=curve_every, signed_grad=signed_grad)
    run = _Run(stages, cost, config, problems=1, progress=[progress], should_stop=[should_stop])
    return run.execute(initial, state)[0]


class _Run:
    """Mutable loop state of one batch of P problems (kept on an object so it can be exported).

    Variables hold the *active* rows only, problem-major: (P × Ra, ...) where Ra <= R restarts
    survive pruning. `active` (P, Ra) names the surviving restart of each row; `parked` keeps
    every row (P × R, ...) with a pruned restart's variables as they were when it was pruned."""

    def __init__(
        self,
        stages: Sequence[Stage],
        cost: CostFn,
        config: BaseConfig,
        *,
        problems: int,
        progress: Sequence[Callable[[Progress], None] | None],
        should_stop: Sequence[Callable[[], bool] | None],
    ) -> None:
        self.stages, self.cost, self.config = list(stages), cost, config
        self.problems, self.progress, self.should_stop = problems, progress, should_stop
        self.total = sum(s.iterations for s in stages)
        self.curve: list[Tensor] = []  # each (P × R,): NaN for pruned rows
        self.curve_at: list[int] = []
        self.restarts = 0
        self.active = torch.zeros(0, dtype=torch.long)
        self.parked: Variables | None = None
        self.plateau: dict[str, float] = {"best": math.inf, "since": 0.0}
        self.restart_iterations = 0  # per problem: rows optimised × iterations
        self.stopped: int | None = None  # global iteration at which the plateau rule stopped

    def execute(self, initial: Variables, state: dict[str, Any] | None) -> list[AttackResult]:
        if self.problems > 1 and self.config.plateau_window > 0:
            raise ConfigError("params.plateau_window: plateau stopping runs one cell at a time")
        first, start_it, variables = 0, 0, initial
        rows = int(next(iter(initial.values())).shape[0])
        if state is not None:
            first, start_it, variables = state["stage"], state["iteration"], state["variables"]
            self.curve, self.curve_at = list(state["curve"]), list(state["curve_at"])
            rows = int(next(iter(variables.values())).shape[0])
        self.restarts = int(state.get("restarts", rows)) if state else rows // self.problems
        default_active = torch.arange(self.restarts).expand(self.problems, -1).clone()
        self.active = state.get("active", default_active) if state else default_active
        if state is not None:
            self.parked = state.get("parked")
            self.plateau = dict(state.get("plateau", self.plateau))
            done = sum(s.iterations for s in self.stages[:first]) + start_it
            self.restart_iterations = int(state.get("restart_iterations", done * rows))
        for index in range(first, len(self.stages)):
            resumed = state is not None and index == first
            if not resumed:
                variables = self._enter(self.stages[index], variables)
            result = self._run_stage(
                index, variables, start_it if resumed else 0, state if resumed else None
            )
            if isinstance(result, list):
                return result
            variables = result
        return self._finish(variables)

    # -- rows ---------------------------------------------------------------------------------

    def _rows(self) -> Tensor:
        """(P × Ra,) indices of the active rows among all P × R rows."""
        base = torch.arange(self.problems)[:, None] * self.restarts
        return (base + self.active).flatten()

    def _pruned(self) -> bool:
        return int(self.active.shape[1]) < self.restarts

    def _assemble(self, variables: Variables) -> Variables:
        """All P × R rows: the active ones from `variables`, the pruned ones parked."""
        if self.parked is None or not self._pruned():
            return {k: v.detach() for k, v in variables.items()}
        rows = self._rows().to(next(iter(variables.values())).device)
        full = {k: v.clone() for k, v in self.parked.items()}
        for k, v in variables.items():
            full[k][rows] = v.detach()
        return full

    def _enter(self, stage: Stage, variables: Variables) -> Variables:
        """Map the previous stage's variables (all rows, pruned ones included) into `stage`."""
        full = stage.start(self._assemble(variables))
        if not self._pruned():
            return full
        self.parked = {k: v.detach().clone() for k, v in full.items()}
        rows = self._rows().to(next(iter(full.values())).device)
        return {k: v[rows] for k, v in full.items()}

    def _full(self, costs: Tensor) -> Tensor:
        """(P × Ra,) costs -> (P × R,) with NaN for pruned rows."""
        if not self._pruned():
            return costs
        out = torch.full((self.problems * self.restarts,), torch.nan, device=costs.device)
        out[self._rows().to(costs.device)] = costs
        return out

    # -- the loop -----------------------------------------------------------------------------

    def _optimiser(
        self,
        stage: Stage,
        variables: Variables,
        opt_state: dict[str, Any] | None,
        sched_state: dict[str, Any] | None,
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        opt = _adam([variables[k] for k in stage.trainable], lr=stage.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones(stage.iterations), gamma=0.1)
        if opt_state is not None and sched_state is not None:
            opt.load_state_dict(opt_state)
            sched.load_state_dict(_unpack_sched(sched_state))
        return opt, sched

    def _run_stage(
        self, index: int, variables: Variables, start_it: int, state: dict[str, Any] | None
    ) -> Variables | list[AttackResult]:
        stage = self.stages[index]
        variables = {
            k: v.detach().clone().requires_grad_(k in stage.trainable) for k, v in variables.items()
        }
        opt, sched = self._optimiser(
            stage, variables, *((state["optimizer"], state["scheduler"]) if state else (None, None))
        )
        offset = sum(s.iterations for s in self.stages[:index])
        prunes = prune_iterations(stage.iterations, self.config.prune_at)
        last = index == len(self.stages) - 1
        for it in range(start_it, stage.iterations):
            if last and self._plateau_reached(offset + it):
                self.stopped = offset + it
                break
            if any(stop() for stop in self.should_stop if stop is not None):
                return self._interrupted(index, it, variables, opt, sched)
            costs = self._step(stage, variables, opt, sched)
            self.restart_iterations += int(self.active.shape[1])
            full = self._full(costs)
            if it % self.config.curve_every == 0:
                self.curve.append(full)
                self.curve_at.append(offset + it)
            if it in prunes and self.active.shape[1] > 1:
                variables, opt, sched = self._prune(stage, variables, opt, sched, costs)
            if last and self.config.plateau_window > 0:
                self._track_plateau(full, offset + it + 1)
            self._report(stage, index, it + 1, offset, variables, opt, sched, full)
        return {k: v.detach() for k, v in variables.items()}

    def _step(
        self,
        stage: Stage,
        variables: Variables,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler,
    ) -> Tensor:
        opt.zero_grad(set_to_none=True)
        costs = self.cost(stage.render(variables))
        # Gradients of the trainable variables only: on the plain-autograd path the victim's
        # parameters are leaves too, and their gradient would be wasted work.
        trainable = [variables[k] for k in stage.trainable]
        grads = torch.autograd.grad(costs.sum(), trainable, allow_unused=True)
        for v, g in zip(trainable, grads, strict=True):
            v.grad = g.sign() if self.config.signed_grad and g is not None else g
        opt.step()
        sched.step()
        if stage.project is not None:
            with torch.no_grad():
                stage.project(variables)
        return costs.detach()

    def _prune(
        self,
        stage: Stage,
        variables: Variables,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler,
        costs: Tensor,
    ) -> tuple[Variables, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Successive halving: keep the ceil(Ra / 2) lowest-cost restarts of each problem (by
        the costs of this iteration; NaN counts as +inf, ties keep the lower restart index)."""
        n_problems, n_active = self.active.shape
        keep = math.ceil(n_active / 2)
        ranked = torch.nan_to_num(costs.view(n_problems, n_active).cpu(), nan=math.inf)
        order = torch.sort(ranked, dim=1, stable=True).indices[:, :keep].sort(dim=1).values
        if (
            self._pruned() and self.parked is not None
        ):  # refresh the parked copy of rows that are about to be parked
            rows = self._rows().to(costs.device)
            for k, v in variables.items():
                self.parked[k][rows] = v.detach()
        else:
            self.parked = {k: v.detach().clone() for k, v in variables.items()}
        local = (torch.arange(n_problems)[:, None] * n_active + order).flatten()
        self.active = torch.gather(self.active, 1, order)
        dev_local = local.to(costs.device)
        kept = {
            k: v.detach()[dev_local].clone().requires_grad_(k in stage.trainable)
            for k, v in variables.items()
        }
        opt_state = _select_rows(opt.state_dict(), dev_local, n_problems * n_active)
        opt, sched = self._optimiser(stage, kept, opt_state, _pack_sched(sched.state_dict()))
        return kept, opt, sched

    def _track_plateau(self, costs: Tensor, iteration: int) -> None:
        """Remember the iteration of the last relative improvement of the best cost by tol."""
        best = _best_cost(costs)
        ref = self.plateau["best"]
        if math.isfinite(best) and (
            not math.isfinite(ref) or best < ref - self.config.plateau_tol * abs(ref)
        ):
            self.plateau = {"best": best, "since": float(iteration)}

    def _plateau_reached(self, iteration: int) -> bool:
        window = self.config.plateau_window
        return window > 0 and iteration - int(self.plateau["since"]) >= window

    def _report(
        self,
        stage: Stage,
        index: int,
        it: int,
        offset: int,
        variables: Variables,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler,
        costs: Tensor,
    ) -> None:
        per = costs.view(self.problems, self.restarts)
        for p, callback in enumerate(self.progress):
            if callback is None:
                continue
            export = _exporter(self, index, it, variables, opt, sched, p)
            render = _renderer(self, stage, variables, p)
            best = _best_cost(per[p])
            callback(Progress(stage.name, offset + it, self.total, best, export, render))

    # -- results ------------------------------------------------------------------------------

    def _finish(self, variables: Variables) -> list[AttackResult]:
        images = self.stages[-1].render(self._assemble(variables)).detach()
        with torch.enable_grad():  # the cost differentiates the victim, not the images
            final = self.cost(images).detach()
        done = self.stopped if self.stopped is not None else self.total
        return [
            self._result(images[sl], final[sl], self._curve(final, sl), done)
            for sl in self._slices()
        ]

    def _slices(self) -> list[slice]:
        r = self.restarts
        return [slice(p * r, (p + 1) * r) for p in range(self.problems)]

    def _result(self, images: Tensor, final: Tensor, curve: Tensor, done: int) -> AttackResult:
        finite = torch.isfinite(final)
        status = "ok" if bool(finite.any()) else "diverged"
        best = int(torch.where(finite, final, torch.inf).argmin()) if status == "ok" else -1
        chosen = images[best] if best >= 0 else torch.nan_to_num(images[0], nan=0.0).clamp(0, 1)
        return AttackResult(
            images=chosen,
            restart_images=images,
            restart_costs=final,
            best_restart=best,
            loss_curve=curve,
            curve_iterations=torch.tensor(self.curve_at + [done]),
            status=status,
            iterations=done,
            extras={"restart_iterations": self.restart_iterations},
        )

    def _curve(self, last: Tensor, sl: slice) -> Tensor:
        return torch.stack([*self.curve, last])[:, sl].cpu()

    def _interrupted(
        self,
        index: int,
        it: int,
        variables: Variables,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler,
    ) -> list[AttackResult]:
        with torch.no_grad():
            images = self.stages[index].render(self._assemble(variables)).detach()
        done = sum(s.iterations for s in self.stages[:index]) + it
        results = []
        for p, sl in enumerate(self._slices()):
            empty = torch.full((self.restarts,), torch.nan)
            curve = torch.stack(self.curve)[:, sl].cpu() if self.curve else empty[None]
            results.append(
                AttackResult(
                    images=images[sl][0],
                    restart_images=images[sl],
                    restart_costs=empty,
                    best_restart=-1,
                    loss_curve=curve,
                    curve_iterations=torch.tensor(self.curve_at),
                    status="interrupted",
                    iterations=done,
                    state=_exporter(self, index, it, variables, opt, sched, p)(),
                    extras={"restart_iterations": self.restart_iterations},
                )
            )
        return results


def _renderer(run: _Run, stage: Stage, variables: Variables, problem: int) -> Callable[[], Tensor]:
    """Renders problem `problem`'s current images (R, B, C, H, W) on demand."""

    def render() -> Tensor:
        with torch.no_grad():
            images = stage.render(run._assemble(variables)).detach()
        return images[problem * run.restarts : (problem + 1) * run.restarts]

    return render


def _exporter(
    run: _Run,
    index: int,
    it: int,
    variables: Variables,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    problem: int,
) -> Callable[[], dict[str, Any]]:
    """A closure that snapshots problem `problem` at the boundary *before* iteration `it` of a
    stage, as the state of a single-problem run (a batch exports one state per cell)."""

    def export() -> dict[str, Any]:
        n_problems, n_active = run.active.shape
        rows = slice(problem * n_active, (problem + 1) * n_active)
        full = slice(problem * run.restarts, (problem + 1) * run.restarts)
        local = torch.arange(rows.start, rows.stop)
        return {
            "stage": index,
            "iteration": it,
            "variables": {k: v.detach()[rows].clone() for k, v in variables.items()},
            "optimizer": _select_rows(opt.state_dict(), local, n_problems * n_active),
            "scheduler": _pack_sched(sched.state_dict()),
            "curve": [c[full].clone() for c in run.curve],
            "curve_at": list(run.curve_at),
            "restarts": run.restarts,
            "active": run.active[problem : problem + 1].clone(),
            "parked": None
            if run.parked is None
            else {k: v[full].clone() for k, v in run.parked.items()},
            "plateau": dict(run.plateau),
            "restart_iterations": run.restart_iterations,
        }

    return export


def _adam(params: list[Tensor], *, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel on CPU: there it was 8x faster than the default foreach
    kernel on GI-z/w's per-image generator copies (16 copies of DCGAN-64,
    benchmarks/performance.py) and agrees with it to float rounding (1.2e-7 after 5 steps).
    On CUDA the default (foreach) kernel: the fused CUDA kernel refuses the generator copies'
    gradients, whose strides differ from their parameters' after vmap ("params, grads, exp_avgs,
    and exp_avg_sqs must have same dtype, device, and layout", torch 2.11 on an H200,
    docs/results/gpu.md). The optimiser state has the same layout either way, so checkpoints
    resume on either kernel."""
    if all(p.device.type == "cpu" for p in params):
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)
        except RuntimeError:  # no fused kernel for this dtype
            pass
    return torch.optim.Adam(params, lr=lr)


def _select_rows(obj: Any, index: Tensor, rows: int) -> Any:
    """A copy of an optimiser state dict keeping rows `index` of every per-row tensor (those
    whose first dimension is `rows`); scalars such as Adam's step are copied whole."""
    if isinstance(obj, Tensor):
        if obj.dim() > 0 and obj.shape[0] == rows:
            return obj.detach()[index.to(obj.device)].clone()
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _select_rows(v, index, rows) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_select_rows(v, index, rows) for v in obj)
    return obj


def _pack_sched(sd: dict[str, Any]) -> dict[str, Any]:
    # MultiStepLR keeps its milestones in a Counter, which weights_only loading refuses.
    return {**sd, "milestones": dict(sd["milestones"])}


def _unpack_sched(sd: dict[str, Any]) -> dict[str, Any]:
    return {**sd, "milestones": collections.Counter(sd["milestones"])}


def _best_cost(costs: Tensor) -> float:
    finite = costs[torch.isfinite(costs)]
    return float(finite.min()) if finite.numel() else float("nan")
