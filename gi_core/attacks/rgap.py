"""R-GAP, the closed-form recursive gradient attack (Zhu & Blaschko, ICLR 2021, "R-GAP:
Recursive Gradient Attack on Privacy", Sec. 3 and Alg. 1), and R-GAP+G, R-GAP with the
generative prior in place of the closed form for the lowest layers (Jeon et al. 2021, App. C).

The victim must have the form R-GAP inverts: an `nn.Sequential` chain of fully connected and
convolutional layers, each followed by an invertible activation (LeakyReLU with a positive
slope, Sigmoid, Tanh, Identity, or none), with `Flatten` between them, no pooling and no
normalisation layer, ending in a fully connected layer with a bias (e.g. `rgapnet` of
gi_core.victims). Batch size 1, as in R-GAP. `check_victim` says why another victim is not.

Notation: unit i = 0..d-1 is one linear map and its activation; x_i (its input, x_0 the
victim's input after its input normalisation) -> u_i = W_i x_i + b_i -> x_{i+1} = σ_i(u_i);
u_{d-1} are the logits. For the cross-entropy of one image, δ_i = ∂ℓ/∂u_i and the weight
gradient is ∇W_i = δ_i x_i^T (a convolution: the correlation of δ_i with x_i's patches).

The recursion, from the top down (R-GAP Alg. 1):
  δ_{d-1} = ∇b_{d-1}          (the bias gradient is ∂ℓ/∂logits; R-GAP's own last layer is a
                               bias-free logistic unit, ours a K-class one with a bias)
  x_{d-1} = argmin_x ‖δ x^T − ∇W_{d-1}‖            (rank one: ∇W^T δ / ‖δ‖²)
  for i = d-2 .. 0:
    u_i = σ_i^{-1}(x_{i+1}),  δ_i = σ_i'(u_i) ⊙ W_{i+1}^T δ_{i+1}
    x_i = argmin_x ‖W_i x − (u_i − b_i)‖² + ‖(∇W_i(x; δ_i) − ∇W_i) / ‖δ_i‖‖²
          (R-GAP's system of one layer: the forward constraint and the gradient constraint
          stacked; the gradient rows are scaled by 1/‖δ_i‖, which leaves an exact solution
          unchanged and brings both blocks to the scale of x)
Each system is solved by LSMR (scipy.sparse.linalg.lsmr) on the operator itself, applied
through torch autograd: the dense matrix of a 32 px convolution layer would take minutes to
build and factorise on a CPU. An under-determined system gets LSMR's minimum-norm solution.
Under a gray colour model (attacks.colour) the unknown of the first layer is one gray channel.
Under the sparsity defense the equations of dropped gradient entries are left out.

R-GAP+G (`generator_layers` = k >= 1): the recursion stops at x_k; the prior then replaces
the closed form below it: z* = argmin_z ‖f_{<k}(G(z)) − x̂_k‖² / ‖x̂_k‖², with f_{<k} the
victim's first k units, by Adam with the paper's LR steps and R restarts (best by that cost);
the image is G(z*).

No attack reads the ground truth: the result carries each layer's recovered input
(`extras["layer_inputs"]`); the job body compares them with the true ones (`layer_errors`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from gi_core.attacks.colour import render_pixels
from gi_core.attacks.engine import (
    AttackResult,
    BaseConfig,
    InversionProblem,
    Progress,
    _check,
    optimise,
)
from gi_core.attacks.prior import LatentConfig, initial_latents, latent_stage, require_generator
from gi_core.errors import ConfigError
from gi_core.generators import Generator
from gi_core.gradients import client_gradient
from gi_core.objectives import gradient_distance
from gi_core.victims import Normalized

_ACTIVATIONS = (nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Identity)
_EDGE = 1e-6  # Sigmoid / Tanh inverses clamp their input this far inside the open range


@dataclass(frozen=True)
class RGAPConfig(BaseConfig):
    """R-GAP: closed form, no iterations, one "restart" (so no `*_iterations` field: its
    budget is 0 iterations). `solver_tol` is LSMR's atol = btol, `solver_maxiter` its
    iteration cap per layer."""

    restarts: int = 1
    tv: float = 0.0  # no image prior: R-GAP uses none (never silently enabled)
    solver_tol: float = 1e-12
    solver_maxiter: int = 20000

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.solver_tol > 0, "solver_tol", "must be > 0", self.solver_tol)
        _check(self.solver_maxiter >= 1, "solver_maxiter", "must be >= 1", self.solver_maxiter)
        _check(self.tv == 0, "tv", "R-GAP has no image prior; leave it 0", self.tv)
        _check(self.bn == 0, "bn", "R-GAP uses no BN statistics; leave it 0", self.bn)
        if not isinstance(self, RGAPGConfig):
            _check(self.restarts == 1, "restarts", "rgap is closed form: must be 1", self.restarts)


@dataclass(frozen=True)
class RGAPGConfig(LatentConfig, RGAPConfig):
    """R-GAP+G: the prior replaces the lowest `generator_layers` (>= 1) victim layers; its
    latent fit runs `z_iterations` at `z_lr` from `restarts` latents."""

    # restated: LatentConfig's inherited BaseConfig defaults (4 restarts, tv 1e-4) come later
    # in the MRO than RGAPConfig's and would win
    restarts: int = 1
    tv: float = 0.0
    generator_layers: int = 1
    z_iterations: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.generator_layers >= 1, "generator_layers", "must be >= 1", self.generator_layers
        )


# -- the victim as R-GAP sees it ----------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One linear map (Linear or Conv2d) and the activation after it (None: the logits).
    `pre` runs on the previous unit's output before the map (Flatten; the input normalisation
    for unit 0); shapes are per image, without the batch dimension."""

    op: nn.Linear | nn.Conv2d
    act: nn.Module | None
    pre: tuple[nn.Module, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight_index: int  # position of op.weight in the victim's parameter (= gradient) list
    bias_index: int | None


def check_victim(victim: nn.Module, image_shape: Sequence[int], *, method: str = "rgap") -> None:
    """ConfigError naming what makes `victim` not of R-GAP's form (see the module doc)."""
    units(victim, image_shape, method=method)


def units(victim: nn.Module, image_shape: Sequence[int], *, method: str = "rgap") -> list[Unit]:
    """The victim as R-GAP's chain of units, or ConfigError (module doc: the supported form)."""
    modules = _modules(victim, method)
    index = {id(p): i for i, (_, p) in enumerate(victim.named_parameters())}
    found: list[Unit] = []
    pre: list[nn.Module] = (
        [_Affine(victim.mean, victim.std)] if isinstance(victim, Normalized) else []
    )
    x = torch.zeros(1, *image_shape, device=next(victim.parameters()).device)
    pending: tuple[nn.Module, tuple[int, ...], int, int | None, tuple[nn.Module, ...]] | None = None
    with torch.no_grad():
        for m in modules:
            if isinstance(m, nn.Linear | nn.Conv2d):
                _check_op(m, method)
                if pending is not None:
                    found.append(_unit(pending, None, x))
                pending = (
                    m,
                    tuple(x.shape[1:]),
                    index[id(m.weight)],
                    index[id(m.bias)] if m.bias is not None else None,
                    tuple(pre),
                )
                x, pre = m(x), []
            elif isinstance(m, _ACTIVATIONS):
                if pending is None:
                    raise _unsupported(method, f"{type(m).__name__} before the first layer")
                _check_activation(m, method)
                found.append(_unit(pending, m, x))
                x, pending = m(x), None
            else:  # Flatten (checked by _modules)
                pre.append(m)
                x = m(x)
    return _finish(found, pending, x, method)


def _unit(pending: tuple[Any, ...], act: nn.Module | None, out: Tensor) -> Unit:
    op, in_shape, w_index, b_index, pre = pending
    return Unit(op, act, pre, in_shape, tuple(out.shape[1:]), w_index, b_index)


def _finish(found: list[Unit], pending: Any, x: Tensor, method: str) -> list[Unit]:
    if pending is None:
        raise _unsupported(method, "the last layer is followed by an activation")
    top = _unit(pending, None, x)
    if not isinstance(top.op, nn.Linear) or top.bias_index is None:
        raise _unsupported(
            method, "the last layer must be nn.Linear with a bias (its gradient is ∂ℓ/∂logits)"
        )
    return [*found, top]


class _Affine(nn.Module):
    """The input normalisation of a `Normalized` victim, as a `pre` module of unit 0."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)


def _modules(victim: nn.Module, method: str) -> list[nn.Module]:
    model = victim.model if isinstance(victim, Normalized) else victim
    if not isinstance(model, nn.Sequential):
        raise _unsupported(method, f"it is a {type(model).__name__}, not an nn.Sequential chain")
    flat = [m for m in model.modules() if not isinstance(m, nn.Sequential)]
    for m in flat:
        if not isinstance(m, (nn.Linear, nn.Conv2d, nn.Flatten, *_ACTIVATIONS)):
            raise _unsupported(method, f"it has a {type(m).__name__} layer")
    if not any(isinstance(m, nn.Linear | nn.Conv2d) for m in flat):
        raise _unsupported(method, "it has no Linear or Conv2d layer")
    return flat


def _check_op(m: nn.Module, method: str) -> None:
    if isinstance(m, nn.Conv2d) and (
        m.groups != 1
        or m.dilation != (1, 1)
        or m.padding_mode != "zeros"
        or isinstance(m.padding, str)
    ):
        raise _unsupported(method, "a Conv2d with groups, dilation, string or non-zero padding")


def _check_activation(m: nn.Module, method: str) -> None:
    if isinstance(m, nn.LeakyReLU) and m.negative_slope <= 0:
        raise _unsupported(method, "a LeakyReLU with slope <= 0 is not invertible")


def _unsupported(method: str, why: str) -> ConfigError:
    return ConfigError(
        f"victim.arch: {method} needs a chain of Linear/Conv2d layers with invertible "
        f"activations (LeakyReLU, Sigmoid, Tanh), no pooling or normalisation layers, ending "
        f"in a Linear layer with a bias (e.g. arch: rgapnet); this victim does not fit: {why}"
    )


# -- activations --------------------------------------------------------------------------------


def _inverse(act: nn.Module, y: Tensor) -> Tensor:
    """u with σ(u) = y; Sigmoid / Tanh clamp y into their open range first."""
    if isinstance(act, nn.LeakyReLU):
        return torch.where(y >= 0, y, y / act.negative_slope)
    if isinstance(act, nn.Sigmoid):
        return torch.logit(y.clamp(_EDGE, 1 - _EDGE))
    if isinstance(act, nn.Tanh):
        return torch.atanh(y.clamp(-1 + _EDGE, 1 - _EDGE))
    return y  # Identity


def _derivative(act: nn.Module, u: Tensor) -> Tensor:
    if isinstance(act, nn.LeakyReLU):
        return torch.where(u >= 0, torch.ones_like(u), torch.full_like(u, act.negative_slope))
    if isinstance(act, nn.Sigmoid):
        s = torch.sigmoid(u)
        return s * (1 - s)
    if isinstance(act, nn.Tanh):
        return 1 - torch.tanh(u) ** 2
    return torch.ones_like(u)


# -- one layer's system -------------------------------------------------------------------------


def _weight_gradient(op: nn.Module, x: Tensor, delta: Tensor, shape: torch.Size) -> Tensor:
    """∇W = δ x^T of one image (a convolution: δ correlated with x's patches), linear in x."""
    if isinstance(op, nn.Conv2d):
        return conv2d_weight(x, shape, delta, op.stride, op.padding)
    return delta.T @ x


def _apply(op: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The unit's linear map without its bias: x (1, *in_shape) -> (1, *out_shape)."""
    if isinstance(op, nn.Conv2d):
        return F.conv2d(x, weight, None, op.stride, op.padding)
    return F.linear(x, weight)


@dataclass(frozen=True)
class _System:
    """One layer's equations E(y) = c + L y in the unknown y, and their right-hand side."""

    apply: Callable[[Tensor], Tensor]  # y -> E(y) (flat)
    rhs: Tensor
    y_shape: tuple[int, ...]


def _system(
    unit: Unit,
    *,
    delta: Tensor,
    u: Tensor | None,
    grad_w: Tensor,
    mask_w: Tensor | None,
    in_map: Callable[[Tensor], Tensor],
    y_shape: tuple[int, ...],
) -> _System:
    weight = unit.op.weight.detach().to(delta)
    scale = 1.0 / delta.norm()
    keep = mask_w.to(delta) if mask_w is not None else torch.ones_like(grad_w)

    def equations(y: Tensor) -> Tensor:
        x = in_map(y)
        grad = _weight_gradient(unit.op, x, delta[None], weight.shape)
        parts = [(grad * keep * scale).flatten()]
        if u is not None:
            parts.insert(0, _apply(unit.op, x, weight).flatten())
        return torch.cat(parts)

    rhs = [(grad_w.to(delta) * keep * scale).flatten()]
    if u is not None:
        bias = unit.op.bias.detach().to(delta) if unit.op.bias is not None else None
        shift = u if bias is None else u - bias.reshape(-1, *([1] * (u.dim() - 1)))
        rhs.insert(0, shift.flatten())
    return _System(equations, torch.cat(rhs), y_shape)


def _solve(system: _System, *, tol: float, maxiter: int) -> Tensor:
    """argmin_y ‖E(y) − rhs‖ by LSMR on the operator y -> E(y) − E(0) and its adjoint (vjp)."""
    from scipy.sparse.linalg import LinearOperator, lsmr  # scipy only where R-GAP runs

    rhs = system.rhs
    zero = torch.zeros(system.y_shape, dtype=rhs.dtype, device=rhs.device)
    offset = system.apply(zero).detach()

    def linear(y: Tensor) -> Tensor:
        return system.apply(y) - offset

    adjoint = torch.func.vjp(linear, zero)[1]
    n, m = zero.numel(), rhs.numel()

    def matvec(v: Any) -> Any:
        y = torch.as_tensor(v, dtype=rhs.dtype).to(rhs.device).reshape(system.y_shape)
        return linear(y).detach().cpu().numpy()

    def rmatvec(v: Any) -> Any:
        w = torch.as_tensor(v, dtype=rhs.dtype).to(rhs.device).reshape(m)
        return adjoint(w)[0].detach().cpu().numpy().reshape(n)

    op = LinearOperator((m, n), matvec=matvec, rmatvec=rmatvec, dtype="float64")
    b = (rhs - offset).cpu().numpy()
    y = lsmr(op, b, atol=tol, btol=tol, maxiter=maxiter)[0]
    return torch.as_tensor(y, dtype=rhs.dtype).to(rhs.device).reshape(system.y_shape)


# -- the recursion ------------------------------------------------------------------------------


@dataclass
class Recovery:
    """Inputs x_i of the units recovered in closed form (None below `stop`), and the image
    (C, H, W) when the recursion reached unit 0."""

    inputs: list[Tensor | None]
    image: Tensor | None


def recover(
    problem: InversionProblem,
    *,
    stop: int = 0,
    colour: str = "rgb",
    tol: float = 1e-12,
    maxiter: int = 20000,
) -> Recovery:
    """R-GAP's recursion (Alg. 1) from the top unit down to unit `stop`, in float64."""
    if problem.batch_size != 1:
        raise ConfigError(
            f"batch_sizes: R-GAP inverts the gradient of one image (got a batch of "
            f"{problem.batch_size}); use batch_sizes: [1]"
        )
    chain = units(problem.victim, problem.image_shape)
    grads = [g.detach().double() for g in problem.target]
    masks = problem.masks
    inputs: list[Tensor | None] = [None] * len(chain)
    image = None
    delta = grads[chain[-1].bias_index]  # type: ignore[index]
    delta = delta * masks[chain[-1].bias_index] if masks is not None else delta  # type: ignore[index]
    for i in reversed(range(stop, len(chain))):
        unit, u = chain[i], None
        if i < len(chain) - 1:
            u, delta = _step_down(unit, chain[i + 1], inputs[i + 1], delta)  # type: ignore[arg-type]
        to_image, y_shape = _image_of(problem, colour) if i == 0 else (None, unit.in_shape)
        in_map = _input_map(unit, to_image)
        system = _system(
            unit,
            delta=delta,
            u=u,
            grad_w=grads[unit.weight_index],
            mask_w=masks[unit.weight_index] if masks is not None else None,
            in_map=in_map,
            y_shape=y_shape,
        )
        y = _solve(system, tol=tol, maxiter=maxiter)
        inputs[i] = in_map(y)[0].detach()
        image = to_image(y).detach() if to_image is not None else image
    return Recovery(inputs, image)


def _step_down(
    unit: Unit, above: Unit, x_above: Tensor, delta_above: Tensor
) -> tuple[Tensor, Tensor]:
    """u_i = σ_i^{-1}(x_{i+1}) and δ_i = σ_i'(u_i) ⊙ W_{i+1}^T δ_{i+1} (through `above.pre`)."""
    assert unit.act is not None
    weight = above.op.weight.detach().to(delta_above)

    def to_above(out: Tensor) -> Tensor:  # unit i's output -> unit i+1's input (Flatten)
        for m in above.pre:
            out = m(out)
        return _apply(above.op, out, weight)

    zero = torch.zeros(1, *unit.out_shape, dtype=delta_above.dtype, device=delta_above.device)
    back = torch.func.vjp(to_above, zero)[1](delta_above[None])[0][0]
    x_above = x_above.reshape(1, *unit.out_shape)[0]  # undo a Flatten
    u = _inverse(unit.act, x_above)
    return u, _derivative(unit.act, u) * back


def _image_of(
    problem: InversionProblem, colour: str
) -> tuple[Callable[[Tensor], Tensor], tuple[int, ...]]:
    """The image (C, H, W) from the unknown of the first layer: one gray channel broadcast to
    three under a gray colour model (the attacker knows the images are gray), else itself."""
    c, h, w = problem.image_shape
    if colour == "gray" and c == 3:
        return (lambda y: render_pixels(y, colour)), (1, h, w)
    return (lambda y: y), (c, h, w)


def _input_map(
    unit: Unit, to_image: Callable[[Tensor], Tensor] | None
) -> Callable[[Tensor], Tensor]:
    """The unit's input (1, *in_shape) from its unknown; for unit 0 through the image and the
    victim's `pre` (its input normalisation, a Flatten)."""
    if to_image is None:
        return lambda y: y[None]

    def in_map(y: Tensor) -> Tensor:
        x = to_image(y)[None]
        for m in unit.pre:
            x = m(x)
        return x

    return in_map


# -- what the job body compares -----------------------------------------------------------------


def layer_inputs(victim: nn.Module, images: Tensor) -> list[Tensor]:
    """The true input x_i of every unit for `images` (1, C, H, W), in float64."""
    chain = units(victim, tuple(images.shape[1:]))
    with torch.no_grad():
        found, _ = _run(chain, images.detach().double())
    return [x[0] for x in found]


def layer_errors(recovered: Sequence[Tensor], true: Sequence[Tensor]) -> list[float]:
    """‖x̂_i − x_i‖ / ‖x_i‖ per unit (unit 0 = the victim's input), the per-layer error of
    R-GAP's Figures (GIAS App. C, Figures A1/A2)."""
    return [
        float((r.double().cpu() - t.double().cpu()).norm() / t.double().cpu().norm())
        for r, t in zip(recovered, true, strict=True)
    ]


# -- the attacks --------------------------------------------------------------------------------


def reconstruct(
    problem: InversionProblem,
    config: RGAPConfig | None = None,
    *,
    seed: int = 0,
    generator: Generator | None = None,
    init: Tensor | None = None,
    state: dict[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AttackResult:
    """R-GAP (generator_layers = 0) or R-GAP+G; `seed`, `generator`, `state`, `progress` and
    `should_stop` matter for R-GAP+G's latent fit only (the closed form is deterministic and
    takes seconds, so it is recomputed on resume rather than checkpointed)."""
    config = config or RGAPConfig()
    chain = units(problem.victim, problem.image_shape)
    k = config.generator_layers if isinstance(config, RGAPGConfig) else 0
    if k >= len(chain):
        raise ConfigError(
            f"params.generator_layers: the victim has {len(chain)} layers; the prior can "
            f"replace at most {len(chain) - 1} (got {k})"
        )
    found = recover(
        problem, stop=k, colour=config.colour, tol=config.solver_tol, maxiter=config.solver_maxiter
    )
    if k == 0:
        return _closed_form_result(problem, config, found)
    gen = require_generator(generator, "rgap+g")
    assert isinstance(config, RGAPGConfig)
    return _with_prior(
        problem,
        config,
        chain,
        found,
        gen,
        seed=seed,
        state=state,
        progress=progress,
        should_stop=should_stop,
    )


def _closed_form_result(
    problem: InversionProblem, config: RGAPConfig, found: Recovery
) -> AttackResult:
    assert found.image is not None
    images = found.image[None].float().clamp(0, 1)
    cost = _gradient_cost(problem, images, config).reshape(1)
    ok = bool(torch.isfinite(cost).all()) and all(
        bool(torch.isfinite(x).all()) for x in found.inputs if x is not None
    )
    return AttackResult(
        images=images if ok else torch.nan_to_num(images, nan=0.0),
        restart_images=images[None],
        restart_costs=cost.cpu(),
        best_restart=0 if ok else -1,
        loss_curve=cost.cpu()[None],
        curve_iterations=torch.tensor([0]),
        status="ok" if ok else "diverged",
        iterations=0,
        extras={"layer_inputs": found.inputs, "generator_layers": 0},
    )


def _gradient_cost(problem: InversionProblem, images: Tensor, config: RGAPConfig) -> Tensor:
    """The attacker's own check of a closed-form image: d(∇θ ℓ(x̂), g) under `distance`."""
    with torch.enable_grad():
        pred = client_gradient(problem.victim, images, problem.labels)
    return gradient_distance(
        pred, problem.target, kind=config.distance, masks=problem.masks
    ).detach()


def _with_prior(
    problem: InversionProblem,
    config: RGAPGConfig,
    chain: list[Unit],
    found: Recovery,
    gen: Generator,
    *,
    seed: int,
    state: dict[str, Any] | None,
    progress: Callable[[Progress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> AttackResult:
    """Fit z so that the victim's first k units map G(z) onto the recovered x̂_k."""
    k = config.generator_layers
    target = found.inputs[k].float()  # type: ignore[union-attr]
    below = chain[:k]

    def features(images: Tensor) -> Tensor:  # (rows, 1, C, H, W) -> (rows, *x_k shape)
        x = _run(below, images.flatten(0, 1))[1]
        for m in chain[k].pre:
            x = m(x)
        return x

    def cost(images: Tensor) -> Tensor:
        diff = features(images) - target[None]
        return diff.flatten(1).pow(2).sum(1) / target.pow(2).sum()

    z = initial_latents(gen, problem, restarts=config.restarts, seed=seed)
    result = optimise(
        [latent_stage(gen, config)],
        cost,
        {"z": z},
        curve_every=config.curve_every,
        state=state,
        progress=progress,
        should_stop=should_stop,
    )
    if result.status == "ok" and result.state is None:
        with torch.no_grad():
            lower = _run(below, result.images.double())[0]
        result.extras["layer_inputs"] = [*(x[0] for x in lower), *found.inputs[k:]]
    result.extras["generator_layers"] = k
    return result


def _run(chain: Sequence[Unit], x: Tensor) -> tuple[list[Tensor], Tensor]:
    """The input of every unit of `chain` for x (N, ...) and the chain's output, in x's dtype."""
    found = []
    for unit in chain:
        for m in unit.pre:
            x = m(x)
        found.append(x)
        x = _apply_full(unit.op, x)
        x = unit.act(x) if unit.act is not None else x
    return found, x


def _apply_full(op: nn.Linear | nn.Conv2d, x: Tensor) -> Tensor:
    out = _apply(op, x, op.weight.detach().to(x))
    bias = getattr(op, "bias", None)
    if bias is None:
        return out
    return out + bias.detach().to(x).reshape(-1, *([1] * (out.dim() - 2)))
