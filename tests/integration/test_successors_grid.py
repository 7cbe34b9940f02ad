"""Issue 19, Deliver 6: GIAS, GGL and GIFD in one grid through `gi-eval run` (console script,
inline executor) at a matched budget of victim gradient evaluations, then the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from storage.run import open_run

GRID = {
    "name": "successors-smoke",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 2},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "generator": {"kind": "dcgan32"},
    "methods": [
        {"name": "gi-z/w", "params": {"restarts": 1}},
        {"name": "ggl", "params": {"restarts": 1, "population": 8}},
        {"name": "gifd", "params": {"restarts": 1, "layers": 2}},
    ],
    "budgets": {"match": "grad_evals", "value": 40},
    "baseline": "gi-z/w",
    "batch_sizes": [1],
    "seeds": [0],
    "execution": {"executor": "inline"},
}


def _gi_eval(*args: str) -> str:
    script = Path(sys.executable).with_name("gi-eval")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=900,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, f"gi-eval {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_gias_ggl_and_gifd_run_in_one_grid_at_matched_gradient_evaluations(
    tmp_path: Path,
) -> None:
    spec = tmp_path / "successors.yaml"
    spec.write_text(yaml.safe_dump(GRID))
    out = tmp_path / "run"
    printed = _gi_eval("run", str(spec), "--out", str(out))
    assert "6 of 6 cells committed" in printed
    cells = pd.read_csv(out / "reports" / "cells.csv")
    assert sorted(cells["method"]) == sorted(["gi-z/w", "ggl", "gifd"] * 2)
    # every method spends the matched 40 evaluations: GGL 40 candidates, GIFD 8 + 32 (1:4)
    assert set(cells["budget_grad_evals"]) == {40}
    stages = dict(zip(cells["method"], cells["budget_stage_iterations"], strict=False))
    assert json.loads(stages["ggl"]) == {"iterations": 40}
    assert json.loads(stages["gifd"]) == {"z_iterations": 8, "f_iterations": 32}
    rows = open_run(out).metrics()
    assert set(rows["status"]) == {"ok"} and np.isfinite(rows["final_cost"]).all()
    assert (rows[rows["method"] == "ggl"]["iterations"] == 40).all()
    paired = (out / "reports" / "paired.md").read_text()
    assert "baseline 'gi-z/w'" in paired
    # labels name the params that differ from the paper recipe
    assert "ggl [paper population=8] − gi-z/w [paper]" in paired
    assert "gifd [paper layers=2] − gi-z/w [paper]" in paired
