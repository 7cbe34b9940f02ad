"""Notification when a (scheduled) grid finishes or fails: Prefect flow-run state hooks.

A deployment run passes `notify_url` (a plain JSON POST, e.g. a chat or CI webhook) and/or
`notify_block` (the "<block type>/<name>" of any saved Prefect notification block: Slack,
Teams, a custom webhook, e-mail, ...); see docs/scheduling.md. A notification that cannot be
delivered is logged and never changes the flow run's state: the grid's result is what counts.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
TIMEOUT_S = 30


def payload(flow_name: str, flow_run: Any, state: Any) -> dict[str, Any]:
    """What is sent: enough to act on without opening the UI."""
    params = dict(flow_run.parameters or {})
    return {
        "flow": flow_name,
        "flow_run": flow_run.name,
        "flow_run_id": str(flow_run.id),
        "deployment_id": str(flow_run.deployment_id) if flow_run.deployment_id else None,
        "state": state.type.value,  # COMPLETED | FAILED | CRASHED
        "message": state.message,
        "spec_path": params.get("spec_path"),
        "out": params.get("out"),
    }


def notify_state(flow: Any, flow_run: Any, state: Any) -> None:
    """on_completion / on_failure / on_crashed hook of the grid flows."""
    params = flow_run.parameters or {}
    body = payload(flow.name, flow_run, state)
    if params.get("notify_url"):
        _post(str(params["notify_url"]), body)
    if params.get("notify_block"):
        _block(str(params["notify_block"]), body)


def _post(url: str, body: dict[str, Any]) -> None:
    import httpx

    try:
        httpx.post(url, json=body, timeout=TIMEOUT_S).raise_for_status()
    except httpx.HTTPError as e:
        log.warning("notification to %s failed: %s", url, e)


def _block(name: str, body: dict[str, Any]) -> None:
    from prefect.blocks.core import Block

    subject = f"gi-eval {body['flow']} {body['flow_run']}: {body['state']}"
    text = "\n".join(f"{k}: {v}" for k, v in body.items() if v is not None)
    try:
        Block.load(name).notify(text, subject=subject)  # type: ignore[union-attr]
    except Exception as e:  # noqa: BLE001 - a missing block or a dead endpoint: log only
        log.warning("notification block %s failed: %s", name, e)
