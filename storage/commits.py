"""Which cells are committed, and compaction of part files without losing that knowledge.

A cell is committed iff (a) metrics/method=<m>/part-<cell id>.parquet exists, or (b) its id is
listed in a compaction manifest `_compact-<h>.json` whose data file `compact-<h>.parquet`
exists in the same partition. Deciding this reads file *names*, plus the manifests (a few
files), never Parquet contents.

Compaction of one partition, under an exclusive flock so compactors never overlap:
  1. read the part files, concatenate (explicit schema), write to a hidden temp file;
  2. publish the manifest (temp + rename) listing the merged cell ids;
  3. rename the temp file to compact-<h>.parquet  <- the compaction's commit point;
  4. delete the merged part files.
A crash before 3 leaves an orphan manifest (ignored; removed by the next compaction) and all
parts intact. A crash between 3 and 4 leaves parts whose cells are also in a manifest: the scan
and metrics() ignore those parts, and the next compaction deletes them. Plain
pd.read_parquet/duckdb readers may see such rows twice only in that window (or after such a
crash, until compact() runs again); open_run(...).metrics() never does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from storage import records
from storage.atomic import publishing, write_bytes_atomic
from storage.errors import StorageError
from storage.metrics import PARQUET_SUFFIX, SCHEMA, cell_of_part, method_of_dirname

COMPACT_PREFIX = "compact-"
MANIFEST_PREFIX = "_compact-"  # "_" makes pyarrow/pandas dataset discovery skip it
MANIFEST_SUFFIX = ".json"
LOCK_NAME = "_compact.lock"


@dataclass(frozen=True)
class PartitionState:
    """A snapshot of one method partition."""

    method: str
    directory: Path
    parts: dict[str, Path]  # cell id -> part file
    compacted: dict[Path, frozenset[str]]  # compact file -> cell ids (complete compactions)
    orphan_manifests: tuple[Path, ...] = ()
    # damaged manifests whose cells were read back from their compact file (verify rewrites
    # them); a damaged manifest whose compact file is unreadable too counts as an orphan
    damaged_manifests: tuple[Path, ...] = ()

    @property
    def compacted_cells(self) -> set[str]:
        return set().union(*self.compacted.values()) if self.compacted else set()

    @property
    def cells(self) -> set[str]:
        return set(self.parts) | self.compacted_cells

    def data_files(self) -> list[Path]:
        """Files holding each committed cell exactly once: compacted files, then the parts
        whose cells no compaction has taken over."""
        done = self.compacted_cells
        return sorted(self.compacted) + [p for c, p in sorted(self.parts.items()) if c not in done]


@dataclass(frozen=True)
class CompactionReport:
    parts_merged: int = 0
    rows: int = 0
    files_written: list[Path] = field(default_factory=list)
    stale_parts_removed: int = 0


def scan_partitions(metrics_dir: Path) -> list[PartitionState]:
    if not metrics_dir.is_dir():
        return []
    states = []
    for entry in sorted(os.scandir(metrics_dir), key=lambda e: e.name):
        method = method_of_dirname(entry.name)
        if method is not None and entry.is_dir():
            states.append(scan_partition(Path(entry.path), method))
    return states


def scan_partition(directory: Path, method: str) -> PartitionState:
    # Two listings, parts from the first, compactions from the second: a compaction publishes
    # its manifest and data file *before* deleting parts, so any part missing from the first
    # listing because compaction removed it is covered by the second listing. (A single
    # os.listdir is not an atomic snapshot of a changing directory.)
    first = os.listdir(directory)
    second = os.listdir(directory)
    parts = {c: directory / n for n in first if (c := cell_of_part(n)) is not None}
    compacted, orphans, damaged = _compactions(directory, set(second))
    return PartitionState(method, directory, parts, compacted, tuple(orphans), tuple(damaged))


def committed_cells(metrics_dir: Path) -> set[str]:
    cells: set[str] = set()
    for state in scan_partitions(metrics_dir):
        cells |= state.cells
    return cells


def compact(metrics_dir: Path, *, min_parts: int = 2) -> CompactionReport:
    """Merge each partition's part files into one compact file (see the module docstring)."""
    reports = []
    with _exclusive(metrics_dir / LOCK_NAME):
        for state in scan_partitions(metrics_dir):
            reports.append(_compact_partition(state, min_parts=min_parts))
    return CompactionReport(
        parts_merged=sum(r.parts_merged for r in reports),
        rows=sum(r.rows for r in reports),
        files_written=[f for r in reports for f in r.files_written],
        stale_parts_removed=sum(r.stale_parts_removed for r in reports),
    )


def _compact_partition(state: PartitionState, *, min_parts: int) -> CompactionReport:
    for manifest in state.orphan_manifests:  # a compactor died before its commit point
        manifest.unlink(missing_ok=True)
    done = state.compacted_cells
    stale = [p for c, p in state.parts.items() if c in done]
    for path in stale:  # a compactor died after its commit point, before deleting parts
        path.unlink(missing_ok=True)
    new = sorted(c for c in state.parts if c not in done)
    if len(new) < max(1, min_parts):
        return CompactionReport(stale_parts_removed=len(stale))
    # One dataset over all parts reads them on pyarrow's thread pool (10^4 small files).
    table = ds.dataset([str(state.parts[c]) for c in new], schema=SCHEMA,
                       format="parquet").to_table()
    _check_cells(table, new, state.directory)
    name = hashlib.sha256("\n".join(new).encode()).hexdigest()[:16]
    target = state.directory / f"{COMPACT_PREFIX}{name}{PARQUET_SUFFIX}"
    record = {"format": 1, "file": target.name, "rows": table.num_rows, "cells": new}
    with publishing(target) as tmp:
        pq.write_table(table, tmp)
        write_bytes_atomic(state.directory / f"{MANIFEST_PREFIX}{name}{MANIFEST_SUFFIX}",
                           json.dumps(record).encode())
    for c in new:
        state.parts[c].unlink(missing_ok=True)
    return CompactionReport(len(new), table.num_rows, [target], len(stale))


def _compactions(
    directory: Path, names: set[str]
) -> tuple[dict[Path, frozenset[str]], list[Path], list[Path]]:
    compacted: dict[Path, frozenset[str]] = {}
    orphans, damaged = [], []
    for name in sorted(names):
        if not (name.startswith(MANIFEST_PREFIX) and name.endswith(MANIFEST_SUFFIX)):
            continue
        key = name[len(MANIFEST_PREFIX):-len(MANIFEST_SUFFIX)]
        data = f"{COMPACT_PREFIX}{key}{PARQUET_SUFFIX}"
        cells = _manifest_cells(directory / name) if data in names else None
        if cells is None and data in names:
            # Manifests are published atomically, so this is real damage: the compact file
            # itself still says which cells it holds.
            cells = cells_in_file(directory / data)
            if cells is not None:
                damaged.append(directory / name)
        if cells is None:
            orphans.append(directory / name)
        else:
            compacted[directory / data] = cells
    return compacted, orphans, damaged


def _manifest_cells(path: Path) -> frozenset[str] | None:
    record = records.read_json(path, records.is_manifest)
    return None if record is None else frozenset(record["cells"])


def cells_in_file(path: Path) -> frozenset[str] | None:
    """The cell ids in a metrics file (its cell_id column); None if it cannot be read."""
    try:
        return frozenset(pq.read_table(path, columns=["cell_id"]).column(0).to_pylist())
    except (pa.ArrowException, OSError, KeyError, ValueError):
        return None


def _check_cells(table: pa.Table, expected: list[str], directory: Path) -> None:
    found = set(table.column("cell_id").to_pylist())
    if found != set(expected):
        differ = sorted(found ^ set(expected))
        raise StorageError(
            f"part files in {directory} disagree with their names: {len(differ)} cell ids "
            f"differ (e.g. {differ[0]}): a part file holds another cell's rows"
        )


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # flock is released by the kernel if the holder dies, so a crash never leaves a stale lock.
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
