"""GGL and GIFD, the successors of GIAS (issue 19, Deliver 6), in the engine's harness: GGL's
CMA-ES lowers the cost and spends exactly its budget of gradient evaluations; GIFD's feature
steps stay inside their l1 balls; both choose their result by their own cost; both resume bit
for bit; budgets, registry, tuning space and batching treat them like every other method."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from gi_core.attacks import InversionProblem, method_config, reconstruct
from gi_core.attacks.batched import batchable, reconstruct_batch, solve_together
from gi_core.attacks.engine import PathPolicy, Progress, choose_path, make_batch_cost, solve
from gi_core.attacks.engine import cost as engine_cost
from gi_core.attacks.gifd import project_l1_ball
from gi_core.attacks.registry import describer, describes
from gi_core.errors import ConfigError
from gi_core.generators import build_generator
from gi_core.gradients import client_gradient
from gi_core.victims import build_victim
from pipelines.methods_table import method_table
from pipelines.tune import default_space
from tasks.budget import scaled
from tasks.cells import budget_columns

SIZE = 16


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gen():
    return build_generator("dcgan32", output_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def problem(gen) -> InversionProblem:
    """A batch of one image in the prior's range, its label given, an untrained ConvNet."""
    with torch.no_grad():
        x = gen(torch.randn(1, 100, generator=torch.Generator().manual_seed(3)))
    y = torch.tensor([2])
    model = build_victim("convnet", num_classes=10, image_size=SIZE, width=4, seed=0)
    return InversionProblem(model, client_gradient(model, x, y), y, (3, SIZE, SIZE))


def _cost(problem: InversionProblem, config, images: torch.Tensor) -> torch.Tensor:
    """The attack's own cost of images (rows, B, C, H, W), as the engine computes it."""
    cost = make_batch_cost([problem], config, path=choose_path([problem], images.shape[0]))
    with torch.enable_grad():
        return cost(images).detach()


def _identical(a, b) -> None:
    for name in ("images", "restart_images", "restart_costs", "loss_curve", "curve_iterations"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.best_restart, a.status, a.iterations) == (b.best_restart, b.status, b.iterations)


def _through_checkpoint(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- GGL ----------------------------------------------------------------------------------------


def test_ggl_cma_es_lowers_the_cost_below_its_start(gen, problem) -> None:
    config = method_config("ggl", {"iterations": 48, "population": 8, "restarts": 1, "kl": 0.0})
    result = reconstruct("ggl", problem, config, seed=0, generator=gen)
    assert result.status == "ok" and result.iterations == 48
    z0 = torch.randn(1, 1, 100, generator=torch.Generator().manual_seed(0))
    start = _cost(problem, config, gen(z0[0])[None])
    assert float(result.restart_costs[0]) < float(start[0])
    # the result is its best candidate: no generation's best is lower
    assert float(result.restart_costs[0]) <= float(result.loss_curve.min()) + 1e-6
    # its cost is the attack's own cost of the images it returns (no ground truth involved)
    again = _cost(problem, config, result.restart_images)
    assert torch.allclose(again, result.restart_costs, rtol=1e-5, atol=1e-7)


def test_ggl_spends_exactly_its_budget_of_gradient_evaluations(gen, problem, monkeypatch) -> None:
    """Every candidate is one victim forward + gradient: 23 evaluations = 5 generations of 4
    and a remainder of 3, counted on the victim itself (on the loop path, which the policy
    picks here, every candidate is its own forward)."""
    monkeypatch.setattr(engine_cost, "DEFAULT_POLICY", PathPolicy(cpu_vmap_min_rows=10**6))
    config = method_config("ggl", {"iterations": 23, "population": 4, "restarts": 1})
    forwards = []
    hook = problem.victim.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
    try:
        result = reconstruct("ggl", problem, config, seed=1, generator=gen)
    finally:
        hook.remove()
    final_evaluations = 0  # GGL re-renders its best candidates; it does not re-evaluate them
    assert len(forwards) == 23 + final_evaluations
    assert result.iterations == 23
    assert result.curve_iterations.tolist() == [4, 8, 12, 16, 20, 23]
    assert budget_columns(config)["budget_grad_evals"] == 23
    matched = scaled(config, 480 / config.restarts)  # budgets: {match: grad_evals, value: 480}
    assert matched.iterations * matched.restarts == 480


def test_ggl_resumes_bit_for_bit_from_a_weights_only_checkpoint(gen, problem) -> None:
    config = method_config("ggl", {"iterations": 30, "population": 6, "restarts": 2})
    whole = reconstruct("ggl", problem, config, seed=2, generator=gen)
    calls = []
    cut = reconstruct(
        "ggl", problem, config, seed=2, generator=gen,
        progress=lambda p: calls.append(p.iteration), should_stop=lambda: len(calls) >= 2,
    )  # fmt: skip
    assert cut.status == "interrupted" and cut.iterations == 12
    state = _through_checkpoint(cut.state)
    resumed = reconstruct("ggl", problem, config, seed=2, generator=gen, state=state)
    _identical(resumed, whole)


def test_ggl_runs_alone_and_refuses_adam_only_options(gen, problem) -> None:
    config = method_config("ggl", {"iterations": 4, "population": 4})
    assert not describes("ggl") and not batchable("ggl", config)
    with pytest.raises(ConfigError, match="cannot be batched"):
        reconstruct_batch("ggl", [problem, problem], config, seeds=[0, 1], generator=gen)
    with pytest.raises(ConfigError, match="params.signed_grad"):
        method_config("ggl", {"signed_grad": True})
    with pytest.raises(ConfigError, match="params.population"):
        method_config("ggl", {"population": 3})


# -- GIFD ---------------------------------------------------------------------------------------


def test_l1_ball_projection_is_the_nearest_point_of_the_ball() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 5, generator=g, dtype=torch.float64) * 2
    radius = 1.5
    projected = project_l1_ball(v, radius)
    for row, out in zip(v, projected, strict=True):
        # KKT of min ||w - v||^2 s.t. ||w||_1 <= r with ||v||_1 > r: w = sign(v) max(|v| - t, 0)
        # for one t > 0 and ||w||_1 = r (soft thresholding at a common level)
        kept = out != 0
        shrink = (row.abs() - out.abs())[kept]
        t = float(shrink[0])
        assert t > 0 and torch.allclose(shrink, torch.full_like(shrink, t), atol=1e-9)
        assert bool((row[~kept].abs() <= t + 1e-9).all())
        assert bool((torch.sign(out[kept]) == torch.sign(row[kept])).all())
        assert abs(float(out.abs().sum()) - radius) < 1e-9
        assert float(out.abs().sum()) <= radius + 1e-9
    inside = v / v.abs().sum(dim=1, keepdim=True) * 0.5  # l1 norm 0.5 < radius: unchanged
    assert torch.equal(project_l1_ball(inside, radius), inside)


def test_gifd_feature_steps_stay_inside_their_l1_balls(gen, problem) -> None:
    params = {"z_iterations": 2, "f_iterations": 6, "layers": 2, "restarts": 2,
              "f_lr": 1.0, "radius": 3.0, "radius_step": 2.0}  # fmt: skip
    config = method_config("gifd", params)
    seen: dict[str, float] = {}

    def check(p: Progress) -> None:
        state = p.export_state()
        if "f" in state["variables"]:
            v = state["variables"]
            per_image = (v["f"] - v["f0"]).flatten(2).abs().sum(dim=2)
            seen[p.stage] = max(seen.get(p.stage, 0.0), float(per_image.max()))

    reconstruct("gifd", problem, config, seed=0, generator=gen, progress=check)
    assert set(seen) == {"f1", "f2"}
    # to float32 rounding: f = f0 + deviation, re-subtracted over 4096-8192 entries
    assert seen["f1"] <= 3.0 * (1 + 1e-3) and seen["f2"] <= 5.0 * (1 + 1e-3)
    assert seen["f1"] > 2.0  # lr 1.0 pushes the features to the ball's surface


def test_gifd_keeps_the_best_stage_by_its_own_cost(gen, problem) -> None:
    """A feature learning rate far too large ruins the feature stages: the result is the
    latent stage's images, chosen by the cost, and its cost is the cost of what it returns."""
    params = {"z_iterations": 6, "f_iterations": 4, "layers": 2, "restarts": 2,
              "f_lr": 1e4, "radius": 1e6}  # fmt: skip
    config = method_config("gifd", params)
    result = reconstruct("gifd", problem, config, seed=0, generator=gen)
    assert result.extras["best_stage"] == ["z", "z"]
    again = _cost(problem, config, result.restart_images)
    assert torch.allclose(again, result.restart_costs, rtol=1e-5, atol=1e-7)
    latent_only = reconstruct(
        "gi-z", problem, method_config("gi-z", {"z_iterations": 6, "z_lr": config.z_lr,
                                                "restarts": 2}),
        seed=0, generator=gen,
    )  # fmt: skip
    assert torch.equal(result.restart_images, latent_only.restart_images)
    # with sane values the feature stages win where they lower the cost
    sane = reconstruct("gifd", problem, dataclasses.replace(config, f_lr=0.05, radius=50.0),
                       seed=0, generator=gen)  # fmt: skip
    assert float(sane.restart_costs.min()) <= float(result.restart_costs.min())


@pytest.mark.parametrize("stop_at", [3, 5])  # inside stage f1, and inside f2 after f1 was kept
def test_gifd_resume_is_bit_exact_across_candidate_stages(gen, problem, stop_at: int) -> None:
    params = {"z_iterations": 2, "f_iterations": 4, "layers": 2, "restarts": 2, "radius": 40.0}
    config = method_config("gifd", params)
    whole = reconstruct("gifd", problem, config, seed=4, generator=gen)
    calls = []
    cut = reconstruct(
        "gifd", problem, config, seed=4, generator=gen,
        progress=lambda p: calls.append(p.iteration), should_stop=lambda: len(calls) >= stop_at,
    )  # fmt: skip
    assert cut.status == "interrupted"
    resumed = reconstruct(
        "gifd", problem, config, seed=4, generator=gen, state=_through_checkpoint(cut.state)
    )
    _identical(resumed, whole)
    assert resumed.extras["best_stage"] == whole.extras["best_stage"]


def test_gifd_descriptions_batch_like_the_other_methods(gen, problem) -> None:
    params = {"z_iterations": 2, "f_iterations": 2, "layers": 2, "restarts": 2, "radius": 40.0}
    config = method_config("gifd", params)
    alone = solve(describer("gifd")(problem, config, seed=5, generator=gen))
    together = solve_together(
        [describer("gifd")(p, config, seed=5, generator=gen) for p in (problem, problem)]
    )
    for r in together:
        assert torch.allclose(r.restart_images, alone.restart_images, atol=1e-4)
        assert r.extras["best_stage"] == alone.extras["best_stage"]


def test_gifd_refuses_a_prior_without_enough_feature_layers(gen, problem) -> None:
    with pytest.raises(ConfigError, match="params.layers"):
        reconstruct("gifd", problem, method_config("gifd", {"layers": 5}), generator=gen)
    with pytest.raises(ConfigError, match="params.f_iterations"):
        method_config("gifd", {"f_iterations": 3, "layers": 4})


# -- registry, budgets, tuning ------------------------------------------------------------------


def test_registry_tuning_space_and_methods_table_know_both() -> None:
    gifd = method_config("gifd")
    assert (gifd.z_iterations, gifd.f_iterations, gifd.layers, gifd.radius) == (1000, 4000, 4, 2000)
    assert budget_columns(gifd)["budget_grad_evals"] == 5000 * gifd.restarts
    matched = scaled(gifd, 480 / gifd.restarts)
    assert (matched.z_iterations + matched.f_iterations) * matched.restarts == 480
    ggl = default_space("ggl")
    assert {"kl", "sigma", "population"} <= set(ggl) and "signed_grad" not in ggl
    assert {"z_lr", "f_lr", "radius", "z_fraction"} <= set(default_space("gifd"))
    for name, words in (("ggl", ("Li et al. 2022", "population", "kl")),
                        ("gifd", ("Fang et al. 2023", "radius", "f_lr"))):  # fmt: skip
        text = _text(method_table(name))
        assert all(w in text for w in words), name


def _text(table) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()
