"""Issue 13's reliability defects that need a second, real process (moved from
tests/unit/test_reliability.py, which starts none: decision 223): a job record naming a reused
pid (defect 1) and two drivers on one run directory (defect 7).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.commands import cancel_run, status_report
from storage.lock import LOCK_FILE, RunLocked, driver_lock, process_identity
from tasks.jobs import active_records, pending_records, queued_cells
from tests.unit.test_reliability import (
    ROOT,
    cli,
    committed_run,
    one_error_line,
    write_record,
    write_spec,
)


@pytest.fixture()
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated live process whose pid an old job record happens to name."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


# ---- defect 1: bare-pid job records ------------------------------------------------------------


def test_reused_pid_is_neither_queued_nor_signalled(tmp_path: Path, bystander: Any) -> None:
    run, ids = committed_run(tmp_path / "run", cells=1)
    # A record as written on 848111e (bare pid) and one whose recorded start time differs:
    # both name a live process that is not the job.
    write_record(run, [
        {"kind": "local", "job_id": str(bystander.pid), "cells": ["c-old"]},
        {"kind": "local", "job_id": str(bystander.pid), "cells": ["c-new"],
         "process": "host/boot/1"},
    ])
    assert active_records(run) == []
    assert queued_cells(run) == set()
    assert "0 in 0 queued/running job(s)" in status_report(run.root)
    cancel_run(run.root)
    time.sleep(0.2)  # let a (wrong) SIGKILL land before looking
    assert bystander.poll() is None, "cancel killed a process that is not one of the run's jobs"


def test_live_recorded_job_counts_but_its_committed_cells_do_not(
    tmp_path: Path, bystander: Any
) -> None:
    run, ids = committed_run(tmp_path / "run", cells=1)
    identity = process_identity(bystander.pid)
    write_record(run, [{"kind": "local", "job_id": str(bystander.pid), "cells": [ids[0]],
                        "process": identity}])
    assert len(active_records(run)) == 1  # the very process is alive: a running job
    assert queued_cells(run) == set()  # ... but its only cell is committed: nothing queued
    assert pending_records(run) == []  # so `gi-eval run` does not wait for it


# ---- defect 7: two drivers on one run directory ----------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from storage.lock import driver_lock
with driver_lock(Path(sys.argv[1]), wait=False):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(root: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(root)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_driver_exits_3_and_a_killed_drivers_lock_is_stale(tmp_path: Path) -> None:
    run, _ = committed_run(tmp_path / "run", cells=1)
    holder = _holder(run.root)
    try:
        code, _, err = cli("run", str(write_spec(tmp_path / "s.yaml")), "--out", str(run.root))
        line = one_error_line(err)
        assert code == 3 and f"pid {holder.pid}" in line and "--wait" in line
        with pytest.raises(RunLocked), driver_lock(run.root, wait=False):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with driver_lock(run.root, wait=False) as stale:  # the kernel released the flock
        assert stale is not None and stale.pid == holder.pid
    with driver_lock(run.root, wait=False) as stale:  # a clean exit leaves no holder
        assert stale is None
    assert (run.root / LOCK_FILE).read_text() == ""


def test_wait_queues_behind_the_first_driver(tmp_path: Path) -> None:
    run, _ = committed_run(tmp_path / "run", cells=1)
    holder = _holder(run.root)
    told: list[Any] = []

    def release(h: Any) -> None:  # called once when the waiter starts waiting
        told.append(h)
        holder.terminate()

    try:
        with driver_lock(run.root, wait=True, poll_s=0.1, on_wait=release) as stale:
            assert told and told[0].pid == holder.pid
            assert stale is not None  # SIGTERM'd holder never emptied the file
    finally:
        holder.kill()
        holder.wait()
