"""StyleGAN2 prior (gi_core.stylegan2) on tiny random configurations (16 px, 3 blocks)."""

import copy
import io

import pytest
import torch

from gi_core.attacks import InversionProblem, method_config, reconstruct
from gi_core.errors import ConfigError
from gi_core.gradients import bn_statistics, client_gradient
from gi_core.stylegan2 import (
    StyleGAN2Config,
    StyleGAN2Options,
    _blur_kernel,
    build_stylegan2,
    parameter_counts,
    upsample_skip,
)
from gi_core.victims import build_victim

TINY = StyleGAN2Config(resolution=16, channels=(8, 8, 8), z_dim=8, w_dim=8, mapping_layers=2)


def _gen(space: str = "w", *, noise: str = "fixed", seed: int = 0, size: int = 16):
    return build_stylegan2(
        TINY, output_size=size, options=StyleGAN2Options(space, noise), seed=seed
    )


def _problem(size: int = 16, batch: int = 2):
    # The target images come from another seed of the same architecture: in the prior's range,
    # not reachable by the attacked generator's latent alone.
    truth_gen = _gen("z", seed=7, size=size)
    with torch.no_grad():
        x = truth_gen(torch.randn(batch, TINY.z_dim, generator=torch.Generator().manual_seed(3)))
    y = torch.arange(batch)
    model = build_victim("convnet", num_classes=4, image_size=size, width=4, seed=0)
    grads, stats = client_gradient(model, x, y), bn_statistics(model, x)
    return InversionProblem(model, grads, y, (3, size, size), bn_target=stats), x


def test_shapes_range_and_pooling() -> None:
    for space, shape in (("z", (8,)), ("w", (8,)), ("w+", (TINY.num_ws, 8))):
        gen = _gen(space, size=8)
        z = gen.sample_latents(2, 3, generator=torch.Generator().manual_seed(0))
        assert z.shape == (2, 3, *shape)
        with torch.no_grad():
            img = gen(z.flatten(0, 1))
        assert img.shape == (6, 3, 8, 8)  # 16 px native, average-pooled by 2
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
        assert float(img.std()) > 1e-3  # not a constant image
    assert TINY.num_ws == 6


def test_mapping_is_frozen_and_only_synthesis_is_searched() -> None:
    gen = _gen()
    names = [n for n, _ in gen.named_parameters()]
    assert names and all(n.startswith("synthesis.") for n in names)
    assert any(n.startswith("mapping.fc1.") for n in gen.state_dict())
    mapping, synthesis = parameter_counts(TINY)
    assert synthesis == sum(p.numel() for p in gen.parameters())
    assert mapping == sum(b.numel() for b in gen.mapping.buffers())


def test_skip_upsampling_matches_upfirdn2d_reference() -> None:
    # upfirdn2d(up=2, pad=(2, 1), gain 4) of a single impulse is the 2-D FIR kernel itself,
    # placed so that the image keeps its centre: the response to pixel (1, 1) of a 4x4 image
    # is the kernel [1 3 3 1]^2 / 64 * 4, centred between output pixels 2 and 3 (rows 1..4).
    img = torch.zeros(1, 1, 4, 4)
    img[0, 0, 1, 1] = 1.0
    out = upsample_skip(img, _blur_kernel(4.0))
    assert out.shape == (1, 1, 8, 8)
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    expected = torch.zeros(8, 8)
    expected[1:5, 1:5] = (k[:, None] * k[None, :]) / 64 * 4
    torch.testing.assert_close(out[0, 0], expected)
    # a constant image stays constant away from the border (the filter's DC gain is 1 per pixel)
    flat = upsample_skip(torch.ones(1, 1, 6, 6), _blur_kernel(4.0))
    torch.testing.assert_close(flat[0, 0, 2:-2, 2:-2], torch.ones(8, 8))


def test_modulated_conv_equals_per_sample_weight_scaling() -> None:
    # eq. 1-3 written literally (per-sample weights, grouped conv) vs the non-fused form
    from gi_core.stylegan2 import modulated_conv

    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 5, 6, 6, generator=g), torch.randn(4, 5, 3, 3, generator=g)
    s = torch.rand(3, 5, generator=g) + 0.5
    w = weight[None] * s[:, None, :, None, None]  # (N, O, I, k, k)
    w = w * (w.square().sum((2, 3, 4), keepdim=True) + 1e-8).rsqrt()
    ref = torch.nn.functional.conv2d(
        x.reshape(1, 15, 6, 6), w.reshape(12, 5, 3, 3), padding=1, groups=3
    )
    out = modulated_conv(x, weight, s, demodulate=True, up=False, blur=_blur_kernel(4.0))
    torch.testing.assert_close(out, ref.reshape(3, 4, 6, 6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("space", ["z", "w", "w+"])
def test_latent_search_lowers_the_cost(space: str) -> None:
    problem, _ = _problem()
    config = method_config("gi-z", {"z_iterations": 30, "restarts": 2, "tv": 0.0})
    result = reconstruct("gi-z", problem, config, seed=0, generator=_gen(space))
    assert result.status == "ok"
    first, last = result.loss_curve[0], result.restart_costs
    assert bool((last < first).all()), (first, last)


def test_per_image_copies_diverge() -> None:
    gen = _gen("w")
    problem, _ = _problem()
    config = method_config(
        "gi-z/w", {"z_iterations": 2, "w_iterations": 6, "restarts": 1, "w_lr": 1e-2}
    )
    last: dict = {}

    def on_progress(p) -> None:
        if p.iteration == p.total:  # variables after the last step of the w stage
            last.update(p.export_state()["variables"])

    result = reconstruct("gi-z/w", problem, config, seed=0, generator=gen, progress=on_progress)
    assert result.status == "ok"
    copies = last["w.synthesis.b16.conv1.weight"]  # (R, B, *shape)
    assert copies.shape == (1, 2, 8, 8, 3, 3)
    start = gen.synthesis.b16.conv1.weight
    assert not torch.equal(copies[0, 0], start) and not torch.equal(copies[0, 1], start)
    assert float((copies[0, 0] - copies[0, 1]).abs().max()) > 1e-4
    assert not any(k.startswith("w.mapping") for k in last)  # the mapping is never a copy


def test_vectorised_restarts_equal_separate_runs() -> None:
    gen = _gen("w+")
    problem, _ = _problem()
    config = method_config("gi-z/w", {"z_iterations": 3, "w_iterations": 3, "restarts": 2})
    z = gen.sample_latents(2, 2, generator=torch.Generator().manual_seed(1))
    both = reconstruct("gi-z/w", problem, config, seed=0, generator=gen, init=z)
    one = method_config("gi-z/w", {"z_iterations": 3, "w_iterations": 3, "restarts": 1})
    for r in range(2):
        alone = reconstruct("gi-z/w", problem, one, seed=0, generator=gen, init=z[r : r + 1])
        torch.testing.assert_close(alone.restart_images[0], both.restart_images[r])
        torch.testing.assert_close(alone.restart_costs[0], both.restart_costs[r])


def _stop_after(n: int):
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        return calls[0] > n

    return should_stop


def test_resume_across_the_z_to_w_boundary_is_bit_exact() -> None:
    gen = _gen("w")
    problem, _ = _problem()
    config = method_config("gi-z/w", {"z_iterations": 4, "w_iterations": 4, "restarts": 2})
    full = reconstruct("gi-z/w", problem, config, seed=3, generator=gen)
    for stop in (4, 5):  # exactly at the boundary, and one step into the w stage
        should_stop = _stop_after(stop)
        cut = reconstruct("gi-z/w", problem, config, seed=3, generator=gen, should_stop=should_stop)
        assert cut.status == "interrupted"
        buffer = io.BytesIO()
        torch.save(cut.state, buffer)  # a checkpoint must load with weights_only=True
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        resumed = reconstruct("gi-z/w", problem, config, seed=3, generator=gen, state=state)
        assert torch.equal(resumed.images, full.images)
        assert torch.equal(resumed.restart_costs, full.restart_costs)


def test_every_method_runs_on_stylegan2() -> None:
    from gi_core.attacks.registry import METHOD_NAMES, RGAP_METHODS, uses_generator

    problem, _ = _problem()
    short = {"z_iterations": 2, "w_iterations": 2, "x_iterations": 2, "restarts": 2}
    with pytest.raises(ConfigError, match="StyleGAN2's feature domain"):  # decision 252
        reconstruct("gifd", problem, method_config("gifd"), seed=0, generator=_gen())
    # R-GAP+G needs a victim of R-GAP's form (tests/unit/test_rgap.py)
    skip = {"gifd", *RGAP_METHODS}
    for name in [m for m in METHOD_NAMES if uses_generator(m) and m not in skip]:
        cls_fields = method_config(name).__dataclass_fields__
        params = {k: v for k, v in short.items() if k in cls_fields}
        result = reconstruct(name, problem, method_config(name, params), seed=0, generator=_gen())
        assert result.status == "ok", name
        assert result.images.shape == (2, 3, 16, 16)


def test_gi_w_starts_from_a_fresh_stylegan2_init() -> None:
    gen = _gen("w")
    problem, _ = _problem()
    config = method_config("gi-w", {"w_iterations": 3, "restarts": 1})
    a = reconstruct("gi-w", problem, config, seed=0, generator=gen)
    b = reconstruct("gi-w", problem, config, seed=1, generator=gen)
    assert a.status == b.status == "ok"
    assert not torch.equal(a.images, b.images)  # the untrained start depends on the seed
    assert torch.equal(gen.synthesis.b4.const, _gen("w").synthesis.b4.const)  # caller untouched


def test_noise_modes() -> None:
    fixed, other = _gen(), _gen().with_noise_seed(5)
    for layer in fixed.synthesis.layers():  # make noise visible (random init has strength 0)
        layer.noise_strength.data.fill_(1.0)
    for layer in other.synthesis.layers():
        layer.noise_strength.data.fill_(1.0)
    w = fixed.sample_latents(1, 2, generator=torch.Generator().manual_seed(0))[0]
    with torch.no_grad():
        assert torch.equal(fixed(w), fixed(w))  # fixed: deterministic
        assert not torch.equal(fixed(w), other(w))  # another cell seed, other noise
        rnd = copy.deepcopy(fixed)
        for layer in rnd.synthesis.layers():
            layer.random_noise = True
        assert not torch.equal(rnd(w), rnd(w))  # random: redrawn every pass
    # random noise also works inside the per-image (vmapped) stage
    problem, _ = _problem()
    config = method_config("gi-z/w", {"z_iterations": 1, "w_iterations": 2, "restarts": 1})
    result = reconstruct("gi-z/w", problem, config, seed=0, generator=_gen(noise="random"))
    assert result.status == "ok"


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="resolution"):
        StyleGAN2Config(resolution=24, channels=(8, 8))
    with pytest.raises(ConfigError, match="channels"):
        StyleGAN2Config(resolution=16, channels=(8, 8))
    with pytest.raises(ConfigError, match="latent_space"):
        StyleGAN2Options("y")
    with pytest.raises(ConfigError, match="output_size"):
        _gen(size=12)


def test_the_pipeline_draws_fixed_noise_from_each_cells_seed() -> None:
    from tasks.cells import expand
    from tasks.spec import parse_spec
    from tasks.work import generator_for

    spec = parse_spec(
        {
            "name": "noise",
            "data": {"dataset": "synthetic", "image_size": 32, "num_batches": 2},
            "victim": {"arch": "convnet", "width": 4},
            "generator": {
                "kind": "stylegan2",
                "stylegan2": {"resolution": 32, "channels": [8, 8, 8, 8], "z_dim": 8, "w_dim": 8},
            },
            "methods": ["gi-z"],
            "seeds": [0, 1],
        }
    )
    cells = expand(spec).inversion_cells
    by_seed: dict[int, list] = {}
    for cell in cells:
        by_seed.setdefault(cell.seed, []).append(generator_for(cell))
    same, other = by_seed[0], by_seed[1]
    assert len(same) == 2 and same[0] is same[1]  # one seed: one object (cells can batch)
    noise = [g.synthesis.b32.conv1.noise_const for g in (same[0], other[0])]
    assert not torch.equal(noise[0], noise[1])
    fresh = build_stylegan2(spec.generator.stylegan2.config(), output_size=32, seed=0)
    fresh.draw_noise_(1)
    assert torch.equal(
        other[0].synthesis.b32.conv1.noise_const, fresh.synthesis.b32.conv1.noise_const
    )
