"""What the Prefect UI shows of a run, and what its Cancel button does to Slurm jobs, against a
REAL Prefect server, a process worker and the real Slurm cluster (markers `slow`,
`prefect_server`, `slurm`).

1. A tiny grid runs to completion through the `evaluation-grid/grid` deployment: the flow run is
   named after the grid, the UI's log pane has our lines (cells planned/skipped/submitted, job
   ids, log directory, report path), and the artifacts tab has the progress artifact at 100 %,
   Table 1 as markdown and a link to report.html.
2. A slow grid on the Slurm executor: once its job array is in `squeue`, the flow run is set to
   CANCELLING exactly as the UI's Cancel button (and `prefect flow-run cancel`) does. The worker
   SIGTERMs the flow-run process; the flow's on_cancellation hook cancels the jobs. Asserted:
   the flow run ends CANCELLED, the jobs leave `squeue`, the run carries the cancel marker.

The server/worker machinery is test_prefect_server.py's; the deadlines are hang guards.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from uuid import UUID

import pytest

from tests.integration.conftest import SlurmCluster
from tests.integration.test_prefect_server import POOL, Cluster, cluster  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server, pytest.mark.slurm]

ON_DEMAND = "evaluation-grid/grid"
FINISH_TIMEOUT_S = 300
QUEUE_TIMEOUT_S = 240
CANCEL_TIMEOUT_S = 180

TINY = """\
name: ui-tiny
data: {dataset: lfw-faces, image_size: 32, num_batches: 1}
victim: {arch: convnet, width: 8, seed: 0}
methods:
  - {name: gi-x, params: {iterations: 4, restarts: 1}}
batch_sizes: [1]
execution: {executor: inline, cells_per_job: 1, max_parallel: 1}
"""
# Long enough to still be running when cancelled (tens of minutes on one CPU).
SLOW = """\
name: ui-cancel
data: {dataset: lfw-faces, image_size: 32, num_batches: 2}
victim: {arch: convnet, width: 8, seed: 0}
methods:
  - {name: gi-x, params: {iterations: 200000, restarts: 1}}
batch_sizes: [1]
execution:
  executor: slurm
  cells_per_job: 1
  slurm: {cpus_per_task: 1, gpus_per_task: 0, mem_gb: 2, timeout_min: 30, array_parallelism: 2}
"""


def _deploy_and_start_worker(cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    cluster.cli("work-pool", "create", POOL, "--type", "process")
    deployed = cluster.cli("--no-prompt", "deploy", "--all")
    assert ON_DEMAND in deployed, deployed
    cluster.spawn(
        "worker",
        ["worker", "start", "--pool", POOL, "--type", "process", "--name", "gi-eval-ui-worker"],
        cwd=tmp_path,
    )


def _trigger(cluster: Cluster, spec: Path, out: Path) -> UUID:  # noqa: F811
    text = cluster.cli(
        "deployment", "run", ON_DEMAND, "--param", f"spec_path={spec}", "--param", f"out={out}"
    )
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", text)
    assert match, text
    return UUID(match.group(1))


def _wait_final(cluster: Cluster, client, run_id: UUID, timeout: float):  # noqa: ANN001, ANN202, F811
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    cluster.fail(f"flow run {run_id} not final after {timeout} s")


def _in_squeue(job_ids: set[str]) -> set[str]:
    out = subprocess.run(
        ["squeue", "--noheader", "--format=%i"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    return {j for j in out if j in job_ids or j.split("_")[0] in {i.split("_")[0] for i in job_ids}}


def test_ui_view_of_a_run_and_cancel_stops_slurm_jobs(
    cluster: Cluster,  # noqa: F811
    slurm_cluster: SlurmCluster,
    tmp_path: Path,
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import State

    from storage.run import open_run
    from tasks.cells import expand
    from tasks.jobs import read_records
    from tasks.spec import spec_from_yaml

    _deploy_and_start_worker(cluster, tmp_path)
    tiny, slow = tmp_path / "tiny.yaml", tmp_path / "slow.yaml"
    tiny.write_text(TINY)
    slow.write_text(SLOW)
    with (
        temporary_settings({PREFECT_API_URL: cluster.api_url}),
        get_client(sync_client=True) as client,
    ):
        # 1. the UI's view of a finished run
        done = _wait_final(
            cluster, client, _trigger(cluster, tiny, tmp_path / "tiny"), FINISH_TIMEOUT_S
        )
        assert done.state.type == StateType.COMPLETED, done.state
        assert done.name.startswith("ui-tiny-"), done.name
        needles = ("cells planned", "to submit", "job ids", "logs in", "report: ")
        deadline = time.monotonic() + 60  # logs reach the API in batches, after the state
        while True:
            log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[done.id]))
            text = "\n".join(r.message for r in client.read_logs(log_filter=log_filter))
            missing = [n for n in needles if n not in text]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert not missing, f"{missing} not in the flow run's logs:\n{text}"
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[done.id]))
        )
        # keys: <run directory name>-{progress,table-1,report}; Prefect stores a link artifact
        # as markdown "[text](url)"
        by_key = {a.key: a for a in artifacts}
        assert {"tiny-progress", "tiny-table-1", "tiny-report"} <= set(by_key), artifacts
        assert by_key["tiny-progress"].type == "progress"
        assert float(by_key["tiny-progress"].data) == 100.0
        assert "PSNR" in str(by_key["tiny-table-1"].data)
        assert re.search(
            r"\(file://.*/tiny/reports/report\.html\)", str(by_key["tiny-report"].data)
        )
        print("\n--- flow run", done.name, "logs:\n" + text)
        for a in artifacts:
            print(f"--- artifact {a.key} ({a.type}): {str(a.data)[:300]}")

        # 2. Cancel from the UI while the Slurm jobs run
        out = tmp_path / "slow"
        inversion_ids = {c.id for c in expand(spec_from_yaml(SLOW)).inversion_cells}
        run_id = _trigger(cluster, slow, out)
        job_ids: set[str] = set()
        deadline = time.monotonic() + QUEUE_TIMEOUT_S
        while time.monotonic() < deadline:
            if (out / "grid.yaml").is_file():
                records = [r for r in read_records(open_run(out)) if r.kind == "slurm"]
                inversion = [r for r in records if set(r.cells) & inversion_ids]
                job_ids = {r.job_id for r in records}
                if inversion and _in_squeue({r.job_id for r in inversion}):
                    break
            time.sleep(2)
        else:
            cluster.fail(
                f"no inversion job of {out} appeared in squeue within "
                f"{QUEUE_TIMEOUT_S} s (records: {job_ids})"
            )
        result = client.set_flow_run_state(run_id, State(type=StateType.CANCELLING))
        assert result.status.value == "ACCEPT", result
        cancelled = _wait_final(cluster, client, run_id, CANCEL_TIMEOUT_S)
        left = _in_squeue(job_ids)
        deadline = time.monotonic() + 60  # scancel is asynchronous: give slurmctld a moment
        while left and time.monotonic() < deadline:
            time.sleep(2)
            left = _in_squeue(job_ids)
        print(
            f"--- cancelled flow run: {cancelled.state!r}; jobs {sorted(job_ids)}; "
            f"still queued: {sorted(left)}"
        )
        assert cancelled.state.type == StateType.CANCELLED, cancelled.state
        assert not left, f"jobs {sorted(left)} still in squeue after the UI cancel"
        assert open_run(out).cancel_marker.is_file()
