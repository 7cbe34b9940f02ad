"""R-GAP and R-GAP+G (gi_core.attacks.rgap): exact recovery where the equations determine the
input, per-layer errors, refusal of victims that are not of R-GAP's form."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn

from gi_core.attacks import InversionProblem, rgap
from gi_core.attacks.registry import method_config, reconstruct
from gi_core.errors import ConfigError
from gi_core.generators import build_generator
from gi_core.gradients import client_gradient
from gi_core.victims import build_victim
from tasks.spec import parse_spec


@pytest.fixture(autouse=True)
def _one_thread():
    # LSMR applies small convolutions thousands of times: one thread avoids OpenMP barriers
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(victim: nn.Module, shape: tuple[int, int, int], *, seed: int = 0):
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed))
    y = torch.tensor([3])
    return InversionProblem(victim, client_gradient(victim, x, y), y, shape), x


def _fc_victim() -> nn.Module:
    # over-determined: every layer is at least as wide as its input (192 -> 256 -> 300 -> 10)
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 8 * 8, 256),
        nn.LeakyReLU(0.2),
        nn.Linear(256, 300),
        nn.Tanh(),
        nn.Linear(300, 10),
    )


def test_rgap_recovers_the_input_of_an_overdetermined_fc_victim_exactly() -> None:
    victim = _fc_victim()
    problem, x = _problem(victim, (3, 8, 8))
    result = reconstruct("rgap", problem, method_config("rgap"))
    assert result.status == "ok" and result.iterations == 0
    torch.testing.assert_close(result.images, x, atol=1e-5, rtol=0)
    errors = rgap.layer_errors(result.extras["layer_inputs"], rgap.layer_inputs(victim, x))
    assert len(errors) == 3  # one per Linear layer, the input first
    assert max(errors) < 1e-5
    assert float(result.restart_costs[0]) < 1e-5  # its own check: the gradients match


def test_rgap_inverts_a_strided_cnn_and_reports_every_layer() -> None:
    victim = build_victim("rgapnet", num_classes=10, image_size=16, width=8)
    problem, x = _problem(victim, (3, 16, 16))
    gray = x.mean(1, keepdim=True).expand(1, 3, 16, 16).clone()
    problem = InversionProblem(
        victim, client_gradient(victim, gray, problem.labels), problem.labels, (3, 16, 16)
    )
    # width 8 at 16 px: 8·8² = 512 forward equations over-determine a gray image (256
    # unknowns) but not a colour one (768): the colour model makes the closed form exact
    result = reconstruct("rgap", problem, method_config("rgap", {"colour": "gray"}))
    errors = rgap.layer_errors(result.extras["layer_inputs"], rgap.layer_inputs(victim, gray))
    assert len(errors) == 4
    assert max(errors) < 1e-4, errors
    colour = reconstruct("rgap", problem, method_config("rgap"))
    wrong = rgap.layer_errors(colour.extras["layer_inputs"], rgap.layer_inputs(victim, gray))
    assert wrong[1:] == pytest.approx(errors[1:], abs=1e-3)  # the upper layers agree
    assert wrong[0] > 100 * errors[0]  # the under-determined image does not


def test_rgap_honours_the_sparsity_mask_and_normalisation() -> None:
    victim = build_victim(
        "rgapnet", num_classes=10, image_size=16, width=16, normalize=((0.5,) * 3, (0.25,) * 3)
    )
    problem, x = _problem(victim, (3, 16, 16), seed=1)
    masks = [torch.ones_like(g) for g in problem.target]
    masks[0].view(-1)[::7] = 0  # drop a seventh of the first layer's gradient
    target = [g * m for g, m in zip(problem.target, masks, strict=True)]
    masked = InversionProblem(victim, target, problem.labels, problem.image_shape, masks=masks)
    result = reconstruct("rgap", masked, method_config("rgap"))
    torch.testing.assert_close(result.images, x, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    ("victim", "why"),
    [
        (build_victim("convnet", num_classes=10, image_size=8), "BatchNorm2d"),
        (build_victim("resnet20", num_classes=10, image_size=32), "CifarResNet"),
        (
            nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 10)),
            "slope <= 0|ReLU",
        ),
        (nn.Sequential(nn.Flatten(), nn.Linear(192, 10, bias=False)), "with a bias"),
    ],
)
def test_rgap_refuses_a_victim_not_of_its_form(victim: nn.Module, why: str) -> None:
    with pytest.raises(ConfigError, match=f"victim.arch: rgap needs .*({why})"):
        rgap.check_victim(victim, (3, 8, 8) if isinstance(victim, nn.Sequential) else (3, 32, 32))


def test_rgap_refuses_a_batch_and_rgap_g_needs_layers_to_replace() -> None:
    victim = _fc_victim()
    x = torch.rand(2, 3, 8, 8)
    y = torch.tensor([1, 2])
    batch = InversionProblem(victim, client_gradient(victim, x, y), y, (3, 8, 8))
    with pytest.raises(ConfigError, match="batch_sizes"):
        reconstruct("rgap", batch, method_config("rgap"))
    problem, _ = _problem(victim, (3, 8, 8))
    with pytest.raises(ConfigError, match="generator_layers"):
        reconstruct("rgap+g", problem, method_config("rgap+g", {"generator_layers": 3}))
    with pytest.raises(ConfigError, match="restarts"):
        method_config("rgap", {"restarts": 2})


def test_rgap_g_fits_the_prior_to_the_recovered_features() -> None:
    victim = build_victim("rgapnet", num_classes=10, image_size=16, width=4)
    gen = build_generator("dcgan32", output_size=16)
    torch.manual_seed(1)
    with torch.no_grad():
        x = gen(torch.randn(1, gen.latent_dim))  # an image the prior can express
    y = torch.tensor([3])
    problem = InversionProblem(victim, client_gradient(victim, x, y), y, (3, 16, 16))
    config = method_config("rgap+g", {"generator_layers": 1, "z_iterations": 60, "restarts": 2})
    result = reconstruct("rgap+g", problem, config, seed=0, generator=gen)
    assert result.status == "ok" and result.restart_costs.shape == (2,)
    assert result.extras["generator_layers"] == 1
    errors = rgap.layer_errors(result.extras["layer_inputs"], rgap.layer_inputs(victim, x))
    assert len(errors) == 4
    # above the generator: R-GAP's closed form (width 4: layer 1 is determined)
    assert max(errors[1:]) < 1e-3
    # the fit lowered its own cost from the first curve point to the last
    best = result.best_restart
    assert float(result.loss_curve[-1, best]) < float(result.loss_curve[0, best])


def test_the_job_body_reports_one_error_per_layer_and_none_for_other_methods() -> None:
    from tasks.work.inversion import _layer_errors

    victim = _fc_victim()
    problem, x = _problem(victim, (3, 8, 8))
    result = reconstruct("rgap", problem, method_config("rgap"))
    errors = json.loads(_layer_errors(problem, x, result) or "[]")
    assert len(errors) == 3 and max(errors) < 1e-5
    result.extras.pop("layer_inputs")  # what every other method returns
    assert _layer_errors(problem, x, result) is None


def test_a_grid_with_rgap_on_a_bn_victim_or_a_batch_is_refused() -> None:
    victims = [{"arch": "rgapnet", "width": 4}, {"arch": "convnet", "width": 4}]
    spec: dict[str, Any] = {
        "name": "t",
        "data": {"dataset": "synthetic", "num_batches": 1},
        "victims": victims,
        "methods": ["rgap"],
        "batch_sizes": [1, 2],
    }
    with pytest.raises(ConfigError) as info:
        parse_spec(spec)
    lines = str(info.value).splitlines()
    assert any(line.strip().startswith("batch_sizes: rgap") for line in lines)
    assert any(line.strip().startswith("victims[1].arch: rgap needs") for line in lines)
    assert not any("victims[0]" in line for line in lines)  # rgapnet is of R-GAP's form
    parse_spec({**spec, "victims": victims[:1], "batch_sizes": [1]})  # accepted


def test_report_figures_a1_a2_from_layer_errors(tmp_path: Path) -> None:
    from pipelines import report_rgap

    def row(method: str, defense: str, level: float, errors: list[float]) -> dict[str, object]:
        return {
            "method": method,
            "variant": method,
            "victim": "rgapnet",
            "victim_width": 16,
            "defense": defense,
            "defense_level": level,
            "status": "ok",
            "layer_errors": json.dumps(errors),
        }

    df = pd.DataFrame(
        [
            row("rgap", "none", 0.0, [1e-6, 1e-7, 1e-7]),
            row("rgap", "noise", 1e-4, [0.3, 0.05, 0.003]),
            row("rgap+g", "none", 0.0, [0.2, 1e-7, 1e-7]),
        ]
    )
    table = report_rgap.layer_table(df)
    assert len(table) == 9
    noisy = table[(table["method"] == "rgap") & (table["defense"] == "noise 0.0001")]
    assert noisy.sort_values("layer")["mean"].tolist() == [0.3, 0.05, 0.003]
    assert report_rgap.fig_a1(df, tmp_path / "a1.png") == tmp_path / "a1.png"
    assert report_rgap.fig_a2(df, tmp_path / "a2.png") == tmp_path / "a2.png"
    assert (tmp_path / "a1.png").stat().st_size > 0
    other = df.assign(layer_errors=None)  # a run without R-GAP cells draws neither
    assert report_rgap.fig_a1(other, tmp_path / "b.png") is None
    assert report_rgap.fig_a2(other, tmp_path / "b.png") is None
