"""A multigrad run's jobs go through the shared array runner (issue 17): `gi-eval status` shows
them and `gi-eval cancel` stops them, as for a grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

SPEC = {
    "name": "multigrad-jobs",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 1},
    "victim": {"arch": "convnet", "width": 8, "seed": 0},
    "batch_size": 1,
    "gradients": [2],
    "settings": ["reinit"],
    # long enough to be caught running: the test cancels it
    "params": {"iterations": 200000, "lr": 0.1, "restarts": 1},
    "execution": {"executor": "local", "cells_per_job": 1, "max_parallel": 1},
}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_multigrad_jobs_show_in_status_and_are_stopped_by_cancel(tmp_path: Path) -> None:
    spec, run = tmp_path / "mg.yaml", tmp_path / "run"
    spec.write_text(yaml.safe_dump(SPEC))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "multigrad", str(spec), "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        for _ in range(600):  # until the array is recorded (submission takes a few seconds)
            if list((run / "jobs").glob("*-multigrad-*.json")):
                break
            assert driver.poll() is None, driver.stdout.read() if driver.stdout else ""
            time.sleep(0.5)
        else:
            pytest.fail("the multigrad array was never recorded in <run>/jobs")
        status = _cli("status", str(run))
        assert status.returncode == 0, status.stderr
        assert "(multigrad 'multigrad-jobs')" in status.stdout
        assert "1 in 1 queued/running job(s)" in status.stdout
        cancel = _cli("cancel", str(run))
        assert cancel.returncode == 0, cancel.stderr
        assert "cancelled 1 job(s)" in cancel.stdout
        job_pid = int(
            json.loads(next((run / "jobs").glob("*-multigrad-*.json")).read_text())[0]["job_id"]
        )
        driver.wait(timeout=120)  # the driver sees its job gone and ends
        assert "cancelled" in (driver.stdout.read() if driver.stdout else "")
        assert not Path(f"/proc/{job_pid}").exists()  # the job itself was killed, no orphan
        after = _cli("status", str(run))
        assert "0 in 0 queued/running job(s)" in after.stdout
        assert "0 done" in after.stdout
    finally:
        if driver.poll() is None:
            driver.kill()
