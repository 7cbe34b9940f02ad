"""One victim builder for every flow (issue 17): `victim.normalize` is honoured by grids, GIML
and multigrad alike (GIML used to drop it silently)."""

from __future__ import annotations

import torch

from tasks.giml import giml_victim
from tasks.giml_spec import GIMLSpec, load_yaml_spec
from tasks.models import victim_model
from tasks.multigrad import MultiGradSpec, cells
from tasks.spec import VictimSpec

NORMALIZE = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


def _outputs(model: torch.nn.Module, size: int) -> torch.Tensor:
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


def _with_normalize(victim: VictimSpec) -> VictimSpec:
    return VictimSpec.model_validate({**victim.model_dump(), "normalize": NORMALIZE})


def test_victim_model_applies_normalize():
    plain = VictimSpec(arch="convnet", width=4, seed=0)
    a = victim_model(plain, num_classes=3, image_size=32)
    b = victim_model(_with_normalize(plain), num_classes=3, image_size=32)
    assert not torch.allclose(_outputs(a, 32), _outputs(b, 32))
    same = victim_model(plain, num_classes=3, image_size=32)
    assert torch.equal(_outputs(a, 32), _outputs(same, 32))  # same spec, same model


def test_giml_spec_honours_normalize():
    spec, _ = load_yaml_spec("grids/giml_faces_cpu.yaml", GIMLSpec)
    normalised = spec.model_copy(update={"victim": _with_normalize(spec.victim)})
    size = spec.data.image_size
    plain, norm = (_outputs(giml_victim(s).cpu(), size) for s in (spec, normalised))
    assert not torch.allclose(plain, norm)


def test_multigrad_cells_carry_normalize_to_the_victim():
    spec, _ = load_yaml_spec("grids/multigrad_cpu.yaml", MultiGradSpec)
    normalised = spec.model_copy(update={"victim": _with_normalize(spec.victim)})
    victim = VictimSpec.model_validate(cells(normalised)[0]["victim"])
    assert victim.normalize is not None
    size = spec.data.image_size
    built = victim_model(victim, num_classes=5, image_size=size)
    plain = victim_model(spec.victim, num_classes=5, image_size=size)
    assert not torch.allclose(_outputs(built, size), _outputs(plain, size))
