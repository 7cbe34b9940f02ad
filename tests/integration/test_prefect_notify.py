"""Issue 18, Acceptance 4: a deployment run tells someone when it finishes or fails.

On a REAL Prefect server with a process worker (the fixture of test_prefect_server.py), the
`evaluation-grid/grid` deployment of prefect.yaml is run twice with a local HTTP receiver on
127.0.0.1 standing in for a chat/CI webhook:

* a tiny grid with `notify_url` and the scheduler overrides (budget_scale, max_parallel,
  retries) completes; the receiver gets a JSON summary saying COMPLETED, and the run's frozen
  grid.yaml holds the overrides;
* a run whose spec does not exist fails; a saved Prefect notification block
  (`notify_block`, a custom webhook) tells the receiver FAILED.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from tests.integration.test_prefect_server import POOL, TINY_GRID, Cluster, cluster  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]
GRID = "evaluation-grid/grid"
RUN_TIMEOUT_S = 240


class Receiver:
    """An HTTP server on 127.0.0.1 keeping every POSTed body."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", 0))
                received.append((self.path, self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, path: str, timeout_s: float = 60) -> bytes:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for got, body in self.bodies:
                if got == path:
                    return body
            time.sleep(0.5)
        pytest.fail(f"no POST to {path} within {timeout_s} s (got {self.bodies!r})")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def _run(c: Cluster, *params: str) -> str:
    args = [a for p in params for a in ("--param", p)]
    out = c.cli("deployment", "run", GRID, *args)
    for word in out.split():
        if len(word) == 36 and word.count("-") == 4:
            return word
    c.fail(f"no flow run id in `prefect deployment run` output:\n{out}")


def _final_state(c: Cluster, client: Any, run_id: str) -> Any:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        state = client.read_flow_run(UUID(run_id)).state
        if state is not None and state.is_final():
            return state
        time.sleep(2)
    c.fail(f"flow run {run_id} not final after {RUN_TIMEOUT_S} s")


def test_deployment_runs_notify_on_completion_and_failure(
    cluster: Cluster, receiver: Receiver, tmp_path: Path  # noqa: F811 - the fixture
) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    spec, out = tmp_path / "tiny.yaml", tmp_path / "run"
    spec.write_text(TINY_GRID)
    cluster.cli("work-pool", "create", POOL, "--type", "process")
    cluster.cli("--no-prompt", "deploy", "--all")
    cluster.spawn("worker", ["worker", "start", "--pool", POOL, "--type", "process",
                             "--name", "gi-eval-notify-worker"], cwd=tmp_path)
    with temporary_settings({PREFECT_API_URL: cluster.api_url}), \
            get_client(sync_client=True) as client:
        CustomWebhookNotificationBlock(
            name="gi-eval", url=f"{receiver.url}/block", method="POST",
            json_data={"subject": "{{subject}}", "text": "{{body}}"}, allow_private_urls=True,
        ).save("gi-eval-test", overwrite=True)

        done = _run(cluster, f"spec_path={spec}", f"out={out}", "executor=inline",
                    "budget_scale=0.5", "max_parallel=1", "retries=0",
                    f"notify_url={receiver.url}/done")
        assert _final_state(cluster, client, done).type == StateType.COMPLETED, cluster.logs()
        body = json.loads(receiver.wait("/done"))
        assert body["state"] == "COMPLETED" and body["flow_run_id"] == done
        assert body["out"] == str(out) and body["flow"] == "evaluation-grid"
        frozen = yaml.safe_load((out / "grid.yaml").read_text())
        assert frozen["budgets"]["iterations_scale"] == 0.5
        assert frozen["execution"]["max_parallel"] == 1

        failed = _run(cluster, f"spec_path={tmp_path / 'missing.yaml'}", f"out={out}-2",
                      "notify_block=custom-webhook/gi-eval-test")
        assert _final_state(cluster, client, failed).type == StateType.FAILED
        block_body = json.loads(receiver.wait("/block"))
        assert "FAILED" in block_body["subject"] and failed in block_body["text"]
        assert not any(path == "/done" and json.loads(b)["flow_run_id"] == failed
                       for path, b in receiver.bodies)
