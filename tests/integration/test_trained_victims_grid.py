"""Issue 19 Deliver 4 (decision 270): a tiny grid over victim training stages (rounds 0 and 2)
through `gi-eval run` on the inline executor: rows carry the rounds and the weights' sha256,
the trained victim is stored in the run with that hash, and a rerun that extends the grid
reuses it instead of training again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from gi_core.victims import build_victim, victim_state, weights_sha256
from storage.run import open_run

pytestmark = pytest.mark.slow

GRID: dict[str, Any] = {
    "name": "trained-tiny",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 1},
    "victim": {
        "arch": "convnet",
        "width": 4,
        "seed": 0,
        "train": {"rounds": [0, 2], "clients": 2, "batch_size": 4, "local_steps": 1,
                  "lr": 0.1, "seed": 0},
    },
    "methods": [{"name": "gi-x", "params": {"iterations": 3, "restarts": 1}}],
    "batch_sizes": [1],
    "execution": {"executor": "inline"},
}  # fmt: skip


def _gi_eval(*args: str) -> str:
    script = Path(sys.executable).with_name("gi-eval")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=600,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, f"gi-eval {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_training_stages_through_gi_eval_run(tmp_path: Path) -> None:
    spec, out = tmp_path / "grid.yaml", tmp_path / "run"
    spec.write_text(yaml.safe_dump(GRID))
    assert "2 of 2 cells committed" in _gi_eval("run", str(spec), "--out", str(out))
    df = open_run(out).metrics()
    assert sorted(df["victim_rounds"]) == [0, 2]
    by_round = df.set_index("victim_rounds")
    # round 0 is the untrained victim: its hash is that of the victim built from the spec
    untrained = build_victim("convnet", num_classes=100, image_size=32, width=4, seed=0)
    assert by_round.loc[0, "victim_sha256"] == weights_sha256(victim_state(untrained))
    assert by_round.loc[0, "victim_training"] == "none"
    # round 2: the weights stored in the run, with that hash
    files = sorted((out / "victims").glob("*/round-2.pt"))
    assert len(files) == 1 and not list((out / "victims").glob("*/round-0.*"))
    trained_sha = by_round.loc[2, "victim_sha256"]
    assert weights_sha256(torch.load(files[0], weights_only=True)) == trained_sha
    assert trained_sha != by_round.loc[0, "victim_sha256"]
    record = yaml.safe_load(files[0].with_suffix(".json").read_text())
    assert record["sha256"] == trained_sha and record["rounds"] == 2
    trained_on = {i for client in record["clients"] for i in client}
    assert trained_on.isdisjoint(set(df["sample_index"]))

    # extend the grid by a batch: its new gradient needs the trained victim again, which is
    # read from the run, not trained again
    stamp = files[0].stat().st_mtime_ns
    spec.write_text(yaml.safe_dump({**GRID, "data": {**GRID["data"], "num_batches": 2}}))
    assert "4 of 4 cells committed" in _gi_eval("run", str(spec), "--out", str(out))
    df = open_run(out).metrics()
    assert files[0].stat().st_mtime_ns == stamp
    assert set(df.loc[df.victim_rounds == 2, "victim_sha256"]) == {trained_sha}
    assert len(df) == 4 and df["batch_index"].nunique() == 2
