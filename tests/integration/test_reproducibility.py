"""Issue 20: a cell's numbers are a function of its identity, and any run can prove it.

a. `execution.batch_cells: true` and `false` give bit-identical metrics, reconstructions and
   loss curves on a grid shaped like the issue's (GI-x and GI-z/w; none, sparsity, noise and
   quantisation; 2 batches x 2 seeds; cells_per_job 2), with tiny iterations. Before the fix the
   batched cells were solved as one vmapped optimisation and most of them differed.
b. every metrics row carries its schedule provenance (attempts, resumed_from_iteration,
   batch_group_size, threads).
c. `gi-eval verify RUN --recompute 2` says "2 of 2 identical" (exit 0) and leaves no scratch;
   after a stored reconstruction image is altered by hand, `--cells ID` names that cell with its
   provenance and exits 1.

Every run goes through the console script in a subprocess (OMP_NUM_THREADS=1), as a user runs it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import storage
from storage.zarr_store import read_reconstruction, write_reconstruction
from tasks.cells import expand
from tasks.spec import load_spec

RUN_TIMEOUT_S = 900  # a hang guard on a loaded 2-core machine, not a speed requirement
METRICS = ["psnr", "ssim", "lpips", "final_cost", "status", "iterations", "label",
           "label_accuracy", "best_psnr_in_batch"]  # fmt: skip
# restarts 2 x 2 cells = 4 rows per group: the old batched path solved such groups as one
# vmapped optimisation (engine.PathPolicy: vmap from 4 rows on this CPU).
GRID: dict[str, Any] = {
    "name": "repro",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 2},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "generator": {"kind": "dcgan32"},
    "methods": [
        {"name": "gi-x", "params": {"iterations": 6, "restarts": 2}},
        {"name": "gi-z/w", "params": {"z_iterations": 2, "w_iterations": 2, "restarts": 2}},
    ],
    "defenses": [
        {"kind": "none"},
        {"kind": "sparsity", "p": 0.9},
        {"kind": "noise", "sigma": 0.01},
        {"kind": "quantize", "bits": 4},
    ],
    "batch_sizes": [2],
    "seeds": [0, 1],
    "execution": {"executor": "inline", "cells_per_job": 2, "batch_cells": True},
}


def _gi_eval() -> list[str]:
    script = Path(sys.executable).with_name("gi-eval")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _gi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_gi_eval(), *args], capture_output=True, text=True, env=_env(),
                          timeout=RUN_TIMEOUT_S, check=False)


def _grid_run(tmp: Path, name: str, **execution: Any) -> Path:
    spec = {**GRID, "execution": {**GRID["execution"], **execution}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp / name
    proc = _gi("run", str(path), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def differing_cells(a: storage.RunDir, b: storage.RunDir) -> list[str]:
    """Cells whose metric values, images or loss curves are not bit-identical."""
    key = ["cell_id", "image_index"]
    x = a.metrics().set_index(key)[METRICS].sort_index()
    y = b.metrics().set_index(key)[METRICS].sort_index()
    assert list(x.index) == list(y.index)
    out = []
    for cell in sorted(set(x.index.get_level_values(0))):
        ra, rb = (storage.read_reconstruction(r.reconstruction_path(cell)) for r in (a, b))
        same = (
            x.loc[cell].equals(y.loc[cell])
            and ra.images.tobytes() == rb.images.tobytes()
            and ra.loss_curve.tobytes() == rb.loss_curve.tobytes()
        )
        if not same:
            out.append(cell)
    return out


@pytest.fixture(scope="module")
def batched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _grid_run(tmp_path_factory.mktemp("repro"), "batched", batch_cells=True)


def test_batch_cells_true_and_false_are_bit_identical(batched: Path, tmp_path: Path) -> None:
    unbatched = _grid_run(tmp_path, "unbatched", batch_cells=False)
    cells = {c.id for c in expand(load_spec(tmp_path / "unbatched.yaml")).inversion_cells}
    assert len(cells) == 32
    a, b = storage.open_run(batched), storage.open_run(unbatched)
    assert a.committed_cells() == b.committed_cells() == cells
    assert differing_cells(a, b) == []


def test_every_row_carries_its_schedule_provenance(batched: Path) -> None:
    df = storage.open_run(batched).metrics()
    assert (df["attempts"] == 1).all()  # an uninterrupted run: first attempts, nothing resumed
    assert df["resumed_from_iteration"].isna().all()
    assert set(df["threads"]) == {1}  # OMP_NUM_THREADS=1 jobs
    # cells_per_job 2 with batch_cells: same-key cells share a unit of two
    assert set(df["batch_group_size"]) <= {1, 2} and (df["batch_group_size"] == 2).any()


def test_verify_recompute_finds_identical_cells_then_names_an_altered_one(batched: Path) -> None:
    run = storage.open_run(batched)
    before = sorted(p.name for p in run.metrics_dir.rglob("*.parquet"))
    proc = _gi("verify", str(batched), "--recompute", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 of 2 recomputed cells identical" in proc.stdout
    assert not (batched / "scratch").exists()  # identical: the scratch run is removed
    assert sorted(p.name for p in run.metrics_dir.rglob("*.parquet")) == before

    cell = sorted(run.committed_cells())[5]
    path = run.reconstruction_path(cell)
    stored = read_reconstruction(path)
    altered = stored.images.copy()
    altered[0, 0, 0, 0] = 1.0 - altered[0, 0, 0, 0]  # one pixel, by hand
    write_reconstruction(path, dataclasses.replace(stored, images=altered), keep_restarts=False)
    proc = _gi("verify", str(batched), "--cells", cell)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "0 of 1 recomputed cells identical" in proc.stdout
    assert f"cell {cell}" in proc.stdout and "images: 1 value(s) differ" in proc.stdout
    assert "attempts=1" in proc.stdout and "batch_group_size=" in proc.stdout
    assert np.array_equal(read_reconstruction(path).images, altered)  # stored stays as it was


def test_verify_recompute_refuses_more_cells_than_committed(batched: Path) -> None:
    proc = _gi("verify", str(batched), "--recompute", "99")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --recompute: asks for 99 cells; the run has 32 committed cells (give 1..32)"
    ]
