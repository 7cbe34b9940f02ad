"""Specs of the GIML pipeline (docs/giml.md): FL task set -> meta-training -> evaluation, and
of generator pretraining (the wrong prior). Locked pydantic models, like the grid spec; every
quantity of Algorithm 2 lives in `giml.params` and is checked by gi_core's GIMLConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from gi_core.errors import ConfigError
from gi_core.gan_training import GANConfig
from gi_core.giml import GIMLConfig
from tasks.spec import (
    DataSpec,
    DefenseSpec,
    ExecutionSpec,
    Ints,
    MethodSpec,
    VictimSpec,
    _messages,
    _Model,
    untrained_only,
)

GeneratorKind = Literal["dcgan32", "dcgan64"]


class ClientDataSpec(_Model):
    dataset: str
    image_size: int = Field(default=32, ge=8)


class FLSpec(_Model):
    """FedSGD: M clients with disjoint batches of B, R rounds (paper: 200 x 4)."""

    clients: int = Field(ge=1)  # M
    rounds: int = Field(default=4, ge=1)  # R
    batch_size: int = Field(default=4, ge=1)  # B
    lr: float = Field(default=0.1, ge=0)  # server learning rate
    defense: DefenseSpec = DefenseSpec(kind="none")
    seed: int = 0  # defense noise

    @field_validator("defense")
    @classmethod
    def _one_level(cls, v: DefenseSpec) -> DefenseSpec:
        if len(v.expand()) != 1:
            raise ValueError("the FL defense takes one level (write p: 0.95, not a list)")
        return v


def _config(cls: Any, params: dict[str, Any], where: str) -> Any:
    try:
        return cls(**params)
    except TypeError as e:  # an unknown parameter name
        raise ValueError(f"{where}.params: {e}") from e
    except ConfigError as e:
        raise ValueError(str(e)) from e


class GIMLTrainSpec(_Model):
    generator: GeneratorKind = "dcgan32"  # the untrained start w_0 (DCGAN init)
    generator_seed: int = 0
    params: dict[str, Any] = Field(default_factory=dict)  # GIMLConfig fields
    snapshots: Ints = (0,)  # meta steps whose w is published (the last step always is)

    def config(self) -> GIMLConfig:
        return GIMLConfig(**self.params)

    @model_validator(mode="after")
    def _valid(self) -> GIMLTrainSpec:
        config = _config(GIMLConfig, self.params, "giml")
        bad = [s for s in self.snapshots if not 0 <= s <= config.meta_steps]
        if bad:
            raise ValueError(f"giml.snapshots: steps {bad} outside 0..{config.meta_steps}")
        return self

    def snapshot_steps(self) -> tuple[int, ...]:
        return tuple(sorted({*self.snapshots, self.config().meta_steps}))


class PriorSpec(_Model):
    """Standard DCGAN training of a generator on an image set (gi_core.gan_training)."""

    dataset: str
    image_size: int = Field(default=32, ge=8)
    generator: GeneratorKind = "dcgan32"
    generator_seed: int = 0
    params: dict[str, Any] = Field(default_factory=dict)  # GANConfig fields
    snapshots: Ints = ()  # steps whose G is published (the last step always is)
    checkpoint_every: int = Field(default=50, ge=1)  # steps between training checkpoints

    def config(self) -> GANConfig:
        return GANConfig(**self.params)

    @model_validator(mode="after")
    def _valid(self) -> PriorSpec:
        config = _config(GANConfig, self.params, "prior")
        bad = [s for s in self.snapshots if not 0 <= s <= config.steps]
        if bad:
            raise ValueError(f"prior.snapshots: steps {bad} outside 0..{config.steps}")
        return self

    def snapshot_steps(self) -> tuple[int, ...]:
        return tuple(sorted({*self.snapshots, self.config().steps}))


class EvalSpec(_Model):
    """Ordinary evaluation grids, one per generator: every GIML snapshot and the wrong prior
    run `methods`; an untrained generator of the same architecture runs `untrained_methods`."""

    data: DataSpec
    methods: tuple[MethodSpec, ...] = Field(min_length=1)
    untrained_methods: tuple[MethodSpec, ...] = (MethodSpec(name="gi-w"),)
    defenses: tuple[DefenseSpec, ...] = (DefenseSpec(kind="none"),)
    batch_sizes: Ints = (4,)
    seeds: Ints = (0,)
    steps: Ints | None = None  # GIML snapshots to evaluate (default: all)


class GIMLSpec(_Model):
    name: str
    data: ClientDataSpec  # the clients' data set (evaluation batches are held out of it)
    victim: VictimSpec
    fl: FLSpec
    giml: GIMLTrainSpec
    prior: PriorSpec | None = None  # the wrong-prior baseline, trained by this pipeline
    evaluation: EvalSpec | None = None
    execution: ExecutionSpec = ExecutionSpec()

    @field_validator("victim")
    @classmethod
    def _untrained(cls, v: VictimSpec) -> VictimSpec:
        return untrained_only(v, "GIML (its FL simulation moves θ itself)")


class PretrainSpec(_Model):
    """`gi-eval pretrain`: train one prior (any data set) and publish its snapshots."""

    name: str
    prior: PriorSpec
    execution: ExecutionSpec = ExecutionSpec()


def load_yaml_spec(path: Path | str, model: Any) -> tuple[Any, str]:
    """Parse and validate a YAML spec file; ConfigError names every bad field."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read spec {path}: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the spec must be a YAML mapping")
    try:
        return model.model_validate(data), text
    except ValidationError as e:
        raise ConfigError(f"invalid spec {path}:\n  " + "\n  ".join(_messages(e))) from e
