"""Issue 16 Deliver 5: the data's colour model is threat-model knowledge shared by every attack.

A gray data set is detected (or declared in the spec); pixel methods then optimise one channel
and generator methods project their output to BT.601 luminance before the victim; every row
records the colour model (`param_colour`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from gi_core.attacks import InversionProblem, method_config, reconstruct
from gi_core.attacks.colour import LUMA, luma, project
from gi_core.attacks.engine import choose_path, make_batch_cost
from gi_core.attacks.prior import render_latents
from gi_core.attacks.registry import METHOD_NAMES, uses_generator
from gi_core.datasets import detect_colour, load_images
from gi_core.generators import build_generator
from gi_core.gradients import bn_statistics, client_gradient
from gi_core.victims import build_victim
from tasks.cells import expand
from tasks.spec import data_colour, parse_spec

SHORT: dict[str, dict[str, Any]] = {
    "gi-x": {"iterations": 3},
    "gi-x+bn": {"iterations": 3},
    "gi-z": {"z_iterations": 3},
    "gi-z+bn": {"z_iterations": 3},
    "gi-w": {"w_iterations": 3},
    "gi-z/w": {"z_iterations": 2, "w_iterations": 2},
    "gi-z/w+bn": {"z_iterations": 2, "w_iterations": 2},
    "gi-z/x": {"z_iterations": 2, "x_iterations": 2},
    "ggl": {"iterations": 4},
    "gifd": {"z_iterations": 2, "f_iterations": 2, "layers": 2},
}
# R-GAP inverts only victims of its own form (rgapnet); its gray case is in test_rgap.py.
NOT_HERE = {"rgap", "rgap+g"}
SPEC: dict[str, Any] = {
    "name": "colour",
    "data": {"dataset": "lfw-faces", "image_size": 32},
    "victim": {"arch": "convnet", "width": 4},
    "generator": {"kind": "dcgan32"},
    "methods": ["gi-x", "gi-z/w"],
}


@pytest.fixture(scope="module")
def gen():
    return build_generator("dcgan32", output_size=16, seed=0)


def _gray_problem(batch: int = 2, size: int = 16) -> tuple[InversionProblem, torch.Tensor]:
    gray = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(3))
    x = gray.expand(-1, 3, -1, -1)
    y = torch.arange(batch)
    model = build_victim("convnet", num_classes=10, image_size=size, width=4, seed=0)
    grads, stats = client_gradient(model, x, y), bn_statistics(model, x)
    return InversionProblem(model, grads, y, (3, size, size), bn_target=stats), x


def _identical_channels(images: torch.Tensor) -> bool:
    return bool((images[..., :1, :, :] == images).all())


@pytest.mark.parametrize("parametrisation", ["box", "sigmoid"])
def test_gray_pixel_method_optimises_one_channel_seen_as_three(parametrisation: str) -> None:
    problem, _ = _gray_problem()
    config = method_config(
        "gi-x",
        {"iterations": 3, "restarts": 2, "colour": "gray", "parametrisation": parametrisation},
    )
    result = reconstruct("gi-x", problem, config, seed=0)
    assert result.status == "ok" and result.images.shape == (2, 3, 16, 16)
    assert _identical_channels(result.images) and _identical_channels(result.restart_images)
    rgb = reconstruct("gi-x", problem, method_config("gi-x", {"iterations": 3, "restarts": 2}))
    assert not _identical_channels(rgb.images)  # the rgb attack is unchanged: colour noise


def test_every_method_reconstructs_gray_images_under_the_gray_model(gen) -> None:
    problem, _ = _gray_problem()
    assert set(METHOD_NAMES) == set(SHORT) | NOT_HERE  # a new method must be listed here
    for name in SHORT:
        config = method_config(name, {**SHORT[name], "restarts": 1, "colour": "gray"})
        kwargs = {"generator": gen} if uses_generator(name) else {}
        result = reconstruct(name, problem, config, seed=0, **kwargs)
        assert result.status == "ok", name
        # luminance of a colour image: channels agree to float rounding of the projection
        spread = result.images.amax(dim=-3) - result.images.amin(dim=-3)
        assert float(spread.max()) <= 1e-6, name


def test_projection_is_bt601_luminance_as_pil_computes_it() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64) / 255.0
    images = torch.from_numpy(rgb).permute(2, 0, 1).double() / 255.0
    projected = project(images, "gray")
    assert projected.shape == (3, 8, 8) and _identical_channels(projected)
    assert np.abs(projected[0].numpy() - pil).max() <= 1.0 / 255.0  # PIL rounds to uint8
    weights = torch.tensor(LUMA, dtype=torch.float64)
    assert torch.allclose(projected[1], (images * weights[:, None, None]).sum(0))
    assert torch.equal(project(images, "rgb"), images)


def test_generator_output_is_projected_to_luminance(gen) -> None:
    z = gen.sample_latents(2, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        colour = render_latents(gen, z)
        gray = render_latents(gen, z, "gray")
    assert not _identical_channels(colour)
    assert torch.allclose(gray, luma(colour).expand_as(colour), atol=1e-6)


def test_the_gradient_through_the_projection_matches_the_chain_rule(gen) -> None:
    problem, _ = _gray_problem(batch=2)
    config = method_config("gi-z", {"colour": "gray"})
    cost = make_batch_cost([problem], config, path=choose_path([problem], config.restarts, "auto"))
    z = gen.sample_latents(1, 2, generator=torch.Generator().manual_seed(2)).requires_grad_()
    (auto,) = torch.autograd.grad(cost(render_latents(gen, z, "gray")).sum(), z)
    # by hand: d cost / d image at the gray image, through P^T (each output channel is the
    # same luma of the three input channels), then back through the generator
    images = render_latents(gen, z)
    seen = luma(images.detach()).expand_as(images).clone().requires_grad_()
    (d_seen,) = torch.autograd.grad(cost(seen).sum(), seen)
    weights = torch.tensor(LUMA)[:, None, None]
    d_images = d_seen.sum(dim=-3, keepdim=True) * weights
    (manual,) = torch.autograd.grad(images, z, grad_outputs=d_images)
    assert torch.allclose(auto, manual, rtol=1e-4, atol=1e-7)
    # and the projection is the linear map autograd differentiates
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: project(t, "gray"), (x,))


@pytest.mark.parametrize("name", ["lfw-faces", "natural-photos", "synthetic"])
def test_built_in_colour_models_match_their_pixels(name: str) -> None:
    images, _ = load_images(name, list(range(16)), image_size=32)
    assert (detect_colour(name) == "gray") == _identical_channels(images)


def _folder(root: Path, modes: list[str]) -> Path:
    for i, mode in enumerate(modes):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def test_a_gray_folder_is_detected_and_the_spec_can_override_it(tmp_path: Path) -> None:
    gray = _folder(tmp_path / "gray", ["L", "L", "I;16", "L"])
    mixed = _folder(tmp_path / "mixed", ["L", "RGB", "L", "L"])
    assert detect_colour(f"imagefolder:{gray}") == "gray"
    assert detect_colour(f"imagefolder:{mixed}") == "rgb"
    spec = {**SPEC, "data": {"dataset": f"imagefolder:{gray}", "image_size": 32}}
    assert data_colour(parse_spec(spec)) == "gray"
    spec["data"]["colour"] = "rgb"
    assert data_colour(parse_spec(spec)) == "rgb"


def test_every_method_of_a_gray_grid_is_gray_and_the_rows_say_so() -> None:
    cells = expand(parse_spec(SPEC)).inversion_cells
    assert {c.config.colour for c in cells} == {"gray"}  # lfw-faces: detected
    assert {c.metric_axes()["param_colour"] for c in cells} == {"gray"}
    declared = expand(parse_spec({**SPEC, "data": {**SPEC["data"], "colour": "rgb"}}))
    rgb = declared.inversion_cells
    assert {c.config.colour for c in rgb} == {"rgb"}
    # rgb cells keep the ids they had before the colour model existed (omitted at default)
    assert all("colour" not in c.to_dict()["config"] for c in rgb)
    assert {c.id for c in rgb}.isdisjoint(c.id for c in cells)
    # an entry may set params.colour itself (an ablation): it wins over the data's model
    ablation = {**SPEC, "methods": [{"name": "gi-z/w", "params": {"colour": "rgb"}}, "gi-x"]}
    by_method = {c.method: c.config.colour for c in expand(parse_spec(ablation)).inversion_cells}
    assert by_method == {"gi-z/w": "rgb", "gi-x": "gray"}
