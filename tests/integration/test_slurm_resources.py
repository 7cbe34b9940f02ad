"""Issue 18, Acceptance 2: a grid with per-method resources renders different sbatch options
per array, and Slurm itself accepts every rendered script (`sbatch --test-only`).

The cluster of tests/cluster/start-slurm.sh has no GPUs, so GPU requests are checked by the
unit tests (tests/unit/test_slurm_resources.py) and left out here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pipelines.detach import driver_script
from pipelines.flows import executor_config
from pipelines.memory import sized_mem_gb
from tasks.cells import expand
from tasks.executors import ExecutorConfig, render_sbatch
from tasks.resources import inversion_groups
from tasks.spec import parse_spec

if TYPE_CHECKING:
    from tests.integration.conftest import SlurmCluster

pytestmark = [pytest.mark.slurm]


def _spec(partition: str, zw_mem_gb: float) -> dict[str, Any]:
    return {
        "name": "resources",
        "data": {"dataset": "synthetic", "image_size": 32, "num_batches": 1},
        "victim": {"arch": "convnet", "width": 4, "seed": 0},
        "generator": {"kind": "dcgan32"},
        "methods": [
            {"name": "gi-x", "params": {"iterations": 2, "restarts": 1}},
            {"name": "gi-z/w", "params": {"z_iterations": 2, "w_iterations": 2, "restarts": 1}},
            {"name": "gi-z", "params": {"z_iterations": 2, "restarts": 1}},
        ],
        "execution": {
            "executor": "slurm",
            "cells_per_job": 1,
            "slurm": {
                "partition": partition, "cpus_per_task": 1, "gpus_per_task": 0,
                "timeout_min": 60, "qos": "normal",
                "gradients": {"timeout_min": 5, "mem_gb": 1},
                "giml": {"timeout_min": 600, "cpus_per_task": 2},
                "methods": {
                    "gi-x": {"mem_gb": 1.5, "timeout_min": 15},
                    "gi-z/w": {"mem_gb": zw_mem_gb, "timeout_min": 45, "cpus_per_task": 2},
                },
            },
        },
    }


def _scripts(spec_data: dict[str, Any], log_dir: Path) -> dict[str, str]:
    """Every array of the grid (plus GIML training and the detached driver) as sbatch text."""
    spec = parse_spec(spec_data)
    base = executor_config(spec, None)
    out = {
        g.key: render_sbatch(g.config, log_dir=log_dir, name=f"inversions-{g.tag}",
                             elements=len(g.cells))
        for g in inversion_groups(spec, base, expand(spec).inversion_cells, size=sized_mem_gb)
    }
    for kind in ("gradients", "giml"):
        config: ExecutorConfig = executor_config(spec, None, kind)  # type: ignore[arg-type]
        out[kind] = render_sbatch(config, log_dir=log_dir, name=kind, elements=2)
    out["driver"] = driver_script(spec, spec_path=log_dir / "grid.yaml",
                                  run_path=log_dir.parent, executor=None)
    return out


def _test_only(script: str, path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(script)
    return subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)


def _option(script: str, key: str) -> str | None:
    found = re.search(rf"^#SBATCH --{key}=(.*)$", script, flags=re.M)
    return found.group(1) if found else None


def test_per_method_scripts_differ_and_pass_slurms_own_check(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    scripts = _scripts(_spec(slurm_cluster.partition, zw_mem_gb=3), tmp_path / "logs")
    assert set(scripts) == {"default", "gi-x", "gi-z/w", "gradients", "giml", "driver"}
    mem_time = {k: (_option(s, "mem"), _option(s, "time")) for k, s in scripts.items()}
    assert mem_time["gi-x"] == ("1536MB", "15")
    assert mem_time["gi-z/w"] == ("3GB", "45")
    assert mem_time["gradients"] == ("1GB", "5")
    assert _option(scripts["giml"], "cpus-per-task") == "2"
    assert (_option(scripts["driver"], "mem"), _option(scripts["driver"], "cpus-per-task")) == (
        "2GB", "1")
    assert "#SBATCH --requeue" in scripts["driver"]
    assert len({mem_time[k] for k in ("default", "gi-x", "gi-z/w", "gradients")}) == 4
    for key, script in scripts.items():
        assert _option(script, "ntasks") == "1", key
        proc = _test_only(script, tmp_path / f"{key.replace('/', '-')}.sh")
        assert proc.returncode == 0, f"{key}: sbatch --test-only refused:\n{proc.stderr}\n{script}"
        assert "to start at" in proc.stderr, proc.stderr


def test_slurms_check_refuses_what_the_node_cannot_give(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """The check above is a real one: memory beyond every node is refused by Slurm."""
    scripts = _scripts(_spec(slurm_cluster.partition, zw_mem_gb=100_000), tmp_path / "logs")
    proc = _test_only(scripts["gi-z/w"], tmp_path / "big.sh")
    assert proc.returncode != 0
    assert _test_only(scripts["gi-x"], tmp_path / "small.sh").returncode == 0
