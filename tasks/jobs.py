"""Job records: which cells went to which job, so that a rerun does not resubmit cells whose
jobs are still queued and `gi-eval cancel` can find every job of a run.

One small JSON file per submitted array under <run>/jobs/, written atomically when the array is
submitted (each element with its `submitted` time) and rewritten once, atomically, when its jobs
have ended (`ended`): the report sets each array's measured time against `gi-eval plan`'s
estimate (pipelines.report_estimate).

A local job is a process id, and process ids are reused (they wrap every few hours on a busy
machine). So a local record also holds the host and the process's start time (field 22 of
/proc/<pid>/stat, clock ticks since boot, with the boot id): a record counts as running, and
may be signalled, only while a process with that pid *and* that start time exists on this
host. A record written before this rule (bare pid) is never trusted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from storage import records as run_records
from storage.atomic import write_bytes_atomic
from storage.lock import process_identity
from storage.run import RunDir
from tasks.executors import JobHandle, cancel_jobs, kill_local_job, queued_job_ids


@dataclass(frozen=True)
class JobRecord:
    kind: str  # executor kind: local | slurm
    job_id: str
    cells: tuple[str, ...]  # inversion or gradient cell ids of the element
    process: str | None = None  # local: "<host>/<boot id>/<start ticks>" of the pid


def request_cancel(run: RunDir) -> None:
    """Mark the run cancelled, so that a `gi-eval run` still driving it stops, not retries."""
    path = run.cancel_marker
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, str(time.time()).encode())


def cancel_requested(run: RunDir, *, since: float) -> bool:
    stamp = run_records.read_cancel_time(run.cancel_marker)  # damaged: its mtime
    return stamp is not None and stamp >= since


def record_jobs(
    run: RunDir,
    name: str,
    handles: Sequence[JobHandle],
    cell_ids: Sequence[Sequence[str]],
    *,
    submitted: float | None = None,
) -> Path | None:
    """One record file for an array: each element's job id and the ids of its cells
    (`cell_ids[h.index]`), so that `status` and `cancel` see the jobs of every flow;
    `submitted`: time.time() just before the submission. Returns the file (None: inline)."""
    when = time.time() if submitted is None else submitted
    records = [
        {
            "kind": h.kind,
            "job_id": h.job_id,
            "cells": list(cell_ids[h.index]),
            # A local job that already ended records None: it is never "running" again.
            "process": process_identity(int(h.job_id)) if h.kind == "local" else None,
            "submitted": when,
        }
        for h in handles
        if h.kind != "inline"
    ]
    if not records:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = run.job_record(f"{stamp}-{name}-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(records).encode())
    return path


def record_array_end(path: Path | None, *, ended: float | None = None) -> None:
    """Add the time the array's jobs were all gone (the driver saw them end) to its record; a
    record damaged or removed meanwhile is left as it is (readers ignore a damaged one)."""
    if path is None:
        return
    records = run_records.read_json(path, run_records.is_job_record)
    if records is None:
        return
    when = time.time() if ended is None else ended
    write_bytes_atomic(path, json.dumps([{**r, "ended": when} for r in records]).encode())


def read_records(run: RunDir) -> list[JobRecord]:
    records = []
    for path in sorted(run.jobs_dir.glob("*.json")):
        # a damaged record is ignored (logged) and quarantined by `gi-eval verify` / `run`
        for r in run_records.read_json(path, run_records.is_job_record) or []:
            cells = tuple(r["cells"])
            records.append(JobRecord(r["kind"], r["job_id"], cells, r.get("process")))
    return records


@dataclass(frozen=True)
class ArrayRecord:
    """One submitted array as its record file tells it (times: time.time(); None: unknown,
    a record written before the times were recorded, or an array still running)."""

    name: str  # gradients-0, inversions-0, inversions-<method key>-0, ...
    cells: tuple[str, ...]
    elements: int
    submitted: float | None
    ended: float | None


def array_records(run: RunDir) -> list[ArrayRecord]:
    """Every array of the run's job records (damaged records ignored), oldest first."""
    arrays = []
    for path in sorted(run.jobs_dir.glob("*.json")):
        found = run_records.read_json(path, run_records.is_job_record)
        if not found:
            continue
        # <stamp>-<name>-<pid>.json: the name itself may hold dashes
        name = path.stem.split("-", 1)[-1].rsplit("-", 1)[0]
        cells = tuple(c for r in found for c in r["cells"])
        submitted = [r["submitted"] for r in found if "submitted" in r]
        ended = [r["ended"] for r in found if "ended" in r]
        arrays.append(
            ArrayRecord(
                name,
                cells,
                len(found),
                min(submitted) if submitted else None,
                max(ended) if len(ended) == len(found) else None,
            )
        )
    return arrays


def active_records(run: RunDir, records: list[JobRecord] | None = None) -> list[JobRecord]:
    """Records whose job is still queued or running (Slurm: squeue; local: the very process
    that was recorded is alive, pid and start time)."""
    records = read_records(run) if records is None else records
    slurm = queued_job_ids({r.job_id for r in records if r.kind == "slurm"})
    return [
        r
        for r in records
        if (r.kind == "slurm" and r.job_id in slurm) or (r.kind == "local" and is_running(r))
    ]


def pending_records(run: RunDir) -> list[JobRecord]:
    """Active records that still hold a cell which is not committed."""
    done = run.committed_cells() | run.stored_gradients()
    return [r for r in active_records(run) if set(r.cells) - done]


def queued_cells(run: RunDir) -> set[str]:
    """Cells left to queued/running jobs: never a committed cell (its job may still run on)."""
    done = run.committed_cells() | run.stored_gradients()
    return {c for r in active_records(run) for c in r.cells} - done


def is_running(record: JobRecord) -> bool:
    """A local record's process is alive and is the recorded one (never a reused pid)."""
    if record.process is None or not record.job_id.isdigit():
        return False
    return process_identity(int(record.job_id)) == record.process


def job_cell_counts(run: RunDir) -> tuple[int, int]:
    """(cells in queued/running jobs, failed cells: their jobs ended without committing them)."""
    records = read_records(run)
    active = active_records(run, records)
    running = {c for r in active for c in r.cells}
    done = run.committed_cells() | run.stored_gradients()
    ended = {c for r in records for c in r.cells} - running
    return len(running - done), len(ended - done)


def stop_jobs(run: RunDir) -> int:
    """Mark the run cancelled (a driver still polling stops instead of resubmitting), then
    cancel every queued or running job it recorded; the number of jobs stopped. What `gi-eval
    cancel` and a cancelled Prefect flow run both do (the former also stops a detached driver
    first)."""
    request_cancel(run)
    active = active_records(run)
    cancel_jobs([JobHandle(kind="slurm", job_id=r.job_id, index=0) for r in active
                 if r.kind == "slurm"])  # fmt: skip
    for r in active:
        if r.kind == "local":
            kill_local_job(r.job_id)
    return len(active)
