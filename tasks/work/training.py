"""The trained-victim stage (decisions 270, 271): a victim after r FedAvg rounds on its clients'
data (gi_core.fl.train_fedavg), trained once per run and lineage and stored with its sha256
(storage.victims); every gradient and inversion cell of the stage loads the stored weights.

Resumable by round: the stored rounds of one lineage sit side by side, and a training starts
from the largest one below its own (round r depends on θ_r alone, so this gives the weights a
training from round 0 gives). A job killed mid-training stores nothing for that stage; its
rerun trains it again to the same weights. The lineage's lock makes the first job train while
the others wait for its weights (storage.lock.exclusive_lock).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gi_core.datasets import dataset_info, load_images
from gi_core.errors import ConfigError
from gi_core.fl import ClientBatch, train_fedavg, training_loss
from gi_core.victims import victim_state
from storage.layout import RunLayout
from storage.lock import exclusive_lock
from storage.victims import read_trained_victim, stored_rounds, write_trained_victim
from tasks.cells import VictimStage
from tasks.models import victim_model
from tasks.spec import training_clients


def trained_state(
    run: RunLayout, stage: VictimStage, *, dev: torch.device
) -> tuple[dict[str, Tensor], str]:
    """The stored weights (CPU state_dict) of `stage` and their sha256; trained on `dev` and
    stored first when the run has none."""
    found = read_trained_victim(run, stage.lineage_id, stage.rounds)
    if found is None:
        with exclusive_lock(run.victim_lock(stage.lineage_id)):
            found = read_trained_victim(run, stage.lineage_id, stage.rounds)
            if found is None:
                train_stage(run, stage, dev=dev)
                found = read_trained_victim(run, stage.lineage_id, stage.rounds)
    if found is None:  # written just above: only a concurrent deletion gets here
        raise ConfigError(f"trained victim {stage.lineage_id}@{stage.rounds} vanished")
    state, record = found
    return state, str(record["sha256"])


def train_stage(run: RunLayout, stage: VictimStage, *, dev: torch.device) -> str:
    """Train `stage` from its lineage's largest stored round below it (else from the victim as
    built: its seed or checkpoint), store it, and return its sha256."""
    train, rounds, lineage = stage.victim.train, stage.rounds, stage.lineage_id
    if train is None or rounds == 0:
        raise ConfigError(f"victim {stage.victim.arch}: round 0 is the untrained victim")
    start = max((r for r in stored_rounds(run, lineage) if r < rounds), default=0)
    found = read_trained_victim(run, lineage, start) if start else None
    classes = dataset_info(stage.dataset, image_size=stage.image_size).num_classes
    base = victim_model(
        stage.victim,
        num_classes=classes,
        image_size=stage.image_size,
        weights=found[0] if found else None,
    ).to(dev)
    indices = training_clients(
        stage.dataset, image_size=stage.image_size, shuffle_seed=stage.shuffle_seed, train=train
    )
    clients = [_client(stage, client, dev) for client in indices]
    model = train_fedavg(base, clients, train.fedavg(rounds), start_round=start)
    record: dict[str, Any] = {
        "lineage": stage.lineage(),
        "clients": indices,  # sample indices of each client's data
        "resumed_from_round": start,
        "training_loss": training_loss(model, clients),  # mean CE over the clients' data
        "device": str(dev),
    }
    return write_trained_victim(run, lineage, rounds, victim_state(model), record)


def _client(stage: VictimStage, indices: list[int], dev: torch.device) -> ClientBatch:
    images, labels = load_images(stage.dataset, indices, image_size=stage.image_size)
    return ClientBatch(images.to(dev), labels.to(dev))
