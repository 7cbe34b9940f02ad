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
