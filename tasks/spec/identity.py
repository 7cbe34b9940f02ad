"""Identity: canonical JSON (the basis of every cell id) and the provenance mark a config's
`tuned_on` carries (where its values were tuned, and what differs from this grid).
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from gi_core.errors import ConfigError
from tasks.spec.plan import data_colour

if TYPE_CHECKING:
    from tasks.spec.schema import GridSpec


def canonical_json(obj: Any) -> str:
    """Stable JSON: sorted keys, no whitespace, floats by shortest repr (so 0.1 == 1e-1 once
    parsed), NaN/inf refused. The basis of every cell id."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


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
