"""Run directory, Zarr groups, Parquet metrics, commit markers, compaction, checkpoints."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

import storage
from storage import commits
from storage.errors import StorageError
from storage.metrics import ROW_COLUMNS, SCHEMA, method_of_dirname, partition_dirname

SPEC = "name: t\ndata: {dataset: synthetic}\n"
METHODS = ["gi-x", "gi-z/w+bn", "gi-z/w"]


def make_rows(cell_id: str, method: str, batch: int = 3, **over: Any) -> list[dict[str, Any]]:
    rows = []
    for j in range(batch):
        row: dict[str, Any] = {
            "cell_id": cell_id,
            "gradient_id": "g" + cell_id,
            "method": method,
            "variant": "paper",
            "preset": "paper",
            "method_params": '{"lr":0.1}',
            "param_lr": 0.1,
            "dataset": "synthetic",
            "image_size": 32,
            "victim": "lenet",
            "victim_seed": 0,
            "generator": None if method == "gi-x" else "dcgan32",
            "defense": "sparsity",
            "defense_level": 0.9,
            "batch_size": batch,
            "batch_index": 1,
            "seed": 0,
            "image_index": j,
            "sample_index": 10 + j,
            "label": j % 2,
            "labels": "given",
            "label_accuracy": 1.0,
            "psnr": 10.5 + j,
            "ssim": 0.25,
            "lpips": None,
            "best_psnr_in_batch": j == batch - 1,
            "best_ssim_in_batch": j == 0,
            "best_lpips_in_batch": None,
            "final_cost": -0.75,
            "status": "ok",
            "iterations": 100,
            "wall_seconds": 1.5,
            "device": "cpu",
        }
        rows.append({**row, **over})
    return rows


def make_gradient(n_bn: int = 2, mask: bool = True) -> storage.StoredGradient:
    rng = np.random.default_rng(0)
    shapes = ((4, 3, 3, 3), (4,), (10, 4))
    n = sum(int(np.prod(s)) for s in shapes)
    g = rng.standard_normal(n).astype(np.float32)
    g[::3] = 0.0
    bn = tuple(
        (rng.standard_normal(c).astype(np.float32), rng.random(c).astype(np.float32))
        for c in (4, 6)[:n_bn]
    )
    return storage.StoredGradient(
        gradient=g,
        param_names=("conv.weight", "conv.bias", "fc.weight"),
        param_shapes=shapes,
        images=rng.random((2, 3, 8, 8)).astype(np.float32),
        labels=np.array([3, 1]),
        bn_stats=bn,
        mask=(g != 0) if mask else None,
        attrs={"cell": {"id": "abc", "p": 0.1}},
    )


def make_reconstruction(restarts: int = 2) -> storage.StoredReconstruction:
    rng = np.random.default_rng(1)
    all_images = rng.random((restarts, 2, 3, 8, 8)).astype(np.float32)
    return storage.StoredReconstruction(
        images=all_images[1],
        restart_images=all_images,
        restart_costs=np.array([-0.5, -0.9]),
        loss_curve=rng.standard_normal((5, restarts)).astype(np.float32),
        curve_iterations=np.arange(0, 50, 10),
        status="ok",
        iterations=50,
        wall_seconds=2.25,
        device="cuda:0",
        best_restart=1,
        attrs={"cell": {"id": "c1"}},
    )


@pytest.fixture()
def run(tmp_path: Path) -> storage.RunDir:
    return storage.create_run(tmp_path / "run", SPEC)


def commit(run: storage.RunDir, cell_id: str, method: str = "gi-x", batch: int = 3) -> None:
    run.commit_metrics(make_rows(cell_id, method, batch))


# ---- run directory -------------------------------------------------------------------------


def test_create_run_writes_spec_and_refuses_a_different_one(tmp_path: Path) -> None:
    run = storage.create_run(tmp_path / "r", SPEC)
    assert run.spec_text() == SPEC
    # Same data, different formatting: a resume, not a conflict.
    assert storage.create_run(tmp_path / "r", "name: t\ndata:\n  dataset: synthetic\n") == run
    with pytest.raises(StorageError, match="different grid spec"):
        storage.create_run(tmp_path / "r", "name: other\n")
    with pytest.raises(StorageError, match="not a run directory"):
        storage.open_run(tmp_path / "nothing")


# ---- zarr groups ---------------------------------------------------------------------------


def test_gradient_round_trip_is_exact(run: storage.RunDir) -> None:
    grad = make_gradient()
    path = run.gradient_path("g1")
    storage.write_gradient(path, grad)
    back = storage.read_gradient(path)
    for name in ("gradient", "images", "labels", "mask"):
        assert np.array_equal(getattr(grad, name), getattr(back, name)), name
    assert back.gradient.dtype == np.float32 and back.images.dtype == np.float32
    assert back.labels.dtype == np.int64 and back.mask is not None and back.mask.dtype == bool
    assert back.param_names == grad.param_names and back.param_shapes == grad.param_shapes
    assert len(back.bn_stats) == 2
    for (m0, v0), (m1, v1) in zip(grad.bn_stats, back.bn_stats, strict=True):
        assert np.array_equal(m0, m1) and np.array_equal(v0, v1)
    assert back.attrs == {"cell": {"id": "abc", "p": 0.1}}
    assert run.stored_gradients() == {"g1"} and run.has_gradient("g1")


def test_gradient_accepts_torch_tensors_and_no_bn_no_mask(run: storage.RunDir) -> None:
    grad = make_gradient(n_bn=0, mask=False)
    as_torch = storage.StoredGradient(
        gradient=torch.from_numpy(grad.gradient),
        param_names=grad.param_names,
        param_shapes=grad.param_shapes,
        images=torch.from_numpy(grad.images),
        labels=torch.tensor([3, 1]),
    )
    storage.write_gradient(run.gradient_path("g2"), as_torch)
    back = storage.read_gradient(run.gradient_path("g2"))
    assert np.array_equal(back.gradient, grad.gradient)
    assert back.bn_stats == () and back.mask is None


def test_masked_gradient_is_stored_compactly_and_restored(run: storage.RunDir) -> None:
    grad = make_gradient()
    signed = grad.gradient.copy()
    signed[~grad.mask] = -0.0  # what `g * mask` gives for negative g: equal to 0.0
    storage.write_gradient(run.gradient_path("m"), replace(grad, gradient=signed))
    with storage.open_group(run.gradient_path("m")) as group:
        assert set(group.array_keys()) >= {"gradient_kept", "mask_bits"}
        assert "gradient" not in group.array_keys()
    back = storage.read_gradient(run.gradient_path("m"))
    assert np.array_equal(back.gradient, signed) and np.array_equal(back.mask, grad.mask)
    # A mask that does not explain the zeros: stored densely, still exact.
    loose = replace(grad, mask=np.roll(grad.mask, 1))
    storage.write_gradient(run.gradient_path("d"), loose)
    with storage.open_group(run.gradient_path("d")) as group:
        assert "gradient" in group.array_keys()
    again = storage.read_gradient(run.gradient_path("d"))
    assert np.array_equal(again.gradient, grad.gradient)
    assert np.array_equal(again.mask, loose.mask)


def test_gradient_with_wrong_index_is_refused(run: storage.RunDir) -> None:
    grad = make_gradient()
    bad = storage.StoredGradient(
        gradient=grad.gradient[:-1],
        param_names=grad.param_names,
        param_shapes=grad.param_shapes,
        images=grad.images,
        labels=grad.labels,
    )
    with pytest.raises(StorageError, match="parameter index"):
        storage.write_gradient(run.gradient_path("bad"), bad)
    assert not run.gradient_path("bad").exists()
    assert os.listdir(run.gradient_path("bad").parent) == []  # no temp file left behind


@pytest.mark.parametrize("keep", [True, False])
def test_reconstruction_round_trip_is_exact(run: storage.RunDir, keep: bool) -> None:
    rec = make_reconstruction()
    path = run.reconstruction_path("c1")
    storage.write_reconstruction(path, rec, keep_restarts=keep)
    back = storage.read_reconstruction(path)
    for name in ("images", "restart_costs", "loss_curve", "curve_iterations"):
        assert np.array_equal(getattr(rec, name), getattr(back, name)), name
    assert (back.status, back.iterations, back.wall_seconds, back.device, back.best_restart) == (
        "ok",
        50,
        2.25,
        "cuda:0",
        1,
    )
    assert back.attrs == {"cell": {"id": "c1"}}
    if keep:
        assert back.restart_images is not None
        assert np.array_equal(back.restart_images, rec.restart_images)
    else:
        assert back.restart_images is None


def test_group_is_one_zarr_readable_file(run: storage.RunDir) -> None:
    path = run.reconstruction_path("c1")
    storage.write_reconstruction(path, make_reconstruction(), keep_restarts=False)
    assert os.listdir(path.parent) == [path.name]
    with storage.open_group(path) as group:
        assert group["images"].shape == (2, 3, 8, 8)
        assert group.attrs["status"] == "ok"


def test_non_json_attrs_fail_before_anything_is_written(run: storage.RunDir) -> None:
    rec = make_reconstruction()
    bad = storage.StoredReconstruction(**{**rec.__dict__, "attrs": {"x": object()}})
    with pytest.raises(StorageError, match="JSON"):
        storage.write_reconstruction(run.reconstruction_path("c9"), bad, keep_restarts=False)
    assert os.listdir(run.reconstruction_path("c9").parent) == []


# ---- metrics + commit markers --------------------------------------------------------------


def test_partition_names_are_safe_and_reversible() -> None:
    for m in ["gi-x", "gi-z/w+bn", "a b%c", "gi-z/x"]:
        name = partition_dirname(m)
        assert "/" not in name and " " not in name and method_of_dirname(name) == m
    assert method_of_dirname("_compact.lock") is None


def test_metrics_round_trip_and_commit_marker(run: storage.RunDir) -> None:
    rows = make_rows("c1", "gi-z/w+bn")
    path = run.commit_metrics(rows)
    assert path == run.part_path("gi-z/w+bn", "c1") and path.is_file()
    assert run.committed_cells() == {"c1"} and run.is_committed("c1", "gi-z/w+bn")
    df = run.metrics()
    nullable = {"lpips", "best_lpips_in_batch"}
    for col in [c for c in ROW_COLUMNS if c not in nullable] + ["method"]:
        if col in rows[0]:
            assert df[col].tolist() == [r[col] for r in rows], col
        else:  # an optional configuration column the writer left out is stored as null
            assert df[col].isna().all(), col
    assert df["lpips"].isna().all() and df["best_lpips_in_batch"].isna().all()
    assert set(df["git_commit"]) == {storage.provenance()["git_commit"]}
    assert len(storage.provenance()["git_commit"]) == 40  # this test runs in a git checkout
    assert set(df["torch_version"]) == {torch.__version__}


def test_metrics_rows_are_checked(run: storage.RunDir) -> None:
    rows = make_rows("c1", "gi-x")
    with pytest.raises(StorageError, match="missing columns \\['psnr'\\]"):
        run.commit_metrics([{k: v for k, v in r.items() if k != "psnr"} for r in rows])
    with pytest.raises(StorageError, match="unknown \\['extra'\\]"):
        run.commit_metrics([{**r, "extra": 1} for r in rows])
    with pytest.raises(StorageError, match="schema"):
        run.commit_metrics([{**r, "psnr": "high"} for r in rows])
    with pytest.raises(StorageError, match="one cell"):
        run.commit_metrics(rows + make_rows("c2", "gi-x"))
    assert run.committed_cells() == set()


def test_plain_readers_get_correct_methods(run: storage.RunDir) -> None:
    for i, m in enumerate(METHODS):
        commit(run, f"c{i}", m)
    df = pd.read_parquet(run.metrics_dir)
    assert sorted(df.groupby("method", observed=True).size().items()) == sorted(
        (m, 3) for m in METHODS
    )
    table = ds.dataset(run.metrics_dir, format="parquet", partitioning="hive").to_table()
    assert set(table.column("method").to_pylist()) == set(METHODS)
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(
        f"select method, count(*) from read_parquet('{run.metrics_dir}/**/*.parquet',"
        " hive_partitioning=true) group by all"
    ).fetchall()
    assert sorted(got) == sorted((m, 3) for m in METHODS)


def test_schema_is_identical_across_part_files(run: storage.RunDir) -> None:
    commit(run, "c1", "gi-x")
    run.commit_metrics(make_rows("c2", "gi-z/w", psnr=None, generator=None, lpips=0.5))
    files = sorted(run.metrics_dir.rglob("*.parquet"))
    assert len(files) == 2
    schemas = [pq.read_schema(f).remove_metadata() for f in files]
    assert schemas[0].equals(schemas[1]) and schemas[0].equals(SCHEMA)


def test_group_without_marker_is_not_committed_and_rerun_commits_once(run: storage.RunDir) -> None:
    path = run.reconstruction_path("c1")
    storage.write_reconstruction(path, make_reconstruction(), keep_restarts=False)
    # Crash here: group written, marker not. A torn temp part may also be left behind.
    (run.metrics_dir / partition_dirname("gi-x")).mkdir(parents=True)
    torn = run.metrics_dir / partition_dirname("gi-x") / ".part-c1.parquet.tmp-1-abc"
    torn.write_bytes(b"PAR1 torn")
    assert run.committed_cells() == set() and not run.is_committed("c1", "gi-x")
    assert not any(run.metrics_dir.rglob("*.parquet"))  # duckdb-style globs skip the torn file
    # The rerun rewrites the group and commits.
    storage.write_reconstruction(path, make_reconstruction(), keep_restarts=True)
    commit(run, "c1")
    commit(run, "c1")  # a duplicate commit replaces the file, never adds a second one
    assert run.committed_cells() == {"c1"}
    assert len(run.metrics()) == 3
    assert storage.read_reconstruction(path).restart_images is not None
    assert run.sweep_temp_files(older_than_s=0) == 1 and not torn.exists()


def test_metrics_of_empty_run_has_the_schema(run: storage.RunDir) -> None:
    df = run.metrics()
    assert len(df) == 0 and "method" in df.columns and "psnr" in df.columns


# ---- compaction ----------------------------------------------------------------------------


def test_compaction_keeps_every_row_once(run: storage.RunDir) -> None:
    for i in range(6):
        commit(run, f"c{i}", METHODS[i % 3], batch=2 + i)
    before = run.metrics().sort_values(["cell_id", "image_index"]).reset_index(drop=True)
    report = run.compact()
    assert report.parts_merged == 6 and report.rows == len(before) == sum(2 + i for i in range(6))
    assert not list(run.metrics_dir.rglob("part-*.parquet"))
    assert len(list(run.metrics_dir.rglob("compact-*.parquet"))) == 3
    assert run.committed_cells() == {f"c{i}" for i in range(6)}
    assert run.is_committed("c0", "gi-x") and not run.is_committed("c1", "gi-x")
    after = run.metrics().sort_values(["cell_id", "image_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)
    plain = pd.read_parquet(run.metrics_dir)
    assert len(plain) == len(before) and set(plain["method"]) == set(METHODS)
    # New parts after a compaction are committed too, and a second compaction merges them.
    commit(run, "c9", "gi-x")
    assert "c9" in run.committed_cells() and len(run.metrics()) == len(before) + 3
    assert run.compact().parts_merged == 0  # one new part is below min_parts=2
    assert run.compact(min_parts=1).parts_merged == 1
    assert len(pd.read_parquet(run.metrics_dir)) == len(before) + 3


def test_crash_after_compaction_commit_point_never_duplicates(run: storage.RunDir) -> None:
    for i in range(4):
        commit(run, f"c{i}")
    parts = sorted(run.metrics_dir.rglob("part-*.parquet"))
    saved = {p: p.read_bytes() for p in parts}
    run.compact()
    for p, data in saved.items():  # as if the compactor died before deleting the parts
        p.write_bytes(data)
    assert run.committed_cells() == {f"c{i}" for i in range(4)}
    assert len(run.metrics()) == 12  # the API ignores parts already compacted
    report = run.compact()  # ... and the next compaction finishes the job
    assert report.stale_parts_removed == 4 and report.parts_merged == 0
    assert len(pd.read_parquet(run.metrics_dir)) == 12


def test_crash_before_compaction_commit_point_loses_nothing(run: storage.RunDir) -> None:
    for i in range(3):
        commit(run, f"c{i}")
    part_dir = run.metrics_dir / partition_dirname("gi-x")
    # An orphan manifest: written, but its compact file was never renamed into place.
    orphan = part_dir / "_compact-deadbeef.json"
    orphan.write_text(json.dumps({"cells": ["c0", "c1", "c2", "ghost"]}))
    assert run.committed_cells() == {"c0", "c1", "c2"}
    run.compact()
    assert not orphan.exists() and run.committed_cells() == {"c0", "c1", "c2"}
    assert len(pd.read_parquet(run.metrics_dir)) == 9


def test_scan_reads_names_not_contents(run: storage.RunDir) -> None:
    part_dir = run.metrics_dir / partition_dirname("gi-x")
    part_dir.mkdir(parents=True)
    for i in range(2000):
        (part_dir / f"part-c{i}.parquet").touch()  # empty files: contents are never opened
    states = commits.scan_partitions(run.metrics_dir)
    assert [s.method for s in states] == ["gi-x"] and len(states[0].cells) == 2000


# ---- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_round_trip_and_delete(run: storage.RunDir) -> None:
    state = {
        "iteration": 7,
        "stage": "z",
        "vars": {"z": torch.randn(2, 3)},
        "opt": [{"step": torch.tensor(3.0)}, 1.5],
        "rng": torch.randint(0, 255, (5,), dtype=torch.uint8),
    }
    path = run.checkpoint_path("c1")
    assert storage.load_checkpoint(path) is None
    storage.save_checkpoint(path, state)
    storage.save_checkpoint(path, {**state, "iteration": 8})  # atomically replaced
    back = storage.load_checkpoint(path)
    assert back is not None and back["iteration"] == 8 and back["stage"] == "z"
    assert torch.equal(back["vars"]["z"], state["vars"]["z"])
    assert torch.equal(back["opt"][0]["step"], torch.tensor(3.0)) and back["opt"][1] == 1.5
    assert os.listdir(path.parent) == ["c1.pt"]
    storage.delete_checkpoint(path)
    storage.delete_checkpoint(path)
    assert not path.exists()


def test_checkpoint_refuses_pickled_code(run: storage.RunDir) -> None:
    path = run.checkpoint_path("evil")
    torch.save({"f": pd.DataFrame}, path)  # not loadable with weights_only=True
    with pytest.raises(StorageError, match="unreadable checkpoint"):
        storage.load_checkpoint(path)


def test_git_head_reads_loose_packed_detached_and_worktree_heads(tmp_path: Path) -> None:
    """Provenance's commit comes from git's files, not a git process (unit tests start none)."""
    from storage.metrics import git_head

    a, b, c = "a" * 40, "b" * 40, "c" * 40
    repo = tmp_path / "repo"
    git = repo / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(a + "\n")
    assert git_head(repo) == a  # a loose ref
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{b} refs/heads/main\n")
    assert git_head(repo) == b  # a packed ref
    worktree = tmp_path / "wt"
    own = git / "worktrees" / "wt"
    own.mkdir(parents=True)
    worktree.mkdir()
    (worktree / ".git").write_text(f"gitdir: {own}\n")
    (own / "commondir").write_text("../..\n")
    (own / "HEAD").write_text(c + "\n")
    assert git_head(worktree) == c  # a linked worktree, detached
    (own / "HEAD").write_text("ref: refs/heads/main\n")
    assert git_head(worktree) == b  # its branch, packed in the common directory
    (git / "packed-refs").write_text("")
    assert git_head(worktree) == "unknown" and git_head(tmp_path / "nothing") == "unknown"
