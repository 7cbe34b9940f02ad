"""`gi-eval convert-generator`: official StyleGAN2 weights -> this project's StyleGAN2 file.

Sources:
* rosinality/stylegan2-pytorch ``.pt`` (training checkpoints or `convert_weight.py` output):
  read with ``torch.load(weights_only=True)`` (plus argparse.Namespace, which its training
  checkpoints store); the ``g_ema`` state_dict is renamed to our layout.
* NVlabs stylegan2-ada-pytorch network pickles (``.pkl``): a pickle can run code, so it is read
  only with ``--trust-pickle``, and then only through `_AllowListUnpickler`: the classes of the
  network (``torch_utils.persistence`` objects, whose embedded source code is *never*
  executed) become inert `_Persistent` records of their attribute dicts; tensors are rebuilt
  from their storages with ``weights_only=True``; any other global is refused by name.

Both give a state_dict in the ada G_ema naming (gi_core.stylegan2). The architecture is
inferred from the tensor shapes, every expected tensor must be present with the expected shape
(the error names the tensor), unknown tensors are refused, and known auxiliary tensors
(FIR filters, noise maps, w_avg) are dropped. The output is a ``torch.save`` dict loadable with
``weights_only=True`` plus ``<out>.sha256`` in ``sha256sum`` format.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import importlib
import io
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gi_core.errors import ConfigError
from gi_core.stylegan2 import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    StyleGAN2Config,
    StyleGAN2Generator,
    StyleGAN2Options,
    config_from_state,
    state_with_arch,
)
from tasks.preflight import checkpoint_file_problem

FORMATS = ("auto", "rosinality", "ada")


@dataclass(frozen=True)
class Converted:
    path: Path
    sha256: str
    config: StyleGAN2Config
    source_format: str
    dropped: tuple[str, ...]  # auxiliary source tensors not needed (filters, noise, w_avg)

    def describe(self) -> str:
        c = self.config
        return (
            f"wrote {self.path} ({self.source_format}: {c.resolution}px, z {c.z_dim}, "
            f"w {c.w_dim}, {c.mapping_layers} mapping layers, channels {list(c.channels)}, "
            f"conv_clamp {c.conv_clamp})\nsha256 {self.sha256}  ({self.path}.sha256)"
        )


def convert_generator(
    src: Path,
    out: Path,
    *,
    source_format: str = "auto",
    trust_pickle: bool = False,
    lr_mlp: float | None = None,
) -> Converted:
    """Convert `src` and write `out` + `out.sha256`. ConfigError (exit 2) on any mismatch."""
    fmt = _detect_format(src, source_format)
    if fmt == "ada":
        state, hints = read_ada_pickle(src, trust_pickle=trust_pickle)
    else:
        state, hints = _ours_from_rosinality(_read_rosinality(src)), {}
    if lr_mlp is not None:
        hints["lr_mlp"] = lr_mlp
    state, dropped = _drop_auxiliary(state)
    config = infer_config(state, **hints)
    check_state(state, config)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config.to_dict(),
        "state_dict": state_with_arch(
            config, {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
        ),
        "source": {"file": src.name, "format": fmt},
    }
    digest = _write(out, payload)
    return Converted(out, digest, config, fmt, tuple(dropped))


def _detect_format(src: Path, requested: str) -> str:
    if requested not in FORMATS:
        raise ConfigError(f"--format: must be one of {', '.join(FORMATS)} (got {requested!r})")
    if not src.is_file():
        raise ConfigError(f"SRC: no such file {str(src)!r}")
    bad_file = checkpoint_file_problem(src)
    if bad_file:
        raise ConfigError(
            f"SRC: {src} {bad_file}; give rosinality's .pt or stylegan2-ada's .pkl file"
        )
    if requested != "auto":
        return requested
    if src.suffix == ".pkl":
        return "ada"
    if src.suffix in (".pt", ".pth"):
        return "rosinality"
    raise ConfigError(
        f"SRC: cannot tell the format of {src.name!r} from its suffix; pass --format "
        "rosinality (a .pt state_dict) or --format ada (a stylegan2-ada network pickle)"
    )


def _write(out: Path, payload: dict[str, Any]) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.replace(out)
    out.with_name(out.name + ".sha256").write_text(f"{digest}  {out.name}\n")
    return digest


# --------------------------------------------------------------------------------------------
# rosinality/stylegan2-pytorch


def _read_rosinality(src: Path) -> dict[str, Tensor]:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(src, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, IndexError) as e:
        raise ConfigError(
            f"SRC: {src} is not a weights_only-loadable rosinality checkpoint ({e}); a "
            "stylegan2-ada .pkl needs --format ada and --trust-pickle"
        ) from e
    if isinstance(data, dict):
        for key in ("g_ema", "g"):  # the EMA generator is the one to attack with
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise ConfigError(f"SRC: {src} holds no generator state_dict (expected 'g_ema')")
    return dict(data)


_ROSINALITY_AUX = re.compile(r"^(noises\.noise_\d+|.*\.blur\.kernel|.*\.upsample\.kernel)$")


def _ours_from_rosinality(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename rosinality's Generator state_dict to the ada/gi-eval layout.

    style.{i} (i >= 1, style.0 is PixelNorm) -> mapping.fc{i-1}; input.input (1, C, 4, 4) ->
    b4.const; conv1/to_rgb1 -> b4.conv1/b4.torgb; convs.{2k}, convs.{2k+1}, to_rgbs.{k} ->
    b{2^(k+3)}.conv0/conv1/torgb; conv weights (1, O, I, k, k) -> (O, I, k, k), modulation ->
    affine, noise.weight (1,) -> noise_strength (), activate.bias / to_rgb bias -> bias.
    Auxiliary tensors keep their names (prefixed "aux:") and are dropped later.
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if _ROSINALITY_AUX.match(key):
            out["aux:" + key] = value
            continue
        out[_rosinality_name(key)] = _rosinality_value(key, value)
    return out


def _rosinality_name(key: str) -> str:
    m = re.fullmatch(r"style\.(\d+)\.(weight|bias)", key)
    if m and int(m.group(1)) >= 1:
        return f"mapping.fc{int(m.group(1)) - 1}.{m.group(2)}"
    if key == "input.input":
        return "synthesis.b4.const"
    m = re.fullmatch(r"(conv1|to_rgb1|convs\.(\d+)|to_rgbs\.(\d+))\.(.+)", key)
    if not m:
        raise ConfigError(f"SRC: unexpected tensor {key!r} in the rosinality state_dict")
    head, conv_i, rgb_i, rest = m.groups()
    if head == "conv1":
        layer = "synthesis.b4.conv1"
    elif head == "to_rgb1":
        layer = "synthesis.b4.torgb"
    elif conv_i is not None:
        i = int(conv_i)
        layer = f"synthesis.b{2 ** (i // 2 + 3)}.conv{i % 2}"
    else:
        layer = f"synthesis.b{2 ** (int(rgb_i) + 3)}.torgb"
    leaf = {
        "conv.weight": "weight",
        "conv.modulation.weight": "affine.weight",
        "conv.modulation.bias": "affine.bias",
        "noise.weight": "noise_strength",
        "activate.bias": "bias",
        "bias": "bias",
    }.get(rest)
    if leaf is None:
        raise ConfigError(f"SRC: unexpected tensor {key!r} in the rosinality state_dict")
    return f"{layer}.{leaf}"


def _rosinality_value(key: str, value: Tensor) -> Tensor:
    if key.endswith("conv.weight") or key == "input.input":
        return value.squeeze(0)  # (1, O, I, k, k) -> (O, I, k, k); (1, C, 4, 4) -> (C, 4, 4)
    if key.endswith("noise.weight"):
        return value.reshape(())
    if key.startswith(("to_rgb1.bias", "to_rgbs.")) and key.endswith(".bias") and value.dim() == 4:
        return value.reshape(-1)  # (1, 3, 1, 1) -> (3,)
    return value


# --------------------------------------------------------------------------------------------
# stylegan2-ada-pytorch network pickles


class _Persistent:
    """An inert record of a persisted ada module: its class name and attribute dict.

    Replaces ``torch_utils.persistence._reconstruct_persistent_obj``, which would exec the
    module source stored in the pickle."""

    def __init__(self, meta: Mapping[str, Any]) -> None:
        self.class_name = str(meta.get("class_name"))
        state = meta.get("state")
        self.state: dict[str, Any] = dict(state) if isinstance(state, Mapping) else {}


class _EasyDict(dict):  # type: ignore[type-arg]
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access)."""


def _load_storage(data: bytes) -> Any:
    # torch.storage._load_from_bytes would call torch.load(weights_only=False).
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rebuild_parameter(data: Tensor, *args: Any) -> Tensor:
    return data  # a plain tensor is all a state_dict needs


def _numpy_multiarray() -> Any:
    try:
        return importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import numpy as np

    multiarray = _numpy_multiarray()
    allowed: dict[tuple[str, str], Any] = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Persistent,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(core, "_reconstruct")] = multiarray._reconstruct
        allowed[(core, "scalar")] = multiarray.scalar
    for name in ("float32", "float16", "float64", "int64", "int32", "uint8", "bool"):
        allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise ConfigError(
                f"SRC: the pickle references {module}.{name}, which is not on the converter's "
                "allow list (only stylegan2-ada network pickles are supported)"
            )
        return found


def read_ada_pickle(src: Path, *, trust_pickle: bool) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(G_ema state_dict, hints for the architecture) from a stylegan2-ada network pickle."""
    if not trust_pickle:
        raise ConfigError(
            f"--trust-pickle: {src.name} is a pickle, which can run code when loaded; pass "
            "--trust-pickle if it comes from a source you trust (it is then read through an "
            "allow-listed unpickler that executes none of the code stored in it)"
        )
    try:
        with src.open("rb") as f:
            data = _AllowListUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, RuntimeError) as e:
        raise ConfigError(f"SRC: {src} is not a readable stylegan2-ada network pickle: {e}") from e
    g = data.get("G_ema") if isinstance(data, Mapping) else None
    if not isinstance(g, _Persistent):
        raise ConfigError(f"SRC: {src} has no 'G_ema' network (a stylegan2-ada network pickle has)")
    state = _flatten(g)
    return state, _ada_hints(g, state)


def _flatten(obj: _Persistent, prefix: str = "") -> dict[str, Tensor]:
    """Parameters and buffers of a persisted module tree, by dotted name (a state_dict)."""
    out: dict[str, Tensor] = {}
    for slot in ("_parameters", "_buffers"):
        for name, value in (obj.state.get(slot) or {}).items():
            if isinstance(value, Tensor):
                out[prefix + name] = value
    for name, child in (obj.state.get("_modules") or {}).items():
        if isinstance(child, _Persistent):
            out.update(_flatten(child, prefix + name + "."))
        elif child is not None:
            raise ConfigError(f"SRC: module {prefix + name!r} is not a stylegan2-ada module")
    return out


def _ada_hints(g: _Persistent, state: Mapping[str, Tensor]) -> dict[str, Any]:
    if any(k.startswith("mapping.embed.") for k in state) or g.state.get("c_dim", 0):
        raise ConfigError(
            "SRC: a class-conditional generator (c_dim > 0); gi-eval's priors are unconditional"
        )
    hints: dict[str, Any] = {}
    mapping = (g.state.get("_modules") or {}).get("mapping")
    fc0 = (
        (mapping.state.get("_modules") or {}).get("fc0")
        if isinstance(mapping, _Persistent)
        else None
    )
    if isinstance(fc0, _Persistent) and isinstance(fc0.state.get("bias_gain"), float | int):
        hints["lr_mlp"] = float(fc0.state["bias_gain"])  # ada: bias_gain = lr_multiplier
    clamp = _find_attr(g, "conv_clamp")
    if isinstance(clamp, float | int):
        hints["conv_clamp"] = float(clamp)
    return hints


def _find_attr(obj: _Persistent, name: str) -> Any:
    if name in obj.state:
        return obj.state[name]
    for child in (obj.state.get("_modules") or {}).values():
        if isinstance(child, _Persistent):
            found = _find_attr(child, name)
            if found is not None:
                return found
    return None


# --------------------------------------------------------------------------------------------
# Architecture inference and strict checks


_ADA_AUX = re.compile(r"^(aux:.*|mapping\.w_avg|.*\.resample_filter|.*\.noise_const)$")


def _drop_auxiliary(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    kept = {k: v for k, v in state.items() if not _ADA_AUX.match(k)}
    return kept, sorted(k.removeprefix("aux:") for k in state if k not in kept)


def infer_config(
    state: Mapping[str, Tensor], *, lr_mlp: float = 0.01, conv_clamp: float | None = None
) -> StyleGAN2Config:
    """The architecture the tensors describe (resolution, channels, z/w dims, mapping depth)."""
    try:
        shapes = config_from_state(state)
    except ConfigError as e:
        raise ConfigError(f"SRC: {e}") from e
    return dataclasses.replace(shapes, lr_mlp=lr_mlp, conv_clamp=conv_clamp)


def check_state(state: Mapping[str, Tensor], config: StyleGAN2Config) -> None:
    """Every tensor of `config`'s architecture present with its shape; nothing else."""
    expected = {
        k: tuple(v.shape)
        for k, v in StyleGAN2Generator(
            config, output_size=config.resolution, options=StyleGAN2Options()
        )
        .state_dict()
        .items()
    }
    for key, shape in expected.items():
        if key not in state:
            raise ConfigError(f"SRC: tensor {key!r} {shape} is missing for {_arch(config)}")
        if tuple(state[key].shape) != shape:
            raise ConfigError(
                f"SRC: tensor {key!r} has shape {tuple(state[key].shape)}, {_arch(config)} "
                f"needs {shape}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ConfigError(f"SRC: unexpected tensor {extra[0]!r} for {_arch(config)}")


def _arch(config: StyleGAN2Config) -> str:
    return f"a {config.resolution}px StyleGAN2 with channels {list(config.channels)}"
