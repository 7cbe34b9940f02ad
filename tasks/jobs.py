"""Job records: which cells went to which job, so that a rerun does not resubmit cells whose
jobs are still queued and `gi-eval cancel` can find every job of a run.

One small JSON file per submitted array under <run>/jobs/, written atomically, never edited.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from storage.atomic import write_bytes_atomic
from storage.run import RunDir
from tasks.executors import JobHandle, queued_job_ids
from tasks.work import Chunk

CANCEL_MARKER = "CANCEL"


@dataclass(frozen=True)
class JobRecord:
    kind: str  # executor kind: local | slurm
    job_id: str
    cells: tuple[str, ...]  # inversion or gradient cell ids of the element


def jobs_dir(run: RunDir) -> Path:
    return run.root / "jobs"


def request_cancel(run: RunDir) -> None:
    """Mark the run cancelled, so that a `gi-eval run` still driving it stops, not retries."""
    path = jobs_dir(run) / CANCEL_MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, str(time.time()).encode())


def cancel_requested(run: RunDir, *, since: float) -> bool:
    path = jobs_dir(run) / CANCEL_MARKER
    return path.is_file() and float(path.read_text()) >= since


def record_jobs(
    run: RunDir, name: str, handles: Sequence[JobHandle], chunks: Sequence[Chunk]
) -> None:
    records = [
        {"kind": h.kind, "job_id": h.job_id, "cells": [c["id"] for c in chunks[h.index].cells]}
        for h in handles
        if h.kind != "inline"
    ]
    if records:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = jobs_dir(run) / f"{stamp}-{name}-{os.getpid()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, json.dumps(records).encode())


def read_records(run: RunDir) -> list[JobRecord]:
    records = []
    for path in sorted(jobs_dir(run).glob("*.json")):
        for r in json.loads(path.read_text()):
            records.append(JobRecord(r["kind"], r["job_id"], tuple(r["cells"])))
    return records


def active_records(run: RunDir, records: list[JobRecord] | None = None) -> list[JobRecord]:
    """Records whose job is still queued or running (Slurm: squeue; local: the pid is alive)."""
    records = read_records(run) if records is None else records
    slurm = queued_job_ids({r.job_id for r in records if r.kind == "slurm"})
    return [
        r
        for r in records
        if (r.kind == "slurm" and r.job_id in slurm) or (r.kind == "local" and _alive(r.job_id))
    ]


def job_cell_counts(run: RunDir) -> tuple[int, int]:
    """(cells in queued/running jobs, failed cells: their jobs ended without committing them)."""
    records = read_records(run)
    active = active_records(run, records)
    running = {c for r in active for c in r.cells}
    done = run.committed_cells() | run.stored_gradients()
    ended = {c for r in records for c in r.cells} - running
    return len(running - done), len(ended - done)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return _not_zombie(int(pid))


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True
