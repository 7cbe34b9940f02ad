"""Progress where people look (issue 18, Deliver 3 / Acceptance 3): `gi-eval run` with its
output going to a file (no terminal, as under nohup, CI or an sbatch'ed driver) writes a
progress line at a steady pace and a line for every array submission and end.

The pace is set short by GI_PROGRESS_EVERY_S (the default is 30 s) so that a tiny grid lasts
several intervals; this test asserts the lines' content and order, never a timing. The pace
itself (a fixed schedule, no burst after a starved tick) is `commands.next_tick`, unit-tested
with a fake clock in tests/unit/test_cli_plan.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

EVERY_S = 1.0
SPEC = {
    "name": "progress",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 3},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "methods": [{"name": "gi-x", "params": {"iterations": 30, "restarts": 1}}],
    "batch_sizes": [1],
    "execution": {"executor": "inline"},
}
LINE = re.compile(
    r"^\d\d:\d\d:\d\d progress: (\d+)/3 cells done \(\d+ in this run\), \d+ running, "
    r"(\d+) failed; [\d.]+ cells/min; .+ \[\+(\d+) s\]$"
)


def _gi_eval() -> list[str]:
    script = Path(sys.executable).with_name("gi-eval")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]


def test_run_without_a_terminal_logs_progress_at_a_steady_pace(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GI_PROGRESS_EVERY_S": str(EVERY_S)}
    log = tmp_path / "run.log"
    with log.open("w") as f:  # stdout and stderr to a file: no terminal anywhere
        proc = subprocess.run([*_gi_eval(), "run", str(spec), "--out", str(tmp_path / "run")],
                              stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=env, timeout=900, check=False)
    text = log.read_text()
    assert proc.returncode == 0, text
    progress = [m for m in map(LINE.match, text.splitlines()) if m]
    # the first line at the start, the last at the end (periodic ones between them)
    assert len(progress) >= 2, text
    stamps = [int(m.group(3)) for m in progress]
    assert stamps == sorted(stamps)  # lines come out in order
    assert int(progress[0].group(1)) < 3  # the first line comes before the grid is done
    assert int(progress[-1].group(1)) == 3 and int(progress[-1].group(2)) == 0
    assert "nothing left" in progress[-1].group(0)
    lines = text.splitlines()
    for array in ("gradients-0", "inversions-0"):
        submitted = [i for i, s in enumerate(lines) if f"array {array}: submitted" in s]
        ended = [i for i, s in enumerate(lines) if f"array {array}: jobs ended" in s]
        assert len(submitted) == 1 and len(ended) == 1 and submitted[0] < ended[0], text
    assert "Traceback" not in text and "| INFO" not in text  # Prefect's console stays quiet
