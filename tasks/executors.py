"""Executor adapter: run ``fn(args)`` for a list of args inline, as local processes or as Slurm
job arrays. The one module of the project that imports submitit.

Slurm jobs are tracked with ``squeue`` only: accounting (``sacct``) is often absent or slow, so
nothing here calls ``job.result()`` or ``job.state``. Whether a job *succeeded* is not this
module's business: callers check their own commit markers after ``wait_for_jobs`` returns.

Preemption (see docs/slurm.md): Slurm sends SIGUSR2 ``signal_delay_s`` before the time limit (or
on ``scancel --signal=USR2 <id>``); submitit's handler then calls ``fn.checkpoint(args)`` wherever
the main thread happens to be, dumps the returned submission, runs ``scontrol requeue`` and
``sys.exit``\\ s. ``DeferredPreemption`` moves that moment to a safe point of a loop.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import submitit
from pydantic import BaseModel, ConfigDict, Field
from submitit.core.utils import FailedJobError, FailedSubmissionError

from tasks.errors import ExecutionError
from tasks.spec import ExecutorKind

# squeue states after which a job will not run again (anything else is still queued or running,
# including REQUEUED and the PENDING state a requeued job returns to).
_FINISHED_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)


class ExecutorConfig(BaseModel):
    """Where and how the jobs of one array run; embeddable in a grid spec.

    Slurm fields map to sbatch options; ``timeout_min`` also bounds local jobs (submitit kills a
    local job after it). ``max_array_size=None`` reads Slurm's MaxArraySize from ``scontrol``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ExecutorKind = "local"
    timeout_min: int = Field(default=60, ge=1)
    # slurm
    partition: str | None = None
    cpus_per_task: int = Field(default=1, ge=1)
    gpus_per_task: int | None = Field(default=None, ge=0)
    mem_gb: float | None = Field(default=None, gt=0)
    array_parallelism: int = Field(default=256, ge=1)
    account: str | None = None
    qos: str | None = None
    additional_parameters: dict[str, str | int] = Field(default_factory=dict)
    use_srun: bool = True  # False breaks preemption: USR2 without --batch reaches srun steps only
    signal_delay_s: int = Field(default=90, ge=1)  # USR2 this long before the time limit
    max_num_timeout: int = Field(default=3, ge=0)  # requeues after timeouts; preemptions are free
    max_array_size: int | None = Field(default=None, ge=1)
    setup: tuple[str, ...] = ()  # shell lines before the job's command (`module load ...`)
    srun_args: tuple[str, ...] = ()  # extra arguments of the srun that runs each element
    constraint: str | None = None  # --constraint, node features (e.g. "a100|h100")
    gres: str | None = None  # --gres (e.g. "gpu:a100:1"); when set, gpus_per_task is not rendered
    gpu_type: str | None = None  # --gpus-per-task=<type>:<n> (e.g. "a100")
    exclude: str | None = None  # --exclude, nodes never to use (e.g. "node[07-08]")
    job_name_prefix: str | None = None  # the grid name: `squeue` tells two grids apart
    # local
    max_parallel: int = Field(default=4, ge=1)


@dataclass(frozen=True)
class JobHandle:
    """One element of a submitted array: ``args_list[index]`` runs in job ``job_id``.

    ``job_id`` is ``<array id>_<index in array>`` (or a plain id) on Slurm, the process id for
    local jobs (several handles share one when ``max_parallel`` grouped them), ``inline-<i>``
    for inline runs, which are finished when the handle exists.
    """

    kind: ExecutorKind
    job_id: str
    index: int
    job: submitit.Job[Any] | None = field(default=None, compare=False, repr=False)


def submit_array(
    fn: Callable[[Any], Any],
    args_list: Sequence[Any],
    *,
    config: ExecutorConfig,
    log_dir: Path,
    name: str,
) -> list[JobHandle]:
    """Run ``fn(args)`` for every element of ``args_list``; returns one handle per element.

    ``fn`` must be picklable for local and Slurm runs; it may be a
    ``submitit.helpers.Checkpointable`` to be requeued on preemption. Inline runs propagate
    exceptions (they are for tests and debugging); other kinds report failures only through
    what the jobs (do not) write.
    """
    if not args_list:
        return []
    if config.kind == "inline":
        return _run_inline(fn, args_list)
    log_dir.mkdir(parents=True, exist_ok=True)
    if config.kind == "local":
        return _submit_local(fn, args_list, config=config, log_dir=log_dir)
    return _submit_slurm(fn, args_list, config=config, log_dir=log_dir, name=name)


def _run_inline(fn: Callable[[Any], Any], args_list: Sequence[Any]) -> list[JobHandle]:
    handles = []
    for index, args in enumerate(args_list):
        fn(args)
        handles.append(JobHandle(kind="inline", job_id=f"inline-{index}", index=index))
    return handles


@dataclass(frozen=True)
class _Sequential:
    """Picklable callable running ``fn`` over several args in one process (local grouping)."""

    fn: Callable[[Any], Any]
    args_list: tuple[Any, ...]

    def __call__(self) -> None:
        for args in self.args_list:
            self.fn(args)


def _submit_local(
    fn: Callable[[Any], Any], args_list: Sequence[Any], *, config: ExecutorConfig, log_dir: Path
) -> list[JobHandle]:
    """One process per element, or ``max_parallel`` processes running contiguous groups."""
    executor = submitit.LocalExecutor(folder=log_dir, max_num_timeout=config.max_num_timeout)
    executor.update_parameters(timeout_min=config.timeout_min)
    handles: list[JobHandle] = []
    for group in contiguous_groups(len(args_list), config.max_parallel):
        if len(group) == 1:
            job = executor.submit(fn, args_list[group[0]])
        else:
            job = executor.submit(_Sequential(fn, tuple(args_list[i] for i in group)))
        handles += [JobHandle(kind="local", job_id=job.job_id, index=i, job=job) for i in group]
    return handles


def contiguous_groups(n: int, max_groups: int) -> list[range]:
    """Split ``range(n)`` into at most ``max_groups`` contiguous, near-equal ranges."""
    groups = min(n, max_groups)
    bounds = [n * g // groups for g in range(groups + 1)]
    return [range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def array_chunks(n: int, max_array_size: int) -> list[range]:
    """Split ``range(n)`` into consecutive job arrays of at most ``max_array_size`` elements.

    Slurm array indices must be < MaxArraySize and submitit numbers them from 0, so one array
    holds at most MaxArraySize elements.
    """
    if max_array_size < 1:
        raise ExecutionError(f"max_array_size must be >= 1, got {max_array_size}")
    return [range(lo, min(lo + max_array_size, n)) for lo in range(0, n, max_array_size)]


def _submit_slurm(
    fn: Callable[[Any], Any],
    args_list: Sequence[Any],
    *,
    config: ExecutorConfig,
    log_dir: Path,
    name: str,
) -> list[JobHandle]:
    """Submit ``args_list`` as one or more job arrays (split at MaxArraySize)."""
    executor = _slurm_executor(config, log_dir=log_dir, name=name)
    max_size = config.max_array_size or slurm_max_array_size()
    handles: list[JobHandle] = []
    for chunk in array_chunks(len(args_list), max_size):
        jobs = _submit_batch(executor, fn, [args_list[i] for i in chunk], config=config)
        handles += [
            JobHandle(kind="slurm", job_id=job.job_id, index=i, job=job)
            for i, job in zip(chunk, jobs, strict=True)
        ]
    return handles


def _slurm_executor(config: ExecutorConfig, *, log_dir: Path, name: str) -> submitit.SlurmExecutor:
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise ExecutionError(
            "executor kind 'slurm' needs sbatch and srun on PATH: run from a Slurm login node, "
            "or use kind 'local'"
        )
    executor = submitit.SlurmExecutor(folder=log_dir, max_num_timeout=config.max_num_timeout)
    executor.update_parameters(**_sbatch_parameters(config, name=name))
    return executor


def _sbatch_parameters(config: ExecutorConfig, *, name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters; unset options are left to Slurm's defaults."""
    params: dict[str, Any] = {
        "job_name": f"{config.job_name_prefix}-{name}" if config.job_name_prefix else name,
        "time": config.timeout_min,
        "cpus_per_task": config.cpus_per_task,
        "array_parallelism": config.array_parallelism,
        "use_srun": config.use_srun,
        "signal_delay_s": config.signal_delay_s,
        # One task per element, said explicitly: a site default of several tasks would run
        # every cell of the element that many times over under srun.
        "additional_parameters": {"ntasks": 1, **config.additional_parameters},
    }
    optional = {
        "partition": config.partition,
        "gpus_per_task": _gpus_per_task(config),
        # SlurmExecutor passes `mem` to sbatch verbatim (only AutoExecutor converts mem_gb):
        # a bare float such as 2.0 is an "Invalid --mem specification".
        "mem": None if config.mem_gb is None else _sbatch_mem(config.mem_gb),
        "account": config.account,
        "qos": config.qos,
        "constraint": config.constraint,
        "gres": config.gres,
        "exclude": config.exclude,
        "setup": list(config.setup) or None,
        "srun_args": list(config.srun_args) or None,
    }
    params.update({key: value for key, value in optional.items() if value is not None})
    return params


def _gpus_per_task(config: ExecutorConfig) -> int | str | None:
    """--gpus-per-task value: "<type>:<n>" with a GPU type; None when no GPU is asked for or
    `gres` already asks (both together make Slurm count the GPUs twice or refuse the job)."""
    if config.gres is not None or not config.gpus_per_task:
        return None
    return f"{config.gpu_type}:{config.gpus_per_task}" if config.gpu_type else config.gpus_per_task


def render_sbatch(config: ExecutorConfig, *, log_dir: Path, name: str, elements: int) -> str:
    """The sbatch script `submit_array` would submit for an array of `elements` elements
    (the command line is a placeholder): for `gi-eval plan`, docs and `sbatch --test-only`."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = _sbatch_parameters(config, name=name)
    if elements > 1:
        params["map_count"] = elements
    return _make_sbatch_string(command="true", folder=log_dir, **params)


def _sbatch_mem(mem_gb: float) -> str:
    """GB as an sbatch --mem value: whole GB as "2GB", fractions in MB ("1536MB")."""
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def _submit_batch(
    executor: submitit.SlurmExecutor,
    fn: Callable[[Any], Any],
    args_list: list[Any],
    *,
    config: ExecutorConfig,
) -> list[submitit.Job[Any]]:
    try:
        with executor.batch():
            jobs = [executor.submit(fn, args) for args in args_list]
    except (FailedJobError, FailedSubmissionError) as e:
        raise ExecutionError(
            f"sbatch failed: {e}; check the partition ({config.partition or 'default'}) with "
            "`sinfo`, and account/qos/time limits with `scontrol show partition`"
        ) from e
    return jobs


def slurm_max_array_size() -> int:
    """Slurm's MaxArraySize, from ``scontrol show config``."""
    out = _run_slurm_command(["scontrol", "show", "config"])
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize":
            return int(value.strip())
    raise ExecutionError(
        "MaxArraySize missing from `scontrol show config`; set ExecutorConfig.max_array_size"
    )


def _run_slurm_command(command: list[str]) -> str:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        raise ExecutionError(
            f"`{' '.join(command)}` could not run ({e}); is this a Slurm node and slurmctld up?"
        ) from e
    if proc.returncode != 0:
        raise ExecutionError(
            f"`{' '.join(command)}` failed: {proc.stderr.strip()}; check slurmctld with `sinfo`"
        )
    return proc.stdout


def queued_job_ids(job_ids: Iterable[str]) -> set[str]:
    """The subset of ``job_ids`` still pending, running or being requeued, per ``squeue``.

    Ids may be array elements (``123_4``) or whole arrays / plain jobs (``123``; queued while
    any of its elements is). Jobs that finished and left ``squeue`` count as not queued.
    """
    wanted = set(job_ids)
    if not wanted:
        return set()
    active = _squeue_active_ids({job_id.split("_")[0] for job_id in wanted})
    return {j for j in wanted if j in active or any(a.startswith(f"{j}_") for a in active)}


def _squeue_active_ids(array_ids: set[str]) -> set[str]:
    """Ids (``123`` or ``123_4``, arrays expanded) of not-yet-finished jobs among ``array_ids``."""
    command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i %T"]
    command.append("--jobs=" + ",".join(sorted(array_ids)))
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    # squeue exits 1 when the only requested id is unknown (finished and purged): nothing queued.
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise ExecutionError(f"squeue failed: {proc.stderr.strip()}; check slurmctld with `sinfo`")
    rows = (line.split() for line in proc.stdout.splitlines() if line.strip())
    return {job_id for job_id, state in rows if state not in _FINISHED_STATES}


def active_job_ids(handles: Sequence[JobHandle]) -> set[str]:
    """Job ids among ``handles`` that are still queued or running."""
    slurm_ids = {h.job_id for h in handles if h.kind == "slurm"}
    local_ids = {h.job_id for h in handles if h.kind == "local" and not _local_done(h)}
    return queued_job_ids(slurm_ids) | local_ids


def _local_done(handle: JobHandle) -> bool:
    if handle.job is None:
        raise ExecutionError(f"local job {handle.job_id} has no submitit job (handle unpickled?)")
    return handle.job.done()


def wait_for_jobs(
    handles: Sequence[JobHandle],
    *,
    poll_s: float,
    timeout_s: float | None = None,
    on_poll: Callable[[set[str]], None] | None = None,
) -> None:
    """Block until no job of ``handles`` is queued or running (Slurm: per ``squeue``).

    ``on_poll`` receives the still-active job ids after every poll (progress reporting).
    Raises ExecutionError after ``timeout_s``; the jobs keep running (cancel them or wait again).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        active = active_job_ids(handles)
        if on_poll is not None:
            on_poll(active)
        if not active:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise ExecutionError(
                f"{len(active)} jobs still queued/running after {timeout_s} s "
                f"({', '.join(sorted(active)[:5])}, ...): wait again, or cancel them with "
                "cancel_jobs / scancel"
            )
        time.sleep(poll_s)


def cancel_jobs(handles: Sequence[JobHandle]) -> None:
    """Cancel the Slurm and local jobs of ``handles`` (finished ones are left alone)."""
    slurm_ids = sorted({h.job_id for h in handles if h.kind == "slurm"})
    if slurm_ids:
        _run_slurm_command(["scancel", *slurm_ids])
    local = {h.job_id: h for h in handles if h.kind == "local"}
    for handle in local.values():
        if not _local_done(handle):
            kill_local_job(handle.job_id)


def kill_local_job(job_id: str) -> None:
    """Kill a local job's controller and its task processes (SIGKILL).

    submitit's own cancel() sends SIGINT to the controller, which a process started in the
    background of a non-interactive shell ignores (inherited SIG_IGN), and the controller
    forwards SIGTERM to tasks that submitit tells to ignore it. Killing the tree is what works;
    an interrupted cell resumes from its last checkpoint when it is run again.
    """
    pid = int(job_id)
    for child in _children(pid):
        _kill(child)
    _kill(pid)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def job_environment() -> dict[str, str | int | None]:
    """Where this job element runs: Slurm job id (``123`` or ``123_4``), array index, host.

    Read from submitit's JobEnvironment inside a submitit job (Slurm or local); in-process
    (inline) runs have no job id. Recorded with every cell's metrics, so a slow or wrong
    result can be traced to its node and job log."""
    record: dict[str, str | int | None] = {
        "slurm_job_id": None,
        "slurm_array_index": None,
        "host": socket.gethostname(),
    }
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return record
    if env.cluster == "slurm":
        record["slurm_job_id"] = env.job_id
        index = env.array_task_id
        record["slurm_array_index"] = int(index) if index is not None else None
    return record


def threads_per_job(config: ExecutorConfig) -> int | None:
    """Torch threads for one job: its CPUs on Slurm, an equal share of this machine's cores for
    local jobs (default torch threads per job oversubscribe the cores: measured 7-28x slower on
    the smoke grid), None (leave as is) inline."""
    if config.kind == "slurm":
        return config.cpus_per_task
    if config.kind == "local":
        return max(1, (os.cpu_count() or 1) // config.max_parallel)
    return None


def preemption_signal() -> signal.Signals:
    """The signal submitit treats as preemption/timeout (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals[name]


class DeferredPreemption:
    """Hold submitit's preemption handler back until the loop reaches a safe point.

    Without it submitit runs ``checkpoint()`` the moment SIGUSR2 arrives, i.e. between any two
    bytecodes of the main thread — possibly mid-step. Inside this context the signal only sets
    ``requested``; ``safe_point()`` then hands it to the previous (submitit's) handler, which
    calls ``checkpoint()``, requeues the job and raises SystemExit. A signal still pending when
    the context exits is delivered there, so it is never lost. Python runs signal handlers on
    the main thread only, so worker threads (data loading, torch intra-op) cannot bypass this.
    Enter it from the main thread (``signal.signal`` refuses other threads)::

        with DeferredPreemption() as preemption:
            for step in range(start, n_steps):
                do_step()                # state is consistent again after this line
                preemption.safe_point()  # checkpoint() sees a finished step
    """

    def __init__(self, signum: int | None = None) -> None:
        self.signum = preemption_signal() if signum is None else signal.Signals(signum)
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Self:
        self._previous = signal.signal(self.signum, self._record)
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def safe_point(self) -> None:
        """Deliver a pending preemption to submitit's handler now (usually does not return)."""
        if self.requested:
            self._deliver()

    def _deliver(self) -> None:
        self.requested = False
        signal.signal(self.signum, self._previous)
        # raise_signal runs the restored Python handler before it returns (main thread).
        signal.raise_signal(self.signum)
        signal.signal(self.signum, self._record)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        signal.signal(self.signum, self._previous)
        if self.requested:  # even while an exception propagates: preemption must not be lost
            self.requested = False
            signal.raise_signal(self.signum)


class Resumable(submitit.helpers.Checkpointable):
    """Wrap ``fn(args, preemption)`` so that a job element survives preemption.

    Under submitit the element runs inside ``DeferredPreemption``: ``fn`` saves its state and
    calls ``preemption.safe_point()`` at consistent points; submitit then calls ``checkpoint``,
    which requeues this same callable (``fn`` resumes from what it saved). In-process (inline,
    or not on the main thread) preemption is simply never requested.
    """

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        self.fn = fn

    def __call__(self, args: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return self.fn(args, None)
        with DeferredPreemption() as preemption:
            return self.fn(args, preemption)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


__all__ = [
    "DeferredPreemption",
    "Resumable",
    "ExecutorConfig",
    "ExecutorKind",
    "JobHandle",
    "active_job_ids",
    "array_chunks",
    "cancel_jobs",
    "contiguous_groups",
    "job_environment",
    "preemption_signal",
    "queued_job_ids",
    "render_sbatch",
    "slurm_max_array_size",
    "submit_array",
    "wait_for_jobs",
]
