"""The report on a real (tiny) run directory: run.cells(), run.curves(), snapshots, tables,
figures, report.html, and a partial run that says how many cells it covers.

The run is made by the job-element code itself (tasks.work: real attacks, real LPIPS, Zarr,
Parquet), without Prefect or jobs: 6 of the grid's 8 cells, one of the others failed."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.report import write_report
from storage.run import RunDir, create_run
from storage.tables import record_failure
from storage.zarr_store import read_reconstruction
from tasks.cells import expand
from tasks.spec import spec_from_yaml
from tasks.work import NoPreemption, generate_gradient, invert

SPEC = """
name: report-test
data: {dataset: lfw-faces, image_size: 32, num_batches: 2}
victim: {arch: convnet, width: 8, seed: 0}
generator: {kind: digiface}
methods:
  - {name: gi-x, params: {iterations: 6, restarts: 2, curve_every: 2}}
  - {name: gi-z/w, params: {z_iterations: 4, w_iterations: 4, restarts: 2, curve_every: 2}}
defenses:
  - {kind: none}
  - {kind: sparsity, p: 0.9}
batch_sizes: [2]
seeds: [0]
storage: {snapshots: [2, 4, 6]}
"""
DONE = 6  # of 8 planned cells; of the other two, one failed and one never ran


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    spec = spec_from_yaml(SPEC)
    run = create_run(tmp_path_factory.mktemp("report") / "run", SPEC)
    plan = expand(spec)
    for g in plan.gradient_cells:
        generate_gradient(run, g)
    for cell in plan.inversion_cells[:DONE]:
        invert(
            run,
            cell,
            preemption=NoPreemption(),
            keep_restarts=False,
            snapshots=spec.storage.snapshots,
        )
    failed = plan.inversion_cells[DONE]
    record_failure(run, failed.id, method=failed.method, reason="RuntimeError: out of memory")
    return run


@pytest.fixture(scope="module")
def report(run: RunDir):  # type: ignore[no-untyped-def]
    return write_report(run)


def test_cells_one_row_per_cell_with_status_and_reason(run: RunDir) -> None:
    cells = run.cells()
    assert len(cells) == DONE + 1 and cells["cell_id"].is_unique
    assert (cells["status"] == "ok").sum() == DONE
    failed = cells[cells["status"] == "failed"].iloc[0]
    assert failed["reason"] == "RuntimeError: out of memory" and failed["method"]
    ok = cells[cells["status"] == "ok"]
    assert (ok["images"] == 2).all() and (ok["wall_seconds"] > 0).all()
    # where each cell ran (null outside a submitit job, as here) and what ran it
    assert {"slurm_job_id", "host", "device_name", "variant", "preset"} <= set(cells.columns)
    assert set(ok["variant"]) == {"paper"} and set(ok["device_name"]) == {"cpu"}
    assert set(ok["iterations"]) == {6, 8}


def test_curves_long_form_with_stages(run: RunDir) -> None:
    curves = run.curves()
    assert set(curves.columns) >= {"cell_id", "stage", "iteration", "restart", "cost"}
    assert curves["cell_id"].nunique() == DONE  # only committed cells
    gias = curves[curves["method"] == "gi-z/w"]
    # curve_every 2 over 4 z + 4 w iterations: points 0, 2 (z), 4, 6 (w), 8 (final), x 2 restarts
    one = gias[gias["cell_id"] == gias["cell_id"].iloc[0]]
    assert sorted(one["iteration"].unique()) == [0, 2, 4, 6, 8]
    assert len(one) == 5 * 2
    stages = one.drop_duplicates("iteration").set_index("iteration")["stage"].to_dict()
    assert stages == {0: "z", 2: "z", 4: "w", 6: "w", 8: "w"}
    assert np.isfinite(curves["cost"]).all()


def test_snapshots_stored_at_configured_iterations(run: RunDir) -> None:
    cell = run.cells().query("status == 'ok' and method == 'gi-z/w'")["cell_id"].iloc[0]
    rec = read_reconstruction(run.reconstruction_path(cell))
    assert rec.snapshot_iterations is not None and rec.snapshots is not None
    assert list(rec.snapshot_iterations) == [2, 4, 6]  # 8 is the final image, stored anyway
    assert rec.snapshots.shape == (3, 2, 2, 3, 32, 32)  # (S, R, B, C, H, W)
    assert 0 <= rec.snapshots.min() and rec.snapshots.max() <= 1
    assert not np.allclose(rec.snapshots[0], rec.snapshots[-1])  # the images evolved


def test_partial_run_says_how_many_cells_it_covers(report) -> None:  # type: ignore[no-untyped-def]
    assert (report.coverage.planned, report.coverage.committed) == (8, DONE)
    assert report.coverage.failed == 1 and report.coverage.partial
    assert "6 of 8 cells committed" in report.table_markdown
    html = report.html.read_text()
    assert "6 of 8 cells committed" in html and "partial run" in html


def test_table1_has_configs_as_columns_and_no_ci_or_bold_below_min_n(report) -> None:  # type: ignore[no-untyped-def]
    md = report.table_markdown
    header = next(line for line in md.splitlines() if line.startswith("| setting"))
    assert "gi-x" in header and "gi-z/w" in header
    psnr_rows = [line for line in md.splitlines() if "PSNR ↑ avg" in line]
    assert len(psnr_rows) == 2  # one per setting (none, sparsity 0.9)
    # 2 and 1 batches per configuration: below MIN_N = 5 no CI, and no bold (issue 16)
    for row in psnr_rows:
        assert "**" not in row and "[" not in row
        assert row.count("(no CI: n < 5)") == 2
    assert "Budgets (" in md  # the budget table under Table 1
    tex = (report.table.parent / "table.tex").read_text()
    assert "\\toprule" in tex
    # no `baseline:` in the spec: nothing is tested; every pair is in the CSV only
    paired = (report.table.parent / "paired.md").read_text()
    assert "no comparison is tested" in paired
    csv = (report.table.parent / "paired.csv").read_text()
    assert re.search(r"gi-x \[paper\] · 6 it ×2 = 12 evals,gi-z/w", csv)  # budgets differ


def test_figures_are_written_and_not_blank(report) -> None:  # type: ignore[no-untyped-def]
    names = {p.name for p in report.files}
    expected = {
        "fig3_curves.png",
        "fig3_strip.png",
        "fig4a.png",
        "fig5_sparsity.png",
        "grid_best.png",
        "grid_worst.png",
        "reconstructions.png",
        "quality_vs_budget.png",
    }
    assert expected <= names
    assert "fig5_noise.png" not in names  # the run has no noise axis
    for name in expected:
        image = mpimg.imread(report.table.parent / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.05, f"{name} looks blank"


def test_html_is_self_contained(report) -> None:  # type: ignore[no-untyped-def]
    html = report.html.read_text()
    assert 'id="table1"' in html and 'class="image-grid"' in html
    assert html.count("data:image/png;base64,") == len(
        [p for p in report.files if p.suffix == ".png"]
    )
    assert not re.search(r'src="(?!data:)', html)  # no external files
    assert "name: report-test" in html  # the spec, in the provenance section


def test_cli_report_on_a_run_and_on_a_wrong_path(run: RunDir, tmp_path: Path) -> None:
    ok = CliRunner().invoke(app, ["report", str(run.root)])
    assert ok.exit_code == 0 and "6 of 8 cells committed" in ok.output
    bad = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "error: run_dir:" in bad.output


def test_publish_stamps_the_page_so_that_it_cannot_go_stale(  # type: ignore[no-untyped-def]
    run: RunDir, report, tmp_path: Path
) -> None:
    from pipelines.report import page_problems, publish

    page = publish(report, run, tmp_path / "results" / "x.md", command="gi-eval report x")
    grids = tmp_path / "grids"
    grids.mkdir()
    (grids / "report_test.yaml").write_text(SPEC)
    assert page_problems(page.read_text(), grids) == []
    (grids / "report_test.yaml").write_text(SPEC + "# edited after publishing\n")
    assert any("changed since" in p for p in page_problems(page.read_text(), grids))
