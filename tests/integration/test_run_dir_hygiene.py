"""Issues 18 (Deliver 6) and 20 (Deliver 6): a run directory counts each committed cell once,
whatever files appear beside it, and no damaged file makes `status`, `run` or `cancel` crash.

Every command goes through the real `gi-eval` app on a real run directory made once by an
inline `gi-eval run` of a 4-cell grid (2 methods x 2 batches of B=1); each test works on its own
copy. `run` goes through the console script in a subprocess, exactly as a user runs it (an
in-process run would leave Prefect's console log handler on this process's closed test
streams); the quick commands (status, verify, cancel, tables, report) run in-process.
Each case failed on 90df1cd:
  * a sync tool's `part-<id> (1).parquet` gave metrics() 5 rows for 4 images, and `verify`
    quarantined it as "committed, but its reconstruction group is missing", announcing a
    recompute of a cell that does not exist;
  * failure records of a gradient stored later kept counting ("... 1 failed" in the report);
  * a truncated gradient was not found before submission (its cells failed 3 times with
    AttributeError: 'ZipStore' object has no attribute '_zf');
  * one damaged job record, failure record or manifest made status/run/cancel exit 1
    ("internal error").
The detached driver's record, `gi-eval plan`'s stored estimate and the learned costs joined the
kinds with issue 18 Deliver 5 (before, `verify` did not report a damaged one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

import pipelines.detach  # noqa: F401  (see below: Prefect's logging set up outside CliRunner)
import storage
from pipelines.cli import app
from storage import records
from storage.checkpoints import save_checkpoint
from storage.errors import StorageError
from storage.layout import QUARANTINE_DIR
from storage.tables import curve_path, record_failure
from tasks.cells import expand
from tasks.jobs import request_cancel
from tasks.preflight import prepare_resume
from tasks.spec import parse_spec

# `status` and `cancel` import pipelines.detach, which imports Prefect, whose logging setup puts
# a console handler bound to the sys.stderr of that moment on the root logger. Imported first
# inside a CliRunner call, that stream is closed afterwards and every later warning (a damaged
# record's) printed "--- Logging error ---" with a traceback into the next command's stderr:
# the case that ran first decided which later ones failed. Imported here, at collection.
SPEC: dict[str, Any] = {
    "name": "hygiene",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 2},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "methods": [{"name": "gi-x", "params": {"iterations": 4, "restarts": 1}},
                {"name": "gi-x+bn", "params": {"iterations": 4, "restarts": 1}}],
    "batch_sizes": [1],
    "execution": {"executor": "inline"},
}
CELLS = {(c.method, c.gradient.batch_index): c for c in expand(parse_spec(SPEC)).inversion_cells}
X0, X1 = CELLS["gi-x", 0].id, CELLS["gi-x", 1].id  # gi-x: the partition that gets compacted
B0, B1 = CELLS["gi-x+bn", 0].id, CELLS["gi-x+bn", 1].id  # B1: the cell left to do
RUN_TIMEOUT_S = 600
GRAD0, GRAD1 = CELLS["gi-x", 0].gradient_id, CELLS["gi-x", 1].gradient_id


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def gi_eval_run(spec: Path, out: Path) -> tuple[int, str, str]:
    script = Path(sys.executable).with_name("gi-eval")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "run", str(spec), "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=RUN_TIMEOUT_S, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def assert_clean_exit(code: int, stderr: str, *, allowed: tuple[int, ...] = (0,)) -> None:
    """Exit 0, or an allowed clear exit with exactly one `error:` line and no traceback."""
    assert code in allowed, (code, stderr)
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    if code != 0:
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, stderr


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run of SPEC (every cell committed), made once by `gi-eval run`."""
    root = tmp_path_factory.mktemp("hygiene")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    code, out, err = gi_eval_run(spec, root / "run")
    assert code == 0, out + err
    return root / "run"


def copy_run(base: Path, tmp_path: Path, *, todo: bool = False) -> storage.RunDir:
    """A copy of the base run; `todo`: B1 un-committed (part, group and curve removed)."""
    shutil.copytree(base, tmp_path / "run")
    shutil.copy(base.parent / "spec.yaml", tmp_path / "spec.yaml")
    run = storage.open_run(tmp_path / "run")
    if todo:
        for path in (run.part_path("gi-x+bn", B1), run.reconstruction_path(B1),
                     curve_path(run, B1)):
            path.unlink()
    return run


def quarantined(run: storage.RunDir) -> list[str]:
    """Paths (relative to the run) of the files in quarantine/<time>-<pid>/ folders."""
    folder = run.root / QUARANTINE_DIR
    files = [p.relative_to(folder) for p in folder.rglob("*") if p.is_file()] \
        if folder.is_dir() else []
    return sorted(str(Path(*p.parts[1:])) for p in files)


# ---- stray copies and stale failure records (issue 20) ----------------------------------------


def test_a_sync_tools_copy_is_never_counted_and_is_quarantined_as_stray(
    base: Path, tmp_path: Path
) -> None:
    run = copy_run(base, tmp_path)
    part, group, grad = run.part_path("gi-x", X0), run.reconstruction_path(X0), \
        run.gradient_path(GRAD0)
    sources = {part.with_name(f"part-{X0} (1).parquet"): part,
               part.with_name(f"part-{X0}.sync-conflict-20260101-000000-ABC.parquet"): part,
               group.with_name(f"{X0} (1).zarr.zip"): group,
               grad.with_name(f"{GRAD0} (1).zarr.zip"): grad,
               curve_path(run, X0).with_name(f"part-{X0} (1).parquet"): curve_path(run, X0)}
    copies = list(sources)
    for copy, source in sources.items():
        shutil.copy(source, copy)

    assert len(run.metrics()) == 4 and run.committed_cells() == {X0, X1, B0, B1}  # 90df1cd: 5
    assert run.stored_gradients() == {GRAD0, GRAD1}
    code, out, err = cli("tables", str(run.root))
    assert_clean_exit(code, err)
    assert "| 2 |" in out  # each method's row counts 2 images, not 3

    code, out, err = cli("verify", str(run.root))
    assert_clean_exit(code, err)
    for copy in copies:
        assert f"{copy}: stray file" in out, out
    assert "nothing to recompute" in out and "missing" not in out
    assert not any(c.exists() for c in copies)
    assert len(quarantined(run)) == len(copies) + 1  # + reasons.json
    assert run.committed_cells() == {X0, X1, B0, B1} and len(run.metrics()) == 4


def test_failure_records_of_cells_stored_later_stop_counting(base: Path, tmp_path: Path) -> None:
    run = copy_run(base, tmp_path, todo=True)
    # What a failed attempt leaves: a record per cell, kept when a later attempt succeeds.
    for cell in (X0, GRAD0, B1):
        record_failure(run, cell, method="gi-x", reason="OSError: [Errno 28] No space left")
    code, out, err = cli("report", str(run.root))
    assert_clean_exit(code, err)
    assert "3 of 4 cells committed (3 ok, 0 diverged); 1 failed" in out  # 90df1cd: 2 failed
    cells = run.cells()
    assert list(cells.loc[cells["status"] == "failed", "cell_id"]) == [B1]


# ---- damaged gradients (issue 20) ---------------------------------------------------------------


def test_a_damaged_gradients_error_names_its_file(base: Path, tmp_path: Path) -> None:
    run = copy_run(base, tmp_path)
    path = run.gradient_path(GRAD1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StorageError, match=str(path)):  # 90df1cd: AttributeError '_zf'
        storage.read_gradient(path)
    path.unlink()
    path.mkdir()  # a directory where a zip group belongs (an unpacked copy)
    with pytest.raises(StorageError, match="a directory"):
        storage.read_gradient(path)


def test_a_gradient_damaged_mid_file_is_quarantined_before_submission(
    base: Path, tmp_path: Path
) -> None:
    run = copy_run(base, tmp_path, todo=True)
    path = run.gradient_path(GRAD1)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:  # overwrite the first bytes of the gradient's chunk
        info = next(i for i in z.infolist() if i.filename.startswith("gradient/c"))
    start = info.header_offset + 30 + len(info.filename.encode()) + 4
    data[start:start + 16] = bytes(range(16))
    path.write_bytes(bytes(data))
    lines = prepare_resume(run)  # what `gi-eval run` does before it plans and submits
    text = "\n".join(lines)
    assert f"{path}: gradient group fails its CRC check" in text, text
    assert "1 gradient(s) to regenerate" in text
    assert GRAD1 not in run.stored_gradients() and GRAD0 in run.stored_gradients()


# ---- every kind of file damaged in turn (issue 18) ----------------------------------------------


def _job_record(run: storage.RunDir) -> Path:
    path = run.jobs_dir / "20260101T000000-inversions-0-1.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"kind": "local", "job_id": "999999", "cells": [B1],
                                 "process": None}]))
    return path


def _cancel_marker(run: storage.RunDir) -> Path:
    request_cancel(run)  # older than the `gi-eval run` below: it does not stop that run
    return run.cancel_marker


def _driver_lock(run: storage.RunDir) -> Path:
    path = run.root / "driver.lock"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "process": None, "since": "x"}))
    return path


def _failure_record(run: storage.RunDir) -> Path:
    record_failure(run, B1, method="gi-x+bn", reason="RuntimeError: boom")
    return run.root / "failures" / f"{B1}.json"


def _manifest(run: storage.RunDir) -> Path:
    run.compact(min_parts=2)  # both partitions: X0+X1 and B0 alone (min_parts) -> gi-x only
    return next((run.metrics_dir / "method=gi-x").glob("_compact-*.json"))


def _driver_record(run: storage.RunDir) -> Path:
    """A detached driver's record (pipelines.detach) naming a job id no cluster has."""
    path = run.root / records.DRIVER_FILE
    path.write_text(json.dumps({"job_id": "999999999", "submitted": 1.0e9, "log": "x.out"}))
    return path


def _stored_estimate(run: storage.RunDir) -> Path:
    """`gi-eval plan`'s reports/plan.json, with the per-cell estimate the report compares."""
    path = run.reports_dir / records.PLAN_FILE
    path.write_text(json.dumps({"executor": "inline", "wall_seconds": 1.0, "cells_to_do": 1,
                                "parallel_jobs": 1, "cell_seconds": {B1: 1.0}}))
    return path


def _learned_costs(run: storage.RunDir) -> Path:
    """reports/learned-costs.json: the base run's report learned it from the run's cells."""
    path = run.reports_dir / records.LEARNED_COSTS_FILE
    assert records.json_problem(path, records.is_learned_costs) is None and path.is_file()
    return path


def _checkpoint(run: storage.RunDir) -> Path:
    path = run.checkpoint_path(B1)
    save_checkpoint(path, {"iteration": 1, "vars": {"x": torch.zeros(1, 3, 32, 32)}})
    return path


KINDS: dict[str, Callable[[storage.RunDir], Path]] = {
    "frozen spec": lambda run: run.grid_path,
    "job record": _job_record,
    "cancel marker": _cancel_marker,
    "driver lock": _driver_lock,
    "failure record": _failure_record,
    "compaction manifest": _manifest,
    "metrics part": lambda run: run.part_path("gi-x+bn", B0),
    "checkpoint": _checkpoint,
    "loss curve": lambda run: curve_path(run, B0),
    "reconstruction group": lambda run: run.reconstruction_path(X0),
    "gradient group": lambda run: run.gradient_path(GRAD1),
    "detached driver record": _driver_record,
    "stored estimate": _stored_estimate,
    "learned costs": _learned_costs,
}
_NOT_MOVED = {"frozen spec", "driver lock"}  # rebuilt by the next `gi-eval run`, not moved
_REBUILT = {"compaction manifest", "cancel marker"}  # rewritten in place from what is known


def _wrong_shape(path: Path) -> bytes:
    """A well-formed file of the wrong kind for `path`."""
    if path.suffix == ".json" or path.name == "CANCEL":
        return json.dumps({"surprise": [1, 2]}).encode()
    if path.name == "driver.lock":
        return json.dumps({"pid": "not a number"}).encode()
    if path.suffix == ".yaml":
        return b"- a list\n- not a grid\n"
    if path.suffix == ".parquet":
        pq.write_table(pa.table({"other": [1, 2]}), path)
        return path.read_bytes()
    if path.suffix == ".pt":
        torch.save([1, 2, 3], path)
        return path.read_bytes()
    with zipfile.ZipFile(path, "w") as z:  # a zip, but no Zarr group
        z.writestr("readme.txt", "hello")
    return path.read_bytes()


def corrupt(path: Path, mode: str) -> None:
    data = path.read_bytes()
    if mode == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif mode == "garbage":
        path.write_bytes(np.random.default_rng(1).bytes(max(len(data), 16)))
    else:
        path.write_bytes(_wrong_shape(path))


def prepare_all(run: storage.RunDir) -> dict[str, Path]:
    """Every kind of file, in the order that leaves each in place."""
    return {kind: make(run) for kind, make in KINDS.items()}


MODES = ("truncate", "garbage", "wrong shape")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_status_verify_and_cancel_survive_one_damaged_file(
    base: Path, tmp_path: Path, kind: str, mode: str
) -> None:
    run = copy_run(base, tmp_path, todo=True)
    paths = prepare_all(run)
    path = paths[kind]
    if kind != "detached driver record":
        # a healthy driver record makes `cancel` ask squeue about its job: where Slurm's
        # clients are installed without a controller that is exit 1 ("squeue failed") by design
        paths["detached driver record"].unlink()
    corrupt(path, mode)

    code, out, err = cli("status", str(run.root))
    # a damaged frozen spec: exit 2 naming grid.yaml and how to rebuild it; anything else: 0
    assert_clean_exit(code, err, allowed=(2,) if kind == "frozen spec" else (0,))
    if kind == "frozen spec":
        assert str(run.grid_path) in err and "rebuilds it" in err
    code, out, err = cli("verify", str(run.root))
    assert_clean_exit(code, err)
    if kind not in _NOT_MOVED:
        assert str(path) in out, out
        assert str(path.relative_to(run.root)) in quarantined(run)
        assert path.exists() == (kind in _REBUILT)
    code, _, err = cli("cancel", str(run.root))
    assert_clean_exit(code, err)
    code, _, err = cli("status", str(run.root))
    assert_clean_exit(code, err, allowed=(2,) if kind == "frozen spec" else (0,))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_run_quarantines_every_damaged_file_and_completes(
    base: Path, tmp_path: Path, mode: str
) -> None:
    run = copy_run(base, tmp_path, todo=True)
    paths = prepare_all(run)
    for path in paths.values():
        corrupt(path, mode)

    code, out, err = gi_eval_run(tmp_path / "spec.yaml", run.root)
    assert_clean_exit(code, err)
    moved = quarantined(run)
    for kind, path in paths.items():
        if kind != "driver lock":  # rewritten by this very driver
            assert str(path.relative_to(run.root)) in moved, (kind, moved)
    assert f"{run.gradient_path(GRAD1)}: gradient group" in err  # found before submission
    assert run.committed_cells() == {X0, X1, B0, B1}
    df = run.metrics()
    assert len(df) == 4 and df["cell_id"].is_unique
    assert storage.open_run(run.root).spec_text()  # grid.yaml rebuilt from the spec
    for command in ("status", "cancel"):
        code, _, err = cli(command, str(run.root))
        assert_clean_exit(code, err)
