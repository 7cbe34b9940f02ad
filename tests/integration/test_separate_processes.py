"""What only a second Python process can show (moved from tests/unit, which starts no process:
decision 223): a writer killed before its commit leaves nothing committed; gi_core imports
without the orchestration packages; cell ids do not depend on the process's hash seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import storage
from tests.unit.test_cells import ids, plan_of, spec_dict
from tests.unit.test_dependency_rule import ORCHESTRATION, ROOT
from tests.unit.test_storage import SPEC, commit


@pytest.fixture()
def run(tmp_path: Path) -> storage.RunDir:
    return storage.create_run(tmp_path / "run", SPEC)


def test_crash_in_a_real_process_before_commit(run: storage.RunDir) -> None:
    code = (
        "import os, sys, numpy as np, storage\n"
        "from tests.unit.test_storage import make_reconstruction\n"
        "run = storage.open_run(sys.argv[1])\n"
        "storage.write_reconstruction(run.reconstruction_path('c1'), make_reconstruction(),"
        " keep_restarts=False)\n"
        "os._exit(17)  # dies before write_metrics_part\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(run.root)], cwd=ROOT, check=False)
    assert proc.returncode == 17
    assert run.reconstruction_path("c1").is_file() and run.committed_cells() == set()
    commit(run, "c1")
    assert run.committed_cells() == {"c1"} and len(run.metrics()) == 3


def test_gi_core_attacks_import_without_orchestration_modules() -> None:
    code = (
        "import sys; from gi_core.attacks import gias, registry; import gi_core.metrics, "
        "gi_core.datasets; bad = {m for m in sys.modules if m.split('.')[0] in "
        f"{sorted(ORCHESTRATION)!r}}}; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


_CHILD = """
import json, sys
from tasks.cells import expand
from tasks.spec import parse_spec
plan = expand(parse_spec(json.loads(sys.argv[1])))
print(json.dumps([c.id for c in plan.gradient_cells] + [c.id for c in plan.inversion_cells]))
"""


def test_ids_are_stable_across_processes() -> None:
    plan = plan_of()
    here = [c.id for c in plan.gradient_cells] + ids(plan)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # different set/dict hashing than ours
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec_dict())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == here
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in here)
