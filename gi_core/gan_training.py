"""Standard DCGAN training (Radford et al. 2016) of a generator prior on an image set.

GIML's "wrong prior" baseline (Jeon et al. 2021, Fig. 6: a generator trained on another data
set) and any prior a user needs. Non-saturating GAN loss with BCE on logits, Adam
(lr 2e-4, β1 0.5), DCGAN init, both networks in train mode (BN on batch statistics) while
training. The generator keeps BN running statistics from training (momentum 0.1), which is
what attacks use in eval mode. The whole state (both networks, both Adam states, the sampling
RNG, step, loss log) exports to plain tensors and resumes bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gi_core.errors import ConfigError
from gi_core.generators import Generator, dcgan_init_


@dataclass(frozen=True)
class GANConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    seed: int = 0  # seeds D's init, the batch sampling and the latents

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"prior.{name}: must be >= 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise ConfigError(f"prior.lr: must be > 0 (got {self.lr})")
        if not 0 <= self.beta1 < 1:
            raise ConfigError(f"prior.beta1: must be in [0, 1) (got {self.beta1})")


def discriminator(image_size: int) -> nn.Sequential:
    """DCGAN discriminator: 3@S -> 64@S/2 -> 128@S/4 -> ... -> 256@4 -> one logit.

    Strided 4x4 convs, LeakyReLU 0.2, BN on all but the first block (Radford et al. 2016)."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ConfigError(f"prior.image_size: must be a power of two >= 8 (got {image_size})")
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
    size, width = image_size // 2, 64
    while size > 4:
        out = min(width * 2, 512)
        layers += [
            nn.Conv2d(width, out, 4, 2, 1, bias=False),
            nn.BatchNorm2d(out),
            nn.LeakyReLU(0.2),
        ]
        size, width = size // 2, out
    layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False), nn.Flatten()]  # (N, 1) logits
    return nn.Sequential(*layers)


class GANTraining:
    """Mutable training loop state of G and D on `images` (N, 3, S, S) in [0, 1]."""

    def __init__(self, generator: Generator, images: Tensor, config: GANConfig) -> None:
        self.config, self.generator, self.images = config, generator, images
        rng = torch.Generator().manual_seed(config.seed)
        self.discriminator = discriminator(generator.output_size).to(images.device)
        dcgan_init_(self.discriminator, generator=rng)
        betas = (config.beta1, 0.999)
        self.opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr, betas=betas)
        self.rng, self.step = rng, 0
        self.log: list[dict[str, float]] = []

    def train_step(self) -> dict[str, float]:
        """One D step on a real and a fake batch, then one G step (non-saturating loss)."""
        g, d, cfg = self.generator.train(), self.discriminator.train(), self.config
        dev = self.images.device
        idx = torch.randint(len(self.images), (cfg.batch_size,), generator=self.rng)
        real = self.images[idx.to(dev)] * 2 - 1  # D sees [-1, 1]
        z = torch.randn((cfg.batch_size, g.latent_dim), generator=self.rng).to(dev)
        fake = g(z) * 2 - 1
        ones = torch.ones(cfg.batch_size, 1, device=dev)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d = F.binary_cross_entropy_with_logits(
            d(real), ones
        ) + F.binary_cross_entropy_with_logits(d(fake.detach()), 0 * ones)
        loss_d.backward()
        self.opt_d.step()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g = F.binary_cross_entropy_with_logits(d(fake), ones)
        loss_g.backward()
        self.opt_g.step()
        self.step += 1
        entry = {
            "step": float(self.step),
            "loss_d": float(loss_d.detach()),
            "loss_g": float(loss_g.detach()),
        }
        self.log.append(entry)
        g.eval()
        return entry

    def export(self) -> dict[str, Any]:
        """Plain tensors/ints/lists: loadable with torch.load(weights_only=True)."""
        return {
            "step": self.step,
            "generator": _cpu(self.generator.state_dict()),
            "discriminator": _cpu(self.discriminator.state_dict()),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng": self.rng.get_state(),
            "log": [dict(e) for e in self.log],
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.rng.set_state(state["rng"])
        self.step, self.log = int(state["step"]), [dict(e) for e in state["log"]]


def _cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}
