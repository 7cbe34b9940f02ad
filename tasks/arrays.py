"""The Prefect task of the pipeline: one job array per task run (one element = K cells).

Submit -> record -> poll until the jobs are gone -> check commit markers. Missing cells raise
ExecutionError, so Prefect's retry resubmits exactly those (the chunks are filtered against the
commit markers at the start of every attempt). A timeout or cancellation cancels the jobs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.states import State

from storage.run import RunDir, open_run
from tasks.errors import ExecutionError, RunCancelled
from tasks.executors import (
    ExecutorConfig,
    JobHandle,
    Resumable,
    cancel_jobs,
    submit_array,
    wait_for_jobs,
)
from tasks.jobs import cancel_requested, record_array_end, record_jobs
from tasks.work import Chunk, run_chunk

POLL_S = 2.0
# Set in the environment of a detached driver job (`gi-eval run --detach`).
DETACHED_ENV = "GI_EVAL_DETACHED"


def pending(run: RunDir, chunk: Chunk) -> Chunk:
    """The chunk without its committed cells."""
    if chunk.kind == "gradients":
        keep = tuple(c for c in chunk.cells if not run.has_gradient(c["id"]))
    else:
        keep = tuple(c for c in chunk.cells if not run.is_committed(c["id"], c["method"]))
    return replace(chunk, cells=keep)


def run_array_now(
    run_dir: str,
    chunks: Sequence[Chunk],
    executor: ExecutorConfig,
    name: str,
    *,
    run_started: float,
) -> int:
    """Body of the task (also callable without Prefect): returns the number of cells run.

    `run_started` is when the driving `gi-eval run` planned: a `gi-eval cancel` after it stops
    this array (and every later one) instead of letting a retry resubmit the cells."""
    run = open_run(run_dir)
    todo = [c for c in (pending(run, ch) for ch in chunks) if c.cells]
    if not todo:
        return 0
    if cancel_requested(run, since=run_started):
        raise _cancelled(run, sum(len(c.cells) for c in todo))
    skipped = sum(len(ch.cells) for ch in chunks) - sum(len(c.cells) for c in todo)
    log = _logger()
    submit_and_wait(
        run,
        Resumable(run_chunk),
        todo,
        executor=executor,
        name=name,
        cell_ids=[[c["id"] for c in ch.cells] for ch in todo],
        what=f"{sum(len(c.cells) for c in todo)} {todo[0].kind.removesuffix('s')} cells "
        f"({skipped} already committed, skipped)",
    )
    missing = [c["id"] for ch in todo for c in pending(run, ch).cells]
    log.info(
        "array %s: jobs ended; %d of %d cells committed",
        name,
        sum(len(c.cells) for c in todo) - len(missing),
        sum(len(c.cells) for c in todo),
    )
    if missing and cancel_requested(run, since=run_started):
        raise _cancelled(run, len(missing))
    if missing:
        raise ExecutionError(
            f"{len(missing)} of {sum(len(c.cells) for c in todo)} {todo[0].kind} cells are not "
            f"committed after their jobs ended (e.g. {missing[0]}); see {run.logs_dir} — a retry "
            "resubmits only these"
        )
    return sum(len(c.cells) for c in todo)


def submit_and_wait(
    run: RunDir,
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    *,
    executor: ExecutorConfig,
    name: str,
    cell_ids: Sequence[Sequence[str]],
    what: str,
) -> list[JobHandle]:
    """The one job-array runner of every flow (grids, GIML training, multigrad): submit
    `fn(job)` for each job as one array, record the jobs (so `gi-eval status` and `gi-eval
    cancel` see them), wait until they are gone. Interrupted (timeout, Ctrl-C, a cancelled
    Prefect run) it cancels them, except when a detached driver job was terminated: then its
    arrays outlive it and the next driver waits for them. Whether the jobs did their work is
    the caller's check, and so is the retry policy (`retry_on_missing`)."""
    submitted = time.time()
    handles = submit_array(fn, list(jobs), config=executor, log_dir=run.logs_dir, name=name)
    record = record_jobs(run, name, handles, cell_ids, submitted=submitted)
    log = _logger()
    log.info(
        "array %s: submitted %s in %d element(s) to %s; job ids %s; logs in %s",
        name,
        what,
        len(jobs),
        executor.kind,
        _job_ids(handles),
        run.logs_dir,
    )
    try:
        wait_for_jobs(handles, poll_s=POLL_S)
    except BaseException as e:  # timeout, Ctrl-C, Prefect cancellation: never leave orphan jobs
        if _driver_job_terminated(e):
            log.warning(
                "array %s: the driver job was terminated (preempted, requeued or "
                "scancel'ed); jobs %s keep running, the next driver waits for them",
                name,
                _job_ids(handles),
            )
            raise
        log.warning(
            "array %s: stopped while its jobs ran; cancelling jobs %s", name, _job_ids(handles)
        )
        cancel_jobs(handles)
        raise
    record_array_end(record)
    return handles


def _driver_job_terminated(error: BaseException) -> bool:
    """SIGTERM reached a detached driver job (pipelines.detach sets DETACHED_ENV). Slurm sends
    it on preemption and requeue as well as on scancel: the arrays must outlive the driver,
    whose next start waits for them. `gi-eval cancel` stops the arrays itself."""
    from prefect.exceptions import TerminationSignal

    return os.environ.get(DETACHED_ENV) == "1" and isinstance(error, TerminationSignal)


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """Prefect's run logger inside a task (its lines show in the UI), else the module's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _job_ids(handles: Sequence[JobHandle]) -> str:
    """'123_0..123_7' style summary: all ids when few, first..last (n) otherwise."""
    ids = list(dict.fromkeys(h.job_id for h in handles))
    return ", ".join(ids) if len(ids) <= 6 else f"{ids[0]} .. {ids[-1]} ({len(ids)} jobs)"


def _cancelled(run: RunDir, cells: int) -> RunCancelled:
    return RunCancelled(
        f"{run.root} was cancelled (gi-eval cancel): {cells} cells not run; "
        "committed cells are kept, `gi-eval run` resumes"
    )


def retry_on_missing(task: Any, task_run: Any, state: State) -> bool:
    """Retry only when cells are missing after the jobs ended — not after a timeout or a
    cancellation, whose jobs were cancelled on purpose."""
    return isinstance(state.result(raise_on_failure=False), ExecutionError)


@task(
    name="run-cell-array",
    retries=2,
    retry_delay_seconds=5,
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_on_missing,
)
def run_array(
    run_dir: str, chunks: list[Chunk], executor: ExecutorConfig, name: str, run_started: float
) -> int:
    """One job array of `chunks` (each element runs its K cells in sequence)."""
    return run_array_now(run_dir, chunks, executor, name, run_started=run_started)
