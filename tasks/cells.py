"""Grid cells and their ids: the planner's expansion of a GridSpec.

A gradient cell is everything that determines the defended gradient the attacker observes;
an inversion cell adds what determines the attack. Each id is the first 16 hex digits of the
sha256 of the cell's canonical JSON (spec.canonical_json) including SCHEMA_VERSION, so ids are
stable across processes, machines, dict order and float spelling, and change whenever a field
that affects the result changes. Execution settings (executor, cells_per_job, output dir,
keep_restarts) are deliberately not part of any id.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from gi_core.attacks.engine import BaseConfig
from gi_core.attacks.registry import method_config, uses_generator
from gi_core.datasets import LabelDraw
from gi_core.defenses import Defense
from gi_core.errors import ConfigError
from gi_core.fedavg import LocalTraining, Protocol
from tasks import budget
from tasks.budget import BudgetRecord, total_iterations
from tasks.spec import (
    GeneratorSpec,
    GridSpec,
    MethodSpec,
    VictimSpec,
    canonical_json,
    cell_indices,
    data_colour,
    evaluation_batches,
    label_draw,
    mark_provenance,
    variant_labels,
)

# Bump when the meaning of a stored cell changes without its fields changing (e.g. a fix in
# how gradients are computed): every id changes, so a resumed run recomputes everything.
SCHEMA_VERSION = 2  # 2: tv_form/signed_grad/preset in configs, shuffle_seed in gradients
ID_LENGTH = 16
# What repeats of one configuration differ in (issue 16): the batch (its number and images) and
# the attack seed. Everything else in a cell's id payload is its configuration.
REPEAT_KEYS = frozenset({"batch_index", "indices", "seed"})
# Bookkeeping keys of the id payload that carry no configuration (kind, schema, id links).
_NOT_CONFIGURATION = frozenset({"kind", "schema", "gradient_id"})


def cell_hash(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:ID_LENGTH]


@dataclass(frozen=True, eq=False)
class GradientCell:
    """One client batch under one defense: (data, indices, victim, defense, batch size)."""

    dataset: str
    image_size: int
    batch_size: int
    batch_index: int
    indices: tuple[int, ...]  # data set sample indices, disjoint across batch_index
    victim: VictimSpec
    defense: Defense
    shuffle_seed: int | None = None  # the batch plan's shuffle (None: the fixed plan)
    # What the server observes (decision 194); under `aggregate` `indices` are the clients'
    # batches concatenated (n_clients x batch_size, client 0 = the attacked one first).
    protocol: Protocol = Protocol()
    # How the batch plan drew its labels (decision 195): distinct | random | k distinct.
    batch_labels: LabelDraw = "distinct"

    def to_dict(self) -> dict[str, Any]:
        """Everything that determines the gradient; hashed into `id`. The protocol and the
        label draw enter only when they differ from the paper's (FedSGD, distinct labels), so
        the ids of existing grids stay as they were (decision 040)."""
        d: dict[str, Any] = {
            "kind": "gradient",
            "schema": SCHEMA_VERSION,
            "dataset": self.dataset,
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "batch_index": self.batch_index,
            "indices": list(self.indices),
            "shuffle_seed": self.shuffle_seed,
            "victim": self.victim.model_dump(mode="json"),
            "defense": _defense_dict(self.defense),
        }
        if not self.protocol.is_fedsgd:
            d["protocol"] = protocol_dict(self.protocol)
        if self.batch_labels != "distinct":
            d["batch_labels"] = self.batch_labels
        return d

    @cached_property
    def id(self) -> str:
        return cell_hash(self.to_dict())

    def describe(self) -> dict[str, Any]:
        """to_dict() plus the id: what goes into the stored group's attrs."""
        return {**self.to_dict(), "id": self.id}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GradientCell:
        """Inverse of to_dict/describe; raises ConfigError if a stored id no longer matches."""
        cell = cls(
            dataset=d["dataset"],
            image_size=d["image_size"],
            batch_size=d["batch_size"],
            batch_index=d["batch_index"],
            indices=tuple(d["indices"]),
            victim=VictimSpec.model_validate(d["victim"]),
            defense=Defense(**d["defense"]),
            shuffle_seed=d.get("shuffle_seed"),
            protocol=protocol_from_dict(d.get("protocol")),
            batch_labels=d.get("batch_labels", "distinct"),
        )
        _check_id(cell.id, d)
        return cell

    @property
    def victim_stage(self) -> VictimStage:
        return VictimStage(self.victim, self.dataset, self.image_size, self.shuffle_seed)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GradientCell) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


@dataclass(frozen=True)
class VictimStage:
    """A victim at one training stage and the data its clients train on (decision 270): what
    its weights are a function of. Gradient cells of one stage share its weights."""

    victim: VictimSpec  # one stage (`VictimSpec.stages`): `train` None or one round count
    dataset: str
    image_size: int
    shuffle_seed: int | None

    @property
    def rounds(self) -> int:
        return self.victim.rounds

    def lineage(self) -> dict[str, Any]:
        """Everything the weights depend on except the rounds: the rounds of one lineage are
        prefixes of one training, stored side by side (a longer one resumes a shorter one)."""
        victim = self.victim.model_dump(mode="json")
        if self.victim.train is not None:
            victim["train"] = self.victim.train.hyperparameters()
        return {
            "kind": "victim",
            "schema": SCHEMA_VERSION,
            "dataset": self.dataset,
            "image_size": self.image_size,
            "shuffle_seed": self.shuffle_seed,
            "victim": victim,
        }

    @cached_property
    def lineage_id(self) -> str:
        return cell_hash(self.lineage())


@dataclass(frozen=True, eq=False)
class InversionCell:
    """One attack on one gradient: method + full config (defaults included) + generator + seed."""

    gradient: GradientCell
    method: str
    config: BaseConfig  # the registry's frozen config, iteration budget already applied
    generator: GeneratorSpec | None  # None for methods without a generator prior
    seed: int
    # Table name of this configuration (spec `label`, else derived by `variant_labels`).
    # Not part of the id: renaming a configuration recomputes nothing.
    variant: str = ""
    # The matched-budget request that set the config's iterations, and its price (rows only:
    # the iterations themselves are in the config and so in the id).
    budget: BudgetRecord = BudgetRecord()

    @property
    def gradient_id(self) -> str:
        return self.gradient.id

    @property
    def config_dict(self) -> dict[str, Any]:
        return dict(_asdict(self.config))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "inversion",
            "schema": SCHEMA_VERSION,
            "gradient_id": self.gradient.id,
            "method": self.method,
            "config": _identity_config(self.config),
            "generator": _generator_dict(self.generator),  # a fresh copy, see below
            "seed": self.seed,
        }

    @cached_property
    def id(self) -> str:
        return cell_hash(self.to_dict())

    def describe(self) -> dict[str, Any]:
        return {
            **self.to_dict(),
            "id": self.id,
            "gradient": self.gradient.describe(),
            "variant": self.variant,
            "budget": self.budget.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InversionCell:
        """Inverse of describe(); raises ConfigError if a stored id no longer matches."""
        cell = cls(
            gradient=GradientCell.from_dict(d["gradient"]),
            method=d["method"],
            config=method_config(d["method"], d["config"]),
            generator=GeneratorSpec.model_validate(d["generator"]) if d["generator"] else None,
            seed=d["seed"],
            variant=d.get("variant", ""),
            budget=BudgetRecord(**d.get("budget", {})),
        )
        _check_id(cell.id, d)
        return cell

    def configuration(self) -> dict[str, Any]:
        """The cell's configuration, derived from its id payload (never a hand list): to_dict()
        with the gradient cell's payload inlined and the full config (defaults included), less
        what repeats differ in (REPEAT_KEYS). Two cells with different ids that are not repeats
        therefore always have different configurations (issue 16, Deliver 1)."""
        payload = {**self.to_dict(), "config": self.config_dict}
        payload["gradient"] = _without(self.gradient.to_dict(), REPEAT_KEYS | _NOT_CONFIGURATION)
        return _without(payload, REPEAT_KEYS | _NOT_CONFIGURATION)

    def metric_axes(self) -> dict[str, Any]:
        """The configuration columns of this cell's metrics rows (see storage.metrics): the
        full configuration as JSON (`config`, flattened to `cfg.<dotted key>` columns by
        pipelines.aggregate.identify) and its hash (`config_id`), plus the named axes."""
        g, v, config = self.gradient, self.gradient.victim, self.config_dict
        configuration = self.configuration()
        return {
            "cell_id": self.id,
            "gradient_id": g.id,
            "config_id": cell_hash(configuration),
            "config": canonical_json(configuration),
            **budget_columns(self.config),
            **self.budget.columns(total_iterations(self.config)),
            "method": self.method,
            "variant": self.variant,
            "preset": config["preset"],
            "method_params": canonical_json(config),
            **{f"param_{k}": param_value(val) for k, val in config.items() if k != "preset"},
            "dataset": g.dataset,
            "image_size": g.image_size,
            "data_seed": g.shuffle_seed,
            "victim": v.arch,
            "victim_width": v.width,
            "victim_seed": v.seed,
            "generator": self.generator.kind if self.generator else None,
            "defense": g.defense.kind,
            "defense_level": g.defense.level,  # p, sigma (dp: sigma), bits; 0.0 for none
            "defense_p": g.defense.p,
            "defense_sigma": g.defense.sigma,
            "defense_clip": g.defense.clip,
            "defense_bits": g.defense.bits,
            "batch_size": g.batch_size,
            "batch_index": g.batch_index,
            "seed": self.seed,
            **self.threat_model(),
        }

    def threat_model(self) -> dict[str, Any]:
        """The threat-model manifest (issue 19 Deliver 8; decision 197): what the attacker was
        given, from the resolved cell: labels, BN statistics, protocol and its local
        hyperparameters, the batch's label draw, the data's colour model and the prior."""
        g, config = self.gradient, self.config
        local = g.protocol.local
        prior = "none"
        if self.generator is not None:  # the kind, and the weights file where one is named
            checkpoint = self.generator.checkpoint
            prior = self.generator.kind + (f"@{checkpoint}" if checkpoint else "")
        return {
            "tm_labels": "given" if config.labels == "given" else f"recovered:{config.labels}",
            # the victim's BN always runs on batch statistics (decision 002); an attack is
            # handed them only when its BN prior is on ("+bn")
            "tm_bn_stats": "batch" if config.bn > 0 else "none",
            "protocol": g.protocol.kind,
            "local_steps": None if local is None else local.local_steps,
            "local_batch_size": None if local is None else local.local_batch_size,
            "local_lr": None if local is None else local.local_lr,
            "n_clients": g.protocol.n_clients,
            "batch_labels": str(g.batch_labels),
            "tm_colour": config.colour,
            "tm_prior": prior,
            # θ's training stage (decision 270); the weights' sha256 is added by the job
            "victim_rounds": g.victim.rounds,
            "victim_training": canonical_json(g.victim.train.hyperparameters())
            if g.victim.train is not None
            else "none",
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InversionCell) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


@dataclass(frozen=True)
class Plan:
    gradient_cells: list[GradientCell]
    inversion_cells: list[InversionCell]


def expand(spec: GridSpec) -> Plan:
    """All cells of `spec`, deduplicated, in a deterministic order.

    Gradient cells: victim (each training stage) x batch size x batch index x protocol x
    defense level. Inversion cells: for
    each gradient cell, method entry x generator x seed — every method attacking the same
    defended gradient shares one gradient cell (and so one stored gradient).
    """
    gradients = _unique(_gradient_cells(spec))
    b = spec.budgets
    scale = b.iterations_scale if b.match is None else 1.0
    colour = data_colour(spec)  # threat-model knowledge: the same for every method
    attacks = [
        (m.name, mark_provenance(spec, m.name, resolve_config(m, scale, colour=colour)))
        for m in spec.methods
    ]
    labels = variant_labels(spec.methods, [config for _, config in attacks])
    inversions = _unique(
        InversionCell(g, name, matched, generator, seed, label, record)
        for g in gradients
        for (name, config), label in zip(attacks, labels, strict=True)
        for matched, record in [budget.match(config, name, g, kind=b.match, value=b.value)]
        for generator in (spec.generator_axis if uses_generator(name) else (None,))
        for seed in spec.seeds
    )
    return Plan(gradients, inversions)


def stage_iterations(config: BaseConfig) -> dict[str, int]:
    """Iterations per stage, keyed by the config field that sets them ('iterations' for a
    one-stage method, 'z_iterations' + 'w_iterations' for GIAS, ...)."""
    return {
        f.name: int(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if _is_iteration_count(f.name)
    }


def budget_columns(config: BaseConfig) -> dict[str, Any]:
    """The cell's budget as metrics columns (storage.metrics, identity-and-budget block).

    Victim gradient evaluations are derived exactly, not counted: every iteration of every
    stage evaluates the gradient-matching cost once per restart, i.e. one victim forward +
    backward per restart (BN and TV terms need no further victim gradient). Pruning and plateau
    stops (engine.OPTIONAL) end restarts early, so this is the budget allotted; the column
    `iterations` holds the iterations run."""
    stages = stage_iterations(config)
    total = sum(stages.values())
    return {
        "budget_stage_iterations": json.dumps(stages),  # in stage order, not sorted
        "budget_iterations": total,
        "budget_restarts": int(config.restarts),
        "budget_grad_evals": total * int(config.restarts),
    }


def param_value(value: Any) -> Any:
    """A config value as a flat metrics column: scalars as they are, anything else (tuples,
    None in a union field) as canonical JSON text (storage.metrics types such columns str)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return canonical_json(value)


def _gradient_cells(spec: GridSpec) -> list[GradientCell]:
    return gradient_cells(spec, batches=lambda batch_size: evaluation_batches(spec))


def gradient_cells(
    spec: GridSpec, *, batches: Callable[[int], Iterable[int]]
) -> list[GradientCell]:
    """victim stage x batch size x batches(batch size) x protocol x defense level; `batches`
    picks the batch numbers (the evaluation's, or `gi-eval tune`'s held-out ones)."""
    d = spec.data
    defenses = [defense for family in spec.defenses for defense in family.expand()]
    cells = []
    for victim in spec.victim_stages:
        for batch_size in spec.batch_sizes:
            for batch_index in batches(batch_size):
                for protocol in spec.protocol_axis:
                    for defense in defenses:
                        draw = label_draw(spec, defense)
                        indices = cell_indices(
                            spec,
                            batch_size,
                            batch_index,
                            n_clients=protocol.n_clients,
                            draw=draw,
                        )
                        cells.append(
                            GradientCell(
                                d.dataset,
                                d.image_size,
                                batch_size,
                                batch_index,
                                tuple(indices),
                                victim,
                                defense,
                                d.shuffle_seed,
                                protocol,
                                draw,
                            )
                        )
    return cells


def resolve_config(
    method: MethodSpec, iterations_scale: float, *, colour: str = "rgb"
) -> BaseConfig:
    """The method's full config with its iteration counts scaled by the grid's budget and the
    data's colour model (unless the entry sets `params.colour` itself, an ablation).

    Ints in float fields are made floats so that `lr: 1` and `lr: 1.0` give one id.
    """
    config = method_config(method.name, method.params, preset=method.preset)
    changes: dict[str, Any] = {}
    if "colour" not in method.params and config.colour != colour:
        changes["colour"] = colour
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type in ("float", float) and isinstance(value, int) and not isinstance(value, bool):
            changes[f.name] = float(value)
        elif _is_iteration_count(f.name) and iterations_scale != 1.0:
            changes[f.name] = max(1, round(value * iterations_scale))
    return dataclasses.replace(config, **changes) if changes else config


@functools.lru_cache(maxsize=1024)
def _identity_config(config: BaseConfig) -> dict[str, Any]:
    """The config as hashed into the id: fields marked `omit_if_default` (engine.OPTIONAL:
    compute-saving options added later, issue 12) are left out while at their default, so
    cells stored before they existed keep their ids."""
    full = _asdict(config)
    omit = {
        f.name
        for f in dataclasses.fields(config)
        if f.metadata.get("omit_if_default") and full[f.name] == f.default
    }
    return {k: v for k, v in full.items() if k not in omit}


@functools.lru_cache(maxsize=1024)
def _asdict(config: BaseConfig) -> dict[str, Any]:
    # Cached: a 10^5-cell grid has a handful of configs, and asdict dominated expand().
    # Callers copy the result (shallowly) and only serialise it, never mutate it.
    return dataclasses.asdict(config)


def _generator_dict(generator: GeneratorSpec | None) -> dict[str, Any] | None:
    return dict(_generator_json(generator)) if generator else None


@functools.lru_cache(maxsize=64)
def _generator_json(generator: GeneratorSpec) -> dict[str, Any]:
    return generator.model_dump(mode="json")


def _is_iteration_count(name: str) -> bool:
    return name == "iterations" or name.endswith("_iterations")


def protocol_dict(protocol: Protocol) -> dict[str, Any]:
    """A protocol as JSON: kind, n_clients and the local hyperparameters (None: gradients)."""
    local = protocol.local
    return {
        "kind": protocol.kind,
        "n_clients": protocol.n_clients,
        "local": None
        if local is None
        else {**dataclasses.asdict(local), "local_lr": float(local.local_lr)},
    }


def protocol_from_dict(d: Mapping[str, Any] | None) -> Protocol:
    if d is None:
        return Protocol()
    local = LocalTraining(**d["local"]) if d.get("local") else None
    return Protocol(d["kind"], local, d["n_clients"])


def _defense_dict(defense: Defense) -> dict[str, Any]:
    d = dataclasses.asdict(defense)
    if d.get("k") is None:
        d.pop("k", None)  # a field added later (label disguise): old ids stay (decision 040)
    # Levels are floats in the spec; normalise anyway so a hand-made Defense(p=1) hashes alike.
    return {
        k: float(v) if k in ("p", "sigma", "clip") and v is not None else v for k, v in d.items()
    }


def _without(d: Mapping[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _unique(cells: Any) -> list[Any]:
    seen: dict[str, Any] = {}
    for cell in cells:
        seen.setdefault(cell.id, cell)
    return list(seen.values())


def _check_id(actual: str, d: Mapping[str, Any]) -> None:
    stored = d.get("id")
    if stored is not None and stored != actual:
        raise ConfigError(
            f"stored cell id {stored} != recomputed {actual}: the cell schema or "
            "a method's defaults changed since it was written"
        )
