"""Victim models: the client networks whose gradients are attacked.

All victims take (B, C, H, W) images in [0, 1] and return (B, num_classes) logits. They are
built on the CPU from a seed (or a given state_dict); the caller moves them to a device.

Names (`build_victim`):
  resnet18, convnet, lenet   the project's small victims (resnet18 gets a CIFAR stem <= 32 px)
  rgapnet                    the small CNN of R-GAP's form (Zhu & Blaschko 2021): strided and
                             plain 3x3 convs with LeakyReLU, no pooling, no BN, a linear head
                             with a bias; the victim `rgap` / `rgap+g` invert (gi_core.attacks.rgap)
  resnet20, resnet32, resnet56  CIFAR ResNets of He et al. 2016, Sec. 4.2 (3 stages of n basic
                             blocks with 16/32/64 channels, n = 3/5/9, identity shortcuts with
                             zero-padded channels: "option A")
  torchvision:<name>         any torchvision classification model, e.g. torchvision:resnet18
                             (torchvision's own architecture, never downloaded weights)
  <module>:<callable>        a user model: `callable(num_classes=..., image_size=...,
                             channels=...)` from an importable module (the working directory is
                             on the import path), e.g. mynets:build_victim
Optional input normalisation (`normalize=(mean, std)`, one value per channel) is applied *inside*
the victim (`Normalized`), so the attacked images stay in [0, 1]; a state_dict is loaded into
the wrapped model (its own key names).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence

import torch
import torchvision
from torch import Tensor, nn

from gi_core.errors import ConfigError

VICTIMS = ("resnet18", "convnet", "lenet", "resnet20", "resnet32", "resnet56", "rgapnet")
_CIFAR_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet56": 9}  # blocks per stage
Normalisation = tuple[Sequence[float], Sequence[float]]


def torchvision_models() -> list[str]:
    """Classification models torchvision can build (no detection/segmentation/video)."""
    return list(torchvision.models.list_models(module=torchvision.models))


def check_victim_name(name: str) -> None:
    """ConfigError unless `name` is a built-in, a torchvision model or `module:callable`."""
    kind, sep, arg = name.partition(":")
    if name in VICTIMS:
        return
    if kind == "torchvision" and sep:
        if arg not in torchvision_models():
            raise ConfigError(
                f"victim.arch: torchvision has no classification model {arg!r}; e.g. "
                "torchvision:resnet18, torchvision:vgg11_bn (see torchvision.models.list_models)"
            )
        return
    if (
        sep
        and kind
        and arg
        and all(p.isidentifier() for p in kind.split("."))
        and arg.isidentifier()
    ):
        return
    raise ConfigError(
        f"victim.arch: unknown victim {name!r}; known: {', '.join(VICTIMS)}, "
        "torchvision:<model>, or <module>:<callable> for your own model"
    )


class Normalized(nn.Module):
    """x in [0, 1] -> model((x - mean) / std): a victim trained on normalised inputs."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32)[None, :, None, None]
        )
        self.register_buffer(
            "std", torch.tensor(list(std), dtype=torch.float32)[None, :, None, None]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


def build_victim(
    name: str,
    *,
    num_classes: int,
    image_size: int,
    channels: int = 3,
    width: int = 16,
    seed: int | None = 0,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    normalize: Normalisation | None = None,
) -> nn.Module:
    """Build a victim; random init from `seed`, or the weights of `state_dict` when given.

    `state_dict` belongs to the unwrapped model (a torchvision / user checkpoint as saved);
    `normalize` = (mean, std) per channel wraps the model in `Normalized`.
    """
    check_victim_name(name)
    builder = _builder(name)
    if seed is not None:
        # Build under a forked RNG so that victim init never perturbs the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = builder(num_classes, image_size, channels, width)
    else:
        model = builder(num_classes, image_size, channels, width)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"victim.checkpoint: does not match {name}: {e}") from e
    if normalize is not None:
        mean, std = normalize
        _check_normalisation(mean, std, channels=channels)
        model = Normalized(model, mean, std)
    return model


def victim_state(model: nn.Module) -> dict[str, Tensor]:
    """The state_dict `build_victim(state_dict=...)` takes: the unwrapped model's (without the
    `Normalized` buffers, which the spec rebuilds)."""
    inner = model.model if isinstance(model, Normalized) else model
    return dict(inner.state_dict())


def weights_sha256(state: Mapping[str, Tensor]) -> str:
    """sha256 of a state_dict's content: each entry's name, dtype, shape and raw bytes, in
    order. Equal weights hash alike whatever file format or device held them."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_normalisation(mean: Sequence[float], std: Sequence[float], *, channels: int) -> None:
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(
            f"victim.normalize: needs {channels} mean and std values (got {len(mean)}, {len(std)})"
        )
    if any(s <= 0 for s in std):
        raise ConfigError(f"victim.normalize.std: every value must be > 0 (got {list(std)})")


Builder = Callable[[int, int, int, int], nn.Module]


def _builder(name: str) -> Builder:
    builders: dict[str, Builder] = {
        "resnet18": _resnet18,
        "convnet": _convnet,
        "lenet": _lenet,
        "rgapnet": _rgapnet,
    }
    if name in builders:
        return builders[name]
    if name in _CIFAR_DEPTHS:
        return lambda k, size, c, w: CifarResNet(_CIFAR_DEPTHS[name], num_classes=k, channels=c)
    kind, _, arg = name.partition(":")
    if kind == "torchvision":
        return lambda k, size, c, w: _torchvision(arg, k, c)
    return _user_builder(kind, arg)


def _torchvision(model: str, num_classes: int, channels: int) -> nn.Module:
    if channels != 3:
        raise ConfigError(f"victim.arch: torchvision:{model} takes 3-channel images")
    return torchvision.models.get_model(model, weights=None, num_classes=num_classes)


def _user_builder(module: str, attr: str) -> Builder:
    if os.getcwd() not in sys.path:  # "importable from where gi-eval runs"
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"victim.arch: cannot import {module}:{attr} ({e}); put {module}.py in the directory "
            "you run gi-eval from or on PYTHONPATH"
        ) from e

    def build(num_classes: int, image_size: int, channels: int, width: int) -> nn.Module:
        model = fn(num_classes=num_classes, image_size=image_size, channels=channels)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"victim.arch: {module}:{attr} returned {type(model).__name__}, not an nn.Module"
            )
        return model

    return build


class _CifarBlock(nn.Module):
    """Basic block (two 3x3 conv-BN) with an option-A shortcut: stride-2 subsampling and
    zero-padded channels, no extra parameters (He et al. 2016, Sec. 4.2)."""

    def __init__(self, c_in: int, c_out: int, *, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.extra = stride, c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            half = self.extra // 2
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, half, self.extra - half))
        return torch.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32 px images: 3x3 conv 16 -> 3 stages x n blocks (16, 32, 64
    channels, strides 1, 2, 2) -> global average pool -> linear. Any input size works."""

    def __init__(self, n: int, *, num_classes: int, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        c_in = 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(n):
                layers.append(_CifarBlock(c_in, c_out, stride=2 if stage and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


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


def _rgapnet(num_classes: int, image_size: int, channels: int, width: int) -> nn.Module:
    """A CNN of the form R-GAP inverts in closed form (Zhu & Blaschko 2021, Sec. 3; their CNN6
    is the same kind: LeakyReLU, no pooling, no bias in the convolutions): a stride-2 conv
    C -> w, two stride-1 convs w -> w (3x3, padding 1, LeakyReLU 0.2), a linear head with a bias
    (its gradient gives ∂ℓ/∂logits). The first layer has w·(H/2)² forward equations for C·H²
    unknowns: at w >= 4·C (w >= 4 for gray images) they determine the image; a narrower first
    layer leaves it to its C·w·9 gradient equations, under-determined, which is where R-GAP+G's
    prior takes over (docs/results/rgap_cpu.md)."""
    side = (image_size + 1) // 2

    def conv(c_in: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.LeakyReLU(0.2)]

    return nn.Sequential(
        *conv(channels, 2),
        *conv(width, 1),
        *conv(width, 1),
        nn.Flatten(),
        nn.Linear(width * side * side, num_classes),
    )
