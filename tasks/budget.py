"""Matched budgets (issue 16): scale each method's stages so that every method gets the same
victim gradient evaluations, or the same priced attack seconds, per cell.

    budgets: {match: grad_evals, value: 8000}   # iterations x restarts = 8000 for every method
    budgets: {match: seconds, value: 30}        # 30 s per cell at the cost table's price

A method's budget is its stage iterations (`iterations`, or `z_iterations` + `w_iterations`
for GIAS, ...) times its restarts; one iteration evaluates the victim's gradient once per
restart (tasks.cells.budget_columns). Matching keeps the restarts and the method's own split
between its stages (GIAS's z/w split stays in proportion) and scales every stage by one
factor, each rounded to the nearest iteration (at least 1).

Seconds are priced, never measured at plan time: seconds per iteration of the cell come from
the committed cost table (docs/results/performance.json, tasks.pricing.cell_cost) on the CPU,
the only device the table holds: stage by stage where every stage has a row (decision 272),
else the family's row for the same victim and image size scaled linearly in batch x restarts,
else scaled by the victim's forward FLOPs. A new cost table re-prices, so
the cells of a seconds-matched grid change with it (their ids follow the iterations).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from gi_core.attacks.engine import BaseConfig
from gi_core.errors import ConfigError
from tasks.pricing import cell_cost, load_table

if TYPE_CHECKING:
    from tasks.cells import GradientCell

PRICE_DEVICE = "cpu"  # the committed cost table's device


@dataclass(frozen=True)
class BudgetRecord:
    """What a matched cell records in its rows (storage.metrics identity-and-budget block)."""

    match: str | None = None  # grad_evals | seconds | None (the method's own iterations)
    value: float | None = None
    seconds_per_iteration: float | None = None  # the price, for seconds matching

    def columns(self, total_iterations: int) -> dict[str, Any]:
        priced = (
            self.seconds_per_iteration * total_iterations
            if self.seconds_per_iteration is not None
            else None
        )
        return {
            "budget_match": self.match,
            "budget_match_value": self.value,
            "budget_priced_seconds": priced,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def stage_fields(config: BaseConfig) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(config)
        if f.name == "iterations" or f.name.endswith("_iterations")
    ]


def total_iterations(config: BaseConfig) -> int:
    return sum(int(getattr(config, name)) for name in stage_fields(config))


def scaled(config: BaseConfig, iterations: float) -> BaseConfig:
    """`config` with its stages scaled in proportion to `iterations` in all (each >= 1)."""
    factor = iterations / total_iterations(config)
    changes = {n: max(1, round(getattr(config, n) * factor)) for n in stage_fields(config)}
    return dataclasses.replace(config, **changes)


def match(
    config: BaseConfig,
    method: str,
    gradient: GradientCell,
    *,
    kind: str | None,
    value: float | None,
) -> tuple[BaseConfig, BudgetRecord]:
    """The config at the requested budget and what to record; unchanged when `kind` is None."""
    if kind is None or value is None:
        return config, BudgetRecord()
    if kind == "grad_evals":
        return scaled(config, value / config.restarts), BudgetRecord(kind, value)
    price = seconds_per_iteration(config, method, gradient)
    return scaled(config, value / price), BudgetRecord(kind, value, price)


def seconds_per_iteration(config: BaseConfig, method: str, gradient: GradientCell) -> float:
    """The cost table's CPU price of one iteration of this attack on this gradient."""
    probe = SimpleNamespace(method=method, config=config, gradient=gradient)
    cost = cell_cost(probe, device=PRICE_DEVICE, table=load_table(), run={}, calibrated={})
    if not math.isfinite(cost.seconds_per_iteration) or cost.seconds_per_iteration <= 0:
        raise ConfigError(
            f"budgets.match: seconds needs a price for {method} on {gradient.victim.arch}, but "
            "docs/results/performance.json has no CPU row of its family; use grad_evals"
        )
    return float(cost.seconds_per_iteration)
