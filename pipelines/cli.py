"""`gi-eval`: plan, run, watch, cancel and tabulate evaluation grids.

Every command validates its input completely before anything runs; a bad spec or argument
exits with code 2 and a message naming the field.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from gi_core.errors import ConfigError, GIError
from storage.errors import EnvironmentProblem

# Before prefect is imported anywhere: a fresh PREFECT_HOME needs 20-45 s for the ephemeral
# server's first start, more than Prefect's default timeout.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# No telemetry writes: offline clusters, and they contend for the ephemeral SQLite database.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
F = TypeVar("F", bound=Callable[..., Any])
GRIDS = Path(__file__).resolve().parents[1] / "grids"


# Exit codes (docs/errors.md): 2 = the input is wrong (spec, argument, checkpoint, image; nothing
# was submitted), 3 = the machine is (read-only or full disk, a run another driver holds),
# 1 = anything else, a bug included. Every path prints exactly one `error:` line; --debug adds
# the traceback.
EXIT_USER, EXIT_ENVIRONMENT, EXIT_BUG = 2, 3, 1
_DEBUG = {"on": os.environ.get("GI_EVAL_DEBUG") == "1"}


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="print the traceback of an error"),
) -> None:
    """Gradient-inversion evaluation grids (Jeon et al., NeurIPS 2021)."""
    _DEBUG["on"] = debug or os.environ.get("GI_EVAL_DEBUG") == "1"


def _errors(fn: F) -> F:
    """One `error:` line and a documented exit code for every failure (see EXIT_*)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - the CLI boundary: classify, report, exit
            code, message = classify(e)
            if _DEBUG["on"]:
                traceback.print_exception(e, file=sys.stderr)
            # further lines of a message (every bad field of a spec) are indented under it
            lines = [line.strip() for line in message.splitlines() if line.strip()] or ["?"]
            typer.echo("error: " + "\n  ".join(lines), err=True)
            raise typer.Exit(code) from e

    return wrapper  # type: ignore[return-value]


def classify(error: BaseException) -> tuple[int, str]:
    """(exit code, message) of an error reaching the CLI."""
    from storage.atomic import environment_problem

    if isinstance(error, ConfigError):
        return EXIT_USER, str(error)
    if isinstance(error, EnvironmentProblem):
        return EXIT_ENVIRONMENT, str(error)
    if isinstance(error, GIError):
        return EXIT_BUG, str(error)
    if isinstance(error, TimeoutError):  # a Prefect task timeout (execution.array_timeout_h)
        return EXIT_BUG, (
            f"a job array ran past execution.array_timeout_h ({error}); its jobs were "
            "cancelled, committed cells are kept and `gi-eval run` resumes"
        )
    if isinstance(error, OSError):
        problem = environment_problem(error, Path(str(error.filename or "the run directory")))
        if problem is not None:
            return EXIT_ENVIRONMENT, str(problem)
    return EXIT_BUG, (
        f"internal error: {type(error).__name__}: {error} (rerun with `gi-eval --debug ...` "
        "for the traceback and report it)"
    )


@app.command()
@_errors
def doctor() -> None:
    """Versions, CUDA, LPIPS/prior weights, Slurm and data sets, one line each."""
    from pipelines.doctor import doctor_lines

    typer.echo("\n".join(doctor_lines()))


@app.command()
@_errors
def methods(
    name: str | None = typer.Argument(None, help="one method, e.g. gi-x (default: all)"),
) -> None:
    """Each attack method's parameters: the paper's value, the tuned value (`preset: tuned`)
    and where the tuned one comes from."""
    from rich.console import Console

    from pipelines.methods_table import TUNING_SOURCE, method_names, method_table

    console = Console(width=max(100, Console().width))
    for method in method_names(name):
        console.print(method_table(method))
    console.print(f"tuned values: {TUNING_SOURCE}; '=' means the paper's value is kept",
                  markup=False)


@app.command()
@_errors
def plan(
    spec: Path,
    out: Path | None = typer.Option(None, help="run directory (default runs/<name>)"),
    calibrate: bool = typer.Option(
        False, help="time each method in ONE job on the target executor before estimating"
    ),
    executor: str | None = typer.Option(None, help="target executor: inline | local | slurm"),
) -> None:
    """Cells total / done / to do, gradients to generate, cost estimate, submission shape.
    The cost comes from the cost model (measured tables, this run's cells), not from attacks."""
    from pipelines.commands import check_out_dir, plan_report

    if out is not None:
        check_out_dir(out)
    typer.echo(plan_report(spec, out, calibrate=calibrate, executor=executor))


@app.command()
@_errors
def run(
    spec: Path,
    executor: str | None = typer.Option(None, help="inline | local | slurm (default: the spec's)"),
    out: Path | None = typer.Option(None, help="run directory (default runs/<name>)"),
    verbose: bool = typer.Option(False, help="show Prefect's logs"),
    wait: bool = typer.Option(False, help="queue behind another `gi-eval run` of this run dir"),
    detach: bool = typer.Option(
        False, help="submit the driver as a Slurm job and return (docs/slurm.md)"
    ),
) -> None:
    """Run (or resume) a grid: skips committed cells and cells whose jobs are still queued.
    With `tuning.stage: true` it tunes the grid first and evaluates the tuned spec."""
    from pipelines.commands import estimate_tuned_cells, run_grid, run_plan
    from pipelines.planner import build_plan
    from pipelines.tune import reuse_notes, tuning_stage

    if detach:
        from pipelines.detach import submit_driver

        typer.echo(submit_driver(spec, executor=executor, out=out))
        return

    def one_round(path: Path, run_dir: Path) -> None:
        run_grid(path, executor=executor, out=run_dir, verbose=False,
                 notify=lambda line: typer.echo(line, err=True))

    # The spec is read once into a plan that every step reads (decision 221); a tuning stage
    # evaluates another spec, the tuned one, which gets its own plan.
    grid = build_plan(spec, executor=executor, out=out)
    evaluated = tuning_stage(grid, executor=executor, run_grid=one_round)
    if evaluated != grid.spec_path:
        grid = build_plan(evaluated, executor=executor, out=out)
        if estimate_tuned_cells(grid):  # the plan's estimate named the untuned cells
            typer.echo("note: the stored estimate was re-priced for the tuned cells "
                       "(reports/plan.json)", err=True)
    for note in reuse_notes(grid.spec):  # also in every row (param_tuned_on)
        typer.echo(f"note: {note}", err=True)
    typer.echo(run_plan(grid, verbose=verbose, wait=wait,
                        notify=lambda line: typer.echo(line, err=True)))


@app.command()
@_errors
def tune(
    spec: Path,
    executor: str | None = typer.Option(None, help="inline | local | slurm (default: the spec's)"),
    out: Path | None = typer.Option(None, help="tuning run directory (default runs/<name>-tune)"),
    trials: int | None = typer.Option(None, min=1, help="trials per method (default: spec)"),
    write_spec: Path | None = typer.Option(
        None, "--write-spec", help="where to write the tuned spec (default <spec>.tuned.yaml)"
    ),
) -> None:
    """Tune every option of each method at each of its budgets on held-out samples (Optuna,
    PSNR or LPIPS criterion) and write a spec with the chosen values (docs/tuning.md)."""
    from pipelines.commands import check_out_dir, run_grid
    from pipelines.planner import read_spec, resolve_executor
    from pipelines.tune import tune as run_tuning

    resolve_executor(read_spec(spec)[0], executor)  # an unknown --executor: exit 2, named
    for path in (out, write_spec):
        if path is not None:
            check_out_dir(path, option="--out" if path is out else "--write-spec")

    def one_round(path: Path, run_dir: Path) -> None:
        run_grid(path, executor=executor, out=run_dir, verbose=False,
                 notify=lambda line: typer.echo(line, err=True))

    result = run_tuning(spec, out=out, executor=executor, trials=trials, write_spec=write_spec,
                        run_grid=one_round)
    for study, best in result.best.items():  # one study per method and budget
        typer.echo(f"{study}: held-out PSNR {best.psnr:.2f} dB, LPIPS {best.lpips:.3f} "
                   f"with {best.params}")
    typer.echo(f"report: {result.report}\ntuned spec: {result.tuned_spec}")


@app.command()
@_errors
def status(run_dir: Path) -> None:
    """Done / in flight / to do of a run directory."""
    from pipelines.commands import status_report

    typer.echo(status_report(run_dir))


@app.command()
@_errors
def verify(
    run_dir: Path,
    deep: bool = typer.Option(False, help="read every row and every zip, not only footers"),
    dry_run: bool = typer.Option(False, help="report only; move nothing"),
    recompute: int = typer.Option(
        0, "--recompute", help="recompute N committed cells (drawn with --seed) and compare "
        "them bit for bit with the stored ones; exit 1 when any differs",
    ),
    cells: str = typer.Option("", "--cells", help="with --recompute: these cell ids (a,b,...)"),
    seed: int = typer.Option(0, "--seed", help="with --recompute: which cells are drawn"),
) -> None:
    """Check a run's stored cells; move unusable ones to quarantine/ (the next run redoes them).
    With --recompute: recompute cells in a scratch area and compare them bit for bit."""
    if recompute or cells:
        from pipelines.recompute import EXIT_DIFFERENT
        from pipelines.recompute import recompute as recompute_cells

        named = [c.strip() for c in cells.split(",") if c.strip()]
        report = recompute_cells(run_dir, n=recompute, cells=named, seed=seed)
        typer.echo(report.describe())
        if not report.identical:
            raise typer.Exit(EXIT_DIFFERENT)
        return
    from pipelines.commands import verify_run

    typer.echo(verify_run(run_dir, deep=deep, dry_run=dry_run))


@app.command()
@_errors
def cancel(run_dir: Path) -> None:
    """Cancel every queued or running job of a run (committed cells stay)."""
    from pipelines.commands import cancel_run

    typer.echo(cancel_run(run_dir))


@app.command()
@_errors
def tables(
    run_dir: Path,
    include_all: bool = typer.Option(
        False, "--all", help="also tabulate committed cells the current spec no longer has"
    ),
) -> None:
    """Write the run's report (reports/table.md, figures, report.html) and print Table 1."""
    from pipelines.commands import tables_text

    typer.echo(tables_text(run_dir, include_all=include_all))


@app.command()
@_errors
def report(
    run_dir: Path,
    publish: Path | None = typer.Option(
        None, help="also write a results page (markdown + its figures) here, e.g. docs/results/x.md"
    ),
    include_all: bool = typer.Option(
        False, "--all", help="also report committed cells the current spec no longer has"
    ),
) -> None:
    """Write the run's tables, figures and self-contained report.html into RUN_DIR/reports/
    (works on a partial run: it says how many cells it covers)."""
    from pipelines.commands import report_text

    typer.echo(report_text(run_dir, publish=publish, include_all=include_all))


@app.command("convert-generator")
@_errors
def convert_generator(
    src: Path,
    out: Path,
    source_format: str = typer.Option(
        "auto", "--format", help="auto | rosinality (.pt) | ada (stylegan2-ada .pkl)"
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="allow reading a .pkl (allow-listed unpickler)"
    ),
    lr_mlp: float | None = typer.Option(None, help="mapping lr multiplier (default 0.01)"),
) -> None:
    """Convert official StyleGAN2 weights into a weights_only file + OUT.sha256
    (docs/paper-scale.md)."""
    from pipelines.convert import convert_generator as convert

    result = convert(src, out, source_format=source_format, trust_pickle=trust_pickle,
                     lr_mlp=lr_mlp)
    typer.echo(result.describe())


@app.command()
@_errors
def giml(
    spec: Path,
    executor: str | None = typer.Option(None, help="inline | local | slurm (default: the spec's)"),
    out: Path | None = typer.Option(None, help="run directory (default runs/<name>)"),
    verbose: bool = typer.Option(False, help="show Prefect's logs"),
) -> None:
    """GIML (issue 10): FL task set, meta-training, evaluation grids, Figure 6b report."""
    from pipelines.giml import run_command

    typer.echo(run_command("giml", spec, executor=executor, out=out, verbose=verbose))


@app.command()
@_errors
def pretrain(
    spec: Path,
    executor: str | None = typer.Option(None, help="inline | local | slurm (default: the spec's)"),
    out: Path | None = typer.Option(None, help="run directory (default runs/<name>)"),
    verbose: bool = typer.Option(False, help="show Prefect's logs"),
) -> None:
    """Train a generator prior with DCGAN GAN training (snapshots as gan:<run>@<step>)."""
    from pipelines.giml import run_command

    typer.echo(run_command("pretrain", spec, executor=executor, out=out, verbose=verbose))


@app.command()
@_errors
def multigrad(
    spec: Path,
    executor: str | None = typer.Option(None, help="inline | local | slurm (default: the spec's)"),
    out: Path | None = typer.Option(None, help="run directory (default runs/<name>)"),
    verbose: bool = typer.Option(False, help="show Prefect's logs"),
) -> None:
    """Appendix D (issue 10): one x against T gradients of the same batch; PSNR vs T."""
    from pipelines.multigrad import run_command

    typer.echo(run_command(spec, executor=executor, out=out, verbose=verbose))


@app.command()
@_errors
def demo(
    executor: str = typer.Option("local", help="inline | local | slurm"),
    out: Path = typer.Option(Path("runs/smoke"), help="run directory"),
) -> None:
    """The first run: the smoke grid on the local executor, its table, and where the picture is
    (reconstructions.png: the ground truth next to each method, PSNR under every image)."""
    from pipelines.commands import run_grid

    typer.echo(run_grid(GRIDS / "smoke.yaml", executor=executor, out=out, verbose=False))
    from storage.layout import RunLayout

    picture = RunLayout(out).report_file("reconstructions.png").resolve()
    if picture.is_file():  # absent only when no cell committed
        typer.echo(f"picture: {picture}  (ground truth next to each method; open it in any viewer)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
