"""`gi-eval methods [NAME]`: each method's parameters, their paper and tuned values, and where
the tuned ones come from (gi_core.attacks.registry holds the values; this module shows them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from rich.table import Table

from gi_core.attacks.registry import METHODS, Method, get_method, method_config

# Where `preset: tuned` was chosen (the registry's comment and docs/results/tuning.md).
TUNING_SOURCE = (
    "`gi-eval tune grids/table1_cpu.yaml`: Optuna TPE, 8 trials per method, held-out LFW "
    "batches 23-24 of B = 4, convnet width 16, 32 px (docs/results/tuning.md)"
)
SEARCHED = ("gi-x", "gi-z/w")  # the methods whose values were searched; others inherit them


def method_names(name: str | None) -> list[str]:
    """Every registry name, or just `name` (ConfigError naming the known ones if unknown)."""
    return list(METHODS) if name is None else [get_method(name).name]


def provenance(method: Method, param: str) -> str:
    """'searched for gi-x' or 'inherited from gi-z/w' for a tuned parameter of `method`."""
    if method.name in SEARCHED:
        return f"searched for {method.name}"
    for source in SEARCHED:
        if METHODS[source].tuned.get(param, object()) == method.tuned[param]:
            return f"inherited from {source} (shares the stage)"
    return "set in the registry"


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def method_table(name: str) -> Table:
    """One method's parameters: the paper's value, the tuned value and its provenance."""
    method = get_method(name)
    paper = _values(name, "paper")
    tuned = _values(name, "tuned")
    prior = "generator prior" if method.uses_generator else "pixels"
    table = Table(title=f"{name}: {method.reference} [{prior}]", title_justify="left")
    for column in ("parameter", "paper", "tuned", "tuned value from"):
        table.add_column(column)
    for param in paper:
        changed = param in method.tuned
        table.add_row(
            param,
            _show(paper[param]),
            _show(tuned[param]) if changed else "=",
            provenance(method, param) if changed else "",
        )
    return table


def _values(name: str, preset: str) -> Mapping[str, Any]:
    config = method_config(name, preset=preset)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name != "preset"}
