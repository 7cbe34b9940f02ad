"""prefect.yaml end to end on a REAL Prefect server (markers `slow`, `prefect_server`).

Starts `prefect server start` on a free 127.0.0.1 port with a fresh PREFECT_HOME, creates the
process work pool, runs `prefect deploy --all` from the repository root, starts a process worker,
then checks that

* the cron schedule of `smoke-nightly` produced scheduled flow runs (the scheduler service works:
  it does not with SQLAlchemy 2.1 beside prefect 3.8, see DESIGN.md "Offline facts"),
* a manual run of `smoke-nightly` with a tiny grid (parameters overridden) is picked up by the
  worker, runs from the repository root (the pull step) and reaches COMPLETED, and
* the run directory holds committed metrics and the table.

Anything in the environment that stops this (server won't start, deploy fails, ...) FAILS the
test with the logs attached; it is skipped only when the `prefect` CLI is not installed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn
from uuid import UUID

import pytest

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]

REPO = Path(__file__).resolve().parents[2]
PREFECT = Path(sys.executable).parent / "prefect"
POOL = "gi-eval-process"
NIGHTLY = "evaluation-grid/smoke-nightly"

SERVER_START_TIMEOUT_S = 150  # a fresh PREFECT_HOME migrates the database first: 10-60 s here
FLOW_RUN_TIMEOUT_S = 150
SCHEDULE_TIMEOUT_S = 60

TINY_GRID = """\
name: prefect-tiny
data: {dataset: lfw-faces, image_size: 32, num_batches: 1}
victim: {arch: convnet, width: 8, seed: 0}
methods:
  - {name: gi-x, params: {iterations: 4, restarts: 1}}
defenses:
  - {kind: none}
batch_sizes: [1]
seeds: [0]
execution:
  executor: inline
  cells_per_job: 1
  max_parallel: 1
"""


# --- processes ---------------------------------------------------------------------------------


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(lines[-n:])


def _children_of(pid: int) -> list[int]:
    """Every descendant of `pid` (Linux /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: signal.Signals, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group and every descendant (the process worker starts each flow run
    in a session of its own), then SIGKILL whatever is left after 15 s."""
    victims = _children_of(proc.pid) if proc.poll() is None else []
    _signal(proc.pid, signal.SIGTERM, group=True)
    for pid in victims:
        _signal(pid, signal.SIGTERM, group=False)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    _signal(proc.pid, signal.SIGKILL, group=True)
    for pid in victims:
        _signal(pid, signal.SIGKILL, group=True)
        _signal(pid, signal.SIGKILL, group=False)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class Cluster:
    """A Prefect server (and later a worker) in their own process groups; logs in tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(tmp_path / "prefect-home"),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
            # The scheduler visits deployments every 60 s by default; don't wait that long.
            PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
            PREFECT_WORKER_QUERY_SECONDS="2",
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        )
        self.env = env
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def spawn(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen([str(PREFECT), *args], cwd=cwd, env=self.env, stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs[name] = (proc, log)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {name} (pid {proc.pid}, exit {proc.poll()}) {log}:\n{_tail(log)}"
                         for name, (proc, log) in self.procs.items())

    def fail(self, message: str) -> NoReturn:
        pytest.fail(f"{message}\n{self.logs()}", pytrace=False)

    def cli(self, *args: str, timeout: float = 180) -> str:
        """Run a prefect CLI command from the repository root; fail with its output if it fails."""
        cmd = [str(PREFECT), *args]
        try:
            done = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as exc:
            self.fail(f"`{' '.join(args)}` took more than {timeout} s:\n{exc.stdout}\n{exc.stderr}")
        if done.returncode != 0:
            self.fail(f"`{' '.join(args)}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done.stdout + done.stderr

    def start_server(self) -> None:
        proc = self.spawn("server", ["server", "start", "--host", "127.0.0.1", "--port",
                                     str(self.port)], cwd=self.tmp)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.fail(f"`prefect server start` exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        self.fail(f"the Prefect server did not answer {self.api_url}/health within "
                  f"{SERVER_START_TIMEOUT_S} s")

    def stop(self) -> None:
        for proc, _ in reversed(list(self.procs.values())):  # the worker before the server
            _stop(proc)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if not PREFECT.is_file() and shutil.which("prefect") is None:
        pytest.skip(f"the prefect CLI is not installed ({PREFECT})")
    c = Cluster(tmp_path)
    try:
        c.start_server()
        yield c
    finally:
        c.stop()


# --- the test ----------------------------------------------------------------------------------


def _trigger(cluster: Cluster, spec: Path, out: Path) -> str:
    """`prefect deployment run` of the nightly deployment on the tiny grid; the flow run id."""
    triggered = cluster.cli("deployment", "run", NIGHTLY, "--param", f"spec_path={spec}",
                            "--param", f"out={out}", "--param", "executor=inline")
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", triggered)
    assert match, f"no flow run id in `prefect deployment run` output:\n{triggered}"
    return match.group(1)


def _wait_completed(cluster: Cluster, client: SyncPrefectClient, run_id: str) -> FlowRun:
    from prefect.client.schemas.objects import StateType

    state = None
    deadline = time.monotonic() + FLOW_RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        flow_run = client.read_flow_run(UUID(run_id))
        state = flow_run.state
        if state is not None and state.is_final():
            if state.type != StateType.COMPLETED:
                cluster.fail(f"flow run {run_id} ended {state!r}: {state.message}")
            return flow_run
        worker = cluster.procs["worker"][0]
        if worker.poll() is not None:
            cluster.fail(f"the worker exited with {worker.returncode}; flow run is {state!r}")
        time.sleep(2)
    cluster.fail(f"flow run {run_id} not finished after {FLOW_RUN_TIMEOUT_S} s: {state!r}")


def _stored(out: Path) -> set[tuple[str, int]]:
    """(path, mtime) of every file a cell writes: metric parts, gradient and image stores."""
    return {(str(p.relative_to(out)), p.stat().st_mtime_ns)
            for sub in ("metrics", "store") for p in (out / sub).rglob("*") if p.is_file()}


def test_deploy_schedule_and_run_on_a_process_worker(cluster: Cluster, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from storage.run import open_run

    started = time.monotonic()
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_GRID)
    out = tmp_path / "run"

    cluster.cli("work-pool", "create", POOL, "--type", "process")
    deployed = cluster.cli("--no-prompt", "deploy", "--all")
    assert "smoke-nightly" in deployed and "evaluation-grid/grid" in deployed, deployed
    # The worker runs elsewhere (tmp_path): the deployment's pull step must bring it back here.
    cluster.spawn("worker", ["worker", "start", "--pool", POOL, "--type", "process",
                             "--name", "gi-eval-test-worker"], cwd=tmp_path)
    first = _trigger(cluster, spec, out)

    with temporary_settings({PREFECT_API_URL: cluster.api_url}), \
            get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name(NIGHTLY)
        on_demand = client.read_deployment_by_name("evaluation-grid/grid")
        assert [s.schedule.cron for s in nightly.schedules] == ["30 2 * * *"]
        assert nightly.parameters == {"spec_path": "grids/smoke.yaml", "executor": "local",
                                      "out": "runs/smoke"}
        pull = nightly.pull_steps or []
        assert len(pull) == 1, pull
        directory = pull[0]["prefect.deployments.steps.set_working_directory"]["directory"]
        assert Path(directory).resolve() == REPO, pull
        assert nightly.work_pool_name == POOL and on_demand.work_pool_name == POOL
        assert on_demand.schedules == []

        def scheduled_runs() -> list:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            )

        flow_run = _wait_completed(cluster, client, first)
        assert flow_run.work_pool_name == POOL
        assert flow_run.parameters["executor"] == "inline"
        computed = _stored(out)
        assert computed, f"nothing stored under {out}"

        # The nightly re-run resumes: a second run on the same run directory finds every cell
        # committed and computes nothing (no stored file is added or rewritten). It also shows
        # that the deployment's concurrency slot (limit 1, CANCEL_NEW) was released.
        second = _trigger(cluster, spec, out)
        _wait_completed(cluster, client, second)
        assert _stored(out) == computed

        scheduled = scheduled_runs()
        deadline = time.monotonic() + SCHEDULE_TIMEOUT_S
        while not scheduled and time.monotonic() < deadline:
            time.sleep(2)
            scheduled = scheduled_runs()
        if not scheduled:
            cluster.fail(f"the scheduler created no scheduled run of {NIGHTLY} within "
                         f"{SCHEDULE_TIMEOUT_S} s")
        # The cron fires at 02:30 UTC; every scheduled run is for that time of day.
        for run in scheduled:
            when = run.expected_start_time
            assert when is not None and (when.hour, when.minute) == (2, 30), when

    run = open_run(out)
    metrics = run.metrics()
    assert len(metrics) == 1 and set(metrics["method"]) == {"gi-x"}, metrics
    assert (out / "reports" / "table.md").is_file()
    print(f"prefect server test: {time.monotonic() - started:.1f} s after server start")
