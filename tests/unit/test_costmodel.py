"""The cost model behind `gi-eval plan` (issue 12): no attacks, numbers labelled by source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipelines.commands import plan_report
from pipelines.costmodel import cell_cost, estimate, forward_gflop, iterations, target_device
from tasks.cells import expand
from tasks.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]


def _spec(**over: Any) -> Any:
    spec: dict[str, Any] = {
        "name": "t",
        "data": {"dataset": "synthetic", "image_size": 32, "num_batches": 2},
        "victim": {"arch": "convnet", "width": 16, "seed": 0},
        "generator": {"kind": "dcgan32"},
        "methods": [
            {"name": "gi-x", "params": {"iterations": 100, "restarts": 2}},
            {"name": "gi-z/w", "params": {"z_iterations": 50, "w_iterations": 50}},
        ],
        "defenses": [{"kind": "none"}],
        "batch_sizes": [4],
        "seeds": [0],
        "execution": {"executor": "local", "max_parallel": 2},
    }
    return parse_spec({**spec, **over})


ROW = {"device": "cpu", "victim": "convnet", "image_size": 32, "mode": "engine"}
TABLE = [
    {
        **ROW,
        "family": "gi-x",
        "batch": 1,
        "restarts": 4,
        "seconds_per_iteration": 0.02,
        "forward_gflop": forward_gflop("convnet", 16, 32),
    },
    {
        **ROW,
        "family": "gi-z/w",
        "batch": 1,
        "restarts": 4,
        "seconds_per_iteration": 0.04,
        "forward_gflop": forward_gflop("convnet", 16, 32),
    },
]


def test_table_rows_are_scaled_by_images_times_restarts() -> None:
    spec = _spec()
    cells = expand(spec).inversion_cells
    gi_x = next(c for c in cells if c.method == "gi-x")
    cost = cell_cost(gi_x, device="cpu", table=TABLE, run={}, calibrated={})
    assert cost.source == "measured (table)"
    assert cost.seconds_per_iteration == pytest.approx(0.02 * (4 * 2) / (1 * 4))
    result = estimate(spec, cells, table=TABLE)
    expected = 2 * (0.04 * 100) + 2 * (0.04 * (4 * 4) / 4 * 100)  # 2 batches per method
    assert result.seconds == pytest.approx(expected)
    assert result.wall_seconds == pytest.approx(expected / 2)  # max_parallel = 2
    assert result.device == "cpu" and result.unknown == 0
    text = "\n".join(result.lines())
    assert "CPU core-hours" in text and "measured (table)" in text


def test_fedavg_cells_pay_for_their_local_steps_and_aggregates_for_their_clients() -> None:
    """The table holds FedSGD rows: K local steps of b images cost K·b/B gradients of the batch;
    an aggregate's N clients are already in its indices (N x B images)."""
    protocols = [
        {"kind": "fedsgd"},
        {"kind": "fedavg", "local_steps": [4], "local_batch_size": 1},
        {"kind": "fedavg", "local_steps": [3]},
        {"kind": "aggregate", "n_clients": [2]},
    ]
    spec = _spec(protocols=protocols, data={**_spec().data.model_dump(), "num_batches": 1})
    gi_x = [c for c in expand(spec).inversion_cells if c.method == "gi-x"]
    price = {
        c.gradient.protocol.kind + str(c.gradient.protocol.local): cell_cost(
            c, device="cpu", table=TABLE, run={}, calibrated={}
        ).seconds_per_iteration
        for c in gi_x
    }
    fedsgd = price["fedsgdNone"]
    assert fedsgd == pytest.approx(0.02 * (4 * 2) / 4)
    by_local = {k: v / fedsgd for k, v in price.items() if k.startswith("fedavg")}
    assert sorted(by_local.values()) == pytest.approx([4 * 1 / 4, 3 * 4 / 4])
    assert price["aggregateNone"] == pytest.approx(2 * fedsgd)


def test_closed_form_cells_are_counted_not_priced_at_zero() -> None:
    spec = _spec(
        victim={"arch": "rgapnet", "seed": 0},
        methods=[{"name": "rgap"}, {"name": "gi-x", "params": {"iterations": 10}}],
        batch_sizes=[1],
    )
    cells = expand(spec).inversion_cells
    result = estimate(spec, cells, table=TABLE)
    assert result.closed_form == {"rgap": 2}
    assert set(result.cell_seconds) == {c.id for c in cells if c.method == "gi-x"}
    text = "\n".join(result.lines())
    assert "2 rgap cells are closed form" in text and "not priced" in text


def test_unmeasured_victims_scale_by_flops_and_the_run_s_own_timings_win() -> None:
    spec = _spec(victim={"arch": "lenet", "seed": 0})
    cell = next(c for c in expand(spec).inversion_cells if c.method == "gi-x")
    cost = cell_cost(cell, device="cpu", table=TABLE, run={}, calibrated={})
    ratio = forward_gflop("lenet", None, 32) / forward_gflop("convnet", 16, 32)
    assert cost.source == "scaled by FLOPs"
    assert cost.seconds_per_iteration == pytest.approx(0.02 * ratio * 8 / 4)
    own = cell_cost(cell, device="cpu", table=TABLE, run={"gi-x": 0.5}, calibrated={"gi-x": 9})
    assert (own.seconds_per_iteration, own.source) == (0.5, "measured (this run)")
    calibrated = cell_cost(cell, device="cpu", table=TABLE, run={}, calibrated={"gi-x": 9.0})
    assert calibrated.source == "calibrated"


def test_gpu_targets_without_gpu_rows_say_so_instead_of_guessing() -> None:
    slurm = {"executor": "slurm", "slurm": {"gpus_per_task": 1, "array_parallelism": 8}}
    spec = _spec(execution=slurm)
    assert target_device(spec, None) == "cuda"
    result = estimate(spec, expand(spec).inversion_cells, table=TABLE)
    assert result.unknown == len(expand(spec).inversion_cells) and result.seconds == 0
    assert "no cuda measurement" in result.lines()[0]
    assert iterations(expand(spec).inversion_cells[1].config) == 100


def test_plan_report_runs_no_attack_and_labels_its_numbers(tmp_path: Path) -> None:
    report = plan_report(ROOT / "grids" / "smoke.yaml", tmp_path / "run", calibrate=False)
    assert "cells: 8 total, 0 done" in report
    assert "estimate" in report
    if (ROOT / "docs" / "results" / "performance.json").is_file():
        assert "measured (table" in report or "scaled by FLOPs" in report
    # planning creates no run (no grid.yaml, no cells): only its stored estimate
    made = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "run").rglob("*"))
    assert made == ["run/reports", "run/reports/plan.json"]


@pytest.mark.slow  # times every method of the smoke grid (a few short attacks)
def test_calibrate_runs_one_job_on_the_target_executor(tmp_path: Path) -> None:
    report = plan_report(
        ROOT / "grids" / "smoke.yaml", tmp_path / "run", calibrate=True, executor="inline"
    )
    assert "gi-x: " in report and "(calibrated)" in report


STAGES = [
    {**ROW, "stage": s, "batch": 4, "restarts": 1, "seconds_per_iteration": p, "threads": 1}
    for s, p in (("x", 0.02), ("z", 0.05), ("w", 0.2))
]


def test_stage_rows_price_each_stage_and_weigh_them_by_iterations() -> None:
    """GIAS = z iterations at the z price + w iterations at the w price; GI-z and GI-w no longer
    share one family price; a method with an unlisted stage (GIFD's f) keeps its family row."""
    spec = _spec(
        batch_sizes=[2],
        methods=[
            {"name": "gi-x", "params": {"iterations": 10, "restarts": 2}},
            {"name": "gi-z", "params": {"z_iterations": 10, "restarts": 1}},
            {"name": "gi-w", "params": {"w_iterations": 10, "restarts": 1}},
            {"name": "gi-z/w", "params": {"z_iterations": 30, "w_iterations": 10, "restarts": 1}},
            {"name": "gifd", "params": {"z_iterations": 5, "f_iterations": 5, "restarts": 1}},
        ],
    )
    cells = {c.method: c for c in expand(spec).inversion_cells}
    table = TABLE + STAGES
    price = {
        m: cell_cost(c, device="cpu", table=table, run={}, calibrated={}) for m, c in cells.items()
    }
    work = 2 / 4  # B = 2, R = 1 against the rows' B = 4, R = 1
    assert price["gi-x"].seconds_per_iteration == pytest.approx(0.02 * 2 * work)  # R = 2
    assert price["gi-z"].seconds_per_iteration == pytest.approx(0.05 * work)
    assert price["gi-w"].seconds_per_iteration == pytest.approx(0.2 * work)
    gias = (30 * 0.05 + 10 * 0.2) / 40 * work
    assert price["gi-z/w"].seconds_per_iteration == pytest.approx(gias)
    assert "by stage" in price["gi-z/w"].source
    assert price["gifd"].source == "measured (table)"  # family row: 0.04 per B x R of 4
    assert price["gifd"].seconds_per_iteration == pytest.approx(0.04 * 2 / 4)
    # another victim has no stage row: the family row, scaled by FLOPs
    lenet = _spec(victim={"arch": "lenet", "seed": 0})
    cell = next(c for c in expand(lenet).inversion_cells if c.method == "gi-z/w")
    assert cell_cost(cell, device="cpu", table=table, run={}, calibrated={}).source == (
        "scaled by FLOPs"
    )
