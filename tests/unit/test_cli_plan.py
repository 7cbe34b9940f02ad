"""`gi-eval plan` and `gi-eval methods` through the real CLI (in-process, real files).

Issue 17 acceptance 2: `plan --executor slurm` resolves the executor once, so the submission
and memory lines are Slurm's, not the spec executor's. Issue 18: plan stores its estimate in
the run directory and a finished run sets its wall time against it; `methods [NAME]` shows
paper and tuned values with their provenance.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.commands import (
    Progress,
    estimate_vs_measured,
    next_tick,
    progress_interval,
)
from storage.layout import PLAN_FILE

SPEC: dict[str, Any] = {
    "name": "plan-demo",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 1},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "methods": [{"name": "gi-x", "params": {"iterations": 4, "restarts": 1}}],
    "batch_sizes": [1],
    # a CPU Slurm job with 3 GiB: a limit no machine's RAM has, so the line tells which was used
    "execution": {"executor": "inline", "slurm": {"gpus_per_task": 0, "mem_gb": 3}},
}


def _plan(tmp: Path, *extra: str) -> str:
    (tmp / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    result = CliRunner().invoke(
        app, ["plan", str(tmp / "spec.yaml"), "--out", str(tmp / "run"), *extra]
    )
    assert result.exit_code == 0, result.output
    return result.stdout


def test_plan_executor_flag_gives_slurms_submission_and_memory_lines(tmp_path: Path) -> None:
    slurm = _plan(tmp_path, "--executor", "slurm")
    assert "submission (slurm):" in slurm
    assert "limit 3.0 GiB" in slurm  # execution.slurm.mem_gb, not this machine's memory
    spec_default = _plan(tmp_path)
    assert "submission (inline):" in spec_default
    assert "limit 3.0 GiB" not in spec_default


def test_plan_stores_its_estimate_and_a_run_compares_with_it(tmp_path: Path) -> None:
    out = _plan(tmp_path, "--executor", "local")
    stored = json.loads((tmp_path / "run" / "reports" / PLAN_FILE).read_text())
    assert f"estimate stored: {tmp_path / 'run' / 'reports' / PLAN_FILE}" in out
    assert stored["executor"] == "local" and stored["cells_to_do"] == 1
    assert stored["wall_seconds"] > 0 and "gi-x" in stored["seconds_per_iteration"]
    line = estimate_vs_measured(tmp_path / "run", stored["wall_seconds"] * 3)
    assert line is not None and "(3.00x the estimate)" in line
    assert estimate_vs_measured(tmp_path / "elsewhere", 10.0) is None


def test_a_tuning_stage_gets_its_tuned_cells_priced(tmp_path: Path) -> None:
    """The plan made before tuning names untuned cells; once the tuning stage has chosen
    values (here: another lr, so other ids), the run stores an estimate for the tuned cells,
    and only when the stored one covers none of them."""
    from pipelines.commands import estimate_tuned_cells
    from pipelines.planner import build_plan

    _plan(tmp_path, "--executor", "local")
    record = tmp_path / "run" / "reports" / PLAN_FILE
    before = json.loads(record.read_text())
    tuned = {**SPEC, "methods": [{"name": "gi-x",
                                  "params": {"iterations": 4, "restarts": 1, "lr": 0.05}}]}
    (tmp_path / "tuned.yaml").write_text(yaml.safe_dump(tuned))
    grid = build_plan(tmp_path / "tuned.yaml", executor="local", out=tmp_path / "run")
    assert estimate_tuned_cells(grid) == record
    after = json.loads(record.read_text())
    assert set(after["cell_seconds"]) == set(grid.cell_ids) != set(before["cell_seconds"])
    assert after["after_tuning"] == before["created"] and after["cells_to_do"] == 1
    assert estimate_tuned_cells(grid) is None  # it covers them now: kept as it is


def test_methods_shows_paper_and_tuned_values_with_provenance() -> None:
    result = CliRunner().invoke(app, ["methods", "gi-z"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "gi-z: Jeon et al. 2021" in text and "gi-x:" not in text
    z_lr = _row(text, "z_lr")
    assert "0.03" in z_lr and "0.00929" in z_lr and "inherited from gi-z/w" in z_lr
    assert "table1_cpu.yaml" in text  # where the tuned values were chosen
    everything = CliRunner().invoke(app, ["methods"]).stdout
    lr = _row(everything, "lr")
    assert "0.016" in lr and "searched for gi-x" in lr
    assert all(f"{name}:" in everything for name in ("gi-x+bn", "gi-z/w+bn", "gi-z/x"))


def _row(table: str, param: str) -> str:
    """The first table row whose parameter column is `param`."""
    return next(line for line in table.splitlines()
                if [c.strip() for c in line.split("│")[1:2]] == [param])


def test_progress_line_and_interval(monkeypatch: Any) -> None:
    line = Progress(done=6, total=10, running=2, failed=1, done_at_start=2, elapsed_s=120).line()
    assert "progress: 6/10 cells done (4 in this run), 2 running, 1 failed" in line
    assert "2.00 cells/min" in line and "~2.0 min left" in line  # 4 left at 2 per minute
    waiting = Progress(0, 10, 0, 0, 0, 5).line()
    assert "time left unknown" in waiting
    monkeypatch.setenv("GI_PROGRESS_EVERY_S", "2.5")
    assert progress_interval() == 2.5
    monkeypatch.delenv("GI_PROGRESS_EVERY_S")
    assert progress_interval() == 30.0


def test_prefect_loggers_stay_at_info_and_project_lines_reach_the_cli() -> None:
    """Without --verbose only Prefect's console is silenced; the run loggers keep INFO, and
    lines logged by the project's own code are forwarded (without tracebacks)."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    import pipelines.commands as commands
    import pipelines.flows  # noqa: F401 - as run_grid: importing the flows sets Prefect's logging up

    shown: list[str] = []
    flow_log = logging.getLogger("prefect.flow_runs")
    with commands.prefect_logs(shown.append, verbose=False):
        assert flow_log.getEffectiveLevel() <= logging.INFO
        consoles = [h for h in logging.getLogger().handlers
                    if isinstance(h, PrefectConsoleHandler)]
        assert all(h.level > logging.CRITICAL for h in consoles)
        ours = logging.LogRecord("prefect.flow_runs", logging.INFO, commands.__file__, 1,
                                 "array inversions-0: jobs ended", None, None)
        engine = logging.LogRecord("prefect.flow_runs", logging.INFO, logging.__file__, 1,
                                   "Finished in state Completed()", None, None)
        flow_log.handle(ours)
        flow_log.handle(engine)
    flow_log.handle(ours)  # after the run: no longer forwarded
    assert len(shown) == 1 and shown[0].endswith("array inversions-0: jobs ended")


def test_progress_ticks_keep_a_fixed_schedule_and_never_burst() -> None:
    """Fake clock: on time, ticks land every interval; a tick starved past several slots
    (a loaded machine) moves the schedule on instead of firing the missed ones at once."""
    due, ticks = 0.0, []
    for now in (0.0, 30.1, 60.05, 90.2):  # each emit happens a little after its slot
        due = next_tick(due, now=now, every=30.0)
        ticks.append(due)
    assert ticks == [30.0, 60.0, 90.0, 120.0]
    late = next_tick(30.0, now=125.0, every=30.0)  # slots 60, 90 and 120 were missed
    assert late == 155.0
    assert next_tick(late, now=156.0, every=30.0) == 185.0  # and the pace resumes from there



def test_plan_reads_validates_and_expands_the_spec_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decision 221: one GridPlan per command; `gi-eval run` hands it to its flow the same way
    (measured there: one parse and one expansion per rerun)."""
    import pipelines.planner
    from tasks.spec import GridSpec

    calls: Counter[str] = Counter()
    validate, expand = GridSpec.model_validate, pipelines.planner.expand

    def counted_validate(data: Any, **kwargs: Any) -> GridSpec:
        calls["parse"] += 1
        return validate(data, **kwargs)

    def counted_expand(spec: GridSpec) -> Any:
        calls["expand"] += 1
        return expand(spec)

    monkeypatch.setattr(GridSpec, "model_validate", counted_validate)
    monkeypatch.setattr(pipelines.planner, "expand", counted_expand)
    _plan(tmp_path, "--executor", "slurm")
    assert calls == {"parse": 1, "expand": 1}
