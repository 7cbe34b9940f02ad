"""The grid spec: a typed, locked description of an evaluation grid (docs/grid-spec.md).

Every model forbids unknown keys and is frozen. `load_spec` validates everything that can be
checked before launch — field types and ranges, method names and parameters (via gi_core's
registry), the generator a method needs, checkpoint files, and whether the data set can supply
the requested non-overlapping batches — and raises one ConfigError listing every bad field by
its path, e.g. "defenses[1].p: must be in [0, 1) (got 1.2)".

The package, along its seams (each module imports only those above it; schema's validator calls
checks, which name the models only for the type checker):
  base       the locked base model, scalar-or-list fields, dump helpers
  plan       the data's colour model and batch plan (evaluation and held-out tuning batches)
  identity   canonical JSON (every cell id) and the `tuned_on` provenance mark
  checks     cross-field and data/file checks, method resolution and table labels
  execution  executor kind and Slurm resources (how cells run, never what they compute)
  schema     the pydantic models, GridSpec last
  parse      YAML/plain data -> GridSpec, one ConfigError listing every bad field
Importers use `tasks.spec` itself; the names below are its interface.
"""

from tasks.spec.base import Floats, Ints, _Model
from tasks.spec.checks import resolved_config, semantic_problems, variant_labels
from tasks.spec.execution import (
    EXECUTOR_KINDS,
    ExecutionSpec,
    ExecutorKind,
    SlurmResources,
    SlurmSpec,
)
from tasks.spec.identity import CONTEXT_KEYS, canonical_json, mark_provenance, tuning_context
from tasks.spec.parse import _messages, load_spec, parse_spec, read_spec_text, spec_from_yaml
from tasks.spec.plan import (
    batches_needed,
    cell_indices,
    client_batches,
    data_colour,
    evaluation_batches,
    evaluation_samples,
    find_tuning_batches,
    label_draw,
    label_draws,
    training_clients,
    training_samples,
    tuning_batches,
    tuning_samples,
)
from tasks.spec.schema import (
    DATASET_KINDS,
    BudgetSpec,
    DataSpec,
    DefenseSpec,
    GeneratorSpec,
    GridSpec,
    MethodSpec,
    NormalizeSpec,
    ProtocolSpec,
    StorageSpec,
    StyleGAN2ArchSpec,
    TrainSpec,
    TuningSpec,
    VictimSpec,
    untrained_only,
)

__all__ = [
    "CONTEXT_KEYS",
    "DATASET_KINDS",
    "EXECUTOR_KINDS",
    "BudgetSpec",
    "DataSpec",
    "DefenseSpec",
    "ExecutionSpec",
    "ExecutorKind",
    "Floats",
    "GeneratorSpec",
    "GridSpec",
    "Ints",
    "MethodSpec",
    "NormalizeSpec",
    "ProtocolSpec",
    "SlurmResources",
    "SlurmSpec",
    "StorageSpec",
    "StyleGAN2ArchSpec",
    "TrainSpec",
    "TuningSpec",
    "VictimSpec",
    "_Model",
    "_messages",
    "batches_needed",
    "canonical_json",
    "cell_indices",
    "client_batches",
    "data_colour",
    "evaluation_batches",
    "evaluation_samples",
    "find_tuning_batches",
    "label_draw",
    "label_draws",
    "load_spec",
    "mark_provenance",
    "parse_spec",
    "read_spec_text",
    "resolved_config",
    "semantic_problems",
    "spec_from_yaml",
    "training_clients",
    "training_samples",
    "tuning_batches",
    "tuning_context",
    "tuning_samples",
    "untrained_only",
    "variant_labels",
]
