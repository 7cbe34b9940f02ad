"""tasks.executors on every executor kind, including a real Slurm cluster (marker `slurm`).

The Slurm tests need `tests/cluster/start-slurm.sh` (or any cluster whose nodes see tmp_path).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import cloudpickle
import pytest
from submitit.helpers import Checkpointable, DelayedSubmission

from tasks.errors import ExecutionError
from tasks.executors import (
    DeferredPreemption,
    ExecutorConfig,
    array_chunks,
    cancel_jobs,
    contiguous_groups,
    queued_job_ids,
    submit_array,
    wait_for_jobs,
)

if TYPE_CHECKING:
    from tests.integration.conftest import SlurmCluster

# Jobs unpickle their function in a fresh interpreter whose cwd/sys.path need not contain tests/:
# ship this module's functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _write_square(args: tuple[str, int]) -> None:
    out_dir, x = args
    Path(out_dir, f"{x}.json").write_text(json.dumps({"x": x, "square": x * x}))


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _outputs(out_dir: Path) -> dict[int, int]:
    rows = (json.loads(p.read_text()) for p in out_dir.glob("*.json"))
    return {row["x"]: row["square"] for row in rows}


class _Counter(Checkpointable):
    """A toy optimisation loop: ``n_steps`` steps of ``step_s`` s accumulating sum(step**2).

    Each step updates ``total`` *before* sleeping and ``step`` after, so the state is
    inconsistent mid-step: a checkpoint taken there would double-count on resume. Progress is
    saved to ``<key>.state.json`` by ``checkpoint()`` and the requeued job starts from a fresh
    instance, so resuming really goes through the file (as a cell's optimiser state would).
    """

    def __init__(self, out_dir: str, n_steps: int, step_s: float) -> None:
        self.out_dir = out_dir
        self.n_steps = n_steps
        self.step_s = step_s
        self._step = 0
        self._total = 0
        self._in_step = False

    def _path(self, key: str, suffix: str) -> Path:
        return Path(self.out_dir, f"{key}.{suffix}")

    def __call__(self, key: str) -> None:
        if self._path(key, "state.json").exists():
            state = json.loads(self._path(key, "state.json").read_text())
            self._step, self._total = state["step"], state["total"]
        with DeferredPreemption() as preemption:
            while self._step < self.n_steps:
                self._in_step = True
                self._total += self._step**2
                time.sleep(self.step_s)
                self._step += 1
                self._in_step = False
                with self._path(key, "trace").open("a") as f:
                    f.write(f"{self._step}\n")
                preemption.safe_point()
        result = {"step": self._step, "total": self._total}
        self._path(key, "result.json").write_text(json.dumps(result))

    def checkpoint(self, key: str) -> DelayedSubmission:
        state = {"step": self._step, "total": self._total, "in_step": self._in_step}
        self._path(key, "state.json").write_text(json.dumps(state))
        with self._path(key, "checkpoints").open("a") as f:
            f.write(json.dumps(state) + "\n")
        return DelayedSubmission(_Counter(self.out_dir, self.n_steps, self.step_s), key)


# --- pure helpers ------------------------------------------------------------------------------


def test_array_chunks_respect_max_array_size() -> None:
    assert array_chunks(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert array_chunks(1001, 1001) == [range(0, 1001)]
    assert array_chunks(1002, 1001) == [range(0, 1001), range(1001, 1002)]
    assert array_chunks(0, 3) == []
    with pytest.raises(ExecutionError):
        array_chunks(3, 0)


def test_contiguous_groups_cover_all_indices_once() -> None:
    groups = contiguous_groups(7, 3)
    assert [list(g) for g in groups] == [[0, 1], [2, 3], [4, 5, 6]]
    assert contiguous_groups(2, 4) == [range(0, 1), range(1, 2)]


def test_config_rejects_unknown_fields_and_kinds() -> None:
    with pytest.raises(ValueError, match="partiton"):
        ExecutorConfig(kind="slurm", partiton="gpu")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="kind"):
        ExecutorConfig(kind="kubernetes")  # type: ignore[arg-type]


# --- DeferredPreemption in process (no Slurm: the "submitit handler" is a stand-in) -----------


def test_deferred_preemption_holds_signal_until_safe_point() -> None:
    calls: list[str] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append("handler"))
    try:
        with DeferredPreemption() as preemption:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)  # a step in progress: the Python handler has certainly run by now
            calls.append("step done")
            assert preemption.requested
            preemption.safe_point()
            assert not preemption.requested
        assert calls == ["step done", "handler"]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_deferred_preemption_delivers_pending_signal_on_exit() -> None:
    calls: list[str] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append("handler"))
    try:
        with DeferredPreemption():
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            assert calls == []
        assert calls == ["handler"]
        assert signal.getsignal(signal.SIGUSR2) is not None  # previous handler restored
    finally:
        signal.signal(signal.SIGUSR2, previous)


# --- inline and local --------------------------------------------------------------------------


def test_inline_array_runs_in_process(tmp_path: Path) -> None:
    config = ExecutorConfig(kind="inline")
    handles = submit_array(
        _write_square, [(str(tmp_path), x) for x in range(3)], config=config,
        log_dir=tmp_path / "logs", name="t",
    )  # fmt: skip
    wait_for_jobs(handles, poll_s=0.1)
    assert [h.index for h in handles] == [0, 1, 2]
    assert _outputs(tmp_path) == {0: 0, 1: 1, 2: 4}


def test_local_array_groups_beyond_max_parallel(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    config = ExecutorConfig(kind="local", max_parallel=2, timeout_min=2)
    handles = submit_array(
        _write_square, [(str(out), x) for x in range(5)], config=config,
        log_dir=tmp_path / "logs", name="t",
    )  # fmt: skip
    assert len({h.job_id for h in handles}) == 2  # 5 elements in 2 processes
    wait_for_jobs(handles, poll_s=0.2, timeout_s=60)
    assert _outputs(out) == {x: x * x for x in range(5)}


def test_local_cancel_stops_jobs(tmp_path: Path) -> None:
    config = ExecutorConfig(kind="local", max_parallel=2)
    handles = submit_array(_sleep, [60, 60], config=config, log_dir=tmp_path, name="t")
    cancel_jobs(handles)
    wait_for_jobs(handles, poll_s=0.2, timeout_s=20)


# --- real Slurm --------------------------------------------------------------------------------


def _slurm_config(cluster: SlurmCluster, *, max_array_size: int | None = None) -> ExecutorConfig:
    return ExecutorConfig(
        kind="slurm", partition=cluster.partition, timeout_min=5, max_array_size=max_array_size
    )


@pytest.mark.slurm
def test_slurm_array_runs_every_element(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    handles = submit_array(
        _write_square, [(str(out), x) for x in range(4)], config=_slurm_config(slurm_cluster),
        log_dir=tmp_path / "logs", name="gi-test-array",
    )  # fmt: skip
    array_ids = {h.job_id.split("_")[0] for h in handles}
    assert len(array_ids) == 1 and all("_" in h.job_id for h in handles)
    wait_for_jobs(handles, poll_s=0.5, timeout_s=90)
    assert _outputs(out) == {x: x * x for x in range(4)}
    assert queued_job_ids(h.job_id for h in handles) == set()


@pytest.mark.slurm
def test_slurm_array_split_at_max_array_size(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    config = _slurm_config(slurm_cluster, max_array_size=2)
    handles = submit_array(
        _write_square, [(str(out), x) for x in range(5)], config=config,
        log_dir=tmp_path / "logs", name="gi-test-split",
    )  # fmt: skip
    # 5 elements in arrays of 2, 2 and 1 (a lone element is submitted as a plain job)
    assert len({h.job_id.split("_")[0] for h in handles}) == 3
    assert [h.index for h in handles] == list(range(5))
    wait_for_jobs(handles, poll_s=0.5, timeout_s=90)
    assert _outputs(out) == {x: x * x for x in range(5)}


@pytest.mark.slurm
def test_slurm_sbatch_error_says_what_to_check(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    config = ExecutorConfig(kind="slurm", partition="no-such-partition", timeout_min=1)
    with pytest.raises(ExecutionError, match="sinfo"):
        submit_array(_sleep, [0, 0], config=config, log_dir=tmp_path, name="gi-test-bad")


@pytest.mark.slurm
def test_slurm_cancel_removes_jobs_from_queue(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    handles = submit_array(
        _sleep, [120, 120, 120], config=_slurm_config(slurm_cluster), log_dir=tmp_path,
        name="gi-test-cancel",
    )  # fmt: skip
    ids = {h.job_id for h in handles}
    assert queued_job_ids(ids) == ids
    with pytest.raises(ExecutionError, match="still queued"):
        wait_for_jobs(handles, poll_s=0.2, timeout_s=0.5)
    cancel_jobs(handles)
    wait_for_jobs(handles, poll_s=0.5, timeout_s=30)
    assert queued_job_ids(ids) == set()


def _wait_for_lines(path: Path, n: int, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and len(path.read_text().split()) >= n):
        assert time.monotonic() < deadline, f"{path} did not reach {n} lines in {timeout_s} s"
        time.sleep(0.2)


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_usr2_checkpoints_requeues_and_resumes(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    counter = _Counter(str(out), n_steps=8, step_s=0.5)
    handles = submit_array(
        counter, ["interrupted", "uninterrupted"], config=_slurm_config(slurm_cluster),
        log_dir=tmp_path / "logs", name="gi-test-ckpt",
    )  # fmt: skip
    interrupted = handles[0].job_id
    _wait_for_lines(out / "interrupted.trace", 2, timeout_s=60)
    # No --batch: the signal goes to the srun step, i.e. to the Python process submitit runs.
    subprocess.run(["scancel", "--signal=USR2", interrupted], check=True)
    wait_for_jobs(handles, poll_s=0.5, timeout_s=100)

    expected = {"step": 8, "total": sum(i * i for i in range(8))}
    _Counter(str(tmp_path), n_steps=8, step_s=0.0)("inline")  # same loop, never interrupted
    assert json.loads((tmp_path / "inline.result.json").read_text()) == expected
    for key in ("interrupted", "uninterrupted"):
        assert json.loads((out / f"{key}.result.json").read_text()) == expected
        # every step ran exactly once although the job was killed and restarted
        assert (out / f"{key}.trace").read_text().split() == [str(i) for i in range(1, 9)]
    checkpoints = (out / "interrupted.checkpoints").read_text().splitlines()
    assert len(checkpoints) == 1 and json.loads(checkpoints[0])["in_step"] is False
    assert not (out / "uninterrupted.checkpoints").exists()
    log = (tmp_path / "logs" / f"{interrupted}_0_log.out").read_text()  # submitit INFO lines
    assert f"Requeued job {interrupted}" in log
