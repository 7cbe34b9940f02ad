"""The structure numbers issue 17 asks to remeasure, from the source itself (no imports run).

    python benchmarks/structure.py          # markdown to stdout

Per package: files, lines, functions, median and largest function length, the largest files;
the places that resolve the executor, the victim builders, the job-array runners; and the
length of docs/ARCHITECTURE.md.
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


def main() -> None:
    arch = len((ROOT / "docs" / "ARCHITECTURE.md").read_text().splitlines())
    print("\n".join([*package_rows(), "", *decision_places(), f"- ARCHITECTURE.md: {arch} lines"]))


if __name__ == "__main__":
    main()
