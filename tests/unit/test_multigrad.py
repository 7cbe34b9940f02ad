"""Appendix D: T observations of one batch (θ re-initialised or trained), one shared x."""

import pytest
import torch

from gi_core.errors import ConfigError
from gi_core.gradients import client_gradient
from gi_core.multigrad import MultiGradConfig, observe, reconstruct
from gi_core.victims import build_victim


def _build(seed: int) -> torch.nn.Module:
    return build_victim("convnet", num_classes=4, image_size=16, width=4, seed=seed)


def _data():
    rng = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 16, 16, generator=rng), torch.tensor([0, 3])


def test_trained_setting_takes_client_sgd_steps_and_reinit_uses_fresh_seeds():
    x, y = _data()
    trained = observe(
        _build, x, y, MultiGradConfig(gradients=3, setting="trained", train_lr=0.5), seed=7
    )
    for (theta, grads), (nxt, _) in zip(trained, trained[1:], strict=False):
        for (name, p), g in zip(theta.items(), grads, strict=True):
            torch.testing.assert_close(nxt[name], p - 0.5 * g)
    reinit = observe(_build, x, y, MultiGradConfig(gradients=3, setting="reinit"), seed=7)
    for t, (theta, grads) in enumerate(reinit):
        fresh = _build(7 + t)
        assert all(torch.equal(theta[n], p) for n, p in fresh.named_parameters())
        assert all(
            torch.equal(a, b) for a, b in zip(grads, client_gradient(fresh, x, y), strict=True)
        )
    first = lambda obs: obs[0][0]  # noqa: E731 - T = 1 is the same observation in both settings
    assert all(torch.equal(first(trained)[k], first(reinit)[k]) for k in first(trained))


def test_cost_is_the_sum_over_observations():
    x, y = _data()
    config = MultiGradConfig(gradients=2, setting="reinit", iterations=1, tv=0.0, restarts=2)
    obs = observe(_build, x, y, config, seed=1)
    both = reconstruct(_build(0), obs, y, (3, 16, 16), config, seed=3)
    singles = [reconstruct(_build(0), [o], y, (3, 16, 16), config, seed=3) for o in obs]
    # curve point 0 is the cost at the shared random start, per restart
    torch.testing.assert_close(
        both.loss_curve[0],
        singles[0].loss_curve[0] + singles[1].loss_curve[0],
        rtol=1e-5,
        atol=1e-6,
    )
    assert both.images.shape == (2, 3, 16, 16)


def test_config_checks():
    with pytest.raises(ConfigError, match="params.setting"):
        MultiGradConfig(setting="frozen")
    with pytest.raises(ConfigError, match="params.gradients"):
        MultiGradConfig(gradients=0)
