"""What the CLI commands do (kept apart from typer so tests can call them directly)."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gi_core.errors import ConfigError
from pipelines.calibrate import calibrate_on_executor
from pipelines.costmodel import estimate
from pipelines.memory import check_memory, memory_lines
from pipelines.planner import (
    grid_status,
    prepare_run,
    read_spec,
    run_dir_for,
    stored_timings,
    submission_shape,
)
from storage.lock import driver_lock
from storage.run import RunDir, open_run
from storage.verify import scan, verify_and_repair
from tasks.cells import expand
from tasks.executors import JobHandle, cancel_jobs, kill_local_job
from tasks.jobs import (
    active_records,
    job_cell_counts,
    pending_records,
    queued_cells,
    request_cancel,
)
from tasks.preflight import check_before_submission, prepare_resume
from tasks.spec import spec_from_yaml


def _existing_run(path: Path) -> RunDir | None:
    return open_run(path) if (path / "grid.yaml").is_file() else None


def plan_report(
    spec_path: Path, out: Path | None, *, calibrate: bool, executor: str | None = None
) -> str:
    """Counts, cost and submission shape in seconds: the cost comes from the cost model
    (pipelines.costmodel), never from attacks on this machine; `calibrate` runs one
    calibration job on the target executor first."""
    spec, _ = read_spec(spec_path)
    run = _existing_run(run_dir_for(spec, out))
    queued = queued_cells(run) if run else set()
    status = grid_status(spec, run, queued=queued)
    todo = status.todo
    calibrated = {}
    if calibrate and todo:
        from pipelines.flows import executor_config  # Prefect: imported only when needed

        log_dir = (run.root / "logs") if run else Path(tempfile.gettempdir())
        calibrated = calibrate_on_executor(
            status.plan, executor_config(spec, executor), log_dir=log_dir
        )
    cost = estimate(
        spec, todo, executor=executor, run_timings=stored_timings(run), calibrated=calibrated
    )
    per_job = spec.execution.cells_per_job
    grad_shape = submission_shape(len(status.gradients_todo), per_job=per_job)
    shape = submission_shape(len(todo), per_job=per_job)
    lines = [
        f"grid {spec.name!r} -> {run_dir_for(spec, out)}",
        f"cells: {len(status.plan.inversion_cells)} total, {status.done} done, "
        f"{len(queued)} in queue, {len(todo)} to do",
        f"gradients: {len(status.plan.gradient_cells)} total, "
        f"{len(status.gradients_todo)} to generate",
        *cost.lines(),
        f"submission ({spec.execution.executor}): gradients {grad_shape.describe()}; "
        f"inversions {shape.describe()}; {grad_shape.sbatch_calls + shape.sbatch_calls} "
        "sbatch call(s) in all",
        *memory_lines(spec, todo or status.plan.inversion_cells),
    ]
    return "\n".join(lines)


def run_grid(
    spec_path: Path,
    *,
    executor: str | None,
    out: Path | None,
    verbose: bool,
    wait: bool = False,
    notify: Callable[[str], None] = print,
) -> str:
    """Validate, then run the evaluation-grid flow with a progress bar; returns the table.

    Everything checkable is checked before Prefect starts or a job is submitted (spec, data,
    checkpoints, writable run directory, free space). The run directory is then locked for this
    driver (`wait`: queue behind another one), temp files of crashed writers are removed and
    unusable stored cells go to quarantine so that this run recomputes them."""
    spec, text = read_spec(spec_path)
    from pipelines.flows import evaluation_grid, executor_config

    executor_config(spec, executor)
    # expanding checks data set sizes, generator and method params; its ids feed the progress bar
    plan = expand(spec)
    cell_ids = {c.id for c in plan.inversion_cells}
    run_path = run_dir_for(spec, out)
    existing = _existing_run(run_path)
    todo = grid_status(spec, existing).todo if existing else plan.inversion_cells
    check_before_submission(run_path, todo, [c.gradient for c in todo],
                            keep_restarts=spec.storage.keep_restarts)
    check_memory(spec, todo, executor=executor or spec.execution.executor)  # exit 2 if too big
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
        run = prepare_run(spec, text, out)
        for line in prepare_resume(run):
            notify(line)
        if not verbose:
            # Prefect logs every failed task/flow with a traceback; the CLI prints one line.
            os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
            logging.getLogger("prefect").setLevel(logging.CRITICAL)
        with _progress(cell_ids, run_path):
            table_path = evaluation_grid(str(spec_path), executor, str(run_path))
    wall = time.perf_counter() - start
    figure = Path(table_path).with_name("reconstructions.png")
    html = Path(table_path).with_name("report.html")
    return (
        Path(table_path).read_text()
        + f"\nfigure: {figure}\nreport: {html}\n{run_path}: done in {wall:.1f} s\n"
    )


@contextmanager
def _progress(cell_ids: set[str], run_path: Path) -> Iterator[None]:
    """A rich progress bar fed by polling the run directory's commit markers (any executor)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    stop = threading.Event()
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=True, disable=not os.isatty(1)) as bar:
        task = bar.add_task("cells", total=len(cell_ids), extra="")

        def poll() -> None:
            while not stop.wait(1.0):
                if (run_path / "grid.yaml").is_file():
                    run = open_run(run_path)
                    running, failed = job_cell_counts(run)
                    bar.update(
                        task,
                        completed=len(run.committed_cells() & cell_ids),
                        extra=f"{running} running, {failed} failed",
                    )

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def status_report(run_dir: Path) -> str:
    run = _require_run(run_dir)
    spec = spec_from_yaml(run.spec_text())
    active = pending_records(run)
    queued = queued_cells(run)
    status = grid_status(spec, run, queued=queued)
    checkpoints = len(list((run.root / "checkpoints").glob("*.pt")))
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
    active = active_records(run)
    slurm = [JobHandle(kind="slurm", job_id=r.job_id, index=0) for r in active if r.kind == "slurm"]
    cancel_jobs(slurm)
    for r in active:
        if r.kind == "local":
            kill_local_job(r.job_id)
    stopped = f"driver job {driver} and " if driver else ""
    return (
        f"cancelled {stopped}{len(active)} job(s); committed cells are kept, `gi-eval run` "
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
    figure = path.with_name("reconstructions.png")
    return path.read_text() + f"\nwritten: {path}, {path.with_suffix('.csv')} and {figure}"


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
    if not (run_dir / "grid.yaml").is_file():
        raise ConfigError(
            f"run_dir: {run_dir} is not a run directory (no grid.yaml); "
            "start one with `gi-eval run SPEC`"
        )
    return open_run(run_dir)
