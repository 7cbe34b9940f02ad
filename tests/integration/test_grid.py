"""`gi-eval run` end to end on a tiny grid: inline, local and a real Slurm cluster.

Every run goes through the console script in a subprocess, exactly as a user runs it. Runs are
module-scoped fixtures shared between tests, so the order of the tests matters only in that
the rerun/delete tests come after the comparisons (they leave results unchanged anyway).

Subprocesses run with OMP_NUM_THREADS=1: on a small shared machine two torch threads per job
contending with other processes make the attack loop 10-25x slower (OpenMP barriers spin).

What this covers (see also test_executors.py for the executor adapter alone):
  a. inline and local: every cell commits, rows = cells x B, a table, identical PSNR per cell
  b. Slurm: the same through job arrays (ids 123_0), identical PSNR to inline
  c. a rerun submits nothing and rewrites no commit marker
  d. a deleted commit marker reruns exactly that cell
  e. USR2 (`scancel --signal=USR2`) mid-cell: checkpoint, requeue, resume, same result
  f. bad specs / arguments: exit code 2 naming the field, before any job or sbatch
  +  grids/*.yaml: the CPU grids plan cleanly, the paper-scale ones fail only on their data path
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from gi_core.errors import ConfigError
from storage.run import RunDir, open_run
from tasks.cells import expand
from tasks.spec import load_spec, parse_spec

if TYPE_CHECKING:
    from tests.integration.conftest import SlurmCluster

ROOT = Path(__file__).resolve().parents[2]
GRIDS = ROOT / "grids"
RUN_TIMEOUT_S = 300

# 2 methods x 2 defenses x 1 batch of B=2 = 4 inversion cells on 2 gradients; cells_per_job 2
# gives 1 gradient job (a plain Slurm id) and a 2-element inversion array (ids 123_0, 123_1).
TINY: dict[str, Any] = {
    "name": "tiny",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 1},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "generator": {"kind": "dcgan32"},
    "methods": [
        {"name": "gi-x", "params": {"iterations": 6, "restarts": 1}},
        {"name": "gi-z/w", "params": {"z_iterations": 3, "w_iterations": 3, "restarts": 1}},
    ],
    "defenses": [{"kind": "none"}, {"kind": "sparsity", "p": 0.9}],
    "batch_sizes": [2],
    "seeds": [0],
    "execution": {
        "executor": "local",
        "cells_per_job": 2,
        "max_parallel": 2,
        "slurm": {"cpus_per_task": 1, "gpus_per_task": 0, "mem_gb": 2, "timeout_min": 20,
                  "array_parallelism": 4},
    },
}

# One gi-x cell long enough to be caught mid-run (~1000 iterations: 10-30 s in a job here).
LONG: dict[str, Any] = {
    "name": "usr2",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 1},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "methods": [{"name": "gi-x", "params": {"iterations": 1000, "restarts": 1}}],
    "batch_sizes": [1],
    "execution": {
        "executor": "slurm",
        "cells_per_job": 1,
        # timeout_min > 10: the USR2 counts as a preemption, not a timeout (docs/slurm.md)
        "slurm": {"cpus_per_task": 1, "gpus_per_task": 0, "mem_gb": 2, "timeout_min": 20},
    },
}


def _gi_eval() -> list[str]:
    script = Path(sys.executable).with_name("gi-eval")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, **extra)
    return env


def _write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@dataclass(frozen=True)
class Run:
    spec: Path
    out: Path
    executor: str
    wall_s: float
    env: dict[str, str]

    @property
    def run(self) -> RunDir:
        return open_run(self.out)


def _run(spec: Path, out: Path, executor: str,
         env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [*_gi_eval(), "run", str(spec), "--executor", executor, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, f"gi-eval run ({executor}) failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _start(spec: Path, out: Path, executor: str, env: dict[str, str]) -> Run:
    t0 = time.perf_counter()
    _run(spec, out, executor, env)
    return Run(spec, out, executor, time.perf_counter() - t0, env)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_spec(tmp_path_factory.mktemp("spec") / "tiny.yaml", TINY)


@pytest.fixture(scope="module")
def sbatch_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `sbatch` shim first on PATH that logs every call, then runs the real sbatch."""
    shim_dir = tmp_path_factory.mktemp("shim")
    log = shim_dir / "sbatch.calls"
    log.touch()
    real = shutil.which("sbatch")
    tail = f'exec {real} "$@"' if real else "exit 1"
    shim = shim_dir / "sbatch"
    shim.write_text(f'#!/bin/sh\necho "$@" >> {log}\n{tail}\n')
    shim.chmod(0o755)
    return log


def _shim_env(sbatch_log: Path) -> dict[str, str]:
    return _env(PATH=f"{sbatch_log.parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _sbatch_calls(sbatch_log: Path) -> int:
    return len(sbatch_log.read_text().splitlines())


@pytest.fixture(scope="module")
def inline_run(tiny_spec: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _start(tiny_spec, tmp_path_factory.mktemp("inline") / "run", "inline", _env())


@pytest.fixture(scope="module")
def local_run(tiny_spec: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _start(tiny_spec, tmp_path_factory.mktemp("local") / "run", "local", _env())


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster: SlurmCluster, tiny_spec: Path, sbatch_log: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Run:
    before = _sbatch_calls(sbatch_log)
    result = _start(tiny_spec, tmp_path_factory.mktemp("slurm") / "run", "slurm",
                    _shim_env(sbatch_log))
    # one sbatch for the gradient array, one for the inversion array
    assert _sbatch_calls(sbatch_log) - before == 2
    return result


# --- helpers -------------------------------------------------------------------------------


def _expected_cells(spec: Path) -> set[str]:
    return {c.id for c in expand(load_spec(spec)).inversion_cells}


def _scores(run: RunDir) -> dict[tuple[str, int], tuple[float, float]]:
    df = run.metrics(columns=["cell_id", "image_index", "psnr", "final_cost"])
    return {(r.cell_id, int(r.image_index)): (float(r.psnr), float(r.final_cost))
            for r in df.itertuples()}


def _assert_complete(r: Run) -> None:
    run, cells = r.run, _expected_cells(r.spec)
    assert run.committed_cells() == cells
    df = run.metrics()
    assert len(df) == len(cells) * TINY["batch_sizes"][0]
    assert set(df["status"]) == {"ok"}
    assert (run.reports_dir / "table.md").is_file()
    assert (run.reports_dir / "reconstructions.png").stat().st_size > 1000
    assert not list((run.root / "checkpoints").glob("*.pt"))


def _marker_mtimes(run: RunDir) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in run.metrics_dir.rglob("*.parquet")}


def _job_records(run: RunDir) -> dict[str, list[dict[str, Any]]]:
    jobs = run.root / "jobs"
    return {p.name: json.loads(p.read_text()) for p in sorted(jobs.glob("*.json"))} \
        if jobs.is_dir() else {}


# --- a, b: end to end ----------------------------------------------------------------------


@pytest.mark.slow
def test_inline_and_local_commit_every_cell_with_identical_scores(inline_run: Run,
                                                                  local_run: Run) -> None:
    for r in (inline_run, local_run):
        _assert_complete(r)
    assert _job_records(inline_run.run) == {}  # inline runs submit no jobs
    local_records = [rec for recs in _job_records(local_run.run).values() for rec in recs]
    assert local_records and {rec["kind"] for rec in local_records} == {"local"}
    inline_scores = _scores(inline_run.run)
    assert len(inline_scores) == 4 * 2
    assert _scores(local_run.run) == inline_scores  # deterministic from the seeds, bit for bit


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_runs_job_arrays_with_identical_scores(slurm_run: Run, inline_run: Run) -> None:
    _assert_complete(slurm_run)
    records = _job_records(slurm_run.run)
    inversions = [rec for name, recs in records.items() if "-inversions-" in name for rec in recs]
    gradients = [rec for name, recs in records.items() if "-gradients-" in name for rec in recs]
    assert {rec["kind"] for recs in records.values() for rec in recs} == {"slurm"}
    # 4 cells / 2 per element = one array of 2 elements; 2 gradients = one plain job
    assert len(inversions) == 2
    assert all(re.fullmatch(r"\d+_\d+", rec["job_id"]) for rec in inversions), inversions
    assert len({rec["job_id"].split("_")[0] for rec in inversions}) == 1
    assert len(gradients) == 1 and re.fullmatch(r"\d+", gradients[0]["job_id"])
    assert {c for rec in inversions for c in rec["cells"]} == _expected_cells(slurm_run.spec)
    assert _scores(slurm_run.run) == _scores(inline_run.run)


# --- c, d: resume --------------------------------------------------------------------------


def _assert_rerun_does_nothing(r: Run, sbatch_log: Path | None = None) -> None:
    markers, records = _marker_mtimes(r.run), _job_records(r.run)
    grads = {p.name: p.stat().st_mtime_ns for p in (r.out / "store" / "gradients").iterdir()}
    calls = _sbatch_calls(sbatch_log) if sbatch_log else 0
    _run(r.spec, r.out, r.executor, r.env)
    assert _marker_mtimes(r.run) == markers
    assert {p.name: p.stat().st_mtime_ns
            for p in (r.out / "store" / "gradients").iterdir()} == grads
    assert _job_records(r.run) == records  # no new job record: nothing was submitted
    if sbatch_log:
        assert _sbatch_calls(sbatch_log) == calls


@pytest.mark.slow
def test_local_rerun_runs_no_cell(local_run: Run) -> None:
    _assert_rerun_does_nothing(local_run)


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_rerun_submits_nothing(slurm_run: Run, sbatch_log: Path) -> None:
    _assert_rerun_does_nothing(slurm_run, sbatch_log)


@pytest.mark.slow
def test_deleted_commit_marker_reruns_exactly_that_cell(local_run: Run) -> None:
    run = local_run.run
    df = run.metrics(columns=["cell_id", "method"]).drop_duplicates()
    victim = df.iloc[0]
    before_scores, before_records = _scores(run), _job_records(run)
    run.part_path(victim.method, victim.cell_id).unlink()
    before = _marker_mtimes(run)
    time.sleep(0.01)  # distinct mtimes even on coarse clocks

    _run(local_run.spec, local_run.out, "local", local_run.env)

    after = _marker_mtimes(run)
    new = set(after) - set(before)
    assert len(new) == 1 and victim.cell_id in next(iter(new))
    assert {k: after[k] for k in before} == before  # the other markers were not rewritten
    new_records = [rec for name, recs in _job_records(run).items() if name not in before_records
                   for rec in recs]
    assert [rec["cells"] for rec in new_records] == [[victim.cell_id]]
    assert _scores(run) == before_scores


# --- e: preemption -------------------------------------------------------------------------


def _wait_for(predicate: Any, *, timeout_s: float, what: str, poll_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _checkpoint_iteration(path: Path) -> int | None:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["iteration"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return None


@pytest.mark.slow
@pytest.mark.slurm
def test_usr2_checkpoints_requeues_and_commits_the_uninterrupted_result(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    spec = _write_spec(tmp_path / "usr2.yaml", LONG)
    out, ref_out = tmp_path / "slurm", tmp_path / "inline"
    # Periodic checkpoints every 2 s: the first one proves the attack loop is running.
    env = _env(GI_CHECKPOINT_EVERY_S="2")
    cmd = [*_gi_eval(), "run", str(spec), "--executor", "slurm", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    ref = None
    try:
        (record,) = _wait_for(lambda: [rec for name, recs in _job_records(RunDir(out)).items()
                                       if "-inversions-" in name for rec in recs],
                              timeout_s=120, what="the inversion job's record")
        job_id, (cell_id,) = record["job_id"], record["cells"]
        checkpoint = out / "checkpoints" / f"{cell_id}.pt"
        first = _wait_for(lambda: _checkpoint_iteration(checkpoint), timeout_s=120,
                          what="the cell's first periodic checkpoint")
        # No --batch: the signal must reach the srun step, i.e. the Python process.
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        log = out / "logs" / f"{job_id}_0_log.out"
        _wait_for(lambda: log.is_file() and f"Requeued job {job_id}" in log.read_text(),
                  timeout_s=60, what="submitit's requeue")
        # Saved at the next iteration boundary on the preemption request, before the requeue.
        preempted = _checkpoint_iteration(checkpoint)
        # The uninterrupted reference runs while the requeued job waits out cred_expire.
        ref = subprocess.Popen([*_gi_eval(), "run", str(spec), "--executor", "inline", "--out",
                                str(ref_out)], env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        assert proc.returncode == 0, output
        ref_output, _ = ref.communicate(timeout=RUN_TIMEOUT_S)
        assert ref.returncode == 0, ref_output
    finally:
        for p in (proc, ref):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        # A failed test must not leave its jobs in the queue.
        jobs = [rec["job_id"] for recs in _job_records(RunDir(out)).values() for rec in recs]
        if jobs:
            subprocess.run(["scancel", *jobs], check=False, capture_output=True)

    assert first is not None and preempted is not None
    assert 0 < first < preempted < 1000, (first, preempted)
    text = log.read_text()
    assert text.count("Starting with JobEnvironment") == 2  # ran, was requeued, ran again
    assert "this job is preempted" in text
    run = open_run(out)
    assert run.committed_cells() == {cell_id}
    assert not checkpoint.exists()  # deleted on commit
    assert len(_job_records(run)) == 2  # gradients + inversions: the requeue kept its job id
    df, ref_df = run.metrics(), open_run(ref_out).metrics()
    assert df["iterations"].tolist() == [1000]
    assert df["psnr"].tolist() == ref_df["psnr"].tolist()
    assert df["final_cost"].tolist() == ref_df["final_cost"].tolist()


# --- f: validation before anything runs ------------------------------------------------------


def _bad(**changes: Any) -> dict[str, Any]:
    spec = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = spec
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if leaf.isdigit():
            node[int(leaf)] = value
        else:
            node[leaf] = value
    return spec


BAD_SPECS: dict[str, tuple[dict[str, Any], list[str], str]] = {
    # case: (spec, extra CLI args, field the message must name)
    "unknown method": (_bad(methods__0__name="gi-q"), [], "methods[0].name"),
    "sparsity p >= 1": (_bad(defenses__1__p=1.2), [], "defenses[1].p"),
    "batch larger than data": (_bad(batch_sizes=[200]), [], "batch_sizes[0]"),
    "too many batches": (_bad(data__num_batches=60), [], "data.num_batches"),
    "missing generator checkpoint": (
        _bad(generator={"kind": "dcgan32", "checkpoint": "/nonexistent/G.pt"}), [],
        "generator.checkpoint"),
    "unknown executor": (TINY, ["--executor", "foo"], "executor"),
}


@pytest.mark.slow
def test_bad_specs_exit_2_naming_the_field_before_any_job(tmp_path: Path,
                                                          sbatch_log: Path) -> None:
    procs = {}
    for i, (case, (spec, args, _)) in enumerate(BAD_SPECS.items()):
        path = _write_spec(tmp_path / f"bad{i}.yaml", spec)
        out = tmp_path / f"out{i}"
        executor = args or ["--executor", "slurm"]  # slurm: a late check would call sbatch
        procs[case] = (out, subprocess.Popen(
            [*_gi_eval(), "run", str(path), *executor, "--out", str(out)],
            env=_shim_env(sbatch_log), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))  # fmt: skip
    calls = _sbatch_calls(sbatch_log)
    failures = []
    for case, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        field = BAD_SPECS[case][2]
        if proc.returncode != 2 or field not in stderr or out.exists():
            failures.append(f"{case}: rc={proc.returncode}, out exists={out.exists()}, "
                            f"expected {field!r} in stderr:\n{stderr}{stdout}")
    assert not failures, "\n".join(failures)
    assert _sbatch_calls(sbatch_log) == calls  # no sbatch happened


# --- grids/ ----------------------------------------------------------------------------------

CPU_GRIDS = [
    "smoke.yaml",
    "table1_cpu.yaml",
    "fig5_defenses_cpu.yaml",
    "gix_convergence_cpu.yaml",
    "fedavg_cpu.yaml",
]
PAPER_GRIDS = ["table1.yaml", "fig5_defenses.yaml"]


@pytest.mark.parametrize("name", CPU_GRIDS)
def test_cpu_grids_plan_cleanly(name: str, tmp_path: Path) -> None:
    from pipelines.commands import plan_report

    report = plan_report(GRIDS / name, tmp_path / "run", calibrate=False)
    cells = len(expand(load_spec(GRIDS / name)).inversion_cells)
    assert f"cells: {cells} total, 0 done" in report


@pytest.mark.parametrize("name", PAPER_GRIDS)
def test_paper_grids_fail_only_on_their_data_path(name: str) -> None:
    """Paper-scale grids point at data and weights that are not here: that, and only that, is
    refused."""
    data = yaml.safe_load((GRIDS / name).read_text())
    with pytest.raises(ConfigError) as info:
        parse_spec(data)
    problems = [p.strip() for p in str(info.value).splitlines()[1:]]
    assert problems and all(
        p.startswith(("data.dataset:", "generator.checkpoint:")) for p in problems
    ), problems
    # With a data set and a prior that are here everything else validates.
    data["data"]["dataset"] = "natural-photos"
    data["data"]["num_batches"] = 1
    arch = {"resolution": 64, "channels": [16] * 5}
    data["generator"] = {**data["generator"], "checkpoint": None, "stylegan2": arch}
    spec = parse_spec(data)
    assert spec.execution.executor == "slurm"
    assert len(expand(spec).inversion_cells) > 0
