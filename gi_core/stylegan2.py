"""StyleGAN2 generator (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN",
CVPR 2020), written for this project as a `Generator` prior that every attack can search.

Architecture (config-e, "skip" generator, the one both official code bases ship):

* mapping  z (N, z_dim) -> normalise 2nd moment -> `mapping_layers` x (equalised linear, lrelu)
  -> w (N, w_dim). Learning-rate multiplier `lr_mlp` (0.01) scales the stored weights at run time.
* synthesis  ws (N, num_ws, w_dim) -> image (N, 3, R, R), one block per resolution 4, 8, ..., R:
  b4: learned constant, conv1, torgb; b{r}: conv0 (2x up), conv1, torgb, plus the upsampled
  skip of the previous RGB image. Every conv is a modulated conv with demodulation (paper
  eq. 1-3); torgb is modulated without demodulation. After each conv: + noise_strength * noise,
  + bias, leaky ReLU(0.2) * sqrt(2). Upsampling is a stride-2 transposed conv followed by the
  [1, 3, 3, 1] FIR blur (x4 gain), as in both official implementations.
  num_ws = 2 log2(R) - 2; block b{r} reads ws[i], ws[i+1] for its convs and ws[i+2] for torgb.

State-dict names follow stylegan2-ada-pytorch's G_ema (``mapping.fc{i}.*``,
``synthesis.b{r}.{const,conv0,conv1,torgb}.*``), so `pipelines.convert` maps an ada pickle 1:1
and a rosinality checkpoint by renaming.

How it fits the attacks (see gi_core.attacks.prior):

* **Frozen mapping.** The mapping weights are *buffers*, not parameters: GI-w and GI-z/w copy
  and search only the synthesis parameters (per-image copies (R, B, *shape)), and no attack ever
  moves the mapping.
* **Latent space** (`latent_space`): ``z`` searches z (N, z_dim) through the mapping; ``w``
  searches one w (N, w_dim) broadcast to every layer; ``w+`` searches one w per layer
  (N, num_ws, w_dim). `sample_latents` draws z ~ N(0, I) and maps it into the chosen space, so
  W/W+ searches start from the prior's distribution.
* **Noise** (`noise`): ``fixed`` uses per-layer noise maps drawn once from a seed (non-persistent
  buffers; the pipeline draws them from each cell's seed, `with_noise_seed`), so a cell is
  deterministic and resumes bit for bit; ``random`` re-draws them at every forward pass, as the
  official code does (rosinality's ``randomize_noise=True``). Random noise comes from torch's
  global RNG, which checkpoints do not store: a resumed ``random`` cell is not bit-identical.
* Output is (x + 1) / 2 clamped to [0, 1] (StyleGAN2 has no tanh), then average-pooled from the
  native resolution to the victim's by the integer factor, never upsampled.

Everything in `forward` is vmap-friendly (no in-place ops, no data-dependent control flow): the
modulated conv is written in the "non-fused" form (scale the input by the style, one plain conv
with the shared weight, then scale by the demodulation coefficients), which is exactly eq. 1-3
and works both for a batch sharing one generator and under vmap over per-image weight copies.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gi_core.errors import ConfigError
from gi_core.generator_base import Generator

LATENT_SPACES = ("z", "w", "w+")
NOISE_MODES = ("fixed", "random")
_FIR = (1.0, 3.0, 3.0, 1.0)  # the blur / resampling filter of both official implementations
_LRELU_GAIN = math.sqrt(2.0)


def _resolutions(resolution: int) -> list[int]:
    return [2**i for i in range(2, int(math.log2(resolution)) + 1)]


@dataclass(frozen=True)
class StyleGAN2Config:
    """Architecture of one StyleGAN2 generator.

    `channels[i]` is the feature count at resolution 4 * 2**i (len = log2(resolution) - 1).
    `conv_clamp` clamps conv outputs as stylegan2-ada does for its mixed-precision models
    (256 for ada-trained networks, None for the original StyleGAN2 / rosinality).
    """

    resolution: int
    channels: tuple[int, ...]
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    lr_mlp: float = 0.01
    conv_clamp: float | None = None

    def __post_init__(self) -> None:
        r = self.resolution
        if r < 4 or r & (r - 1):
            raise ConfigError(f"stylegan2.resolution: must be a power of 2 >= 4 (got {r})")
        if len(self.channels) != len(_resolutions(r)):
            raise ConfigError(
                f"stylegan2.channels: needs one entry per resolution 4..{r} "
                f"({len(_resolutions(r))}), got {len(self.channels)}"
            )
        for name in ("z_dim", "w_dim", "mapping_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"stylegan2.{name}: must be >= 1 (got {getattr(self, name)})")
        if any(c < 1 for c in self.channels) or self.lr_mlp <= 0:
            raise ConfigError("stylegan2: channels must be >= 1 and lr_mlp > 0")

    @property
    def num_ws(self) -> int:
        return 2 * int(math.log2(self.resolution)) - 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StyleGAN2Config:
        known = {"resolution", "channels", "z_dim", "w_dim", "mapping_layers", "lr_mlp"}
        unknown = sorted(set(d) - known - {"conv_clamp"})
        if unknown:
            raise ConfigError(f"stylegan2 config: unknown field {unknown[0]!r}")
        return cls(**{**d, "channels": tuple(int(c) for c in d["channels"])})


# --------------------------------------------------------------------------------------------
# Building blocks.


class _FrozenLinear(nn.Module):
    """Equalised-lr linear layer whose weights are buffers (the frozen mapping network)."""

    weight: Tensor
    bias: Tensor

    def __init__(self, c_in: int, c_out: int, *, lr_mul: float) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(c_out, c_in))
        self.register_buffer("bias", torch.zeros(c_out))
        self.weight_gain = lr_mul / math.sqrt(c_in)
        self.bias_gain = lr_mul

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(y, 0.2) * _LRELU_GAIN


class MappingNetwork(nn.Module):
    """z (N, z_dim) -> w (N, w_dim): normalise the 2nd moment, then the lrelu MLP."""

    def __init__(self, config: StyleGAN2Config) -> None:
        super().__init__()
        dims = [config.z_dim] + [config.w_dim] * config.mapping_layers
        for i in range(config.mapping_layers):
            self.add_module(f"fc{i}", _FrozenLinear(dims[i], dims[i + 1], lr_mul=config.lr_mlp))
        self.num_layers = config.mapping_layers

    def forward(self, z: Tensor) -> Tensor:
        x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        return x


class _Affine(nn.Module):
    """w (N, w_dim) -> styles (N, c_in); bias initialised to 1 so styles start near 1."""

    def __init__(self, w_dim: int, c_in: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c_in, w_dim))
        self.bias = nn.Parameter(torch.ones(c_in))
        self.weight_gain = 1.0 / math.sqrt(w_dim)

    def forward(self, w: Tensor) -> Tensor:
        return F.linear(w, self.weight * self.weight_gain, self.bias)


def _blur_kernel(gain: float) -> Tensor:
    k = torch.tensor(_FIR)
    k2 = k[:, None] * k[None, :]
    return k2 / k2.sum() * gain  # (4, 4)


def _fir(x: Tensor, kernel: Tensor, *, pad: tuple[int, int]) -> Tensor:
    """Depthwise FIR filter of (N, C, H, W) after padding (pad0, pad1) on both spatial axes."""
    n, c, h, w = x.shape
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    # The kernel is symmetric, so correlation (conv2d) equals upfirdn2d's convolution.
    out = F.conv2d(x.reshape(n * c, 1, *x.shape[2:]), kernel[None, None])
    return out.reshape(n, c, *out.shape[2:])


def _zero_insert(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W) with x at even positions and zeros elsewhere."""
    n, c, h, w = x.shape
    x = F.pad(x[:, :, :, None, :, None], (0, 1, 0, 0, 0, 1))
    return x.reshape(n, c, 2 * h, 2 * w)


def upsample_skip(img: Tensor, kernel: Tensor) -> Tensor:
    """2x FIR upsampling of the RGB skip: upfirdn2d(up=2, pad=(2, 1), gain 4)."""
    return _fir(_zero_insert(img), kernel, pad=(2, 1))


def modulated_conv(
    x: Tensor,
    weight: Tensor,
    styles: Tensor,
    *,
    demodulate: bool,
    up: bool,
    blur: Tensor,
) -> Tensor:
    """Modulated conv (paper eq. 1-3) in its non-fused form.

    x (N, c_in, H, W), weight (c_out, c_in, k, k), styles (N, c_in) already multiplied by the
    equalised-lr gain 1/sqrt(c_in k^2). out = demod * conv(x * s, weight) with demod_{n,o} =
    rsqrt(sum_{i,k} (weight_{o,i,k} s_{n,i})^2 + 1e-8): identical to scaling the weight per
    sample, without N weight copies. With `up` the output is (N, c_out, 2H, 2W).
    """
    x = x * styles[:, :, None, None]
    if up:
        # ConvT stride 2, no padding: (H, W) -> (2H+1, 2W+1); the blur brings it to 2H.
        x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
        x = _fir(x, blur, pad=(1, 1))
    else:
        x = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
    if demodulate:
        # sum_{i,k} weight^2 s^2 = s^2 @ (sum_k weight^2)^T : (N, c_out)
        energy = styles.square() @ weight.square().sum(dim=(2, 3)).t()
        x = x * (energy + 1e-8).rsqrt()[:, :, None, None]
    return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (+ optional 2x up), noise, bias, lrelu * sqrt(2)."""

    noise_const: Tensor  # (res, res) fixed noise map, non-persistent (drawn from a seed)
    blur: Tensor  # (4, 4) FIR kernel

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        w_dim: int,
        resolution: int,
        up: bool,
        conv_clamp: float | None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c_out, c_in, 3, 3))
        self.affine = _Affine(w_dim, c_in)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.register_buffer("noise_const", torch.zeros(resolution, resolution), persistent=False)
        self.register_buffer("blur", _blur_kernel(4.0), persistent=False)
        self.gain = 1.0 / math.sqrt(c_in * 9)
        self.up, self.resolution, self.conv_clamp = up, resolution, conv_clamp
        self.random_noise = False  # set by the generator's `noise` mode

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        styles = self.affine(w) * self.gain  # (N, c_in)
        x = modulated_conv(x, self.weight, styles, demodulate=True, up=self.up, blur=self.blur)
        if self.random_noise:
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device)
        else:
            noise = self.noise_const[None, None]
        x = x + noise.to(x.dtype) * self.noise_strength
        x = F.leaky_relu(x + self.bias[None, :, None, None], 0.2) * _LRELU_GAIN
        if self.conv_clamp is not None:
            x = x.clamp(-self.conv_clamp, self.conv_clamp)
        return x


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation, + bias: features -> RGB (N, 3, H, W)."""

    blur: Tensor

    def __init__(self, c_in: int, *, w_dim: int, conv_clamp: float | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, c_in, 1, 1))
        self.affine = _Affine(w_dim, c_in)
        self.bias = nn.Parameter(torch.zeros(3))
        self.register_buffer("blur", _blur_kernel(4.0), persistent=False)
        self.gain = 1.0 / math.sqrt(c_in)
        self.conv_clamp = conv_clamp

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        styles = self.affine(w) * self.gain
        x = modulated_conv(x, self.weight, styles, demodulate=False, up=False, blur=self.blur)
        x = x + self.bias[None, :, None, None]
        if self.conv_clamp is not None:
            x = x.clamp(-self.conv_clamp, self.conv_clamp)
        return x


class SynthesisBlock(nn.Module):
    """Resolution r: (const | conv0 up) -> conv1 -> torgb, RGB added to the upsampled skip."""

    skip_kernel: Tensor

    def __init__(self, c_in: int, c_out: int, *, resolution: int, config: StyleGAN2Config) -> None:
        super().__init__()
        kw = {"w_dim": config.w_dim, "resolution": resolution, "conv_clamp": config.conv_clamp}
        self.first = resolution == 4
        if self.first:
            self.const = nn.Parameter(torch.zeros(c_out, 4, 4))
        else:
            self.conv0 = SynthesisLayer(c_in, c_out, up=True, **kw)  # type: ignore[arg-type]
        self.conv1 = SynthesisLayer(c_out, c_out, up=False, **kw)  # type: ignore[arg-type]
        self.torgb = ToRGB(c_out, w_dim=config.w_dim, conv_clamp=config.conv_clamp)
        self.register_buffer("skip_kernel", _blur_kernel(4.0), persistent=False)
        self.num_conv = 1 if self.first else 2

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor) -> tuple[Tensor, Tensor]:
        # ws: (N, num_conv + 1, w_dim), this block's slice of the per-layer styles
        if self.first:
            x = self.const[None].expand(ws.shape[0], -1, -1, -1)
            x = self.conv1(x, ws[:, 0])
        else:
            assert x is not None
            x = self.conv0(x, ws[:, 0])
            x = self.conv1(x, ws[:, 1])
        y = self.torgb(x, ws[:, self.num_conv])
        img = y if img is None else upsample_skip(img, self.skip_kernel) + y
        return x, img


class Synthesis(nn.Module):
    """ws (N, num_ws, w_dim) -> image (N, 3, R, R), roughly in [-1, 1]."""

    def __init__(self, config: StyleGAN2Config) -> None:
        super().__init__()
        self.resolutions = _resolutions(config.resolution)
        channels = config.channels
        for i, r in enumerate(self.resolutions):
            c_in = channels[max(i - 1, 0)]
            block = SynthesisBlock(c_in, channels[i], resolution=r, config=config)
            self.add_module(f"b{r}", block)

    def forward(self, ws: Tensor) -> Tensor:
        x, img, index = None, None, 0
        for r in self.resolutions:
            block: SynthesisBlock = getattr(self, f"b{r}")
            x, img = block(x, img, ws[:, index : index + block.num_conv + 1])
            index += block.num_conv
        assert img is not None
        return img

    def layers(self) -> list[SynthesisLayer]:
        return [m for m in self.modules() if isinstance(m, SynthesisLayer)]


# --------------------------------------------------------------------------------------------
# The prior.


@dataclass(frozen=True)
class StyleGAN2Options:
    """How an attack uses the prior: search space and noise handling (see module docstring)."""

    latent_space: str = "w"
    noise: str = "fixed"
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if self.latent_space not in LATENT_SPACES:
            raise ConfigError(
                f"generator.latent_space: must be one of {LATENT_SPACES} "
                f"(got {self.latent_space!r})"
            )
        if self.noise not in NOISE_MODES:
            raise ConfigError(f"generator.noise: must be one of {NOISE_MODES} (got {self.noise!r})")


class StyleGAN2Generator(Generator):
    """A StyleGAN2 prior with the `Generator` contract: latents (N, *latent_shape) -> images
    (N, 3, output_size, output_size) in [0, 1]. ``main`` is empty (DCGAN's slot)."""

    def __init__(
        self, config: StyleGAN2Config, *, output_size: int, options: StyleGAN2Options
    ) -> None:
        super().__init__(
            nn.Sequential(), "stylegan2", native_size=config.resolution, output_size=output_size
        )
        self.config, self.options = config, options
        self.mapping = MappingNetwork(config)
        self.synthesis = Synthesis(config)
        self.num_ws = config.num_ws
        self.latent_dim = config.z_dim if options.latent_space == "z" else config.w_dim
        for layer in self.synthesis.layers():
            layer.random_noise = options.noise == "random"
        self.draw_noise_(options.noise_seed)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one image's search variable: (z_dim,), (w_dim,) or (num_ws, w_dim)."""
        if self.options.latent_space == "w+":
            return (self.num_ws, self.config.w_dim)
        return (self.latent_dim,)

    def draw_noise_(self, seed: int) -> None:
        """Redraw the fixed noise maps (non-persistent buffers) from `seed`, on the CPU."""
        rng = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.synthesis.layers():
                noise = torch.randn(layer.noise_const.shape, generator=rng)
                layer.noise_const.copy_(noise.to(layer.noise_const.device))

    def with_noise_seed(self, seed: int) -> StyleGAN2Generator:
        """A copy (same weights, same device) whose fixed noise maps are drawn from `seed`."""
        twin = copy.deepcopy(self)
        twin.draw_noise_(seed)
        return twin.eval()

    def sample_latents(self, r: int, b: int, *, generator: torch.Generator) -> Tensor:
        """(R, B, *latent_shape): z ~ N(0, I) drawn on the CPU, mapped into W / W+ if searched
        there (no gradient: the mapping is frozen and only the start point is sampled)."""
        ref = next(self.synthesis.parameters())
        z = torch.randn((r * b, self.config.z_dim), generator=generator, device="cpu")
        z = z.to(device=ref.device, dtype=ref.dtype)
        if self.options.latent_space != "z":
            with torch.no_grad():
                z = self.mapping(z)
            if self.options.latent_space == "w+":
                z = z[:, None].expand(-1, self.num_ws, -1).clone()
        return z.reshape(r, b, *self.latent_shape)

    def ws(self, latent: Tensor) -> Tensor:
        """Search variable (N, *latent_shape) -> per-layer styles (N, num_ws, w_dim)."""
        if self.options.latent_space == "z":
            latent = self.mapping(latent)
        if self.options.latent_space != "w+":
            latent = latent[:, None].expand(-1, self.num_ws, -1)
        return latent

    def forward(self, z: Tensor) -> Tensor:
        img = self.synthesis(self.ws(z))  # (N, 3, R, R), roughly [-1, 1]
        img = ((img + 1.0) / 2.0).clamp(0.0, 1.0)
        if self.pool_factor > 1:
            img = F.avg_pool2d(img, self.pool_factor)
        return img

    def initialise_(self, *, generator: torch.Generator) -> None:
        """StyleGAN2's own init, in place: weights ~ N(0, 1) (equalised lr; the mapping's
        divided by lr_mlp), affine biases 1, other biases and noise strengths 0."""
        with torch.no_grad():
            for name, t in [*self.named_parameters(), *self.mapping.named_buffers()]:
                _init_tensor(name, t, generator=generator, lr_mlp=self.config.lr_mlp)
        self.eval()


def _init_tensor(name: str, t: Tensor, *, generator: torch.Generator, lr_mlp: float) -> None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        t.fill_(1.0 if name.endswith("affine.bias") else 0.0)
    elif leaf == "noise_strength":
        t.zero_()
    else:  # weights and the learned constant
        value = torch.randn(t.shape, generator=generator)
        if name.startswith("fc"):  # mapping layer (named relative to self.mapping)
            value = value / lr_mlp
        t.copy_(value.to(t.device))


def build_stylegan2(
    config: StyleGAN2Config,
    *,
    output_size: int,
    options: StyleGAN2Options | None = None,
    seed: int | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
) -> StyleGAN2Generator:
    """A StyleGAN2 prior on the CPU in eval mode: `state_dict` (this project's layout, e.g.
    from `gi-eval convert-generator`) or StyleGAN2 init from `seed` (None means 0)."""
    gen = StyleGAN2Generator(config, output_size=output_size, options=options or StyleGAN2Options())
    if state_dict is not None:
        try:
            gen.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"the StyleGAN2 weights do not match {config}: {e}") from e
    else:
        gen.initialise_(generator=torch.Generator().manual_seed(0 if seed is None else seed))
    return gen.eval()


def _modconv_params(c_in: int, c_out: int, *, kernel: int, w_dim: int) -> int:
    # weight + affine (weight, bias) + bias; 3x3 layers also have a noise strength
    return c_out * c_in * kernel * kernel + c_in * w_dim + c_in + c_out + (kernel == 3)


def parameter_counts(config: StyleGAN2Config) -> tuple[int, int]:
    """(mapping, synthesis) parameter counts, computed from the config without building it."""
    dims = [config.z_dim] + [config.w_dim] * config.mapping_layers
    mapping = sum(a * b + b for a, b in zip(dims[:-1], dims[1:], strict=True))
    synthesis, ch, w_dim = 0, config.channels, config.w_dim
    for i in range(len(ch)):
        c_in, c_out = ch[max(i - 1, 0)], ch[i]
        synthesis += c_out * 16 if i == 0 else _modconv_params(c_in, c_out, kernel=3, w_dim=w_dim)
        synthesis += _modconv_params(c_out, c_out, kernel=3, w_dim=w_dim)
        synthesis += _modconv_params(c_out, 3, kernel=1, w_dim=w_dim)
    return mapping, synthesis


# --------------------------------------------------------------------------------------------
# Converted weights (written by `gi-eval convert-generator`, pipelines/convert.py).

CHECKPOINT_FORMAT = "gi-eval/stylegan2"
CHECKPOINT_VERSION = 1


# The two architecture numbers that tensor shapes cannot tell travel inside the state_dict
# as 0-dim tensors, so that a state_dict alone rebuilds the exact generator (`config_from_state`).
ARCH_KEYS = ("arch.lr_mlp", "arch.conv_clamp")


def state_with_arch(config: StyleGAN2Config, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    clamp = -1.0 if config.conv_clamp is None else config.conv_clamp
    return {
        **state,
        "arch.lr_mlp": torch.tensor(config.lr_mlp, dtype=torch.float64),
        "arch.conv_clamp": torch.tensor(clamp, dtype=torch.float64),
    }


def config_from_state(state: Mapping[str, Tensor]) -> StyleGAN2Config:
    """The architecture a state_dict describes: resolution, channels, z/w dims and mapping
    depth from the tensor shapes; lr_mlp and conv_clamp from ARCH_KEYS (default 0.01 / none)."""
    need = ("mapping.fc0.weight", "synthesis.b4.const")
    missing = [k for k in need if k not in state]
    if missing:
        raise ConfigError(f"tensor {missing[0]!r} is missing; is this a StyleGAN2 generator?")
    res = sorted({int(m.group(1)) for k in state if (m := re.match(r"synthesis\.b(\d+)\.", k))})
    fcs = {int(m.group(1)) for k in state if (m := re.match(r"mapping\.fc(\d+)\.", k))}
    channels = [int(state["synthesis.b4.const"].shape[0])]
    for r in res[1:]:
        key = f"synthesis.b{r}.conv1.weight"
        if key not in state:
            raise ConfigError(f"tensor {key!r} is missing")
        channels.append(int(state[key].shape[0]))
    clamp = float(state["arch.conv_clamp"]) if "arch.conv_clamp" in state else -1.0
    fc0 = state["mapping.fc0.weight"]
    return StyleGAN2Config(
        resolution=res[-1],
        channels=tuple(channels),
        z_dim=int(fc0.shape[1]),
        w_dim=int(fc0.shape[0]),
        mapping_layers=len(fcs),
        lr_mlp=float(state["arch.lr_mlp"]) if "arch.lr_mlp" in state else 0.01,
        conv_clamp=None if clamp < 0 else clamp,
    )


def build_from_state(
    state: Mapping[str, Tensor], *, output_size: int, options: StyleGAN2Options | None = None
) -> StyleGAN2Generator:
    """A StyleGAN2 prior from a state_dict alone (as `load_generator_checkpoint` returns it)."""
    weights = {k: v for k, v in state.items() if k not in ARCH_KEYS}
    config = config_from_state(state)
    return build_stylegan2(config, output_size=output_size, options=options, state_dict=weights)


def load_stylegan2_checkpoint(path: str | Path) -> tuple[StyleGAN2Config, dict[str, Tensor]]:
    """Read a converted StyleGAN2 file: (architecture, state_dict without ARCH_KEYS).

    Only tensors and plain containers are unpickled (weights_only=True). The state_dict is
    checked against the architecture when `build_stylegan2` loads it (strict).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"generator.checkpoint: {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ConfigError(f"generator.checkpoint: {path} is not loadable: {e}") from e
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"generator.checkpoint: {path} is not a converted StyleGAN2 file; convert official "
            "weights with `gi-eval convert-generator SRC OUT` (docs/paper-scale.md)"
        )
    if data.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"generator.checkpoint: {path} has format version {data.get('version')}, this "
            f"gi-eval reads version {CHECKPOINT_VERSION}; convert the weights again"
        )
    state = dict(data["state_dict"])
    return config_from_state(state), {k: v for k, v in state.items() if k not in ARCH_KEYS}
