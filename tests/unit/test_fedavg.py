"""FedAvg's client update simulated by the attacker equals the client's real update (issue 19)."""

from __future__ import annotations

import pytest
import torch

from gi_core.datasets import batch_indices, load_images
from gi_core.errors import ConfigError
from gi_core.fedavg import LocalTraining, aggregate, client_update, simulated_update
from gi_core.victims import build_victim


def _setup(batch: int = 4):
    idx = batch_indices("lfw-faces", batch_size=batch, batch_index=0, image_size=32)
    x, y = load_images("lfw-faces", idx, image_size=32)
    y = y % 5
    model = build_victim("convnet", num_classes=5, image_size=32, width=4, seed=0)
    return model, x, y


@pytest.mark.parametrize(
    "local",
    [
        LocalTraining(local_steps=1, local_lr=0.1),
        LocalTraining(local_steps=3, local_batch_size=2, local_lr=0.05),
        LocalTraining(local_steps=4, local_batch_size=3, local_lr=0.1),  # uneven last batch
    ],
)
def test_simulated_update_equals_the_clients_real_update(local):
    model, x, y = _setup()
    real = client_update(model, x, y, local)
    simulated = simulated_update(model, x, y, local)
    assert len(real) == len(simulated)
    for a, b in zip(real, simulated, strict=True):
        torch.testing.assert_close(b.detach(), a, rtol=1e-5, atol=1e-6)
    assert any(float(a.abs().max()) > 0 for a in real)  # the client did move


def test_one_step_update_is_lr_times_the_fedsgd_gradient():
    from gi_core.gradients import client_gradient

    model, x, y = _setup()
    update = simulated_update(model, x, y, LocalTraining(local_steps=1, local_lr=0.5))
    for u, g in zip(update, client_gradient(model, x, y), strict=True):
        torch.testing.assert_close(u.detach(), 0.5 * g, rtol=1e-5, atol=1e-6)


def test_the_simulation_is_differentiable_in_the_images():
    model, x, y = _setup()
    x = x.clone().requires_grad_(True)
    update = simulated_update(model, x, y, LocalTraining(local_steps=2, local_batch_size=2))
    (grad,) = torch.autograd.grad(sum(u.square().sum() for u in update), x)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


def test_aggregate_is_the_mean_of_client_updates():
    model, x, y = _setup()
    local = LocalTraining(local_steps=2)
    a, b = client_update(model, x[:2], y[:2], local), client_update(model, x[2:], y[2:], local)
    for m, u, v in zip(aggregate([a, b]), a, b, strict=True):
        torch.testing.assert_close(m, (u + v) / 2)
    with pytest.raises(ConfigError):
        aggregate([])
    with pytest.raises(ConfigError, match="local_steps"):
        LocalTraining(local_steps=0)
