"""Issue 19 Deliver 4 (decision 270): victims trained by FedAvg for r rounds, as a grid axis.

Real components throughout: the spec parser, the batch plan of a shipped data set, gi_core's
FedAvg on a tiny convnet, the run directory's storage, the job bodies' victim cache.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from gi_core.datasets import load_images
from gi_core.errors import ConfigError
from gi_core.fedavg import LocalTraining
from gi_core.fl import ClientBatch, FedAvgTraining, train_fedavg, training_loss
from gi_core.victims import build_victim, victim_state, weights_sha256
from storage.errors import StorageError
from storage.layout import RunLayout
from storage.victims import read_trained_victim, stored_rounds
from tasks.cells import GradientCell, expand
from tasks.errors import ExecutionError
from tasks.spec import (
    evaluation_samples,
    parse_spec,
    training_clients,
    training_samples,
    tuning_samples,
)
from tasks.work import trained_state, victim_for, victim_sha256_for
from tasks.work.training import train_stage

CPU = torch.device("cpu")
TRAIN = {"clients": 2, "batch_size": 4, "local_steps": 2, "lr": 0.1, "seed": 0}


def grid(rounds: list[int] | None, **over: Any) -> dict[str, Any]:
    victim: dict[str, Any] = {"arch": "convnet", "width": 4, "seed": 0}
    if rounds is not None:
        victim["train"] = {**TRAIN, "rounds": rounds}
    spec = {
        "name": "trained",
        "data": {"dataset": "synthetic", "image_size": 32, "num_batches": 2},
        "victim": victim,
        "methods": [{"name": "gi-x", "params": {"iterations": 2, "restarts": 1}}],
        "batch_sizes": [1, 2],
    }
    return {**spec, **over}


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_spec(data)
    return [line.strip() for line in str(info.value).splitlines()[1:]]


def stage_cells(rounds: list[int]) -> dict[int, GradientCell]:
    """The first gradient cell of each training stage."""
    cells: dict[int, GradientCell] = {}
    for g in expand(parse_spec(grid(rounds))).gradient_cells:
        cells.setdefault(g.victim.rounds, g)
    return cells


def _clients(n: int = 2, size: int = 6) -> list[ClientBatch]:
    out = []
    for c in range(n):
        images, labels = load_images("synthetic", range(c * size, (c + 1) * size), image_size=16)
        out.append(ClientBatch(images, labels))
    return out


def _victim() -> torch.nn.Module:
    return build_victim("convnet", num_classes=10, image_size=16, width=4, seed=0)


# --- gi_core: FedAvg training ----------------------------------------------------------------


def test_training_changes_the_weights_and_lowers_the_training_loss() -> None:
    victim, clients = _victim(), _clients()
    config = FedAvgTraining(8, LocalTraining(2, 3, 0.1), seed=0)
    trained = train_fedavg(victim, clients, config)
    before, after = victim_state(victim), victim_state(trained)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.endswith("weight") for k in moved)
    assert training_loss(trained, clients) < training_loss(victim, clients) - 0.05
    # the caller's victim is not modified
    assert weights_sha256(victim_state(victim)) == weights_sha256(before)


def test_round_zero_is_the_untrained_victim() -> None:
    victim = _victim()
    trained = train_fedavg(victim, _clients(), FedAvgTraining(0, LocalTraining(1, 3, 0.1)))
    assert weights_sha256(victim_state(trained)) == weights_sha256(victim_state(victim))


def test_one_round_is_the_mean_of_the_clients_sgd_updates() -> None:
    # FedAvg (McMahan et al. 2017, Alg. 1): θ_1 = θ_0 − mean_i (θ_0 − θ_i), θ_i after each
    # client's local SGD; each client's steps checked against a plain torch.optim.SGD loop.
    victim, clients = _victim(), _clients(size=4)
    config = FedAvgTraining(1, LocalTraining(2, 2, 0.05), seed=3)
    trained = train_fedavg(victim, clients, config)
    locals_ = []
    for i, c in enumerate(clients):
        seed = (3 * 1_000_003 + 0) * 2 + i
        order = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
        model = copy.deepcopy(victim).train()
        torch.func.replace_all_batch_norm_modules_(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(2):
            part = order[step * 2 : (step + 1) * 2]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(c.images[part]), c.labels[part]).backward()
            opt.step()
        locals_.append([p.detach() for p in model.parameters()])
    for k, p in enumerate(trained.parameters()):
        expected = torch.stack([theta[k] for theta in locals_]).mean(0)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_resuming_from_a_stored_round_gives_the_weights_of_one_training() -> None:
    victim, clients = _victim(), _clients()
    local = LocalTraining(1, 3, 0.1)
    straight = train_fedavg(victim, clients, FedAvgTraining(4, local, seed=1))
    half = train_fedavg(victim, clients, FedAvgTraining(2, local, seed=1))
    resumed = train_fedavg(half, clients, FedAvgTraining(4, local, seed=1), start_round=2)
    assert weights_sha256(victim_state(resumed)) == weights_sha256(victim_state(straight))
    other_seed = train_fedavg(victim, clients, FedAvgTraining(4, local, seed=2))
    assert weights_sha256(victim_state(other_seed)) != weights_sha256(victim_state(straight))


# --- the spec: the rounds axis, validation, disjoint training data ----------------------------


def test_round_zero_keeps_the_cells_of_a_grid_without_training() -> None:
    plain = expand(parse_spec(grid(None)))
    trained = expand(parse_spec(grid([0, 2, 4])))
    ids = [c.id for c in plain.inversion_cells]
    by_round: dict[int, list[str]] = {}
    for c in trained.inversion_cells:
        by_round.setdefault(c.gradient.victim.rounds, []).append(c.id)
    assert by_round[0] == ids  # the very cells (and so run dirs and pages) of today's grid
    assert sorted(by_round) == [0, 2, 4]
    assert len({i for v in by_round.values() for i in v}) == 3 * len(ids)
    rows = {c.gradient.victim.rounds: c.metric_axes() for c in trained.inversion_cells}
    assert rows[0]["victim_rounds"] == 0 and rows[0]["victim_training"] == "none"
    assert rows[4]["victim_rounds"] == 4
    assert json.loads(rows[4]["victim_training"]) == TRAIN
    assert rows[2]["config_id"] != rows[4]["config_id"] != rows[0]["config_id"]


@pytest.mark.parametrize(
    ("train", "field", "message"),
    [
        ({"rounds": [-1]}, "victim.train.rounds", "must be >= 0"),
        ({"rounds": [2, 4, 2]}, "victim.train.rounds", "2 is listed twice"),
        ({"rounds": []}, "victim.train.rounds", "must list at least 1"),
        ({"rounds": [2], "lr": 0}, "victim.train.lr", "greater than 0"),
        ({"rounds": [2], "clients": 0}, "victim.train.clients", "greater than or equal to 1"),
        ({"rounds": [2], "epochs": 3}, "victim.train.epochs", "Extra inputs"),
        ({"clients": 2}, "victim.train.rounds", "Field required"),
    ],
)
def test_bad_training_fields_are_named(train: dict[str, Any], field: str, message: str) -> None:
    spec = grid(None)
    spec["victim"]["train"] = train
    lines = errors_of(spec)
    assert any(line.startswith(f"{field}:") and message in line for line in lines), lines


def test_training_samples_are_disjoint_from_every_attacked_and_held_out_sample() -> None:
    spec = parse_spec(grid([0, 3], tuning={"batches": 2}))
    d, train = spec.data, spec.victim_axis[0].train
    assert train is not None
    clients = training_clients(d.dataset, image_size=32, shuffle_seed=None, train=train)
    assert [len(c) for c in clients] == [8, 8]  # local_steps x batch_size images each
    flat = [i for c in clients for i in c]
    assert len(set(flat)) == len(flat) == 16
    assert training_samples(spec) == frozenset(flat)
    assert training_samples(spec).isdisjoint(evaluation_samples(spec))
    # the data's cells: every gradient cell's indices avoid them
    assert all(set(g.indices).isdisjoint(flat) for g in expand(spec).gradient_cells)
    # `gi-eval tune`'s held-out batches avoid them too (they sit at the end of the plan)
    from tasks.spec import tuning_batches

    held_out = tuning_batches(spec, 1)
    assert tuning_samples(spec, 1, held_out).isdisjoint(flat)
    # ... whereas without training the tuning takes the very last batches
    plain = parse_spec(grid(None, tuning={"batches": 2}))
    assert not tuning_samples(plain, 1, tuning_batches(plain, 1)).isdisjoint(flat)


def test_training_samples_depend_on_the_data_and_the_training_only() -> None:
    small, large = (parse_spec(grid([2], data={"dataset": "synthetic", "num_batches": n}))
                    for n in (1, 4))  # fmt: skip
    assert training_samples(small) == training_samples(large)


def test_a_grid_that_attacks_training_samples_is_refused() -> None:
    spec = grid([2], data={"dataset": "synthetic", "image_size": 32, "num_batches": 50},
                batch_sizes=[1])
    lines = errors_of(spec)
    assert any(
        line.startswith("victim.train:") and "are attacked by the grid" in line for line in lines
    ), lines


def test_a_data_set_too_small_for_the_training_is_refused() -> None:
    spec = grid(None)
    spec["victim"]["train"] = {"rounds": [1], "clients": 20, "batch_size": 8}
    lines = errors_of(spec)
    assert any(
        line.startswith("victim.train:") and "need 20 disjoint batches of 8" in line
        for line in lines
    ), lines


def test_the_list_form_names_its_entry() -> None:
    spec = grid(None)
    trained = {**spec["victim"], "train": {"rounds": [1], "clients": 20, "batch_size": 8}}
    spec = {**spec, "victim": None, "victims": [spec["victim"], trained]}
    spec = {k: v for k, v in spec.items() if v is not None}
    assert any(line.startswith("victims[1].train:") for line in errors_of(spec))


def test_giml_and_multigrad_specs_refuse_training() -> None:
    # they build their victims themselves: a `train` there would be silently ignored
    from tasks.giml_spec import GIMLSpec
    from tasks.multigrad import MultiGradSpec

    root = Path(__file__).resolve().parents[2] / "grids"
    for name, model in (("giml_faces_cpu.yaml", GIMLSpec), ("multigrad_cpu.yaml", MultiGradSpec)):
        body = yaml.safe_load((root / name).read_text())
        model.model_validate(body)  # as shipped: valid
        body["victim"] = {**body["victim"], "train": {"rounds": [2]}}
        with pytest.raises(ValueError, match="train: FedAvg-trained victims are a grid option"):
            model.model_validate(body)


# --- the stage: trained once per run, stored with its hash, reused ----------------------------


def test_a_trained_victim_is_stored_with_its_hash_and_reused(tmp_path: Path) -> None:
    cell = stage_cells([0, 3])[3]
    run = RunLayout(tmp_path / "run")
    state, sha = trained_state(run, cell.victim_stage, dev=CPU)
    path = run.trained_victim_path(cell.victim_stage.lineage_id, 3)
    assert path.is_file()
    assert weights_sha256(torch.load(path, weights_only=True)) == sha
    record = json.loads(run.trained_victim_record(cell.victim_stage.lineage_id, 3).read_text())
    assert record["sha256"] == sha and record["rounds"] == 3
    assert sorted(i for c in record["clients"] for i in c) == sorted(
        training_samples(parse_spec(grid([0, 3])))
    )
    # a second call reads the stored weights: the file is not written again
    stamp = path.stat().st_mtime_ns
    assert trained_state(run, cell.victim_stage, dev=CPU)[1] == sha
    assert path.stat().st_mtime_ns == stamp
    # the job bodies' victim is those weights (for every cell of the stage)
    assert victim_sha256_for(cell, run) == sha
    assert weights_sha256(victim_state(victim_for(cell, run))) == sha
    untrained = stage_cells([0, 3])[0]
    assert victim_sha256_for(untrained) != sha
    assert weights_sha256(state) == sha


def test_the_same_spec_trains_the_same_weights_in_another_run(tmp_path: Path) -> None:
    stage = stage_cells([2])[2].victim_stage
    first = trained_state(RunLayout(tmp_path / "a"), stage, dev=CPU)[1]
    second = trained_state(RunLayout(tmp_path / "b"), stage, dev=CPU)[1]
    assert first == second
    other = stage_cells([3])[3].victim_stage
    assert trained_state(RunLayout(tmp_path / "c"), other, dev=CPU)[1] != first


def test_a_longer_training_resumes_from_a_stored_round(tmp_path: Path) -> None:
    cells = stage_cells([2, 4])
    run = RunLayout(tmp_path / "run")
    lineage = cells[2].victim_stage.lineage_id
    assert cells[4].victim_stage.lineage_id == lineage  # rounds are not part of the lineage
    trained_state(run, cells[2].victim_stage, dev=CPU)
    resumed = trained_state(run, cells[4].victim_stage, dev=CPU)[1]
    found = read_trained_victim(run, lineage, 4)
    assert found is not None and found[1]["resumed_from_round"] == 2
    assert stored_rounds(run, lineage) == [2, 4]
    # ... to the weights of a training from round 0 (a job killed mid-training reruns alike)
    fresh = RunLayout(tmp_path / "fresh")
    assert train_stage(fresh, cells[4].victim_stage, dev=CPU) == resumed


def test_weights_without_their_record_are_trained_again(tmp_path: Path) -> None:
    # a job killed between publishing the weights and their record (the commit marker), with a
    # crashed writer's temp file beside them: the rerun trains the stage to the same hash
    stage = stage_cells([2])[2].victim_stage
    reference = trained_state(RunLayout(tmp_path / "ref"), stage, dev=CPU)[1]
    run = RunLayout(tmp_path / "run")
    path = run.trained_victim_path(stage.lineage_id, 2)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"torn")
    path.with_name(".round-2.pt.tmp-1-abc").write_bytes(b"half")
    assert stored_rounds(run, stage.lineage_id) == []
    assert trained_state(run, stage, dev=CPU)[1] == reference
    assert weights_sha256(torch.load(path, weights_only=True)) == reference


def test_damaged_weights_are_refused_not_used(tmp_path: Path) -> None:
    stage = stage_cells([2])[2].victim_stage
    run = RunLayout(tmp_path / "run")
    trained_state(run, stage, dev=CPU)
    path = run.trained_victim_path(stage.lineage_id, 2)
    state = torch.load(path, weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1.0
    torch.save(state, path)
    with pytest.raises(StorageError, match="delete both files to train it again"):
        read_trained_victim(run, stage.lineage_id, 2)


def test_round_zero_needs_no_training_and_no_run() -> None:
    cell = stage_cells([0, 2])[0]
    assert cell.victim.train is None
    expected = build_victim("convnet", num_classes=10, image_size=32, width=4, seed=0)
    assert victim_sha256_for(cell) == weights_sha256(victim_state(expected))
    trained = stage_cells([0, 2])[2]
    with pytest.raises(ExecutionError, match="lives in its run directory"):
        victim_for(trained)


# --- tables: one block per training stage ------------------------------------------------------


def test_each_training_stage_is_its_own_table_block() -> None:
    import pandas as pd

    from pipelines import aggregate as ag
    from tasks.spec import TrainSpec

    plan = expand(parse_spec(grid([0, 2, 4])))
    rows = [
        {**c.metric_axes(), "method": c.method, "psnr": 20.0, "ssim": 0.5, "lpips": 0.3,
         "status": "ok"}
        for c in plan.inversion_cells
    ]  # fmt: skip
    df = ag.identify(pd.DataFrame(rows))
    setting = [c for c in ag.default_by(df) if c not in ag.config_columns(df)]
    assert "victim_rounds" in setting
    blocks = df.groupby(setting, dropna=False)[ag.COLUMN].agg(set)
    assert len(blocks) == 3 * 2  # rounds x batch sizes
    # the column label names the attack only: the training is the block's
    assert set(df[ag.COLUMN]) == {"gi-x [paper]"}
    # every training field but rounds is shown by the victim_training block column
    fields = set(TrainSpec.model_fields) - {"rounds"}
    assert {k.rsplit(".", 1)[1] for k, v in ag.SETTING_KEYS.items()
            if v == "victim_training"} == fields  # fmt: skip
