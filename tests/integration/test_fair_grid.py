"""Issue 8 end to end: sweeps stay separate rows; `gi-eval tune` runs and its spec runs.

Both go through the real CLI (`gi-eval run` / `gi-eval tune`, inline executor, ephemeral
Prefect), real Parquet metrics and the real report tables.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from storage.run import open_run

SWEEP: dict[str, Any] = {
    "name": "sweep",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 1},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "methods": [
        {"name": "gi-x", "params": {"iterations": 3, "restarts": 1, "lr": 0.1}},
        {"name": "gi-x", "params": {"iterations": 3, "restarts": 1, "lr": 0.01}},
    ],
    "defenses": [
        {"kind": "dp", "clip": 1.0, "sigma": 0.01},
        {"kind": "dp", "clip": 4.0, "sigma": 0.01},
    ],
    "batch_sizes": [2],
    "execution": {"executor": "inline"},
}

SMOKE = Path(__file__).resolve().parents[2] / "grids" / "smoke.yaml"


def _gi_eval(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("gi-eval")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, f"gi-eval {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _write(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
def test_lr_and_clip_sweeps_are_separate_rows_everywhere(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _gi_eval("run", str(_write(tmp_path / "sweep.yaml", SWEEP)), "--out", str(out))
    df = open_run(out).metrics()
    assert set(df["variant"]) == {"paper lr=0.1", "paper lr=0.01"}
    assert set(df["defense_clip"]) == {1.0, 4.0}
    assert df["dp_epsilon"].notna().all() and (df["dp_delta"] > 0).all()
    configs = df.groupby(["variant", "defense_clip"]).size()
    assert len(configs) == 4 and (configs == 2).all()  # 4 configurations x B = 2 images
    # the report's table keeps them apart too: 2 variants as columns, 2 clips as blocks
    table = pd.read_csv(out / "reports" / "table.csv")
    text = table.to_string()
    assert "lr=0.1" in text and "lr=0.01" in text
    assert "defense_clip=1.0" in text and "defense_clip=4.0" in text


@pytest.mark.slow
def test_tune_on_the_smoke_grid_writes_a_spec_that_runs(tmp_path: Path) -> None:
    tuned = tmp_path / "smoke.tuned.yaml"
    proc = _gi_eval(
        "tune",
        str(SMOKE),
        "--executor",
        "inline",
        "--trials",
        "2",
        "--out",
        str(tmp_path / "tune-run"),
        "--write-spec",
        str(tuned),
    )
    # one study per method at the smoke grid's own budget (grids/smoke.yaml)
    assert "gi-x @ iterations=300, restarts=1: held-out PSNR" in proc.stdout
    assert "gi-z/w @ z_iterations=12, w_iterations=12, restarts=1: held-out PSNR" in proc.stdout
    report = tmp_path / "tune-run" / "reports"
    trials = pd.read_csv(report / "tuning.csv")
    assert len(trials) == 2 * 2 and trials["psnr"].notna().all()
    assert (report / "tuning.png").stat().st_size > 1000
    assert "evaluator-side" in (report / "tuning.md").read_text()
    # tuning ran on the held-out batches only (the plan's last two of B = 1), never on 0-1
    assert set(open_run(tmp_path / "tune-run").metrics()["batch_index"]) == {98, 99}
    chosen = yaml.safe_load(tuned.read_text())
    gix = chosen["methods"][0]["params"]
    assert {"tv", "tv_form", "lr", "signed_grad"} <= set(gix)
    best = trials[trials["method"].str.startswith("gi-x @")].sort_values("psnr").iloc[-1]
    assert gix["tv"] == pytest.approx(best["tv"])
    out = tmp_path / "eval"
    _gi_eval("run", str(tuned), "--executor", "inline", "--out", str(out))
    df = open_run(out).metrics()
    assert set(df["method"]) == {"gi-x", "gi-z/w"} and set(df["batch_index"]) == {0, 1}
    assert (df["param_tv"][df["method"] == "gi-x"] == gix["tv"]).all()
