"""Prefect flows: they read like the protocol and only compose tasks."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from gi_core.errors import ConfigError
from pipelines.executors import ExecutorConfig
from pipelines.planner import (
    batched,
    gradient_chunks,
    grid_status,
    inversion_chunks,
    prepare_run,
    read_spec,
)
from pipelines.report import write_tables
from pipelines.spec import GridSpec
from storage.run import open_run
from tasks.arrays import run_array
from tasks.jobs import active_records
from tasks.work import Chunk

EXECUTORS = ("inline", "local", "slurm")
ARRAY_ELEMENTS = 1000  # elements per Prefect task (= per job array, below Slurm's MaxArraySize)


@task(name="plan", cache_policy=NO_CACHE)
def plan(spec_path: str, executor: str | None, out: str | None) -> tuple[str, list[Chunk],
                                                                          list[Chunk], ExecutorConfig]:
    """Validate the spec, open the run, and shape the missing work into chunks."""
    spec, text = read_spec(spec_path)
    run = prepare_run(spec, text, out)
    queued = {cell for r in active_records(run) for cell in r.cells}
    status = grid_status(spec, run, queued=queued)
    per_job, keep = spec.execution.cells_per_job, spec.storage.keep_restarts
    grads = gradient_chunks(run, status.gradients_todo, per_job=per_job)
    cells = inversion_chunks(run, status.todo, per_job=per_job, keep_restarts=keep)
    return str(run.root), grads, cells, executor_config(spec, executor)


@task(name="tables", cache_policy=NO_CACHE)
def tables(run_dir: str) -> str:
    return str(write_tables(open_run(run_dir)))


@flow(name="evaluation-grid", log_prints=False)
def evaluation_grid(spec_path: str, executor: str | None = None, out: str | None = None) -> str:
    """plan -> generate missing gradients -> invert missing cells (metrics per cell) -> tables."""
    run_dir, gradient_work, inversion_work, config = plan(spec_path, executor, out)
    for i, group in enumerate(batched(gradient_work, ARRAY_ELEMENTS)):
        run_array(run_dir, list(group), config, f"gradients-{i}")
    arrays = [run_array.submit(run_dir, list(group), config, f"inversions-{i}")
              for i, group in enumerate(batched(inversion_work, ARRAY_ELEMENTS))]
    for future in arrays:
        future.result()
    return tables(run_dir)


def executor_config(spec: GridSpec, override: str | None) -> ExecutorConfig:
    """The spec's execution section (or the CLI's --executor) as an executor adapter config."""
    if override is not None and override not in EXECUTORS:
        raise ConfigError(f"executor: unknown {override!r}; choose one of {', '.join(EXECUTORS)}")
    ex, slurm = spec.execution, spec.execution.slurm
    return ExecutorConfig(
        kind=override or ex.executor, timeout_min=slurm.timeout_min, partition=slurm.partition,
        cpus_per_task=slurm.cpus_per_task, gpus_per_task=slurm.gpus_per_task or None,
        mem_gb=slurm.mem_gb, array_parallelism=slurm.array_parallelism, account=slurm.account,
        qos=slurm.qos, additional_parameters=dict(slurm.additional), max_parallel=ex.max_parallel,
    )
