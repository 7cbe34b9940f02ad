"""Issue 18, Deliver 4: deployment parameters that override the spec (pipelines.flows.Overrides)."""

from __future__ import annotations

import pytest
import yaml

from gi_core.errors import ConfigError
from pipelines.flows import Overrides

SPEC = """\
name: o
data: {dataset: synthetic, image_size: 32, num_batches: 1}
victim: {arch: convnet, width: 4}
methods: [gi-x]
execution: {executor: slurm, max_parallel: 2, slurm: {partition: gpu, array_parallelism: 64}}
"""


def test_no_override_keeps_the_text() -> None:
    spec, text = Overrides().apply(SPEC)
    assert text == SPEC and spec.execution.slurm.partition == "gpu"


def test_overrides_reach_the_spec_and_its_frozen_text() -> None:
    spec, text = Overrides(partition="long", max_parallel=8, budget_scale=0.25).apply(SPEC)
    assert spec.execution.slurm.partition == "long"
    assert (spec.execution.max_parallel, spec.execution.slurm.array_parallelism) == (8, 8)
    assert spec.budgets.iterations_scale == 0.25
    frozen = yaml.safe_load(text)
    assert frozen["budgets"] == {"iterations_scale": 0.25}
    assert frozen["execution"]["slurm"] == {"partition": "long", "array_parallelism": 8}


def test_overrides_on_a_spec_without_an_execution_section() -> None:
    bare = "\n".join(line for line in SPEC.splitlines() if not line.startswith("execution"))
    spec, _ = Overrides(partition="cpu").apply(bare)
    assert spec.execution.slurm.partition == "cpu"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [(Overrides(max_parallel=0), "execution.max_parallel"),
     (Overrides(budget_scale=0.0), "budgets.iterations_scale")],
)
def test_a_bad_override_names_the_spec_field(overrides: Overrides, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        overrides.apply(SPEC)
