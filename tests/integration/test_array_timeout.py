"""A Prefect task timeout on a job array cancels the array's jobs (local and Slurm)."""

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
name: timeout
data: {{dataset: lfw-faces, image_size: 32, num_batches: 1}}
victim: {{arch: convnet, width: 4, seed: 0}}
methods:
  - {{name: gi-x, params: {{iterations: 1000000, restarts: 1}}}}
batch_sizes: [1]
execution:
  executor: {executor}
  cells_per_job: 1
  array_timeout_h: {hours}
  slurm: {{cpus_per_task: 1, gpus_per_task: 0, mem_gb: 2, timeout_min: 30}}
"""


def _run_until_timeout(tmp_path: Path, executor: str) -> Path:
    spec = tmp_path / "timeout.yaml"
    spec.write_text(SPEC.format(executor=executor, hours=30 / 3600))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(spec), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return out


def _assert_jobs_cancelled(out: Path) -> None:
    run = open_run(out)
    inversion_jobs = [r for r in read_records(run) if r.cells and not run.has_gradient(r.cells[0])]
    assert inversion_jobs, "the inversion array was never submitted"
    deadline = time.monotonic() + 60  # scancel / SIGTERM take a moment to show
    while active_records(run) and time.monotonic() < deadline:
        time.sleep(1)
    assert active_records(run) == []
    assert run.committed_cells() == set()


@pytest.mark.slow
def test_timeout_cancels_local_jobs(tmp_path: Path) -> None:
    _assert_jobs_cancelled(_run_until_timeout(tmp_path, "local"))


@pytest.mark.slow
@pytest.mark.slurm
def test_timeout_cancels_slurm_jobs(tmp_path: Path, slurm_cluster) -> None:
    _assert_jobs_cancelled(_run_until_timeout(tmp_path, "slurm"))
