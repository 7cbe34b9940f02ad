"""Issue 18 Deliver 5: an estimate you can trust.

On a real tiny run (real attacks through the job-element code, Parquet rows, no Prefect, no
jobs): the cost table learns seconds per iteration from the finished cells, `gi-eval plan`
prefers a learned price over the committed table where the key matches (and says so), the
report sets the stored estimate against the measured seconds per method and per job array,
and seconds-matched budgets never see a learned price (it would change cell ids).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from pipelines import learned_costs as lc
from pipelines import report_estimate
from pipelines.commands import plan_report
from pipelines.costmodel import estimate, iterations
from storage import records
from storage.run import RunDir, create_run
from storage.verify import verify_and_repair
from tasks.budget import seconds_per_iteration
from tasks.cells import expand
from tasks.executors import JobHandle
from tasks.jobs import array_records, record_array_end, record_jobs
from tasks.spec import spec_from_yaml
from tasks.work import NoPreemption, generate_gradient, invert

SPEC = """
name: learn-test
data: {dataset: lfw-faces, image_size: 32, num_batches: 2}
victim: {arch: convnet, width: 4, seed: 0}
methods:
  - {name: gi-x, params: {iterations: 4, restarts: 1}}
  - {name: gi-x+bn, params: {iterations: 3, restarts: 1}}
batch_sizes: [1]
seeds: [0]
execution: {executor: inline}
"""


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, spec_path: Path) -> RunDir:
    """Every cell of SPEC committed, after `gi-eval plan` stored its estimate."""
    run = create_run(tmp_path_factory.mktemp("learn") / "run", SPEC)
    plan_report(spec_path, run.root, calibrate=False)
    plan = expand(spec_from_yaml(SPEC))
    for g in plan.gradient_cells:
        generate_gradient(run, g)
    for cell in plan.inversion_cells:
        invert(run, cell, preemption=NoPreemption(), keep_restarts=False)
    return run


@pytest.fixture
def user_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "user" / "learned.json"
    monkeypatch.setenv(lc.ENV, str(path))
    return path


def test_the_tests_conftest_names_the_same_variable() -> None:
    conftest = (Path(__file__).resolve().parents[1] / "conftest.py").read_text()
    assert f'LEARNED_COSTS_ENV = "{lc.ENV}"' in conftest


def test_default_location_is_the_users_cache_unless_overridden(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(lc.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert lc.user_file() == tmp_path / "cache" / "gi-eval" / "learned-costs.json"
    monkeypatch.setenv(lc.ENV, str(tmp_path / "mine.json"))
    assert lc.user_file() == tmp_path / "mine.json"


def test_seconds_per_iteration_are_learned_per_kind_of_cell(run: RunDir) -> None:
    learned = {e.key.method: e for e in lc.measure(run)}
    assert set(learned) == {"gi-x", "gi-x+bn"}
    df = run.metrics().drop_duplicates("cell_id")
    for method, entry in learned.items():
        mine = df[df["method"] == method]
        assert entry.cells == len(mine) == 2
        expected = (mine["wall_seconds"] / mine["iterations"]).mean()
        assert entry.seconds_per_iteration == pytest.approx(expected)
        assert entry.key == lc.PriceKey(
            device="cpu", method=method, prior="none", victim="convnet", width=4,
            image_size=32, batch=1, restarts=1, threads=torch.get_num_threads(),
        )  # fmt: skip
        assert entry.run == str(run.root.resolve())


def test_a_price_is_learned_per_protocol_and_old_files_read_as_fedsgd(run: RunDir) -> None:
    """A FedAvg cell differentiates K local steps: a FedSGD price must not be reused for it."""
    base = yaml.safe_load(SPEC)
    protocols = [{"kind": "fedsgd"}, {"kind": "fedavg", "local_steps": [2], "local_batch_size": 1}]
    cells = expand(spec_from_yaml(yaml.safe_dump({**base, "protocols": protocols}))).inversion_cells
    keys = {c.gradient.protocol.kind: lc.cell_key(c, device="cpu", threads=1) for c in cells}
    assert keys["fedsgd"].protocol == "fedsgd" and keys["fedavg"].protocol == "fedavg K=2 b=1"
    assert {e.key.protocol for e in lc.measure(run)} == {"fedsgd"}  # rows of a FedSGD grid
    entry = lc.measure(run)[0].to_json()
    del entry["key"]["protocol"]  # a file written before the field existed
    assert records.is_learned_costs({"format": 1, "entries": [entry]})
    assert lc.LearnedPrices([lc._entry(entry)]).by_key.popitem()[0].protocol == "fedsgd"


def test_learning_stores_in_the_run_and_merges_into_the_user_file(
    run: RunDir, user_file: Path, tmp_path: Path
) -> None:
    other = lc.Learned(
        lc.PriceKey("cuda", "gias", "stylegan2", "resnet18", None, 64, 4, 1, 8),
        0.5, 3, "/elsewhere", "2026-01-01T00:00:00Z",
    )  # fmt: skip
    stale = lc.Learned(lc.measure(run)[0].key, 99.0, 1, "/old-run", "2025-01-01T00:00:00Z")
    lc.merge_into(user_file, [other, stale])

    learned = lc.learn_from_run(run)
    in_run = lc.load(run.reports_dir / lc.RUN_FILE)
    assert sorted(e.key.text() for e in in_run) == sorted(e.key.text() for e in learned)
    book = {e.key: e for e in lc.load(user_file)}
    assert len(book) == 3  # the other key kept, the stale one replaced by this run's price
    assert book[other.key] == other
    assert book[stale.key].run == str(run.root.resolve()) and book[stale.key].cells == 2


def test_plan_prefers_a_learned_price_and_says_where_it_came_from(
    run: RunDir, user_file: Path, spec_path: Path, tmp_path: Path
) -> None:
    spec = spec_from_yaml(SPEC)
    cells = expand(spec).inversion_cells
    table_only = estimate(spec, cells, executor="inline")
    assert not any("learned" in s for s in table_only.sources.values())

    lc.learn_from_run(run)
    prices = lc.LearnedPrices.from_user_file()
    learned = estimate(spec, cells, executor="inline", learned=prices)
    by_method = {e.key.method: e.seconds_per_iteration for e in lc.measure(run)}
    expected = sum(by_method[c.method] * iterations(c.config) for c in cells)
    assert learned.seconds == pytest.approx(expected)
    assert learned.cell_seconds[cells[0].id] == pytest.approx(
        by_method[cells[0].method] * iterations(cells[0].config)
    )
    # the plan command reads the user-level file itself (a fresh run directory: no own rows)
    text = plan_report(spec_path, tmp_path / "fresh", calibrate=False)
    assert f"(learned from {run.root.resolve()})" in text, text

    # another thread count is another price: the table's, not a guess from the learned one
    other_threads = prices.price(cells[0], device="cpu", threads=torch.get_num_threads() + 7)
    assert other_threads is None
    assert prices.price(cells[0], device="cuda", threads=torch.get_num_threads()) is None


def test_a_damaged_user_file_is_ignored_with_a_warning_and_rewritten(
    run: RunDir, user_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    user_file.parent.mkdir(parents=True)
    user_file.write_text('{"entries": [{"key": "not a key"}]}')
    with caplog.at_level(logging.WARNING):
        assert lc.LearnedPrices.from_user_file().by_key == {}
    assert str(user_file) in caplog.text and "damaged" in caplog.text
    lc.learn_from_run(run)
    assert len(lc.load(user_file)) == 2


def test_seconds_matched_budgets_never_use_a_learned_price(run: RunDir, user_file: Path) -> None:
    cell = expand(spec_from_yaml(SPEC)).inversion_cells[0]
    before = seconds_per_iteration(cell.config, cell.method, cell.gradient)
    lc.merge_into(user_file, [lc.Learned(lc.cell_key(cell, device="cpu", threads=1),
                                         123.0, 1, "/r", "t")])
    assert seconds_per_iteration(cell.config, cell.method, cell.gradient) == before != 123.0


def test_report_sets_the_estimate_against_measured_per_method_and_array(run: RunDir) -> None:
    plan = json.loads((run.reports_dir / records.PLAN_FILE).read_text())
    cells = expand(spec_from_yaml(SPEC)).inversion_cells
    assert set(plan["cell_seconds"]) == {c.id for c in cells}
    # the job records of one array of the gi-x cells, as tasks.arrays writes them
    gi_x = [c.id for c in cells if c.method == "gi-x"]
    handles = [JobHandle("slurm", f"77_{i}", i) for i in range(2)]
    path = record_jobs(run, "inversions-0", handles, [[gi_x[0]], [gi_x[1]]], submitted=1000.0)
    assert array_records(run)[0].ended is None  # still running: no wall time yet
    record_array_end(path, ended=1012.5)
    (array,) = array_records(run)
    assert (array.name, array.cells, array.elements) == ("inversions-0", tuple(gi_x), 2)
    assert (array.submitted, array.ended) == (1000.0, 1012.5)

    comparison = report_estimate.compare(run)
    assert comparison is not None and comparison.unestimated == 0
    df = run.metrics().drop_duplicates("cell_id").set_index("cell_id")
    rows = {r.name: r for r in comparison.methods}
    for method in ("gi-x", "gi-x+bn"):
        mine = [c.id for c in cells if c.method == method]
        est = sum(plan["cell_seconds"][c] for c in mine)
        measured = float(df.loc[mine, "wall_seconds"].sum())
        assert (rows[method].estimated, rows[method].measured) == (
            pytest.approx(est), pytest.approx(measured))
        assert rows[method].ratio == pytest.approx(measured / est)
    (arow,) = comparison.arrays
    parallel = plan["parallel_jobs"]
    est_wall = sum(plan["cell_seconds"][c] for c in gi_x) / min(parallel, 2)
    assert arow.estimated == pytest.approx(est_wall) and arow.measured == 12.5

    report_estimate.write(run)
    text = (run.reports_dir / report_estimate.FILE).read_text()
    assert "| gi-x | 2 |" in text and "| inversions-0 | 2 |" in text
    assert f"{rows['gi-x'].ratio:.2f}x" in text
    assert path is not None
    path.unlink()


def test_no_comparison_without_a_stored_estimate_and_a_damaged_one_is_quarantined(
    run: RunDir, tmp_path: Path
) -> None:
    import shutil

    copy = RunDir(shutil.copytree(run.root, tmp_path / "copy"))
    plan = copy.reports_dir / records.PLAN_FILE
    plan.write_text('{"executor": 3}')
    assert report_estimate.compare(copy) is None
    (copy.reports_dir / report_estimate.FILE).write_text("stale")
    assert report_estimate.write(copy) is None
    assert not (copy.reports_dir / report_estimate.FILE).exists()  # never a stale comparison
    found = verify_and_repair(copy)
    assert any(f.path == plan for f in found.findings), found
    assert not plan.exists()


def test_plan_json_stays_the_shape_verify_accepts(run: RunDir, spec_path: Path) -> None:
    data = yaml.safe_load(SPEC)
    assert data["execution"]["executor"] == "inline"
    value = json.loads((run.reports_dir / records.PLAN_FILE).read_text())
    assert records.is_plan_record(value)
