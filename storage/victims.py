"""Trained victims of a run (decisions 270, 271): `victims/<lineage>/round-<r>.pt`, the
state_dict of a victim after r FedAvg rounds (torch.save; loaded with weights_only=True, so a
file can never run code), and `round-<r>.json`, its record: the weights' sha256
(gi_core.victims.weights_sha256) and what trained them. The record is written after the
weights and is the commit marker.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gi_core.victims import weights_sha256
from storage.atomic import publishing, write_bytes_atomic
from storage.checkpoints import _LOAD_ERRORS
from storage.errors import StorageError
from storage.layout import RunLayout


def write_trained_victim(
    run: RunLayout,
    lineage: str,
    rounds: int,
    state: Mapping[str, Tensor],
    record: Mapping[str, Any],
) -> str:
    """Publish the weights, then their record (with their sha256, returned), atomically."""
    sha = weights_sha256(state)
    buffer = io.BytesIO()  # not the temp file's name: torch.save names its archive after it
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
    with publishing(run.trained_victim_path(lineage, rounds)) as tmp:
        tmp.write_bytes(buffer.getvalue())
    body = {**record, "rounds": rounds, "sha256": sha}
    write_bytes_atomic(run.trained_victim_record(lineage, rounds), json.dumps(body).encode())
    return sha


def read_trained_victim(
    run: RunLayout, lineage: str, rounds: int
) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """(state_dict on the CPU, record) of a committed trained victim; None when there is none.
    StorageError when the weights do not hash to their record (a damaged or replaced file)."""
    record_path = run.trained_victim_record(lineage, rounds)
    if not record_path.is_file():
        return None
    path = run.trained_victim_path(lineage, rounds)
    try:
        record = json.loads(record_path.read_text())
        state = torch.load(path, map_location="cpu", weights_only=True)
        sha = weights_sha256(state)
    except (*_LOAD_ERRORS, json.JSONDecodeError) as e:
        raise StorageError(f"unreadable trained victim {path}: {e}") from e
    if not isinstance(record, dict) or record.get("sha256") != sha:
        raise StorageError(
            f"trained victim {path}: its weights hash to {sha}, its record "
            f"{record_path.name} says {record.get('sha256') if isinstance(record, dict) else '?'}; "
            f"delete both files to train it again"
        )
    return state, record


def stored_rounds(run: RunLayout, lineage: str) -> list[int]:
    """The rounds of one training lineage that are committed (their record exists), ascending."""
    directory = run.victim_lineage_dir(lineage)
    found = []
    for path in directory.glob("round-*.json") if directory.is_dir() else ():
        number = path.stem.removeprefix("round-")
        if number.isdigit():
            found.append(int(number))
    return sorted(found)
