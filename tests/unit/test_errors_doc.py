"""Every bad input a user can give, its exit code and its `error:` line; writes docs/errors.md.

Each case runs the real `gi-eval` CLI in-process on real files. `test_error_case` checks the
exit code and a key part of the message; `test_errors_md_is_current` renders every case into
docs/errors.md and fails when the committed file differs (regenerate it with
`GI_WRITE_ERRORS_DOC=1 pytest tests/unit/test_errors_doc.py`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

import storage
from gi_core.victims import build_victim
from pipelines.cli import app
from tests.tmpfs import mount_tmpfs, remount_read_only, unmount

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "errors.md"
BASE: dict[str, Any] = {
    "name": "demo",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 1},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "methods": [{"name": "gi-x", "params": {"iterations": 4, "restarts": 1}}],
    "batch_sizes": [1],
    "execution": {"executor": "inline"},
}
Setup = Callable[[Path], list[str]]


@dataclass(frozen=True)
class Case:
    group: str
    what: str  # the bad input, as a user would describe it
    setup: Setup  # writes files under the temp dir, returns the gi-eval arguments
    code: int
    expect: str  # a part of the error line that must be there
    needs_root: bool = False
    env: dict[str, str] | None = None  # environment variables during the command


def spec(**over: Any) -> Setup:
    """`gi-eval run` of BASE with top-level keys replaced (None deletes a key)."""

    def setup(tmp: Path) -> list[str]:
        data = {k: v for k, v in {**BASE, **over}.items() if v is not None}
        (tmp / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        return ["run", str(tmp / "spec.yaml"), "--out", str(tmp / "run")]

    return setup


def nested(key: str, **over: Any) -> Setup:
    return spec(**{key: {**BASE.get(key, {}), **over}})


def slurm(**over: Any) -> Setup:
    return spec(execution={"executor": "slurm", "slurm": over})


def method(**params: Any) -> Setup:
    return spec(methods=[{"name": "gi-x", "params": params}])


def raw(text: bytes) -> Setup:
    def setup(tmp: Path) -> list[str]:
        (tmp / "spec.yaml").write_bytes(text)
        return ["run", str(tmp / "spec.yaml")]

    return setup


def checkpoint(kind: str, content: str) -> Setup:
    def setup(tmp: Path) -> list[str]:
        path = tmp / "weights.pt"
        if content == "text":
            path.write_text("this is not a checkpoint\n")
        else:  # a real state_dict of another width
            model = build_victim("convnet", num_classes=100, image_size=32, width=8)
            torch.save(model.state_dict(), path)
        if kind == "victim":
            return spec(victim={**BASE["victim"], "checkpoint": str(path)})(tmp)
        return spec(generator={"kind": "dcgan32", "checkpoint": str(path)},
                    methods=[{"name": "gi-z", "params": {"z_iterations": 2}}])(tmp)

    return setup


def run_dir(command: str, prepare: str = "none") -> Setup:
    def setup(tmp: Path) -> list[str]:
        if prepare == "other-grid":
            storage.create_run(tmp / "run", yaml.safe_dump({**BASE, "name": "other"}))
            return spec()(tmp)
        if prepare == "bad-spec":  # a frozen grid.yaml damaged after the fact (issue 18)
            run = storage.create_run(tmp / "run", yaml.safe_dump(BASE))
            run.grid_path.write_bytes(b"\x00\xff garbage")
        return [command, str(tmp / "run")]

    return setup


def tune_spec(**over: Any) -> Setup:
    """`gi-eval tune` of BASE with top-level keys replaced."""

    def setup(tmp: Path) -> list[str]:
        spec(**over)(tmp)
        return ["tune", str(tmp / "spec.yaml"), "--out", str(tmp / "tune")]

    return setup


def float_tiff_folder() -> Setup:
    """An image folder of 32-bit float TIFFs scaled 0..255 (issue 20: no defined view)."""

    def setup(tmp: Path) -> list[str]:
        import numpy as np
        import tifffile

        for c in range(2):
            (tmp / "imgs" / f"class{c}").mkdir(parents=True)
            tifffile.imwrite(tmp / "imgs" / f"class{c}" / "0.tif",
                             np.full((32, 32), 200.0 + c, np.float32))
        return spec(data={"dataset": f"imagefolder:{tmp / 'imgs'}", "image_size": 32,
                          "num_batches": 1})(tmp)

    return setup


def cli_args(*args: str) -> Setup:
    def setup(tmp: Path) -> list[str]:
        spec()(tmp)
        return [a.replace("SPEC", str(tmp / "spec.yaml")) for a in args]

    return setup


def repo_grid(command: str, grid: str, *extra: str) -> Setup:
    """`gi-eval COMMAND grids/GRID --out <tmp>/run EXTRA...` (a committed spec of its kind)."""

    def setup(tmp: Path) -> list[str]:
        return [command, str(ROOT / "grids" / grid), "--out", str(tmp / "run"), *extra]

    return setup


def text_file(name: str = "weights.pt") -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        (tmp / name).write_text("this is not a checkpoint\n")
        return tmp / name

    return write


def generators_text_checkpoint(tmp: Path) -> list[str]:
    path = text_file()(tmp)
    return spec(generators=[{"kind": "stylegan2", "checkpoint": str(path)}],
                methods=[{"name": "gi-z", "params": {"z_iterations": 2}}])(tmp)


def convert_text_file(tmp: Path) -> list[str]:
    return ["convert-generator", str(text_file()(tmp)), str(tmp / "out.pt")]


def out_is_file(command: str, under: bool) -> Setup:
    def setup(tmp: Path) -> list[str]:
        args = spec()(tmp)
        (tmp / "afile").write_text("x\n")
        out = tmp / "afile" / "run" if under else tmp / "afile"
        return [command, *args[1:-1], str(out)]

    return setup


def environment(kind: str) -> Setup:
    def setup(tmp: Path) -> list[str]:
        args = spec()(tmp)
        mount = tmp / "mnt"
        mount.mkdir()
        mount_tmpfs(mount, "16k" if kind == "full" else "1m")  # a system call: no process
        if kind == "read-only":
            remount_read_only(mount)
        return [*args[:-1], str(mount / "run")]

    return setup


CASES = [
    # --- the spec file itself
    Case("spec file", "spec file does not exist", lambda t: ["run", str(t / "nope.yaml")], 2,
         "cannot read"),
    Case("spec file", "spec file is not UTF-8 (Latin-1 'é')", raw(b"name: caf\xe9\n"), 2,
         "is not UTF-8 text"),
    Case("spec file", "spec is not valid YAML", raw(b"name: [unclosed\n"), 2,
         "not valid YAML"),
    Case("spec file", "spec is a YAML list, not a mapping", raw(b"- a\n- b\n"), 2,
         "mapping at the top level"),
    # --- top level and data
    Case("spec fields", "unknown top-level key", spec(epochs=3), 2, "epochs"),
    Case("spec fields", "name with a slash", spec(name="a/b"), 2, "name"),
    Case("spec fields", "data section missing", spec(data=None), 2, "data"),
    Case("spec fields", "image folder with a float TIFF outside 0..1", float_tiff_folder(), 2,
         "is a float image with values"),
    Case("spec fields", "unknown data set", nested("data", dataset="mnist"), 2,
         "unknown data set"),
    Case("spec fields", "image_size below 32 (LPIPS)", nested("data", image_size=16), 2,
         "data.image_size"),
    Case("spec fields", "num_batches 0", nested("data", num_batches=0), 2, "data.num_batches"),
    Case("spec fields", "more batches than the data set holds",
         spec(data={**BASE["data"], "num_batches": 60}, batch_sizes=[8]), 2, "supplies only"),
    Case("spec fields", "batch size 0", spec(batch_sizes=[0]), 2, "batch_sizes"),
    Case("spec fields", "data.colour: sepia", nested("data", colour="sepia"), 2, "data.colour"),
    Case("spec fields", "budgets.iterations_scale 0", spec(budgets={"iterations_scale": 0}), 2,
         "iterations_scale"),
    Case("spec fields", "tune: the evaluation attacks every sample at some batch size",
         tune_spec(data={**BASE["data"], "num_batches": 25}, batch_sizes=[1, 4]), 2,
         "tuning.batches: no 2 consecutive batches of 1"),
    Case("spec fields", "budgets.match without a value", spec(budgets={"match": "grad_evals"}),
         2, "match and value go together"),
    Case("spec fields", "budgets.match of an unknown kind",
         spec(budgets={"match": "flops", "value": 10}), 2, "budgets.match"),
    Case("spec fields", "baseline that is none of the grid's methods", spec(baseline="gi-z"), 2,
         "baseline"),
    # --- victim, generator, methods
    Case("victim / generator", "unknown victim architecture", nested("victim", arch="vgg"), 2,
         "victim"),
    Case("victim / generator", "victim width 0", nested("victim", width=0), 2, "width"),
    Case("victim / generator", "trained victim: a negative number of rounds",
         nested("victim", train={"rounds": [0, -4]}), 2, "victim.train.rounds: must be >= 0"),
    Case("victim / generator", "trained victim: more clients than the data set holds",
         nested("victim", train={"rounds": [4], "clients": 20, "batch_size": 8}), 2,
         "victim.train: 20 clients x 1 local steps need 20 disjoint batches of 8"),
    Case("victim / generator", "trained victim: the grid attacks its training samples",
         spec(data={**BASE["data"], "num_batches": 90},
              victim={**BASE["victim"], "train": {"rounds": [4]}}), 2,
         "of its 32 training samples (the last 4 batches of 8 of the plan) are attacked"),
    Case("victim / generator", "unknown generator kind",
         spec(generator={"kind": "biggan"}, methods=["gi-z"]), 2, "generator"),
    Case("victim / generator", "gi-z without a generator", spec(methods=["gi-z"]), 2,
         "generator: required by gi-z"),
    Case("victim / generator", "gifd on a StyleGAN2 prior (no feature domain)",
         spec(generator={"kind": "stylegan2", "stylegan2": {
             "resolution": 32, "channels": [8, 8, 8, 8], "z_dim": 8, "w_dim": 8}},
             methods=["gifd"]), 2, "generator.kind: gifd searches a DCGAN-kind prior"),
    Case("methods", "no methods", spec(methods=[]), 2, "methods: must list at least 1"),
    Case("methods", "unknown method", spec(methods=["gi-q"]), 2, "unknown method 'gi-q'"),
    Case("methods", "unknown method parameter", method(epochs=3), 2,
         "params.epochs: not a parameter of gi-x"),
    Case("methods", "iterations: \"twenty\"", method(iterations="twenty"), 2,
         "params.iterations: must be an integer (got 'twenty')"),
    Case("methods", "restarts: 0", method(restarts=0), 2, "params.restarts"),
    Case("methods", "tv: a string", method(tv="high"), 2, "params.tv: must be a number"),
    Case("methods", "unknown distance", method(distance="l7"), 2, "params.distance"),
    Case("methods", "`gi-eval methods` of an unknown name", lambda t: ["methods", "gi-q"], 2,
         "method: unknown 'gi-q'"),
    Case("methods", "tuning space with low > high",
         spec(tuning={"space": {"gi-x": {"lr": [0.5, 0.01]}}}), 2,
         "tuning.space: gi-x.lr: low 0.5 is above high 0.01"),
    Case("methods", "idlg labels with batch size 2",
         spec(methods=[{"name": "gi-x", "params": {"labels": "idlg"}}], batch_sizes=[2]), 2,
         "idlg"),
    Case("methods", "rgap on a victim not of R-GAP's form (BatchNorm)",
         spec(methods=["rgap"]), 2, "victim.arch: rgap needs a chain of Linear/Conv2d layers"),
    Case("methods", "rgap with batch size 2",
         spec(methods=["rgap"], victim={"arch": "rgapnet", "width": 4}, batch_sizes=[2]), 2,
         "batch_sizes: rgap (methods[0]) inverts the gradient of one image"),
    # --- defenses
    Case("defenses", "unknown defense kind", spec(defenses=[{"kind": "blur"}]), 2, "defenses"),
    Case("defenses", "sparsity p = 1.2", spec(defenses=[{"kind": "sparsity", "p": 1.2}]), 2,
         "must be in [0, 1)"),
    Case("defenses", "sparsity without p", spec(defenses=[{"kind": "sparsity"}]), 2,
         "sparsity needs 'p'"),
    Case("defenses", "none with a level", spec(defenses=[{"kind": "none", "p": 0.5}]), 2,
         "none does not take 'p'"),
    Case("defenses", "negative noise sigma", spec(defenses=[{"kind": "noise", "sigma": -1}]),
         2, "finite number >= 0"),
    Case("defenses", "DP clip 0", spec(defenses=[{"kind": "dp", "clip": 0, "sigma": 1}]), 2,
         "clip"),
    Case("defenses", "quantize to 64 bits", spec(defenses=[{"kind": "quantize", "bits": 64}]),
         2, "must be in 1..32"),
    # --- execution and Slurm
    Case("execution", "unknown executor in the spec", nested("execution", executor="cloud"),
         2, "execution.executor"),
    Case("execution", "cells_per_job 0", nested("execution", cells_per_job=0), 2,
         "cells_per_job"),
    Case("execution", "unknown Slurm option", slurm(nodes=2), 2, "execution.slurm.nodes"),
    Case("execution", "Slurm gres with a space", slurm(gres="gpu 1"), 2,
         "execution.slurm.gres"),
    Case("execution", "Slurm gres not name[:type]:count", slurm(gres="gpu::1"), 2,
         "name[:type]:count"),
    Case("execution", "Slurm cpus_per_task 0", slurm(cpus_per_task=0), 2, "cpus_per_task"),
    Case("execution", "Slurm signal_delay_s 5", slurm(signal_delay_s=5), 2, "signal_delay_s"),
    Case("execution", "--executor cloud", cli_args("run", "SPEC", "--executor", "cloud"), 2,
         "executor: unknown 'cloud'"),
    Case("execution", "resources for a method the grid does not run",
         slurm(methods={"gias": {"mem_gb": 4}}), 2, "execution.slurm.methods.gias: no method"),
    Case("execution", "unknown field of a per-method resource override",
         slurm(methods={"gi-x": {"memory": 4}}), 2, "execution.slurm.methods.gi-x.memory"),
    Case("execution", "gres naming GPUs and gpu_type", slurm(gres="gpu:a100:1", gpu_type="a100"),
         2, "execution.slurm: gres names GPUs and gpu_type"),
    Case("execution", "--detach with the local executor",
         cli_args("run", "SPEC", "--detach", "--executor", "local"), 2,
         "--detach hands the grid to Slurm"),
    Case("execution", "plan --executor slurmm", cli_args("plan", "SPEC", "--executor", "slurmm"),
         2, "executor: unknown 'slurmm'"),
    Case("execution", "tune --executor slurmm", cli_args("tune", "SPEC", "--executor", "slurmm"),
         2, "executor: unknown 'slurmm'"),
    Case("execution", "giml --executor slurmm",
         repo_grid("giml", "giml_faces_cpu.yaml", "--executor", "slurmm"), 2,
         "executor: unknown 'slurmm'"),
    Case("execution", "multigrad --executor slurmm",
         repo_grid("multigrad", "multigrad_cpu.yaml", "--executor", "slurmm"), 2,
         "executor: unknown 'slurmm'"),
    Case("execution", "GI_PROGRESS_EVERY_S not a positive number", spec(), 2,
         "GI_PROGRESS_EVERY_S: must be a positive number", env={"GI_PROGRESS_EVERY_S": "0"}),
    # --- checkpoints (loaded before anything is submitted)
    Case("checkpoints", "victim checkpoint does not exist",
         nested("victim", checkpoint="/nonexistent/w.pt"), 2, "no such file"),
    Case("checkpoints", "victim checkpoint is a text file", checkpoint("victim", "text"), 2,
         "victim.checkpoint:"),
    Case("checkpoints", "victim checkpoint of another width", checkpoint("victim", "wide"), 2,
         "size mismatch"),
    Case("checkpoints", "generator checkpoint is a text file", checkpoint("generator", "text"),
         2, "generator.checkpoint:"),
    Case("checkpoints", "a `generators:` entry's checkpoint is a text file",
         generators_text_checkpoint, 2, "is a text file, not a PyTorch checkpoint"),
    Case("checkpoints", "convert-generator of a text file", convert_text_file, 2,
         "SRC: <tmp>/weights.pt is a text file, not a PyTorch checkpoint"),
    # --- run directories
    Case("run directory", "--out holds another grid's run", run_dir("run", "other-grid"), 2,
         "holds the run of grid 'other'"),
    Case("run directory", "status of a run whose grid.yaml is damaged",
         run_dir("status", "bad-spec"), 2, "damaged frozen spec"),
    Case("run directory", "run --out is a file", out_is_file("run", under=False), 2,
         "is a file, not a directory"),
    Case("run directory", "run --out lies under a file", out_is_file("run", under=True), 2,
         "which is a file"),
    Case("run directory", "tune --out lies under a file", out_is_file("tune", under=True), 2,
         "which is a file"),
    Case("run directory", "status of a directory that is no run", run_dir("status"), 2,
         "is not a run directory"),
    Case("run directory", "tables of a directory that is no run", run_dir("tables"), 2,
         "is not a run directory"),
    Case("run directory", "verify of a directory that is no run", run_dir("verify"), 2,
         "is not a run directory"),
    Case("run directory", "cancel of a directory that is no run", run_dir("cancel"), 2,
         "is not a run directory"),
    # --- environment (exit 3)
    Case("environment", "run directory on a read-only filesystem", environment("read-only"), 3,
         "choose a writable run directory", needs_root=True),
    Case("environment", "too little free space for the cells to do", environment("full"), 3,
         "free space or choose another run directory", needs_root=True),
    Case("environment", "--executor slurm without sbatch on PATH",
         cli_args("run", "SPEC", "--executor", "slurm"), 3, "sbatch and srun not found on PATH",
         env={"PATH": "/nonexistent"}),
]


def _id(case: Case) -> str:
    return re.sub(r"[^a-z0-9]+", "-", case.what.lower()).strip("-")


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_case(case: Case, tmp: Path) -> tuple[int, str]:
    if case.needs_root and os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (CI runs as root)")
    args = case.setup(tmp)
    try:
        with _cwd(tmp):
            result = CliRunner().invoke(app, args, env=case.env)
    finally:
        mount = tmp / "mnt"
        if mount.is_dir():
            unmount(mount)
    message = result.stderr.replace(str(tmp), "<tmp>").strip()
    return result.exit_code, message


RESULTS: dict[str, tuple[int, str]] = {}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_error_case(case: Case, tmp_path: Path) -> None:
    code, message = run_case(case, tmp_path)
    RESULTS[_id(case)] = (code, message)
    assert code == case.code, message
    assert message.startswith("error: ") and "Traceback" not in message, message
    assert case.expect in " ".join(message.split()), message


def render(results: dict[str, tuple[int, str]]) -> str:
    lines = [
        "# Errors: every bad input, its message and its exit code",
        "",
        "Generated by `tests/unit/test_errors_doc.py` from the cases it runs (regenerate with",
        "`GI_WRITE_ERRORS_DOC=1 .venv/bin/python -m pytest tests/unit/test_errors_doc.py`).",
        "",
        "`gi-eval` ends every failure with one `error:` line (a spec error lists each further",
        "bad field on an indented line below it) and one of these exit codes:",
        "",
        "| code | meaning |",
        "|---|---|",
        "| 2 | the input is wrong (spec, argument, checkpoint, run directory): nothing was "
        "submitted; fix what the message names |",
        "| 3 | the machine is (read-only or full disk, a run another `gi-eval run` drives): "
        "fix the environment or choose another `--out` |",
        "| 1 | anything else, including bugs: `gi-eval --debug ...` prints the traceback; also "
        "`gi-eval verify --recompute` when a recomputed cell differs from the stored one (no "
        "`error:` line: the output names the cell; docs/reproducibility.md) |",
        "",
        "Before `gi-eval run` submits anything it also checks that every checkpoint loads into "
        "its architecture, that the run directory is writable and that its filesystem has room "
        "for the cells to do. Unreadable stored cells are not errors: `gi-eval verify` (and "
        "every `gi-eval run`) moves them to `quarantine/` and the run recomputes them; readers "
        "skip them with a warning naming the file.",
        "",
        f"{len(CASES)} cases; `<tmp>` is the test's temporary directory.",
        "",
    ]
    group = None
    for case in CASES:
        if case.group != group:
            group = case.group
            lines += [f"## {group}", "", "| bad input | exit | message |", "|---|---|---|"]
        code, message = results[_id(case)]
        text = " ".join(message.split()).replace("|", "\\|")
        lines.append(f"| {case.what} | {code} | `{text}` |" if "`" not in text
                     else f"| {case.what} | {code} | {text} |")
        if case is CASES[-1] or CASES[CASES.index(case) + 1].group != group:
            lines.append("")
    return "\n".join(lines)


def test_errors_md_is_current(tmp_path_factory: pytest.TempPathFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip("the environment cases need root (CI runs as root)")
    results = dict(RESULTS)
    for case in CASES:
        if _id(case) not in results:
            results[_id(case)] = run_case(case, tmp_path_factory.mktemp(_id(case)[:30]))
    text = render(results)
    assert len(CASES) >= 40
    if os.environ.get("GI_WRITE_ERRORS_DOC") == "1":
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, (
        "docs/errors.md is stale: regenerate it with GI_WRITE_ERRORS_DOC=1 "
        f"{sys.executable} -m pytest tests/unit/test_errors_doc.py"
    )
