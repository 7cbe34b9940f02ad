"""Issue 13: one test per reliability defect found on 848111e (each failed there).

The CLI runs in-process through typer's runner (the real `gi-eval` app, real files);
read-only and full filesystems are real tmpfs mounts (root only, as in CI; by system call, so
no process starts). The defects that need a second process (a reused pid, two drivers) are
tested in tests/integration/test_reliability_processes.py.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

import storage
from gi_core.victims import build_victim
from pipelines.cli import app
from pipelines.commands import status_report, tables_text
from storage.atomic import TEMP_MARK
from storage.errors import EnvironmentProblem
from storage.layout import QUARANTINE_DIR
from storage.metrics import ROW_COLUMNS
from storage.verify import verify_and_repair
from tasks.cells import expand
from tasks.preflight import prepare_resume
from tasks.spec import parse_spec
from tests.tmpfs import remount_read_only
from tests.tmpfs import tmpfs as mounted_tmpfs
from tests.unit.test_storage import make_reconstruction, make_rows

ROOT = Path(__file__).resolve().parents[2]
SPEC: dict[str, Any] = {
    "name": "rel",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 2},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "methods": [{"name": "gi-x", "params": {"iterations": 4, "restarts": 1}}],
    "batch_sizes": [1],
    "execution": {"executor": "inline"},
}


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def write_spec(path: Path, spec: dict[str, Any] | None = None, **over: Any) -> Path:
    path.write_text(yaml.safe_dump({**(spec or SPEC), **over}))
    return path


def one_error_line(stderr: str) -> str:
    """The single `error:` line (a spec error lists further fields on indented lines)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), stderr
    assert all(line.startswith("  ") for line in lines[1:]), stderr
    assert "Traceback" not in stderr
    return " ".join(line.strip() for line in lines)


def rows(cell_id: str, batch: int = 1) -> list[dict[str, Any]]:
    # Columns other issues add stay null here: these tests are about files, not values.
    return [{**dict.fromkeys(ROW_COLUMNS), **r} for r in make_rows(cell_id, "gi-x", batch=batch)]


def committed_run(root: Path, cells: int = 2) -> tuple[storage.RunDir, list[str]]:
    """A run of SPEC whose first `cells` cells are committed (group + metrics part)."""
    run = storage.create_run(root, yaml.safe_dump(SPEC))
    ids = [c.id for c in expand(parse_spec(SPEC)).inversion_cells][:cells]
    for cid in ids:
        storage.write_reconstruction(run.reconstruction_path(cid), make_reconstruction(),
                                     keep_restarts=False)
        run.commit_metrics(rows(cid))
    return run, ids


def write_record(run: storage.RunDir, records: list[dict[str, Any]]) -> None:
    run.jobs_dir.mkdir(parents=True, exist_ok=True)
    (run.jobs_dir / "20260101T000000-inversions-0-1.json").write_text(json.dumps(records))


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (CI runs as root)")
    with mounted_tmpfs(path, size, read_only=read_only) as mounted:
        yield mounted


# ---- defects 2 and 3: a truncated part, a deleted group ---------------------------------------


def test_truncated_part_is_skipped_by_readers_then_quarantined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run, ids = committed_run(tmp_path / "run", cells=2)
    part = run.part_path("gi-x", ids[0])
    part.write_bytes(part.read_bytes()[:100])
    df = run.metrics()  # 848111e: ArrowInvalid for the whole table
    assert set(df["cell_id"]) == {ids[1]}
    assert str(part) in caplog.text
    report = verify_and_repair(run)
    assert report.cells == {ids[0]} and report.moved_to is not None
    assert ids[0] not in run.committed_cells()  # the next run recomputes it
    assert (report.moved_to / part.relative_to(run.root)).is_file()
    reasons = json.loads((report.moved_to / "reasons.json").read_text())
    assert "unreadable Parquet" in reasons[0]["reason"]


def test_deleted_group_uncommits_the_cell_at_the_next_run(tmp_path: Path) -> None:
    run, ids = committed_run(tmp_path / "run", cells=2)
    run.reconstruction_path(ids[1]).unlink()
    assert "unusable stored cells (unreadable metrics or missing group; `gi-eval run` moves " \
           "them to quarantine and recomputes them): 1" in status_report(run.root)
    lines = prepare_resume(run)  # what `gi-eval run` does before it plans
    assert ids[1] not in run.committed_cells() and ids[0] in run.committed_cells()
    assert any("reconstruction group is missing" in line for line in lines)
    assert (run.root / QUARANTINE_DIR).is_dir()


def test_truncated_group_is_found_by_the_quick_scan(tmp_path: Path) -> None:
    run, ids = committed_run(tmp_path / "run", cells=2)
    group = run.reconstruction_path(ids[0])
    group.write_bytes(group.read_bytes()[:200])
    report = verify_and_repair(run)
    assert report.cells == {ids[0]} and "not a readable zip" in report.findings[0].reason
    assert run.committed_cells() == {ids[1]}


def test_bad_cell_in_a_compact_file_keeps_the_others_committed(tmp_path: Path) -> None:
    run, ids = committed_run(tmp_path / "run", cells=2)
    run.compact(min_parts=2)
    run.reconstruction_path(ids[0]).unlink()
    verify_and_repair(run)
    assert run.committed_cells() == {ids[1]}
    assert set(run.metrics()["cell_id"]) == {ids[1]}


# ---- defect 4: broken checkpoints, found before submission ------------------------------------


@pytest.mark.parametrize("field", ["victim", "generator"])
def test_text_file_checkpoint_exits_2_naming_the_file(tmp_path: Path, field: str) -> None:
    ckpt = tmp_path / "weights.pt"
    ckpt.write_text("not a checkpoint\n")
    spec = {**SPEC, "victim": {**SPEC["victim"]}}
    if field == "victim":
        spec["victim"]["checkpoint"] = str(ckpt)
    else:
        spec["generator"] = {"kind": "dcgan32", "checkpoint": str(ckpt)}
        spec["methods"] = [{"name": "gi-z", "params": {"z_iterations": 2, "restarts": 1}}]
    code, _, err = cli("run", str(write_spec(tmp_path / "s.yaml", spec)),
                       "--out", str(tmp_path / "run"))
    line = one_error_line(err)
    assert code == 2 and f"{field}.checkpoint: {ckpt}" in line and "state_dict" in line
    assert not (tmp_path / "run").exists()  # nothing created, nothing submitted


def test_checkpoint_of_another_width_exits_2(tmp_path: Path) -> None:
    ckpt = tmp_path / "wide.pt"
    torch.save(build_victim("convnet", num_classes=100, image_size=32, width=8).state_dict(), ckpt)
    spec = {**SPEC, "victim": {**SPEC["victim"], "checkpoint": str(ckpt)}}
    code, _, err = cli("run", str(write_spec(tmp_path / "s.yaml", spec)))
    assert code == 2 and "size mismatch" in one_error_line(err)


# ---- defect 5: environment errors -------------------------------------------------------------


def test_non_utf8_spec_exits_2(tmp_path: Path) -> None:
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes("name: caf\xe9\n".encode("latin-1"))
    code, _, err = cli("run", str(spec))
    assert code == 2 and "is not UTF-8" in one_error_line(err)


def test_read_only_run_directory_exits_3(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml")
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        code, _, err = cli("run", str(spec), "--out", str(ro / "run"))
    line = one_error_line(err)
    assert code == 3 and str(tmp_path / "ro") in line and "--out" in line


def test_full_disk_exits_3_before_submission(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml")
    with tmpfs(tmp_path / "small", "16k") as small:
        code, _, err = cli("run", str(spec), "--out", str(small / "run"))
        assert not (small / "run").exists()
    assert code == 3 and "free" in one_error_line(err)


def test_write_on_a_full_disk_names_the_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "64k") as small:
        run = storage.create_run(small / "run", "name: t\n")
        (small / "filler").write_bytes(b"\0" * (64 * 1024 - 4096))
        with contextlib.suppress(OSError):
            (small / "filler2").write_bytes(b"\0" * 8192)
        with pytest.raises(EnvironmentProblem, match="cannot write .*part-c1.parquet"):
            run.commit_metrics(rows("c1", batch=3))


def test_wrong_grid_out_exits_2_without_tracebacks(tmp_path: Path) -> None:
    storage.create_run(tmp_path / "run", yaml.safe_dump({**SPEC, "name": "other"}))
    code, _, err = cli("run", str(write_spec(tmp_path / "s.yaml")), "--out", str(tmp_path / "run"))
    assert code == 2 and "holds the run of grid 'other'" in one_error_line(err)


def test_internal_errors_exit_1_with_one_line_and_debug_adds_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, _ = committed_run(tmp_path / "run", cells=1)
    (run.root / "grid.yaml").write_text("name: [unclosed\n")  # a corrupted frozen spec
    code, _, err = cli("status", str(run.root))
    assert code == 2 and "grid.yaml: damaged frozen spec" in one_error_line(err)
    (run.root / "grid.yaml").write_text(yaml.safe_dump(SPEC))
    # A damaged job record is no longer an internal error (issue 18: it is ignored and
    # quarantined), so a bug is simulated at the boundary the CLI classifies.
    import pipelines.commands

    def bug(*_: Any, **__: Any) -> None:
        raise KeyError("simulated bug")

    monkeypatch.setattr(pipelines.commands, "grid_status", bug)
    code, _, err = cli("status", str(run.root))
    assert code == 1 and "internal error: KeyError" in one_error_line(err)
    code, _, err = cli("--debug", "status", str(run.root))
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error:")


# ---- defect 6: tables of a read-only run ------------------------------------------------------


def test_tables_of_a_read_only_run_print_without_writing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "4m") as fs:
        run, ids = committed_run(fs / "run", cells=2)
        remount_read_only(fs)
        text = tables_text(run.root)  # 848111e: compaction's lock file -> OSError EROFS
        assert "| gi-x [paper] |" in text and "read-only: nothing was written" in text
        assert not (run.root / "reports" / "table.md").exists()


# ---- defect 8: checkpoint temp files ------------------------------------------------------------


def test_resume_removes_temp_files_of_crashed_writers(tmp_path: Path) -> None:
    run, _ = committed_run(tmp_path / "run", cells=1)
    left = [run.root / "checkpoints" / f".abc.pt{TEMP_MARK}123-deadbeef",
            run.root / "store" / "reconstructions" / f".x.zarr.zip{TEMP_MARK}9-00"]
    for path in left:
        path.write_bytes(b"partial")
    lines = prepare_resume(run)  # no earlier job alive: every temp file is stale
    assert not any(p.exists() for p in left)
    assert "removed 2 temp file(s)" in lines[0]


# ---- defect 9: a mistyped method parameter -----------------------------------------------------


def test_mistyped_iterations_names_the_field_and_type(tmp_path: Path) -> None:
    spec = {**SPEC, "methods": [{"name": "gi-x", "params": {"iterations": "twenty"}}]}
    code, _, err = cli("run", str(write_spec(tmp_path / "s.yaml", spec)))
    line = one_error_line(err) if err.count("\n") == 1 else err
    assert code == 2
    assert "methods[0].params.iterations: must be an integer (got 'twenty')" in line
