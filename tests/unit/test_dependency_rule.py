"""The layering rule of docs/ARCHITECTURE.md, checked on the source (not on sys.modules)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ORCHESTRATION = {"prefect", "zarr", "pyarrow", "submitit"}


def _imports(package: str) -> dict[Path, set[str]]:
    found: dict[Path, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[path] = names
    return found


def test_gi_core_imports_no_orchestration_or_storage_library() -> None:
    bad = {str(p): n & ORCHESTRATION for p, n in _imports("gi_core").items() if n & ORCHESTRATION}
    assert not bad, f"gi_core must stay pure PyTorch: {bad}"


def test_only_storage_imports_zarr_and_pyarrow() -> None:
    for package in ("gi_core", "tasks", "pipelines"):
        bad = {str(p) for p, n in _imports(package).items() if n & {"zarr", "pyarrow"}}
        assert not bad, f"only storage/ may import zarr/pyarrow: {bad}"


def test_only_the_executor_adapter_imports_submitit() -> None:
    users = {
        p.relative_to(ROOT).as_posix()
        for package in ("gi_core", "storage", "tasks", "pipelines")
        for p, n in _imports(package).items()
        if "submitit" in n
    }
    assert users <= {"tasks/executors.py"}, users


def test_layers_import_downwards_only() -> None:
    # gi_core <- storage <- tasks <- pipelines: a lower layer never imports a higher one
    # (tasks importing pipelines made the two a cycle).
    higher = {
        "gi_core": {"storage", "tasks", "pipelines"},
        "storage": {"tasks", "pipelines"},
        "tasks": {"pipelines"},
    }
    bad = {
        str(p.relative_to(ROOT)): sorted(n & above)
        for package, above in higher.items()
        for p, n in _imports(package).items()
        if n & above
    }
    assert not bad, f"upward imports: {bad}"
