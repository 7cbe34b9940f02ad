"""What the CLI commands do (kept apart from typer so tests can call them directly)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gi_core.errors import ConfigError
from pipelines import report_estimate
from pipelines.background import while_running
from pipelines.calibrate import calibrate_on_executor
from pipelines.costmodel import Estimate, duration, estimate
from pipelines.learned_costs import LearnedPrices
from pipelines.memory import check_memory, memory_lines
from pipelines.planner import (
    GridPlan,
    build_plan,
    grid_status,
    handing_over,
    stored_timings,
    submission_shape,
)
from storage import records
from storage.atomic import write_bytes_atomic
from storage.errors import EnvironmentProblem
from storage.lock import driver_lock
from storage.run import GRID_FILE, RunDir, existing_run
from storage.verify import scan, verify_and_repair
from tasks.cells import expand
from tasks.jobs import (
    active_records,
    job_cell_counts,
    pending_records,
    queued_cells,
    request_cancel,
    stop_jobs,
)
from tasks.preflight import check_before_submission, prepare_resume
from tasks.spec import spec_from_yaml


def plan_report(
    spec_path: Path, out: Path | None, *, calibrate: bool, executor: str | None = None
) -> str:
    """Counts, cost and submission shape in seconds: the cost comes from the cost model
    (pipelines.costmodel), never from attacks on this machine; `calibrate` runs one
    calibration job on the target executor first. The executor is resolved once (the flag
    over the spec) and every line uses it; the estimate is stored as reports/plan.json."""
    grid = build_plan(spec_path, executor=executor, out=out)
    spec, kind, run_path, run = grid.spec, grid.executor, grid.run_path, grid.existing()
    queued = queued_cells(run) if run else set()
    status = grid.status(queued=queued)
    todo = status.todo
    calibrated = {}
    if calibrate and todo:
        from pipelines.flows import executor_config  # Prefect: imported only when needed

        log_dir = run.logs_dir if run else Path(tempfile.gettempdir())
        calibrated = calibrate_on_executor(
            status.plan, executor_config(spec, kind), log_dir=log_dir
        )
    cost = estimate(
        spec,
        todo,
        executor=kind,
        run_timings=stored_timings(run),
        calibrated=calibrated,
        learned=LearnedPrices.from_user_file(),
    )
    per_job = spec.execution.cells_per_job
    grad_shape = submission_shape(len(status.gradients_todo), per_job=per_job)
    shape = submission_shape(len(todo), per_job=per_job)
    stored = store_plan(run_path, kind=kind, cells=len(todo), cost=cost)
    lines = [
        f"grid {spec.name!r} -> {run_path}",
        f"cells: {len(status.plan.inversion_cells)} total, {status.done} done, "
        f"{len(queued)} in queue, {len(todo)} to do",
        f"gradients: {len(status.plan.gradient_cells)} total, "
        f"{len(status.gradients_todo)} to generate",
        *cost.lines(),
        f"submission ({kind}): gradients {grad_shape.describe()}; "
        f"inversions {shape.describe()}; {grad_shape.sbatch_calls + shape.sbatch_calls} "
        "sbatch call(s) in all",
        *memory_lines(spec, todo or status.plan.inversion_cells, executor=kind),
        f"estimate stored: {stored}" if stored else "estimate not stored (run directory "
        "not writable)",
    ]
    return "\n".join(lines)


def estimate_tuned_cells(grid: GridPlan) -> Path | None:
    """A tuning stage puts its chosen values into the evaluated cells, and so into their ids:
    the estimate `gi-eval plan` stored before tuning names none of them, and the report could
    set nothing against it. When the stored estimate covers none of the cells to do, price
    them the same way (the cost model, learned prices; no cell of theirs has run) and store
    that, marked `after_tuning`. None when there is nothing to replace."""
    run = grid.existing()  # None before its first round: `plan` writes only reports/
    stored = records.read_json(grid.layout.plan_record, records.is_plan_record)
    todo = grid.status(queued=queued_cells(run) if run else set()).todo
    if not stored or not todo or set(stored.get("cell_seconds") or {}) & {c.id for c in todo}:
        return None
    cost = estimate(grid.spec, todo, executor=grid.executor,
                    run_timings=stored_timings(run), learned=LearnedPrices.from_user_file())
    return store_plan(grid.run_path, kind=grid.executor, cells=len(todo), cost=cost,
                      after_tuning=str(stored.get("created", "?")))


def store_plan(
    run_path: Path, *, kind: str, cells: int, cost: Estimate, after_tuning: str | None = None
) -> Path | None:
    """Write the estimate to RUN/reports/plan.json so that a finished `gi-eval run` can set
    the measured wall time against it; None where the run directory cannot be written."""
    path = RunDir(run_path).plan_record
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "executor": kind,
        "device": cost.device,
        "cells_to_do": cells,
        "device_seconds": cost.seconds,
        "wall_seconds": cost.wall_seconds,
        "parallel_jobs": cost.parallel,
        "seconds_per_iteration": cost.sources,
        "cells_without_estimate": cost.unknown,
        # per cell: what the report sets against each method's and array's measured seconds
        "cell_seconds": cost.cell_seconds,
    }
    if after_tuning is not None:  # the tuned cells of the plan made then (estimate_tuned_cells)
        record["after_tuning"] = after_tuning
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, (json.dumps(record, indent=2) + "\n").encode())
    except OSError:
        return None  # plan reads; a read-only run still gets its estimate printed
    return path


def estimate_vs_measured(run_path: Path, wall_s: float) -> str | None:
    """'plan estimated ~X for N cells; measured Y (ratio)' from reports/plan.json, if any."""
    path = RunDir(run_path).plan_record
    try:
        record = json.loads(path.read_text())
        estimated, cells = float(record["wall_seconds"]), int(record["cells_to_do"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no plan stored (or unreadable): nothing to compare with
    if estimated <= 0 or cells == 0:
        return None
    return (
        f"`gi-eval plan` estimated ~{estimated:.3g} s of attack wall time for {cells} cell(s) "
        f"({record.get('created', '?')}); measured {wall_s:.3g} s, startup, gradients and "
        f"report included ({wall_s / estimated:.2f}x the estimate)"
    )


def run_grid(
    spec_path: Path,
    *,
    executor: str | None,
    out: Path | None,
    verbose: bool,
    wait: bool = False,
    notify: Callable[[str], None] = print,
) -> str:
    """`gi-eval run SPEC`: build the grid's plan (pipelines.planner.build_plan) and run it."""
    grid = build_plan(spec_path, executor=executor, out=out)
    return run_plan(grid, verbose=verbose, wait=wait, notify=notify)


def run_plan(
    grid: GridPlan,
    *,
    verbose: bool,
    wait: bool = False,
    notify: Callable[[str], None] = print,
) -> str:
    """Validate, then run the evaluation-grid flow with a progress bar; returns the table.

    Everything checkable is checked before Prefect starts or a job is submitted (spec, data,
    checkpoints, writable run directory, free space). The run directory is then locked for this
    driver (`wait`: queue behind another one), temp files of crashed writers are removed and
    unusable stored cells go to quarantine so that this run recomputes them. The flow gets
    `grid` itself (planner.handing_over): the spec is read and its cells expanded once."""
    from pipelines.flows import evaluation_grid, executor_config

    spec, kind, run_path = grid.spec, grid.executor, grid.run_path
    executor_config(spec, kind)
    progress_interval()  # a bad GI_PROGRESS_EVERY_S is refused before anything starts
    check_out_dir(run_path)
    check_slurm_commands(kind)
    # expanding checks data set sizes, generator and method params; its ids feed the progress bar
    cell_ids = set(grid.cell_ids)
    existing = grid.existing()
    todo = grid.status().todo if existing else grid.cells.inversion_cells
    check_before_submission(run_path, todo, [c.gradient for c in todo],
                            keep_restarts=spec.storage.keep_restarts)
    check_memory(spec, todo, executor=kind)  # exit 2 if too big
    run_path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    waiting = "waiting for the other `gi-eval run` on {} ({}) to finish (--wait)"
    with driver_lock(
        run_path,
        wait=wait,
        on_wait=lambda h: notify(waiting.format(run_path, h.describe() if h else "?")),
    ) as stale:
        if stale is not None:
            notify(f"{run_path}: the previous driver ({stale.describe()}) was killed; resuming")
        grid = grid.opened()
        assert grid.run is not None
        for line in prepare_resume(grid.run, grid.cells):
            notify(line)
        with (
            prefect_logs(notify, verbose=verbose),
            _progress(cell_ids, run_path, notify),
            handing_over(grid),
        ):
            # kind is one of the flow's Literal kinds: resolve_executor checked it
            table_path = evaluation_grid(  # type: ignore[call-overload]
                str(grid.spec_path), kind, str(run_path)
            )
    wall = time.perf_counter() - start
    figure = grid.layout.report_file("reconstructions.png")
    html = grid.layout.report_file("report.html")
    versus = estimate_vs_measured(run_path, wall)
    per_method = grid.layout.report_file(report_estimate.FILE)  # written by the report
    return (
        Path(table_path).read_text()
        + f"\nfigure: {figure}\nreport: {html}\n{run_path}: done in {wall:.1f} s\n"
        + (f"{versus}\n" if versus else "")
        + (f"\n{per_method.read_text()}" if versus and per_method.is_file() else "")
    )


def check_out_dir(path: Path, *, option: str = "--out") -> None:
    """An output path (`option`) must not lie under a file; --out must also not be a file."""
    if option == "--out" and path.exists() and not path.is_dir():
        raise ConfigError(f"{option}: {path} is a file, not a directory; choose a directory path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"{option}: {path} lies under {parent}, which is a file; choose a path "
                    "whose parents are directories"
                )
            return


def check_slurm_commands(kind: str) -> None:
    """The Slurm executor needs sbatch and srun on PATH: a machine problem (exit 3), found
    before anything is planned or written."""
    missing = [c for c in ("sbatch", "srun") if kind == "slurm" and shutil.which(c) is None]
    if missing:
        raise EnvironmentProblem(
            f"executor slurm: {' and '.join(missing)} not found on PATH; run from a Slurm login "
            "node (or load its module), or use --executor local"
        )


PROGRESS_ENV = "GI_PROGRESS_EVERY_S"  # seconds between progress lines without a terminal
PROGRESS_EVERY_S = 30.0
# Where a log record's code lives decides whether the CLI shows it: the project's own lines
# (plan, array submitted/ended, report) yes, Prefect's engine chatter and tracebacks no.
_PROJECT_DIRS = tuple(str(Path(__file__).resolve().parents[1] / d) for d in ("pipelines", "tasks"))


def progress_interval() -> float:
    """GI_PROGRESS_EVERY_S (a positive number of seconds), else PROGRESS_EVERY_S."""
    raw = os.environ.get(PROGRESS_ENV)
    if raw is None:
        return PROGRESS_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{PROGRESS_ENV}: must be a positive number of seconds (got {raw!r})")
    return value


def next_tick(due: float, *, now: float, every: float) -> float:
    """When the next progress line is due: one interval after the last due time, on a fixed
    schedule; a tick that a loaded machine starved past its slot moves the schedule on to
    `now + every` instead of firing the missed ticks in a burst."""
    due += every
    return due if due >= now else now + every


@dataclass(frozen=True)
class Progress:
    """One snapshot of a run's cells, and its line for a log file."""

    done: int
    total: int
    running: int
    failed: int
    done_at_start: int
    elapsed_s: float

    def line(self) -> str:
        new = self.done - self.done_at_start
        rate = new / self.elapsed_s * 60 if self.elapsed_s > 0 else 0.0
        left = self.total - self.done
        eta = f"~{duration(left / rate * 60)} left" if rate > 0 and left else (
            "nothing left" if not left else "time left unknown (no cell finished yet)")
        stamp = time.strftime("%H:%M:%S")
        return (
            f"{stamp} progress: {self.done}/{self.total} cells done ({new} in this run), "
            f"{self.running} running, {self.failed} failed; {rate:.2f} cells/min; {eta} "
            f"[+{self.elapsed_s:.0f} s]"
        )


def _snapshot(run_path: Path, cell_ids: set[str]) -> tuple[int, int, int]:
    """(done, running, failed) from the run directory; zeros before it exists. A record being
    rewritten or a damaged file must not end the progress thread: it counts as nothing."""
    run = existing_run(run_path)
    if run is None:
        return 0, 0, 0
    try:
        running, failed = job_cell_counts(run)
        return len(run.committed_cells() & cell_ids), running, failed
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0, 0


@contextmanager
def _progress(
    cell_ids: set[str], run_path: Path, notify: Callable[[str], None]
) -> Iterator[None]:
    """A rich progress bar on a terminal; without one (a log file, nohup, an sbatch'ed driver)
    a progress line through `notify` every progress_interval() seconds, at a fixed pace."""
    if os.isatty(1):
        with _progress_bar(cell_ids, run_path):
            yield
        return
    every, start = progress_interval(), time.monotonic()
    done_at_start = _snapshot(run_path, cell_ids)[0]

    def emit() -> None:
        done, running, failed = _snapshot(run_path, cell_ids)
        notify(Progress(done, len(cell_ids), running, failed, done_at_start,
                        time.monotonic() - start).line())

    def ticks(stop: threading.Event) -> None:
        due = start
        while True:
            emit()
            due = next_tick(due, now=time.monotonic(), every=every)
            if stop.wait(due - time.monotonic()):
                return

    try:
        with while_running(ticks, name="progress-lines"):
            yield
    finally:
        emit()  # the final count


@contextmanager
def _progress_bar(cell_ids: set[str], run_path: Path) -> Iterator[None]:
    """A rich progress bar fed by polling the run directory's commit markers (any executor)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}"),
        TimeRemainingColumn(),
    ]
    with Bar(*columns, transient=True) as bar:
        task = bar.add_task("cells", total=len(cell_ids), extra="")

        def poll(stop: threading.Event) -> None:
            while not stop.wait(1.0):
                done, running, failed = _snapshot(run_path, cell_ids)
                bar.update(task, completed=done, extra=f"{running} running, {failed} failed")

        with while_running(poll, name="progress-bar"):
            yield


def to_stderr(line: str) -> None:
    """A `notify` for commands without one: the line on stderr, at once."""
    print(line, file=sys.stderr, flush=True)


class _ProjectLines(logging.Handler):
    """Forwards the project's own run-logger lines (array submitted / ended, plan, report) to
    the CLI's `notify` as plain one-liners without tracebacks; Prefect keeps them at INFO."""

    def __init__(self, notify: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.notify = notify

    def emit(self, record: logging.LogRecord) -> None:
        if not record.pathname.startswith(_PROJECT_DIRS):
            return
        try:
            self.notify(f"{time.strftime('%H:%M:%S')} {record.getMessage()}")
        except Exception:  # noqa: BLE001 - logging must never end the run
            self.handleError(record)


@contextmanager
def prefect_logs(notify: Callable[[str], None], *, verbose: bool) -> Iterator[None]:
    """Prefect's loggers stay at INFO (the flow's lines reach its API and UI). Without
    --verbose its console handler is silenced, because Prefect logs every failed
    task with a traceback and the CLI prints one `error:` line; the project's own lines go to
    `notify` instead."""
    if verbose:
        yield
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    # Left raised afterwards: the ephemeral server logs its shutdown when the process exits.
    for h in logging.getLogger().handlers:
        if isinstance(h, PrefectConsoleHandler):
            h.setLevel(logging.CRITICAL + 1)
    forward = _ProjectLines(notify)
    run_loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    for lg in run_loggers:
        lg.addHandler(forward)
    try:
        yield
    finally:
        for lg in run_loggers:
            lg.removeHandler(forward)


def status_report(run_dir: Path) -> str:
    run = _require_run(run_dir)
    other = _multigrad_status(run)
    if other is not None:
        return other
    spec = spec_from_yaml(run.spec_text())
    active = pending_records(run)
    queued = queued_cells(run)
    status = grid_status(expand(spec), run, queued=queued)
    checkpoints = len(list(run.checkpoints_dir.glob("*.pt")))
    _, failed = job_cell_counts(run)
    unusable = scan(run).cells & {c.id for c in status.plan.inversion_cells}
    # committed cells of configurations a rerun of a changed spec dropped (kept, not counted)
    old = len(run.committed_cells() - {c.id for c in status.plan.inversion_cells})
    return "\n".join(
        [
            f"run {run.root} (grid {spec.name!r})",
            f"cells: {len(status.plan.inversion_cells)} total, {status.done - len(unusable)} "
            f"done, {len(queued)} in {len(active)} queued/running job(s), "
            f"{len(status.todo) + len(unusable)} to do",
            f"failed (their jobs ended without a commit; `gi-eval run` retries them): {failed}",
            f"unusable stored cells (unreadable metrics or missing group; `gi-eval run` moves "
            f"them to quarantine and recomputes them): {len(unusable)}",
            f"checkpoints of cells in flight: {checkpoints}",
            f"gradients stored: {len(status.gradients_stored)} of "
            f"{len(status.plan.gradient_cells)}",
            *_driver_lines(run),
            *(
                [f"not in the current spec: {old} committed cells of configurations grid.yaml "
                 "no longer has (kept; left out of tables unless --all)"]
                if old
                else []
            ),
        ]
    )


def _multigrad_status(run: RunDir) -> str | None:
    """`gi-eval status` of an Appendix D run (`gi-eval multigrad`): its cells and jobs, which the
    shared array runner records like a grid's. None when the run is not one."""
    import yaml

    from tasks.multigrad import MultiGradSpec, cells, result_path

    data = yaml.safe_load(run.spec_text())
    if not (isinstance(data, dict) and {"gradients", "settings"} & set(data)):
        return None
    spec = MultiGradSpec.model_validate(data)
    todo = cells(spec)
    done = sum(result_path(run, c["id"]).is_file() for c in todo)
    active = active_records(run)
    running = {c for r in active for c in r.cells}
    return "\n".join(
        [
            f"run {run.root} (multigrad {spec.name!r})",
            f"cells: {len(todo)} total, {done} done, {len(running)} in {len(active)} "
            f"queued/running job(s), {len(todo) - done} to do",
        ]
    )


def _driver_lines(run: RunDir) -> list[str]:
    """The detached driver's job (`gi-eval run --detach`), if the run has one."""
    from pipelines.detach import driver_status_line

    line = driver_status_line(run.root)
    return [line] if line else []


def cancel_run(run_dir: Path) -> str:
    run = _require_run(run_dir)
    request_cancel(run)  # first: a driving `gi-eval run` must stop, not resubmit
    from pipelines.detach import cancel_driver

    driver = cancel_driver(run.root)  # before reading the records: it submits no more arrays
    stopped = stop_jobs(run)
    by_driver = f"driver job {driver} and " if driver else ""
    return (
        f"cancelled {by_driver}{stopped} job(s); committed cells are kept, `gi-eval run` "
        "resumes"
    )


def tables_text(run_dir: Path, *, include_all: bool = False) -> str:
    from pipelines.report import in_scope, markdown, spec_cells, summary, write_tables

    run = _require_run(run_dir)
    if not os.access(run.root, os.W_OK):
        # A finished run on read-only storage: read it without compacting or writing reports.
        df = run.metrics()
        df = df if include_all else df[in_scope(df, spec_cells(run))]
        return markdown(summary(df)) + (
            f"\n{run.root} is read-only: nothing was written (no compaction, no reports/); "
            "the table above is read from its committed metrics"
        )
    path = write_tables(run, include_all=include_all)
    figure, csv = run.report_file("reconstructions.png"), run.report_file("table.csv")
    return path.read_text() + f"\nwritten: {path}, {csv} and {figure}"


def report_text(
    run_dir: Path, *, publish: Path | None = None, include_all: bool = False
) -> str:
    """`gi-eval report`: write reports/ (tables, figures, report.html); say what it covers;
    `publish`: also a results page for docs/ (pipelines.report.publish)."""
    from pipelines.report import publish as publish_page
    from pipelines.report import write_report

    run = _require_run(run_dir)
    if not os.access(run.root, os.W_OK):
        raise ConfigError(
            f"run_dir: {run.root} is read-only, so reports/ cannot be written; copy the run "
            "somewhere writable, or use `gi-eval tables` to print Table 1 without writing"
        )
    report = write_report(run, include_all=include_all)
    lines = [
        report.coverage.describe(),
        f"written: {len(report.files)} files in {run.reports_dir}",
        f"report: {report.html}",
    ]
    if publish is not None:
        command = f"gi-eval report {run_dir} --publish {publish}"
        lines.append(f"results page: {publish_page(report, run, publish, command=command)}")
    return "\n".join(lines)


def verify_run(run_dir: Path, *, deep: bool, dry_run: bool) -> str:
    """Check the stored cells; move unusable ones to quarantine unless `dry_run` (or the run is
    read-only, which is then said)."""
    run = _require_run(run_dir)
    report = scan(run, deep=deep)
    if not report.findings:
        return report.describe()
    if dry_run:
        return report.describe() + "\n(--dry-run: nothing moved)"
    if not os.access(run.root, os.W_OK):
        return report.describe() + f"\n{run.root} is read-only: nothing moved"
    return verify_and_repair(run, deep=deep).describe()


def _require_run(run_dir: Path) -> RunDir:
    run = existing_run(run_dir)
    if run is None:
        raise ConfigError(
            f"run_dir: {run_dir} is not a run directory (no {GRID_FILE}); "
            "start one with `gi-eval run SPEC`"
        )
    return run
