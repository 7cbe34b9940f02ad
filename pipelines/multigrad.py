"""Prefect flow of Appendix D (multi-gradient inversion): cells -> job array -> PSNR vs T."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines.aggregate import bootstrap_ci
from pipelines.flows import executor_config
from storage.atomic import publishing, write_bytes_atomic
from storage.run import RunDir, create_run
from tasks.arrays import retry_on_missing, submit_and_wait
from tasks.errors import ExecutionError, RunCancelled
from tasks.executors import ExecutorConfig, threads_per_job
from tasks.giml_spec import load_yaml_spec
from tasks.jobs import cancel_requested
from tasks.multigrad import MultiGradJob, MultiGradSpec, cells, result_path, run_cells

DEFAULT_RUNS = Path("runs")


@task(
    name="multigrad-cells",
    retries=1,
    retry_delay_seconds=5,
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_on_missing,
)
def run_all(run_dir: str, spec: MultiGradSpec, executor: ExecutorConfig, run_started: float) -> int:
    """One array of the cells without a result; a `gi-eval cancel` after `run_started` stops
    it for good (RunCancelled is not retried), missing cells otherwise are."""
    run = RunDir(Path(run_dir))
    todo = [c for c in cells(spec) if not result_path(run, c["id"]).is_file()]
    if todo and cancel_requested(run, since=run_started):
        raise RunCancelled(f"{run.root} was cancelled (gi-eval cancel): {len(todo)} cells not run")
    k = spec.execution.cells_per_job
    jobs = [
        MultiGradJob(run_dir, tuple(todo[i : i + k]), threads_per_job(executor))
        for i in range(0, len(todo), k)
    ]
    submit_and_wait(
        run,
        run_cells,
        jobs,
        executor=executor,
        name="multigrad",
        cell_ids=[[c["id"] for c in job.cells] for job in jobs],
        what=f"{len(todo)} multigrad cells",
    )
    missing = [c["id"] for c in todo if not result_path(run, c["id"]).is_file()]
    if missing and cancel_requested(run, since=run_started):
        raise RunCancelled(
            f"{run.root} was cancelled (gi-eval cancel): {len(missing)} cells not run"
        )
    if missing:
        raise ExecutionError(f"{len(missing)} multigrad cells missing (see {run.logs_dir})")
    return len(todo)


def results(run: RunDir, spec: MultiGradSpec) -> pd.DataFrame:
    """One row per cell: setting, T, batch, seed, mean PSNR over the batch's images."""
    rows = []
    for c in cells(spec):
        path = result_path(run, c["id"])
        if not path.is_file():  # a partial report (the flow reports only when all ran)
            continue
        body = json.loads(path.read_text())
        rows.append(
            {
                "setting": c["config"]["setting"],
                "T": c["config"]["gradients"],
                "batch_index": c["batch_index"],
                "seed": c["seed"],
                "psnr": sum(body["psnr"]) / len(body["psnr"]),
            }
        )
    return pd.DataFrame(rows)


def write_report(run: RunDir, spec: MultiGradSpec) -> Path:
    df = results(run, spec)
    lines = [
        "# Multi-gradient inversion (Appendix D, Figure A3b)",
        "",
        "| setting | T | PSNR mean | 95 % CI | batches |",
        "|---|---|---|---|---|",
    ]
    table = []
    for (setting, t), g in df.groupby(["setting", "T"]):
        low, high = bootstrap_ci(g["psnr"].to_numpy())
        table.append((setting, t, g["psnr"].mean(), low, high, len(g)))
        lines.append(
            f"| {setting} | {t} | {g['psnr'].mean():.2f} | [{low:.2f}, {high:.2f}] | {len(g)} |"
        )
    run.reports_dir.mkdir(parents=True, exist_ok=True)
    _plot(
        pd.DataFrame(table, columns=["setting", "T", "mean", "low", "high", "n"]),
        run.report_file("multigrad_psnr.png"),
    )
    lines += ["", "![PSNR vs T](multigrad_psnr.png)"]
    path = run.report_file("multigrad.md")
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())
    return path


def _plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for setting, rows in table.groupby("setting"):
        rows = rows.sort_values("T")
        ax.plot(rows["T"], rows["mean"], "o-", label=f"θ {setting}")
        ax.fill_between(rows["T"], rows["low"], rows["high"], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("T (gradients of the same batch)")
    ax.set_ylabel("PSNR (dB)")
    ax.legend()
    fig.tight_layout()
    with publishing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


@flow(name="multigrad", log_prints=False)
def multigrad(spec_path: str, executor: str | None = None, out: str | None = None) -> str:
    """cells (T x setting x batch x seed) -> one job array -> reports/multigrad.md."""
    spec, text = load_yaml_spec(spec_path, MultiGradSpec)
    run = create_run(Path(out) if out else DEFAULT_RUNS / spec.name, text)
    run_all(str(run.root), spec, executor_config(spec, executor), time.time())
    return str(write_report(run, spec))


def run_command(spec_path: Path, *, executor: str | None, out: Path | None, verbose: bool) -> str:
    """`gi-eval multigrad`: validate (exit 2 on a bad spec) before Prefect, then run the flow."""
    from pipelines.commands import prefect_logs, to_stderr

    spec, _ = load_yaml_spec(spec_path, MultiGradSpec)
    executor_config(spec, executor)
    with prefect_logs(to_stderr, verbose=verbose):  # the flow's lines at INFO, one-liners here
        return Path(multigrad(str(spec_path), executor, str(out) if out else None)).read_text()
