"""Per-cell and per-iteration tables beside the per-image metrics (run.cells(), run.curves()).

    <run>/curves/part-<cell id>.parquet   loss curve of one cell in long form, written before the
                                          cell's metrics part (so every committed cell has one)
    <run>/failures/<cell id>.json         why the last attempt at a cell raised (replaced by
                                          each failing attempt, ignored once the cell commits)

Curves are Parquet so that a figure over 10^5 cells reads columns, not 10^5 Zarr zips. Both are
published atomically (temp + rename); readers trust only cells whose metrics part is committed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from storage import records
from storage.atomic import publishing, write_bytes_atomic
from storage.layout import RunLayout
from storage.metrics import PARQUET_SUFFIX, PART_PREFIX, is_cell_id


class RunDir(Protocol):
    """What these tables read of a run directory (storage.run.RunDir). A protocol, not an
    import: RunDir's own `cells()` and `curves()` call this module."""

    @property
    def root(self) -> Path: ...

    def committed_cells(self) -> set[str]: ...

    def stored_gradients(self) -> set[str]: ...

    def metrics(self, columns: Sequence[str] | None = None) -> pd.DataFrame: ...

CURVE_SCHEMA = pa.schema(
    [
        ("cell_id", pa.string()),
        ("method", pa.string()),
        ("stage", pa.string()),  # the attack's stage name (e.g. "z", "w", "x"); "" if unknown
        ("iteration", pa.int64()),  # global iteration over all stages; the last point = after all
        ("restart", pa.int64()),
        ("cost", pa.float64()),  # c(x) of that restart at that iteration (NaN if it diverged)
    ]
)
# Columns of metrics() that vary per image; cells() keeps the rest once per cell.
_PER_IMAGE = (
    "image_index",
    "sample_index",
    "label",
    "psnr",
    "ssim",
    "lpips",
    "best_psnr_in_batch",
    "best_ssim_in_batch",
    "best_lpips_in_batch",
)
_REASONS = {
    "ok": "",
    "diverged": "no restart has a finite final cost",
}


def curve_path(run: RunDir, cell_id: str) -> Path:
    return RunLayout(run.root).curves_dir / f"{PART_PREFIX}{cell_id}{PARQUET_SUFFIX}"


def write_curve(
    run: RunDir,
    cell_id: str,
    *,
    method: str,
    costs: np.ndarray,
    iterations: np.ndarray,
    stages: Sequence[str],
) -> Path:
    """Publish one cell's curve: costs (points, R), iterations (points,), stages (points,)."""
    costs = np.asarray(costs, dtype=np.float64).reshape(len(iterations), -1)
    points, restarts = costs.shape
    table = pa.table(
        {
            "cell_id": [cell_id] * (points * restarts),
            "method": [method] * (points * restarts),
            "stage": np.repeat(np.asarray(list(stages), dtype=object), restarts).tolist(),
            "iteration": np.repeat(np.asarray(iterations, dtype=np.int64), restarts),
            "restart": np.tile(np.arange(restarts, dtype=np.int64), points),
            "cost": costs.ravel(),
        },
        schema=CURVE_SCHEMA,
    )
    final = curve_path(run, cell_id)
    with publishing(final) as tmp:
        pq.write_table(table, tmp)
    return final


def curves(run: RunDir, cells: Iterable[str] | None = None) -> pd.DataFrame:
    """Loss curves of committed cells in long form (CURVE_SCHEMA), optionally only `cells`."""
    wanted = run.committed_cells()
    if cells is not None:
        wanted &= set(cells)
    files = [p for c in sorted(wanted) if (p := curve_path(run, c)).is_file()]
    tables = [t for f in files if (t := _read_curve(f)) is not None]
    if not tables:
        return CURVE_SCHEMA.empty_table().to_pandas()
    return pa.concat_tables(tables).to_pandas()


def _read_curve(path: Path) -> pa.Table | None:
    try:
        return pq.read_table(path, schema=CURVE_SCHEMA)
    except FileNotFoundError:
        return None  # quarantined concurrently
    except (pa.ArrowException, OSError) as e:
        # A damaged curve costs the cell its loss curve, not the run its figures.
        records.log.warning("ignoring damaged loss curve %s (%s); `gi-eval verify` moves it "
                            "to quarantine", path, e)
        return None


def record_failure(run: RunDir, cell_id: str, *, method: str, reason: str) -> None:
    """Remember why an attempt at a cell raised (one line of the exception)."""
    record = {
        "cell_id": cell_id,
        "method": method,
        "reason": reason,
        "host": socket.gethostname(),
        "time": time.time(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    path = RunLayout(run.root).failure_path(cell_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(record).encode())


def failures(run: RunDir) -> pd.DataFrame:
    """Failure records of cells that are still not stored: a record of an inversion cell that
    later committed, or of a gradient that was later stored, no longer counts. Stray copies
    ("<id> (1).json") and damaged records are never counted."""
    directory = RunLayout(run.root).failures_dir
    stored = run.committed_cells() | run.stored_gradients()
    found = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        if not is_cell_id(path.stem) or path.stem in stored:
            continue
        record = records.read_json(path, records.is_failure_record)
        if record is not None and record["cell_id"] == path.stem:
            found.append(record)
    return pd.DataFrame(found, columns=list(FAILURE_COLUMNS))


FAILURE_COLUMNS = ("cell_id", "method", "reason", "host", "time", "slurm_job_id")


def cells(run: RunDir) -> pd.DataFrame:
    """One row per cell: committed cells (status ok | diverged, from their metrics) and cells
    whose last attempt raised (status failed, reason = the error). Columns: every per-cell
    metrics column (grid axes, variant and method parameters when present, iterations,
    wall_seconds, device, host/job columns when present), psnr/ssim/lpips means over the batch,
    images, reason."""
    df = run.metrics()
    per_cell = [c for c in df.columns if c not in _PER_IMAGE]
    table = df.groupby("cell_id", sort=True)[per_cell[1:]].first() if not df.empty else None
    if table is None:
        out = pd.DataFrame(columns=[*per_cell, "psnr", "ssim", "lpips", "images", "reason"])
    else:
        means = df.groupby("cell_id", sort=True)[["psnr", "ssim", "lpips"]].mean()
        out = table.join(means).assign(images=df.groupby("cell_id").size()).reset_index()
        out["reason"] = out["status"].map(_REASONS).fillna("")
    failed = failures(run)
    if failed.empty:
        return out
    # A failed cell has no metrics: its row holds id, method, status, reason, host and job id.
    failed = failed.drop(columns=["time"]).assign(status="failed")
    return pd.concat([out, failed], ignore_index=True) if not out.empty else failed
