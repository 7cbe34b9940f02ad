"""The grid spec's pydantic models (docs/grid-spec.md): every model forbids unknown keys and
is frozen; field checks live on the fields, cross-field checks in tasks.spec.checks.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_serializer, model_validator

from gi_core.defenses import DEFENSE_KINDS, Defense
from gi_core.errors import ConfigError
from gi_core.fedavg import LocalTraining, Protocol
from gi_core.fl import FedAvgTraining
from gi_core.stylegan2 import StyleGAN2Config, StyleGAN2Options
from gi_core.victims import check_victim_name
from storage.generator_snapshots import parse_ref, resolve_ref
from tasks.spec.base import Floats, Ints, _drop_unset, _each, _Model
from tasks.spec.checks import semantic_problems
from tasks.spec.execution import ExecutionSpec
from tasks.spec.identity import canonical_json

DATASET_KINDS = (
    "lfw-faces",
    "natural-photos",
    "synthetic",
    "imagefolder:<path>",
    "cifar10:<root>",
    "imagenet:<root>",
    "ffhq:<root>",
)


class DataSpec(_Model):
    dataset: str
    image_size: int = Field(default=32, ge=32)  # LPIPS (AlexNet) needs >= 32 px
    num_batches: int = Field(default=1, ge=1)
    # The evaluation attacks batches first_batch .. first_batch + num_batches - 1 of the plan
    # (`gi-eval tune` points its runs at the held-out batches at the end of the plan).
    first_batch: int = Field(default=0, ge=0)
    # None: the data set's fixed greedy plan (batch 0 = the first classes in sorted order).
    # An int: a seeded shuffle of that plan's sample and class order (still disjoint, unique
    # labels); the seed is part of every gradient cell and every metrics row.
    shuffle_seed: int | None = None
    # The data's colour model, known to every attack (gi_core.attacks.colour): `auto` detects
    # it from the data (gi_core.datasets.detect_colour); `gray` / `rgb` override the detection.
    colour: Literal["auto", "gray", "rgb"] = "auto"
    # How each batch's labels are drawn (decision 195): `distinct` (every label at most once,
    # the paper's setting), `random` (each image's label drawn with replacement), or an int k
    # (exactly k distinct labels per batch). Batches stay disjoint (gi_core.datasets).
    batch_labels: Literal["distinct", "random"] | Annotated[int, Field(ge=1)] = "distinct"

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # defaults are left out of the dump, so the specs of existing grids hash as before
        data: dict[str, Any] = handler(self)
        defaults = {"colour": "auto", "batch_labels": "distinct"}
        return {k: v for k, v in data.items() if not (k in defaults and v == defaults[k])}

    @field_validator("dataset")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        kind, sep, arg = v.partition(":")
        with_root = ("imagefolder", "cifar10", "imagenet", "ffhq")
        if v in DATASET_KINDS[:3] or (kind in with_root and sep and arg):
            return v
        raise ValueError(f"unknown data set {v!r}; known: {', '.join(DATASET_KINDS)}")


class NormalizeSpec(_Model):
    """Per-channel input normalisation applied inside the victim (images stay in [0, 1])."""

    mean: tuple[float, ...] = Field(min_length=1)
    std: tuple[float, ...] = Field(min_length=1)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        return _each(v, lambda x: math.isfinite(x) and x > 0, "must be a finite number > 0")

    @model_validator(mode="after")
    def _one_per_channel(self) -> NormalizeSpec:
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(
                f"give 3 values (R, G, B) for mean and std (got {len(self.mean)}, {len(self.std)})"
            )
        return self


class TrainSpec(_Model):
    """A victim trained by FedAvg before it is attacked (decision 270). `rounds` is a grid
    axis: 0 is the untrained victim (the very cells of the victim without `train`), r > 0 the
    victim after r rounds. Each of `clients` clients holds `local_steps x batch_size` images
    that no attacked batch uses (tasks.spec.plan.training_clients) and runs `local_steps` SGD
    steps of `batch_size` images at `lr` per round (one local epoch), in an order drawn from
    `seed` afresh every round; the server averages the clients' updates."""

    rounds: Ints = Field(min_length=1)
    clients: int = Field(default=4, ge=1)
    batch_size: int = Field(default=8, ge=1)
    local_steps: int = Field(default=1, ge=1)
    lr: float = Field(default=0.1, gt=0)
    seed: int = 0

    @field_validator("rounds")
    @classmethod
    def _rounds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        _each(v, lambda r: r >= 0, "must be >= 0")
        twice = sorted({r for r in v if v.count(r) > 1})
        if twice:
            raise ValueError(f"{twice[0]} is listed twice (got {list(v)})")
        return v

    @field_validator("lr")
    @classmethod
    def _finite_lr(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be a finite number > 0 (got {v})")
        return v

    def fedavg(self, rounds: int) -> FedAvgTraining:
        """gi_core's training of `rounds` rounds with these hyperparameters."""
        local = LocalTraining(self.local_steps, self.batch_size, float(self.lr))
        return FedAvgTraining(rounds, local, self.seed)

    def hyperparameters(self) -> dict[str, Any]:
        """Everything but `rounds`: what one training lineage shares across its rounds."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k != "rounds"}


class VictimSpec(_Model):
    # resnet18 | convnet | lenet | resnet20 | resnet32 | resnet56 | torchvision:<model> |
    # <module>:<callable> (gi_core.victims)
    arch: str
    width: int | None = Field(default=None, ge=1)  # None: the architecture's default width
    seed: int = 0  # initialisation seed of an untrained victim
    checkpoint: str | None = None  # path to a state_dict
    normalize: NormalizeSpec | None = None  # e.g. ImageNet's mean/std for a trained victim
    # FedAvg training before the attack (decision 270); `train.rounds` is a grid axis. The
    # training starts from the victim above (its seed, or its checkpoint).
    train: TrainSpec | None = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        try:
            check_victim_name(v)
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("victim.arch: ")) from e
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        return _drop_unset(handler(self), ("normalize", "train"))

    def stages(self) -> tuple[VictimSpec, ...]:
        """One victim per training stage, in the order written: round 0 is this victim without
        `train` (so its cells are those of a grid without training), round r > 0 this victim
        with `train.rounds` = (r,)."""
        if self.train is None:
            return (self,)
        return tuple(
            self.model_copy(
                update={"train": self.train.model_copy(update={"rounds": (r,)}) if r else None}
            )
            for r in self.train.rounds
        )

    @property
    def rounds(self) -> int:
        """FedAvg rounds of a stage (`stages()`): 0 for an untrained victim."""
        if self.train is None:
            return 0
        if len(self.train.rounds) != 1:
            raise ConfigError(
                f"victim.train.rounds: one stage has one value (got {self.train.rounds})"
            )
        return self.train.rounds[0]

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        return (self.normalize.mean, self.normalize.std) if self.normalize else None


def untrained_only(victim: VictimSpec, owner: str) -> VictimSpec:
    """A spec other than a grid's attacks the victim as built: its `train` is refused."""
    if victim.train is not None:
        raise ValueError(
            f"train: FedAvg-trained victims are a grid option (`gi-eval run`, decision 270); "
            f"{owner} attacks the victim as built: remove train"
        )
    return victim


class StyleGAN2ArchSpec(_Model):
    """A randomly initialised StyleGAN2 (tests, smoke grids); real priors use `checkpoint`."""

    resolution: int = Field(ge=4)
    channels: tuple[int, ...] = Field(min_length=1)
    z_dim: int = Field(default=512, ge=1)
    w_dim: int = Field(default=512, ge=1)
    mapping_layers: int = Field(default=8, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> StyleGAN2ArchSpec:
        self.config()  # raises ConfigError (a ValueError) naming the field
        return self

    def config(self) -> StyleGAN2Config:
        return StyleGAN2Config(
            resolution=self.resolution,
            channels=self.channels,
            z_dim=self.z_dim,
            w_dim=self.w_dim,
            mapping_layers=self.mapping_layers,
        )


class GeneratorSpec(_Model):
    kind: Literal["dcgan32", "dcgan64", "digiface", "stylegan2"]
    # A state_dict file, or a training run's snapshot `giml:<run dir>@<step>` /
    # `gan:<run dir>@<step>` (issue 10), resolved here to its content-addressed file so that
    # cell ids follow the weights. For stylegan2: a `gi-eval convert-generator` output.
    checkpoint: str | None = None
    # stylegan2 only (docs/paper-scale.md): search space (default w, as the paper's Table 1),
    # noise maps fixed per cell seed or redrawn every pass (default fixed), or a random-init
    # architecture instead of a checkpoint.
    latent_space: Literal["z", "w", "w+"] | None = None
    noise: Literal["fixed", "random"] | None = None
    stylegan2: StyleGAN2ArchSpec | None = None

    @model_validator(mode="after")
    def _stylegan2_fields(self) -> GeneratorSpec:
        extra = [n for n in ("latent_space", "noise", "stylegan2") if getattr(self, n) is not None]
        if self.kind != "stylegan2" and extra:
            raise ValueError(f"{extra[0]} is a stylegan2 option ({self.kind} does not take it)")
        if self.kind == "stylegan2" and (self.checkpoint is None) == (self.stylegan2 is None):
            raise ValueError(
                "stylegan2 needs exactly one of checkpoint (weights converted with `gi-eval "
                "convert-generator`) or stylegan2 (a random-init architecture)"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        return _drop_unset(handler(self), ("latent_space", "noise", "stylegan2"))

    def stylegan2_options(self, *, noise_seed: int = 0) -> StyleGAN2Options:
        space, noise = self.latent_space or "w", self.noise or "fixed"
        return StyleGAN2Options(latent_space=space, noise=noise, noise_seed=noise_seed)

    @field_validator("checkpoint")
    @classmethod
    def _snapshot_ref(cls, v: str | None) -> str | None:
        return str(resolve_ref(v)) if v is not None and parse_ref(v) is not None else v


class MethodSpec(_Model):
    name: str
    # paper: the paper's appendix values; tuned: the values `gi-eval tune` chose on held-out
    # batches (gi_core.attacks.registry). `params` override either.
    preset: Literal["paper", "tuned"] = "paper"
    params: dict[str, Any] = Field(default_factory=dict)
    # Name of this configuration in tables (`variant` column); default: derived from the
    # preset and the parameters that differ between entries of the same method.
    label: str | None = Field(default=None, min_length=1, max_length=80)


class DefenseSpec(_Model):
    """One defense family; list-valued levels expand into one defense per level."""

    kind: Literal["none", "sparsity", "noise", "dp", "quantize", "soteria", "disguise"]
    p: Floats | None = None
    sigma: Floats | None = None
    clip: float | None = None
    bits: Ints | None = None
    k: Ints | None = None  # disguise: distinct labels per batch (App. F)

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        return _drop_unset(handler(self), ("k",))

    @field_validator("k")
    @classmethod
    def _k_range(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return _each(v, lambda x: x >= 1, "must be >= 1")

    @field_validator("p")
    @classmethod
    def _p_range(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        return _each(v, lambda x: 0.0 <= x < 1.0, "must be in [0, 1)")

    @field_validator("sigma")
    @classmethod
    def _sigma_range(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        return _each(v, lambda x: math.isfinite(x) and x >= 0, "must be a finite number >= 0")

    @field_validator("clip")
    @classmethod
    def _clip_range(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"must be a finite number > 0 (got {v})")
        return v

    @field_validator("bits")
    @classmethod
    def _bits_range(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return _each(v, lambda x: 1 <= x <= 32, "must be in 1..32")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> DefenseSpec:
        needed = _DEFENSE_FIELDS[self.kind]
        wrong = [f"{self.kind} needs {n!r}" for n in needed if getattr(self, n) is None]
        wrong += [
            f"{self.kind} does not take {n!r}"
            for n in ("p", "sigma", "clip", "bits", "k")
            if n not in needed and getattr(self, n) is not None
        ]
        if wrong:
            raise ValueError("; ".join(wrong))
        return self

    def expand(self) -> list[Defense]:
        """One gi_core Defense per level, in the order written."""
        if self.kind == "none":
            return [Defense()]
        if self.kind in ("sparsity", "soteria"):
            return [Defense(self.kind, p=p) for p in self.p or ()]
        if self.kind == "noise":
            return [Defense("noise", sigma=s) for s in self.sigma or ()]
        if self.kind == "dp":
            return [Defense("dp", clip=self.clip, sigma=s) for s in self.sigma or ()]
        if self.kind == "disguise":
            return [Defense("disguise", k=k) for k in self.k or ()]
        return [Defense("quantize", bits=b) for b in self.bits or ()]


_DEFENSE_FIELDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "sparsity": ("p",),
    "noise": ("sigma",),
    "dp": ("clip", "sigma"),
    "quantize": ("bits",),
    "soteria": ("p",),
    "disguise": ("k",),
}


class ProtocolSpec(_Model):
    """What the server observes in a round (decision 194); list-valued fields expand into one
    protocol per combination. `fedsgd`: one client's gradient (the paper's). `fedavg`: one
    client's weight update after `local_steps` SGD steps of `local_batch_size` images at
    `local_lr`. `aggregate`: the mean over `n_clients` clients of their gradients (no local
    fields) or of their FedAvg updates (with `local_steps`); client 0 is attacked and scored."""

    kind: Literal["fedsgd", "fedavg", "aggregate"]
    local_steps: Ints | None = None
    local_batch_size: int | None = Field(default=None, ge=1)  # None: the whole batch
    local_lr: float | None = Field(default=None, gt=0)  # default 0.1 where local training runs
    n_clients: Ints | None = None

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        fields = ("local_steps", "local_batch_size", "local_lr", "n_clients")
        return _drop_unset(handler(self), fields)

    @field_validator("local_steps", "n_clients")
    @classmethod
    def _positive(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return _each(v, lambda x: x >= 1, "must be >= 1")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> ProtocolSpec:
        local = ("local_steps", "local_batch_size", "local_lr")
        given = [n for n in (*local, "n_clients") if getattr(self, n) is not None]
        allowed = {"fedsgd": (), "fedavg": local, "aggregate": (*local, "n_clients")}[self.kind]
        wrong = [f"{self.kind} does not take {n!r}" for n in given if n not in allowed]
        if self.kind == "aggregate" and self.n_clients is None:
            wrong.append("aggregate needs 'n_clients'")
        if self.kind == "aggregate" and self.local_steps is None and len(given) > 1:
            wrong.append("aggregate takes local_batch_size / local_lr only with local_steps")
        if wrong:
            raise ValueError("; ".join(wrong))
        return self

    def expand(self) -> list[Protocol]:
        """One gi_core Protocol per (local_steps, n_clients), in the order written."""
        if self.kind == "fedsgd":
            return [Protocol()]
        steps: tuple[int | None, ...] = self.local_steps or (
            (1,) if self.kind == "fedavg" else (None,)
        )
        lr = 0.1 if self.local_lr is None else float(self.local_lr)
        return [
            Protocol(
                self.kind,
                None if k is None else LocalTraining(k, self.local_batch_size, lr),
                n,
            )
            for k in steps
            for n in (self.n_clients or (1,))
        ]


assert set(_DEFENSE_FIELDS) == set(DEFENSE_KINDS), "spec and gi_core disagree on defenses"


class BudgetSpec(_Model):
    # Multiplies every iteration count of every method (a `runlocal` shrink, e.g. 0.01).
    iterations_scale: float = Field(default=1.0, gt=0)
    # Matched budgets (issue 16, tasks/budget.py): every method's stages are scaled, in
    # proportion, to `value` victim gradient evaluations (iterations x restarts) or `value`
    # attack seconds per cell priced from the committed cost table. None: each method's own
    # iterations (times iterations_scale, which then does not apply to matched grids).
    match: Literal["grad_evals", "seconds"] | None = None
    value: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _both_or_neither(self) -> BudgetSpec:
        if (self.match is None) != (self.value is None):
            raise ValueError(
                "match and value go together, e.g. budgets: {match: grad_evals, value: 8000}"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        return _drop_unset(handler(self), ("match", "value"))


class StorageSpec(_Model):
    keep_restarts: bool = False  # store all R restarts' images, not only the chosen one
    # Global iterations after which every restart's images are stored with the reconstruction
    # (figure 3's evolution strip); ones past a method's budget are skipped. Not in any cell id:
    # adding snapshots to a finished grid does not rerun its cells.
    snapshots: Ints = ()

    @field_validator("snapshots")
    @classmethod
    def _positive_snapshots(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(_each(v, lambda i: i >= 1, "must be >= 1"))))


def _method_item(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class TuningSpec(_Model):
    """`gi-eval tune`: search each method's key hyperparameters on held-out batches."""

    # Held-out batches of the grid's first batch size, taken from the END of the batch plan:
    # the last consecutive ones that share no sample with the evaluation at any batch size
    # (tuning_batches; `gi-eval tune` refuses the spec when there are none).
    batches: int = Field(default=2, ge=1)
    trials: int = Field(default=12, ge=1)
    seed: int = 0  # Optuna sampler seed
    methods: tuple[str, ...] | None = None  # default: every method of the grid
    # Optional override of the default search space: {method: {param: spec}}, where spec is
    # [low, high] (log-uniform), [low, high, "linear"], or {"choices": [...]}.
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # The criterion Optuna optimises (mean over the held-out images); both are recorded.
    objective: Literal["psnr", "lpips"] = "psnr"
    # true: `gi-eval run` tunes this grid first (runs/<name>-tune, cached and resumable like
    # any cell) and evaluates with the chosen values, so "tuned" means tuned for this grid.
    stage: bool = False

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)  # fields at their defaults hash as before
        defaults = {"objective": "psnr", "stage": False}
        return {k: v for k, v in data.items() if not (k in defaults and v == defaults[k])}

    @field_validator("space")
    @classmethod
    def _ranges_in_order(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """A [low, high(, scale)] range must have low <= high (and low > 0 on a log scale):
        Optuna would stop the tuning run with a ValueError after its first trial."""
        for method, params in v.items():
            for name, spec in params.items():
                problem = _range_problem(spec)
                if problem:
                    raise ValueError(f"{method}.{name}: {problem} (got {spec})")
        return v


def _range_problem(spec: Any) -> str | None:
    if not isinstance(spec, list | tuple) or len(spec) not in (2, 3):
        return None
    low, high, *scale = spec
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in (low, high)):
        return None  # a list of choices
    if low > high:
        return f"low {low} is above high {high}; write [low, high]"
    if scale != ["linear"] and low <= 0:
        return f"a log-uniform range needs low > 0; write [low, high, linear] for {low}"
    return None


class GridSpec(_Model):
    name: str
    data: DataSpec
    # One victim / generator, or a list of them as a grid axis (e.g. untrained vs trained
    # victims, several priors). Write either the single or the list form, not both.
    victim: VictimSpec | None = None
    victims: tuple[VictimSpec, ...] | None = Field(default=None, min_length=1)
    generator: GeneratorSpec | None = None
    generators: tuple[GeneratorSpec, ...] | None = Field(default=None, min_length=1)
    methods: tuple[Annotated[MethodSpec, BeforeValidator(_method_item)], ...] = Field(min_length=1)
    defenses: tuple[DefenseSpec, ...] = Field(default=(DefenseSpec(kind="none"),), min_length=1)
    # What the server observes (decision 194): fedsgd (the paper's), fedavg, aggregate.
    protocols: tuple[ProtocolSpec, ...] = Field(
        default=(ProtocolSpec(kind="fedsgd"),), min_length=1
    )
    batch_sizes: Ints = Field(default=(1,), min_length=1)
    seeds: Ints = Field(default=(0,), min_length=1)
    budgets: BudgetSpec = BudgetSpec()
    execution: ExecutionSpec = ExecutionSpec()
    storage: StorageSpec = StorageSpec()
    tuning: TuningSpec = TuningSpec()
    # The comparison of interest (issue 16): a method name (or a method entry's label). The
    # report tests every other configuration against it in each setting (paired Wilcoxon on
    # the same gradients and seeds, Holm-corrected, with effect sizes); all pairs go to the CSV
    # only. Not part of any cell: changing it recomputes nothing.
    baseline: str | None = None

    @property
    def victim_axis(self) -> tuple[VictimSpec, ...]:
        """The victim entries as written (error paths name them: victims[i])."""
        return self.victims or ((self.victim,) if self.victim is not None else ())

    @property
    def victim_stages(self) -> tuple[VictimSpec, ...]:
        """Every victim of the grid, each training stage its own (`VictimSpec.stages`)."""
        return tuple(stage for v in self.victim_axis for stage in v.stages())

    @property
    def protocol_axis(self) -> list[Protocol]:
        """Every protocol of the grid, expanded, in the order written."""
        return [p for family in self.protocols for p in family.expand()]

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # the default (fedsgd only) is left out, so the dumps of existing grids do not change
        data: dict[str, Any] = handler(self)
        if data.get("protocols") == [{"kind": "fedsgd"}]:
            del data["protocols"]
        return data

    @property
    def generator_axis(self) -> tuple[GeneratorSpec, ...]:
        return self.generators or ((self.generator,) if self.generator is not None else ())

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # The name becomes a directory (runs/<name>): keep it one plain path component.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"use letters, digits, '.', '_' or '-' (got {v!r})")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _positive_batches(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return _each(v, lambda b: b >= 1, "must be >= 1")

    @model_validator(mode="after")
    def _semantics(self) -> GridSpec:
        problems = semantic_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def canonical_json(self) -> str:
        return canonical_json(self.model_dump(mode="json"))
