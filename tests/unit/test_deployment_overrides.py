"""Issue 18, Deliver 4: deployment parameters that override the spec (planner.Overrides), applied
where a flow reads its spec: pipelines.planner.build_plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gi_core.errors import ConfigError
from pipelines.planner import GridPlan, Overrides, build_plan

SPEC = """\
name: o
data: {dataset: synthetic, image_size: 32, num_batches: 1}
victim: {arch: convnet, width: 4}
methods: [gi-x]
execution: {executor: slurm, max_parallel: 2, slurm: {partition: gpu, array_parallelism: 64}}
"""


def planned(tmp: Path, text: str, overrides: Overrides) -> GridPlan:
    (tmp / "spec.yaml").write_text(text)
    return build_plan(tmp / "spec.yaml", overrides=overrides)


def test_no_override_keeps_the_text(tmp_path: Path) -> None:
    plan = planned(tmp_path, SPEC, Overrides())
    spec, text = plan.spec, plan.text
    assert text == SPEC and spec.execution.slurm.partition == "gpu"


def test_overrides_reach_the_spec_and_its_frozen_text(tmp_path: Path) -> None:
    plan = planned(tmp_path, SPEC, Overrides(partition="long", max_parallel=8, budget_scale=0.25))
    spec, text = plan.spec, plan.text
    assert spec.execution.slurm.partition == "long"
    assert (spec.execution.max_parallel, spec.execution.slurm.array_parallelism) == (8, 8)
    assert spec.budgets.iterations_scale == 0.25
    frozen = yaml.safe_load(text)
    assert frozen["budgets"] == {"iterations_scale": 0.25}
    assert frozen["execution"]["slurm"] == {"partition": "long", "array_parallelism": 8}


def test_overrides_on_a_spec_without_an_execution_section(tmp_path: Path) -> None:
    bare = "\n".join(line for line in SPEC.splitlines() if not line.startswith("execution"))
    spec = planned(tmp_path, bare, Overrides(partition="cpu")).spec
    assert spec.execution.slurm.partition == "cpu"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [(Overrides(max_parallel=0), "execution.max_parallel"),
     (Overrides(budget_scale=0.0), "budgets.iterations_scale")],
)
def test_a_bad_override_names_the_spec_field(
    overrides: Overrides, field: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=field):
        planned(tmp_path, SPEC, overrides)
