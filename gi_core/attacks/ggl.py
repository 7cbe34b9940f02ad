"""GGL (Li et al., CVPR 2022, "Auditing privacy defenses in federated learning via generative
gradient leakage"): search the latent of a pretrained generator WITHOUT gradients, with
CMA-ES (Sec. 3.3; the `cmaes` package's CMA, Hansen 2016), minimising the gradient-matching
cost of G(z) plus GGL's KL regulariser on the latent (the official code's `ng_loss`, weight
0.1): KL(N(μ_j, σ_j²) ‖ N(0, 1)) = −½ (1 + log σ_j² − μ_j² − σ_j²) for the mean μ_j and
standard deviation σ_j of image j's latent entries, summed over the batch.

The gradient-matching cost is the engine's (gi_core.attacks.engine.cost: `distance`, `tv`,
`bn`, sparsity masks), so GGL is scored like every other method; the official code uses an
l2 distance (set `distance: l2`). Budget: `iterations` counts candidate evaluations per
restart, each one victim gradient evaluation, so iterations × restarts is the cell's
gradient-evaluation budget as for the Adam methods (tasks.budget). Whole generations of
`population` candidates are told to CMA-ES; a remainder smaller than a generation is still
evaluated (sampled from the current distribution) and competes for the result, so every
evaluation of the budget is spent. The result of a restart is its best candidate over all
evaluations (GGL returns CMA-ES's best), and the best restart is chosen by that cost.

Each restart is one CMA-ES over the concatenated latents of the batch (dimension B × d; the
paper attacks B = 1), started at that restart's seeded random latents with step size `sigma`.
No Adam stage, so no `describe`: GGL cells run alone (a batched solve refuses it). The state
(CMA-ES's attributes and its numpy RNG state) is exported as tensors, so an
interrupted cell resumes bit for bit from a weights_only checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from gi_core.attacks.colour import project
from gi_core.attacks.engine import (
    AttackResult,
    BaseConfig,
    InversionProblem,
    Progress,
    _check,
    choose_path,
    make_batch_cost,
)
from gi_core.attacks.prior import latents_for, require_generator
from gi_core.errors import ConfigError
from gi_core.generators import Generator

if TYPE_CHECKING:
    from cmaes import CMA

MAX_DIMENSION = 4096  # CMA-ES keeps a (dim × dim) covariance and eigendecomposes it


@dataclass(frozen=True)
class GGLConfig(BaseConfig):
    """GGL's recipe: CMA-ES with 50 candidates per generation (the official `num_samples`),
    σ₀ = 1 (nevergrad's CMA default), KL weight 0.1, no TV, one restart. The official budget
    is 500 generations × 50 candidates; `iterations` here counts candidates."""

    restarts: int = 1
    tv: float = 0.0
    iterations: int = 25000
    population: int = 50
    sigma: float = 1.0
    kl: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.iterations >= 1, "iterations", "must be >= 1", self.iterations)
        # below 4 CMA-ES's rank-mu learning rate is 0 (Hansen 2016, eq. 49-52 degenerate)
        _check(self.population >= 4, "population", "must be >= 4", self.population)
        _check(self.sigma > 0, "sigma", "must be > 0", self.sigma)
        _check(self.kl >= 0, "kl", "must be >= 0", self.kl)
        _check(self.plateau_window == 0, "plateau_window", "applies to Adam stages only", 0)
        _check(self.prune_at == (), "prune_at", "applies to Adam stages only", self.prune_at)
        _check(not self.signed_grad, "signed_grad", "GGL takes no gradient steps", True)


def kl_regulariser(z: Tensor) -> Tensor:
    """GGL's KL term for latents z (rows, B, *latent_shape) -> (rows,)."""
    flat = z.flatten(2)
    mean, var = flat.mean(dim=2), flat.var(dim=2, unbiased=False)
    return (-0.5 * (1 + torch.log(var + 1e-10) - mean.pow(2) - var)).sum(dim=1)


class _Search:
    """R independent CMA-ES runs over one problem, in lockstep: every generation evaluates
    R × population candidates as rows of one cost call."""

    def __init__(
        self, problem: InversionProblem, config: GGLConfig, gen: Generator, z0: Tensor, seed: int
    ) -> None:
        self.config, self.gen, self.shape = config, gen, tuple(z0.shape[1:])  # (B, *latent)
        self.dim = int(np.prod(self.shape))
        if self.dim > MAX_DIMENSION:
            raise ConfigError(
                f"method ggl: CMA-ES over {self.dim} latent dimensions (batch × latent) is "
                f"beyond {MAX_DIMENSION}; use a smaller batch or latent space (e.g. StyleGAN2 "
                "`latent_space: w`, not w+)"
            )
        rows = config.restarts * config.population
        self.cost = make_batch_cost(
            [problem], config, path=choose_path([problem], rows)
        )
        self.device, self.dtype = z0.device, z0.dtype
        from cmaes import CMA  # imported here: `gi_core.attacks` itself needs torch only

        self.cma: list[CMA] = [
            CMA(
                mean=z0[r].double().flatten().cpu().numpy(),
                sigma=config.sigma,
                population_size=config.population,
                seed=seed * 1009 + r,  # one CPU numpy stream per restart
            )
            for r in range(config.restarts)
        ]
        self.best_costs = torch.full((config.restarts,), torch.inf, dtype=torch.float64)
        self.best_z = z0.detach().clone()
        self.evaluations = 0
        self.curve: list[Tensor] = []
        self.curve_at: list[int] = []

    def render(self, z: Tensor) -> Tensor:
        """z (rows, B, *latent) -> images (rows, B, C, H, W) in [0, 1], under the colour model."""
        images = self.gen(z.flatten(0, 1))
        return project(images.unflatten(0, z.shape[:2]), self.config.colour)

    def evaluate(self, z: Tensor) -> Tensor:
        """Cost + KL of every row of z (rows, B, *latent) -> (rows,) in float64."""
        with torch.no_grad():
            images = self.render(z)
        with torch.enable_grad():  # the cost differentiates the victim, not the images
            costs = self.cost(images).detach()
        return (costs + self.config.kl * kl_regulariser(z)).double().cpu()

    def generation(self, size: int) -> None:
        """Evaluate `size` candidates of every restart; tell CMA-ES a full generation."""
        asked = [[c.ask() for _ in range(size)] for c in self.cma]
        z = torch.tensor(np.stack([x for per in asked for x in per]), dtype=self.dtype)
        z = z.to(self.device).view(len(self.cma) * size, *self.shape)
        costs = self.evaluate(z).view(len(self.cma), size)
        for r, c in enumerate(self.cma):
            if size == c.population_size:
                c.tell([(x, float(v)) for x, v in zip(asked[r], costs[r], strict=True)])
            best = int(torch.nan_to_num(costs[r], nan=torch.inf).argmin())
            if costs[r, best] < self.best_costs[r]:
                self.best_costs[r] = costs[r, best]
                self.best_z[r] = z.view(len(self.cma), size, *self.shape)[r, best]
        self.evaluations += size
        self.curve.append(costs.nan_to_num(nan=torch.inf).min(dim=1).values.float())
        self.curve_at.append(self.evaluations)

    # -- state: CMA-ES's attributes and RNG state as tensors (weights_only checkpoints) ---------

    def export(self) -> dict[str, Any]:
        return {
            "evaluations": self.evaluations,
            "best_costs": self.best_costs.clone(),
            "best_z": self.best_z.cpu().clone(),
            "curve": [c.clone() for c in self.curve],
            "curve_at": list(self.curve_at),
            "cma": [_to_tensors(_attributes(c)) for c in self.cma],
            "rng": [_rng_state(c._rng) for c in self.cma],
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.evaluations = int(state["evaluations"])
        self.best_costs = state["best_costs"].clone()
        self.best_z = state["best_z"].to(self.device)
        self.curve, self.curve_at = list(state["curve"]), list(state["curve_at"])
        for c, attrs, rng in zip(self.cma, state["cma"], state["rng"], strict=True):
            c.__dict__.update(_from_tensors(attrs))
            c._rng.set_state(_rng_dict(rng))


def _attributes(cma: CMA) -> dict[str, Any]:
    """What CMA's own pickling keeps (every attribute but the RNG), with the covariance whole:
    its `__getstate__` keeps one triangle of C, and C is not exactly symmetric between
    eigendecompositions, so that round trip is not bit for bit."""
    return {k: v for k, v in vars(cma).items() if k != "_rng"}


def _to_tensors(attrs: dict[str, Any]) -> dict[str, Any]:
    """numpy arrays and scalars -> tensors and Python scalars (a weights_only checkpoint)."""
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(v.copy())
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def _from_tensors(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.numpy().copy() if isinstance(v, Tensor) else v for k, v in attrs.items()}


def _rng_state(rng: np.random.RandomState) -> dict[str, Any]:
    state = rng.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, ...}
    return {
        "bit_generator": state["bit_generator"],
        "key": torch.from_numpy(state["state"]["key"].astype(np.int64)),
        "pos": int(state["state"]["pos"]),
        "has_gauss": int(state["has_gauss"]),
        "gauss": float(state["gauss"]),
    }


def _rng_dict(s: dict[str, Any]) -> dict[str, Any]:
    key = s["key"].numpy().astype(np.uint32)
    return {
        "bit_generator": s["bit_generator"],
        "state": {"key": key, "pos": s["pos"]},
        "has_gauss": s["has_gauss"],
        "gauss": s["gauss"],
    }


def reconstruct(
    problem: InversionProblem,
    config: GGLConfig | None = None,
    *,
    seed: int = 0,
    generator: Generator | None = None,
    init: Tensor | None = None,
    state: dict[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AttackResult:
    """GGL on `problem`: R CMA-ES searches of `iterations` candidate evaluations each; `init`
    (R, B, *latent) overrides the seeded random start latents."""
    config = config or GGLConfig()
    gen = require_generator(generator, "ggl")
    z0 = latents_for(gen, problem, config, seed=seed, init=init)
    search = _Search(problem, config, gen, z0, seed)
    if state is not None:
        search.restore(state)
    from threadpoolctl import threadpool_limits

    # CMA-ES's eigendecompositions run in numpy's BLAS: give it torch's thread count, so the
    # job's one thread setting (decision 019) governs both (and BLAS threads never contend).
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        return _search(search, config, progress, should_stop)


def _search(
    search: _Search,
    config: GGLConfig,
    progress: Callable[[Progress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> AttackResult:
    total = config.iterations
    while search.evaluations < total:
        if should_stop is not None and should_stop():
            return _result(search, status="interrupted", state=search.export())
        search.generation(min(config.population, total - search.evaluations))
        if progress is not None:
            progress(_progress(search, total))
    return _result(search, status="ok", state=None)


def _progress(search: _Search, total: int) -> Progress:
    def render() -> Tensor:
        with torch.no_grad():
            return search.render(search.best_z)

    best = float(search.best_costs.nan_to_num(nan=torch.inf).min())
    return Progress("cma", search.evaluations, total, best, search.export, render)


def _result(search: _Search, *, status: str, state: dict[str, Any] | None) -> AttackResult:
    """The best candidate of each restart, re-rendered; the best restart by its cost."""
    with torch.no_grad():
        images = search.render(search.best_z).detach()
    costs = search.best_costs.float()
    finite = torch.isfinite(costs)
    if status == "ok" and not bool(finite.any()):
        status = "diverged"
    best = int(torch.where(finite, costs, torch.inf).argmin()) if status == "ok" else -1
    chosen = images[best] if best >= 0 else torch.nan_to_num(images[0], nan=0.0).clamp(0, 1)
    curve = torch.stack(search.curve) if search.curve else costs[None]
    return AttackResult(
        images=chosen,
        restart_images=images,
        restart_costs=costs,
        best_restart=best,
        loss_curve=curve.cpu(),
        curve_iterations=torch.tensor(search.curve_at, dtype=torch.long),
        status=status,
        iterations=search.evaluations,
        state=state,
        extras={"restart_iterations": search.evaluations * search.config.restarts},
    )
