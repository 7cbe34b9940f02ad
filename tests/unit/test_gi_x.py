"""GI-x / the shared engine: recovery, vectorised restarts, NaN safety, bit-exact resume."""

import io

import pytest
import torch

from gi_core.attacks import InversionProblem, method_config, reconstruct
from gi_core.attacks.gi_x import GIXConfig, initial_images
from gi_core.attacks.gi_x import reconstruct as gi_x
from gi_core.attacks.registry import METHOD_NAMES
from gi_core.errors import ConfigError
from gi_core.gradients import bn_statistics, client_gradient
from gi_core.objectives import gradient_distance
from gi_core.victims import build_victim


def _problem(arch: str = "lenet", batch: int = 1, size: int = 16, bn: bool = False):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=gen)
    y = torch.arange(batch)
    model = build_victim(arch, num_classes=10, image_size=size, width=4, seed=0)
    stats = bn_statistics(model, x) if bn else None
    return InversionProblem(
        model, client_gradient(model, x, y), y, (3, size, size), bn_target=stats
    ), x


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def test_cosine_cost_is_zero_at_the_true_images() -> None:
    problem, x = _problem("convnet", batch=2)
    model = problem.victim
    grads = client_gradient(model, x, problem.labels)
    assert float(gradient_distance(grads, problem.target)) == pytest.approx(0.0, abs=1e-6)


def test_gi_x_recovers_a_single_image_on_lenet() -> None:
    problem, x = _problem("lenet", batch=1, size=16)
    result = gi_x(problem, GIXConfig(iterations=200, restarts=1, tv=0.0), seed=0)
    assert result.status == "ok" and result.iterations == 200
    assert _psnr(result.images, x) >= 25.0
    # the returned images are the final ones: their cost is the reported final cost
    assert result.loss_curve.shape == (200 // 10 + 1, 1)
    assert float(result.restart_costs[0]) == pytest.approx(float(result.loss_curve[-1, 0]))


def test_vectorised_restarts_equal_separate_runs() -> None:
    problem, _ = _problem("convnet", batch=2)
    config = GIXConfig(iterations=12, restarts=3, tv=1e-2, curve_every=4)
    init = initial_images(problem, restarts=3, seed=7)
    together = gi_x(problem, config, init=init)
    for r in range(3):
        alone = gi_x(
            problem,
            GIXConfig(iterations=12, restarts=1, tv=1e-2, curve_every=4),
            init=init[r : r + 1],
        )
        torch.testing.assert_close(
            together.restart_images[r], alone.restart_images[0], rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            together.restart_costs[r], alone.restart_costs[0], rtol=1e-4, atol=1e-6
        )


def test_a_nan_restart_is_never_chosen_and_all_nan_is_diverged() -> None:
    problem, _ = _problem("lenet", batch=1)
    init = initial_images(problem, restarts=3, seed=0)
    init[0] = torch.nan  # restart 0 would "win" a plain argmin over NaN-filtered costs
    result = gi_x(problem, GIXConfig(iterations=5, restarts=3), init=init)
    assert torch.isnan(result.restart_costs[0])
    assert result.best_restart in (1, 2) and result.status == "ok"
    assert torch.isfinite(result.images).all()
    assert float(result.restart_costs[result.best_restart]) == float(result.restart_costs[1:].min())
    all_nan = gi_x(
        problem, GIXConfig(iterations=3, restarts=2), init=torch.full_like(init[:2], torch.nan)
    )
    assert all_nan.status == "diverged" and all_nan.best_restart == -1


@pytest.mark.parametrize("parametrisation", ["box", "sigmoid"])
def test_export_restore_continue_is_bit_exact(parametrisation: str) -> None:
    problem, _ = _problem("convnet", batch=2, bn=True)
    config = method_config(
        "gi-x+bn",
        {"iterations": 16, "restarts": 2, "curve_every": 3, "parametrisation": parametrisation},
    )
    full = reconstruct("gi-x+bn", problem, config, seed=3)
    calls = iter(range(100))
    stopped = reconstruct("gi-x+bn", problem, config, seed=3, should_stop=lambda: next(calls) == 7)
    assert stopped.status == "interrupted" and stopped.iterations == 7
    buffer = io.BytesIO()
    torch.save(stopped.state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = reconstruct("gi-x+bn", problem, config, seed=3, state=state)
    assert torch.equal(resumed.restart_images, full.restart_images)
    assert torch.equal(resumed.loss_curve, full.loss_curve)
    assert resumed.best_restart == full.best_restart


def test_progress_goes_through_the_callback_and_its_export_resumes() -> None:
    problem, _ = _problem("lenet", batch=1)
    config = GIXConfig(iterations=6, restarts=2)
    seen, states = [], {}

    def progress(p) -> None:  # export_state snapshots *now*: call it inside the callback
        seen.append(p)
        states[p.iteration] = p.export_state()

    full = gi_x(problem, config, seed=1, progress=progress)
    assert [p.iteration for p in seen] == list(range(1, 7)) and seen[-1].total == 6
    resumed = gi_x(problem, config, seed=1, state=states[3])
    assert torch.equal(resumed.restart_images, full.restart_images)


def test_registry_names_and_errors() -> None:
    assert {"gi-x", "gi-x+bn", "gi-z", "gi-w", "gi-z/w", "gi-z/x", "gi-z/w+bn"} <= set(METHOD_NAMES)
    with pytest.raises(ConfigError, match="unknown 'gi-q'.*gi-x"):
        method_config("gi-q")
    with pytest.raises(ConfigError, match="params.iteration"):
        method_config("gi-x", {"iteration": 3})
    with pytest.raises(ConfigError, match="params.restarts"):
        method_config("gi-x", {"restarts": 0})
    assert method_config("gi-x+bn").bn > 0 and method_config("gi-x").bn == 0
    problem, _ = _problem("convnet", batch=1)
    with pytest.raises(ConfigError, match="params.bn"):
        reconstruct("gi-x+bn", problem, method_config("gi-x+bn", {"iterations": 1}))
