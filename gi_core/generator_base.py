"""The prior module every generator is (`Generator`), and the DCGAN initialisation it uses.

Apart from gi_core.generators (which builds priors by kind) so that gi_core.stylegan2 can
subclass `Generator` while gi_core.generators dispatches to gi_core.stylegan2: no import circle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gi_core.errors import ConfigError

LATENT_DIM = 100


class Generator(nn.Module):
    """A prior G: z (N, latent_dim) -> images (N, 3, output_size, output_size) in [0, 1].

    ``main`` ends in tanh at ``native_size``; ``forward`` maps it to [0, 1] and average-pools by
    the integer factor native_size // output_size (pooling keeps a 64px prior usable for a 32px
    victim without changing its weights).
    """

    def __init__(
        self, main: nn.Sequential, kind: str, *, native_size: int, output_size: int
    ) -> None:
        super().__init__()
        _check_output_size(native_size, output_size=output_size)
        self.main = main
        self.kind = kind
        self.latent_dim = LATENT_DIM
        self.native_size = native_size
        self.output_size = output_size
        self.pool_factor = native_size // output_size

    def sample_latents(self, r: int, b: int, *, generator: torch.Generator) -> Tensor:
        """Standard-normal latents (R, B, latent_dim) for R restarts of a batch of B images.

        Drawn on the CPU from ``generator`` and then moved, so the same seed gives the same
        latents on every device (CUDA RNG streams differ from CPU ones).
        """
        z = torch.randn((r, b, self.latent_dim), generator=generator, device="cpu")
        reference = next(self.parameters())
        return z.to(device=reference.device, dtype=reference.dtype)

    def initialise_(self, *, generator: torch.Generator) -> None:
        """Fresh random weights in place (GI-w's untrained start): DCGAN init, then a BN
        calibration on latents from the same RNG. Other architectures override this."""
        with torch.no_grad():
            dcgan_init_(self, generator=generator)
        calibrate_batchnorm_(self, generator=generator)

    def forward(self, z: Tensor) -> Tensor:
        # z: (N, latent_dim) -> (N, latent_dim, 1, 1): the first ConvT acts as a dense layer.
        return self._to_image(self.main(z.reshape(*z.shape, 1, 1)))

    def _to_image(self, x: Tensor) -> Tensor:
        """The trunk's output (N, 3, native, native) in [-1, 1] -> [0, 1] at output_size."""
        x = (x + 1.0) / 2.0
        if self.pool_factor > 1:  # static (set at construction), so vmap-safe
            x = F.avg_pool2d(x, self.pool_factor)
        return x

    # -- the intermediate feature domain (GIFD, Fang et al. 2023) -------------------------------

    def _boundaries(self) -> list[int]:
        """Indices into `main` just after each ConvT/BN/ReLU block."""
        return [i + 1 for i, m in enumerate(self.main) if isinstance(m, nn.ReLU)]

    @property
    def feature_layers(self) -> int:
        """How many intermediate feature maps the trunk exposes: the output of each of its
        ConvT/BN/ReLU blocks (4 for the DCGAN kinds: 512@4, 256@8, 128@16, 64@32); 0 for a
        prior without such a trunk (StyleGAN2)."""
        return len(self._boundaries())

    def features(self, z: Tensor, layer: int) -> Tensor:
        """z (N, latent_dim) -> the output of the first `layer` blocks (N, C, H, W)."""
        return self.main[: self._boundaries()[layer - 1]](z.reshape(*z.shape, 1, 1))

    def next_features(self, f: Tensor, layer: int) -> Tensor:
        """The output of block `layer` + 1 from the output `f` of the first `layer` blocks."""
        cut = self._boundaries()
        return self.main[cut[layer - 1] : cut[layer]](f)

    def from_features(self, f: Tensor, layer: int) -> Tensor:
        """Images (N, 3, output_size, output_size) in [0, 1] from the output `f` of the first
        `layer` blocks: the rest of the trunk, as `forward` runs it."""
        return self._to_image(self.main[self._boundaries()[layer - 1] :](f))


def _check_output_size(native_size: int, *, output_size: int) -> None:
    if output_size < 1 or output_size > native_size or native_size % output_size != 0:
        raise ConfigError(
            f"output_size={output_size}: a {native_size}px generator can only produce sizes "
            f"that divide {native_size} (it is average-pooled, never upsampled)"
        )


def dcgan_init_(module: nn.Module, *, generator: torch.Generator) -> None:
    """DCGAN init in place: conv weights ~ N(0, 0.02), BN weight ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02, generator=generator)
        bias = getattr(m, "bias", None)
        if isinstance(bias, Tensor):
            nn.init.zeros_(bias)


def calibrate_batchnorm_(
    gen: Generator, *, generator: torch.Generator, num_latents: int = 64
) -> None:
    """Set BN running stats to the batch stats of ``num_latents`` seeded latents, in place.

    A freshly initialised BN has running mean 0 / var 1, while DCGAN-init activations are ~1e-2:
    in eval mode the untrained prior would emit an almost constant 0.5 image (pixel std ~1e-3)
    and GI-w would start from a flat image. One train-mode pass with a cumulative average
    (momentum None) makes eval mode reproduce what train mode produces on typical latents.
    """
    bns = [m for m in gen.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    z = torch.randn((num_latents, gen.latent_dim), generator=generator)
    with torch.no_grad():
        gen.train()(z)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    gen.eval()
