"""`gi-eval tune` through the real CLI. Issue 20 Deliver 4: it tunes only on samples the
evaluation never attacks, at any batch size, and its tuned spec claims disjointness only when it
holds. Issue 16 Deliver 4: every method and budget is tuned alike and the rows say where.

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

from pipelines.report import tuned_from
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


SYMMETRIC: dict[str, Any] = {
    "name": "symmetric",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 1},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "generator": {"kind": "dcgan32"},
    "methods": [
        {"name": "gi-x", "params": {"iterations": 2, "restarts": 1}},
        {"name": "gi-x", "params": {"iterations": 4, "restarts": 1}},
        {"name": "gi-z/w", "params": {"z_iterations": 2, "w_iterations": 2, "restarts": 1}},
    ],
    "batch_sizes": [1],
    "execution": {"executor": "inline"},
    "tuning": {"batches": 1, "trials": 1},
}


@pytest.mark.slow
def test_every_method_and_budget_is_tuned_alike_and_the_values_are_marked(tmp_path: Path) -> None:
    import json

    import pandas as pd

    proc = _tune(tmp_path, SYMMETRIC)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = tmp_path / "tune-run" / "reports"
    trials = pd.read_csv(reports / "tuning.csv")
    # one study per method AND budget, the same number of trials each, PSNR and LPIPS of all
    assert trials.groupby("method").size().to_dict() == {
        "gi-x @ iterations=2, restarts=1": 1,
        "gi-x @ iterations=4, restarts=1": 1,
        "gi-z/w @ z_iterations=2, w_iterations=2, restarts=1": 1,
    }
    assert trials["psnr"].notna().all() and trials["lpips"].notna().all()
    # signed Adam and TV form are searched for every method; the stage split for GIAS
    assert trials["signed_grad"].notna().all() and trials["tv_form"].notna().all()
    recipe = trials[trials["trial"] == 0].set_index("method")
    gix, gias = recipe.loc["gi-x @ iterations=2, restarts=1"], recipe.iloc[-1]
    assert bool(gix["signed_grad"]) and gix["tv"] == 0.2  # the peers' default recipe
    assert not bool(gias["signed_grad"]) and gias["z_lr"] == 0.03 and gias["z_fraction"] == 0.5
    text = (reports / "tuning.md").read_text()
    assert "Optimised: mean PSNR" in text and ("flat for" in text or "still improving" in text)
    assert (reports / "tuning.png").stat().st_size > 1000
    # the tuned spec runs, and its rows say the values were tuned for this very grid
    out = tmp_path / "eval"
    run = _gi_eval("run", str(tmp_path / "tuned.yaml"), "--executor", "inline", "--out", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    rows = open_run(out).metrics()
    origins = [json.loads(v) for v in rows["param_tuned_on"]]
    assert all(o["differs"] == [] and o["grid"] == "symmetric" for o in origins)
    assert {o["budget"]["restarts"] for o in origins} == {1} and len(rows) == 3


@pytest.mark.slow
def test_a_grid_can_tune_itself_as_a_cached_stage_of_its_run(tmp_path: Path) -> None:
    import json

    spec = {
        **SPEC,
        "name": "staged",
        "data": {**SPEC["data"], "num_batches": 1},
        "batch_sizes": [1],
        "tuning": {"batches": 1, "trials": 1, "stage": True},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "run"
    first = _gi_eval("run", str(path), "--out", str(out))
    assert first.returncode == 0, first.stdout + first.stderr
    tuning = open_run(tmp_path / "run-tune").metrics()
    rows = open_run(out).metrics()
    assert len(tuning) == 1 and set(rows["batch_index"]) == {0}
    assert set(tuning["sample_index"]).isdisjoint(rows["sample_index"])
    assert [json.loads(v)["differs"] for v in rows["param_tuned_on"]] == [[]]
    # a rerun re-asks the same trial, finds its cell committed and adds nothing
    again = _gi_eval("run", str(path), "--out", str(out))
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(open_run(tmp_path / "run-tune").metrics()) == 1
    assert open_run(out).metrics()["cell_id"].tolist() == rows["cell_id"].tolist()


@pytest.mark.slow
def test_a_matched_budget_grid_is_tuned_at_its_matched_budget(tmp_path: Path) -> None:
    """At `budgets.match` the trial cells run the matched iterations, not the entry's: their
    scores must still be found (found broken: every trial 'failed', tune exited 2)."""
    spec = {
        **SPEC,
        "name": "matched",
        "data": {**SPEC["data"], "num_batches": 1},
        "batch_sizes": [1],
        "budgets": {"match": "grad_evals", "value": 3},
        "tuning": {"batches": 1, "trials": 1},
    }
    result = _tune(tmp_path, spec)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = open_run(tmp_path / "tune-run").metrics()
    assert rows["budget_grad_evals"].tolist() == [3]  # 2 iterations in the entry, 3 matched
    tuned_text = (tmp_path / "tuned.yaml").read_text()
    tuned = yaml.safe_load(tuned_text)
    assert tuned_from(tuned_text) is not None  # the page of its evaluation is stamped with it
    assert "tv" in tuned["methods"][0]["params"]
    report = (tmp_path / "tune-run" / "reports" / "tuning.md").read_text()
    assert "| gi-x @ grad_evals=3 (matched) |" in report  # the budget it was tuned at
