"""`gi-eval run --detach`: the driver as a small, long, low-priority CPU Slurm job (issue 18).

The driver job runs the very command a user would keep alive on the login node,
`gi-eval run SPEC --out RUN --wait`, so it has the same lock and resume semantics: it skips
committed cells, waits for the arrays of an earlier (killed) driver, and `--wait` queues it
behind another driver of the same run instead of failing. Slurm requeues it after a
preemption or a node failure (`--requeue`); a killed driver is resumed by submitting again.

The job id is kept in <run>/driver.json (read defensively: a damaged file means "no known
driver"), so `gi-eval status` and `gi-eval cancel` find it from any shell.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gi_core.errors import ConfigError
from pipelines.memory import check_memory
from pipelines.planner import build_plan, grid_status, prepare_run
from storage import records
from storage.atomic import write_bytes_atomic
from storage.errors import EnvironmentProblem
from storage.layout import RunLayout
from storage.run import RunDir
from tasks.arrays import DETACHED_ENV
from tasks.executors import queued_job_ids
from tasks.preflight import check_before_submission
from tasks.resources import driver_resources
from tasks.spec import GridSpec, SlurmResources

# Positive nice: below the grid's own arrays (and other users' work) when the scheduler
# weighs priorities; any user may lower their own job's priority.
DRIVER_NICE = 1000


@dataclass(frozen=True)
class DriverRecord:
    job_id: str
    submitted: float  # time.time() of the submission
    log: str  # the driver's stdout/stderr (%j expanded)


def submit_driver(spec_path: Path, *, executor: str | None, out: Path | None) -> str:
    """Validate like `gi-eval run`, create the run directory, sbatch the driver; returns what
    to tell the user. Nothing waits for the grid."""
    grid = build_plan(spec_path, executor=executor, out=out)
    spec = grid.spec
    _require_slurm_executor(spec, grid.executor, flag=executor)
    _require_sbatch()
    run_path = grid.run_path.resolve()
    previous = read_driver(run_path)
    if previous is not None and queued_job_ids({previous.job_id}):
        raise EnvironmentProblem(
            f"{run_path}: driver job {previous.job_id} is still queued or running; follow it "
            f"with `gi-eval status {run_path}`, or stop it with `gi-eval cancel {run_path}`"
        )
    todo = grid.cells.inversion_cells  # expanding checks data set sizes, generators, methods
    check_before_submission(
        run_path, todo, [c.gradient for c in todo], keep_restarts=spec.storage.keep_restarts
    )
    check_memory(spec, todo, executor="slurm")  # _require_slurm_executor: nothing else
    run = prepare_run(spec, grid.text, run_path)  # `gi-eval status` works from now on
    script = driver_script(
        spec, spec_path=Path(spec_path).resolve(), run_path=run.root, executor=executor
    )
    job_id = _sbatch(script, run)
    record = DriverRecord(job_id, time.time(), str(run.driver_log(job_id)))
    write_bytes_atomic(run.driver_record, json.dumps(record.__dict__).encode())
    left = len(grid_status(grid.cells, run).todo)
    return (
        f"submitted driver job {job_id} for {run.root} ({left} of {len(todo)} cells to do); "
        f"log: {record.log}\nfollow it with `gi-eval status {run.root}`; "
        f"stop it and its arrays with `gi-eval cancel {run.root}`"
    )


def driver_script(spec: GridSpec, *, spec_path: Path, run_path: Path, executor: str | None) -> str:
    """The sbatch script of the driver job (also handed to `sbatch --test-only` in tests)."""
    slurm = spec.execution.slurm
    res = driver_resources(slurm)
    command = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "run",
        str(spec_path),
        "--out",
        str(run_path),
        "--wait",
    ]
    if executor is not None:
        command += ["--executor", executor]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={spec.name}-driver",
        f"#SBATCH --output={RunLayout(run_path).driver_log('%j')}",
        "#SBATCH --open-mode=append",
        "#SBATCH --ntasks=1",
        "#SBATCH --requeue",
        f"#SBATCH --nice={DRIVER_NICE}",
        f"#SBATCH --chdir={Path.cwd()}",
        *_resource_lines(res),
        *([f"#SBATCH --account={slurm.account}"] if slurm.account else []),
        "",
        *slurm.setup,
        # the driver runs this code base, found as in the submitting shell
        f"export PYTHONPATH={shlex.quote(os.environ.get('PYTHONPATH', ''))}",
        "export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1",
        # SIGTERM (preemption, requeue, scancel) must not cancel the arrays (tasks.arrays)
        f"export {DETACHED_ENV}=1",
        'echo "[driver] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on '
        '$(hostname) at $(date -u +%FT%TZ)"',
        "exec " + shlex.join(command),
        "",
    ]
    return "\n".join(lines)


def _resource_lines(res: SlurmResources) -> list[str]:
    mem = res.mem_gb or 2
    lines = [
        f"#SBATCH --cpus-per-task={res.cpus_per_task or 1}",
        f"#SBATCH --mem={int(mem)}GB" if mem == int(mem) else f"#SBATCH --mem={int(mem * 1024)}MB",
    ]
    if res.timeout_min is not None:
        lines.append(f"#SBATCH --time={res.timeout_min}")
    if res.partition is not None:
        lines.append(f"#SBATCH --partition={res.partition}")
    if res.qos is not None:
        lines.append(f"#SBATCH --qos={res.qos}")
    if res.gpus_per_task:
        gpus = f"{res.gpu_type}:{res.gpus_per_task}" if res.gpu_type else res.gpus_per_task
        lines.append(f"#SBATCH --gpus-per-task={gpus}")
    return lines


def _require_slurm_executor(spec: GridSpec, kind: str, *, flag: str | None) -> None:
    """A detached grid runs on the cluster: its arrays must be Slurm jobs too (a local or
    inline executor would squeeze the whole grid into the driver's one CPU). Checked without
    importing Prefect, which would double the time `--detach` takes to return. `kind`: the
    resolved executor (planner.resolve_executor); `flag`: the CLI's, for the message."""
    if kind != "slurm":
        where = "--executor" if flag else "execution.executor"
        raise ConfigError(
            f"{where}: --detach hands the grid to Slurm, so the executor must be slurm "
            f"(got {kind!r}); pass --executor slurm, or drop --detach"
        )


def _require_sbatch() -> None:
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise EnvironmentProblem(
            "--detach needs sbatch and squeue on PATH: run it on a Slurm login node, or drop "
            "--detach to drive the grid from this shell"
        )


def _sbatch(script: str, run: RunDir) -> str:
    run.logs_dir.mkdir(parents=True, exist_ok=True)
    path = run.driver_script
    path.write_text(script)
    proc = subprocess.run(
        ["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise EnvironmentProblem(
            f"sbatch refused the driver job ({proc.stderr.strip()}); the script is {path}; "
            "check execution.slurm.driver (partition, qos, time) against `sinfo`"
        )
    return proc.stdout.strip().split(";")[0]


def read_driver(run_root: Path) -> DriverRecord | None:
    """The last submitted driver of a run; None when there is none or its record is damaged
    (a damaged record only loses the driver's job id: the grid itself is untouched)."""
    data = records.read_json(RunLayout(run_root).driver_record, records.is_driver_record)
    if data is None:  # damaged: logged, and `verify` quarantines it
        return None
    return DriverRecord(str(data["job_id"]), float(data["submitted"]), str(data["log"]))


def driver_state(job_id: str) -> str | None:
    """squeue's state of the driver job (PENDING, RUNNING, ...), None once it left the queue."""
    proc = subprocess.run(
        ["squeue", "--noheader", "--format=%T", f"--jobs={job_id}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    states = proc.stdout.split() if proc.returncode == 0 else []
    return states[0] if states else None


def driver_status_line(run_root: Path) -> str | None:
    """`gi-eval status` line of a detached run's driver; None for a run never detached."""
    record = read_driver(run_root)
    if record is None:
        return None
    state = driver_state(record.job_id) if shutil.which("squeue") else None
    if state is None:
        return f"driver: job {record.job_id} has left the queue (log: {record.log})"
    return f"driver: job {record.job_id} {state} (log: {record.log})"


def cancel_driver(run_root: Path) -> str | None:
    """scancel the run's driver job if it is still queued; returns its id then, else None."""
    record = read_driver(run_root)
    if record is None or shutil.which("scancel") is None:
        return None
    if not queued_job_ids({record.job_id}):
        return None
    subprocess.run(
        ["scancel", record.job_id], capture_output=True, text=True, timeout=60, check=False
    )
    return record.job_id
