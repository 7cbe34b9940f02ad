"""Fixtures for every test tier."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# pipelines.learned_costs.ENV, spelled out: importing it here would load pandas and storage
# before every test (tests/unit/test_learned_costs.py checks the two agree)
LEARNED_COSTS_ENV = "GI_LEARNED_COSTS"


@pytest.fixture(scope="session", autouse=True)
def _learned_costs_in_a_tmp_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every report learns prices into the user-level learned-cost file (and every plan reads
    it): tests use their own, never the user's ~/.cache/gi-eval. Set in os.environ, so the
    `gi-eval` subprocesses of integration tests inherit it."""
    before = os.environ.get(LEARNED_COSTS_ENV)
    os.environ[LEARNED_COSTS_ENV] = str(tmp_path_factory.mktemp("learned") / "costs.json")
    yield
    if before is None:
        os.environ.pop(LEARNED_COSTS_ENV, None)
    else:
        os.environ[LEARNED_COSTS_ENV] = before


@pytest.fixture(autouse=True)
def _learned_costs_per_test(
    _learned_costs_in_a_tmp_file: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """And one file per test: a price learned by an earlier test's report must not change what
    a later test's plan prints (CI failed on that order once). Module-scoped fixtures that run
    grids still write to the session's file above."""
    before = os.environ[LEARNED_COSTS_ENV]
    os.environ[LEARNED_COSTS_ENV] = str(tmp_path_factory.mktemp("learned") / "costs.json")
    yield
    os.environ[LEARNED_COSTS_ENV] = before


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make test` runs on two pytest-xdist workers with `--dist loadgroup`. Every test that
    uses the Slurm cluster joins one group, so they run one after another on one worker (the CI
    node has 2 CPUs and the partition does not oversubscribe: two Slurm tests at once would
    queue each other's jobs). Every other test is grouped by its module, so a module-scoped
    fixture (a grid run shared by its tests) runs once. Without xdist the marks do nothing."""
    for item in items:
        uses_slurm = item.get_closest_marker("slurm") or "slurm_cluster" in getattr(
            item, "fixturenames", ()
        )
        group = "slurm" if uses_slurm else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
