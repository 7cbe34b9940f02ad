"""Estimate against measured (issue 18, Deliver 5): the report's reports/estimate.md.

`gi-eval plan` stores its estimate in reports/plan.json, with each cell's estimated attack
seconds (pipelines.costmodel). The report sets it against what happened:
* per method: the estimated seconds of the committed cells against their recorded attack
  seconds (the metrics rows' `wall_seconds`: the attack and its loading, not the metrics);
* per job array: the estimated wall time of its cells (their seconds over min(parallel jobs,
  elements), as the plan computed it for the grid) against the time from the array's
  submission to the end of its last job (the job records' `submitted`/`ended`, tasks.jobs).
Only cells with both an estimate and a measurement are compared; the rest are counted. A ratio
is measured / estimated: above 1 the estimate was optimistic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from storage import records
from storage.run import RunDir
from tasks.jobs import ArrayRecord, array_records

FILE = "estimate.md"  # under the run's reports/


@dataclass(frozen=True)
class Row:
    name: str
    cells: int
    estimated: float | None  # seconds; None: the cost model has no number for these cells
    measured: float | None  # seconds; None: not measured (array still running, no times)

    @property
    def ratio(self) -> float | None:
        if self.estimated is None or self.measured is None or self.estimated <= 0:
            return None
        return self.measured / self.estimated


@dataclass(frozen=True)
class Comparison:
    created: str  # when `gi-eval plan` made the estimate
    executor: str
    parallel: int
    methods: list[Row]
    arrays: list[Row]
    unestimated: int  # committed cells the stored plan has no estimate for

    @property
    def total(self) -> Row:
        est = sum(r.estimated or 0.0 for r in self.methods)
        meas = sum(r.measured or 0.0 for r in self.methods)
        return Row("all methods", sum(r.cells for r in self.methods), est, meas)


def compare(run: RunDir) -> Comparison | None:
    """The comparison of `run`, or None without a usable stored estimate (no `gi-eval plan`
    before the run, a plan from before per-cell estimates, or a damaged plan.json: logged)."""
    plan = records.read_json(run.reports_dir / records.PLAN_FILE, records.is_plan_record)
    if not plan or not plan.get("cell_seconds") or not run.committed_cells():
        return None
    estimated: dict[str, float] = {k: float(v) for k, v in plan["cell_seconds"].items()}
    df = run.metrics(columns=["cell_id", "method", "wall_seconds"]).drop_duplicates("cell_id")
    known = df[df["cell_id"].isin(estimated.keys())]
    parallel = max(1, int(plan.get("parallel_jobs", 1)))
    return Comparison(
        created=_created(plan),
        executor=str(plan["executor"]),
        parallel=parallel,
        methods=method_rows(known, estimated),
        arrays=array_rows(array_records(run), estimated, parallel=parallel),
        unestimated=len(df) - len(known),
    )


def _created(plan: Mapping[str, object]) -> str:
    created = str(plan.get("created", "?"))
    if "after_tuning" in plan:  # commands.estimate_tuned_cells
        return f"{created}, re-priced for the tuned cells (plan of {plan['after_tuning']})"
    return created


def method_rows(df: pd.DataFrame, estimated: Mapping[str, float]) -> list[Row]:
    """Per method: summed estimated seconds against summed recorded attack seconds."""
    rows = []
    for method, group in df.groupby("method", sort=True):
        est = sum(estimated[c] for c in group["cell_id"])
        rows.append(Row(str(method), len(group), est, float(group["wall_seconds"].sum())))
    return rows


def array_rows(
    arrays: Sequence[ArrayRecord], estimated: Mapping[str, float], *, parallel: int
) -> list[Row]:
    """Per job array: estimated wall (its cells' seconds over the jobs that run at once)
    against submission to end. Gradient arrays have no estimate (the cost model leaves
    gradient cells out: ~1 iteration each) but their time is shown: it is part of the run."""
    rows = []
    for a in arrays:
        mine = [estimated[c] for c in a.cells if c in estimated]
        est = sum(mine) / min(parallel, a.elements) if mine else None
        wall = a.ended - a.submitted if a.ended is not None and a.submitted is not None else None
        rows.append(Row(a.name, len(a.cells), est, wall))
    return rows


def markdown(c: Comparison) -> str:
    lines = [
        "## Estimate against measured",
        "",
        f"`gi-eval plan` estimate of {c.created} ({c.executor} executor, {c.parallel} "
        "parallel job(s)); ratio = measured / estimated.",
        "",
        "Per method (attack seconds summed over the committed cells):",
        "",
        *_table("method", [*c.methods, c.total]),
        "",
    ]
    if c.arrays:
        lines += [
            "Per job array (wall seconds from submission to the end of its last job; estimate: "
            "its cells' seconds over min(parallel jobs, elements)):",
            "",
            *_table("array", c.arrays),
            "",
        ]
    else:
        lines += ["No job records: the cells ran inside the driver (inline executor).", ""]
    if c.unestimated:
        lines += [f"{c.unestimated} committed cell(s) have no stored estimate (planned before "
                  "they were part of the grid, or run without `gi-eval plan`): not compared.", ""]
    return "\n".join(lines)


def _table(what: str, rows: Sequence[Row]) -> list[str]:
    out = [f"| {what} | cells | estimated s | measured s | ratio |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r.name} | {r.cells} | {_num(r.estimated)} | {_num(r.measured)} | "
            f"{'—' if r.ratio is None else f'{r.ratio:.2f}x'} |"
        )
    return out


def _num(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def write(run: RunDir) -> Comparison | None:
    """Write reports/estimate.md; None (and no file) without a stored estimate."""
    comparison = compare(run)
    path = run.reports_dir / FILE
    if comparison is None:
        path.unlink(missing_ok=True)  # never a stale comparison
        return None
    path.write_text(markdown(comparison))
    return comparison


def summary(c: Comparison) -> str:
    """One line for the report's provenance."""
    t = c.total
    ratio = "" if t.ratio is None else f" ({t.ratio:.2f}x)"
    return (
        f"{_num(t.estimated)} s of attack time estimated by `gi-eval plan` for {t.cells} "
        f"cell(s), {_num(t.measured)} s measured{ratio}; per method and array: {FILE}"
    )
