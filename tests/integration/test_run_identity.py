"""Issue 16, Acceptance 1 through the CLI: a run directory belongs to its spec, and the
`normalize` x `latent_space` grid gives four correctly counted columns.

Inline executor, tiny iterations; every command is the console script in a subprocess.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

RUN_TIMEOUT_S = 300

CHANGED: dict[str, Any] = {
    "name": "changed",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 2},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "generator": {"kind": "dcgan32"},
    "methods": [
        {"name": "gi-x", "params": {"iterations": 4, "restarts": 1}},
        {"name": "gi-z/w", "params": {"z_iterations": 2, "w_iterations": 2, "restarts": 1}},
    ],
    "batch_sizes": [1],
    "execution": {"executor": "inline"},
}
STYLEGAN2 = {"resolution": 32, "channels": [8, 8, 8, 8], "z_dim": 8, "w_dim": 8}
NORMALIZE = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
ABLATION: dict[str, Any] = {
    "name": "ablation",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 2},
    "victims": [
        {"arch": "convnet", "width": 4},
        {"arch": "convnet", "width": 4, "normalize": NORMALIZE},
    ],
    "generators": [
        {"kind": "stylegan2", "stylegan2": STYLEGAN2, "latent_space": "z"},
        {"kind": "stylegan2", "stylegan2": STYLEGAN2, "latent_space": "w"},
    ],
    "methods": [
        {"name": "gi-z/w", "params": {"z_iterations": 1, "w_iterations": 1, "restarts": 1}}
    ],
    "batch_sizes": [1],
    "execution": {"executor": "inline"},
}


def _gi_eval(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("gi-eval")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, f"gi-eval {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _write(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _columns(table_md: str) -> list[str]:
    """Configuration columns of Table 1's markdown (after the two index columns)."""
    header = next(line for line in table_md.splitlines() if line.startswith("| setting"))
    return [c.strip() for c in header.strip("|").split("|")][2:]


def _row(table_md: str, name: str) -> list[str]:
    line = next(line for line in table_md.splitlines() if f"| {name} |" in line)
    return [c.strip() for c in line.strip("|").split("|")][2:]


def test_a_changed_spec_rerun_into_the_same_run_dir_is_counted_for_the_current_spec(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    _gi_eval("run", str(_write(tmp_path / "a.yaml", CHANGED)), "--out", str(out))
    changed = copy.deepcopy(CHANGED)
    changed["methods"][0]["params"]["iterations"] = 2  # GI-x at half the iterations
    _gi_eval("run", str(_write(tmp_path / "b.yaml", changed)), "--out", str(out))

    status = _gi_eval("status", str(out)).stdout
    assert "cells: 4 total, 4 done" in status
    assert "not in the current spec: 2 committed cells" in status

    tables = _gi_eval("tables", str(out)).stdout
    assert "4 of 4 cells committed" in tables
    assert "2 committed cells not in the current spec (left out" in tables
    table = (out / "reports" / "table.md").read_text()
    columns = _columns(table)
    assert len(columns) == 2 and sum(c.startswith("gi-x") for c in columns) == 1
    assert _row(table, "n (batches × seeds)") == ["2", "2"]
    assert "Not in the current spec" in table
    assert "- gi-x [paper] · 4 it ×1 = 4 evals: 2 cells" in table  # labelled by what differs

    report = _gi_eval("report", str(out)).stdout
    assert "4 of 4 cells committed" in report and "2 committed cells not in" in report

    _gi_eval("tables", str(out), "--all")
    everything = (out / "reports" / "table.md").read_text()
    gix = [c for c in _columns(everything) if c.startswith("gi-x")]
    # the two GI-x budgets are two columns, each labelled with its budget
    assert sorted(c.split(" · ", 1)[1] for c in gix) == ["2 it ×1 = 2 evals", "4 it ×1 = 4 evals"]
    assert _row(everything, "n (batches × seeds)") == ["2", "2", "2"]


def test_normalize_by_latent_space_gives_four_columns(tmp_path: Path) -> None:
    out = tmp_path / "run"
    printed = _gi_eval("run", str(_write(tmp_path / "s.yaml", ABLATION)), "--out", str(out))
    assert "8 of 8 cells committed" in printed.stdout
    table = (out / "reports" / "table.md").read_text()
    columns = _columns(table)
    assert len(columns) == 4, columns
    assert {c.split(" · ")[0] for c in columns} == {"gi-z/w [paper]"}
    assert all("latent_space=" in c and "normalize.mean=" in c for c in columns)
    assert _row(table, "n (batches × seeds)") == ["2"] * 4
    status = _gi_eval("status", str(out)).stdout
    assert "cells: 8 total, 8 done" in status and "not in the current spec" not in status
