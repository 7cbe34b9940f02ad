"""Planner: submission shape of large grids, chunking by victim/generator, run-dir reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gi_core.errors import ConfigError
from pipelines.planner import inversion_chunks, prepare_run, submission_shape
from tasks.cells import expand
from tasks.spec import parse_spec

LEVELS = [round(0.5 + i * 0.009, 3) for i in range(50)]


def big_spec(per_job: int = 4) -> dict:
    return {
        "name": "big",
        "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 100},
        "victim": {"arch": "convnet"},
        "generator": {"kind": "dcgan32"},
        "methods": ["gi-x", "gi-z/w"],
        "defenses": [{"kind": "sparsity", "p": LEVELS},
                     {"kind": "noise", "sigma": [1e-4 * (i + 1) for i in range(50)]}],
        "seeds": [0, 1, 2, 3, 4],
        "execution": {"executor": "slurm", "cells_per_job": per_job},
    }


def test_a_1e5_cell_grid_needs_at_most_100_sbatch_calls() -> None:
    plan = expand(parse_spec(big_spec()))
    assert len(plan.inversion_cells) == 100_000 and len(plan.gradient_cells) == 10_000
    for per_job in (4, 100):
        cells = submission_shape(len(plan.inversion_cells), per_job=per_job)
        grads = submission_shape(len(plan.gradient_cells), per_job=per_job)
        assert cells.sbatch_calls + grads.sbatch_calls <= 100
        assert cells.elements * per_job >= 100_000
    assert submission_shape(0, per_job=4).sbatch_calls == 0


def test_chunks_group_cells_that_share_victim_and_generator(tmp_path: Path) -> None:
    spec = parse_spec({**big_spec(), "data": {"dataset": "lfw-faces", "num_batches": 3},
                       "defenses": [{"kind": "none"}], "seeds": [0]})
    run = prepare_run(spec, "name: big\n", tmp_path / "run")
    chunks = inversion_chunks(run, expand(spec).inversion_cells, per_job=3, keep_restarts=False)
    assert [len(c.cells) for c in chunks] == [3, 3]
    for chunk in chunks:  # one method (hence one generator or none) per element here
        assert len({c["method"] for c in chunk.cells}) == 1


def test_a_run_dir_of_another_grid_is_refused_an_extended_grid_adopted(tmp_path: Path) -> None:
    data = big_spec()
    run = prepare_run(parse_spec(data), yaml.safe_dump(data), tmp_path / "run")
    other = {**data, "name": "other"}
    with pytest.raises(ConfigError, match="--out"):
        prepare_run(parse_spec(other), yaml.safe_dump(other), tmp_path / "run")
    extended = {**data, "seeds": [0, 1, 2, 3, 4, 5]}
    prepare_run(parse_spec(extended), yaml.safe_dump(extended), tmp_path / "run")
    assert yaml.safe_load(run.spec_text())["seeds"] == [0, 1, 2, 3, 4, 5]
    assert len(list((run.root / "history").glob("grid-*.yaml"))) == 1
