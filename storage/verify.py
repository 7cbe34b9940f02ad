"""Self-check and repair of a run directory: find what a reader cannot use, move it aside.

What counts as broken (each found object becomes a `Finding`):
  * a metrics part or compact file that pyarrow cannot read (truncated, overwritten, foreign);
  * a committed cell whose reconstruction group is missing (deleted), is not a readable zip
    (truncated, foreign) or, in a deep check, fails its CRC check;
  * a gradient group that is not a readable zip (quick check: its zip directory; deep check
    and `gi-eval run` for the gradients its to-do cells need: every CRC);
  * a stray file where only committed files belong ("part-<id> (1).parquet" of a sync tool):
    it was never counted, and moving it un-commits nothing;
  * a damaged record (job record, failure record, compaction manifest, cancel marker, loss
    curve, checkpoint): readers already ignore it (storage.records); repair moves it, or
    rebuilds it where its content is known (a manifest from its compact file).

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

import dataclasses
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

from storage import commits, records
from storage.atomic import is_temp_name, publishing, write_bytes_atomic
from storage.checkpoints import checkpoint_problem
from storage.layout import CANCEL_MARKER, GROUP_SUFFIX
from storage.metrics import (
    PARQUET_SUFFIX,
    PART_PREFIX,
    SCHEMA,
    cell_of_part,
    is_cell_id,
    part_filename,
)
from storage.run import RunDir

REASONS_FILE = "reasons.json"
_STRAY = (
    "stray file: not the committed file of any cell (a sync tool's copy?); it was never "
    "counted and nothing is recomputed"
)
_GRADIENT = "gradient group"
# Columns every metrics file of this project has had (later issues only add columns).
_CORE_COLUMNS = ("cell_id", "image_index", "psnr", "status")


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
    gradients: frozenset[str] = field(default_factory=frozenset)  # gradients to regenerate

    def describe(self) -> str:
        head = (
            f"checked {self.parts_checked} metrics file(s) and {self.groups_checked} group(s): "
            f"{len(self.findings)} problem(s)"
        )
        lines = [head] + [f"  {f.path}: {f.reason}" for f in self.findings]
        if self.moved_to is not None:
            todo = (
                f"{len(self.cells)} cell(s) to recompute, {len(self.gradients)} gradient(s) "
                "to regenerate: `gi-eval run` does it"
                if self.cells or self.gradients
                else "nothing to recompute"
            )
            lines.append(f"moved to {self.moved_to} ({todo})")
        return "\n".join(lines)


def scan(run: RunDir, *, deep: bool = False) -> VerifyReport:
    """Find unreadable metrics files and committed cells without a usable group (read-only)."""
    findings: list[Finding] = []
    parts = 0
    states = commits.scan_partitions(run.metrics_dir)
    # Groups are listed *after* the parts: a cell publishes its group before its part, so a
    # part seen above has its group in this listing unless the group is really gone.
    groups = _ids(run.reconstructions_dir)
    for state in states:
        for path, cells in _data_files(state):
            parts += 1
            problem = _parquet_problem(path, deep=deep)
            if problem is not None:
                compact = path if path.name.startswith(commits.COMPACT_PREFIX) else None
                findings.append(Finding(path, problem, tuple(sorted(cells)), compact))
                continue
            findings += _cells_without_group(run, path, cells, groups, deep=deep)
    stored = _ids(run.gradients_dir)
    findings += gradient_findings(run, stored, deep=deep)
    findings += stray_findings(run) + record_findings(run)
    return _report(findings, parts, len(groups) + len(stored))


def _report(findings: list[Finding], parts: int, groups: int) -> VerifyReport:
    cells = frozenset(c for f in findings for c in f.cells)
    gradients = frozenset(
        f.path.name.removesuffix(GROUP_SUFFIX) for f in findings if f.reason.startswith(_GRADIENT)
    )
    return VerifyReport(tuple(findings), parts, groups, cells=cells, gradients=gradients)


def repair(run: RunDir, report: VerifyReport) -> VerifyReport:
    """Move every finding of `report` to quarantine (see the module docstring)."""
    if not report.findings:
        return report
    folder = run.quarantine_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    reasons = []
    for compact, bad in _by_compact_file(report.findings).items():
        reasons += _uncompact(run, compact, bad, folder)
    for f in report.findings:
        if f.compact is None:
            _repair_one(run, f, folder)
            reasons.append(
                {
                    "path": str(f.path.relative_to(run.root)),
                    "reason": f.reason,
                    "cells": list(f.cells),
                }
            )
    write_bytes_atomic(folder / REASONS_FILE, json.dumps(reasons, indent=1).encode())
    return dataclasses.replace(report, moved_to=folder)


def with_findings(report: VerifyReport, extra: Iterable[Finding]) -> VerifyReport:
    """`report` plus the findings of `extra` it does not hold yet."""
    known = {(f.path, f.cells) for f in report.findings}
    findings = [*report.findings, *(f for f in extra if (f.path, f.cells) not in known)]
    return _report(findings, report.parts_checked, report.groups_checked)


def verify_and_repair(run: RunDir, *, deep: bool = False) -> VerifyReport:
    return repair(run, scan(run, deep=deep))


def _data_files(state: commits.PartitionState) -> list[tuple[Path, frozenset[str]]]:
    done = state.compacted_cells
    files = [(path, cells) for path, cells in sorted(state.compacted.items())]
    files += [(p, frozenset({c})) for c, p in sorted(state.parts.items()) if c not in done]
    return files


def _parquet_problem(
    path: Path, *, deep: bool, columns: Iterable[str] = _CORE_COLUMNS
) -> str | None:
    try:
        if deep:
            table = pq.read_table(path, schema=SCHEMA)
            if table.num_rows == 0:
                return "Parquet file has no rows"
        else:
            names = set(pq.read_schema(path).names)  # the footer only
            missing = [c for c in columns if c not in names]
            if missing:
                return f"Parquet file of another kind (no column {', '.join(missing)})"
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
            problem = problem and f"reconstruction group {run.reconstruction_path(cell)} {problem}"
        if problem is not None:
            found.append(Finding(path, problem, (cell,), compact))
            found += _damaged_group(run, cell)
    return found


def _damaged_group(run: RunDir, cell: str) -> list[Finding]:
    """The damaged group itself goes to quarantine too (its cell is recomputed anyway)."""
    group = run.reconstruction_path(cell)
    return (
        [Finding(group, "damaged reconstruction group (its cell is recomputed)", (cell,))]
        if group.exists()
        else []
    )


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
    key = compact.name[len(commits.COMPACT_PREFIX) :].removesuffix(".parquet")
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
    return [
        {
            "path": str(compact.relative_to(run.root)),
            "reason": "cells recomputed",
            "cells": sorted(bad),
        }
    ]


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
    return {
        n[: -len(GROUP_SUFFIX)]
        for n in os.listdir(directory)
        if n.endswith(GROUP_SUFFIX) and is_cell_id(n[: -len(GROUP_SUFFIX)])
    }


# ---- gradients, stray files and records (issues 18 and 20) ------------------------------------


def gradient_findings(run: RunDir, ids: Iterable[str], *, deep: bool) -> list[Finding]:
    """Stored gradient groups among `ids` that are not usable: the quick check reads each zip's
    directory (a truncated or foreign file), the deep one every CRC. A moved gradient is
    regenerated by the next `gi-eval run` before the cells that need it."""
    found = []
    for gid in sorted(ids):
        path = run.gradient_path(gid)
        problem = _zip_problem(path, crc=deep)
        if problem is not None:
            found.append(Finding(path, f"{_GRADIENT} {problem}; `gi-eval run` regenerates it"))
    return found


def stray_findings(run: RunDir) -> list[Finding]:
    """Files where only canonically named committed files belong (hidden temp files of live
    writers are left to the temp sweep)."""
    found = []
    for state in commits.scan_partitions(run.metrics_dir):
        found += [Finding(p, _STRAY) for p in _strays_in_partition(state)]
    for directory, prefix, suffix in (
        (run.gradients_dir, "", GROUP_SUFFIX),
        (run.reconstructions_dir, "", GROUP_SUFFIX),
        (run.curves_dir, PART_PREFIX, PARQUET_SUFFIX),
        (run.failures_dir, "", ".json"),
    ):
        found += [Finding(p, _STRAY) for p in _strays_in(directory, prefix, suffix)]
    return found


def _strays_in_partition(state: commits.PartitionState) -> list[Path]:
    known = {p.name for p in state.parts.values()} | {p.name for p in state.compacted}
    strays = []
    for name in sorted(os.listdir(state.directory)):
        if name in known or name == commits.LOCK_NAME or is_temp_name(name):
            continue
        if name.startswith(commits.MANIFEST_PREFIX) and name.endswith(commits.MANIFEST_SUFFIX):
            continue  # complete, orphan (compaction removes it) or damaged (record_findings)
        key = name.removeprefix(commits.COMPACT_PREFIX).removesuffix(PARQUET_SUFFIX)
        manifest = state.directory / f"{commits.MANIFEST_PREFIX}{key}{commits.MANIFEST_SUFFIX}"
        if (
            name.startswith(commits.COMPACT_PREFIX)
            and manifest.exists()
            and records.json_problem(manifest, records.is_manifest) is None
        ):
            continue  # published after this partition's listing
        if cell_of_part(name) is None:
            strays.append(state.directory / name)
    return [p for p in strays if p.exists()]


def _strays_in(directory: Path, prefix: str, suffix: str) -> list[Path]:
    if not directory.is_dir():
        return []
    strays = []
    for name in sorted(os.listdir(directory)):
        if is_temp_name(name) or name.startswith("."):
            continue
        ident = name.removeprefix(prefix).removesuffix(suffix)
        if not (name.startswith(prefix) and name.endswith(suffix) and is_cell_id(ident)):
            strays.append(directory / name)
    return strays


def record_findings(run: RunDir) -> list[Finding]:
    """Damaged records (see storage.records): job and failure records, compaction manifests,
    the cancel marker, loss curves and checkpoints."""
    found = []
    checks = (
        (run.jobs_dir, records.is_job_record),
        (run.failures_dir, records.is_failure_record),
    )
    for directory, check in checks:
        for path in sorted(directory.glob("*.json")):
            if directory != run.failures_dir or is_cell_id(path.stem):
                problem = records.json_problem(path, check)
                found += [Finding(path, problem)] if problem else []
    cancel = run.cancel_marker
    if cancel.is_file() and records.cancel_marker_damaged(cancel):
        found.append(
            Finding(
                cancel,
                "damaged cancel marker: rewritten with its modification "
                "time (the cancel request stands)",
            )
        )
    for state in commits.scan_partitions(run.metrics_dir):
        found += [
            Finding(m, "damaged compaction manifest: rebuilt from its compact file")
            for m in state.damaged_manifests
        ]
        found += [
            Finding(
                m,
                "damaged compaction manifest of an unreadable compact file: its "
                "cells are recomputed",
            )
            for m in state.orphan_manifests
            if records.json_problem(m, records.is_manifest) is not None
        ]
    found += _curve_findings(run) + _checkpoint_findings(run) + _estimate_findings(run)
    return found


def _estimate_findings(run: RunDir) -> list[Finding]:
    """The detached driver's record, `gi-eval plan`'s stored estimate and the prices learned
    from the run: each only loses what it said (the driver's job id, the estimate to compare
    with, prices the next report learns again)."""
    checks = (
        (run.root / records.DRIVER_FILE, records.is_driver_record,
         "`gi-eval status` no longer names the driver job"),
        (run.reports_dir / records.PLAN_FILE, records.is_plan_record,
         "`gi-eval plan` stores a new estimate"),
        (run.reports_dir / records.LEARNED_COSTS_FILE, records.is_learned_costs,
         "the next report learns the prices again"),
    )  # fmt: skip
    found = []
    for path, check, then in checks:
        problem = records.json_problem(path, check)
        found += [Finding(path, f"{problem}; {then}")] if problem else []
    return found


def _curve_findings(run: RunDir) -> list[Finding]:
    found = []
    for path in sorted(run.curves_dir.glob(f"{PART_PREFIX}*{PARQUET_SUFFIX}")):
        problem = _parquet_problem(path, deep=False, columns=("cell_id", "cost"))
        if problem is not None and cell_of_part(path.name) is not None:
            found.append(Finding(path, f"loss curve: {problem}; the cell keeps its metrics"))
    return found


def _checkpoint_findings(run: RunDir) -> list[Finding]:
    found = []
    for path in sorted(run.checkpoints_dir.glob("*.pt")):
        problem = checkpoint_problem(path)
        found += [Finding(path, problem)] if problem else []
    return found


def _repair_one(run: RunDir, finding: Finding, folder: Path) -> None:
    """Move `finding` to quarantine; records whose content is known are rebuilt in place."""
    path = finding.path
    if path.name == CANCEL_MARKER:
        stamp = records.read_cancel_time(path)
        _copy_aside(run, path, folder)
        if stamp is not None:
            write_bytes_atomic(path, str(stamp).encode())
            os.utime(path, (stamp, stamp))  # the marker's time and its text agree again
        return
    is_manifest = path.name.startswith(commits.MANIFEST_PREFIX)
    _move(run, path, folder)
    if is_manifest:
        _rebuild_manifest(path)


def _copy_aside(run: RunDir, path: Path, folder: Path) -> None:
    target = folder / path.relative_to(run.root)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.write_bytes(path.read_bytes())
    except FileNotFoundError:
        pass


def _rebuild_manifest(manifest: Path) -> None:
    key = manifest.name[len(commits.MANIFEST_PREFIX) : -len(commits.MANIFEST_SUFFIX)]
    data = manifest.with_name(f"{commits.COMPACT_PREFIX}{key}{PARQUET_SUFFIX}")
    cells = commits.cells_in_file(data)
    if cells is None:
        return  # the compact file is gone or unreadable too: its cells are recomputed
    record = {"format": 1, "file": data.name, "cells": sorted(cells), "rebuilt": True}
    write_bytes_atomic(manifest, json.dumps(record).encode())


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
