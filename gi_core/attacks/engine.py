"""The optimisation engine shared by every attack.

An attack is a sequence of `Stage`s. Each stage optimises some variables with Adam, LR ×0.1 at
3/8, 5/8 and 7/8 of its iterations (the paper's schedule). Every variable carries the restart
dimension R first, so all restarts run in ONE vectorised pass: the cost is vmapped over R and the
sum of the R independent costs is differentiated, which gives each restart its own gradient.
Adam is elementwise, so a restart that turns NaN never leaks into the others.

The whole loop state (stage, iteration, variables, optimiser and scheduler state, loss curve) can
be exported at any iteration boundary and restored to continue bit-for-bit.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from gi_core.errors import ConfigError
from gi_core.gradients import BNStats, gradient_fn, prepare_victim, victim_params
from gi_core.objectives import (
    DISTANCES,
    TV_FORMS,
    bn_regulariser,
    gradient_distance,
    total_variation,
)

Variables = dict[str, Tensor]
LABEL_MODES = ("given", "idlg", "yin")
CostFn = Callable[[Tensor], Tensor]  # images (R, B, C, H, W) in [0, 1] -> costs (R,)


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
    prior is enabled only by the "+bn" methods — never silently)."""

    restarts: int = 4
    distance: str = "cosine"
    tv: float = 1e-4
    tv_form: str = "interior"  # interior (Geiping et al.'s code) | zero_pad (see objectives)
    bn: float = 0.0
    # Adam on sign(∇) instead of ∇, as inversefed and the official GIAS code do for pixels.
    signed_grad: bool = False
    curve_every: int = 10
    labels: str = "given"  # given (the paper's threat model) | idlg (B = 1) | yin (unique labels)
    # Which preset the values came from (registry.PRESETS); a label stored with the cell so that
    # tuned and paper settings are never mistaken for each other. It changes no computation.
    preset: str = "paper"

    def __post_init__(self) -> None:
        for name in ("restarts", "curve_every"):
            _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        for name in ("tv", "bn"):
            _check(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        _check(self.distance in DISTANCES, "distance", f"must be one of {DISTANCES}", self.distance)
        _check(self.tv_form in TV_FORMS, "tv_form", f"must be one of {TV_FORMS}", self.tv_form)
        _check(self.labels in LABEL_MODES, "labels", f"must be one of {LABEL_MODES}", self.labels)


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"params.{name}: {rule} (got {value!r})")


@dataclass(frozen=True)
class Stage:
    """One optimisation stage. `start` maps the previous stage's variables to this stage's
    (the first stage gets the attack's initial variables); `render` maps variables to images
    (R, B, C, H, W) in [0, 1]; `project` runs in place after each step (e.g. box [0, 1])."""

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
    loss_curve: Tensor  # (points, R)
    curve_iterations: Tensor  # (points,) global iteration of each curve point
    status: str  # ok | diverged | interrupted
    iterations: int  # iterations run, over all stages
    state: dict[str, Any] | None = None  # set when interrupted: pass back as `state=` to resume
    extras: dict[str, Any] = field(default_factory=dict)


def make_cost(problem: InversionProblem, config: BaseConfig) -> CostFn:
    """c(x) = d(∇θ ℓ(fθ(x), y), g) + tv·TV(x) + bn·R_BN(x), vmapped over the restart axis."""
    if config.bn > 0 and problem.bn_target is None:
        raise ConfigError("params.bn: the BN prior needs the batch's BN statistics (bn_target)")
    victim = prepare_victim(problem.victim)
    params, grad_of = victim_params(victim), gradient_fn(victim)

    def one(x: Tensor) -> Tensor:  # x: (B, C, H, W)
        grads, stats = grad_of(params, x, problem.labels)
        cost = gradient_distance(
            list(grads.values()), problem.target, kind=config.distance, masks=problem.masks
        )
        if config.tv > 0:
            cost = cost + config.tv * total_variation(x, form=config.tv_form)
        if config.bn > 0:
            cost = cost + config.bn * bn_regulariser(stats, problem.bn_target or [])
        return cost

    return vmap(one)


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
    """`optimise` with the cost of `problem` under `config`: the body of every attack."""
    return optimise(
        stages,
        make_cost(problem, config),
        initial,
        curve_every=config.curve_every,
        state=state,
        progress=progress,
        should_stop=should_stop,
        signed_grad=config.signed_grad,
    )


def milestones(iterations: int) -> list[int]:
    return [iterations * k // 8 for k in (3, 5, 7)]


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
    """Run `stages` in order from `initial` (or from an exported `state`)."""
    run = _Run(stages, cost, curve_every, progress, should_stop)
    run.signed_grad = signed_grad
    return run.execute(initial, state)


class _Run:
    """Mutable loop state of one `optimise` call (kept on an object so it can be exported)."""

    def __init__(
        self,
        stages: Sequence[Stage],
        cost: CostFn,
        curve_every: int,
        progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.stages, self.cost, self.curve_every = list(stages), cost, curve_every
        self.progress, self.should_stop = progress, should_stop
        self.total = sum(s.iterations for s in stages)
        self.curve: list[Tensor] = []
        self.curve_at: list[int] = []
        self.signed_grad = False

    def execute(self, initial: Variables, state: dict[str, Any] | None) -> AttackResult:
        first, start_it, variables = 0, 0, initial
        if state is not None:
            first, start_it, variables = state["stage"], state["iteration"], state["variables"]
            self.curve, self.curve_at = list(state["curve"]), list(state["curve_at"])
        for index in range(first, len(self.stages)):
            stage = self.stages[index]
            resumed = state is not None and index == first
            if not resumed:
                variables = stage.start(_detached(variables))
            result = self._run_stage(
                index, variables, start_it if resumed else 0, state if resumed else None
            )
            if isinstance(result, AttackResult):
                return result
            variables = result
        return self._finish(variables)

    def _run_stage(
        self, index: int, variables: Variables, start_it: int, state: dict[str, Any] | None
    ) -> Variables | AttackResult:
        stage = self.stages[index]
        variables = {
            k: v.detach().clone().requires_grad_(k in stage.trainable) for k, v in variables.items()
        }
        opt = torch.optim.Adam([variables[k] for k in stage.trainable], lr=stage.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones(stage.iterations), gamma=0.1)
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(_unpack_sched(state["scheduler"]))
        offset = sum(s.iterations for s in self.stages[:index])
        for it in range(start_it, stage.iterations):
            if self.should_stop is not None and self.should_stop():
                state_now = _exporter(self, index, it, variables, opt, sched)()
                return self._interrupted(state_now, variables, offset + it)
            costs = self._step(stage, variables, opt, sched)
            if it % self.curve_every == 0:
                self.curve.append(costs)
                self.curve_at.append(offset + it)
            if self.progress is not None:
                export = _exporter(self, index, it + 1, variables, opt, sched)
                best = _best_cost(costs)
                render = _renderer(stage, variables)
                self.progress(
                    Progress(stage.name, offset + it + 1, self.total, best, export, render)
                )
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
        costs.sum().backward()
        if self.signed_grad:
            for name in stage.trainable:
                grad = variables[name].grad
                if grad is not None:
                    grad.sign_()
        opt.step()
        sched.step()
        if stage.project is not None:
            with torch.no_grad():
                stage.project(variables)
        return costs.detach()

    def _finish(self, variables: Variables) -> AttackResult:
        images = self.stages[-1].render(variables).detach()
        with torch.enable_grad():  # the cost differentiates the victim, not the images
            final = self.cost(images).detach()
        finite = torch.isfinite(final)
        status = "ok" if bool(finite.any()) else "diverged"
        best = int(torch.where(finite, final, torch.inf).argmin()) if status == "ok" else -1
        chosen = images[best] if best >= 0 else torch.nan_to_num(images[0], nan=0.0).clamp(0, 1)
        return AttackResult(
            images=chosen,
            restart_images=images,
            restart_costs=final,
            best_restart=best,
            loss_curve=self._curve(final),
            curve_iterations=torch.tensor(self.curve_at + [self.total]),
            status=status,
            iterations=self.total,
        )

    def _curve(self, last: Tensor) -> Tensor:
        return torch.stack([*self.curve, last]).cpu()

    def _interrupted(self, state: dict[str, Any], variables: Variables, done: int) -> AttackResult:
        stage = self.stages[state["stage"]]
        with torch.no_grad():
            images = stage.render(variables).detach()
        empty = torch.full((images.shape[0],), torch.nan)
        return AttackResult(
            images=images[0],
            restart_images=images,
            restart_costs=empty,
            best_restart=-1,
            loss_curve=torch.stack(self.curve).cpu() if self.curve else empty[None],
            curve_iterations=torch.tensor(self.curve_at),
            status="interrupted",
            iterations=done,
            state=state,
        )


def _renderer(stage: Stage, variables: Variables) -> Callable[[], Tensor]:
    def render() -> Tensor:
        with torch.no_grad():
            return stage.render(variables).detach()

    return render


def _exporter(
    run: _Run,
    index: int,
    it: int,
    variables: Variables,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> Callable[[], dict[str, Any]]:
    """A closure that snapshots the loop at the boundary *before* iteration `it` of a stage."""

    def export() -> dict[str, Any]:
        return {
            "stage": index,
            "iteration": it,
            "variables": {k: v.detach().clone() for k, v in variables.items()},
            "optimizer": _clone_tree(opt.state_dict()),
            "scheduler": _pack_sched(sched.state_dict()),
            "curve": [c.clone() for c in run.curve],
            "curve_at": list(run.curve_at),
        }

    return export


def _pack_sched(sd: dict[str, Any]) -> dict[str, Any]:
    # MultiStepLR keeps its milestones in a Counter, which weights_only loading refuses.
    return {**sd, "milestones": dict(sd["milestones"])}


def _unpack_sched(sd: dict[str, Any]) -> dict[str, Any]:
    return {**sd, "milestones": collections.Counter(sd["milestones"])}


def _clone_tree(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_clone_tree(v) for v in obj)
    return obj


def _detached(variables: Variables) -> Variables:
    return {k: v.detach() for k, v in variables.items()}


def _best_cost(costs: Tensor) -> float:
    finite = costs[torch.isfinite(costs)]
    return float(finite.min()) if finite.numel() else float("nan")
