"""Per-cell memory estimate (pipelines.memory): refuses what cannot fit before submission."""

import pytest

from gi_core.errors import ConfigError
from gi_core.stylegan2 import StyleGAN2Config, parameter_counts
from pipelines.memory import check_memory, estimate_cell, memory_lines
from tasks.cells import expand
from tasks.spec import parse_spec


def _spec(mem_gb: float, *, restarts: int = 4, batch: int = 4, gpus: int = 0):
    return parse_spec(
        {
            "name": "mem",
            "data": {"dataset": "natural-photos", "image_size": 64, "num_batches": 1},
            "victim": {"arch": "torchvision:resnet18"},
            "generator": {
                "kind": "stylegan2",
                "stylegan2": {"resolution": 64, "channels": [512] * 5},
            },
            "methods": [
                {"name": "gi-z/w", "params": {"restarts": restarts}},
                {"name": "gi-x", "params": {"restarts": restarts}},
            ],
            "batch_sizes": [batch],
            "execution": {
                "executor": "slurm",
                "slurm": {"gpus_per_task": gpus, "mem_gb": mem_gb},
            },
        }
    )


def test_per_image_copies_dominate_and_scale_with_restarts_and_batch() -> None:
    _, synthesis = parameter_counts(StyleGAN2Config(resolution=64, channels=(512,) * 5))
    assert 20e6 < synthesis < 30e6  # the 64 px config-f synthesis network: ~24 M
    big = {c.method: estimate_cell(c).bytes for c in expand(_spec(64)).inversion_cells}
    small = {
        c.method: estimate_cell(c).bytes
        for c in expand(_spec(64, restarts=1, batch=1)).inversion_cells
    }
    # 16 copies x (value, grad, 2 Adam moments) x 4 bytes of the synthesis parameters
    assert big["gi-z/w"] - big["gi-x"] > 16 * 4 * 4 * synthesis
    assert big["gi-z/w"] > 4 * small["gi-z/w"] / 2


def test_a_cell_that_cannot_fit_the_job_is_refused() -> None:
    spec = _spec(8)
    cells = expand(spec).inversion_cells
    with pytest.raises(ConfigError, match=r"gi-z/w needs ~\d+\.\d GiB.*mem_gb \(8\.0 GiB\)"):
        check_memory(spec, cells, executor="slurm")
    check_memory(_spec(64), expand(_spec(64)).inversion_cells, executor="slurm")
    gpu = _spec(8, gpus=1)  # device memory is not in the spec: shown, not refused
    check_memory(gpu, expand(gpu).inversion_cells, executor="slurm")
    gpu_lines = memory_lines(gpu, expand(gpu).inversion_cells, executor="slurm")
    assert "no job limit checked" in gpu_lines[0]
    assert any("gi-z/w needs" in line for line in memory_lines(spec, cells, executor="slurm"))


@pytest.mark.parametrize("kind", ["dcgan32", "dcgan64", "digiface"])
def test_dcgan_priors_are_estimated_without_building_weights(kind: str) -> None:
    # random dcgan32/64 calibrate their BN and digiface loads weights: neither runs on the meta
    # device, so the estimate must count the bare architecture (a regression: Tensor.item())
    spec = parse_spec(
        {
            "name": "mem",
            "data": {"dataset": "synthetic", "image_size": 32, "num_batches": 1},
            "victim": {"arch": "lenet"},
            "generator": {"kind": kind},
            "methods": [{"name": "gi-z/w", "params": {"restarts": 2}}],
            "batch_sizes": [2],
        }
    )
    (cell,) = expand(spec).inversion_cells
    assert estimate_cell(cell).bytes > 2 * 2 * 4 * 4 * 1_000_000  # 4 copies of a >1 M prior
    assert any("memory" in line for line in memory_lines(spec, [cell], executor="local"))


def _with_slurm(spec, **slurm):
    data = spec.model_dump(mode="json")
    data["execution"]["slurm"].update(slurm)
    return parse_spec(data)


def test_a_per_method_memory_override_is_the_limit_of_that_methods_cells() -> None:
    """Issue 18: execution.slurm.methods.<m>.mem_gb is what the check compares against."""
    spec = _with_slurm(_spec(8), methods={"gi-z/w": {"mem_gb": 64}})
    check_memory(spec, expand(spec).inversion_cells, executor="slurm")  # fits its own 64 GB
    tight = _with_slurm(_spec(64), methods={"gi-z/w": {"mem_gb": 2}})
    with pytest.raises(ConfigError, match=r"execution\.slurm\.methods\.gi-z/w\.mem_gb \(2\.0"):
        check_memory(tight, expand(tight).inversion_cells, executor="slurm")
    gpu = _with_slurm(_spec(8), methods={"gi-z/w": {"gpus_per_task": 1}})
    check_memory(gpu, expand(gpu).inversion_cells, executor="slurm")  # GPU jobs: not refused
