"""`gi-eval convert-generator`: synthetic rosinality `.pt` and stylegan2-ada `.pkl` files built
here (tiny: 16 px, 2 mapping layers) round-trip into the project's StyleGAN2 state_dict."""

import argparse
import hashlib
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gi_core.errors import ConfigError
from gi_core.stylegan2 import (
    StyleGAN2Config,
    StyleGAN2Options,
    build_stylegan2,
    load_stylegan2_checkpoint,
)
from pipelines.cli import app
from pipelines.convert import convert_generator

CONFIG = StyleGAN2Config(resolution=16, channels=(8, 6, 4), z_dim=5, w_dim=7, mapping_layers=2)


@pytest.fixture(scope="module")
def reference():
    gen = build_stylegan2(CONFIG, output_size=16, seed=3)
    with torch.no_grad():  # non-trivial values everywhere (init has zero biases/strengths)
        for name, p in gen.named_parameters():
            if name.endswith(("noise_strength", ".bias")):
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return gen


def _rosinality_state(gen) -> dict[str, torch.Tensor]:
    """The state_dict of rosinality's Generator(size=16, style_dim, n_mlp=2) for `gen`'s
    weights, in rosinality's own names and shapes."""
    sd, ours = {}, gen.state_dict()
    for i in range(CONFIG.mapping_layers):  # style.0 is PixelNorm
        sd[f"style.{i + 1}.weight"] = ours[f"mapping.fc{i}.weight"]
        sd[f"style.{i + 1}.bias"] = ours[f"mapping.fc{i}.bias"]
    sd["input.input"] = ours["synthesis.b4.const"][None]

    def styled(dst: str, src: str, *, up: bool) -> None:
        sd[f"{dst}.conv.weight"] = ours[f"{src}.weight"][None]
        sd[f"{dst}.conv.modulation.weight"] = ours[f"{src}.affine.weight"]
        sd[f"{dst}.conv.modulation.bias"] = ours[f"{src}.affine.bias"]
        if up:
            sd[f"{dst}.conv.blur.kernel"] = torch.ones(4, 4)
        sd[f"{dst}.noise.weight"] = ours[f"{src}.noise_strength"].reshape(1)
        sd[f"{dst}.activate.bias"] = ours[f"{src}.bias"]

    def rgb(dst: str, src: str, *, up: bool) -> None:
        sd[f"{dst}.conv.weight"] = ours[f"{src}.weight"][None]
        sd[f"{dst}.conv.modulation.weight"] = ours[f"{src}.affine.weight"]
        sd[f"{dst}.conv.modulation.bias"] = ours[f"{src}.affine.bias"]
        sd[f"{dst}.bias"] = ours[f"{src}.bias"].reshape(1, 3, 1, 1)
        if up:
            sd[f"{dst}.upsample.kernel"] = torch.ones(4, 4)

    styled("conv1", "synthesis.b4.conv1", up=False)
    rgb("to_rgb1", "synthesis.b4.torgb", up=False)
    for k, res in enumerate((8, 16)):
        styled(f"convs.{2 * k}", f"synthesis.b{res}.conv0", up=True)
        styled(f"convs.{2 * k + 1}", f"synthesis.b{res}.conv1", up=False)
        rgb(f"to_rgbs.{k}", f"synthesis.b{res}.torgb", up=True)
    for i in range(5):  # num_layers = (log2(16) - 2) * 2 + 1
        res = 2 ** ((i + 5) // 2)
        sd[f"noises.noise_{i}"] = torch.randn(1, 1, res, res)
    return sd


def _same_generator(path: Path, reference) -> None:
    config, state = load_stylegan2_checkpoint(path)
    assert config == CONFIG
    got = build_stylegan2(config, output_size=16, state_dict=state)
    for key, value in reference.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
    z = torch.randn(3, CONFIG.z_dim, generator=torch.Generator().manual_seed(0))
    opts = StyleGAN2Options("z")
    a = build_stylegan2(config, output_size=16, state_dict=state, options=opts)
    b = build_stylegan2(config, output_size=16, state_dict=reference.state_dict(), options=opts)
    with torch.no_grad():
        assert torch.equal(a(z), b(z))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (path.parent / (path.name + ".sha256")).read_text().split()[0] == digest


def test_rosinality_checkpoint_round_trip(tmp_path: Path, reference) -> None:
    src = tmp_path / "550000.pt"
    # a training checkpoint: g, d, g_ema and the argparse args (allowed by name, nothing else)
    torch.save(
        {
            "g": _rosinality_state(reference),
            "g_ema": _rosinality_state(reference),
            "d": {"convs.0.0.weight": torch.zeros(1)},
            "args": argparse.Namespace(size=16, n_mlp=2),
            "latent_avg": torch.zeros(CONFIG.w_dim),
        },
        src,
    )
    out = tmp_path / "converted.pt"
    result = convert_generator(src, out)
    assert result.source_format == "rosinality"
    assert "noises.noise_0" in result.dropped
    _same_generator(out, reference)


def test_rosinality_shape_and_key_mismatches_name_the_tensor(tmp_path: Path, reference) -> None:
    sd = _rosinality_state(reference)
    sd["convs.1.conv.modulation.weight"] = torch.zeros(3, 3)
    torch.save({"g_ema": sd}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=r"synthesis\.b8\.conv1\.affine\.weight.*shape"):
        convert_generator(tmp_path / "bad.pt", tmp_path / "o.pt")
    sd = _rosinality_state(reference)
    del sd["to_rgbs.1.bias"]
    torch.save({"g_ema": sd}, tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match=r"synthesis\.b16\.torgb\.bias.*missing"):
        convert_generator(tmp_path / "missing.pt", tmp_path / "o.pt")
    sd = _rosinality_state(reference)
    sd["convs.0.conv.extra"] = torch.zeros(1)
    torch.save({"g_ema": sd}, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match=r"convs\.0\.conv\.extra"):
        convert_generator(tmp_path / "extra.pt", tmp_path / "o.pt")
    assert not (tmp_path / "o.pt").exists()


# ---- a synthetic stylegan2-ada network pickle -------------------------------------------------
# stylegan2-ada's persistence pickles each network module as
# _reconstruct_persistent_obj(meta) with meta = {type, version, module_src, class_name, state};
# unpickling with the real code would exec module_src. Here a stand-in module provides that
# function under its real name, only while the pickle is written.

EVIL_SRC = "import os\nos.system('touch /tmp/gi-eval-pwned')\n"


def _persistence_module() -> types.ModuleType:
    module = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called: the file is only written here
        raise AssertionError("unreachable")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    return module


class _Persistent(nn.Module):
    def __reduce__(self):
        fields = list(super().__reduce__())
        fields += [None] * max(3 - len(fields), 0)
        meta = {
            "type": "class",
            "version": 4,
            "module_src": EVIL_SRC,
            "class_name": type(self).__name__,
            "state": fields[2],
        }
        fields[0] = sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj
        fields[1] = (meta,)
        fields[2] = None
        return tuple(fields)


class FullyConnectedLayer(_Persistent):
    def __init__(self, weight, bias, lr: float) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
        self.weight_gain, self.bias_gain = lr / weight.shape[1] ** 0.5, lr


class Layer(_Persistent):
    def __init__(self, ours, prefix: str, *, rgb: bool, res: int) -> None:
        super().__init__()
        self.affine = FullyConnectedLayer(
            ours[prefix + ".affine.weight"], ours[prefix + ".affine.bias"], 1.0
        )
        self.weight = nn.Parameter(ours[prefix + ".weight"].clone())
        self.bias = nn.Parameter(ours[prefix + ".bias"].clone())
        self.conv_clamp = 256
        if not rgb:
            self.noise_strength = nn.Parameter(ours[prefix + ".noise_strength"].clone())
            self.register_buffer("noise_const", torch.randn(res, res))
            self.register_buffer("resample_filter", torch.ones(4, 4))


class Block(_Persistent):
    def __init__(self, ours, res: int) -> None:
        super().__init__()
        p = f"synthesis.b{res}"
        if res == 4:
            self.const = nn.Parameter(ours[p + ".const"].clone())
        else:
            self.conv0 = Layer(ours, p + ".conv0", rgb=False, res=res)
        self.conv1 = Layer(ours, p + ".conv1", rgb=False, res=res)
        self.torgb = Layer(ours, p + ".torgb", rgb=True, res=res)
        self.register_buffer("resample_filter", torch.ones(4, 4))


class SynthesisNetwork(_Persistent):
    def __init__(self, ours) -> None:
        super().__init__()
        for res in (4, 8, 16):
            setattr(self, f"b{res}", Block(ours, res))


class MappingNetwork(_Persistent):
    def __init__(self, ours) -> None:
        super().__init__()
        for i in range(CONFIG.mapping_layers):
            w, b = ours[f"mapping.fc{i}.weight"], ours[f"mapping.fc{i}.bias"]
            setattr(self, f"fc{i}", FullyConnectedLayer(w, b, 0.01))
        self.register_buffer("w_avg", torch.zeros(CONFIG.w_dim))


class Generator(_Persistent):
    def __init__(self, ours) -> None:
        super().__init__()
        self.c_dim = 0
        self.mapping, self.synthesis = MappingNetwork(ours), SynthesisNetwork(ours)


def _write_ada_pickle(path: Path, gen, **extra) -> None:
    package = types.ModuleType("torch_utils")
    package.__path__ = []  # a package, so that "torch_utils.persistence" imports
    package.persistence = _persistence_module()
    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = (
        package,
        package.persistence,
    )
    try:
        ours = {k: v.detach() for k, v in gen.state_dict().items()}
        data = {"G": Generator(ours), "D": None, "G_ema": Generator(ours), **extra}
        data["training_set_kwargs"] = {"resolution": 16}
        with path.open("wb") as f:
            pickle.dump(data, f)
    finally:
        del sys.modules["torch_utils.persistence"], sys.modules["torch_utils"]


def test_ada_pickle_round_trip_through_the_allow_list(tmp_path: Path, reference) -> None:
    src = tmp_path / "network-snapshot-000100.pkl"
    _write_ada_pickle(src, reference)
    assert "torch_utils.persistence" not in sys.modules  # the converter cannot rely on it
    out = tmp_path / "ada.pt"
    result = convert_generator(src, out, trust_pickle=True)
    assert result.source_format == "ada"
    assert result.config.conv_clamp == 256.0  # read from the networks' attributes
    assert not Path("/tmp/gi-eval-pwned").exists()  # the embedded source never ran
    config, state = load_stylegan2_checkpoint(out)
    ref = build_stylegan2(CONFIG, output_size=16, state_dict=reference.state_dict())
    got = build_stylegan2(config, output_size=16, state_dict=state)
    for key, value in ref.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key


def test_pickle_needs_trust_pickle_and_the_cli_exits_2(tmp_path: Path, reference) -> None:
    src = tmp_path / "net.pkl"
    _write_ada_pickle(src, reference)
    with pytest.raises(ConfigError, match="--trust-pickle"):
        convert_generator(src, tmp_path / "o.pt")
    result = CliRunner().invoke(app, ["convert-generator", str(src), str(tmp_path / "o.pt")])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--trust-pickle" in lines[0]
    assert not (tmp_path / "o.pt").exists()
    ok = CliRunner().invoke(
        app, ["convert-generator", str(src), str(tmp_path / "o.pt"), "--trust-pickle"]
    )
    assert ok.exit_code == 0, ok.output
    assert "sha256" in ok.output


def test_a_pickle_with_other_globals_is_refused_by_name(tmp_path: Path) -> None:
    src = tmp_path / "evil.pkl"

    class Boom:
        def __reduce__(self):
            return (__import__("os").system, ("touch /tmp/gi-eval-pwned",))

    src.write_bytes(pickle.dumps({"G_ema": Boom()}))
    with pytest.raises(ConfigError, match=r"os\.system|posix\.system"):
        convert_generator(src, tmp_path / "o.pt", trust_pickle=True)
    assert not Path("/tmp/gi-eval-pwned").exists()


def test_converted_file_is_refused_when_it_is_not_one(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="convert-generator"):
        load_stylegan2_checkpoint(tmp_path / "plain.pt")


def test_converted_file_builds_through_the_generic_generator_api(tmp_path: Path, reference):
    from gi_core.generators import build_generator, load_generator_checkpoint

    src = tmp_path / "g.pt"
    torch.save({"g_ema": _rosinality_state(reference)}, src)
    convert_generator(src, tmp_path / "c.pt", lr_mlp=0.02)
    state = load_generator_checkpoint(tmp_path / "c.pt")
    gen = build_generator("stylegan2", output_size=8, state_dict=state)
    assert gen.config.lr_mlp == 0.02 and gen.output_size == 8  # architecture from the file
    assert torch.equal(gen.synthesis.b8.conv0.weight, reference.synthesis.b8.conv0.weight)
    with pytest.raises(ConfigError, match="needs weights"):
        build_generator("stylegan2", output_size=8)
