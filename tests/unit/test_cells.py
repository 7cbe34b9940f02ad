"""Cell expansion and ids: dedup, stability (order, spelling, processes), sensitivity."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gi_core.errors import ConfigError
from storage.metrics import ROW_COLUMNS
from tasks.cells import GradientCell, InversionCell, Plan, expand
from tasks.spec import parse_spec


def spec_dict(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "t",
        "data": {"dataset": "synthetic", "image_size": 32, "num_batches": 2},
        "victim": {"arch": "lenet", "seed": 0},
        "generator": {"kind": "dcgan32"},
        "methods": ["gi-x", {"name": "gi-z/w", "params": {"restarts": 2}}],
        "defenses": [{"kind": "none"}, {"kind": "sparsity", "p": [0.5, 0.9]}],
        "batch_sizes": [1, 4],
        "seeds": [0],
    }
    return {**spec, **over}


def plan_of(**over: Any) -> Plan:
    return expand(parse_spec(spec_dict(**over)))


def ids(plan: Plan) -> list[str]:
    return [c.id for c in plan.inversion_cells]


def test_expansion_counts_and_gradient_sharing() -> None:
    plan = plan_of()
    assert len(plan.gradient_cells) == 2 * 2 * 3  # batch sizes x batches x defense levels
    assert len(plan.inversion_cells) == 12 * 2  # x methods x seeds
    gids = {g.id for g in plan.gradient_cells}
    assert len(gids) == 12
    users: dict[str, set[str]] = {}
    for cell in plan.inversion_cells:
        users.setdefault(cell.gradient_id, set()).add(cell.method)
    assert set(users) == gids and all(m == {"gi-x", "gi-z/w"} for m in users.values())


def test_batches_are_disjoint_and_duplicates_collapse() -> None:
    plan = plan_of(
        methods=["gi-x", "gi-x"],
        seeds=[0, 0],
        batch_sizes=[4, 4],
        defenses=[{"kind": "none"}, {"kind": "none"}],
    )
    assert len(plan.gradient_cells) == 2 and len(plan.inversion_cells) == 2
    a, b = (set(g.indices) for g in plan.gradient_cells)
    assert len(a) == len(b) == 4 and not a & b


def test_ids_ignore_order_spelling_and_execution_settings() -> None:
    reference = ids(plan_of())
    reordered = {k: v for k, v in reversed(list(spec_dict().items()))}
    reordered["methods"] = ["gi-x", {"params": {"restarts": 2}, "name": "gi-z/w"}]
    assert ids(expand(parse_spec(reordered))) == reference
    assert (
        ids(
            plan_of(
                name="other",
                execution={"executor": "slurm", "cells_per_job": 9},
                storage={"keep_restarts": True},
                defenses=[{"kind": "none"}, {"kind": "sparsity", "p": ["5e-1", 0.90]}],
            )
        )
        == reference
    )
    # Defaults are part of the config, so spelling them out changes nothing.
    assert (
        ids(
            plan_of(
                methods=[
                    {"name": "gi-x", "params": {"iterations": 4000, "lr": 1e-1}},
                    {"name": "gi-z/w", "params": {"restarts": 2}},
                ]
            )
        )
        == reference
    )


@pytest.mark.parametrize(
    "change",
    [
        {"seeds": [1]},
        {"victim": {"arch": "lenet", "seed": 1}},
        {"victim": {"arch": "lenet", "width": 8}},
        {"data": {"dataset": "synthetic", "image_size": 64, "num_batches": 2}},
        {"generator": {"kind": "dcgan64"}},
        {"methods": ["gi-x", {"name": "gi-z/w", "params": {"restarts": 3}}]},
        {"budgets": {"iterations_scale": 0.5}},
    ],
)
def test_every_result_field_changes_the_ids(change: dict[str, Any]) -> None:
    # Compared on the gi-z/w cells, which every change above affects (gi-x ignores the
    # generator and gi-z/w's params; see the next test).
    def gias_ids(plan: Plan) -> set[str]:
        return {c.id for c in plan.inversion_cells if c.method == "gi-z/w"}

    reference, changed = gias_ids(plan_of()), gias_ids(plan_of(**change))
    assert len(changed) == len(reference) and not changed & reference


def test_generator_only_changes_generator_methods() -> None:
    a, b = plan_of(), plan_of(generator={"kind": "dcgan64"})
    same = {
        c.method for c, d in zip(a.inversion_cells, b.inversion_cells, strict=True) if c.id == d.id
    }
    assert same == {"gi-x"}
    assert all(c.generator is None for c in a.inversion_cells if c.method == "gi-x")


def test_defense_levels_and_metric_axes() -> None:
    plan = plan_of(
        defenses=[
            {"kind": "none"},
            {"kind": "dp", "clip": 2, "sigma": [0.1, 0.2]},
            {"kind": "quantize", "bits": 8},
        ],
        batch_sizes=[1],
    )
    levels = [(g.defense.kind, g.defense.level) for g in plan.gradient_cells[:4]]
    assert levels == [("none", 0.0), ("dp", 0.1), ("dp", 0.2), ("quantize", 8.0)]
    assert plan.gradient_cells[1].defense.clip == 2.0
    axes = plan.inversion_cells[3].metric_axes()
    assert axes["defense"] == "dp" and axes["defense_level"] == 0.1 and axes["method"] == "gi-z/w"
    assert set(axes) <= set(ROW_COLUMNS) | {"method"}
    assert axes["cell_id"] == plan.inversion_cells[3].id


def test_iteration_budget_scales_every_iteration_count() -> None:
    plan = plan_of(budgets={"iterations_scale": 0.01})
    configs = {c.method: c.config_dict for c in plan.inversion_cells}
    assert configs["gi-x"]["iterations"] == 40
    counts = {k: v for k, v in configs["gi-z/w"].items() if k.endswith("iterations")}
    assert counts and all(v == 40 for v in counts.values())
    assert configs["gi-z/w"]["restarts"] == 2 and configs["gi-x"]["restarts"] == 4


def test_describe_round_trips_and_detects_changed_schemas() -> None:
    cell = plan_of().inversion_cells[-1]
    described = json.loads(json.dumps(cell.describe()))
    back = InversionCell.from_dict(described)
    assert back == cell and back.config == cell.config
    assert back.gradient.indices == cell.gradient.indices
    assert GradientCell.from_dict(described["gradient"]) == cell.gradient
    described["config"]["restarts"] = 7
    with pytest.raises(ConfigError, match="stored cell id"):
        InversionCell.from_dict(described)




def test_hundred_thousand_cells_expand() -> None:
    # Expansion speed is a benchmark target (benchmarks/performance.py), never a test assertion.
    spec = parse_spec(
        spec_dict(
            data={"dataset": "synthetic", "image_size": 32, "num_batches": 50},
            methods=["gi-x", "gi-x+bn", "gi-z", "gi-w", "gi-z/w", "gi-z/x", "gi-z+bn", "gi-z/w+bn"],
            defenses=[{"kind": "sparsity", "p": [i / 25 for i in range(25)]}],
            batch_sizes=[1],
            seeds=list(range(10)),
        )
    )
    plan = expand(spec)
    assert len(plan.inversion_cells) == 100_000 and len(plan.gradient_cells) == 1250
    assert len({c.id for c in plan.inversion_cells}) == 100_000
