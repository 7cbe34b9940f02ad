"""Issue 20 Deliver 4 through the real CLI: `gi-eval tune` tunes only on samples the evaluation
never attacks, at any batch size, and its tuned spec claims disjointness only when it holds.

Measured on 90df1cd: with batch_sizes [1, 4] and num_batches 25, tune attacked B = 1 batches
98-99 (samples the B = 4 evaluation attacks) and wrote "disjoint from the evaluation batches".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from storage.run import open_run
from tasks.spec import evaluation_samples, parse_spec

SPEC: dict[str, Any] = {
    "name": "heldout",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 25},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "methods": [{"name": "gi-x", "params": {"iterations": 2, "restarts": 1}}],
    "batch_sizes": [1, 4],
    "execution": {"executor": "inline"},
    "tuning": {"batches": 2, "trials": 1},
}


def _gi_eval(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("gi-eval")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, check=False)


def _tune(tmp_path: Path, spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return _gi_eval(
        "tune", str(path), "--executor", "inline", "--trials", "1",
        "--out", str(tmp_path / "tune-run"), "--write-spec", str(tmp_path / "tuned.yaml"),
    )  # fmt: skip


@pytest.mark.slow
def test_tune_refuses_when_every_sample_is_evaluated_at_some_batch_size(tmp_path: Path) -> None:
    # 25 batches of 4 attack all 100 faces: no B = 1 batch is held out by sample
    proc = _tune(tmp_path, SPEC)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tuning.batches" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "tune-run").exists()  # refused before any trial ran


@pytest.mark.slow
def test_tune_attacks_only_samples_the_evaluation_never_sees(tmp_path: Path) -> None:
    # shuffle seed 2, 20 batches: the old rule (last 2 batches of B = 1) tuned on samples 34 and
    # 9, both attacked by the B = 4 evaluation
    spec = {**SPEC, "data": {**SPEC["data"], "num_batches": 20, "shuffle_seed": 2}}
    proc = _tune(tmp_path, spec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tuned_on = set(open_run(tmp_path / "tune-run").metrics()["sample_index"])
    evaluated = evaluation_samples(parse_spec(spec))
    assert len(tuned_on) == 2 and not tuned_on & evaluated
    header = (tmp_path / "tuned.yaml").read_text().split("\nname:")[0]
    assert "disjoint by sample index" in header and "NOT held out" not in header
