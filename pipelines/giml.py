"""Prefect flows of GIML (docs/giml.md): they read like the protocol and only compose tasks.

giml:      FL task set -> [wrong-prior pretraining] + meta-training (long jobs, resumable)
           -> one ordinary evaluation grid per generator -> Figure 6b table/plot, App. G
pretrain:  GAN training of one prior -> snapshots, loss plot, sample grids
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines.flows import evaluation_grid, executor_config
from pipelines.giml_report import write_giml_report
from pipelines.planner import resolve_executor
from storage.atomic import write_bytes_atomic
from storage.generator_snapshots import snapshot_steps
from storage.run import RunDir, create_run, open_run
from tasks.arrays import POLL_S, retry_on_missing, submit_and_wait
from tasks.errors import ExecutionError
from tasks.executors import (
    ExecutorConfig,
    Resumable,
    threads_per_job,
)
from tasks.giml import (
    TrainJob,
    done_path,
    eval_grid,
    generate_task_set,
    pretrain_spec_text,
    run_training,
    state_path,
)
from tasks.giml_spec import GIMLSpec, PretrainSpec, load_yaml_spec
from tasks.jobs import active_records
from tasks.spec import ExecutorKind, MethodSpec

DEFAULT_RUNS = Path("runs")


@task(name="giml-task-set", cache_policy=NO_CACHE)
def task_set(run_dir: str) -> int:
    """Simulate the FL rounds and store every client report as an inversion task."""
    run = open_run(run_dir)
    return generate_task_set(run, GIMLSpec.model_validate(_spec_data(run)))


@task(
    name="training-jobs",
    retries=2,
    retry_delay_seconds=5,
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_on_missing,
)
def train(root: str, jobs: list[tuple[str, str]], executor: ExecutorConfig) -> int:
    """Run the long training jobs (run dir, kind) as one job array; a retry (or a rerun)
    resumes each from its last checkpoint. Jobs of an earlier, killed driver are waited for,
    never duplicated."""
    run = open_run(root)
    while active_records(run):
        time.sleep(POLL_S)
    todo = [
        TrainJob(d, k, threads_per_job(executor))
        for d, k in jobs
        if not done_path(RunDir(Path(d)), k).is_file()
    ]
    if not todo:
        return 0
    submit_and_wait(
        run,
        Resumable(run_training),
        todo,
        executor=executor,
        name="training",
        cell_ids=[[f"{j.kind}-training"] for j in todo],
        what=f"{len(todo)} training job(s)",
    )
    left = [j for j in todo if not done_path(RunDir(Path(j.run_dir)), j.kind).is_file()]
    if left:
        raise ExecutionError(
            f"training job(s) {', '.join(j.kind for j in left)} ended unfinished (see "
            f"{run.logs_dir}); a retry or rerun resumes from "
            f"{', '.join(str(state_path(RunDir(Path(j.run_dir)), j.kind)) for j in left)}"
        )
    return len(todo)


@task(name="giml-report", cache_policy=NO_CACHE)
def report(run_dir: str, labels: dict[str, str]) -> str:
    return str(write_giml_report(open_run(run_dir), labels))


@flow(name="giml", log_prints=False)
def giml(spec_path: str, executor: ExecutorKind | None = None, out: str | None = None) -> str:
    """task set -> (wrong prior +) meta-training -> evaluation grids -> report."""
    spec, text = load_yaml_spec(spec_path, GIMLSpec)
    config = executor_config(spec, executor, "giml")
    run = create_run(Path(out) if out else DEFAULT_RUNS / spec.name, text)
    task_set(str(run.root))
    jobs = [(str(run.root), "giml")]
    if spec.prior is not None:
        prior = create_run(
            run.prior_root, pretrain_spec_text(f"{spec.name}-prior", spec.prior, spec)
        )
        jobs.insert(0, (str(prior.root), "prior"))
    train(str(run.root), jobs, config)
    if spec.evaluation is None:
        return str(run.root)
    labels = {}
    for label, grid_path in write_eval_grids(run, spec).items():
        labels[label] = evaluation_grid(str(grid_path), executor, str(eval_dir(run, label)))
    return report(str(run.root), {k: str(eval_dir(run, k)) for k in labels})


@flow(name="pretrain-prior", log_prints=False)
def pretrain(spec_path: str, executor: ExecutorKind | None = None, out: str | None = None) -> str:
    """GAN training of one prior: snapshots (gan:<run>@<step>), sample grids, loss plot."""
    spec, text = load_yaml_spec(spec_path, PretrainSpec)
    run = create_run(Path(out) if out else DEFAULT_RUNS / spec.name, text)
    train(str(run.root), [(str(run.root), "prior")], executor_config(spec, executor, "giml"))
    return str(run.root)


def eval_dir(run: RunDir, label: str) -> Path:
    return run.eval_root(label)


def write_eval_grids(run: RunDir, spec: GIMLSpec) -> dict[str, Path]:
    """One grid spec per generator under <run>/eval/<label>.yaml: every evaluated GIML
    snapshot (giml:<run>@<step>), the wrong prior (gan:<run>/prior@<last>), and an untrained
    generator of the same architecture for the untrained methods (GI-w)."""
    import yaml

    assert spec.evaluation is not None
    ev, root, prior = spec.evaluation, run.root.resolve(), run.prior_root.resolve()
    steps = ev.steps or tuple(snapshot_steps(run.root))
    entries: list[tuple[str, dict[str, Any] | None, tuple[MethodSpec, ...]]] = [
        (
            f"giml-{s:05d}",
            {"kind": spec.giml.generator, "checkpoint": f"giml:{root}@{s}"},
            ev.methods,
        )
        for s in steps
    ]
    if spec.prior is not None:
        last = spec.prior.snapshot_steps()[-1]
        entries.append(
            (
                "wrong-prior",
                {"kind": spec.prior.generator, "checkpoint": f"gan:{prior}@{last}"},
                ev.methods,
            )
        )
    entries.append(("untrained", {"kind": spec.giml.generator}, ev.untrained_methods))
    paths = {}
    for label, generator, methods in entries:
        grid = eval_grid(spec, label=label, generator=generator, methods=methods)
        path = run.eval_spec(label)
        text = yaml.safe_dump(grid, sort_keys=False).encode()
        if not path.is_file() or path.read_bytes() != text:
            write_bytes_atomic(path, text)
        paths[label] = path
    return paths


def _spec_data(run: RunDir) -> Any:
    import yaml

    return yaml.safe_load(run.spec_text())


def run_command(
    kind: str, spec_path: Path, *, executor: str | None, out: Path | None, verbose: bool
) -> str:
    """`gi-eval giml` / `gi-eval pretrain`: validate everything (exit 2 on a bad spec) before
    Prefect starts or a job is submitted, then run the flow; returns what to look at."""
    from pipelines.commands import prefect_logs, to_stderr
    from tasks.giml import client_indices

    model = GIMLSpec if kind == "giml" else PretrainSpec
    spec, _ = load_yaml_spec(spec_path, model)
    kind_of_executor = resolve_executor(spec, executor)  # exit 2 on an unknown one, here
    executor_config(spec, kind_of_executor)
    if isinstance(spec, GIMLSpec):
        client_indices(spec)  # data set sizes and the held-out split
    target = str(out) if out else None
    with prefect_logs(to_stderr, verbose=verbose):  # the flow's lines at INFO, one-liners here
        if kind == "giml":
            return f"report: {giml(str(spec_path), kind_of_executor, target)}"
        root = pretrain(str(spec_path), kind_of_executor, target)
    return f"snapshots: {root}/snapshots (use gan:{root}@<step> as a generator checkpoint)"
