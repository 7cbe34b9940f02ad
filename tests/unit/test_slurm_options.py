"""Issue 13: Slurm options from the spec reach the sbatch script submitit writes (golden file).

The script is rendered by submitit itself from the parameters the executor adapter passes;
docs/slurm.md shows the same script.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from gi_core.errors import ConfigError
from pipelines.flows import executor_config
from tasks.executors import _sbatch_parameters
from tasks.spec import parse_spec

SPEC: dict[str, Any] = {
    "name": "table1",
    "data": {"dataset": "lfw-faces"},
    "victim": {"arch": "convnet"},
    "methods": ["gi-x"],
    "execution": {
        "executor": "slurm",
        "slurm": {
            "partition": "gpu", "gpus_per_task": 1, "cpus_per_task": 4, "mem_gb": 16,
            "timeout_min": 60, "array_parallelism": 64,
            "constraint": "a100|h100", "gres": "gpu:a100:1", "exclude": "node[07-08]",
            "setup": ["module load cuda/12.4", "source ~/venvs/gi/bin/activate"],
            "srun_args": ["--cpu-bind=none"], "max_num_timeout": 5, "signal_delay_s": 120,
        },
    },
}
EXPECTED = """#!/bin/bash

# Parameters
#SBATCH --array=0-99%64
#SBATCH --constraint='a100|h100'
#SBATCH --cpus-per-task=4
#SBATCH --error=/runs/table1/logs/%A_%a_0_log.err
#SBATCH --exclude='node[07-08]'
#SBATCH --gres=gpu:a100:1
#SBATCH --job-name=table1-inversions-0
#SBATCH --mem=16GB
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --open-mode=append
#SBATCH --output=/runs/table1/logs/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --signal=USR2@120
#SBATCH --time=60
#SBATCH --wckey=submitit

# setup
module load cuda/12.4
source ~/venvs/gi/bin/activate

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /runs/table1/logs/%A_%a_%t_log.out \
--error /runs/table1/logs/%A_%a_%t_log.err --cpu-bind=none \
python -u -m submitit.core._submit /runs/table1/logs
""".replace("\\\n", "")


def render(spec: dict[str, Any]) -> str:
    config = executor_config(parse_spec(spec), None)
    params = _sbatch_parameters(config, name="inversions-0")
    return _make_sbatch_string(
        command="python -u -m submitit.core._submit /runs/table1/logs",
        folder="/runs/table1/logs", map_count=100, **params,
    )


def test_spec_options_render_into_the_sbatch_script() -> None:
    assert render(SPEC) == EXPECTED


def test_requeue_budget_and_job_name_prefix_reach_the_executor() -> None:
    config = executor_config(parse_spec(SPEC), None)
    assert config.max_num_timeout == 5 and config.job_name_prefix == "table1"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("gres", "gpu 1", "one non-empty word"),
        ("gres", "gpu::1", "name[:type]:count"),
        ("constraint", "a100'; rm", "one non-empty word"),
        ("signal_delay_s", 5, "greater than or equal to 10"),
        ("max_num_timeout", -1, "greater than or equal to 0"),
    ],
)
def test_bad_slurm_options_name_the_field(field: str, value: Any, message: str) -> None:
    bad = {**SPEC, "execution": {"executor": "slurm", "slurm": {field: value}}}
    with pytest.raises(ConfigError, match=rf"execution\.slurm\.{field}: .*{re.escape(message)}"):
        parse_spec(bad)
