"""Fixtures for integration tests (flows on the local executor and on a real Slurm cluster)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import NoReturn

import pytest

# --- Slurm -------------------------------------------------------------------------------------

_READY_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


@dataclass(frozen=True)
class SlurmCluster:
    """A reachable Slurm cluster with at least one node able to run jobs."""

    partition: str  # the default partition (sinfo marks it with '*')


def _no_slurm(reason: str) -> NoReturn:
    if os.environ.get("GI_REQUIRE_SLURM") == "1":
        pytest.fail(
            f"GI_REQUIRE_SLURM=1 but {reason}; start one with `tests/cluster/start-slurm.sh` "
            "(as root) or unset GI_REQUIRE_SLURM to skip Slurm tests"
        )
    pytest.skip(f"no Slurm cluster: {reason}")


def _find_cluster() -> SlurmCluster:
    """Query sinfo; skip (or fail under GI_REQUIRE_SLURM=1) when no node can run jobs."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        _no_slurm("sinfo/sbatch are not on PATH")
    proc = subprocess.run(
        ["sinfo", "--noheader", "--format=%P %T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        _no_slurm(f"sinfo failed: {proc.stderr.strip()}")
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    ready = [(p, s) for p, s in rows if s.rstrip("*~#!%$@^-") in _READY_NODE_STATES]
    if not ready:
        _no_slurm(f"no idle node (sinfo: {proc.stdout.strip() or 'empty'})")
    default = [p for p, _ in ready if p.endswith("*")]
    return SlurmCluster(partition=(default or [ready[0][0]])[0].rstrip("*"))


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The local/CI Slurm cluster; skips without one unless GI_REQUIRE_SLURM=1."""
    return _find_cluster()
