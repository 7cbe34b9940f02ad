"""The run directory: creation, resume scan and the pandas query API. Its layout (every path
into it) is storage.layout.

A cell commits in this order: reconstruction group (atomic), then its metrics part (atomic, the
commit marker), then its checkpoint is deleted. A crash anywhere before the part lands leaves
the cell uncommitted; the rerun overwrites the group and commits once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import yaml

from gi_core.errors import ConfigError
from storage import commits, tables
from storage.atomic import sweep_temp_files, write_bytes_atomic
from storage.errors import StorageError
from storage.layout import GRID_FILE, GROUP_SUFFIX, SUBDIRS, RunLayout
from storage.metrics import (
    DATASET_SCHEMA,
    PARTITION_KEY,
    SCHEMA,
    is_cell_id,
    partition_dirname,
    write_metrics_part,
)

log = logging.getLogger(__name__)
_READ_ATTEMPTS = 3


@dataclass(frozen=True)
class RunDir(RunLayout):
    """Paths (storage.layout) and queries of one run directory. Cheap to construct; holds no
    open files."""

    def spec_name(self) -> str | None:
        """The `name` of the frozen grid.yaml, read without validating the spec (None when it
        is missing or damaged)."""
        if not self.is_run or frozen_spec_problem(self) is not None:
            return None
        name = yaml.safe_load(self.grid_path.read_text())["name"]
        return str(name)

    def spec_text(self) -> str:
        """The frozen grid.yaml; ConfigError naming it (and how to rebuild it) when damaged."""
        problem = frozen_spec_problem(self)
        if problem is not None:
            raise ConfigError(
                f"{self.grid_path}: {problem}; `gi-eval run SPEC --out {self.root}` with the "
                "grid's spec file rebuilds it (committed cells are kept)"
            )
        return self.grid_path.read_text()

    def has_gradient(self, gradient_id: str) -> bool:
        return self.gradient_path(gradient_id).is_file()

    def stored_gradients(self) -> set[str]:
        """Ids of every published gradient group (a group's presence is its commit)."""
        return _ids_with_suffix(self.gradients_dir, GROUP_SUFFIX)

    def committed_cells(self) -> set[str]:
        """Ids of committed inversion cells (file names + compaction manifests only)."""
        return commits.committed_cells(self.metrics_dir)

    def is_committed(self, cell_id: str, method: str) -> bool:
        """Fast path for one cell: its part file, else the partition's manifests."""
        if self.part_path(method, cell_id).is_file():
            return True
        directory = self.metrics_dir / partition_dirname(method)
        return directory.is_dir() and cell_id in commits.scan_partition(directory, method).cells

    def commit_metrics(self, rows: Sequence[dict[str, Any]]) -> Path:
        """Write one cell's metrics part; see storage.metrics.write_metrics_part."""
        return write_metrics_part(self.metrics_dir, rows)

    def metrics(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Every committed row, each cell exactly once, as a pandas DataFrame.

        `method` is a plain string column (decoded from the partition directory).
        """
        return self.metrics_table(columns).to_pandas()

    def metrics_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        for attempt in range(_READ_ATTEMPTS):
            try:
                return self._read_committed(columns)
            except FileNotFoundError:
                # A concurrent compact() deleted a part after our listing: list again.
                if attempt == _READ_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def compact(self, *, min_parts: int = 2) -> commits.CompactionReport:
        """Merge part files into one compact file per method (rows neither lost nor doubled)."""
        return commits.compact(self.metrics_dir, min_parts=min_parts)

    def sweep_temp_files(self, *, older_than_s: float = 3600.0) -> int:
        """Delete temp files of crashed writers older than `older_than_s`; returns the count."""
        return sweep_temp_files(self.root, older_than_s=older_than_s)

    def cells(self) -> pd.DataFrame:
        """One row per cell (committed or failed) with status and reason; see storage.tables."""
        return tables.cells(self)

    def curves(self, cells: Iterable[str] | None = None) -> pd.DataFrame:
        """Loss curves of committed cells in long form (cell, stage, iteration, restart, cost)."""
        return tables.curves(self, cells)

    def _read_committed(self, columns: Sequence[str] | None) -> pa.Table:
        files = [str(f) for s in commits.scan_partitions(self.metrics_dir) for f in s.data_files()]
        if not files:
            empty = DATASET_SCHEMA.empty_table()
            return empty.select(list(columns)) if columns else empty
        try:
            return self._read_files(files, columns)
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError):
            # One truncated or foreign file must not make the whole run unreadable: read file by
            # file and leave out (loudly) what cannot be read. `gi-eval verify` or the next
            # `gi-eval run` moves it to quarantine and recomputes its cells.
            return self._read_readable(files, columns)

    def _read_files(self, files: Sequence[str], columns: Sequence[str] | None) -> pa.Table:
        partitioning = ds.partitioning(pa.schema([(PARTITION_KEY, pa.string())]), flavor="hive")
        dataset = ds.dataset(list(files), schema=DATASET_SCHEMA, format="parquet",
                             partitioning=partitioning, partition_base_dir=str(self.metrics_dir))
        return dataset.to_table(columns=list(columns) if columns else None)

    def _read_readable(self, files: Sequence[str], columns: Sequence[str] | None) -> pa.Table:
        tables, skipped = [], []
        for f in files:
            try:
                tables.append(self._read_files([f], columns))
            except FileNotFoundError:
                raise
            except (pa.ArrowException, OSError) as e:
                skipped.append(f"{f} ({e})")
        if skipped:
            log.warning(
                "skipped %d unreadable metrics file(s); `gi-eval verify %s` moves them to "
                "quarantine so `gi-eval run` recomputes their cells: %s",
                len(skipped), self.root, "; ".join(skipped),
            )
        return pa.concat_tables(tables) if tables else self._read_committed_empty(columns)

    @staticmethod
    def _read_committed_empty(columns: Sequence[str] | None) -> pa.Table:
        empty = DATASET_SCHEMA.empty_table()
        return empty.select(list(columns)) if columns else empty


def create_run(path: Path | str, spec_text: str) -> RunDir:
    """Create (or reopen) the run at `path` with `spec_text` as its frozen grid.yaml.

    Reopening with a spec that parses to the same YAML data is a resume; a different spec is
    refused, because the run's cells and its grid.yaml would disagree.
    """
    run = RunDir(Path(path))
    if run.grid_path.exists():
        if _yaml_data(run.spec_text()) != _yaml_data(spec_text):
            raise StorageError(
                f"{run.root} was created from a different grid spec; pick another run "
                f"directory (or delete {run.grid_path} to adopt the new spec)"
            )
    else:
        run.root.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(run.grid_path, spec_text.encode())
    for sub in SUBDIRS:
        (run.root / sub).mkdir(parents=True, exist_ok=True)
    return run


def update_spec(run: RunDir, spec_text: str) -> None:
    """Adopt an edited spec for an existing run (e.g. new methods or seeds): cell ids are content
    hashes, so committed cells stay valid. The previous grid.yaml is kept as
    history/grid-<time>.yaml."""
    if _yaml_data(run.spec_text()) == _yaml_data(spec_text):
        return
    history = run.history_dir
    history.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    write_bytes_atomic(history / f"grid-{stamp}-{os.getpid()}.yaml", run.spec_text().encode())
    write_bytes_atomic(run.grid_path, spec_text.encode())


def existing_run(path: Path | str) -> RunDir | None:
    """The run at `path`, or None when there is none (no grid.yaml)."""
    run = RunDir(Path(path))
    return run if run.is_run else None


def open_run(path: Path | str) -> RunDir:
    run = RunDir(Path(path))
    if not run.grid_path.is_file():
        raise StorageError(f"{run.root} is not a run directory (no {GRID_FILE})")
    return run


def frozen_spec_problem(run: RunDir) -> str | None:
    """Why grid.yaml cannot be the run's spec (None: it is a YAML mapping, or is missing)."""
    try:
        data = yaml.safe_load(run.grid_path.read_bytes().decode())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, yaml.YAMLError) as e:  # UnicodeDecodeError is a ValueError
        return f"damaged frozen spec ({' '.join(str(e).split())[:120]})"
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return "damaged frozen spec (not a grid spec mapping with a name)"
    return None


def replace_damaged_spec(run: RunDir, spec_text: str) -> Path | None:
    """Move a damaged grid.yaml to quarantine/ and freeze `spec_text` in its place; returns
    where the damaged copy went (None: grid.yaml was fine). Cell ids are content hashes, so
    every committed cell stays valid under the rebuilt spec."""
    if frozen_spec_problem(run) is None:
        return None
    folder = run.quarantine_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / GRID_FILE
    os.replace(run.grid_path, target)
    write_bytes_atomic(run.grid_path, spec_text.encode())
    return target


def _ids_with_suffix(directory: Path, suffix: str) -> set[str]:
    if not directory.is_dir():
        return set()
    # only canonical ids: "<id> (1).zarr.zip" of a sync tool is not a stored group
    return {n[: -len(suffix)] for n in os.listdir(directory)
            if n.endswith(suffix) and is_cell_id(n[: -len(suffix)])}


def _yaml_data(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise StorageError(f"unreadable grid spec: {e}") from e


__all__ = ["GRID_FILE", "RunDir", "SCHEMA", "create_run", "existing_run", "open_run"]
