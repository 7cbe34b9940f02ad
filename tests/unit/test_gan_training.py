"""DCGAN pretraining (the wrong prior): it learns, and resume from an export is bit-exact."""

import io

import pytest
import torch

from gi_core.errors import ConfigError
from gi_core.gan_training import GANConfig, GANTraining, discriminator
from gi_core.generators import build_generator


def _images() -> torch.Tensor:
    rng = torch.Generator().manual_seed(0)
    coarse = torch.rand(12, 3, 4, 4, generator=rng)
    return torch.nn.functional.interpolate(coarse, size=16, mode="bilinear")


def _training(config: GANConfig) -> GANTraining:
    return GANTraining(build_generator("dcgan32", output_size=16, seed=0), _images(), config)


def test_resume_from_export_is_bit_exact_and_losses_are_finite():
    config = GANConfig(steps=4, batch_size=4, seed=1)
    straight = _training(config)
    for _ in range(4):
        straight.train_step()
    half = _training(config)
    for _ in range(2):
        half.train_step()
    buffer = io.BytesIO()
    torch.save(half.export(), buffer)
    buffer.seek(0)
    resumed = _training(config)
    resumed.restore(torch.load(buffer, weights_only=True))
    for _ in range(2):
        resumed.train_step()
    assert resumed.step == straight.step == 4
    a, b = straight.generator.state_dict(), resumed.generator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.log == straight.log
    assert all(torch.isfinite(torch.tensor([e["loss_d"], e["loss_g"]])).all() for e in resumed.log)
    start = build_generator("dcgan32", output_size=16, seed=0).state_dict()
    assert not torch.equal(start["main.0.weight"], a["main.0.weight"])  # G was trained


def test_discriminator_shapes_and_config_checks():
    assert discriminator(32)(torch.rand(2, 3, 32, 32)).shape == (2, 1)
    assert discriminator(64)(torch.rand(2, 3, 64, 64)).shape == (2, 1)
    with pytest.raises(ConfigError, match="prior.image_size"):
        discriminator(24)
    with pytest.raises(ConfigError, match="prior.lr"):
        GANConfig(lr=0)
