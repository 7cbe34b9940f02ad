"""16 processes write cells into one run while a reader scans, queries and compacts.

Checks the storage contract under real concurrency: every cell lands exactly once, no group is
corrupt, and a reader only ever sees committed cells, each with all of its rows.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import storage

WORKERS = 16
CELLS_PER_WORKER = 25
BATCH = 3
SHARED_GRADIENTS = 5  # every worker writes these same gradient ids: writers race on them
METHODS = ("gi-x", "gi-z/w+bn", "gi-z/w")


def _value(cell_id: str) -> float:
    return float(sum(map(ord, cell_id)) % 997)


def _gradient(gid: str) -> storage.StoredGradient:
    g = np.full(50_000, _value(gid), dtype=np.float32)
    return storage.StoredGradient(
        gradient=g, param_names=("w",), param_shapes=((50_000,),),
        images=np.full((BATCH, 3, 8, 8), 0.5, np.float32), labels=np.arange(BATCH),
        attrs={"cell": {"id": gid}},
    )


def _reconstruction(cell_id: str) -> storage.StoredReconstruction:
    v = _value(cell_id)
    return storage.StoredReconstruction(
        images=np.full((BATCH, 3, 8, 8), v, np.float32), restart_costs=np.array([v]),
        loss_curve=np.full((20, 1), v, np.float32), curve_iterations=np.arange(20),
        status="ok", iterations=20, wall_seconds=0.1, device="cpu", best_restart=0,
        attrs={"cell": {"id": cell_id}},
    )


def _rows(cell_id: str, gid: str, method: str) -> list[dict[str, object]]:
    return [{
        "cell_id": cell_id, "gradient_id": gid, "method": method, "dataset": "synthetic",
        "variant": "paper", "preset": "paper", "method_params": "{}",
        "image_size": 8, "victim": "lenet", "victim_seed": 0, "generator": None,
        "defense": "none", "defense_level": 0.0, "batch_size": BATCH, "batch_index": 0,
        "seed": 0, "image_index": j, "sample_index": j, "label": j, "labels": "given",
        "label_accuracy": 1.0, "psnr": _value(cell_id),
        "ssim": 0.5, "lpips": 0.25, "best_psnr_in_batch": j == 0, "best_ssim_in_batch": j == 0,
        "best_lpips_in_batch": j == 0, "final_cost": -1.0, "status": "ok", "iterations": 20,
        "wall_seconds": 0.1, "device": "cpu",
    } for j in range(BATCH)]


def _cell(worker: int, k: int) -> tuple[str, str, str]:
    return f"w{worker:02d}c{k:02d}", f"g{k % SHARED_GRADIENTS}", METHODS[k % len(METHODS)]


def _worker(root: str, worker: int, ready: mp.Barrier) -> None:  # type: ignore[valid-type]
    run = storage.open_run(root)
    ready.wait()  # imports are slow; start writing together so the writes really overlap
    for k in range(CELLS_PER_WORKER):
        cell_id, gid, method = _cell(worker, k)
        storage.write_gradient(run.gradient_path(gid), _gradient(gid))
        storage.write_reconstruction(run.reconstruction_path(cell_id), _reconstruction(cell_id),
                                     keep_restarts=False)
        run.commit_metrics(_rows(cell_id, gid, method))
        time.sleep(0.05 + 0.01 * (worker % 5))  # spread commits over the reader's snapshots


def _check_snapshot(run: storage.RunDir) -> int:
    committed = run.committed_cells()
    df = run.metrics()
    seen = set(df["cell_id"])
    assert committed <= seen  # metrics() lists later, so it may see a few more
    assert not df.duplicated(["cell_id", "image_index"]).any()
    assert (df.groupby("cell_id").size() == BATCH).all()
    for cell_id in committed:
        rec = storage.read_reconstruction(run.reconstruction_path(cell_id))
        assert rec.images[0, 0, 0, 0] == _value(cell_id)
        assert run.has_gradient(df.loc[df["cell_id"] == cell_id, "gradient_id"].iloc[0])
    return len(committed)


@pytest.mark.slow
def test_sixteen_writers_one_run(tmp_path: Path) -> None:
    run = storage.create_run(tmp_path / "run", "name: concurrency\n")
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(WORKERS + 1)
    procs = [ctx.Process(target=_worker, args=(str(run.root), w, ready)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    ready.wait(timeout=120)
    snapshots, compactions = [], 0
    while any(p.is_alive() for p in procs):
        snapshots.append(_check_snapshot(run))
        if len(snapshots) % 3 == 0:
            run.compact(min_parts=1)
            compactions += 1
        time.sleep(0.05)
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert snapshots == sorted(snapshots)  # committed cells only ever grow

    expected = {_cell(w, k)[0] for w in range(WORKERS) for k in range(CELLS_PER_WORKER)}
    assert run.committed_cells() == expected
    df = run.metrics()
    assert len(df) == len(expected) * BATCH and set(df["cell_id"]) == expected
    assert not df.duplicated(["cell_id", "image_index"]).any()
    for cell_id in expected:
        rec = storage.read_reconstruction(run.reconstruction_path(cell_id))
        assert np.all(rec.images == _value(cell_id)) and rec.attrs["cell"]["id"] == cell_id
    for gid in run.stored_gradients():
        grad = storage.read_gradient(run.gradient_path(gid))
        assert np.all(grad.gradient == _value(gid))
    assert run.stored_gradients() == {f"g{i}" for i in range(SHARED_GRADIENTS)}
    # No temp files survive, and plain pandas agrees after a final compaction.
    assert not [p for p in run.root.rglob(".*") if p.is_file()]
    run.compact(min_parts=1)
    plain = pd.read_parquet(run.metrics_dir)
    assert len(plain) == len(expected) * BATCH
    assert sorted(plain["method"].astype(str).unique()) == sorted(METHODS)
    # The reader really ran during the writes (not only before or after them).
    assert compactions > 0 and any(0 < n < len(expected) for n in snapshots)
