"""Generative-prior attacks (GI-z, GI-w, GI-z/w, GI-z/x and +BN) on tiny generators."""

import io

import pytest
import torch

from gi_core.attacks import AttackResult, InversionProblem, method_config, reconstruct
from gi_core.attacks.prior import initial_latents
from gi_core.attacks.registry import METHOD_NAMES, RGAP_METHODS, uses_generator
from gi_core.errors import ConfigError
from gi_core.generators import build_generator
from gi_core.gradients import bn_statistics, client_gradient
from gi_core.victims import build_victim

# R-GAP inverts only victims of its own form (rgapnet, B = 1): tests/unit/test_rgap.py.
ATTACKS = [m for m in METHOD_NAMES if m not in RGAP_METHODS]
SHORT = {
    "gi-x": {"iterations": 4},
    "gi-x+bn": {"iterations": 4},
    "gi-z": {"z_iterations": 4},
    "gi-z+bn": {"z_iterations": 4},
    "gi-w": {"w_iterations": 4},
    "gi-z/w": {"z_iterations": 3, "w_iterations": 3},
    "gi-z/w+bn": {"z_iterations": 3, "w_iterations": 3},
    "gi-z/x": {"z_iterations": 3, "x_iterations": 3},
    "ggl": {"iterations": 8, "population": 4},
    "gifd": {"z_iterations": 2, "f_iterations": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def gen():
    return build_generator("dcgan32", output_size=16, seed=0)


def _problem(gen, *, arch: str, size: int, batch: int, seed: int = 5):
    z = gen.sample_latents(1, batch, generator=torch.Generator().manual_seed(seed))[0]
    with torch.no_grad():
        x = (
            torch.nn.functional.interpolate(gen(z), size=size)
            if size != gen.output_size
            else gen(z)
        )
    y = torch.arange(batch)
    model = build_victim(arch, num_classes=10, image_size=size, width=4, seed=0)
    problem = InversionProblem(
        model, client_gradient(model, x, y), y, (3, size, size), bn_target=bn_statistics(model, x)
    )
    return problem, x


def _psnr(a, b) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def test_gi_z_recovers_an_image_in_the_generators_range() -> None:
    gen = build_generator("dcgan32", output_size=32, seed=0)
    problem, x = _problem(gen, arch="lenet", size=32, batch=1)
    config = method_config(
        "gi-z", {"z_iterations": 200, "z_lr": 0.1, "restarts": 1, "tv": 0.0, "distance": "l2"}
    )
    result = reconstruct("gi-z", problem, config, seed=0, generator=gen)
    assert result.status == "ok"
    assert _psnr(result.images, x) >= 30.0


def test_gias_ends_at_or_below_gi_z_from_the_same_latent(gen) -> None:
    problem, _ = _problem(gen, arch="convnet", size=16, batch=2)
    z_only = reconstruct(
        "gi-z",
        problem,
        method_config("gi-z", {"z_iterations": 20, "restarts": 2}),
        seed=1,
        generator=gen,
    )
    # this tiny untrained prior has small weights (DCGAN init, std 0.02): η_w = 1e-3 would
    # move every weight by ~5 % on Adam's first step, so the test scales η_w down with them
    gias = reconstruct(
        "gi-z/w",
        problem,
        method_config(
            "gi-z/w", {"z_iterations": 20, "w_iterations": 20, "w_lr": 3e-5, "restarts": 2}
        ),
        seed=1,
        generator=gen,
    )
    # the first 20 iterations are the same latent search
    torch.testing.assert_close(gias.loss_curve[:2], z_only.loss_curve[:2])
    assert bool((gias.restart_costs <= z_only.restart_costs + 1e-6).all())
    assert float(gias.restart_costs.min()) < float(z_only.restart_costs.min())


def test_per_image_generator_copies_diverge(gen) -> None:
    problem, _ = _problem(gen, arch="convnet", size=16, batch=2)
    config = method_config("gi-z/w", {"z_iterations": 2, "w_iterations": 6, "restarts": 2})
    states = {}
    reconstruct(
        "gi-z/w",
        problem,
        config,
        seed=0,
        generator=gen,
        progress=lambda p: states.__setitem__(p.iteration, p.export_state()),
    )
    w = states[8]["variables"]["w.main.0.weight"]  # (R, B, *shape): one copy per image
    original = dict(gen.named_parameters())["main.0.weight"]
    assert w.shape == (2, 2, *original.shape)
    assert not torch.equal(w[0, 0], w[0, 1]) and not torch.equal(w[0, 0], w[1, 0])
    assert all(not torch.equal(w[r, b], original) for r in range(2) for b in range(2))


@pytest.mark.parametrize("stop_at", [2, 4, 5])  # inside stage 1, exactly at the boundary, stage 2
def test_gias_resume_is_bit_exact_across_the_stage_boundary(gen, stop_at: int) -> None:
    problem, _ = _problem(gen, arch="convnet", size=16, batch=2)
    config = method_config(
        "gi-z/w+bn", {"z_iterations": 4, "w_iterations": 4, "restarts": 2, "curve_every": 3}
    )
    full = reconstruct("gi-z/w+bn", problem, config, seed=2, generator=gen)
    calls = iter(range(100))
    stopped = reconstruct(
        "gi-z/w+bn",
        problem,
        config,
        seed=2,
        generator=gen,
        should_stop=lambda: next(calls) == stop_at,
    )
    assert stopped.status == "interrupted" and stopped.iterations == stop_at
    buffer = io.BytesIO()
    torch.save(stopped.state, buffer)
    buffer.seek(0)
    resumed = reconstruct(
        "gi-z/w+bn",
        problem,
        config,
        seed=2,
        generator=gen,
        state=torch.load(buffer, weights_only=True),
    )
    assert torch.equal(resumed.restart_images, full.restart_images)
    assert torch.equal(resumed.restart_costs, full.restart_costs)
    assert torch.equal(resumed.loss_curve, full.loss_curve)


def test_gias_vectorised_restarts_equal_separate_runs(gen) -> None:
    problem, _ = _problem(gen, arch="convnet", size=16, batch=2)
    z = initial_latents(gen, problem, restarts=2, seed=3)
    params = {"z_iterations": 3, "w_iterations": 3}
    together = reconstruct(
        "gi-z/w", problem, method_config("gi-z/w", {**params, "restarts": 2}), generator=gen, init=z
    )
    for r in range(2):
        alone = reconstruct(
            "gi-z/w",
            problem,
            method_config("gi-z/w", {**params, "restarts": 1}),
            generator=gen,
            init=z[r : r + 1],
        )
        torch.testing.assert_close(
            together.restart_images[r], alone.restart_images[0], rtol=1e-4, atol=1e-5
        )


def test_every_method_runs_through_one_entry_point(gen) -> None:
    problem, _ = _problem(gen, arch="convnet", size=16, batch=2)
    assert set(SHORT) == set(ATTACKS)
    for name in ATTACKS:
        config = method_config(name, {**SHORT[name], "restarts": 2})
        result = reconstruct(name, problem, config, seed=0, generator=gen)
        assert isinstance(result, AttackResult), name
        assert result.images.shape == (2, 3, 16, 16) and result.status == "ok", name
        assert 0.0 <= float(result.images.min()) and float(result.images.max()) <= 1.0, name
        assert result.restart_costs.shape == (2,), name


def test_generator_methods_require_a_generator(gen) -> None:
    problem, _ = _problem(gen, arch="convnet", size=16, batch=1)
    for name in ATTACKS:
        if uses_generator(name):
            with pytest.raises(ConfigError, match="generator"):
                reconstruct(name, problem, method_config(name, SHORT[name]))
