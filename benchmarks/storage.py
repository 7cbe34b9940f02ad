"""Storage benchmark: gradient I/O, files per cell, resume scan, metrics() into pandas.

    python benchmarks/storage.py            # full sizes (~2-4 minutes, ~1.5 GB of scratch disk)
    python benchmarks/storage.py --quick    # small sizes, a smoke test of the script

Results go to stdout as a markdown table (docs/results/storage.md records one run). Scratch
data lives in a temp directory (or --dir) and is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# `python benchmarks/storage.py` puts benchmarks/ first on sys.path, where this very file would
# shadow the `storage` package; import from the repository root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import storage  # noqa: E402
from storage.atomic import publishing  # noqa: E402
from storage.metrics import (  # noqa: E402
    ROW_COLUMNS,
    SCHEMA,
    part_filename,
    partition_dirname,
    provenance,
)

RESNET18_PARAMS = 11_173_962  # torchvision resnet18 with a 10-class head
METHODS = ("gi-x", "gi-z/w", "gi-z/w+bn")


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def resnet18_gradient(*, sparsity: float | None) -> storage.StoredGradient:
    rng = np.random.default_rng(0)
    g = (rng.standard_normal(RESNET18_PARAMS) * 1e-3).astype(np.float32)
    mask = None
    if sparsity is not None:  # keep the (1 - p) largest entries, like the top-k defense
        mask = np.abs(g) >= np.quantile(np.abs(g), sparsity)
        g = g * mask
    bn = tuple((rng.standard_normal(c).astype(np.float32), rng.random(c).astype(np.float32))
               for c in [64] * 5 + [128] * 5 + [256] * 5 + [512] * 5)
    return storage.StoredGradient(
        gradient=g, param_names=("all",), param_shapes=((RESNET18_PARAMS,),),
        images=rng.random((8, 3, 32, 32)).astype(np.float32), labels=np.arange(8),
        bn_stats=bn, mask=mask, attrs={"cell": {"id": "bench"}},
    )


def bench_gradients(root: Path, repeats: int) -> list[tuple[str, str]]:
    out = []
    for label, sparsity in (("dense (no defense)", None), ("sparsity p=0.9 + mask", 0.9)):
        grad = resnet18_gradient(sparsity=sparsity)
        path = root / f"grad-{sparsity}.zarr.zip"
        mb = grad.gradient.nbytes / 1e6
        write_s = timed(lambda grad=grad, path=path: storage.write_gradient(path, grad), repeats)
        read_s = timed(lambda path=path: storage.read_gradient(path), repeats)
        ratio = path.stat().st_size / grad.gradient.nbytes
        out.append((f"gradient write, {label}", f"{mb / write_s:.0f} MB/s ({write_s:.2f} s)"))
        out.append((f"gradient read, {label}", f"{mb / read_s:.0f} MB/s ({read_s:.2f} s)"))
        out.append((f"file size / raw gradient, {label}", f"{ratio:.2f}"))
    return out


def bench_files_per_cell(root: Path) -> list[tuple[str, str]]:
    run = storage.create_run(root / "files", "name: files\n")
    storage.write_gradient(run.gradient_path("g"), resnet18_gradient(sparsity=0.9))
    rec = storage.StoredReconstruction(
        images=np.zeros((8, 3, 32, 32), np.float32), restart_costs=np.zeros(4),
        loss_curve=np.zeros((400, 4), np.float32), curve_iterations=np.arange(400),
        status="ok", iterations=4000, wall_seconds=1.0, device="cpu", best_restart=0,
        restart_images=np.zeros((4, 8, 3, 32, 32), np.float32),
    )
    storage.write_reconstruction(run.reconstruction_path("c"), rec, keep_restarts=True)
    table = _rows_table(1, 8)
    _write_part(run.metrics_dir, "gi-z/w", "c", table)
    files = [p for p in run.root.rglob("*") if p.is_file() and p.name != "grid.yaml"]
    return [("files per cell (gradient + reconstruction + metrics part)", str(len(files)))]


def _rows_table(cells: int, rows_per_cell: int, *, offset: int = 0) -> pa.Table:
    n = cells * rows_per_cell
    cell = np.repeat(np.arange(offset, offset + cells), rows_per_cell)
    rng = np.random.default_rng(offset)
    columns: dict[str, object] = {}
    for field in SCHEMA:
        if field.name == "cell_id":
            columns[field.name] = [f"{c:016x}" for c in cell]
        elif field.name == "gradient_id":
            columns[field.name] = [f"{c // 6:016x}" for c in cell]
        elif field.name in provenance():
            columns[field.name] = [provenance()[field.name]] * n
        elif pa.types.is_string(field.type):
            columns[field.name] = ["ok"] * n
        elif pa.types.is_floating(field.type):
            columns[field.name] = rng.random(n)
        elif pa.types.is_boolean(field.type):
            columns[field.name] = rng.random(n) < 0.1
        else:
            columns[field.name] = np.tile(np.arange(rows_per_cell), cells)
    return pa.table(columns, schema=SCHEMA)


def _write_part(metrics_dir: Path, method: str, cell_id: str, table: pa.Table) -> None:
    # Same file layout and atomic publish as RunDir.commit_metrics, minus the per-row
    # Python-dict conversion (measured separately as commit latency).
    with publishing(metrics_dir / partition_dirname(method) / part_filename(cell_id)) as tmp:
        pq.write_table(table, tmp)


def bench_scan(root: Path, sizes: list[int]) -> list[tuple[str, str]]:
    out = []
    for n in sizes:
        run = storage.create_run(root / f"scan{n}", "name: scan\n")
        dirs = [run.metrics_dir / partition_dirname(m) for m in METHODS]
        for d in dirs:
            d.mkdir(parents=True)
        for i in range(n):
            # Empty files with real names: the scan reads names only (tests check that).
            (dirs[i % len(dirs)] / part_filename(f"{i:016x}")).touch()
        scan_s = timed(lambda run=run, n=n: _assert_len(run.committed_cells(), n), 3)
        out.append((f"resume scan, {n:,} committed part files", f"{scan_s:.3f} s"))
    return out


def bench_scan_compacted(run: storage.RunDir, n: int) -> tuple[str, str]:
    scan_s = timed(lambda: _assert_len(run.committed_cells(), n), 3)
    return (f"resume scan, {n:,} cells in compacted files (manifests)", f"{scan_s:.3f} s")


def _assert_len(cells: set[str], n: int) -> None:
    assert len(cells) == n, (len(cells), n)


def bench_metrics(root: Path, cells: int, rows_per_cell: int) -> list[tuple[str, str]]:
    run = storage.create_run(root / "metrics", "name: metrics\n")
    table = _rows_table(cells, rows_per_cell)
    start = time.perf_counter()
    for i in range(cells):
        part = table.slice(i * rows_per_cell, rows_per_cell)
        _write_part(run.metrics_dir, METHODS[i % 3], f"{i:016x}", part)
    write_s = time.perf_counter() - start
    rows = cells * rows_per_cell
    loose_s = timed(lambda: _assert_len_df(run, rows), 1)
    start = time.perf_counter()
    report = run.compact()
    compact_s = time.perf_counter() - start
    assert report.rows == rows
    compacted_s = timed(lambda: _assert_len_df(run, rows), 3)
    return [
        (f"write {cells:,} part files ({rows:,} rows)", f"{write_s:.1f} s"),
        (f"metrics() -> pandas, {rows:,} rows in {cells:,} part files", f"{loose_s:.2f} s"),
        (f"compact() {cells:,} parts -> {len(report.files_written)} files", f"{compact_s:.1f} s"),
        (f"metrics() -> pandas, {rows:,} rows after compact()", f"{compacted_s:.2f} s"),
        bench_scan_compacted(run, cells),
    ]


def _assert_len_df(run: storage.RunDir, rows: int) -> None:
    assert len(run.metrics()) == rows


def bench_commit_latency(root: Path, cells: int) -> list[tuple[str, str]]:
    run = storage.create_run(root / "commit", "name: commit\n")
    template = [{k: r[k] for k in ROW_COLUMNS} for r in _rows_table(1, 8).to_pylist()]
    start = time.perf_counter()
    for i in range(cells):
        cell_id = f"{i:016x}"
        run.commit_metrics([{**r, "cell_id": cell_id, "method": METHODS[i % 3]} for r in template])
    per_cell = (time.perf_counter() - start) / cells
    return [("commit_metrics latency (8 rows, one part file)", f"{per_cell * 1e3:.1f} ms")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gi-bench-", dir=args.dir))
    try:
        results = bench_gradients(root, repeats=1 if args.quick else 3)
        results += bench_files_per_cell(root)
        results += bench_scan(root, [1_000, 10_000] if args.quick else [10_000, 100_000])
        if args.quick:
            results += bench_metrics(root, cells=1_000, rows_per_cell=10)
        else:
            results += bench_metrics(root, cells=10_000, rows_per_cell=100)
        results += bench_commit_latency(root, 100 if args.quick else 1_000)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}, scratch on {args.dir or tempfile.gettempdir()}\n")
    print("| measurement | result |\n|---|---|")
    for name, value in results:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
