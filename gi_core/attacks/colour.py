"""The data's colour model, shared by every attack (issue 16 Deliver 5).

A gray data set (LFW faces, gray image folders) is part of the threat model: the attacker knows
the client's images are gray, as it knows their size. Every method then reconstructs gray
images: pixel methods optimise ONE channel, broadcast to the victim's three; generator methods
project their output to luminance (ITU-R BT.601 luma weights, the ones PIL's `convert("L")`
uses) before the victim sees it. `rgb` leaves every attack as it was.
"""

from __future__ import annotations

import torch
from torch import Tensor

COLOURS = ("rgb", "gray")
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B


def broadcast_gray(x: Tensor) -> Tensor:
    """(..., 1, H, W) -> (..., 3, H, W): one gray channel seen by an RGB victim."""
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:])


def luma(images: Tensor) -> Tensor:
    """(..., 3, H, W) -> (..., 1, H, W): the BT.601 luminance of RGB images in [0, 1]."""
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device)
    return torch.einsum("...chw,c->...hw", images, weights).unsqueeze(-3)


def project(images: Tensor, colour: str) -> Tensor:
    """A generator's (..., 3, H, W) output as the victim sees it under `colour`: unchanged for
    rgb, its luminance in all three channels for gray (a linear map, so gradients flow)."""
    return broadcast_gray(luma(images)) if colour == "gray" else images


def pixels(images: Tensor, colour: str) -> Tensor:
    """Images (..., 3, H, W) as the variable a pixel method optimises: one luminance channel
    under gray (e.g. a start from G(z) or a user's `init`), unchanged for rgb."""
    if colour != "gray" or images.shape[-3] == 1:
        return images
    return luma(images)


def render_pixels(x: Tensor, colour: str) -> Tensor:
    """A pixel variable as RGB images for the victim: a gray x has one channel, broadcast."""
    return broadcast_gray(x) if colour == "gray" and x.shape[-3] == 1 else x
