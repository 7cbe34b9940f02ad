"""Unit tests start no processes (issue 17, decision 223).

An audit hook (PEP 578) sees every process start in this interpreter: subprocess.Popen,
os.system, os.exec*, os.spawn*, os.posix_spawn and os.fork. While a unit test is set up, runs
and is torn down (the fixtures it sets up included, whatever their scope), each start is
recorded, and that phase then fails naming the command, even when the code under test caught
the error of a failing start. Tests that need a process (a CLI in a subprocess, a job executor,
a Prefect server, a mount) belong in tests/integration. The hooks below are this directory's:
integration tests are not watched. An audit hook cannot be removed, so it stays installed and
records only inside a watched phase.
"""

from __future__ import annotations

import sys
from collections.abc import Generator
from typing import Any

import pytest

_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
           "os.forkpty")  # fmt: skip
_STARTED: list[str] | None = None  # None: outside a watched phase


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _STARTED is not None and event.startswith(_EVENTS):
        _STARTED.append(f"{event}{args[:2]!r}"[:200])


sys.addaudithook(_audit)


def _watch(phase: str) -> Generator[None, object, object]:
    global _STARTED
    _STARTED = started = []
    try:
        result = yield
    finally:
        _STARTED = None
    if started:
        pytest.fail(
            f"a unit test started a process in its {phase} (move it to tests/integration): "
            + "; ".join(started),
            pytrace=False,
        )
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _watch("setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _watch("call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    return (yield from _watch("teardown"))
