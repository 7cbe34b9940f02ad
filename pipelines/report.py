"""`gi-eval report RUN_DIR`: a run directory -> the paper's tables and figures + report.html.

Built only on the public storage queries (run.metrics(), run.cells(), run.curves(), the stored
groups) and the grid spec, so it works on a partial run and says how many cells it covers.

    reports/table.{md,tex,csv}     Table 1 (methods/variants as columns, CI, best bold)
    reports/paired.{md,tex,csv}    paired differences on identical gradients (CI, Wilcoxon p)
    reports/summary.csv            aggregate.summary of every metric (avg and best-in-batch)
    reports/cells.csv              run.cells()
    reports/*.png                  Figures 3, 4a, 5, image grids, reconstructions.png
    reports/report.html            all of it in one self-contained page, with provenance
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from gi_core.errors import ConfigError
from pipelines import aggregate as ag
from pipelines import report_budget as budgets
from pipelines import report_estimate, report_rgap
from pipelines import report_figures as figs
from pipelines import report_tables as tables
from pipelines.learned_costs import learn_from_run
from pipelines.report_claims import claims_markdown
from pipelines.report_html import Figure, Page, render
from storage.layout import RunLayout
from storage.metrics import provenance
from storage.run import RunDir
from tasks.cells import expand
from tasks.spec import spec_from_yaml

# Part files per method above which the report compacts them first: reading 10^4 loose parts
# takes ~8 s, one compact file 0.2 s (docs/results/storage.md). Small runs keep their per-cell
# part files (easiest to inspect; a deleted part is a cell to redo).
COMPACT_FROM_PARTS = 1000


@dataclass(frozen=True)
class Coverage:
    """How much of the grid the report covers: counts are of the CURRENT spec's cells
    (grid.yaml); committed cells of configurations no longer in it are counted apart."""

    planned: int | None  # None when the spec cannot be expanded here (e.g. missing files)
    committed: int
    ok: int
    diverged: int
    failed: int
    not_in_spec: int = 0  # committed cells whose configuration the current spec no longer has
    shown_all: bool = False  # --all: those cells are in the tables too

    @property
    def partial(self) -> bool:
        return self.planned is None or self.committed < self.planned

    def describe(self) -> str:
        of = "?" if self.planned is None else str(self.planned)
        text = (
            f"{self.committed} of {of} cells committed ({self.ok} ok, {self.diverged} diverged); "
            f"{self.failed} failed"
            + (" — partial run: statistics cover the committed cells only" if self.partial else "")
        )
        if self.not_in_spec:
            text += f"; {self.not_in_spec} committed cells not in the current spec " + (
                "(included: --all)" if self.shown_all else "(left out; --all includes them)"
            )
        return text


@dataclass(frozen=True)
class SpecScope:
    """What a report reads of the run's current spec (grid.yaml; a rerun of a changed spec
    replaces it): its cell ids (None when the spec cannot be expanded here, e.g. missing
    files) and its baseline. `gi-eval run` hands over the ones its plan holds."""

    cell_ids: frozenset[str] | None
    baseline: str | None

    @classmethod
    def of_run(cls, run: RunDir) -> SpecScope:
        try:
            spec = spec_from_yaml(run.spec_text())
        except ConfigError:
            return cls(None, None)
        try:
            return cls(frozenset(c.id for c in expand(spec).inversion_cells), spec.baseline)
        except ConfigError:
            return cls(None, spec.baseline)


def spec_cells(run: RunDir) -> frozenset[str] | None:
    """Ids of the inversion cells of the run's current spec (see SpecScope)."""
    return SpecScope.of_run(run).cell_ids


def in_scope(frame: pd.DataFrame, current: frozenset[str] | None) -> pd.Series:
    """Rows of cells in the current spec (every row when it cannot be expanded)."""
    if current is None or "cell_id" not in frame.columns:
        return pd.Series(True, index=frame.index)
    return frame["cell_id"].isin(current)


def not_in_spec_text(df: pd.DataFrame, current: frozenset[str] | None, *, shown: bool) -> str:
    """A markdown list of the committed configurations no longer in the spec, with cell counts."""
    outside = ~in_scope(df, current)
    if not outside.any():
        return ""
    # labelled among all configurations, so that the label says how they differ
    old = ag.identify(df)[outside.to_numpy()]
    labels = old.groupby(ag.COLUMN)["cell_id"].nunique().sort_index()
    what = "included in the tables above (--all)" if shown else (
        "left out of the tables; `gi-eval tables --all` / `gi-eval report --all` include them"
    )
    lines = [f"- {label}: {n} cells" for label, n in labels.items()]
    return "\n".join([f"Not in the current spec ({what}):", "", *lines, ""])


@dataclass(frozen=True)
class Report:
    html: Path
    table: Path  # table.md
    coverage: Coverage
    files: tuple[Path, ...]

    @property
    def table_markdown(self) -> str:
        return self.table.read_text()


def write_report(
    run: RunDir, *, include_all: bool = False, scope: SpecScope | None = None
) -> Report:
    """Write every table, figure and report.html of `run` into run.reports_dir: the cells of
    its current spec, plus (`include_all`) committed cells of configurations no longer in it.
    `scope`: the current spec's cells and baseline when the caller holds them (else read)."""
    run.compact(min_parts=COMPACT_FROM_PARTS)
    run.reports_dir.mkdir(parents=True, exist_ok=True)
    scope = scope or SpecScope.of_run(run)
    current = scope.cell_ids
    everything, all_cells = run.metrics(), run.cells()
    old_note = not_in_spec_text(everything, current, shown=include_all)
    coverage = _coverage(all_cells, current, include_all=include_all)
    df = everything if include_all else everything[in_scope(everything, current)]
    cells = all_cells if include_all else all_cells[in_scope(all_cells, current)]
    df = ag.identify(df)
    caption = (
        f"Grid {run.root.name}: {coverage.describe()}. Mean [95 % bootstrap CI over batches × "
        f"seeds; none below n = {ag.MIN_N}]; avg = batch mean, best = best image in the batch; "
        "bold = best, separated from the second best by their paired 95 % CI."
    )
    files: list[Path] = []
    table1 = pairs = None
    if not df.empty:
        t1 = tables.table1(df, cells)
        note = "\n".join(t for t in (budgets.budget_markdown(df), old_note) if t)
        files += tables.write_table1(t1, run, caption=caption, note=note).values()
        table1 = tables.styler(t1)
        paired, pairs = _write_comparisons(run, df, scope.baseline)
        files += paired
        summary_csv = run.report_file("summary.csv")  # avg and best, every metric
        t1.numbers.to_csv(summary_csv, index=False)
        files.append(summary_csv)
    else:
        run.report_file("table.md").write_text(
            f"{caption}\n\n(no committed cells yet)\n\n{old_note}"
        )
    cells.to_csv(run.report_file("cells.csv"), index=False)
    figures, grids = _figures(run, df) if not df.empty else ([], [])
    files += [f.path for f in [*figures, *grids]]
    learn_from_run(run)  # the cost table learns from the finished cells (learned_costs)
    provenance = _provenance(run, df, cells)
    estimated = report_estimate.write(run)
    if estimated is not None:
        files.append(run.report_file(report_estimate.FILE))
        provenance["estimate against measured"] = report_estimate.summary(estimated)
    page = Page(
        title=f"gi-eval report: {run.root.name}",
        coverage=coverage.describe(),
        partial=coverage.partial,
        table1=table1,
        paired=pairs,
        figures=figures,
        grids=grids,
        provenance=provenance,
        spec_text=run.spec_text(),
        caption=caption,
    )
    html = run.report_file("report.html")
    html.write_text(render(page))
    return Report(
        html=html, table=run.report_file("table.md"), coverage=coverage, files=(*files, html)
    )


def write_tables(run: RunDir, *, include_all: bool = False) -> Path:
    """The whole report; returns reports/table.md (what `gi-eval run` prints)."""
    return write_report(run, include_all=include_all).table


def summary(df: pd.DataFrame) -> tables.Table:
    """Table 1 of committed metrics, computed without writing anything (read-only runs)."""
    return tables.table1(df)


def markdown(table: tables.Table) -> str:
    if table.text.empty:
        return "(no committed cells yet)\n"
    return tables.to_markdown(table.text, table.bold)


def _write_comparisons(
    run: RunDir, df: pd.DataFrame, baseline: str | None
) -> tuple[list[Path], Any]:
    """paired.{md,tex,csv}, comparisons.csv and claims.md; returns the files and the styled
    table of tested comparisons (None without a baseline)."""
    tested = ag.comparisons(df, baseline) if baseline else None
    files = list(
        tables.write_paired(
            ag.paired_table(df),
            run,
            caption=(
                f"Every configuration − the baseline {baseline!r} on identical gradients and "
                "seeds: Wilcoxon signed-rank p, Holm-adjusted over this table, rank-biserial "
                "effect size"
                if baseline
                else "Paired comparisons"
            ),
            tested=tested,
        ).values()
    )
    run.report_file(CLAIMS_FILE).write_text(claims_markdown(tested, df, baseline))
    files.append(run.report_file(CLAIMS_FILE))
    return files, _paired_styler(tested) if tested is not None else None


def _paired_styler(pairs: pd.DataFrame) -> Any:
    text, bold = tables.paired_text(pairs)
    if text.empty:
        return None
    css = bold.replace({True: tables.BOLD_CSS, False: ""}).to_numpy()
    return text.style.apply(lambda _: css, axis=None).hide(axis="index")


def _coverage(
    cells: pd.DataFrame, current: frozenset[str] | None, *, include_all: bool
) -> Coverage:
    """N of M for the current spec; committed cells outside it counted apart."""
    mine = cells[in_scope(cells, current)]
    status = mine["status"] if "status" in mine.columns else pd.Series(dtype=str)
    others = cells[~in_scope(cells, current)]
    other_status = others["status"] if "status" in others.columns else pd.Series(dtype=str)
    return Coverage(
        planned=None if current is None else len(current),
        committed=int(status.isin(["ok", "diverged"]).sum()),
        ok=int((status == "ok").sum()),
        diverged=int((status == "diverged").sum()),
        failed=int((status == "failed").sum()),
        not_in_spec=int(other_status.isin(["ok", "diverged"]).sum()),
        shown_all=include_all,
    )


FigureSpec = tuple[str, str, str, Callable[[Path], Path | None]]


def _figures(run: RunDir, df: pd.DataFrame) -> tuple[list[Figure], list[Figure]]:
    r = run.reports_dir
    plots: list[FigureSpec] = [
        (
            "Figure 3: cost vs iteration",
            "fig3_curves.png",
            "chosen restart of each method on one gradient",
            lambda p: figs.fig3_curves(run, df, p),
        ),
        (
            "Figure 3: image evolution",
            "fig3_strip.png",
            "first image of that gradient at the storage.snapshots iterations",
            lambda p: figs.fig3_strip(run, df, p),
        ),
        (
            "Figure 4a: average vs best in batch",
            "fig4a.png",
            "PSNR, 95 % CI",
            lambda p: figs.fig4a(df, p),
        ),
        (
            "Quality versus budget",
            "quality_vs_budget.png",
            "mean PSNR of every configuration at its stored snapshots and at its end, against "
            "victim gradient evaluations and measured attack seconds (pipelines/report_budget.py)",
            lambda p: budgets.quality_vs_budget(run, df, p),
        ),
        *[
            (
                f"Figure 5: PSNR vs {figs.FIG5_AXES[a][0]}",
                f"fig5_{a}.png",
                "95 % CI bands",
                functools.partial(figs.fig5, df, a),
            )
            for a in figs.FIG5_AXES
        ],
        *report_rgap.figures(df),
    ]
    grid_plots: list[FigureSpec] = [
        (
            "Best batch",
            "grid_best.png",
            "ground truth vs every configuration",
            lambda p: figs.image_grid(run, df, p, worst=False),
        ),
        (
            "Worst batch",
            "grid_worst.png",
            "ground truth vs every configuration",
            lambda p: figs.image_grid(run, df, p, worst=True),
        ),
        (
            "First batch",
            "reconstructions.png",
            "every configuration and defense level",
            lambda p: figs.first_batch_grid(run, df, p),
        ),
    ]
    figures = [Figure(t, p, c) for t, n, c, fn in plots if (p := fn(r / n)) is not None]
    grids = [
        Figure(t, p, c, "image-grid") for t, n, c, fn in grid_plots if (p := fn(r / n)) is not None
    ]
    return figures, grids


def _provenance(run: RunDir, df: pd.DataFrame, cells: pd.DataFrame) -> dict[str, str]:
    """Versions and commits the cells were computed with, machines, attack time."""
    out = {"run directory": str(run.root.resolve())}
    for column, label in (
        ("git_commit", "git commit (cells)"),
        ("gi_eval_version", "gi-eval (cells)"),
        ("torch_version", "torch (cells)"),
        ("python_version", "python (cells)"),
        ("host", "hosts"),
        ("device", "devices"),
        ("device_name", "device names"),
    ):
        if column in df.columns and df[column].notna().any():
            out[label] = ", ".join(sorted(map(str, df[column].dropna().unique())))
    schedule = schedule_sentence(df)
    if schedule is not None:
        out["schedule"] = schedule
    if "wall_seconds" in cells.columns and cells["wall_seconds"].notna().any():
        out["attack time (sum over cells)"] = f"{cells['wall_seconds'].sum():.1f} s"
    span = _commit_span(run)
    if span is not None:
        out["wall time (first to last committed cell)"] = f"{span:.0f} s"
    here = provenance()
    out["report written with"] = (
        f"gi-eval {here['gi_eval_version']} (commit {here['git_commit'][:12]}), "
        f"torch {here['torch_version']}, python {here['python_version']} on {platform.node()} "
        f"({os.cpu_count()} CPUs, {platform.machine()})"
    )
    return out


def schedule_sentence(df: pd.DataFrame) -> str | None:
    """How many cells were resumed or regrouped (issue 20), from the schedule provenance
    columns; None when no row has them (a run from before they existed)."""
    if "attempts" not in df.columns or df["attempts"].isna().all():
        return None
    per_cell = df.drop_duplicates("cell_id")
    resumed = int(per_cell["resumed_from_iteration"].notna().sum())
    retried = int((per_cell["attempts"] > 1).sum())
    threads = ", ".join(str(int(t)) for t in sorted(per_cell["threads"].dropna().unique()))
    return (
        f"{resumed} of {len(per_cell)} cells resumed from a checkpoint and {retried} ran in a "
        f"later attempt, i.e. regrouped into a new job (neither changes a result: "
        f"docs/decisions/101); torch threads {threads or 'unknown'}"
    )


def _commit_span(run: RunDir) -> float | None:
    """Seconds between the first and the last curve file (each written as its cell commits)."""
    times = [p.stat().st_mtime for p in run.curves_dir.glob("part-*.parquet")]
    return max(times) - min(times) if len(times) >= 2 else None


def publish(report: Report, run: RunDir, target: Path, *, command: str) -> Path:
    """A results page for docs/: `target` (markdown) plus the report's figures copied beside it
    as <target stem>_<figure>.png. It holds the grid's header comment (how to run it and what
    it should show), `command`, coverage, Table 1, the paired comparisons, the figures and the
    provenance, so the page is regenerated by the pipeline, never edited by hand."""
    target.parent.mkdir(parents=True, exist_ok=True)
    paired_md = run.report_file("paired.md")
    paired = paired_md.read_text() if paired_md.is_file() else ""
    claims = run.report_file(CLAIMS_FILE)
    provenance = _provenance(run, run.metrics(), run.cells())
    figures = _copy_figures(report, target)  # first: it removes an earlier publish's PNGs
    estimate = run.report_file(report_estimate.FILE)
    page = [
        *_page_head(run, command),
        f"Coverage: {report.coverage.describe()}",
        "",
        "## Table 1",
        "",
        report.table_markdown,
        "## Paired comparisons",
        "",
        paired,
        claims.read_text() if claims.is_file() else "",
        *_tuning_section(run, target),
        "## Figures",
        "",
        *[f"{f}\n" for f in figures],
        estimate.read_text() if estimate.is_file() else "",
        "## Provenance",
        "",
        *[f"- {k}: {v}" for k, v in provenance.items()],
        "",
        "## Grid spec",
        "",
        "```yaml",
        _without_leading_comment(run.spec_text()).strip(),
        "```",
        "",
    ]
    target.write_text("\n".join(page))
    return target


def _page_head(run: RunDir, command: str) -> list[str]:
    """The page's stamp (grid hash and the cells' commits), title and how it was made."""
    stamp = page_stamp(run)
    header = "\n".join(line[1:].removeprefix(" ") for line in _page_comment(run, stamp))
    commits = ", ".join(c[:12] for c in stamp["cells_commits"]) or "none"
    return [
        f"{PAGE_STAMP}{json.dumps(stamp, sort_keys=True)} -->",
        f"# Results: {run.root.name}",
        "",
        "*Written by `gi-eval report --publish` from the run directory; do not edit by hand.*",
        "",
        f"Grid `{stamp['grid']}`, spec sha256 `{stamp['spec_sha256'][:16]}…`; code commit of "
        f"its cells: {commits}. "
        "tests/unit/test_results_pages.py fails when the grid file changes after this page.",
        "",
        "## How this was made",
        "",
        "```",
        header,
        "```",
        "",
        f"Report command: `{command}`",
        "",
    ]


def _page_comment(run: RunDir, stamp: dict[str, Any]) -> list[str]:
    """The header comment the page shows: the grid file's own (how to run it, what it should
    show) when the run was evaluated from a tuned spec and that file is still the one tuned
    from; the run spec's otherwise."""
    source = tuned_from(run.spec_text())
    if source and Path(source[0]).is_file():
        text = Path(source[0]).read_text()
        if hashlib.sha256(text.encode()).hexdigest() == stamp["spec_sha256"]:
            return _leading_comment(text) + ["#", *_leading_comment(run.spec_text())]
    return _leading_comment(run.spec_text())


def _copy_figures(report: Report, target: Path) -> list[str]:
    """Copy the report's figures beside the page (removing an earlier publish's) and return
    their markdown image links."""
    for stale in target.parent.glob(f"{target.stem}_*.png"):
        stale.unlink()
    links = []
    for path in report.files:
        if path.suffix == ".png":
            copy = target.with_name(f"{target.stem}_{path.name}")
            shutil.copyfile(path, copy)
            links.append(f"![{path.stem}]({copy.name})")
    return links


PAGE_STAMP = "<!-- gi-eval page: "
SOURCE_LINE = "# Tuned from: "  # the tuned spec's header line written by pipelines.tune
CLAIMS_FILE = "claims.md"


def _tuning_section(run: RunDir, target: Path) -> list[str]:
    """The grid's own tuning stage (`tuning.stage: true`, runs/<name>-tune): its study table
    (recipe and best scores, convergence verdict, chosen values) and the best-so-far plot."""
    tune = RunLayout(run.tuning_root)
    if not tune.report_file("tuning.md").is_file():
        return []
    text = tune.report_file("tuning.md").read_text()
    studies = text.split("![best so far", 1)[0].split("\n", 2)[-1].strip()
    lines = ["## Tuning (this grid's own tuning stage)", "", studies, ""]
    if tune.report_file("tuning.png").is_file():
        copy = target.with_name(f"{target.stem}_tuning.png")
        shutil.copyfile(tune.report_file("tuning.png"), copy)
        lines += [f"![best so far against trials, per study]({copy.name})", ""]
    return lines


def page_stamp(run: RunDir) -> dict[str, Any]:
    """What a results page records so that it cannot go stale silently (issue 16): the grid's
    name, the sha256 of its spec text (grid.yaml = the spec file as run; for a grid evaluated
    after its own tuning stage, the grid file it was tuned from, named in the tuned spec's
    header), and the code commits of the cells of that spec."""
    text = run.spec_text()
    current = spec_cells(run)
    df = run.metrics(columns=["cell_id", "git_commit"])
    commits = df[in_scope(df, current)]["git_commit"].dropna().unique()
    source = tuned_from(text)
    return {
        "grid": run.spec_name(),
        "spec_sha256": source[1] if source else hashlib.sha256(text.encode()).hexdigest(),
        "cells_commits": sorted(map(str, commits)),
    }


def tuned_from(spec_text: str) -> tuple[str, str] | None:
    """(grid file, sha256) a tuned spec was written from (its `# Tuned from:` header line),
    or None for a spec the user wrote."""
    for line in _leading_comment(spec_text):
        if line.startswith(SOURCE_LINE):
            path, _, digest = line.removeprefix(SOURCE_LINE).rpartition(" sha256 ")
            return path, digest
    return None


def page_problems(page: str, grids: Path) -> list[str]:
    """Why a results page is stale: no stamp, no grid file of its name in `grids`, a grid file
    whose text changed since the page was published, or cells without a code commit."""
    first = page.splitlines()[0] if page else ""
    if not first.startswith(PAGE_STAMP):
        return ["no `gi-eval page` stamp (publish it with `gi-eval report --publish`)"]
    stamp = json.loads(first.removeprefix(PAGE_STAMP).removesuffix(" -->"))
    files = [f for f in sorted(grids.glob("*.yaml")) if _spec_name(f) == stamp["grid"]]
    if not files:
        return [f"no grid file named {stamp['grid']!r} in {grids}"]
    problems = []
    if hashlib.sha256(files[0].read_bytes()).hexdigest() != stamp["spec_sha256"]:
        problems.append(f"{files[0].name} changed since this page was published: rerun and "
                        "publish it again")
    commits = stamp.get("cells_commits", [])
    if not commits or "unknown" in commits:
        problems.append(f"its cells' code commit is unknown ({commits}): rerun from a checkout")
    return problems


def _spec_name(path: Path) -> str | None:
    data = yaml.safe_load(path.read_text())
    return data.get("name") if isinstance(data, dict) else None


def _leading_comment(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def _without_leading_comment(text: str) -> str:
    return "\n".join(text.splitlines()[len(_leading_comment(text)) :])
