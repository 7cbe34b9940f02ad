"""The structure numbers issue 17 asks to remeasure, from the source itself (no imports run).

    python benchmarks/structure.py          # markdown to stdout

Per package: files, lines, functions, median and largest function length, the largest files;
the places that resolve the executor, the victim builders, the job-array runners; the
run-directory paths built by hand outside storage; and the length of docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gi_core", "storage", "tasks", "pipelines")


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def _length(node: ast.AST) -> int:
    return int(getattr(node, "end_lineno", 0)) - int(getattr(node, "lineno", 0)) + 1


def package_rows() -> list[str]:
    rows = ["| package | files | lines | functions | median fn | largest fn | largest files |",
            "|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for package in PACKAGES:
        files = sorted((ROOT / package).rglob("*.py"))
        sizes = {f: len(f.read_text().splitlines()) for f in files}
        fns = [(f, fn) for f in files for fn in _functions(ast.parse(f.read_text()))]
        lengths = [_length(fn) for _, fn in fns]
        big_f, big_fn = max(fns, key=lambda p: _length(p[1]))
        top = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
        rows.append(
            f"| {package} | {len(files)} | {sum(sizes.values())} | {len(fns)} | "
            f"{statistics.median(lengths):.0f} | {big_fn.name} ({big_f.relative_to(ROOT)}) "
            f"{_length(big_fn)} | "
            + ", ".join(f"{p.relative_to(ROOT)} {n}" for p, n in top)
            + " |"
        )
    return rows


def _grep(pattern: str) -> list[str]:
    hits = []
    for package in PACKAGES:
        for f in sorted((ROOT / package).rglob("*.py")):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if re.search(pattern, line):
                    hits.append(f"{f.relative_to(ROOT)}:{i}")
    return hits


def decision_places() -> list[str]:
    checks = {
        "executor resolved (`def resolve_executor`)": r"def resolve_executor\b",
        "job-array runners (`def submit_and_wait`)": r"def submit_and_wait\b",
        "victim builders (`def build_victim`)": r"def build_victim\b",
        "generator builders (`def build_generator`)": r"def build_generator\b",
    }
    return [f"- {name}: {len(h)} ({', '.join(h)})" for name, pattern in checks.items()
            for h in [_grep(pattern)]]  # fmt: skip


_DOCS = 'Path(__file__).resolve().parent.parent / "docs"'
# Paths that are built from a literal name outside storage/ but do not point into a run directory
# (storage.layout names every path that does): (file, source of the expression).
NOT_RUN_PATHS = {
    ("pipelines/calibrate.py", 'Path(tmp) / "calibration.json"'): "a temporary directory",
    ("pipelines/cli.py", 'Path(__file__).resolve().parents[1] / "grids"'): "the repository's grids",
    ("pipelines/cli.py", 'GRIDS / "smoke.yaml"'): "the repository's grids",
    ("pipelines/convert.py", 'out.with_name(out.name + ".tmp")'): "converted weights",
    ("pipelines/convert.py", 'out.with_name(out.name + ".sha256")'): "converted weights",
    ("pipelines/report.py", 'target.with_name(f"{target.stem}_tuning.png")'): "a results page",
    ("pipelines/report.py", 'target.with_name(f"{target.stem}_{path.name}")'): "a results page",
    ("pipelines/tune.py", 'spec_path.with_name(spec_path.stem + ".tuned.yaml")'): "the user's spec",
    **{
        ("pipelines/learned_costs.py", expr): "the user's cost file"
        for expr in (
            'Path(cache) / "gi-eval" / "learned-costs.json"',
            'Path(cache) / "gi-eval"',
            'Path.home() / ".cache"',
            'path.with_name(path.name + ".lock")',
        )
    },
    **{("tasks/pricing.py", _DOCS + tail): "the cost table"
       for tail in ("", ' / "results"', ' / "results" / "performance.json"')},
}
# Names of run files that only storage.layout should spell.
RUN_FILE_NAMES = ("grid.yaml", "driver.json", "plan.json", "CANCEL")


def _path_joins(source: str) -> list[tuple[int, str]]:
    """(line, expression) of every `x / "literal"`, `x / f"..."`, `x.with_name(...)` and
    `x.joinpath(...)`, and of every string that is exactly a run file name."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        literal = isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and (
            isinstance(node.right, ast.JoinedStr)
            or (isinstance(node.right, ast.Constant) and isinstance(node.right.value, str))
        )
        renamed = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
            node.func.attr in ("with_name", "joinpath")
        )
        named = isinstance(node, ast.Constant) and node.value in RUN_FILE_NAMES
        if literal or renamed or named:
            expr = ast.get_source_segment(source, node) or ""
            hits.append((int(getattr(node, "lineno", 0)), expr))
    return hits


def hand_built_run_paths() -> tuple[list[str], list[str]]:
    """Paths into a run directory built outside storage/, and the justified non-run ones."""
    found, justified = [], []
    for package in ("tasks", "pipelines"):
        for f in sorted((ROOT / package).rglob("*.py")):
            rel = str(f.relative_to(ROOT))
            for line, expr in _path_joins(f.read_text()):
                why = NOT_RUN_PATHS.get((rel, expr))
                (justified if why else found).append(
                    f"{rel}:{line} `{expr}`" + (f" ({why})" if why else "")
                )
    return found, justified


def main() -> None:
    arch = len((ROOT / "docs" / "ARCHITECTURE.md").read_text().splitlines())
    run_paths, not_run = hand_built_run_paths()
    print("\n".join([
        *package_rows(), "", *decision_places(),
        f"- hand-built run paths outside storage: {len(run_paths)}"
        + "".join(f"\n  - {p}" for p in run_paths),
        f"- literal paths outside storage that are not run paths: {len(not_run)}"
        + "".join(f"\n  - {p}" for p in not_run),
        f"- ARCHITECTURE.md: {arch} lines",
    ]))  # fmt: skip


if __name__ == "__main__":
    main()
