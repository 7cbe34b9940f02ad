"""What a grid takes from its data set: its colour model and its batch plan (evaluation
batches, the held-out tuning batches that share no sample with them, and the samples that
train a victim, which share none with either).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gi_core.datasets import LabelDraw, batch_indices, detect_colour, max_batches
from gi_core.defenses import Defense
from gi_core.errors import ConfigError

if TYPE_CHECKING:
    from tasks.spec.schema import GridSpec, TrainSpec


def data_colour(spec: GridSpec) -> str:
    """The grid's colour model, 'gray' or 'rgb': `data.colour`, or detected from the data."""
    d = spec.data
    return d.colour if d.colour != "auto" else detect_colour(d.dataset)


def evaluation_batches(spec: GridSpec) -> range:
    """Batch numbers of the evaluation: `data.num_batches` from `data.first_batch` on."""
    return range(spec.data.first_batch, spec.data.first_batch + spec.data.num_batches)


def label_draw(spec: GridSpec, defense: Defense) -> LabelDraw:
    """How a gradient cell's batch draws its labels: the label-disguise defense's k (App. F),
    else `data.batch_labels` (decision 195)."""
    if defense.kind == "disguise" and defense.k is not None:
        return defense.k
    return spec.data.batch_labels


def label_draws(spec: GridSpec) -> list[LabelDraw]:
    """Every label draw the grid's gradient cells use (one batch plan each)."""
    draws = [label_draw(spec, d) for family in spec.defenses for d in family.expand()]
    return list(dict.fromkeys(draws))


def client_batches(spec: GridSpec, batch_index: int, n_clients: int) -> list[int]:
    """Plan batches of the `n_clients` clients of an aggregate at `batch_index` (decision 194):
    the attacked client 0 is batch `batch_index` itself (the same images as under FedSGD, so
    protocols compare on paired batches); the others are batches after the evaluation range,
    n_clients - 1 per evaluation batch, so no two cells' clients overlap."""
    d = spec.data
    after = d.first_batch + d.num_batches + (batch_index - d.first_batch) * (n_clients - 1)
    return [batch_index, *range(after, after + n_clients - 1)]


def batches_needed(spec: GridSpec) -> int:
    """Batches the plan must supply: the evaluation range and every aggregate's other clients."""
    d = spec.data
    most = max(p.n_clients for p in spec.protocol_axis)
    return d.first_batch + d.num_batches * most


def cell_indices(
    spec: GridSpec, batch_size: int, batch_index: int, *, n_clients: int, draw: LabelDraw
) -> list[int]:
    """Sample indices of a gradient cell: its clients' batches concatenated, client 0 first."""
    return [
        i
        for k in client_batches(spec, batch_index, n_clients)
        for i in _indices(spec, batch_size, k, draw)
    ]


def evaluation_samples(spec: GridSpec) -> frozenset[int]:
    """Every data set sample index the evaluation attacks, over ALL batch sizes (a batch
    number names different samples at each batch size: B = 1 batch 98 is a sample of B = 4
    batch 24), label draws and aggregated clients. Batch sizes whose plan is too short are
    skipped (reported by validation)."""
    d = spec.data
    samples: set[int] = set()
    clients = sorted({p.n_clients for p in spec.protocol_axis})
    for b in spec.batch_sizes:
        for draw in label_draws(spec):
            available = max_batches(
                d.dataset,
                batch_size=b,
                image_size=d.image_size,
                shuffle_seed=d.shuffle_seed,
                draw=draw,
            )
            for k in evaluation_batches(spec):
                for n in clients:
                    batches = client_batches(spec, k, n)
                    if max(batches) < available:
                        samples.update(i for j in batches for i in _indices(spec, b, j, draw))
    return frozenset(samples)


def find_tuning_batches(spec: GridSpec, batch_size: int) -> range | None:
    """The last `tuning.batches` consecutive batches of the plan for `batch_size` none of whose
    samples the evaluation attacks at any batch size or trains a victim; None if none are."""
    d = spec.data
    available = max_batches(
        d.dataset,
        batch_size=batch_size,
        image_size=d.image_size,
        shuffle_seed=d.shuffle_seed,
        draw=d.batch_labels,
    )
    evaluated = evaluation_samples(spec) | training_samples(spec)
    clean = [evaluated.isdisjoint(_indices(spec, batch_size, k)) for k in range(available)]
    n = spec.tuning.batches
    for first in range(available - n, -1, -1):
        if all(clean[first : first + n]):
            return range(first, first + n)
    return None


def tuning_batches(spec: GridSpec, batch_size: int) -> range:
    """Batch numbers `gi-eval tune` uses: the last `tuning.batches` consecutive batches of the
    plan that share no SAMPLE with the evaluation at any batch size, nor with the samples
    that train a victim (ConfigError if none)."""
    held_out = find_tuning_batches(spec, batch_size)
    if held_out is None:
        d, trained = spec.data, training_samples(spec)
        training = f", nor the {len(trained)} that train its victims" if trained else ""
        raise ConfigError(
            f"tuning.batches: no {spec.tuning.batches} consecutive batches of "
            f"{batch_size} of {d.dataset!r} avoid every sample the evaluation attacks "
            f"({len(evaluation_samples(spec))} samples: batches {d.first_batch}-"
            f"{d.first_batch + d.num_batches - 1} at batch sizes "
            f"{list(spec.batch_sizes)}{training}). Lower data.num_batches or tuning.batches"
        )
    return held_out


def training_clients(
    dataset: str, *, image_size: int, shuffle_seed: int | None, train: TrainSpec
) -> list[list[int]]:
    """Sample indices of each FedAvg client of a trained victim (decision 270): the LAST
    `clients x local_steps` batches of `train.batch_size` of the data set's plan (distinct
    labels, the data's shuffle), `local_steps` consecutive batches per client.

    They depend on the data and the training alone, never on which batches a grid attacks, so
    one training serves every grid over the same data (`gi-eval tune`'s held-out grid
    included) with the same weights; validation refuses a grid that attacks any of them.
    ConfigError when the plan is too short."""
    plan = max_batches(
        dataset, batch_size=train.batch_size, image_size=image_size, shuffle_seed=shuffle_seed
    )
    steps, needed = train.local_steps, train.clients * train.local_steps
    if plan < needed:
        raise ConfigError(
            f"{train.clients} clients x {steps} local steps need {needed} disjoint batches of "
            f"{train.batch_size}; {dataset!r} has {plan}. Lower train.clients, "
            "train.local_steps or train.batch_size"
        )
    first = plan - needed
    return [
        [
            i
            for k in range(first + c * steps, first + (c + 1) * steps)
            for i in batch_indices(
                dataset,
                batch_size=train.batch_size,
                batch_index=k,
                image_size=image_size,
                shuffle_seed=shuffle_seed,
            )
        ]
        for c in range(train.clients)
    ]


def training_samples(spec: GridSpec) -> frozenset[int]:
    """Every sample that trains one of the grid's victims (none without training; a victim
    whose data set is too small is skipped here and reported by validation)."""
    d, samples = spec.data, set[int]()
    for v in spec.victim_axis:
        if v.train is None or not any(v.train.rounds):
            continue
        try:
            clients = training_clients(
                d.dataset, image_size=d.image_size, shuffle_seed=d.shuffle_seed, train=v.train
            )
        except ConfigError:
            continue
        samples.update(i for client in clients for i in client)
    return frozenset(samples)


def tuning_samples(spec: GridSpec, batch_size: int, held_out: range) -> frozenset[int]:
    """The sample indices of the held-out batches `held_out` of `batch_size`."""
    return frozenset(i for k in held_out for i in _indices(spec, batch_size, k))


def _indices(
    spec: GridSpec, batch_size: int, batch_index: int, draw: LabelDraw | None = None
) -> list[int]:
    d = spec.data
    return batch_indices(
        d.dataset,
        batch_size=batch_size,
        batch_index=batch_index,
        image_size=d.image_size,
        shuffle_seed=d.shuffle_seed,
        draw=d.batch_labels if draw is None else draw,
    )
