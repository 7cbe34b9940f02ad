"""The run loop: Adam over a sequence of stages, LR ×0.1 at 3/8, 5/8 and 7/8 of each stage's
iterations (the paper's schedule), on rows that carry the restart axis first (the R restarts
of one problem, or P × R of P problems, problem-major). Adam is elementwise, so a row that
turns NaN never leaks into the others, and each problem's rows see exactly the updates they
would see alone.

Options that save compute (off by default): successive-halving restart pruning (`prune_at`) and
plateau stopping (`plateau_window`, `plateau_tol`). Exporting and restoring the loop state lives
in `state`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gi_core.attacks.engine import state as snapshot
from gi_core.attacks.engine.types import (
    AttackResult,
    BaseConfig,
    CostFn,
    Progress,
    Stage,
    Variables,
)
from gi_core.errors import ConfigError

Optimiser = torch.optim.Optimizer
Scheduler = torch.optim.lr_scheduler.LRScheduler


def milestones(iterations: int) -> list[int]:
    return [iterations * k // 8 for k in (3, 5, 7)]


def prune_iterations(iterations: int, fractions: Sequence[float]) -> list[int]:
    """Iterations of a stage after whose step the worse half of the restarts is pruned."""
    return sorted({min(iterations - 1, max(0, round(f * iterations))) for f in fractions})


class Run:
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
        # Best images of the `candidate` stages so far, per row (all P × R rows): "images"
        # (rows, B, C, H, W), "costs" (rows,), "stage" (rows,) index of the stage they end.
        self.kept: Variables | None = None

    def execute(self, initial: Variables, state: dict[str, Any] | None) -> list[AttackResult]:
        if self.problems > 1 and self.config.plateau_window > 0:
            raise ConfigError("params.plateau_window: plateau stopping runs one cell at a time")
        if state is None:
            first, start_it, variables = 0, 0, initial
            self.restarts = int(next(iter(initial.values())).shape[0]) // self.problems
            self.active = torch.arange(self.restarts).expand(self.problems, -1).clone()
        else:
            first, start_it, variables = snapshot.restore(self, state)
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
            if self.stages[index].candidate and index < len(self.stages) - 1:
                self._keep(index, variables)
        return self._finish(variables)

    # -- rows ---------------------------------------------------------------------------------

    def _rows(self) -> Tensor:
        """(P × Ra,) indices of the active rows among all P × R rows."""
        base = torch.arange(self.problems)[:, None] * self.restarts
        return (base + self.active).flatten()

    def _pruned(self) -> bool:
        return int(self.active.shape[1]) < self.restarts

    def assemble(self, variables: Variables) -> Variables:
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
        full = stage.start(self.assemble(variables))
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
    ) -> tuple[Optimiser, Scheduler]:
        opt = _adam([variables[k] for k in stage.trainable], lr=stage.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones(stage.iterations), gamma=0.1)
        if opt_state is not None and sched_state is not None:
            opt.load_state_dict(opt_state)
            sched.load_state_dict(snapshot.unpack_sched(sched_state))
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
                return snapshot.interrupted(self, index, it, variables, opt, sched)
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
        opt: Optimiser,
        sched: Scheduler,
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
        opt: Optimiser,
        sched: Scheduler,
        costs: Tensor,
    ) -> tuple[Variables, Optimiser, Scheduler]:
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
        opt_state = snapshot.select_rows(opt.state_dict(), dev_local, n_problems * n_active)
        sched_state = snapshot.pack_sched(sched.state_dict())
        opt, sched = self._optimiser(stage, kept, opt_state, sched_state)
        return kept, opt, sched

    def _track_plateau(self, costs: Tensor, iteration: int) -> None:
        """Remember the iteration of the last relative improvement of the best cost by tol."""
        best = best_cost(costs)
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
        opt: Optimiser,
        sched: Scheduler,
        costs: Tensor,
    ) -> None:
        per = costs.view(self.problems, self.restarts)
        for p, callback in enumerate(self.progress):
            if callback is None:
                continue
            export = snapshot.exporter(self, index, it, variables, opt, sched, p)
            render = snapshot.renderer(self, stage, variables, p)
            best = best_cost(per[p])
            callback(Progress(stage.name, offset + it, self.total, best, export, render))

    # -- results ------------------------------------------------------------------------------

    def _evaluate(self, stage: Stage, variables: Variables) -> tuple[Tensor, Tensor]:
        """Every row's images (rows, B, C, H, W) at the end of `stage` and their costs."""
        images = stage.render(self.assemble(variables)).detach()
        with torch.enable_grad():  # the cost differentiates the victim, not the images
            return images, self.cost(images).detach()

    def _keep(self, index: int, variables: Variables) -> None:
        """Remember, row by row, the end of candidate stage `index` where its cost is lower
        than the best kept so far (NaN counts as +inf; a tie keeps the earlier stage)."""
        images, costs = self._evaluate(self.stages[index], variables)
        stage = torch.full_like(costs, index, dtype=torch.long)
        if self.kept is None:
            self.kept = {"images": images, "costs": costs, "stage": stage}
            return
        better = _finite(costs) < _finite(self.kept["costs"])
        self.kept = {
            "images": torch.where(_rows_like(better, images), images, self.kept["images"]),
            "costs": torch.where(better, costs, self.kept["costs"]),
            "stage": torch.where(better, stage, self.kept["stage"]),
        }

    def _finish(self, variables: Variables) -> list[AttackResult]:
        images, final = self._evaluate(self.stages[-1], variables)
        curve_final = final
        stage = None
        if self.kept is not None:  # candidate stages compete with the last one, row by row
            better = _finite(self.kept["costs"]) < _finite(final)
            images = torch.where(_rows_like(better, images), self.kept["images"], images)
            final = torch.where(better, self.kept["costs"], final)
            last = torch.full_like(self.kept["stage"], len(self.stages) - 1)
            stage = torch.where(better, self.kept["stage"], last)
        done = self.stopped if self.stopped is not None else self.total
        results = [
            self._result(images[sl], final[sl], self._curve(curve_final, sl), done)
            for sl in self.slices()
        ]
        if stage is not None:
            for r, sl in zip(results, self.slices(), strict=True):
                r.extras["best_stage"] = [self.stages[int(i)].name for i in stage[sl].cpu()]
        return results

    def slices(self) -> list[slice]:
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


def _adam(params: list[Tensor], *, lr: float) -> Optimiser:
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


def _finite(costs: Tensor) -> Tensor:
    return torch.nan_to_num(costs, nan=math.inf)


def _rows_like(mask: Tensor, images: Tensor) -> Tensor:
    """A row mask (rows,) broadcast over images (rows, ...)."""
    return mask.view(-1, *([1] * (images.dim() - 1)))


def best_cost(costs: Tensor) -> float:
    finite = costs[torch.isfinite(costs)]
    return float(finite.min()) if finite.numel() else float("nan")
