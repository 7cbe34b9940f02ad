"""Prefect flows: they read like the protocol and only compose tasks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from gi_core.errors import ConfigError
from pipelines.background import while_running
from pipelines.memory import sized_mem_gb
from pipelines.notify import notify_state
from pipelines.planner import (
    ARRAY_ELEMENTS,
    GridPlan,
    Overrides,
    batched,
    build_plan,
    gradient_chunks,
    handed_over,
    inversion_chunks,
    read_spec,
    resolve_executor,
    run_dir_for,
)
from pipelines.report import SpecScope, write_report
from storage.run import existing_run, open_run
from tasks.arrays import POLL_S, run_array
from tasks.executors import ExecutorConfig, threads_per_job
from tasks.jobs import pending_records, queued_cells, stop_jobs
from tasks.resources import ArrayGroup, ArrayKind, inversion_groups, kind_config
from tasks.spec import ExecutorKind, GridSpec
from tasks.work import Chunk

PROGRESS_EVERY_S = 5.0  # how often the progress artifact is refreshed while arrays run


@dataclass(frozen=True)
class Work:
    """The missing work of a grid, shaped for submission."""

    run_dir: str
    gradients: list[Chunk]
    inversions: list[Chunk]
    executor: ExecutorConfig
    array_timeout_s: float | None
    queued: int  # cells left to jobs of an earlier run that are still queued or running
    started: float  # planning time: a `gi-eval cancel` after it stops this run
    planned: frozenset[str] = frozenset()  # every inversion cell id of the grid
    # Resources per array kind and method (tasks.resources): the gradient jobs' config and one
    # (name, chunks, config) per run of inversion arrays sharing one resource request.
    gradient_executor: ExecutorConfig | None = None
    inversion_arrays: tuple[tuple[str, tuple[Chunk, ...], ExecutorConfig], ...] = ()


def open_grid(
    spec_path: str, executor: str | None, out: str | None, overrides: Overrides
) -> GridPlan:
    """The grid's plan with its run directory open: the one `gi-eval run` handed over
    (planner.handing_over), else (a deployment, a GIML evaluation) read, validated and opened
    here, once per flow run."""
    handed = handed_over(spec_path, executor, out, overrides)
    if handed is not None and handed.run is not None:
        return handed
    return build_plan(spec_path, executor=executor, out=out, overrides=overrides).opened()


@task(name="plan", cache_policy=NO_CACHE)
def plan(grid: GridPlan) -> Work:
    """Shape the grid's missing work (neither committed nor queued) into chunks."""
    started = time.time()
    spec, run = grid.spec, grid.run
    assert run is not None, "plan() needs an opened GridPlan"
    queued = queued_cells(run)
    status = grid.status(queued=queued)
    ex, config = spec.execution, executor_config(spec, grid.executor)
    per_job, gradient_config = ex.cells_per_job, kind_config(spec, config, "gradients")
    grads = gradient_chunks(
        run, status.gradients_todo, per_job=per_job, threads=threads_per_job(gradient_config)
    )
    groups = inversion_groups(spec, config, status.todo, size=sized_mem_gb)
    arrays = [(g, _group_chunks(spec, run, g, per_job=per_job)) for g in groups]
    cells = [c for _, chunks in arrays for c in chunks]
    timeout = ex.array_timeout_h * 3600 if ex.array_timeout_h else None
    planned = frozenset(c.id for c in status.plan.inversion_cells)
    get_run_logger().info(
        "grid %r: %d cells planned, %d committed (skipped), %d in queued/running jobs of an "
        "earlier run, %d to submit in %d job-array element(s); %d of %d gradients to generate; "
        "executor %s; run directory %s; job logs in %s",
        spec.name,
        len(planned),
        status.done,
        len(queued),
        len(status.todo),
        len(cells),
        len(status.gradients_todo),
        len(status.plan.gradient_cells),
        config.kind,
        run.root,
        run.logs_dir,
    )
    return Work(
        str(run.root),
        grads,
        cells,
        config,
        timeout,
        len(queued),
        started,
        planned,
        gradient_executor=gradient_config,
        inversion_arrays=_named_arrays(arrays),
    )


def _group_chunks(spec: GridSpec, run: Any, group: ArrayGroup, *, per_job: int) -> list[Chunk]:
    """The job-array elements of one resource group (K cells each, torch threads = its CPUs)."""
    ex = spec.execution
    chunks = inversion_chunks(
        run,
        group.cells,
        per_job=per_job,
        threads=threads_per_job(group.config),
        keep_restarts=spec.storage.keep_restarts,
    )
    return [
        replace(
            c,
            snapshots=spec.storage.snapshots,
            batch_cells=ex.batch_cells,
            memory_budget_gb=ex.memory_budget_gb,
        )
        for c in chunks
    ]


def _named_arrays(
    arrays: list[tuple[ArrayGroup, list[Chunk]]],
) -> tuple[tuple[str, tuple[Chunk, ...], ExecutorConfig], ...]:
    """One entry per job array: 'inversions-<i>' for the default resources, 'inversions-<method
    key>-<i>' for a group with its own (so squeue and the job records tell them apart)."""
    named = []
    for group, chunks in arrays:
        prefix = "inversions" if group.key == "default" else f"inversions-{group.tag}"
        for i, part in enumerate(batched(chunks, ARRAY_ELEMENTS)):
            named.append((f"{prefix}-{i}", tuple(part), group.config))
    return tuple(named)


@task(name="wait-for-earlier-jobs", cache_policy=NO_CACHE)
def wait_for_earlier_jobs(run_dir: str) -> None:
    """Wait until the jobs of an earlier (killed) `gi-eval run` have left the queue."""
    run = open_run(run_dir)
    while pending_records(run):  # jobs whose cells are all committed are not waited for
        time.sleep(POLL_S)


@task(name="report", cache_policy=NO_CACHE)
def report(grid: GridPlan) -> str:
    """Tables, figures and report.html; Table 1 and a link to the report as artifacts."""
    run_dir = str(grid.run_path)
    result = write_report(open_run(run_dir), scope=SpecScope(grid.cell_ids, grid.spec.baseline))
    key = _artifact_key(Path(run_dir).name)
    create_markdown_artifact(
        markdown=f"# Table 1: {Path(run_dir).name}\n\n{result.table_markdown}",
        key=f"{key}-table-1",
        description=result.coverage.describe(),
    )
    create_link_artifact(
        link=result.html.resolve().as_uri(),
        link_text=f"report.html of {Path(run_dir).name}",
        key=f"{key}-report",
        description=f"self-contained HTML report in {result.html.parent}",
    )
    get_run_logger().info("report: %s (%s)", result.html, result.coverage.describe())
    return str(result.table)


def _flow_run_name() -> str:
    """'<grid name>-<UTC time>' instead of Prefect's random adjective-animal names."""
    from prefect.runtime import flow_run

    spec_path = str(flow_run.parameters.get("spec_path", "grid"))
    try:
        name = yaml.safe_load(Path(spec_path).read_text()).get("name") or Path(spec_path).stem
    except (OSError, yaml.YAMLError, AttributeError, UnicodeDecodeError):
        name = Path(spec_path).stem  # the plan task reports a bad spec; the name is cosmetic
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _artifact_key(name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    key = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    return key or "grid"


def _cancel_jobs(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation hook. Cancelling a flow run in the Prefect UI makes the worker SIGTERM
    the flow-run process; Slurm jobs (and local submitit jobs) are not its children and would
    keep running, so the hook does what `gi-eval cancel RUN_DIR` does: mark the run cancelled
    (an array still polling raises RunCancelled instead of retrying) and cancel its jobs."""
    log = logging.getLogger(__name__)
    params = flow_run.parameters
    try:
        spec, _ = read_spec(params["spec_path"])
    except ConfigError as e:  # nothing can have been submitted for an invalid spec
        log.warning("cancellation: spec unreadable, no jobs to cancel (%s)", e)
        return
    run_path = run_dir_for(spec, params.get("out"))
    run = existing_run(run_path)
    if run is not None:
        stopped = stop_jobs(run)
        log.warning("flow run cancelled: %d job(s) of %s cancelled", stopped, run_path)


@flow(
    name="evaluation-grid",
    log_prints=False,
    flow_run_name=_flow_run_name,
    on_cancellation=[_cancel_jobs],
    on_completion=[notify_state],
    on_failure=[notify_state],
    on_crashed=[notify_state],
)
def evaluation_grid(
    spec_path: str,
    executor: ExecutorKind | None = None,
    out: str | None = None,
    partition: str | None = None,
    max_parallel: int | None = None,
    budget_scale: float | None = None,
    retries: int = 2,
    notify_url: str | None = None,
    notify_block: str | None = None,
) -> str:
    """Plan a grid, generate its missing gradients, invert its missing cells, write the report.

    Committed cells are skipped, so running the same spec again resumes it.

    Args:
        spec_path: Path of the grid spec (YAML), relative to the working directory.
        executor: Where cells run: inline (in this process), local (submitit jobs on this
            machine) or slurm (job arrays). Default: the spec's execution.executor.
        out: Run directory. Default: runs/<grid name>.
        partition: Slurm partition of every job array (execution.slurm.partition).
        max_parallel: Jobs running at once (execution.max_parallel, slurm.array_parallelism).
        budget_scale: Multiplies every iteration budget (budgets.iterations_scale).
        retries: Resubmissions of an array whose jobs ended with cells not committed.
        notify_url: POSTed a JSON summary when the run completes, fails or crashes.
        notify_block: "<block type>/<name>" of a saved Prefect notification block, told the
            same (e.g. "slack-webhook/grid-alerts").

    Returns:
        The path of reports/table.md (Table 1).
    """
    grid = open_grid(spec_path, executor, out, Overrides(partition, max_parallel, budget_scale))
    work = plan(grid)
    with _progress_artifact(work):
        run_work(work, started=work.started, retries=retries)
        if work.queued:  # an earlier run's jobs still hold cells: let them finish, redo misses
            wait_for_earlier_jobs(work.run_dir)
            run_work(plan(grid), started=work.started, retries=retries)
    return report(grid)


@contextmanager
def _progress_artifact(work: Work) -> Iterator[None]:
    """A Prefect progress artifact (percentage of the grid's cells committed), refreshed every
    PROGRESS_EVERY_S from the commit markers while the arrays run, and once at the end."""
    run = open_run(work.run_dir)
    total = max(1, len(work.planned))
    key = _artifact_key(Path(work.run_dir).name)

    def percent() -> float:
        return 100.0 * len(run.committed_cells() & work.planned) / total

    # a flow run is synchronous here: the sync form returns the artifact's id, not a coroutine
    artifact = cast(
        UUID,
        create_progress_artifact(
            percent(), key=f"{key}-progress", description=f"cells committed of {len(work.planned)}"
        ),
    )
    def refresh(stop: threading.Event) -> None:
        while not stop.wait(PROGRESS_EVERY_S):
            update_progress_artifact(artifact, percent())

    try:
        with while_running(refresh, name="progress-artifact"):
            yield
    finally:
        update_progress_artifact(artifact, percent())


def run_work(work: Work, *, started: float, retries: int = 2) -> None:
    """Gradient arrays first (the inversions read them), then the inversion arrays at once;
    a `gi-eval cancel` after `started` stops them. `retries`: resubmissions of missing cells."""
    array = run_array.with_options(timeout_seconds=work.array_timeout_s, retries=retries)
    gradient_executor = work.gradient_executor or work.executor
    for i, group in enumerate(batched(work.gradients, ARRAY_ELEMENTS)):
        array(work.run_dir, list(group), gradient_executor, f"gradients-{i}", started)
    arrays = [
        array.submit(work.run_dir, list(chunks), config, name, started)
        for name, chunks, config in work.inversion_arrays
    ]
    for future in arrays:
        future.result()


def executor_config(
    spec: GridSpec, override: str | None, kind: ArrayKind | None = None
) -> ExecutorConfig:
    """The spec's execution section (or the CLI's --executor) as an executor adapter config;
    `kind`: with the overrides of that array kind (tasks.resources)."""
    base = _base_executor_config(spec, override)
    return base if kind is None else kind_config(spec, base, kind)


def _base_executor_config(spec: GridSpec, override: str | None) -> ExecutorConfig:
    ex, slurm = spec.execution, spec.execution.slurm
    return ExecutorConfig(
        kind=resolve_executor(spec, override),
        timeout_min=slurm.timeout_min,
        partition=slurm.partition,
        cpus_per_task=slurm.cpus_per_task,
        gpus_per_task=slurm.gpus_per_task or None,
        mem_gb=slurm.mem_gb,
        array_parallelism=slurm.array_parallelism,
        account=slurm.account,
        qos=slurm.qos,
        additional_parameters=dict(slurm.additional),
        max_parallel=ex.max_parallel,
        setup=slurm.setup,
        srun_args=slurm.srun_args,
        max_num_timeout=slurm.max_num_timeout,
        signal_delay_s=slurm.signal_delay_s,
        constraint=slurm.constraint,
        gres=slurm.gres,
        gpu_type=slurm.gpu_type,
        exclude=slurm.exclude,
        job_name_prefix=spec.name,
    )
