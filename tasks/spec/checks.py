"""Cross-field checks of a grid spec (GridSpec validation): methods and their parameters,
axes, labels, baseline, checkpoint files, and whether the data set supplies and decodes
every batch the grid (and its tuning) attacks. Each returns 'path: message' lines.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gi_core.attacks.registry import METHOD_NAMES, config_class, method_config, uses_generator
from gi_core.datasets import check_decodable, dataset_info, max_batches
from gi_core.defenses import FEDSGD_ONLY
from gi_core.errors import ConfigError
from tasks.spec.identity import canonical_json
from tasks.spec.plan import (
    batches_needed,
    cell_indices,
    evaluation_batches,
    evaluation_samples,
    find_tuning_batches,
    label_draws,
    training_clients,
    tuning_batches,
    tuning_samples,
)

if TYPE_CHECKING:
    from tasks.spec.schema import GridSpec, MethodSpec


def semantic_problems(spec: GridSpec) -> list[str]:
    """Cross-field checks that need gi_core or the filesystem, as 'path: message' lines."""
    return [
        *_axis_problems(spec),
        *_method_problems(spec),
        *_variant_problems(spec),
        *_baseline_problems(spec),
        *_generator_problems(spec),
        *_checkpoint_problems(spec),
        *_protocol_problems(spec),
        *_data_problems(spec),
        *_resource_problems(spec),
        *_rgap_problems(spec),
    ]


def _protocol_problems(spec: GridSpec) -> list[str]:
    """Protocols against defenses, labels, batch sizes and tuning (decisions 194, 195)."""
    protocols = spec.protocol_axis
    problems = []
    if len({repr(p) for p in protocols}) < len(protocols):
        problems.append("protocols: the same protocol is listed twice")
    others = [p for p in protocols if not p.is_fedsgd]
    kinds = sorted({d.kind for family in spec.defenses for d in family.expand()})
    problems += [
        f"defenses: {k} is defined on one FedSGD gradient; remove it or use protocols: "
        "[{kind: fedsgd}]"
        for k in kinds
        if others and k in FEDSGD_ONLY
    ]
    many = [p.n_clients for p in protocols if p.n_clients > 1]
    if many and spec.tuning.stage:
        problems.append(
            "tuning.stage: tuning on aggregated clients is not supported; tune a fedsgd grid "
            "and use its values (preset: tuned), or drop the aggregate protocol"
        )
    for i, m in enumerate(spec.methods):
        labels = m.params.get("labels", "given")
        if labels == "idlg" and many:
            problems.append(
                f"methods[{i}].params.labels: idlg recovers one image's label; an aggregate "
                "has n_clients x B images: use labels: count or yin"
            )
    return problems


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
    return _feature_domain_problems(spec)


def _feature_domain_problems(spec: GridSpec) -> list[str]:
    """GIFD searches the feature maps of a DCGAN-kind trunk (gi_core.attacks.gifd); StyleGAN2's
    feature domain is not implemented, so refuse that pairing before anything runs."""
    if "gifd" not in {m.name for m in spec.methods}:
        return []
    return [
        f"{_axis_field(spec, 'generator', i)}.kind: gifd searches a DCGAN-kind prior's feature "
        "maps and stylegan2 exposes none; use dcgan32, dcgan64 or digiface for gifd"
        for i, g in enumerate(spec.generator_axis)
        if g.kind == "stylegan2"
    ]


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


def _too_few(spec: GridSpec, j: int, draw: Any, available: int, samples: int) -> str:
    d, b = spec.data, spec.batch_sizes[j]
    how = "" if draw == "distinct" else f" with label draw {draw!r}"
    clients = max(p.n_clients for p in spec.protocol_axis)
    extra = f" (x{clients} aggregated clients)" if clients > 1 else ""
    return (
        f"batch_sizes[{j}]: {d.dataset!r} ({samples} samples) supplies only "
        f"{available} non-overlapping batches of {b}{how}; data.num_batches is "
        f"{d.num_batches}{extra} from data.first_batch {d.first_batch}"
    )


def _data_problems(spec: GridSpec) -> list[str]:
    d = spec.data
    try:
        info = dataset_info(d.dataset, image_size=d.image_size)
    except ConfigError as e:
        return [f"data.dataset: {e}"]
    problems: list[str] = []
    used: list[int] = []
    needed, clients = batches_needed(spec), sorted({p.n_clients for p in spec.protocol_axis})
    for j, b in enumerate(spec.batch_sizes):
        for draw in label_draws(spec):
            available = max_batches(
                d.dataset,
                batch_size=b,
                image_size=d.image_size,
                shuffle_seed=d.shuffle_seed,
                draw=draw,
            )
            if available < needed:
                problems.append(_too_few(spec, j, draw, available, info.num_samples))
                continue
            used += [
                i
                for k in evaluation_batches(spec)
                for n in clients
                for i in cell_indices(spec, b, k, n_clients=n, draw=draw)
            ]
    if not problems:  # the victims' training images are decoded too
        trouble, trained = _training_problems(spec)
        problems, used = problems + trouble, used + trained
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


def _training_problems(spec: GridSpec) -> tuple[list[str], list[int]]:
    """Trained victims (decision 270): the data set must hold each training's clients beside
    every sample the grid attacks, disjoint from them. A grid that attacks a training sample is
    refused, never given other training samples: which samples train a victim depends on the
    data and the training alone (tasks.spec.plan.training_clients). Returns the problems and
    the training samples."""
    d, problems, samples = spec.data, [], []
    attacked: frozenset[int] | None = None
    for j, v in enumerate(spec.victim_axis):
        if v.train is None or not any(v.train.rounds):
            continue
        field = f"{_axis_field(spec, 'victim', j)}.train"
        try:
            clients = training_clients(
                d.dataset, image_size=d.image_size, shuffle_seed=d.shuffle_seed, train=v.train
            )
        except ConfigError as e:
            problems.append(f"{field}: {e}")
            continue
        mine = sorted({i for client in clients for i in client})
        attacked = evaluation_samples(spec) if attacked is None else attacked
        shared = sorted(attacked.intersection(mine))
        if shared:
            problems.append(
                f"{field}: {len(shared)} of its {len(mine)} training samples (the last "
                f"{v.train.clients * v.train.local_steps} batches of {v.train.batch_size} of "
                f"the plan) are attacked by the grid, e.g. {shared[:5]}; {d.dataset!r} is too "
                "small for both: lower data.num_batches, train.clients, train.local_steps or "
                "train.batch_size"
            )
        samples += mine
    return problems, samples


def _rgap_problems(spec: GridSpec) -> list[str]:
    """R-GAP (`rgap`, `rgap+g`) inverts one image through a victim of its form: every victim
    of the grid is built (untrained, without its checkpoint) and checked, before submission."""
    from gi_core.attacks.registry import RGAP_METHODS
    from gi_core.attacks.rgap import check_victim
    from gi_core.victims import build_victim

    users = [(i, m) for i, m in enumerate(spec.methods) if m.name in RGAP_METHODS]
    if not users:
        return []
    i, m = users[0]
    problems = []
    if any(b != 1 for b in spec.batch_sizes):
        problems.append(
            f"batch_sizes: {m.name} (methods[{i}]) inverts the gradient of one image, as R-GAP "
            "does; use batch_sizes: [1]"
        )
    if spec.budgets.match is not None:
        problems.append(
            f"budgets.match: {m.name} (methods[{i}]) is closed form, with no iterations to "
            "match; run it in a grid without budgets.match"
        )
    try:
        classes = dataset_info(spec.data.dataset, image_size=spec.data.image_size).num_classes
    except ConfigError:
        return problems  # _data_problems names the data set
    size = spec.data.image_size
    for j, v in enumerate(spec.victim_axis):
        extra: dict[str, Any] = {"width": v.width} if v.width is not None else {}
        model = build_victim(  # untrained: the form, not the weights, decides
            v.arch, num_classes=classes, image_size=size, seed=v.seed,
            normalize=v.normalisation(), **extra,
        )  # fmt: skip
        try:
            check_victim(model, (3, size, size), method=m.name)
        except ConfigError as e:
            field = _axis_field(spec, "victim", j)
            problems.append(f"{field}.{str(e).removeprefix('victim.')}")
    return problems
