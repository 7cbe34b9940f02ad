"""Soteria (Sun et al. 2021) among the defenses (issue 19): it zeroes the documented share of
the representation layer's gradient and leaves every other gradient entry as it was."""

from __future__ import annotations

import math

import pytest
import torch

from gi_core.datasets import batch_indices, load_images
from gi_core.defenses import Defense, apply_defense
from gi_core.errors import ConfigError
from gi_core.gradients import client_gradient
from gi_core.victims import build_victim


def _case():
    idx = batch_indices("lfw-faces", batch_size=2, batch_index=0, image_size=32)
    x, y = load_images("lfw-faces", idx, image_size=32)
    model = build_victim("convnet", num_classes=int(y.max()) + 1, image_size=32, width=4, seed=0)
    return model, x, y


def _last_weight_index(model: torch.nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return next(i for i, p in enumerate(model.parameters()) if p is last.weight)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.9])
def test_soteria_prunes_the_documented_share_of_features(p):
    model, x, y = _case()
    plain = client_gradient(model, x, y)
    defended = apply_defense(
        Defense("soteria", p=p), model, x, y, generator=torch.Generator().manual_seed(0)
    )
    i = _last_weight_index(model)
    features = plain[i].shape[1]
    k = math.floor(round(features * p, 9))
    assert defended.info["pruned"] == k
    zeroed = (defended.grads[i] == 0).all(dim=0) & ~(plain[i] == 0).all(dim=0)
    assert int(zeroed.sum()) == k  # exactly k live feature columns were pruned
    kept = ~(defended.grads[i] == 0).all(dim=0)
    torch.testing.assert_close(defended.grads[i][:, kept], plain[i][:, kept], rtol=0, atol=0)
    for j, (a, b) in enumerate(zip(plain, defended.grads, strict=True)):
        if j != i:
            assert torch.equal(a, b)


def test_soteria_levels_are_validated():
    with pytest.raises(ConfigError, match="defense.p"):
        Defense("soteria", p=1.0)
    with pytest.raises(ConfigError, match="needs 'p'"):
        Defense("soteria")
    assert Defense("soteria", p=0.4).level == 0.4
