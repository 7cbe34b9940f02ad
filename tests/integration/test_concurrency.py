"""Issue 13: 32 processes commit cells into one run while a reader queries and self-checks it.

The reader runs what `gi-eval run`'s resume scan, `gi-eval verify` and `gi-eval tables` run,
in a loop, during the writes: it must never see a corrupt cell, a cell with only some of its
rows, a duplicate, or a false finding (a committed cell whose group the scan misses would be
quarantined and recomputed for nothing); at the end no cell is lost.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import storage
from storage.metrics import ROW_COLUMNS
from storage.verify import scan
from tests.integration.test_storage_concurrency import (
    BATCH,
    METHODS,
    _gradient,
    _reconstruction,
    _value,
)
from tests.integration.test_storage_concurrency import _rows as _base_rows

WRITERS = 32
CELLS_PER_WRITER = 8


def _rows(cell_id: str, gid: str, method: str) -> list[dict[str, Any]]:
    # columns other issues add stay null: this test is about files, not values
    return [{**dict.fromkeys(ROW_COLUMNS), **r} for r in _base_rows(cell_id, gid, method)]


def _cell(writer: int, k: int) -> tuple[str, str, str]:
    return f"p{writer:02d}k{k}", f"g{writer % 4}", METHODS[(writer + k) % len(METHODS)]


def _writer(root: str, writer: int, ready: Any) -> None:
    run = storage.open_run(root)
    ready.wait()
    for k in range(CELLS_PER_WRITER):
        cell_id, gid, method = _cell(writer, k)
        storage.write_gradient(run.gradient_path(gid), _gradient(gid))
        storage.write_reconstruction(run.reconstruction_path(cell_id), _reconstruction(cell_id),
                                     keep_restarts=False)
        run.commit_metrics(_rows(cell_id, gid, method))
        time.sleep(0.02 * (writer % 4))


def _reader_pass(run: storage.RunDir) -> int:
    report = scan(run)
    assert report.findings == (), report.describe()
    df = run.metrics()
    assert not df.duplicated(["cell_id", "image_index"]).any()
    assert (df.groupby("cell_id").size() == BATCH).all()  # never a partial cell
    assert (df["psnr"] == df["cell_id"].map(_value)).all()  # never a corrupt value
    return df["cell_id"].nunique()


@pytest.mark.slow
def test_32_writers_while_a_reader_queries_and_scans(tmp_path: Path) -> None:
    run = storage.create_run(tmp_path / "run", "name: concurrency32\n")
    # fork: 32 fresh interpreters each importing torch would take minutes on a small machine;
    # the parent has not read anything yet, so no pyarrow/torch thread pool is forked mid-use
    ctx = mp.get_context("fork")
    ready = ctx.Barrier(WRITERS + 1)
    procs = [ctx.Process(target=_writer, args=(str(run.root), w, ready)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    ready.wait(timeout=1200)  # a hang guard, not a speed requirement
    seen = []
    while any(p.is_alive() for p in procs):
        seen.append(_reader_pass(run))
    for p in procs:
        p.join()
        assert p.exitcode == 0
    seen.append(_reader_pass(run))

    expected = {_cell(w, k)[0] for w in range(WRITERS) for k in range(CELLS_PER_WRITER)}
    assert run.committed_cells() == expected  # nothing lost
    assert seen[-1] == len(expected) and seen == sorted(seen)  # cells only ever appear
    assert any(0 < n < len(expected) for n in seen)  # the reader really overlapped the writes
    deep = scan(run, deep=True)
    assert deep.findings == () and deep.parts_checked == len(expected)
    for cell_id in expected:
        rec = storage.read_reconstruction(run.reconstruction_path(cell_id))
        assert np.all(rec.images == _value(cell_id))
    assert not (run.root / "quarantine").exists()
