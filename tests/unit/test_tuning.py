"""The tuning protocol's pieces (issue 16 Deliver 4, issue 20 Deliver 4), without running trials:
held-out by sample, symmetric search spaces and recipes, per-budget studies, provenance."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gi_core.attacks.registry import METHOD_NAMES, RGAP_METHODS, config_class, method_config
from gi_core.datasets import batch_indices
from gi_core.errors import ConfigError
from pipelines.tune import (
    SPLIT,
    Study,
    _entry_studies,
    budget_of,
    convergence,
    default_space,
    entry_params,
    grid_studies,
    held_out_statement,
    published_recipe,
    reuse_notes,
)
from tasks.cells import expand
from tasks.spec import MethodSpec, evaluation_samples, parse_spec, tuning_batches

ROOT = Path(__file__).resolve().parents[2]
BASE: dict[str, Any] = {
    "name": "t",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 25},
    "victim": {"arch": "convnet", "width": 4},
    "methods": ["gi-x"],
    "batch_sizes": [1, 4],
}


def _spec(**over: Any) -> Any:
    return parse_spec({**BASE, **over})


# The Table 1 grid as it was before issue 16 (paper/tuned pairs, GI-x at 1x, 2x, 4x its budget,
# `preset: tuned` values reused from the registry): the shape these tests need.
OLD_TABLE1 = """\
name: table1-cpu
data: {dataset: lfw-faces, image_size: 32, num_batches: 8}
victim: {arch: convnet, width: 16, seed: 0}
generator: {kind: digiface}
methods:
  - {name: gi-x, preset: paper, params: {iterations: 400, restarts: 1}}
  - {name: gi-x, preset: tuned, params: {iterations: 400, restarts: 1}}
  - {name: gi-x, preset: tuned, params: {iterations: 800, restarts: 1}, label: tuned 2x iterations}
  - {name: gi-x, preset: tuned, params: {iterations: 1600, restarts: 1}, label: tuned 4x iterations}
  - {name: gi-x+bn, preset: paper, params: {iterations: 400, restarts: 1}}
  - {name: gi-x+bn, preset: tuned, params: {iterations: 400, restarts: 1}}
  - {name: gi-z/w, preset: paper, params: {z_iterations: 100, w_iterations: 100, restarts: 1}}
  - {name: gi-z/w, preset: tuned, params: {z_iterations: 100, w_iterations: 100, restarts: 1}}
  - {name: gi-z/w+bn, preset: paper, params: {z_iterations: 100, w_iterations: 100, restarts: 1}}
  - {name: gi-z/w+bn, preset: tuned, params: {z_iterations: 100, w_iterations: 100, restarts: 1}}
defenses:
  - {kind: none}
batch_sizes: [4]
seeds: [0]
tuning: {batches: 2, trials: 8, methods: [gi-x, gi-z/w]}
execution:
  executor: local
  cells_per_job: 4
  max_parallel: 2
  slurm: {cpus_per_task: 1, gpus_per_task: 0, mem_gb: 2, timeout_min: 60, array_parallelism: 2}
"""


def test_held_out_batches_share_no_sample_with_any_batch_size() -> None:
    with pytest.raises(ConfigError, match=r"^tuning\.batches: .*\(100 samples"):
        tuning_batches(_spec(), 1)  # 25 batches of 4 attack every face
    for seed in (None, 0, 1, 2):
        spec = _spec(data={**BASE["data"], "num_batches": 20, "shuffle_seed": seed})
        for b in spec.batch_sizes[:1]:  # tune attacks the grid's first batch size
            held_out = tuning_batches(spec, b)
            samples = {
                i
                for k in held_out
                for i in batch_indices(
                    "lfw-faces", batch_size=b, batch_index=k, image_size=32, shuffle_seed=seed
                )
            }
            assert len(held_out) == 2 and not samples & evaluation_samples(spec)
            assert "disjoint by sample index" in held_out_statement(spec, b, held_out)


def test_the_header_says_not_held_out_when_samples_overlap() -> None:
    spec = _spec()
    statement = held_out_statement(spec, 1, range(98, 100))  # the old rule's choice
    assert statement.startswith("WARNING: NOT held out: 2 of its 2 samples")


def test_every_method_searches_every_option_that_applies_to_it() -> None:
    for name in RGAP_METHODS:  # closed form: refused, never silently untuned
        with pytest.raises(ConfigError, match="nothing to tune"):
            default_space(name)
    for name in (m for m in METHOD_NAMES if m not in RGAP_METHODS):
        space = default_space(name)
        fields = {f.name for f in dataclasses.fields(config_class(name))}
        assert {"tv", "tv_form"} <= set(space), name
        # every Adam stage may take signed steps; GGL (CMA-ES, decision 251) takes no Adam step
        assert ("signed_grad" in space) == (name != "ggl"), name
        lrs = {f for f in fields if f == "lr" or f.endswith("_lr")}
        assert lrs <= set(space), name  # every stage's learning rate
        assert ("bn" in space) == name.endswith("+bn"), name
        second = {"w_iterations", "x_iterations", "f_iterations"}
        two_stage = "z_iterations" in fields and bool(second & fields)
        assert (SPLIT in space) == two_stage, name
        assert set(space) - {SPLIT} <= fields, name


def test_every_study_starts_from_its_published_recipe() -> None:
    for name in (m for m in METHOD_NAMES if m not in RGAP_METHODS):
        recipe = published_recipe(Study(name, MethodSpec(name=name), {}))
        assert set(default_space(name)) <= set(recipe), name
        if name.startswith("gi-x"):  # the peers' default: inversefed's signed Adam, TV 0.2
            assert recipe["signed_grad"] and recipe["tv"] == 0.2 and recipe["lr"] == 0.1
        else:  # the paper's appendix values
            paper = dataclasses.asdict(method_config(name))
            assert all(recipe[k] == paper[k] for k in default_space(name) if k != SPLIT), name
            if SPLIT in recipe:  # GIAS: 4000 + 4000; GIFD's official configs: 1000 + 4 × 1000
                assert recipe[SPLIT] == (0.2 if name == "gifd" else 0.5), name


def test_the_stage_split_moves_budget_and_never_adds_it() -> None:
    entry = MethodSpec(name="gi-z/w", params={"z_iterations": 100, "w_iterations": 100, "tv": 1})
    params = entry_params(entry, {SPLIT: 0.23, "w_lr": 1e-3})
    assert params["z_iterations"] == 46 and params["w_iterations"] == 154
    assert params["w_lr"] == 1e-3 and params["tv"] == 1
    extreme = entry_params(entry, {SPLIT: 0.999})
    assert extreme["z_iterations"] + extreme["w_iterations"] == 200 and extreme["w_iterations"] >= 1


def test_each_budget_is_its_own_study_and_paper_entries_keep_paper_values() -> None:
    table1 = parse_spec(yaml.safe_load(OLD_TABLE1))
    studies = {s.key: s for s in grid_studies(table1)}
    assert list(studies) == [
        "gi-x @ iterations=400, restarts=1",
        "gi-x @ iterations=800, restarts=1",
        "gi-x @ iterations=1600, restarts=1",
        "gi-z/w @ z_iterations=100, w_iterations=100, restarts=1",
    ]  # tuning.methods: [gi-x, gi-z/w]
    chosen = _entry_studies(table1, studies)
    presets = {i: table1.methods[i].preset for i in chosen}
    assert set(presets.values()) == {"tuned"}  # the paper entries are left as the paper's
    assert budget_of(table1.methods[max(chosen)]) == {
        "z_iterations": 100,
        "w_iterations": 100,
        "restarts": 1,
    }


def test_convergence_verdict_reads_the_best_so_far() -> None:
    assert convergence([1, 3, 2, 2, 2, 2], maximise=True) == (1, "flat for the last 4 of 6 trials")
    last, verdict = convergence([1, 2, 3, 4], maximise=True)
    assert last == 3 and verdict.startswith("still improving")
    assert convergence([0.5, 0.2, 0.3, 0.4], maximise=False)[0] == 1
    assert convergence([float("nan"), 1.0, 0.5, 0.4], maximise=True)[0] == 1


def _differs(spec: Any) -> dict[str, list[str]]:
    out = {}
    for c in expand(spec).inversion_cells:
        if c.config.tuned_on:
            out[f"{c.method} {c.variant}"] = json.loads(c.config.tuned_on)["differs"]
    return out


def test_reused_tuned_values_are_marked_in_every_row_with_what_differs() -> None:
    table1 = yaml.safe_load(OLD_TABLE1)
    differs = _differs(parse_spec(table1))
    # tuned on the same grid, but before the colour model: LFW is gray now
    assert differs["gi-x tuned iterations=400"] == ["colour"]
    assert differs["gi-x tuned 2x iterations"] == ["colour", "budget"]
    assert differs["gi-x+bn tuned"] == ["colour", "method"]  # inherited from gi-x
    rows = [c.metric_axes() for c in expand(parse_spec(table1)).inversion_cells]
    tuned_rows = [r for r in rows if r["preset"] == "tuned"]
    assert tuned_rows and all(json.loads(r["param_tuned_on"])["differs"] for r in tuned_rows)
    assert all(r["param_tuned_on"] == "" for r in rows if r["preset"] == "paper")
    # a grid on other data, victim and budget: every difference is named
    other = {
        **BASE,
        "data": {"dataset": "synthetic", "image_size": 32, "num_batches": 1},
        "methods": [{"name": "gi-x", "preset": "tuned", "params": {"iterations": 10}}],
        "batch_sizes": [1],
    }
    assert _differs(parse_spec(other)) == {"gi-x tuned": ["dataset", "victims", "budget"]}


def test_a_hand_written_tuned_on_is_refused_naming_the_field() -> None:
    spec = parse_spec({**BASE, "methods": [{"name": "gi-x", "params": {"tuned_on": "mine"}}]})
    with pytest.raises(ConfigError, match=r"^params\.tuned_on: gi-x has 'mine'"):
        expand(spec)


def test_a_grid_that_tunes_itself_is_refused_at_validation_without_held_out_samples() -> None:
    parse_spec(BASE)  # evaluation only: every sample may be evaluated
    with pytest.raises(ConfigError, match=r"tuning\.batches: no 2 consecutive batches"):
        parse_spec({**BASE, "tuning": {"stage": True}})
    assert "stage" not in parse_spec(BASE).canonical_json()  # the default hashes as before


def test_gi_eval_run_names_every_entry_whose_values_were_tuned_elsewhere() -> None:
    table1 = parse_spec(yaml.safe_load(OLD_TABLE1))
    notes = reuse_notes(table1)
    assert len(notes) == 6  # the six `preset: tuned` entries; paper entries are not notes
    assert notes[0] == (
        "gi-x [tuned iterations=400]: values tuned on grid 'table1-cpu', not this one; "
        "differs here: colour"
    )
    assert reuse_notes(parse_spec(BASE)) == []
