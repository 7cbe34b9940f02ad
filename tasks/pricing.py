"""What one iteration of an attack costs, from the committed cost table (issue 12 and 16).

`docs/results/performance.json`'s `cost_table` holds measured seconds per iteration
(benchmarks/performance.py) of two kinds of row:

* **stage rows** (`stage`: x, z or w): one stage of an attack (a pixel step, a latent step
  through the generator, a step of the per-image generator copies), measured on one victim
  and image size at one torch thread, as a cell of a grid runs. A cell whose every stage has a
  row on its victim and image size is priced stage by stage: its mean price per iteration is
  the iterations-weighted mean of its stages' prices, scaled linearly in batch x restarts.
  GI-w's w step costs 3.3x GI-z's z step on the CPU (docs/results/performance.md), so one
  price per family was up to 2.2x off for single-stage methods (decision 272);
* **family rows** (pixel or generator search, at the benchmark's threads): for everything
  else, the exact row scaled in batch x restarts, else the nearest row scaled by the victim's
  forward FLOPs.

`cell_cost` prices a cell from them. Used by `gi-eval plan` (pipelines.costmodel) and by
seconds-matched budgets (tasks.budget), so it lives in tasks, below both. A cell here is
anything with `method`, `config` and `gradient` (an InversionCell), which keeps tasks.cells out
of the import.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TABLE = Path(__file__).resolve().parent.parent / "docs" / "results" / "performance.json"
PIXEL_METHODS = ("gi-x", "gi-x+bn")  # the rest search a generator's latents or weights


@dataclass(frozen=True)
class CellCost:
    seconds_per_iteration: float
    # measured (this run) | calibrated | learned from <run> | measured (table) |
    # scaled by FLOPs | none
    source: str


def load_table(path: Path = TABLE) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = json.loads(path.read_text()).get("cost_table", [])
    return rows


def cell_cost(
    cell: Any,
    *,
    device: str,
    table: Sequence[Mapping[str, Any]],
    run: Mapping[str, float],
    calibrated: Mapping[str, float],
    learned: Callable[[Any], CellCost | None] | None = None,
) -> CellCost:
    """`learned`: a price measured by earlier runs for exactly this kind of cell
    (pipelines.learned_costs), preferred over the committed table. Seconds-matched budgets
    (tasks.budget) never pass one: their price sets iterations, which enter the cell id, so it
    must be the same on every machine."""
    if cell.method in run:
        return CellCost(run[cell.method], "measured (this run)")
    if cell.method in calibrated:
        return CellCost(calibrated[cell.method], "calibrated")
    found = learned(cell) if learned is not None else None
    if found is not None:
        return found
    g = cell.gradient
    work = len(g.indices) * cell.config.restarts * local_work(g.protocol, g.batch_size)
    by_stage = stage_price(cell, device=device, table=table, work=work)
    if by_stage is not None:
        return by_stage
    family = family_of(cell.method)
    same = [r for r in table if r["device"] == device and r.get("family") == family]
    exact = [
        r
        for r in same
        if r["victim"] == g.victim.arch
        and r["image_size"] == g.image_size
        and r["mode"] == "engine"
    ]
    if exact:
        ref = min(exact, key=lambda r: abs(math.log(r["batch"] * r["restarts"] / work)))
        scale = work / (ref["batch"] * ref["restarts"])
        return CellCost(ref["seconds_per_iteration"] * scale, _table_source("measured", ref))
    engine_rows = [r for r in same if r["mode"] == "engine" and r.get("forward_gflop")]
    if not engine_rows:
        return CellCost(math.nan, "none")
    flop = forward_gflop(g.victim.arch, g.victim.width, g.image_size)
    ref = min(engine_rows, key=lambda r: abs(math.log(r["forward_gflop"] / flop)))
    scale = (flop * work) / (ref["forward_gflop"] * ref["batch"] * ref["restarts"])
    return CellCost(ref["seconds_per_iteration"] * scale, _table_source("scaled by FLOPs", ref))


# A stage's iterations field -> the stage row that prices it. A method with a stage not listed
# here (GIFD's feature steps, GGL's candidate evaluations) is priced by its family row.
STAGE_OF_FIELD = {"x_iterations": "x", "z_iterations": "z", "w_iterations": "w"}


def stages(method: str, config: Any) -> dict[str, int] | None:
    """Iterations per stage kind ({'z': 75, 'w': 165} for GIAS), None when a stage has no kind."""
    out: dict[str, int] = {}
    for name, its in stage_iterations(config).items():
        if its == 0:
            continue
        kind = "x" if name == "iterations" and method in PIXEL_METHODS else STAGE_OF_FIELD.get(name)
        if kind is None:
            return None
        out[kind] = out.get(kind, 0) + its
    return out or None


def stage_price(
    cell: Any, *, device: str, table: Sequence[Mapping[str, Any]], work: float
) -> CellCost | None:
    """The iterations-weighted mean of the cell's stage prices, each stage row (same device,
    victim and image size) scaled linearly from its batch x restarts to `work`; None when a
    stage has no row."""
    its = stages(cell.method, cell.config)
    if its is None:
        return None
    g = cell.gradient
    rows: dict[str, Mapping[str, Any]] = {}
    for kind in its:
        found = [
            r
            for r in table
            if r.get("stage") == kind
            and r["device"] == device
            and r["victim"] == g.victim.arch
            and r["image_size"] == g.image_size
        ]
        if not found:
            return None
        rows[kind] = min(found, key=lambda r: abs(math.log(r["batch"] * r["restarts"] / work)))
    seconds = sum(
        n * rows[k]["seconds_per_iteration"] * work / (rows[k]["batch"] * rows[k]["restarts"])
        for k, n in its.items()
    )
    per_iteration = seconds / sum(its.values())
    return CellCost(per_iteration, _table_source("measured", rows[next(iter(its))], stages=True))


def local_work(protocol: Any, batch: int) -> float:
    """Images through the victim per attack evaluation relative to the gradient of the whole
    batch: 1 for gradients (FedSGD, or an aggregate of them); K local steps of b images each
    (FedAvg, decision 194) differentiate K·b images. The table holds FedSGD rows, so this
    scales them linearly (fedavg_cpu measured 1.93x for K = 4, b = 1, B = 2, against 2)."""
    local = getattr(protocol, "local", None)
    if local is None:
        return 1.0
    b = batch if local.local_batch_size is None else min(local.local_batch_size, batch)
    return local.local_steps * b / batch


def protocol_key(kind: Any, local_steps: Any, local_batch_size: Any, n_clients: Any) -> str:
    """What a price depends on of the protocol, as text ('fedsgd', 'fedavg K=4 b=1',
    'aggregate N=2', 'aggregate N=2 K=2 b=B'): a learned price is reused only for the same."""

    def known(v: Any) -> Any:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    kind = known(kind) or "fedsgd"
    parts = [str(kind)]
    if kind == "aggregate":
        parts.append(f"N={int(known(n_clients) or 1)}")
    if known(local_steps) is not None:
        size = known(local_batch_size)
        parts.append(f"K={int(local_steps)} b={'B' if size is None else int(size)}")
    return " ".join(parts)


def _table_source(kind: str, row: Mapping[str, Any], *, stages: bool = False) -> str:
    """The benchmark records the machine's load average and torch threads with each row: on a
    shared machine the table overestimates a quiet node's time, and a job with fewer cores than
    the benchmark had runs slower; the label says both."""
    where = ("table, by stage" if stages else "table") if kind == "measured" else "from a table row"
    if "load" not in row:
        return f"measured ({where})" if kind == "measured" else kind
    threads = f", {row['threads']} thread(s)" if "threads" in row else ""
    return f"{kind} ({where} at load {row['load']:.0f}{threads})"


def family_of(method: str) -> str:
    """The table's method family: pixel search (gi-x) or generator search (gi-z/w)."""
    return "gi-x" if method in PIXEL_METHODS else "gi-z/w"


def iterations(config: Any) -> int:
    """Every stage's iterations (`iterations` and each `*_iterations` field, e.g. GIFD's
    `f_iterations`); GGL's `iterations` count candidate evaluations, one gradient each.
    0 for a closed-form method (R-GAP): the cost model does not price those (`closed_form`)."""
    return sum(stage_iterations(config).values())


def stage_iterations(config: Any) -> dict[str, int]:
    """Each stage field (`iterations`, `*_iterations`) of `config` and its iterations."""
    names = [n for n in vars(config) if n == "iterations" or n.endswith("_iterations")]
    return {n: int(getattr(config, n, 0) or 0) for n in names}


@functools.lru_cache(maxsize=64)
def forward_gflop(arch: str, width: int | None, image_size: int) -> float:
    """GFLOPs of one image's forward pass through the victim (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from gi_core.victims import build_victim

    extra: dict[str, Any] = {"width": width} if width is not None else {}
    model = build_victim(arch, num_classes=10, image_size=image_size, seed=0, **extra).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9
