"""Prefect flows: they read like the protocol and only compose tasks."""

from __future__ import annotations

import time
from dataclasses import dataclass

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from gi_core.errors import ConfigError
from pipelines.planner import (
    ARRAY_ELEMENTS,
    batched,
    gradient_chunks,
    grid_status,
    inversion_chunks,
    prepare_run,
    read_spec,
)
from pipelines.report import write_tables
from storage.run import open_run
from tasks.arrays import POLL_S, run_array
from tasks.executors import ExecutorConfig, threads_per_job
from tasks.jobs import pending_records, queued_cells
from tasks.spec import GridSpec
from tasks.work import Chunk

EXECUTORS = ("inline", "local", "slurm")


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


@task(name="plan", cache_policy=NO_CACHE)
def plan(spec_path: str, executor: str | None, out: str | None) -> Work:
    """Validate the spec, open the run, and shape the missing work into chunks."""
    started = time.time()
    spec, text = read_spec(spec_path)
    run = prepare_run(spec, text, out)
    queued = queued_cells(run)
    status = grid_status(spec, run, queued=queued)
    ex, config = spec.execution, executor_config(spec, executor)
    per_job, threads = ex.cells_per_job, threads_per_job(config)
    grads = gradient_chunks(run, status.gradients_todo, per_job=per_job, threads=threads)
    cells = inversion_chunks(
        run, status.todo, per_job=per_job, threads=threads, keep_restarts=spec.storage.keep_restarts
    )
    timeout = ex.array_timeout_h * 3600 if ex.array_timeout_h else None
    return Work(str(run.root), grads, cells, config, timeout, len(queued), started)


@task(name="wait-for-earlier-jobs", cache_policy=NO_CACHE)
def wait_for_earlier_jobs(run_dir: str) -> None:
    """Wait until the jobs of an earlier (killed) `gi-eval run` have left the queue."""
    run = open_run(run_dir)
    while pending_records(run):  # jobs whose cells are all committed are not waited for
        time.sleep(POLL_S)


@task(name="tables", cache_policy=NO_CACHE)
def tables(run_dir: str) -> str:
    return str(write_tables(open_run(run_dir)))


@flow(name="evaluation-grid", log_prints=False)
def evaluation_grid(spec_path: str, executor: str | None = None, out: str | None = None) -> str:
    """plan -> generate missing gradients -> invert missing cells (metrics per cell) -> tables."""
    work = plan(spec_path, executor, out)
    run_work(work, started=work.started)
    if work.queued:  # an earlier run's jobs still hold cells: let them finish, then redo misses
        wait_for_earlier_jobs(work.run_dir)
        run_work(plan(spec_path, executor, out), started=work.started)
    return tables(work.run_dir)


def run_work(work: Work, *, started: float) -> None:
    """Gradient arrays first (the inversions read them), then the inversion arrays at once;
    a `gi-eval cancel` after `started` stops them."""
    array = run_array.with_options(timeout_seconds=work.array_timeout_s)
    for i, group in enumerate(batched(work.gradients, ARRAY_ELEMENTS)):
        array(work.run_dir, list(group), work.executor, f"gradients-{i}", started)
    arrays = [
        array.submit(work.run_dir, list(group), work.executor, f"inversions-{i}", started)
        for i, group in enumerate(batched(work.inversions, ARRAY_ELEMENTS))
    ]
    for future in arrays:
        future.result()


def executor_config(spec: GridSpec, override: str | None) -> ExecutorConfig:
    """The spec's execution section (or the CLI's --executor) as an executor adapter config."""
    if override is not None and override not in EXECUTORS:
        raise ConfigError(f"executor: unknown {override!r}; choose one of {', '.join(EXECUTORS)}")
    ex, slurm = spec.execution, spec.execution.slurm
    return ExecutorConfig(
        kind=override or ex.executor,
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
    )
