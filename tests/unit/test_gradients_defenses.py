"""Client gradients and defenses do exactly what they say."""

import math
from fractions import Fraction

import pytest
import torch

from gi_core.defenses import Defense, apply_defense, dp_epsilon, quantize, topk_mask
from gi_core.errors import ConfigError
from gi_core.gradients import (
    ParamIndex,
    bn_statistics,
    client_gradient,
    per_example_gradients,
    prepare_victim,
)
from gi_core.objectives import gradient_distance
from gi_core.victims import build_victim


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 16, 16, generator=gen), torch.tensor([0, 3, 5, 7])


@pytest.mark.parametrize("arch", ["lenet", "convnet", "resnet18"])
def test_client_gradient_equals_autograd(arch: str, batch) -> None:
    x, y = batch
    model = build_victim(arch, num_classes=10, image_size=16, width=4, seed=1)
    grads = client_gradient(model, x, y)
    ref_model = prepare_victim(model)
    params = [p.requires_grad_() for p in ref_model.parameters()]
    loss = torch.nn.functional.cross_entropy(ref_model(x), y)
    ref = torch.autograd.grad(loss, params)
    assert len(grads) == len(ref)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_victim_is_deterministic_from_seed_and_classes_follow_data() -> None:
    a = build_victim("convnet", num_classes=13, image_size=32, seed=5)
    b = build_victim("convnet", num_classes=13, image_size=32, seed=5)
    c = build_victim("convnet", num_classes=13, image_size=32, seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    assert a(torch.rand(2, 3, 32, 32)).shape == (2, 13)
    with pytest.raises(ConfigError, match="victim.arch"):
        build_victim("vgg", num_classes=10, image_size=32)


def test_bn_statistics_are_the_batch_statistics_of_the_first_layer(batch) -> None:
    x, _ = batch
    model = build_victim("convnet", num_classes=10, image_size=16, width=4, seed=0)
    stats = bn_statistics(model, x)
    first_conv_out = model[0](x)
    torch.testing.assert_close(stats[0][0], first_conv_out.mean((0, 2, 3)))
    torch.testing.assert_close(stats[0][1], first_conv_out.var((0, 2, 3), unbiased=False))
    assert len(stats) == 4


def test_param_index_round_trip() -> None:
    model = build_victim("convnet", num_classes=10, image_size=16, width=4, seed=0)
    index = ParamIndex.of(model)
    tensors = [torch.randn(p.shape) for p in model.parameters()]
    flat = index.flatten(tensors)
    assert flat.shape == (index.numel,) and flat.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(index.unflatten(flat), tensors, strict=True))


def test_sparsity_keeps_exactly_k_largest_and_exposes_mask(batch) -> None:
    x, y = batch
    model = build_victim("lenet", num_classes=10, image_size=16, seed=0)
    full = client_gradient(model, x, y)
    out = apply_defense(Defense("sparsity", p=0.9), model, x, y, generator=torch.Generator())
    assert out.masks is not None
    for g, d, m in zip(full, out.grads, out.masks, strict=True):
        k = max(1, math.floor(g.numel() * (Fraction(1) - Fraction("0.9"))))
        assert int(m.sum()) == k
        assert torch.equal(d, g * m)
        # every kept magnitude >= every dropped magnitude
        if k < g.numel():
            assert g[m].abs().min() >= g[~m].abs().max()
    assert int(topk_mask(torch.ones(5), p=0.99).sum()) == 1  # k = max(1, ...)


def test_noise_has_the_requested_std(batch) -> None:
    x, y = batch
    model = build_victim("resnet18", num_classes=10, image_size=16, seed=0)
    clean = client_gradient(model, x, y)
    out = apply_defense(
        Defense("noise", sigma=0.05), model, x, y, generator=torch.Generator().manual_seed(1)
    )
    diff = torch.cat([(d - c).reshape(-1) for d, c in zip(out.grads, clean, strict=True)])
    assert abs(float(diff.std()) - 0.05) < 0.05 * 0.01
    assert abs(float(diff.mean())) < 1e-3


def test_dp_clips_per_example_norms_and_reports_epsilon(batch) -> None:
    x, y = batch
    model = build_victim("lenet", num_classes=10, image_size=16, seed=0)
    clip = 1e-3
    per_example = per_example_gradients(model, x, y)
    norms = torch.sqrt(sum(g.reshape(4, -1).pow(2).sum(1) for g in per_example))
    assert bool((norms > clip).all())  # so clipping really happens in this test
    out = apply_defense(
        Defense("dp", clip=clip, sigma=0.0), model, x, y, generator=torch.Generator()
    )
    mean_norm = float(torch.sqrt(sum(g.pow(2).sum() for g in out.grads)))
    assert mean_norm <= clip + 1e-9
    expected = [(g * (clip / norms).view(-1, *[1] * (g.dim() - 1))).mean(0) for g in per_example]
    for a, b in zip(out.grads, expected, strict=True):
        torch.testing.assert_close(a, b)
    noisy = apply_defense(
        Defense("dp", clip=clip, sigma=1.0), model, x, y, generator=torch.Generator().manual_seed(0)
    )
    assert noisy.info["epsilon"] == pytest.approx(dp_epsilon(1.0)) and noisy.info["delta"] == 1e-5
    assert dp_epsilon(2.0) < dp_epsilon(1.0) < math.inf


def test_quantize_uses_at_most_2_pow_bits_levels() -> None:
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    q = quantize(g, bits=3)
    assert q.unique().numel() <= 8
    assert float((q - g).abs().max()) <= float(g.max() - g.min()) / 7 / 2 + 1e-6
    assert float(q.min()) == pytest.approx(float(g.min())) and float(q.max()) == pytest.approx(
        float(g.max())
    )


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"kind": "sparsity", "p": 1.0}, "defense.p"),
        ({"kind": "noise", "sigma": -1.0}, "defense.sigma"),
        ({"kind": "noise"}, "defense.sigma"),
        ({"kind": "quantize", "bits": 0}, "defense.bits"),
        ({"kind": "blur"}, "defense.kind"),
        ({"kind": "none", "p": 0.5}, "defense.p"),
    ],
)
def test_bad_defense_names_the_field(kwargs, field) -> None:
    with pytest.raises(ConfigError, match=field):
        Defense(**kwargs)


def test_cosine_distance_is_zero_at_the_true_gradient_and_masks_apply() -> None:
    a = [torch.randn(3, 4), torch.randn(5)]
    assert float(gradient_distance(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(gradient_distance(a, [-t for t in a])) == pytest.approx(2.0)
    assert float(gradient_distance(a, a, kind="l2")) == 0.0
    masks = [torch.zeros(3, 4), torch.ones(5)]
    assert float(gradient_distance(a, [torch.zeros(3, 4), a[1]], masks=masks)) == pytest.approx(
        0.0, abs=1e-6
    )
