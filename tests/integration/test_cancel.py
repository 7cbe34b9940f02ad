"""`gi-eval cancel` stops a running grid: its jobs die and the driving `gi-eval run` stops
instead of resubmitting them; committed cells stay and a rerun resumes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.run import open_run
from tasks.jobs import active_records, read_records

ROOT = Path(__file__).resolve().parents[2]
SPEC = """
name: cancel
data: {dataset: lfw-faces, image_size: 32, num_batches: 1}
victim: {arch: convnet, width: 4, seed: 0}
methods:
  - {name: gi-x, params: {iterations: 1000000, restarts: 1}}
batch_sizes: [1]
execution: {executor: local, cells_per_job: 1}
"""


def _gi_eval(*args: str, **kwargs) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def _wait(predicate, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("during", ["gradients", "inversions"])
def test_cancel_stops_jobs_and_the_driving_run(tmp_path: Path, during: str) -> None:
    spec, out, log = tmp_path / "cancel.yaml", tmp_path / "run", tmp_path / "run.log"
    spec.write_text(SPEC)
    with log.open("w") as sink:  # a file, not a pipe: job processes inherit the handles
        driver = subprocess.Popen(
            _gi_eval("run", str(spec), "--out", str(out)),
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:

        def running() -> bool:
            if not (out / "grid.yaml").is_file():
                return False
            run = open_run(out)
            if during == "gradients":  # cancel before the inversion array is even submitted
                return bool(active_records(run))
            grads = run.stored_gradients()  # an active job whose cells are not gradient cells
            return bool(grads) and any(set(r.cells).isdisjoint(grads) for r in active_records(run))

        _wait(running, timeout_s=240, what=f"the {during} job to start")
        records_before = len(read_records(open_run(out)))
        cancel = subprocess.run(
            _gi_eval("cancel", str(out)),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert cancel.returncode == 0, cancel.stderr
        assert driver.wait(timeout=120) == 1
        assert "cancelled" in log.read_text()
        run = open_run(out)
        assert active_records(run) == []
        assert len(read_records(run)) == records_before  # nothing was resubmitted
        assert run.committed_cells() == set()
    finally:
        driver.kill()
