"""Defensive readers of the small JSON/text records a run directory holds.

Every record is published atomically, so a record that does not parse, or parses to the wrong
shape, was damaged after the fact (a disk, a sync tool, a hand edit). Readers never crash on
one: they log a warning naming the file and treat it as absent (`gi-eval verify` and the resume
scan of `gi-eval run` move it to quarantine; see storage.verify.record_findings). Which records
exist and how each is rebuilt: docs/reading-results.md, "Damaged files".
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
Check = Callable[[Any], bool]


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def is_job_record(value: Any) -> bool:
    """jobs/<stamp>-<name>-<pid>.json: [{kind, job_id, cells, process, submitted?, ended?}]."""
    return isinstance(value, list) and all(
        isinstance(r, dict)
        and isinstance(r.get("kind"), str)
        and isinstance(r.get("job_id"), str)
        and _strings(r.get("cells"))
        and isinstance(r.get("process"), str | None)
        and all(isinstance(r.get(t, 0.0), int | float) for t in ("submitted", "ended"))
        for r in value
    )


def is_failure_record(value: Any) -> bool:
    """failures/<cell id>.json: {cell_id, method, reason, host, time, slurm_job_id}."""
    return isinstance(value, dict) and all(
        isinstance(value.get(k), str) for k in ("cell_id", "method", "reason")
    )


# Records of a run's driver and its estimates (written by pipelines; named here so that
# `gi-eval verify` can check them without importing the layer above).
DRIVER_FILE = "driver.json"  # the detached driver job (pipelines.detach)
PLAN_FILE = "plan.json"  # under reports/: `gi-eval plan`'s estimate (pipelines.commands)
LEARNED_COSTS_FILE = "learned-costs.json"  # under reports/: prices learned from this run


def is_driver_record(value: Any) -> bool:
    """driver.json: {job_id, submitted, log}."""
    return (
        isinstance(value, dict)
        and isinstance(value.get("job_id"), str | int)
        and isinstance(value.get("submitted"), int | float)
        and isinstance(value.get("log"), str)
    )


def is_plan_record(value: Any) -> bool:
    """reports/plan.json: {executor, wall_seconds, cells_to_do, cell_seconds?, ...}."""
    if not isinstance(value, dict):
        return False
    cells = value.get("cell_seconds", {})
    return (
        isinstance(value.get("executor"), str)
        and isinstance(value.get("wall_seconds"), int | float)
        and isinstance(value.get("cells_to_do"), int)
        and isinstance(cells, dict)
        and all(isinstance(v, int | float) for v in cells.values())
    )


def is_learned_costs(value: Any) -> bool:
    """learned-costs.json: {format, entries: [{key: {...}, seconds_per_iteration, cells, run,
    learned}]} (pipelines.learned_costs)."""
    if not isinstance(value, dict) or not isinstance(value.get("entries"), list):
        return False
    keys = {"device", "method", "prior", "victim", "width", "image_size", "batch", "restarts",
            "threads"}  # fmt: skip
    return all(
        isinstance(e, dict)
        and isinstance(e.get("key"), dict)
        and set(e["key"]) - {"protocol"} == keys  # files written before `protocol` lack it
        and isinstance(e.get("seconds_per_iteration"), int | float)
        and isinstance(e.get("cells"), int)
        and isinstance(e.get("run"), str)
        and isinstance(e.get("learned"), str)
        for e in value["entries"]
    )


def is_manifest(value: Any) -> bool:
    """metrics/method=<m>/_compact-<h>.json: {format, file, rows, cells}."""
    return isinstance(value, dict) and _strings(value.get("cells"))


def json_problem(path: Path, check: Check) -> str | None:
    """Why the JSON record at `path` is unusable (None: it is fine or gone)."""
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"damaged record: not JSON ({_short(e)})"
    return None if check(value) else "damaged record: JSON of the wrong shape"


def read_json(path: Path, check: Check) -> Any | None:
    """The record at `path`, or None when it is missing or damaged (logged, naming the file)."""
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _damaged(path, f"not JSON ({_short(e)})")
        return None
    if not check(value):
        _damaged(path, "JSON of the wrong shape")
        return None
    return value


def read_cancel_time(path: Path) -> float | None:
    """When `gi-eval cancel` asked to stop (jobs/CANCEL holds time.time()); a damaged marker
    counts from its modification time: the request was made, only its text is lost."""
    try:
        text, mtime = path.read_bytes(), os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    stamp = _float(text)
    # written atomically right after time.time(): a stamp far from the file's own time (a
    # truncated "17648..." still parses as a number) is damage too
    if stamp is None or abs(stamp - mtime) > _STAMP_SLACK_S:
        _damaged(path, "not its time stamp; using its modification time")
        return mtime
    return stamp


def cancel_marker_damaged(path: Path) -> bool:
    try:
        stamp, mtime = _float(path.read_bytes()), os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    return stamp is None or abs(stamp - mtime) > _STAMP_SLACK_S


_STAMP_SLACK_S = 3600.0


def _float(text: bytes) -> float | None:
    try:
        return float(text.decode())
    except ValueError:  # UnicodeDecodeError included
        return None


def _damaged(path: Path, why: str) -> None:
    log.warning("ignoring damaged file %s (%s); `gi-eval verify %s` moves it to quarantine",
                path, why, _run_root(path))


def _run_root(path: Path) -> Path:
    """The run directory above `path` (the nearest parent with a grid.yaml), else its parent."""
    for parent in path.parents:
        if (parent / "grid.yaml").is_file():
            return parent
    return path.parent


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 120 else text[:117] + "..."
