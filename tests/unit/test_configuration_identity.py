"""Issue 16, Deliver 1: one identity per configuration, derived from the full resolved config.

The schema walk visits every leaf field of the grid spec (tasks/spec.py, walked from the
pydantic models, so a new field is visited without editing this file) and every field of every
method's config (gi_core's dataclasses), builds two specs that differ only there, and checks
that their cells land in different table columns (setting block x column label). Fields that
are not configuration are listed, with the reason, in NOT_CONFIGURATION.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel

from gi_core.attacks.registry import METHOD_NAMES, config_class, uses_generator
from pipelines import aggregate as ag
from tasks.cells import expand
from tasks.spec import GridSpec, parse_spec

# Spec fields that are not part of a configuration, and why. Anything else must reach the rows.
NOT_CONFIGURATION: dict[str, str] = {
    "name": "the grid's name (its run directory), not an attack setting",
    "data.num_batches": "which batches are attacked: repeats of one configuration",
    "data.first_batch": "which batches are attacked: repeats of one configuration",
    "seeds": "attack seeds: repeats of one configuration",
    "methods.label": "a display name; renaming a configuration recomputes nothing",
    "victims": "the list form of `victim` (walked there)",
    "generators": "the list form of `generator` (walked there)",
    "execution": "how cells run (executor, Slurm), never what they compute",
    "storage": "what is stored beside the metrics (restart images, snapshots)",
    "tuning": "`gi-eval tune`'s held-out search, not the evaluation's cells",
    "baseline": "which comparisons the report tests, not what any cell computes",
}

BASE: dict[str, Any] = {
    "name": "walk",
    "data": {"dataset": "synthetic", "num_batches": 1},
    "victim": {"arch": "lenet"},
    "generator": {
        "kind": "stylegan2",
        "stylegan2": {"resolution": 32, "channels": [8, 8, 8, 8], "z_dim": 8, "w_dim": 8},
    },
    "methods": ["gi-x", "gi-z/w"],
    "batch_sizes": [2],
}
NORMALIZE = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
# A value that differs from BASE for each spec leaf (path -> new value, or a function of the
# base spec and tmp dir returning the (a, b) pair where a leaf needs a different base).
Pair = Callable[[dict[str, Any], Path], tuple[dict[str, Any], dict[str, Any]]]


def _set(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    *parents, leaf = path.split(".")
    node = out
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


def _files(tmp: Path) -> tuple[str, str]:
    a, b = tmp / "a.pt", tmp / "b.pt"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    return str(a), str(b)


def _checkpoint(section: str, kind: dict[str, Any]) -> Pair:
    def pair(base: dict[str, Any], tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        fa, fb = _files(tmp)
        return _set(base, section, {**kind, "checkpoint": fa}), _set(
            base, section, {**kind, "checkpoint": fb}
        )

    return pair


def _training(field: str, a: Any, b: Any) -> Pair:
    def pair(base: dict[str, Any], tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        train = {"rounds": [1], "clients": 1, "batch_size": 2}
        return _set(base, "victim.train", {**train, field: a}), _set(
            base, "victim.train", {**train, field: b}
        )

    return pair


def _method(name: str, **entry: Any) -> Pair:
    def pair(base: dict[str, Any], tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        return {**base, "methods": [name]}, {**base, "methods": [{"name": name, **entry}]}

    return pair


SPEC_VALUES: dict[str, Any] = {
    "data.dataset": "lfw-faces",
    "data.image_size": 64,
    "data.shuffle_seed": 3,
    "data.colour": "gray",
    "victim.arch": "convnet",
    "victim.width": 8,
    "victim.seed": 1,
    "victim.checkpoint": _checkpoint("victim", {"arch": "lenet"}),
    "victim.normalize.mean": lambda base, tmp: (
        _set(base, "victim.normalize", NORMALIZE),
        _set(base, "victim.normalize", {**NORMALIZE, "mean": [0.4, 0.5, 0.5]}),
    ),
    "victim.normalize.std": lambda base, tmp: (
        _set(base, "victim.normalize", NORMALIZE),
        _set(base, "victim.normalize", {**NORMALIZE, "std": [0.2, 0.25, 0.25]}),
    ),
    # a trained victim (decision 270): every training field, the rounds axis included
    **{
        f"victim.train.{field}": _training(field, a, b)
        for field, a, b in (
            ("rounds", [1], [2]),
            ("clients", 1, 2),
            ("batch_size", 2, 4),
            ("local_steps", 1, 2),
            ("lr", 0.1, 0.2),
            ("seed", 0, 1),
        )
    },
    "generator.kind": lambda base, tmp: (
        _set(base, "generator", {"kind": "dcgan32"}),
        _set(base, "generator", {"kind": "dcgan64"}),
    ),
    "generator.checkpoint": _checkpoint("generator", {"kind": "dcgan32"}),
    "generator.latent_space": "z",
    "generator.noise": "random",
    "generator.stylegan2.resolution": lambda base, tmp: (
        base,
        _set(base, "generator.stylegan2", {"resolution": 64, "channels": [8] * 5}),
    ),
    "generator.stylegan2.channels": [8, 8, 8, 4],
    "generator.stylegan2.z_dim": 16,
    "generator.stylegan2.w_dim": 16,
    "generator.stylegan2.mapping_layers": 2,
    "generator.stylegan2.seed": 1,
    "methods.name": lambda base, tmp: (
        {**base, "methods": ["gi-x"]},
        {**base, "methods": ["gi-x+bn"]},
    ),
    "methods.preset": _method("gi-x", preset="tuned"),
    "defenses.kind": lambda base, tmp: (
        base,
        {**base, "defenses": [{"kind": "noise", "sigma": 0.0}]},
    ),
    "defenses.p": lambda base, tmp: (
        {**base, "defenses": [{"kind": "sparsity", "p": 0.5}]},
        {**base, "defenses": [{"kind": "sparsity", "p": 0.9}]},
    ),
    "defenses.sigma": lambda base, tmp: (
        {**base, "defenses": [{"kind": "noise", "sigma": 0.1}]},
        {**base, "defenses": [{"kind": "noise", "sigma": 0.2}]},
    ),
    "defenses.clip": lambda base, tmp: (
        {**base, "defenses": [{"kind": "dp", "clip": 1.0, "sigma": 0.1}]},
        {**base, "defenses": [{"kind": "dp", "clip": 2.0, "sigma": 0.1}]},
    ),
    "defenses.bits": lambda base, tmp: (
        {**base, "defenses": [{"kind": "quantize", "bits": 4}]},
        {**base, "defenses": [{"kind": "quantize", "bits": 8}]},
    ),
    "defenses.k": lambda base, tmp: (
        {**base, "defenses": [{"kind": "disguise", "k": 1}]},
        {**base, "defenses": [{"kind": "disguise", "k": 2}]},
    ),
    "data.batch_labels": "random",
    "protocols.kind": lambda base, tmp: (
        base,
        {**base, "protocols": [{"kind": "fedavg"}]},
    ),
    "protocols.local_steps": lambda base, tmp: (
        {**base, "protocols": [{"kind": "fedavg", "local_steps": 1}]},
        {**base, "protocols": [{"kind": "fedavg", "local_steps": 2}]},
    ),
    "protocols.local_batch_size": lambda base, tmp: (
        {**base, "protocols": [{"kind": "fedavg", "local_steps": 2}]},
        {**base, "protocols": [{"kind": "fedavg", "local_steps": 2, "local_batch_size": 1}]},
    ),
    "protocols.local_lr": lambda base, tmp: (
        {**base, "protocols": [{"kind": "fedavg", "local_lr": 0.1}]},
        {**base, "protocols": [{"kind": "fedavg", "local_lr": 0.2}]},
    ),
    "protocols.n_clients": lambda base, tmp: (
        {**base, "protocols": [{"kind": "aggregate", "n_clients": 1}]},
        {**base, "protocols": [{"kind": "aggregate", "n_clients": 2}]},
    ),
    "batch_sizes": [1],
    "budgets.iterations_scale": 0.5,
    "budgets.match": lambda base, tmp: (
        base,
        {**base, "budgets": {"match": "grad_evals", "value": 4000}},
    ),
    "budgets.value": lambda base, tmp: (
        {**base, "budgets": {"match": "grad_evals", "value": 4000}},
        {**base, "budgets": {"match": "grad_evals", "value": 8000}},
    ),
}
# Alternative values of method config fields by name (numbers and bools are changed generically).
PARAM_VALUES: dict[str, Any] = {
    "distance": "l2",
    "tv_form": "zero_pad",
    "labels": "yin",
    "prune_at": [0.5],
    "parametrisation": "sigmoid",
    "start": "given",
    "colour": "gray",
}


def spec_leaves(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Dotted paths of every leaf field of `model`, through Optional, tuples and Annotated."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _model_in(field.annotation)
        if sub is None:
            yield path
        else:
            yield from spec_leaves(sub, f"{path}.")


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, tuple):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _excluded(path: str) -> bool:
    return any(path == p or path.startswith(f"{p}.") for p in NOT_CONFIGURATION)


def _param_alternative(value: Any, name: str) -> Any:
    if name in PARAM_VALUES:
        return PARAM_VALUES[name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if value else 0.5
    raise AssertionError(f"no alternative value for config field {name!r}: add one to PARAM_VALUES")


# Fields a method refuses to change (GGL has no Adam stage: decision 251), so no two of its
# configurations differ in them; GIFD needs a DCGAN-kind prior (decision 252); R-GAP inverts
# one image (B = 1; lenet is of its form, decision 241).
_REFUSED = {
    "ggl": ("signed_grad", "prune_at", "plateau_window"),
    "rgap": ("restarts", "tv", "bn"),
    "rgap+g": ("tv", "bn"),
}
_BASE_FOR: dict[str, dict[str, Any]] = {
    "gifd": {"generator": {"kind": "dcgan32"}},
    "rgap": {"batch_sizes": [1]},
    "rgap+g": {"batch_sizes": [1], "generator": {"kind": "dcgan32"}},
}


def _param_pairs() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, spec a, spec b) for every config field of every method (not `preset`: walked as
    methods.preset; not `tuned_on`: provenance the pipeline writes with tuned values, which a
    spec may not set — a hand-written one exits 2)."""
    for method in METHOD_NAMES:
        cls = config_class(method)
        default = cls()
        for f in dataclasses.fields(cls):
            if f.name in ("preset", "tuned_on") or f.name in _REFUSED.get(method, ()):
                continue
            alt = _param_alternative(getattr(default, f.name), f.name)
            base = {**BASE, "methods": [method], **_BASE_FOR.get(method, {})}
            b = {**base, "methods": [{"name": method, "params": {f.name: alt}}]}
            if not uses_generator(method):
                base, b = _drop_generator(base), _drop_generator(b)
            yield f"methods.params.{method}.{f.name}", base, b


def _drop_generator(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "generator"}


def _rows(spec: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    plan = expand(parse_spec(spec))
    return [
        {
            **cell.metric_axes(),
            "method": cell.method,
            "psnr": 20.0,
            "ssim": 0.5,
            "lpips": 0.3,
            "status": "ok",
            "_spec": tag,
        }
        for cell in plan.inversion_cells
    ]


def table_positions(df: pd.DataFrame) -> pd.Series:
    """Where each row lands in Table 1: its setting block and its column label."""
    df = ag.identify(df)
    config = ag.config_columns(df)
    setting = [c for c in ag.default_by(df) if c not in config]
    keys = df[setting].map(str).agg(" | ".join, axis=1) if setting else ""
    return keys + " || " + df[ag.COLUMN]


def pooled(
    a: dict[str, Any],
    b: dict[str, Any],
    transform: Callable[[dict[str, Any]], dict[str, Any]] = lambda r: r,
) -> set[str]:
    """Positions shared by a cell of spec `a` and a different cell of spec `b` (cells in both
    specs are one configuration: e.g. gi-x's when only the generator changed)."""
    df = pd.DataFrame([transform(r) for r in _rows(a, "a") + _rows(b, "b")])
    where = table_positions(df)
    only_a = (df["_spec"] == "a") & ~df["cell_id"].isin(df.loc[df["_spec"] == "b", "cell_id"])
    only_b = (df["_spec"] == "b") & ~df["cell_id"].isin(df.loc[df["_spec"] == "a", "cell_id"])
    assert only_a.any() and only_b.any(), "the two specs must differ in some cell"
    return set(where[only_a]) & set(where[only_b])


def walk(
    tmp: Path, transform: Callable[[dict[str, Any]], dict[str, Any]] = lambda r: r
) -> dict[str, set[str]]:
    """Every configuration leaf -> the positions its two specs share (empty when kept apart)."""
    leaves = [p for p in spec_leaves(GridSpec) if not _excluded(p)]
    missing = [p for p in leaves if p not in SPEC_VALUES and p != "methods.params"]
    assert not missing, f"spec fields with no test value (add to SPEC_VALUES): {missing}"
    out: dict[str, set[str]] = {}
    for path in leaves:
        if path == "methods.params":
            for label, a, b in _param_pairs():
                out[label] = pooled(a, b, transform)
            continue
        value = SPEC_VALUES[path]
        a, b = value(BASE, tmp) if callable(value) else (BASE, _set(BASE, path, value))
        assert parse_spec(a) != parse_spec(b), path
        out[path] = pooled(a, b, transform)
    return out


def test_every_spec_and_config_field_separates_table_columns(tmp_path: Path) -> None:
    result = walk(tmp_path)
    assert len(result) > 60  # every spec leaf and every method's config fields were walked
    assert "victim.normalize.mean" in result and "generator.latent_space" in result
    assert "methods.params.gi-z/w.w_iterations" in result
    shared = {k: v for k, v in result.items() if v}
    assert not shared, f"configurations pooled in one table column: {shared}"


def _drop_from_config(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A row writer that loses `key` of the gradient's victim (the bug the walk must catch)."""

    def transform(row: dict[str, Any]) -> dict[str, Any]:
        config = json.loads(row["config"])
        config["gradient"]["victim"].pop(key, None)
        return {**row, "config": json.dumps(config, sort_keys=True)}

    return transform


def test_the_walk_fails_when_a_field_is_dropped_from_the_rows(tmp_path: Path) -> None:
    # Rows that lose victim.normalize pool the two normalisations: the walk names exactly those.
    result = walk(tmp_path, _drop_from_config("normalize"))
    assert {k for k, v in result.items() if v} == {"victim.normalize.mean", "victim.normalize.std"}


def test_normalize_by_latent_space_gives_four_columns_with_their_fields() -> None:
    spec = {
        **_drop_generator(BASE),
        "victim": None,
        "victims": [{"arch": "lenet"}, {"arch": "lenet", "normalize": NORMALIZE}],
        "generators": [
            {**BASE["generator"], "latent_space": "z"},
            {**BASE["generator"], "latent_space": "w"},
        ],
        "methods": ["gi-z/w"],
    }
    spec = {k: v for k, v in spec.items() if v is not None}
    df = ag.identify(pd.DataFrame(_rows(spec, "a")))
    labels = sorted(df[ag.COLUMN].unique())
    assert len(labels) == 4
    assert all("latent_space=" in label and "normalize.mean=" in label for label in labels)
    assert {label.split(" · ")[0] for label in labels} == {"gi-z/w [paper]"}


def test_protocols_label_their_columns_in_one_phrase_and_fedsgd_by_name() -> None:
    """fedsgd cells carry no protocol keys (the paper's protocol stays out of the id); their
    column must still say fedsgd, not '–', and the nested keys collapse into one phrase."""
    spec = {
        **BASE,
        "methods": ["gi-x"],
        "batch_sizes": [2],
        "protocols": [
            {"kind": "fedsgd"},
            {"kind": "fedavg", "local_steps": [2], "local_batch_size": 1, "local_lr": 0.1},
            {"kind": "aggregate", "n_clients": [2]},
            {"kind": "aggregate", "n_clients": [2], "local_steps": [3]},
        ],
    }
    df = ag.identify(pd.DataFrame(_rows(spec, "a")))
    assert sorted(df[ag.COLUMN].unique()) == [
        "gi-x [paper] · protocol=aggregate N=2",
        "gi-x [paper] · protocol=aggregate N=2 of fedavg K=3 b=B lr=0.1",
        "gi-x [paper] · protocol=fedavg K=2 b=1 lr=0.1",
        "gi-x [paper] · protocol=fedsgd",
    ]
    assert df[ag.PROTOCOL_COLUMN].notna().all()
