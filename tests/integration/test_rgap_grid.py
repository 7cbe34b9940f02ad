"""R-GAP and R-GAP+G end to end through the real CLI (`gi-eval run`, inline executor): the
rows carry one relative error per victim layer, and the report draws Figures A1/A2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from storage.run import open_run

GRID: dict[str, Any] = {
    "name": "rgap-tiny",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 1},
    "victim": {"arch": "rgapnet", "width": 4, "seed": 0},
    "generator": {"kind": "dcgan32"},
    "methods": [
        "rgap",
        {"name": "rgap+g", "params": {"z_iterations": 3, "restarts": 1}},
        {"name": "gi-x", "params": {"iterations": 2, "restarts": 1}},
    ],
    "batch_sizes": [1],
    "execution": {"executor": "inline"},
}


def _gi_eval(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("gi-eval")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, f"gi-eval {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_rgap_cells_record_layer_errors_and_the_report_draws_a1_a2(tmp_path: Path) -> None:
    spec = tmp_path / "rgap.yaml"
    spec.write_text(yaml.safe_dump(GRID, sort_keys=False))
    out = tmp_path / "run"
    _gi_eval("run", str(spec), "--out", str(out))
    df = open_run(out).metrics().set_index("method")
    for method in ("rgap", "rgap+g"):
        errors = json.loads(df.loc[method, "layer_errors"])
        assert len(errors) == 4  # rgapnet: three convolutions and the linear head
        assert max(errors[1:]) < 1e-3  # above layer 0 both use R-GAP's closed form
    assert pd.isna(df.loc["gi-x", "layer_errors"])  # no layer recovered
    assert df.loc["rgap", "iterations"] == 0 and df.loc["rgap+g", "iterations"] == 3
    reports = out / "reports"
    assert (reports / "rgap_a1.png").is_file() and (reports / "rgap_a2.png").is_file()
