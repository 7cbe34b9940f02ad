"""The GIML pipeline end to end (issue 10): task set -> meta-training + wrong prior ->
evaluation grids from `giml:`/`gan:` snapshots -> report; meta-training resumes after SIGKILL +
rerun (local) and after a USR2 requeue (real Slurm) with the uninterrupted run's final w."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import yaml

from gi_core.generators import build_generator
from storage.generator_snapshots import read_index, snapshot_path
from storage.run import RunDir
from tasks.executors import ExecutorConfig, kill_local_job, threads_per_job
from tasks.giml import held_out_indices
from tasks.giml_spec import GIMLSpec

if TYPE_CHECKING:
    from tests.integration.conftest import SlurmCluster

TIMEOUT_S = 900
TRAIN: dict[str, Any] = {
    "name": "giml-resume",
    "data": {"dataset": "lfw-faces", "image_size": 32},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "fl": {
        "clients": 3,
        "rounds": 2,
        "batch_size": 2,
        "lr": 0.1,
        "defense": {"kind": "sparsity", "p": 0.95},
    },
    "giml": {
        "params": {
            "tasks_per_step": 2,
            "meta_steps": 20,
            "latent_iterations": 3,
            "inner_steps": 2,
            "inner_optimizer": "adam",
        },
        "snapshots": [0, 10],
    },
    "execution": {
        "executor": "local",
        "max_parallel": 1,
        # timeout_min > 10: a USR2 counts as a preemption, not a timeout
        "slurm": {"cpus_per_task": 1, "gpus_per_task": 0, "mem_gb": 2, "timeout_min": 20},
    },
}
FULL: dict[str, Any] = {
    **TRAIN,
    "name": "giml-e2e",
    "giml": {
        **TRAIN["giml"],
        "params": {**TRAIN["giml"]["params"], "meta_steps": 3},
        "snapshots": [0, 2],
    },
    "prior": {
        "dataset": "natural-photos",
        "params": {"steps": 4, "batch_size": 8},
        "snapshots": [2],
        "checkpoint_every": 2,
    },
    "evaluation": {
        "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 2},
        "methods": [
            {"name": "gi-z", "params": {"z_iterations": 3, "restarts": 1}},
            {"name": "gi-z/w", "params": {"z_iterations": 2, "w_iterations": 2, "restarts": 1}},
        ],
        "untrained_methods": [{"name": "gi-w", "params": {"w_iterations": 3, "restarts": 1}}],
        "defenses": [{"kind": "sparsity", "p": 0.95}],
        "batch_sizes": [2],
    },
    "execution": {"executor": "inline"},
}


def _gi_eval() -> list[str]:
    script = Path(sys.executable).with_name("gi-eval")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _spec(tmp: Path, body: dict[str, Any], **execution: Any) -> Path:
    body = {**body, "execution": {**body["execution"], **execution}}
    path = tmp / f"{body['name']}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _giml(spec: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*_gi_eval(), "giml", str(spec), "--out", str(out), *extra],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    output, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, output
    return output


def _step(run: Path) -> int:
    try:
        return int(torch.load(run / "giml" / "state.pt", weights_only=True)["step"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


def _wait_for(predicate: Any, *, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _records(run: Path) -> list[dict[str, Any]]:
    return [r for p in sorted((run / "jobs").glob("*.json")) for r in json.loads(p.read_text())]


REFERENCE = """
import sys, torch, yaml
from pathlib import Path
from storage.generator_snapshots import read_index
from storage.run import create_run
from tasks.giml import TrainJob, generate_task_set, run_training
from tasks.giml_spec import GIMLSpec
spec_path, root, threads = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
text = spec_path.read_text()
spec = GIMLSpec.model_validate(yaml.safe_load(text))
run = create_run(root, text)
generate_task_set(run, spec)
run_training(TrainJob(str(run.root), "giml", threads))
print(read_index(run.root, spec.giml.config().meta_steps)["sha256"])
"""


def _reference_sha(tmp: Path, spec_path: Path, *, threads: int) -> str:
    """The uninterrupted meta-training at the jobs' thread count, in a process with the jobs'
    environment: OMP_NUM_THREADS at start-up fixes the BLAS threads, which torch.set_num_threads
    does not change, and so the reduction order (the pytest process has its own value)."""
    done = subprocess.run(
        [sys.executable, "-c", REFERENCE, str(spec_path), str(tmp / "reference"), str(threads)],
        env=_env(), capture_output=True, text=True, check=False, timeout=TIMEOUT_S,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()[-1]


@pytest.mark.slow
def test_giml_end_to_end_inline(tmp_path: Path) -> None:
    out = tmp_path / "run"
    output = _finish(_giml(_spec(tmp_path, FULL), out))
    assert "report:" in output
    report = (out / "reports" / "giml.md").read_text()
    for label in ("giml-00000", "giml-00002", "giml-00003", "wrong-prior", "untrained"):
        assert f"| {label} |" in report, label
    assert "GIML GI-z/w (giml-00003) − wrong-prior GI-z/w" in report
    for name in ("giml_psnr.png", "appendix_g_curves.png"):
        assert (out / "reports" / name).stat().st_size > 1000
    # snapshots: content-addressed, weights_only loadable, a sample grid per step
    for root, steps in ((out, (0, 2, 3)), (out / "prior", (2, 4))):
        for step in steps:
            path = snapshot_path(root, step)
            state = torch.load(path, map_location="cpu", weights_only=True)
            build_generator("dcgan32", output_size=32, state_dict=state)
            assert path.stem == read_index(root, step)["sha256"][:16]
            assert (root / "snapshots" / f"step-{step}.png").is_file()
    assert (out / "prior" / "reports" / "gan_losses.png").is_file()
    # the task set: M x R reports, theta moves between rounds, evaluation faces held out
    index = json.loads((out / "store" / "tasks" / "index.json").read_text())
    assert len(index["tasks"]) == 3 * 2
    t0, t1 = (
        torch.load(out / "store" / "thetas" / f"round-{r}.pt", weights_only=True) for r in (0, 1)
    )
    assert any(not torch.equal(t0[k], t1[k]) for k in t0)
    spec = GIMLSpec.model_validate(FULL)
    clients = {i for group in index["client_indices"] for i in group}
    assert held_out_indices(spec) and not clients & held_out_indices(spec)
    # the evaluation grids name the snapshots by reference
    assert f"giml:{out.resolve()}@3" in (out / "eval" / "giml-00003.yaml").read_text()


@pytest.mark.slow
def test_sigkill_and_rerun_continues_to_the_uninterrupted_w(tmp_path: Path) -> None:
    spec = _spec(tmp_path, TRAIN)
    out = tmp_path / "run"
    proc = _giml(spec, out)
    try:
        killed_at = _wait_for(
            lambda: _step(out) >= 3 and _step(out), timeout_s=TIMEOUT_S, what="meta step 3"
        )
        os.killpg(proc.pid, signal.SIGKILL)  # the driver ...
        for record in _records(out):  # ... and its meta-training job
            kill_local_job(record["job_id"])
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = (out / "snapshots" / "step-0.json").stat().st_mtime_ns
    resumed_from = _step(out)
    assert 3 <= killed_at <= resumed_from < 20
    assert not (out / "giml" / "done.json").exists()
    _finish(_giml(spec, out))
    threads = threads_per_job(ExecutorConfig(kind="local", max_parallel=1))
    assert read_index(out, 20)["sha256"] == _reference_sha(tmp_path, spec, threads=threads)
    assert (out / "snapshots" / "step-0.json").stat().st_mtime_ns == first  # not restarted
    assert json.loads((out / "giml" / "done.json").read_text())["steps"] == 20


@pytest.mark.slow
@pytest.mark.slurm
def test_usr2_requeue_continues_to_the_uninterrupted_w(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    spec = _spec(tmp_path, TRAIN, executor="slurm")
    out = tmp_path / "run"
    proc = _giml(spec, out)
    try:
        (record,) = _wait_for(lambda: _records(out), timeout_s=120, what="the job record")
        job_id = record["job_id"]
        _wait_for(lambda: _step(out) >= 2, timeout_s=TIMEOUT_S, what="meta step 2")
        # No --batch: the signal must reach the srun step, i.e. the Python process.
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        log = out / "logs" / f"{job_id}_0_log.out"
        _wait_for(
            lambda: log.is_file() and f"Requeued job {job_id}" in log.read_text(),
            timeout_s=120,
            what="submitit's requeue",
        )
        preempted = _step(out)
        _finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(
            ["scancel", *[r["job_id"] for r in _records(out)]], check=False, capture_output=True
        )
    assert 2 <= preempted < 20
    text = log.read_text()
    assert text.count("Starting with JobEnvironment") == 2  # ran, was requeued, ran again
    assert read_index(out, 20)["sha256"] == _reference_sha(tmp_path, spec, threads=1)
    assert RunDir(out).grid_path.is_file()
