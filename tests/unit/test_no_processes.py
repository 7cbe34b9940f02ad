"""The unit tier's audit hook (tests/unit/conftest.py) fails a phase that started a process.

sys.audit raises the very event a process start raises, without starting one.
"""

from __future__ import annotations

import sys

import pytest

from tests.unit import conftest


def test_a_process_start_inside_a_watched_phase_fails_it_naming_the_command() -> None:
    phase = conftest._watch("call")
    next(phase)
    sys.audit("subprocess.Popen", "git", ["git", "rev-parse", "HEAD"], None, None)
    with pytest.raises(pytest.fail.Exception, match=r"started a process in its call.*git"):
        phase.send(None)


def test_a_phase_without_a_process_start_passes() -> None:
    phase = conftest._watch("setup")
    next(phase)
    sys.audit("open", "/dev/null", "r", 0)  # not a process start
    with pytest.raises(StopIteration):
        phase.send(None)
