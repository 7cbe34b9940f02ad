"""Issue 18, Deliver 2: resources per array kind and per method (tasks.resources).

The scripts are rendered by submitit from the parameters the executor adapter passes, as for a
real submission; tests/integration/test_slurm_resources.py hands them to `sbatch --test-only`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from gi_core.errors import ConfigError
from pipelines.flows import executor_config
from pipelines.memory import sized_mem_gb
from tasks.cells import expand
from tasks.executors import ExecutorConfig, render_sbatch
from tasks.resources import GRADIENT_MEM_GB, inversion_groups
from tasks.spec import GridSpec, parse_spec

SPEC: dict[str, Any] = {
    "name": "res",
    "data": {"dataset": "synthetic", "image_size": 32, "num_batches": 1},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "generator": {"kind": "dcgan32"},
    "methods": [
        {"name": "gi-x", "params": {"iterations": 2, "restarts": 1}},
        {
            "name": "gi-z/w",
            "params": {"z_iterations": 2, "w_iterations": 2, "restarts": 1},
            "label": "zw",
        },
    ],
    "execution": {
        "executor": "slurm",
        "cells_per_job": 1,
        "slurm": {
            "cpus_per_task": 1,
            "gpus_per_task": 1,
            "timeout_min": 120,
            "partition": "gpu",
            "gradients": {"timeout_min": 5, "gpus_per_task": 0, "partition": "cpu"},
            "giml": {"gpu_type": "h100", "timeout_min": 2880},
            "methods": {
                "gi-x": {"mem_gb": 3, "timeout_min": 30, "gpu_type": "a100", "qos": "short"},
                "zw": {"mem_gb": 14, "gpus_per_task": 2, "cpus_per_task": 4},
            },
        },
    },
}
LOGS = Path("/runs/res/logs")


def _spec(**slurm: Any) -> GridSpec:
    data = copy.deepcopy(SPEC)
    data["execution"]["slurm"].update(slurm)
    return parse_spec(data)


def _options(script: str) -> dict[str, str]:
    """'#SBATCH --key=value' lines as {key: value} ('' for a bare flag)."""
    found = re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, flags=re.M)
    return {key: value for key, value in found}


def _scripts(spec: GridSpec) -> dict[str, dict[str, str]]:
    base = executor_config(spec, None)
    groups = inversion_groups(spec, base, expand(spec).inversion_cells, size=sized_mem_gb)
    out = {
        g.key: _options(render_sbatch(g.config, log_dir=LOGS, name=g.tag, elements=4))
        for g in groups
    }
    for kind in ("gradients", "giml"):
        config = executor_config(spec, None, kind)  # type: ignore[arg-type]
        out[kind] = _options(render_sbatch(config, log_dir=LOGS, name=kind, elements=1))
    return out


def test_each_array_kind_and_method_renders_its_own_options() -> None:
    scripts = _scripts(_spec(mem_gb=8))
    gix, zw, grads, giml = scripts["gi-x"], scripts["zw"], scripts["gradients"], scripts["giml"]
    assert (gix["mem"], gix["time"], gix["gpus-per-task"], gix["qos"]) == (
        "3GB",
        "30",
        "a100:1",
        "short",
    )
    assert (zw["mem"], zw["time"], zw["gpus-per-task"], zw["cpus-per-task"]) == (
        "14GB",
        "120",
        "2",
        "4",
    )
    assert "qos" not in zw and zw["partition"] == gix["partition"] == "gpu"
    # gradient generation: its own partition, no GPU, a short limit; the spec-wide memory
    assert (grads["partition"], grads["time"], grads["mem"]) == ("cpu", "5", "8GB")
    assert "gpus-per-task" not in grads
    assert (giml["gpus-per-task"], giml["time"]) == ("h100:1", "2880")
    for name, options in scripts.items():
        assert options["ntasks"] == "1", name
        assert "gres" not in options, name


def test_gres_replaces_gpus_per_task_never_both() -> None:
    spec = _spec(gres="gpu:a100:1", methods={"gi-x": {"mem_gb": 3}})
    for name, options in _scripts(spec).items():
        assert options["gres"] == "gpu:a100:1", name
        assert "gpus-per-task" not in options, name


def test_unset_memory_is_sized_from_the_memory_model() -> None:
    spec = _spec(methods={"gi-x": {"timeout_min": 30}})  # no mem_gb anywhere
    base = executor_config(spec, None)
    groups = {
        g.key: g
        for g in inversion_groups(spec, base, expand(spec).inversion_cells, size=sized_mem_gb)
    }
    for group in groups.values():
        assert group.config.mem_gb == sized_mem_gb(group.cells)
        assert group.config.mem_gb is not None and group.config.mem_gb >= 2
    # StyleGAN-free GI-x and GI-z/w with a DCGAN prior differ in the model's estimate
    assert sized_mem_gb(groups["gi-x"].cells) <= sized_mem_gb(groups["default"].cells)
    assert executor_config(spec, None, "gradients").mem_gb == GRADIENT_MEM_GB


def test_an_explicit_spec_wide_memory_is_kept() -> None:
    spec = _spec(mem_gb=6, methods={})
    base = executor_config(spec, None)
    groups = inversion_groups(spec, base, expand(spec).inversion_cells, size=sized_mem_gb)
    assert [g.config.mem_gb for g in groups] == [6.0]
    assert executor_config(spec, None, "gradients").mem_gb == 6.0


def test_local_executor_ignores_slurm_sizing() -> None:
    spec = _spec(methods={})
    base = executor_config(spec, "local")
    groups = inversion_groups(
        spec,
        base,
        expand(spec).inversion_cells,
        size=lambda cells: pytest.fail("sized for a local run"),
    )
    assert [g.config.kind for g in groups] == ["local"]


@pytest.mark.parametrize(
    ("slurm", "message"),
    [
        ({"methods": {"gias": {"mem_gb": 3}}}, "execution.slurm.methods.gias: no method entry"),
        ({"methods": {"gi-x": {"memory": 3}}}, "execution.slurm.methods.gi-x.memory"),
        ({"gradients": {"mem_gb": -1}}, "execution.slurm.gradients.mem_gb"),
        ({"giml": {"gpu_type": "a 100"}}, "execution.slurm.giml.gpu_type"),
        (
            {"gres": "gpu:a100:1", "gpu_type": "a100"},
            "execution.slurm: gres names GPUs and gpu_type",
        ),
    ],
)
def test_bad_resource_overrides_name_the_field(slurm: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _spec(**slurm)


def test_executor_config_accepts_a_typed_gpu() -> None:
    config = ExecutorConfig(kind="slurm", gpus_per_task=2, gpu_type="a100")
    assert "#SBATCH --gpus-per-task=a100:2" in render_sbatch(
        config, log_dir=LOGS, name="x", elements=2
    )
