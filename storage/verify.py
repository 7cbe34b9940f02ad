"""Self-check and repair of a run directory: find what a reader cannot use, move it aside.

What counts as broken (each found object becomes a `Finding`):
  * a metrics part or compact file that pyarrow cannot read (truncated, overwritten, foreign);
  * a committed cell whose reconstruction group is missing (deleted), is not a readable zip
    (truncated, foreign) or, in a deep check, fails its CRC check;
  * (deep check) a gradient group that is not a readable zip.

Repair moves each finding to <run>/quarantine/<time>-<pid>/<its path in the run> and writes
`reasons.json` beside it. Moving a cell's part file un-commits the cell, so the next `gi-eval
run` recomputes it; nothing is deleted. A bad cell inside a compact file is un-compacted first:
the good cells of that file are written back as part files (they stay committed throughout,
because a cell listed in a manifest *and* present as a part is committed once), then the
manifest and the compact file move to quarantine.

The quick check (the resume scan of every `gi-eval run`) reads Parquet footers and the zip
directory of each committed cell's group; the deep check (`gi-eval verify --deep`) reads every
row and checks every zip's CRCs, gradient groups included.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from storage import commits
from storage.atomic import publishing, write_bytes_atomic
from storage.metrics import SCHEMA, part_filename
from storage.run import GROUP_SUFFIX, RunDir

QUARANTINE_DIR = "quarantine"
REASONS_FILE = "reasons.json"


@dataclass(frozen=True)
class Finding:
    """One unusable object: its path, why, and the cells it un-commits when moved."""

    path: Path
    reason: str
    cells: tuple[str, ...] = ()
    compact: Path | None = None  # the compact file holding `cells` (None: a part or a group)


@dataclass(frozen=True)
class VerifyReport:
    findings: tuple[Finding, ...]
    parts_checked: int
    groups_checked: int
    moved_to: Path | None = None  # quarantine folder of this repair (None: nothing moved)
    cells: frozenset[str] = field(default_factory=frozenset)  # cells to recompute

    def describe(self) -> str:
        head = (
            f"checked {self.parts_checked} metrics file(s) and {self.groups_checked} group(s): "
            f"{len(self.findings)} problem(s)"
        )
        lines = [head] + [f"  {f.path}: {f.reason}" for f in self.findings]
        if self.moved_to is not None:
            lines.append(
                f"moved to {self.moved_to} ({len(self.cells)} cell(s) to recompute: "
                "`gi-eval run` does it)"
            )
        return "\n".join(lines)


def scan(run: RunDir, *, deep: bool = False) -> VerifyReport:
    """Find unreadable metrics files and committed cells without a usable group (read-only)."""
    findings: list[Finding] = []
    parts = 0
    states = commits.scan_partitions(run.metrics_dir)
    # Groups are listed *after* the parts: a cell publishes its group before its part, so a
    # part seen above has its group in this listing unless the group is really gone.
    groups = _ids(run.root / "store" / "reconstructions")
    for state in states:
        for path, cells in _data_files(state):
            parts += 1
            problem = _parquet_problem(path, deep=deep)
            if problem is not None:
                compact = path if path.name.startswith(commits.COMPACT_PREFIX) else None
                findings.append(Finding(path, problem, tuple(sorted(cells)), compact))
                continue
            findings += _cells_without_group(run, path, cells, groups, deep=deep)
    checked = len(groups)
    if deep:
        for gid in sorted(_ids(run.root / "store" / "gradients")):
            problem = _zip_problem(run.gradient_path(gid))
            if problem is not None:
                findings.append(Finding(run.gradient_path(gid), f"gradient group {problem}"))
        checked += len(_ids(run.root / "store" / "gradients"))
    cells = frozenset(c for f in findings for c in f.cells)
    return VerifyReport(tuple(findings), parts, checked, cells=cells)


def repair(run: RunDir, report: VerifyReport) -> VerifyReport:
    """Move every finding of `report` to quarantine (see the module docstring)."""
    if not report.findings:
        return report
    folder = run.root / QUARANTINE_DIR / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    reasons = []
    for compact, bad in _by_compact_file(report.findings).items():
        reasons += _uncompact(run, compact, bad, folder)
    for f in report.findings:
        if f.compact is None:
            _move(run, f.path, folder)
            reasons.append({"path": str(f.path.relative_to(run.root)), "reason": f.reason,
                            "cells": list(f.cells)})
    write_bytes_atomic(folder / REASONS_FILE, json.dumps(reasons, indent=1).encode())
    return VerifyReport(report.findings, report.parts_checked, report.groups_checked, folder,
                        report.cells)


def verify_and_repair(run: RunDir, *, deep: bool = False) -> VerifyReport:
    return repair(run, scan(run, deep=deep))


def _data_files(state: commits.PartitionState) -> list[tuple[Path, frozenset[str]]]:
    done = state.compacted_cells
    files = [(path, cells) for path, cells in sorted(state.compacted.items())]
    files += [(p, frozenset({c})) for c, p in sorted(state.parts.items()) if c not in done]
    return files


def _parquet_problem(path: Path, *, deep: bool) -> str | None:
    try:
        if deep:
            table = pq.read_table(path, schema=SCHEMA)
            if table.num_rows == 0:
                return "Parquet file has no rows"
        else:
            pq.read_metadata(path)
    except FileNotFoundError:
        return None  # compacted or quarantined concurrently: nothing to judge
    except (pa.ArrowException, OSError, ValueError) as e:
        return f"unreadable Parquet file ({e})"
    return None


def _cells_without_group(
    run: RunDir, path: Path, cells: Iterable[str], groups: set[str], *, deep: bool
) -> list[Finding]:
    found = []
    compact = path if path.name.startswith(commits.COMPACT_PREFIX) else None
    for cell in sorted(cells):
        if cell not in groups:
            problem: str | None = "committed, but its reconstruction group is missing"
        else:
            problem = _zip_problem(run.reconstruction_path(cell), crc=deep)
            problem = problem and f"reconstruction group {problem}"
        if problem is not None:
            found.append(Finding(path, problem, (cell,), compact))
    return found


def _zip_problem(path: Path, *, crc: bool = True) -> str | None:
    """Why the group zip at `path` is unusable, or None. Without `crc` only its directory (at
    the end of the file) is read: that catches truncated and foreign files cheaply."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip() if crc else None
            names = set(z.namelist())
    except FileNotFoundError:
        return None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"is not a readable zip ({e})"
    if bad is not None:
        return f"fails its CRC check ({bad})"
    if "zarr.json" not in names:
        return "has no zarr.json"
    return None


def _by_compact_file(findings: Iterable[Finding]) -> dict[Path, set[str]]:
    out: dict[Path, set[str]] = {}
    for f in findings:
        if f.compact is not None:
            out.setdefault(f.compact, set()).update(f.cells)
    return out


def _uncompact(run: RunDir, compact: Path, bad: set[str], folder: Path) -> list[dict[str, object]]:
    """Write the good cells of `compact` back as part files, then quarantine it + manifest."""
    key = compact.name[len(commits.COMPACT_PREFIX):].removesuffix(".parquet")
    manifest = compact.with_name(f"{commits.MANIFEST_PREFIX}{key}{commits.MANIFEST_SUFFIX}")
    cells = commits.scan_partition(compact.parent, "").compacted.get(compact, frozenset())
    good = sorted(set(cells) - bad)
    if good and _parquet_problem(compact, deep=True) is None:
        table = ds.dataset(str(compact), schema=SCHEMA, format="parquet").to_table()
        for cell in good:
            rows = table.filter(pc.equal(table["cell_id"], cell))
            with publishing(compact.parent / part_filename(cell)) as tmp:
                pq.write_table(rows, tmp)
    else:
        bad = set(cells)  # an unreadable compact file: every cell in it is recomputed
    for path in (manifest, compact):  # manifest first: the un-compaction's commit point
        _move(run, path, folder)
    return [{"path": str(compact.relative_to(run.root)), "reason": "cells recomputed",
             "cells": sorted(bad)}]


def _move(run: RunDir, path: Path, folder: Path) -> None:
    target = folder / path.relative_to(run.root)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(path, target)
    except FileNotFoundError:
        pass  # another repair moved it first


def _ids(directory: Path) -> set[str]:
    if not directory.is_dir():
        return set()
    return {n[: -len(GROUP_SUFFIX)] for n in os.listdir(directory)
            if n.endswith(GROUP_SUFFIX) and not n.startswith(".")}


# Reproducibility audit (issue 20, `gi-eval verify --recompute`): a recomputed cell against the
# stored one, bit for bit. Kept apart from the scan/repair above.

# Metric values of a cell's rows that a recompute must reproduce exactly. wall_seconds, where
# it ran and the schedule provenance columns describe the run, not the result.
RECOMPUTED_COLUMNS = (
    "sample_index", "label", "label_accuracy", "psnr", "ssim", "lpips", "best_psnr_in_batch",
    "best_ssim_in_batch", "best_lpips_in_batch", "final_cost", "status", "iterations",
)  # fmt: skip


def array_difference(name: str, stored: Any, recomputed: Any) -> str | None:
    """None when the two arrays are equal bit for bit (NaN payloads included), else why not."""
    a, b = np.asarray(stored), np.asarray(recomputed)
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{name}: shape/dtype {a.shape} {a.dtype} stored, {b.shape} {b.dtype} recomputed"
    same = a.tolist() == b.tolist() if a.dtype.kind in "OUS" else a.tobytes() == b.tobytes()
    if same:
        return None
    if a.dtype.kind == "f":  # count by bits: NaN equals the same NaN, 0.0 differs from -0.0
        bits = np.dtype(f"u{a.dtype.itemsize}")
        raw_a, raw_b = (np.ascontiguousarray(x).view(bits) for x in (a, b))
        count = int(np.sum(raw_a != raw_b))
        delta = np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0)
        return f"{name}: {count} value(s) differ (max |delta| {delta:.3g})"
    return f"{name}: {int(np.sum(a != b))} value(s) differ"


def row_differences(stored: pd.DataFrame, recomputed: pd.DataFrame) -> list[str]:
    """Each RECOMPUTED_COLUMNS column that is not bit-identical between two cells' rows
    (compared in image order)."""
    a = stored.sort_values("image_index").reset_index(drop=True)
    b = recomputed.sort_values("image_index").reset_index(drop=True)
    if len(a) != len(b):
        return [f"rows: {len(a)} stored, {len(b)} recomputed"]
    out = []
    for column in RECOMPUTED_COLUMNS:
        problem = array_difference(column, a[column].to_numpy(), b[column].to_numpy())
        if problem is not None:
            out.append(problem)
    return out
