"""Victim zoo: CIFAR ResNets, torchvision models, user models, normalisation inside the victim."""

import sys
from pathlib import Path

import pytest
import torch

from gi_core.errors import ConfigError
from gi_core.gradients import client_gradient
from gi_core.victims import CifarResNet, Normalized, build_victim
from tasks.spec import VictimSpec


@pytest.mark.parametrize(("name", "params"), [("resnet20", 0.27e6), ("resnet56", 0.85e6)])
def test_cifar_resnets_have_the_papers_size(name: str, params: float) -> None:
    model = build_victim(name, num_classes=10, image_size=32)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.02  # He et al. 2016, Table 6: 0.27M / 0.85M
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(model, CifarResNet)


def test_torchvision_model_with_state_dict_and_normalisation() -> None:
    a = build_victim("torchvision:resnet18", num_classes=4, image_size=64, seed=1)
    b = build_victim("torchvision:resnet18", num_classes=4, image_size=64, seed=2)
    assert not torch.equal(a.fc.weight, b.fc.weight)  # seeded init
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    c = build_victim(
        "torchvision:resnet18",
        num_classes=4,
        image_size=64,
        seed=2,
        state_dict=a.state_dict(),
        normalize=(mean, std),
    )
    assert isinstance(c, Normalized)
    x = torch.rand(2, 3, 64, 64)
    a.eval(), c.eval()
    expected = a((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    torch.testing.assert_close(c(x), expected)
    # the attacked gradient flows through the normalisation to [0, 1] images
    grads = client_gradient(c, x, torch.tensor([0, 1]))
    assert len(grads) == len(list(a.parameters()))
    with pytest.raises(ConfigError, match="normalize"):
        build_victim("convnet", num_classes=4, image_size=32, normalize=((0.5,), (0.5,)))


def test_user_model_from_module_callable(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "my_victims.py").write_text(
        "import torch\n"
        "def tiny(num_classes, image_size, channels):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(),\n"
        "        torch.nn.Linear(channels * image_size ** 2, num_classes))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    model = build_victim("my_victims:tiny", num_classes=3, image_size=32)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ConfigError, match="cannot import my_victims:nope"):
        build_victim("my_victims:nope", num_classes=3, image_size=32)


def test_spec_validates_victim_names_and_keeps_old_ids() -> None:
    assert VictimSpec(arch="convnet").model_dump() == {
        "arch": "convnet",
        "width": None,
        "seed": 0,
        "checkpoint": None,
    }  # unchanged dump -> unchanged cell ids of existing grids
    VictimSpec(arch="torchvision:vgg11_bn")
    VictimSpec(arch="resnet32")
    for bad in ("resnet19", "torchvision:nope", "not a module:x"):
        with pytest.raises(ValueError, match="victim|torchvision"):
            VictimSpec(arch=bad)
    with pytest.raises(ValueError, match="3 values"):
        VictimSpec(arch="convnet", normalize={"mean": [0.5], "std": [0.5]})
    with pytest.raises(ValueError, match="> 0"):
        VictimSpec(arch="convnet", normalize={"mean": [0, 0, 0], "std": [1, 0, 1]})


def test_generator_spec_stylegan2_fields() -> None:
    from tasks.spec import GeneratorSpec

    assert GeneratorSpec(kind="dcgan32").model_dump() == {"kind": "dcgan32", "checkpoint": None}
    arch = {"resolution": 16, "channels": [8, 8, 8]}
    spec = GeneratorSpec(kind="stylegan2", stylegan2=arch, latent_space="w+", noise="random")
    options = spec.stylegan2_options()
    assert (options.latent_space, options.noise) == ("w+", "random")
    assert GeneratorSpec(kind="stylegan2", stylegan2=arch).stylegan2_options().latent_space == "w"
    with pytest.raises(ValueError, match="stylegan2 option"):
        GeneratorSpec(kind="dcgan64", latent_space="w")
    with pytest.raises(ValueError, match="exactly one of checkpoint"):
        GeneratorSpec(kind="stylegan2")
    with pytest.raises(ValueError, match="one entry per resolution"):
        GeneratorSpec(kind="stylegan2", stylegan2={"resolution": 16, "channels": [8]})
    with pytest.raises(ValueError, match="latent_space"):
        GeneratorSpec(kind="stylegan2", stylegan2=arch, latent_space="s")
