"""Generator snapshots of a training run (GIML meta-training, GAN pretraining).

    <run>/snapshots/<sha256[:16]>.pt   the generator's plain state_dict (torch.load weights_only)
    <run>/snapshots/step-<k>.json      index: {"step", "sha256", "file", "kind", ...}
    <run>/snapshots/step-<k>.png       sample grid from the run's fixed latents (Figure 6a)

Snapshot files are content-addressed (named by the sha256 of their bytes), so an evaluation
cell that names one through its path changes id whenever the weights change. Everything is
published atomically; the index file is written last and is the commit marker.

A grid refers to a snapshot as ``giml:<run dir>@<step>`` (or ``gan:<run dir>@<step>`` for a
pretrained prior): `resolve_ref` maps that to the snapshot file.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gi_core.errors import ConfigError
from storage.atomic import write_bytes_atomic

SNAPSHOT_DIR = "snapshots"
REF_PREFIXES = ("giml", "gan")
_REF = re.compile(r"^(giml|gan):(.+)@(\d+)$")


def snapshot_dir(run_root: Path | str) -> Path:
    return Path(run_root) / SNAPSHOT_DIR


def index_path(run_root: Path | str, step: int) -> Path:
    return snapshot_dir(run_root) / f"step-{step}.json"


def grid_image_path(run_root: Path | str, step: int) -> Path:
    return snapshot_dir(run_root) / f"step-{step}.png"


def save_snapshot(
    run_root: Path | str, step: int, state_dict: dict[str, Tensor], *, meta: dict[str, Any]
) -> Path:
    """Publish the state_dict under its content hash, then the step's index; returns the file."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = snapshot_dir(run_root) / f"{digest[:16]}.pt"
    if not path.is_file():
        write_bytes_atomic(path, data)
    index = {**meta, "step": step, "sha256": digest, "file": path.name}
    write_bytes_atomic(index_path(run_root, step), json.dumps(index, sort_keys=True).encode())
    return path


def snapshot_steps(run_root: Path | str) -> list[int]:
    """Steps with a committed snapshot, ascending."""
    directory = snapshot_dir(run_root)
    if not directory.is_dir():
        return []
    found = (re.fullmatch(r"step-(\d+)\.json", p.name) for p in directory.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def read_index(run_root: Path | str, step: int) -> dict[str, Any]:
    path = index_path(run_root, step)
    if not path.is_file():
        steps = snapshot_steps(run_root)
        raise ConfigError(
            f"no snapshot at step {step} in {run_root} (committed steps: "
            f"{', '.join(map(str, steps)) or 'none'}); run its training flow first"
        )
    index: dict[str, Any] = json.loads(path.read_text())
    return index


def snapshot_path(run_root: Path | str, step: int) -> Path:
    return snapshot_dir(run_root) / str(read_index(run_root, step)["file"])


def parse_ref(ref: str) -> tuple[str, Path, int] | None:
    """'giml:runs/x@20' -> ('giml', Path('runs/x'), 20); None if `ref` is not a snapshot ref."""
    match = _REF.match(ref)
    if match is None:
        return None
    return match.group(1), Path(match.group(2)), int(match.group(3))


def resolve_ref(ref: str) -> Path:
    """The snapshot file a ``giml:<run>@<step>`` / ``gan:<run>@<step>`` ref names."""
    parsed = parse_ref(ref)
    if parsed is None:
        raise ConfigError(
            f"{ref!r} is not a snapshot reference; write giml:<run dir>@<step> or "
            "gan:<run dir>@<step>"
        )
    _, run_root, step = parsed
    return snapshot_path(run_root, step)
