"""Victim models: the client networks whose gradients are attacked.

All victims take (B, C, H, W) images in [0, 1] and return (B, num_classes) logits. They are
built on the CPU from a seed (or a given state_dict); the caller moves them to a device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torchvision
from torch import nn

from gi_core.errors import ConfigError

VICTIMS = ("resnet18", "convnet", "lenet")


def build_victim(
    name: str,
    *,
    num_classes: int,
    image_size: int,
    channels: int = 3,
    width: int = 16,
    seed: int | None = 0,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Build a victim; random init from `seed`, or the weights of `state_dict` when given."""
    builders = {"resnet18": _resnet18, "convnet": _convnet, "lenet": _lenet}
    if name not in builders:
        raise ConfigError(f"victim.arch: unknown victim {name!r}; known: {', '.join(VICTIMS)}")
    if seed is not None:
        # Build under a forked RNG so that victim init never perturbs the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = builders[name](num_classes, image_size, channels, width)
    else:
        model = builders[name](num_classes, image_size, channels, width)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def _resnet18(num_classes: int, image_size: int, channels: int, width: int) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    if image_size <= 32:
        # CIFAR stem (as in Geiping et al. and the GIAS code): 3x3 conv, stride 1, no max-pool,
        # otherwise a 32 px image shrinks to 1x1 before the last stage.
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _convnet(num_classes: int, image_size: int, channels: int, width: int) -> nn.Module:
    """Small conv net with BatchNorm (so "+BN" attacks have statistics to use)."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    w = width
    return nn.Sequential(
        *block(channels, w),
        *block(w, 2 * w),
        nn.AvgPool2d(2),
        *block(2 * w, 4 * w),
        nn.AvgPool2d(2),
        *block(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * w, num_classes),
    )


def _lenet(num_classes: int, image_size: int, channels: int, width: int) -> nn.Module:
    """LeNet of DLG (Zhu et al. 2019): sigmoid activations, strided 5x5 convs, no BN."""
    hidden = 12
    flat = hidden * ((image_size + 3) // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 5, padding=2, stride=2),
        nn.Sigmoid(),
        nn.Conv2d(hidden, hidden, 5, padding=2, stride=2),
        nn.Sigmoid(),
        nn.Conv2d(hidden, hidden, 5, padding=2, stride=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(flat, num_classes),
    )
