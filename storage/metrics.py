"""Per-image metrics as a hive-partitioned Parquet dataset with an explicit schema.

Layout: metrics/method=<percent-encoded name>/part-<cell id>.parquet, one immutable file per
inversion cell; its presence is the cell's commit marker. The method is *only* the partition
key, not a column inside the files: pyarrow, pandas and duckdb all URL-decode hive values
('gi-z%2Fw%2Bbn' -> 'gi-z/w+bn'), whereas a file column of the same name clashes with the
partition field (pyarrow refuses to merge string with dictionary<string>).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import platform
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storage.atomic import publishing
from storage.errors import StorageError

PARTITION_KEY = "method"
PART_PREFIX = "part-"
PARQUET_SUFFIX = ".parquet"

# Columns written by the caller, one row per image of the batch; grid axes are columns so a
# table is one groupby away. Order here is the column order in every file.
_AXES = [
    ("cell_id", pa.string()),
    ("gradient_id", pa.string()),
    # the configuration: a table row is one (method, variant); method_params is the full
    # resolved config as canonical JSON, param_<field> the same values flattened (below)
    ("variant", pa.string()),
    ("preset", pa.string()),  # paper | tuned
    ("method_params", pa.string()),
    ("dataset", pa.string()),
    ("image_size", pa.int64()),
    ("data_seed", pa.int64()),  # the batch plan's shuffle seed; null: the fixed plan
    ("victim", pa.string()),
    ("victim_width", pa.int64()),  # null: the architecture's default width
    ("victim_seed", pa.int64()),
    ("victim_checkpoint_sha256", pa.string()),  # null: untrained (random init from the seed)
    ("generator", pa.string()),  # null for methods without a generator prior
    ("generator_checkpoint_sha256", pa.string()),  # weights file; null: random init
    ("defense", pa.string()),
    ("defense_level", pa.float64()),
    ("defense_p", pa.float64()),
    ("defense_sigma", pa.float64()),
    ("defense_clip", pa.float64()),
    ("defense_bits", pa.int64()),
    ("dp_epsilon", pa.float64()),  # (epsilon, delta) of a DP defense; null otherwise
    ("dp_delta", pa.float64()),
    ("batch_size", pa.int64()),
    ("batch_index", pa.int64()),
    ("seed", pa.int64()),
]
# Issue 16, one block: the configuration's identity and the cell's budget.
_IDENTITY_AND_BUDGET = [
    # tasks.cells.InversionCell.configuration(): the whole id payload less what repeats differ
    # in, as canonical JSON (flattened to cfg.<dotted key> columns by pipelines.aggregate), and
    # its hash. Tables group by it, so two configurations never share a column.
    ("config_id", pa.string()),
    ("config", pa.string()),
    # The budget (tasks.budget): iterations per stage as JSON {"z": 100, "w": 100}, their sum,
    # restarts, victim gradient evaluations (iterations x restarts: one forward+backward of
    # the victim per restart per iteration), the matched-budget request, if any, and the
    # cost-table price in seconds of this attack (null where no cost-table entry applies).
    ("budget_stage_iterations", pa.string()),
    ("budget_iterations", pa.int64()),
    ("budget_restarts", pa.int64()),
    ("budget_grad_evals", pa.int64()),
    ("budget_match", pa.string()),  # null | grad_evals | seconds
    ("budget_match_value", pa.float64()),
    ("budget_priced_seconds", pa.float64()),
]
IDENTITY_AND_BUDGET_COLUMNS = frozenset(name for name, _ in _IDENTITY_AND_BUDGET)
# Issue 19, the threat-model manifest (tasks.cells.InversionCell.threat_model, decision 197):
# what the attacker was given. Null in rows written before these columns existed.
_THREAT_MODEL = [
    ("tm_labels", pa.string()),  # given | recovered:<idlg | yin | count>
    ("tm_bn_stats", pa.string()),  # batch (a "+bn" attack is handed them) | none
    ("protocol", pa.string()),  # fedsgd | fedavg | aggregate
    ("local_steps", pa.int64()),  # local training of fedavg (null: the client sends gradients)
    ("local_batch_size", pa.int64()),  # null: the whole batch at each local step
    ("local_lr", pa.float64()),
    ("n_clients", pa.int64()),  # clients whose mean the server sees (1: one client)
    ("batch_labels", pa.string()),  # how the batch drew its labels: distinct | random | <k>
    ("tm_colour", pa.string()),  # the data's colour model the attack used: gray | rgb
    ("tm_prior", pa.string()),  # generator kind[@checkpoint] | none
    # the victim's training stage (decision 270): FedAvg rounds (0: untrained), the training's
    # hyperparameters less rounds as canonical JSON ("none": untrained), and the sha256 of the
    # weights attacked (gi_core.victims.weights_sha256; trained or not)
    ("victim_rounds", pa.int64()),
    ("victim_training", pa.string()),
    ("victim_sha256", pa.string()),
]
THREAT_MODEL_COLUMNS = frozenset(name for name, _ in _THREAT_MODEL)


def _param_columns() -> list[tuple[str, pa.DataType]]:
    """param_<field> for every field of every registered method's config (null where a method
    has no such field), typed from the config dataclasses."""
    from gi_core.attacks.registry import METHOD_NAMES, config_class

    # other field types (tuples, unions) are stored as their JSON text (tasks.cells.param_value)
    types = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}
    columns: dict[str, pa.DataType] = {}
    for name in METHOD_NAMES:
        for f in dataclasses.fields(config_class(name)):
            if f.name != "preset":
                columns.setdefault(f"param_{f.name}", types.get(str(f.type), pa.string()))
    return sorted(columns.items())


_PARAMS = _param_columns()
PARAM_COLUMNS = frozenset(name for name, _ in _PARAMS)
# Configuration columns a writer may leave out (null): provenance of weights, defense
# parameters, DP budget, shuffle seed. The pipeline always fills them (tasks.work); the
# identifying ones (cell_id, method, variant, preset, method_params, ...) stay required.
CONFIG_OPTIONAL = frozenset({
    "data_seed", "victim_width", "victim_checkpoint_sha256", "generator_checkpoint_sha256",
    "defense_p", "defense_sigma", "defense_clip", "defense_bits", "dp_epsilon", "dp_delta",
})  # fmt: skip
_PER_IMAGE = [
    ("image_index", pa.int64()),  # position in the batch, 0..B-1
    ("sample_index", pa.int64()),  # index into the data set
    ("label", pa.int64()),
    ("labels", pa.string()),  # how the attacker got its labels: given | idlg | yin
    ("label_accuracy", pa.float64()),  # fraction of the batch's labels it had right (1.0: given)
    ("psnr", pa.float64()),
    ("ssim", pa.float64()),
    ("lpips", pa.float64()),
    ("best_psnr_in_batch", pa.bool_()),
    ("best_ssim_in_batch", pa.bool_()),
    ("best_lpips_in_batch", pa.bool_()),
    ("final_cost", pa.float64()),
    ("status", pa.string()),
    ("iterations", pa.int64()),
    ("wall_seconds", pa.float64()),
    ("device", pa.string()),
    # Where the cell ran (tasks.executors.job_environment); null where unknown (inline: no job).
    ("slurm_job_id", pa.string()),  # "123" or "123_4" (array job 123, element 4)
    ("slurm_array_index", pa.int64()),
    ("host", pa.string()),
    ("device_name", pa.string()),  # GPU model (e.g. "NVIDIA H200") or "cpu"
    # schedule provenance (#20): how the cell was run, which must never change its numbers
    # (tasks.work.rows._schedule_columns); null in rows written before these columns existed.
    ("attempts", pa.int64()),  # this attempt's number (earlier ones that left a trace + 1)
    ("resumed_from_iteration", pa.int64()),  # global iteration of the checkpoint; null: fresh
    ("batch_group_size", pa.int64()),  # cells of its batch-key group run in the same unit
    ("threads", pa.int64()),  # torch.get_num_threads() while it ran
]
# R-GAP (issue 19): the relative error ‖x̂_i − x_i‖ / ‖x_i‖ of each victim layer's recovered
# input, as a JSON list from the victim's input (index 0) up; null for the methods that
# recover no layer (gi_core.attacks.rgap.layer_errors, tasks.work.inversion).
_LAYERS = [("layer_errors", pa.string())]
LAYER_COLUMNS = frozenset(name for name, _ in _LAYERS)
JOB_COLUMNS = frozenset({"slurm_job_id", "slurm_array_index", "host", "device_name"})
SCHEDULE_COLUMNS = frozenset({"attempts", "resumed_from_iteration", "batch_group_size", "threads"})
# Filled in by write_metrics_part, never by the caller.
_PROVENANCE = [
    ("gi_eval_version", pa.string()),
    ("torch_version", pa.string()),
    ("python_version", pa.string()),
    ("git_commit", pa.string()),
]
SCHEMA = pa.schema(
    _AXES + _IDENTITY_AND_BUDGET + _THREAT_MODEL + _PARAMS + _PER_IMAGE + _LAYERS + _PROVENANCE
)
ROW_COLUMNS: tuple[str, ...] = tuple(
    name
    for name, _ in _AXES + _IDENTITY_AND_BUDGET + _THREAT_MODEL + _PARAMS + _PER_IMAGE + _LAYERS
)
# The schema a reader sees: the file schema plus the partition column.
DATASET_SCHEMA = SCHEMA.append(pa.field(PARTITION_KEY, pa.string()))


def partition_dirname(method: str) -> str:
    """'gi-z/w+bn' -> 'method=gi-z%2Fw%2Bbn': filesystem-safe, reversible, hive-decodable."""
    if not method:
        raise StorageError("metrics rows need a non-empty method name")
    return f"{PARTITION_KEY}={urllib.parse.quote(method, safe='')}"


def method_of_dirname(dirname: str) -> str | None:
    """Inverse of partition_dirname; None for names that are not a partition directory."""
    key, sep, value = dirname.partition("=")
    return urllib.parse.unquote(value) if sep and key == PARTITION_KEY and value else None


# What a cell id may look like (tasks.cells: 16 hex digits; tests use short names). Anything
# else in a committed file's place ("part-<id> (1).parquet" of a sync tool, "<id>.sync-conflict-
# ...", an editor's backup) is a stray copy: never counted, reported by `gi-eval verify`.
CELL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def is_cell_id(text: str) -> bool:
    return CELL_ID.fullmatch(text) is not None


def part_filename(cell_id: str) -> str:
    return f"{PART_PREFIX}{cell_id}{PARQUET_SUFFIX}"


def cell_of_part(filename: str) -> str | None:
    """Cell id of a committed part file name; None for anything else (temp files and stray
    copies such as "part-<id> (1).parquet" included)."""
    if filename.startswith(PART_PREFIX) and filename.endswith(PARQUET_SUFFIX):
        cell = filename[len(PART_PREFIX) : -len(PARQUET_SUFFIX)]
        return cell if is_cell_id(cell) else None
    return None


def write_metrics_part(metrics_dir: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Commit one inversion cell: write its rows as metrics/method=<m>/part-<cell id>.parquet.

    Every row needs `method` plus exactly ROW_COLUMNS; all rows share cell_id and method.
    Provenance columns are added here. The file appears atomically (temp name + rename), so
    the moment it exists the cell is committed.
    """
    method, cell_id = _single_cell(rows)
    table = rows_to_table([{k: v for k, v in r.items() if k != PARTITION_KEY} for r in rows])
    final = metrics_dir / partition_dirname(method) / part_filename(cell_id)
    with publishing(final) as tmp:
        pq.write_table(table, tmp)
    return final


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """A table with exactly SCHEMA (provenance filled in); StorageError names a bad column."""
    for i, row in enumerate(rows):
        # params and where-it-ran columns: null if absent
        # (identity and budget too: rows written before issue 16 lack them; the pipeline
        # always fills them, and pipelines.aggregate falls back to the named axes)
        optional = (
            PARAM_COLUMNS
            | JOB_COLUMNS
            | CONFIG_OPTIONAL
            | IDENTITY_AND_BUDGET_COLUMNS
            | THREAT_MODEL_COLUMNS
            | SCHEDULE_COLUMNS
            | LAYER_COLUMNS
        )
        missing = sorted(set(ROW_COLUMNS) - set(row) - optional)
        extra = sorted(set(row) - set(ROW_COLUMNS))
        if missing or extra:
            raise StorageError(f"metrics row {i}: missing columns {missing}, unknown {extra}")
    full = [{**row, **provenance()} for row in rows]
    try:
        return pa.Table.from_pylist(full, schema=SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise StorageError(f"metrics rows do not fit the schema: {e}") from e


def _single_cell(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    if not rows:
        raise StorageError("a metrics part needs at least one row")
    keys = {(str(r.get(PARTITION_KEY, "")), str(r.get("cell_id", ""))) for r in rows}
    if len(keys) != 1:
        raise StorageError(f"one part holds one cell of one method; got {sorted(keys)}")
    method, cell_id = keys.pop()
    if not is_cell_id(cell_id):
        raise StorageError(f"invalid cell_id {cell_id!r} (letters, digits, '-' and '_' only)")
    return method, cell_id


@functools.cache
def provenance() -> dict[str, str]:
    """Package versions and the project's git commit, computed once per process."""
    return {
        "gi_eval_version": _version("gi-eval"),
        "torch_version": torch.__version__,  # includes the build tag, e.g. +cu130
        "python_version": platform.python_version(),
        "git_commit": _git_commit(),
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _git_commit() -> str:
    # The commit of the code that ran (this checkout), not of the run directory.
    return git_head(Path(__file__).resolve().parent.parent)


_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def git_head(repo: Path) -> str:
    """The commit checked out in `repo`, read from git's files (gitrepository-layout: HEAD, a
    loose ref, packed-refs; a worktree's `.git` file and `commondir`) without starting git:
    provenance is read in every job and in unit tests, which start no processes. "unknown"
    when `repo` is no checkout or its HEAD cannot be resolved."""
    try:
        git = repo / ".git"
        if git.is_file():  # a linked worktree or submodule: "gitdir: <path>"
            git = (repo / git.read_text().split(":", 1)[1].strip()).resolve()
        common = git / "commondir"
        common_dir = (git / common.read_text().strip()).resolve() if common.is_file() else git
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head if _SHA.fullmatch(head) else "unknown"
        ref = head.removeprefix("ref: ")
        for base in (git, common_dir):
            if (base / ref).is_file():
                commit = (base / ref).read_text().strip()
                return commit if _SHA.fullmatch(commit) else "unknown"
        packed = common_dir / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else []:
            if line.endswith(f" {ref}") and _SHA.fullmatch(line.split()[0]):
                return line.split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        pass
    return "unknown"
