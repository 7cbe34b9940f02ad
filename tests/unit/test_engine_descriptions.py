"""Attacks describe their stages; the caller decides who solves them (issue 17, Deliver 4).

Each attack module's `describe` returns a `StagesCall` without optimising anything; `solve` of
it is the attack alone, bit for bit, and `batched.solve_together` solves several descriptions
in one optimisation. No global hook: describing, solving and batching leave no state behind.
"""

from __future__ import annotations

import pytest
import torch

from gi_core.attacks import InversionProblem, batched, engine, method_config, reconstruct
from gi_core.attacks.batched import solve_together
from gi_core.attacks.engine import StagesCall, solve
from gi_core.attacks.registry import describer
from gi_core.errors import ConfigError
from gi_core.generators import build_generator
from gi_core.gradients import bn_statistics, client_gradient
from gi_core.victims import build_victim

ENGINE_MODULES = ("types", "cost", "loop", "state", "solve")
# The methods of this issue, each with a two-stage or one-stage tiny schedule.
SHORT = {
    "gi-x": {"iterations": 3},
    "gi-x+bn": {"iterations": 3},
    "gi-z": {"z_iterations": 3},
    "gi-w": {"w_iterations": 2},
    "gi-z/w": {"z_iterations": 2, "w_iterations": 2},
    "gi-z/x": {"z_iterations": 2, "x_iterations": 2},
}


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gen():
    return build_generator("dcgan32", output_size=16, seed=0)


def _problem(index: int = 0) -> InversionProblem:
    g = torch.Generator().manual_seed(10 + index)
    x, y = torch.rand(1, 3, 16, 16, generator=g), torch.tensor([index % 10])
    model = build_victim("convnet", num_classes=10, image_size=16, width=4, seed=0)
    target = client_gradient(model, x, y)
    return InversionProblem(model, target, y, (3, 16, 16), bn_target=bn_statistics(model, x))


def _identical(a, b) -> None:
    for name in ("images", "restart_images", "restart_costs", "loss_curve", "curve_iterations"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.best_restart, a.status, a.iterations) == (b.best_restart, b.status, b.iterations)


@pytest.mark.parametrize("method", sorted(SHORT))
def test_a_description_solved_alone_is_the_attack_bit_for_bit(method: str, gen) -> None:
    config = method_config(method, {**SHORT[method], "restarts": 2, "curve_every": 1})
    problem = _problem()
    call = describer(method)(problem, config, seed=3, generator=gen)
    assert isinstance(call, StagesCall)
    assert call.config == config and call.problem is problem
    rows = {int(v.shape[0]) for v in call.initial.values()}
    assert rows == {config.restarts}  # the restart axis first, nothing optimised yet
    _identical(solve(call), reconstruct(method, problem, config, seed=3, generator=gen))


def test_describing_optimises_nothing_and_leaves_no_state(gen) -> None:
    config = method_config("gi-z/w", {**SHORT["gi-z/w"], "restarts": 2})
    problem, describe = _problem(), describer("gi-z/w")
    first = describe(problem, config, seed=1, generator=gen)
    weights = [p.detach().clone() for p in gen.parameters()]
    again = describe(problem, config, seed=1, generator=gen)
    assert torch.equal(first.initial["z"], again.initial["z"])
    assert all(torch.equal(w, p) for w, p in zip(weights, gen.parameters(), strict=True))
    # no module of the engine or of batching keeps a handler stack a batch could leave behind
    modules = [engine, batched, *(getattr(engine, m) for m in ENGINE_MODULES)]
    stacks = [
        f"{m.__name__}.{n}"
        for m in modules
        for n, v in vars(m).items()
        if isinstance(v, list) and not n.startswith("__")
    ]
    assert stacks == []


def test_one_description_batched_on_the_loop_path_is_the_attack_bit_for_bit() -> None:
    config = method_config("gi-x", {"iterations": 4, "restarts": 2})
    problem = _problem()
    (together,) = solve_together([describer("gi-x")(problem, config, seed=2)], path="loop")
    _identical(together, reconstruct("gi-x", problem, config, seed=2))
    assert together.extras["path"] == "loop"


def test_descriptions_of_different_layouts_are_refused() -> None:
    a = describer("gi-x")(_problem(0), method_config("gi-x", {"iterations": 3}), seed=0)
    b = describer("gi-x")(_problem(1), method_config("gi-x", {"iterations": 4}), seed=1)
    with pytest.raises(ConfigError, match="share method, params, shapes and victim"):
        solve_together([a, b])


def test_describer_of_an_unknown_method_names_the_field() -> None:
    with pytest.raises(ConfigError, match="method: unknown 'gi-q'"):
        describer("gi-q")
