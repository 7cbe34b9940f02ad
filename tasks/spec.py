"""The grid spec: a typed, locked description of an evaluation grid (docs/grid-spec.md).

Every model forbids unknown keys and is frozen. `load_spec` validates everything that can be
checked before launch — field types and ranges, method names and parameters (via gi_core's
registry), the generator a method needs, checkpoint files, and whether the data set can supply
the requested non-overlapping batches — and raises one ConfigError listing every bad field by
its path, e.g. "defenses[1].p: must be in [0, 1) (got 1.2)".
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from gi_core.attacks.registry import (
    METHOD_NAMES,
    config_class,
    method_config,
    uses_generator,
)
from gi_core.datasets import (
    batch_indices,
    check_decodable,
    dataset_info,
    detect_colour,
    max_batches,
)
from gi_core.defenses import DEFENSE_KINDS, Defense
from gi_core.errors import ConfigError
from gi_core.stylegan2 import StyleGAN2Config, StyleGAN2Options
from gi_core.victims import check_victim_name
from storage.generator_snapshots import parse_ref, resolve_ref

# The executor kinds, spelled once (the spec, the CLI flag and the executor adapter read them).
ExecutorKind = Literal["inline", "local", "slurm"]
EXECUTOR_KINDS: tuple[str, ...] = get_args(ExecutorKind)

DATASET_KINDS = (
    "lfw-faces",
    "natural-photos",
    "synthetic",
    "imagefolder:<path>",
    "cifar10:<root>",
    "imagenet:<root>",
    "ffhq:<root>",
)


def _as_tuple(value: Any) -> Any:
    # Levels may be written as a scalar or a list; both become a tuple (one defense per level).
    return tuple(value) if isinstance(value, list | tuple) else (value,)


Floats = Annotated[tuple[float, ...], BeforeValidator(_as_tuple)]
Ints = Annotated[tuple[int, ...], BeforeValidator(_as_tuple)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # `auto` is left out of the dump, so the specs of existing grids hash as before
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if not (k == "colour" and v == "auto")}

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


def _drop_unset(data: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    # Fields added after cells were first hashed are left out of the dump while unset, so the
    # ids of existing grids (which hash the dump) do not change.
    return {k: v for k, v in data.items() if not (k in fields and v is None)}


class VictimSpec(_Model):
    # resnet18 | convnet | lenet | resnet20 | resnet32 | resnet56 | torchvision:<model> |
    # <module>:<callable> (gi_core.victims)
    arch: str
    width: int | None = Field(default=None, ge=1)  # None: the architecture's default width
    seed: int = 0  # initialisation seed of an untrained victim
    checkpoint: str | None = None  # path to a state_dict
    normalize: NormalizeSpec | None = None  # e.g. ImageNet's mean/std for a trained victim

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
        return _drop_unset(handler(self), ("normalize",))

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        return (self.normalize.mean, self.normalize.std) if self.normalize else None


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

    kind: Literal["none", "sparsity", "noise", "dp", "quantize", "soteria"]
    p: Floats | None = None
    sigma: Floats | None = None
    clip: float | None = None
    bits: Ints | None = None

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
            for n in ("p", "sigma", "clip", "bits")
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
        return [Defense("quantize", bits=b) for b in self.bits or ()]


_DEFENSE_FIELDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "sparsity": ("p",),
    "noise": ("sigma",),
    "dp": ("clip", "sigma"),
    "quantize": ("bits",),
    "soteria": ("p",),
}
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


_SBATCH_WORD = r"[\s#'\"]"


def _one_word(v: str | None) -> str | None:
    # sbatch takes each as one word; a space or '#' would end up as another option.
    if v is not None and (not v or re.search(_SBATCH_WORD, v)):
        raise ValueError(f"must be one non-empty word without spaces or quotes (got {v!r})")
    return v


class SlurmResources(_Model):
    """Resources of one kind of job array (docs/slurm.md, "Resources per array"); every unset
    field falls back to `execution.slurm` (memory: to the memory model's estimate when
    `execution.slurm.mem_gb` is not set either)."""

    mem_gb: float | None = Field(default=None, gt=0)
    timeout_min: int | None = Field(default=None, ge=1)
    gpus_per_task: int | None = Field(default=None, ge=0)
    gpu_type: str | None = None  # e.g. "a100": rendered as --gpus-per-task=a100:N
    cpus_per_task: int | None = Field(default=None, ge=1)
    partition: str | None = None
    qos: str | None = None

    @field_validator("gpu_type", "partition", "qos")
    @classmethod
    def _one_sbatch_word(cls, v: str | None) -> str | None:
        return _one_word(v)


class SlurmSpec(_Model):
    partition: str | None = None
    gpus_per_task: int = Field(default=1, ge=0)
    cpus_per_task: int = Field(default=4, ge=1)
    mem_gb: float = Field(default=16, gt=0)
    timeout_min: int = Field(default=60, ge=1)
    array_parallelism: int = Field(default=64, ge=1)
    account: str | None = None
    qos: str | None = None
    additional: dict[str, Any] = Field(default_factory=dict)
    # Shell lines run before each job (module load, venv activation), extra srun arguments.
    setup: tuple[str, ...] = ()
    srun_args: tuple[str, ...] = ()
    # Requeues after a time-limit hit (each resumes from its checkpoint); preemptions are free.
    max_num_timeout: int = Field(default=3, ge=0)
    signal_delay_s: int = Field(default=90, ge=10)  # USR2 this long before the time limit
    constraint: str | None = None  # node features, e.g. "a100|h100"
    gres: str | None = None  # generic resources, e.g. "gpu:a100:1"
    exclude: str | None = None  # nodes to avoid, e.g. "node[07-08],gpu3"
    gpu_type: str | None = None  # e.g. "a100": --gpus-per-task=a100:N (never with gres)
    # Overrides per kind of array: gradient generation, GIML prior training, and each method
    # entry by its `label` or method name (a label wins); see SlurmResources.
    gradients: SlurmResources = SlurmResources()
    giml: SlurmResources = SlurmResources()
    methods: dict[str, SlurmResources] = Field(default_factory=dict)
    # The detached driver (`gi-eval run --detach`): a small, long, low-priority CPU job.
    driver: SlurmResources = SlurmResources()

    @field_validator("constraint", "gres", "exclude", "gpu_type")
    @classmethod
    def _one_sbatch_word(cls, v: str | None) -> str | None:
        return _one_word(v)

    @model_validator(mode="after")
    def _one_gpu_request(self) -> SlurmSpec:
        # --gres=gpu:... and --gpus-per-task both ask for GPUs; Slurm adds them up or refuses.
        if self.gres is not None and "gpu" in self.gres and self.gpu_type is not None:
            raise ValueError("gres names GPUs and gpu_type is set too; keep one of them")
        return self

    @field_validator("gres")
    @classmethod
    def _gres_form(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[\w.-]+(:[\w.-]+)*(,[\w.-]+(:[\w.-]+)*)*", v):
            raise ValueError(f"write name[:type]:count, e.g. gpu:a100:1 (got {v!r})")
        return v


class ExecutionSpec(_Model):
    executor: ExecutorKind = "local"
    cells_per_job: int = Field(default=4, ge=1)
    max_parallel: int = Field(default=2, ge=1)
    # Prefect task timeout of one job array (submission to last commit); on timeout the array's
    # jobs are cancelled and the run fails (committed cells stay). None: wait as long as it takes.
    array_timeout_h: float | None = Field(default=None, gt=0)
    # Batched cells (issue 12): a job element solves cells of one method, config and victim
    # architecture together where the engine's measured policy says vectorising pays, in
    # groups that fit `memory_budget_gb` (None: a share of the device's memory).
    batch_cells: bool = True
    memory_budget_gb: float | None = Field(default=None, gt=0)
    slurm: SlurmSpec = SlurmSpec()  # frozen, so one shared default is safe


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
        return self.victims or ((self.victim,) if self.victim is not None else ())

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


def semantic_problems(spec: GridSpec) -> list[str]:
    """Cross-field checks that need gi_core or the filesystem, as 'path: message' lines."""
    return [
        *_axis_problems(spec),
        *_method_problems(spec),
        *_variant_problems(spec),
        *_baseline_problems(spec),
        *_generator_problems(spec),
        *_checkpoint_problems(spec),
        *_data_problems(spec),
        *_resource_problems(spec),
    ]


def _resource_problems(spec: GridSpec) -> list[str]:
    """Every key of execution.slurm.methods must name a method entry (label or method)."""
    names = {m.name for m in spec.methods} | {m.label for m in spec.methods if m.label}
    return [
        f"execution.slurm.methods.{key}: no method entry has this name or label; use one of "
        f"{', '.join(sorted(names))}"
        for key in spec.execution.slurm.methods
        if key not in names
    ]


def _method_problems(spec: GridSpec) -> list[str]:
    problems = []
    for i, m in enumerate(spec.methods):
        if m.name not in METHOD_NAMES:
            problems.append(
                f"methods[{i}].name: unknown method {m.name!r}; known: {', '.join(METHOD_NAMES)}"
            )
            continue
        wrong_types = _param_type_problems(m.name, m.params)
        if wrong_types:
            problems += [f"methods[{i}].params.{p}" for p in wrong_types]
            continue
        try:
            config = resolved_config(m)
        except (ConfigError, TypeError) as e:
            msg = str(e)
            problems.append(
                f"methods[{i}].{msg}"
                if msg.startswith("params.")
                else f"methods[{i}].params: {msg}"
            )
            continue
        if config.labels == "idlg" and any(b != 1 for b in spec.batch_sizes):
            problems.append(
                f"methods[{i}].params.labels: idlg recovers the label of a single "
                "image; use batch_sizes: [1] or labels: yin"
            )
    return problems


def _param_type_problems(method: str, params: Mapping[str, Any]) -> list[str]:
    """'iterations: must be an integer (got 'twenty')' for params of the wrong scalar type,
    checked before the config is built (its range checks would fail on the type instead)."""
    hints = typing.get_type_hints(config_class(method))
    problems = []
    for name, value in params.items():
        expected = hints.get(name)
        ok = _SCALAR_CHECKS.get(expected)  # type: ignore[call-overload]
        if ok is not None and not ok[0](value):
            problems.append(f"{name}: must be {ok[1]} (got {value!r})")
    return problems


_SCALAR_CHECKS: dict[Any, tuple[Any, str]] = {
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
}


def _axis_problems(spec: GridSpec) -> list[str]:
    problems = []
    for single, plural in (("victim", "victims"), ("generator", "generators")):
        if getattr(spec, single) is not None and getattr(spec, plural) is not None:
            problems.append(f"{plural}: write either {single}: or {plural}:, not both")
    if not spec.victim_axis:
        problems.append("victim: required (write e.g. victim: {arch: convnet})")
    for name, axis in (("victims", spec.victim_axis), ("generators", spec.generator_axis)):
        dumped = [canonical_json(x.model_dump(mode="json")) for x in axis]
        if len(set(dumped)) < len(dumped):
            problems.append(f"{name}: the same entry is listed twice")
    return problems


def _variant_problems(spec: GridSpec) -> list[str]:
    """Two configurations must never share a table row: refuse a `label` reused for a
    different configuration of the same method. (An entry repeated verbatim is one
    configuration: its cells have the same ids and collapse.)"""
    configs: dict[int, str] = {}
    for i, m in enumerate(spec.methods):
        try:
            configs[i] = canonical_json(dataclasses.asdict(resolved_config(m)))
        except (ConfigError, TypeError):
            continue  # unknown method or bad params: reported by _method_problems
    problems: list[str] = []
    if len(configs) < len(spec.methods):
        return problems
    names = variant_labels(spec.methods, [resolved_config(m) for m in spec.methods])
    seen: dict[tuple[str, str], str] = {}
    for i, config in configs.items():
        m = spec.methods[i]
        if seen.setdefault((m.name, names[i]), config) != config:
            problems.append(
                f"methods[{i}].label: {names[i]!r} already names a different {m.name} "
                "configuration; give each configuration its own label"
            )
    return problems


def _baseline_problems(spec: GridSpec) -> list[str]:
    names = {m.name for m in spec.methods} | {m.label for m in spec.methods if m.label}
    if spec.baseline is None or spec.baseline in names:
        return []
    known = ", ".join(sorted(names))
    return [f"baseline: {spec.baseline!r} is none of the grid's methods or labels ({known})"]


def variant_labels(methods: Sequence[MethodSpec], configs: Sequence[Any]) -> list[str]:
    """One table name per method entry: its `label`, else its preset followed by the
    parameters it sets away from the preset and those whose values differ between entries of
    the same method and preset ('paper', 'tuned', 'paper lr=0.01, tv=0.2'). Budget fields
    (iterations, restarts) are left out unless they differ. Distinct configurations get
    distinct names."""
    dicts = [dataclasses.asdict(c) for c in configs]
    out = []
    for m, d in zip(methods, dicts, strict=True):
        if m.label is not None:
            out.append(m.label)
            continue
        # compared within the same method AND preset: the preset name already tells a tuned
        # entry from a paper one, so their differing values need not be spelled out
        same = [
            o
            for n, o in zip(methods, dicts, strict=True)
            if n.name == m.name and o["preset"] == d["preset"]
        ]
        differ = {k for k in d if len({canonical_json(o[k]) for o in same}) > 1}
        explicit = {k for k in m.params if not _is_budget(k)}
        keys = sorted((differ | explicit) - {"preset", "tuned_on"})
        out.append(" ".join([d["preset"], ", ".join(f"{k}={d[k]}" for k in keys)]).strip())
    return out


def _is_budget(name: str) -> bool:
    return (
        name == "iterations" or name.endswith("_iterations") or name in ("restarts", "curve_every")
    )


def resolved_config(m: MethodSpec) -> Any:
    """The method's full frozen config: preset values overridden by the entry's params."""
    return method_config(m.name, m.params, preset=m.preset)


def _generator_problems(spec: GridSpec) -> list[str]:
    needing = [m.name for m in spec.methods if m.name in METHOD_NAMES and uses_generator(m.name)]
    if needing and not spec.generator_axis:
        return [
            f"generator: required by {', '.join(dict.fromkeys(needing))} "
            "(write e.g. generator: {kind: dcgan32})"
        ]
    return []


def _checkpoint_problems(spec: GridSpec) -> list[str]:
    paths = {
        **{_axis_field(spec, "victim", i): v.checkpoint for i, v in enumerate(spec.victim_axis)},
        **{
            _axis_field(spec, "generator", i): g.checkpoint
            for i, g in enumerate(spec.generator_axis)
        },
    }
    return [
        f"{field}.checkpoint: no such file {path!r}"
        for field, path in paths.items()
        if path is not None and not Path(path).is_file()
    ]


def _axis_field(spec: GridSpec, single: str, i: int) -> str:
    """'victim' for the single form, 'victims[1]' for the list form (error paths)."""
    return f"{single}s[{i}]" if getattr(spec, f"{single}s") is not None else single


def _data_problems(spec: GridSpec) -> list[str]:
    d = spec.data
    try:
        info = dataset_info(d.dataset, image_size=d.image_size)
    except ConfigError as e:
        return [f"data.dataset: {e}"]
    problems, used = [], []
    for j, b in enumerate(spec.batch_sizes):
        available = max_batches(
            d.dataset, batch_size=b, image_size=d.image_size, shuffle_seed=d.shuffle_seed
        )
        if available < d.first_batch + d.num_batches:
            problems.append(
                f"batch_sizes[{j}]: {d.dataset!r} ({info.num_samples} samples) supplies only "
                f"{available} non-overlapping batches of {b}; data.num_batches is "
                f"{d.num_batches} from data.first_batch {d.first_batch}"
            )
            continue
        used += [i for k in evaluation_batches(spec) for i in _indices(spec, b, k)]
    if not problems:  # the tuning's held-out images (when some exist) are decoded too
        held_out = find_tuning_batches(spec, spec.batch_sizes[0])
        if held_out is not None:
            used += tuning_samples(spec, spec.batch_sizes[0], held_out)
        elif spec.tuning.stage:  # a grid that tunes itself needs held-out samples now
            try:
                tuning_batches(spec, spec.batch_sizes[0])
            except ConfigError as e:
                problems.append(str(e))
    # every image a grid (or its tuning) will attack is decoded once, before any submission
    problems += [
        f"data.dataset: {m}" for m in check_decodable(d.dataset, used, image_size=d.image_size)
    ]
    return problems


def data_colour(spec: GridSpec) -> str:
    """The grid's colour model, 'gray' or 'rgb': `data.colour`, or detected from the data."""
    d = spec.data
    return d.colour if d.colour != "auto" else detect_colour(d.dataset)


# What must match for tuned values to count as tuned for a grid (issue 16 Deliver 4).
CONTEXT_KEYS = ("dataset", "image_size", "colour", "victims", "method", "budget")


def tuning_context(spec: GridSpec, method: str, config: Any) -> dict[str, Any]:
    """Where values are (or were) tuned: the grid's data, colour model and victims, the method
    and the budget of its resolved `config` (iterations per stage, restarts)."""
    budget = {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k in ("iterations", "restarts") or k.endswith("_iterations")
    }
    return {
        "grid": spec.name,
        "dataset": spec.data.dataset,
        "image_size": spec.data.image_size,
        "colour": data_colour(spec),
        "victims": [v.model_dump(mode="json") for v in spec.victim_axis],
        "method": method,
        "budget": budget,
    }


def mark_provenance(spec: GridSpec, method: str, config: Any) -> Any:
    """`config` with its `tuned_on` stating which of CONTEXT_KEYS differ between where its
    values were tuned and this grid (`differs: []`: tuned for this grid). Every row carries it
    (`param_tuned_on`), so values reused from elsewhere are marked wherever they are shown."""
    if not config.tuned_on:
        return config
    try:
        written = json.loads(config.tuned_on)
    except ValueError:
        written = None
    if not isinstance(written, dict):
        raise ConfigError(
            f"params.tuned_on: {method} has {config.tuned_on[:60]!r}; it holds the JSON that "
            "`gi-eval tune` writes: leave it as written or delete it"
        )
    origin = {k: v for k, v in written.items() if k != "differs"}
    here = tuning_context(spec, method, config)
    differs = [k for k in CONTEXT_KEYS if canonical_json(origin.get(k)) != canonical_json(here[k])]
    return dataclasses.replace(config, tuned_on=canonical_json({**origin, "differs": differs}))


def evaluation_batches(spec: GridSpec) -> range:
    """Batch numbers of the evaluation: `data.num_batches` from `data.first_batch` on."""
    return range(spec.data.first_batch, spec.data.first_batch + spec.data.num_batches)


def evaluation_samples(spec: GridSpec) -> frozenset[int]:
    """Every data set sample index the evaluation attacks, over ALL batch sizes (a batch
    number names different samples at each batch size: B = 1 batch 98 is a sample of B = 4
    batch 24). Batch sizes whose plan is too short are skipped (reported by validation)."""
    d = spec.data
    samples: set[int] = set()
    for b in spec.batch_sizes:
        available = max_batches(
            d.dataset, batch_size=b, image_size=d.image_size, shuffle_seed=d.shuffle_seed
        )
        for k in evaluation_batches(spec):
            if k < available:
                samples.update(_indices(spec, b, k))
    return frozenset(samples)


def find_tuning_batches(spec: GridSpec, batch_size: int) -> range | None:
    """The last `tuning.batches` consecutive batches of the plan for `batch_size` none of whose
    samples the evaluation attacks at any batch size; None if there are none."""
    d = spec.data
    available = max_batches(
        d.dataset, batch_size=batch_size, image_size=d.image_size, shuffle_seed=d.shuffle_seed
    )
    evaluated = evaluation_samples(spec)
    clean = [evaluated.isdisjoint(_indices(spec, batch_size, k)) for k in range(available)]
    n = spec.tuning.batches
    for first in range(available - n, -1, -1):
        if all(clean[first : first + n]):
            return range(first, first + n)
    return None


def tuning_batches(spec: GridSpec, batch_size: int) -> range:
    """Batch numbers `gi-eval tune` uses: the last `tuning.batches` consecutive batches of the
    plan that share no SAMPLE with the evaluation at any batch size (ConfigError if none)."""
    held_out = find_tuning_batches(spec, batch_size)
    if held_out is None:
        d = spec.data
        raise ConfigError(
            f"tuning.batches: no {spec.tuning.batches} consecutive batches of "
            f"{batch_size} of {d.dataset!r} avoid every sample the evaluation attacks "
            f"({len(evaluation_samples(spec))} samples: batches {d.first_batch}-"
            f"{d.first_batch + d.num_batches - 1} at batch sizes "
            f"{list(spec.batch_sizes)}). Lower data.num_batches or tuning.batches"
        )
    return held_out


def tuning_samples(spec: GridSpec, batch_size: int, held_out: range) -> frozenset[int]:
    """The sample indices of the held-out batches `held_out` of `batch_size`."""
    return frozenset(i for k in held_out for i in _indices(spec, batch_size, k))


def _indices(spec: GridSpec, batch_size: int, batch_index: int) -> list[int]:
    d = spec.data
    return batch_indices(
        d.dataset,
        batch_size=batch_size,
        batch_index=batch_index,
        image_size=d.image_size,
        shuffle_seed=d.shuffle_seed,
    )


def _each(values: Any, ok: Any, rule: str) -> Any:
    for x in values or ():
        if not ok(x):
            raise ValueError(f"{rule} (got {x})")
    return values


def canonical_json(obj: Any) -> str:
    """Stable JSON: sorted keys, no whitespace, floats by shortest repr (so 0.1 == 1e-1 once
    parsed), NaN/inf refused. The basis of every cell id."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def parse_spec(data: Mapping[str, Any]) -> GridSpec:
    """Validate a spec given as plain data; ConfigError lists every bad field."""
    try:
        return GridSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError("invalid grid spec:\n  " + "\n  ".join(_messages(e))) from e


def spec_from_yaml(text: str) -> GridSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"grid spec is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError("grid spec must be a YAML mapping at the top level")
    return parse_spec(data)


def load_spec(path: Path | str) -> GridSpec:
    return spec_from_yaml(read_spec_text(path))


def read_spec_text(path: Path | str) -> str:
    """The spec file's text; ConfigError names the file when it is missing or not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"spec: {path} is not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start}); "
            "save it as UTF-8"
        ) from e
    except OSError as e:
        raise ConfigError(f"spec: cannot read {path}: {e.strerror or e}") from e


def _messages(error: ValidationError) -> list[str]:
    lines = []
    errors = error.errors()
    for err in errors:
        if _follows_from_items(err, errors):
            continue
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "too_short":  # pydantic's "Tuple should have at least 1 item ..."
            ctx = err.get("ctx", {})
            msg = f"must list at least {ctx.get('min_length', 1)} (got {ctx.get('actual_length')})"
        where = _dotted(err["loc"])
        for line in msg.splitlines():  # semantic problems arrive as one multi-line message
            lines.append(f"{where}: {line}" if where else line)
    return lines


def _follows_from_items(err: Any, errors: list[Any]) -> bool:
    """A tuple's min_length counts only its valid items, so one bad item of a required list
    also reports 'Tuple should have at least 1 item'; that line says nothing new, drop it."""
    loc = tuple(err["loc"])
    return err["type"] == "too_short" and any(
        len(other["loc"]) > len(loc) and tuple(other["loc"][: len(loc)]) == loc for other in errors
    )


def _dotted(loc: tuple[int | str, ...]) -> str:
    """('defenses', 1, 'p') -> 'defenses[1].p'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
